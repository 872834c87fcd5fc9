//! The load generator for `benches/upload.sh`: sends multipart/form-data uploads over plain
//! TCP, one connection (and thread) per upload, all started together, and prints one summary
//! line.
//!
//! Usage: `upload_client --addr 127.0.0.1:PORT --size-mb N [--conc N] [--expect body|file]
//!         [--path /upload] [--timeout SECS]`
//!
//! Each body is one small field (`title`) and then the file part, framed with Content-Length
//! as a browser sends it. The file's bytes are a 1 MiB pseudo-random buffer (without CR, so the
//! boundary cannot occur in it) written again and again, so no disk space and no per-request
//! memory are needed. Each upload's time runs from connect to the last byte of the response.
//!
//! The upstream (`count_upstream`) answers `{"bytes":N}`; `--expect body` checks N against the
//! whole multipart body (the direct path), `--expect file` against the file's size (through
//! unpart, which forwards only the file). A mismatch, a non-200 answer or a timeout exits 1.
//!
//! Output (stdout): `requests=R body_bytes=B file_bytes=F wall_s=W mb_s=M min_s=A max_s=Z`,
//! where `mb_s` is all body bytes over the wall time, in MB (10^6 bytes) per second.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

const BOUNDARY: &str = "----unpartBench7MA4YWxkTrZu0gW";
const PATTERN: usize = 1 << 20;

fn usage() -> ! {
    eprintln!(
        "usage: upload_client --addr 127.0.0.1:PORT --size-mb N [--conc N] \
         [--expect body|file] [--path /upload] [--timeout SECS]"
    );
    std::process::exit(2);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Body,
    File,
}

struct Opts {
    addr: SocketAddr,
    path: String,
    file_bytes: u64,
    conc: usize,
    expect: Expect,
    timeout: Duration,
}

fn parse_args() -> Opts {
    let mut addr = None;
    let mut path = "/upload".to_string();
    let mut size_mb: Option<u64> = None;
    let mut conc = 1usize;
    let mut expect = Expect::Body;
    let mut timeout = 60u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--addr" => addr = Some(val().parse::<SocketAddr>().unwrap_or_else(|_| usage())),
            "--path" => path = val(),
            "--size-mb" => size_mb = Some(val().parse().unwrap_or_else(|_| usage())),
            "--conc" => conc = val().parse().unwrap_or_else(|_| usage()),
            "--expect" => {
                expect = match val().as_str() {
                    "body" => Expect::Body,
                    "file" => Expect::File,
                    _ => usage(),
                }
            }
            "--timeout" => timeout = val().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let (Some(addr), Some(size_mb)) = (addr, size_mb) else {
        usage()
    };
    if !addr.ip().is_loopback() || conc == 0 || timeout == 0 {
        usage();
    }
    Opts {
        addr,
        path,
        file_bytes: size_mb << 20,
        conc,
        expect,
        timeout: Duration::from_secs(timeout),
    }
}

/// 1 MiB of xorshift bytes with every CR replaced, so `\r\n--BOUNDARY` never occurs.
fn pattern() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(PATTERN);
    while out.len() < PATTERN {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend(
            x.to_le_bytes()
                .iter()
                .map(|&b| if b == b'\r' { b'R' } else { b }),
        );
    }
    out
}

/// The multipart bytes before and after the file's data.
fn framing() -> (String, String) {
    let preamble = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nbench upload\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"bench.bin\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    );
    (preamble, format!("\r\n--{BOUNDARY}--\r\n"))
}

fn body_len(o: &Opts) -> u64 {
    let (preamble, epilogue) = framing();
    preamble.len() as u64 + o.file_bytes + epilogue.len() as u64
}

/// One upload, started when `start` opens; returns when it connected and when the
/// response's last byte arrived.
fn upload(o: &Opts, data: &[u8], start: &Barrier) -> io::Result<(Instant, Instant)> {
    let (preamble, epilogue) = framing();
    let body_len = body_len(o);
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: unpart-bench\r\n\
         Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {body_len}\r\n\r\n{preamble}",
        o.path, o.addr
    );
    let want = match o.expect {
        Expect::Body => body_len,
        Expect::File => o.file_bytes,
    };

    start.wait();
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&o.addr, o.timeout)?;
    s.set_read_timeout(Some(o.timeout))?;
    s.set_write_timeout(Some(o.timeout))?;
    s.write_all(head.as_bytes())?;
    let mut left = o.file_bytes;
    while left > 0 {
        let n = left.min(data.len() as u64) as usize;
        s.write_all(&data[..n])?;
        left -= n as u64;
    }
    s.write_all(epilogue.as_bytes())?;

    let (status, body) = read_response(&mut s)?;
    let t1 = Instant::now();
    let text = String::from_utf8_lossy(&body);
    if status != 200 {
        return Err(io::Error::other(format!("status {status}, body {text:?}")));
    }
    let got = text
        .split("\"bytes\":")
        .nth(1)
        .and_then(|r| {
            r.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|d| d.parse::<u64>().ok())
        })
        .ok_or_else(|| io::Error::other(format!("no byte count in {text:?}")))?;
    if got != want {
        return Err(io::Error::other(format!(
            "upstream counted {got} bytes, expected {want}"
        )));
    }
    Ok((t0, t1))
}

/// Reads one response with a Content-Length body (skipping 1xx heads).
fn read_response(s: &mut TcpStream) -> io::Result<(u16, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut tmp = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 * 1024 {
                return Err(io::Error::other("response head too large"));
            }
            let n = s.read(&mut tmp)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before the response",
                ));
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line in {head:?}")))?;
        buf.drain(..end);
        if (100..200).contains(&status) {
            continue;
        }
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .ok_or_else(|| io::Error::other(format!("no Content-Length in {head:?}")))?;
        while buf.len() < len {
            let n = s.read(&mut tmp)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the response body",
                ));
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        buf.truncate(len);
        return Ok((status, buf));
    }
}

fn main() {
    let o = Arc::new(parse_args());
    let data: Arc<Vec<u8>> = Arc::new(pattern());
    let start = Arc::new(Barrier::new(o.conc));
    let workers: Vec<_> = (0..o.conc)
        .map(|_| {
            let (o, data, start) = (o.clone(), data.clone(), start.clone());
            thread::spawn(move || upload(&o, &data, &start))
        })
        .collect();
    let mut spans = Vec::new();
    let mut failed = false;
    for (i, w) in workers.into_iter().enumerate() {
        match w.join() {
            Ok(Ok(span)) => spans.push(span),
            Ok(Err(e)) => {
                eprintln!("upload_client: upload {i}: {e}");
                failed = true;
            }
            Err(_) => {
                eprintln!("upload_client: upload {i}: thread panicked");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
    // Wall time: the first connect to the last response.
    let first = spans
        .iter()
        .map(|s| s.0)
        .min()
        .expect("at least one upload");
    let last = spans
        .iter()
        .map(|s| s.1)
        .max()
        .expect("at least one upload");
    let wall = (last - first).as_secs_f64();
    let times: Vec<f64> = spans.iter().map(|s| (s.1 - s.0).as_secs_f64()).collect();
    let body_bytes = body_len(&o) * o.conc as u64;
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let max = times.iter().copied().fold(0.0, f64::max);
    println!(
        "requests={} body_bytes={body_bytes} file_bytes={} wall_s={wall:.3} mb_s={:.1} min_s={min:.3} max_s={max:.3}",
        o.conc,
        o.file_bytes * o.conc as u64,
        body_bytes as f64 / 1e6 / wall,
    );
}
