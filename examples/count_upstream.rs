//! A counting HTTP/1.1 upstream for `benches/upload.sh`: it reads every request body
//! (Content-Length or chunked) into one reusable 256 KiB buffer per connection, counts the
//! bytes without keeping them, and answers `200 {"bytes":N}` with keep-alive.
//!
//! Usage: `count_upstream [--listen 127.0.0.1:0] [--port-file FILE]`
//!
//! It only binds loopback addresses. With port 0 the kernel picks a free port; `--port-file`
//! receives the bound port once the listener is up (written to a temp name, then renamed, so a
//! reader never sees half a number). One line per request goes to stderr.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BUF: usize = 256 * 1024;
/// A request head larger than this is refused.
const MAX_HEAD: usize = 64 * 1024;
/// A connection that sends nothing for this long is dropped.
const IDLE: Duration = Duration::from_secs(120);

fn usage() -> ! {
    eprintln!("usage: count_upstream [--listen 127.0.0.1:PORT] [--port-file FILE]");
    std::process::exit(2);
}

fn main() -> io::Result<()> {
    let mut listen = "127.0.0.1:0".to_string();
    let mut port_file = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().unwrap_or_else(|| usage()),
            "--port-file" => port_file = Some(args.next().unwrap_or_else(|| usage())),
            _ => usage(),
        }
    }
    let addr: SocketAddr = listen.parse().unwrap_or_else(|_| usage());
    if !addr.ip().is_loopback() {
        eprintln!("count_upstream: refusing to bind {addr}: loopback addresses only");
        std::process::exit(2);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(addr, port_file))
}

async fn serve(addr: SocketAddr, port_file: Option<String>) -> io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    if let Some(path) = port_file {
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, format!("{}\n", bound.port()))?;
        std::fs::rename(&tmp, &path)?;
    }
    eprintln!("count_upstream listening on {bound}");
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut conn = Conn {
                stream,
                buf: vec![0u8; BUF],
                start: 0,
                end: 0,
            };
            if let Err(e) = conn.run().await {
                if e.kind() != io::ErrorKind::UnexpectedEof {
                    eprintln!("count_upstream: {peer}: {e}");
                }
            }
        });
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "connection closed mid-request",
    )
}

enum Framing {
    Length(u64),
    Chunked,
}

struct Head {
    method: String,
    target: String,
    framing: Framing,
    close: bool,
    expect_continue: bool,
}

/// Where the chunked decoder is.
#[derive(Clone, Copy)]
enum Chunk {
    /// In a size line: the value so far, whether a digit was seen, whether in an extension.
    Size {
        n: u64,
        digits: bool,
        ext: bool,
    },
    /// Data bytes left in the current chunk.
    Data(u64),
    /// The CR, then the LF, after a chunk's data.
    DataCr,
    DataLf,
    /// In the trailer section; true at the start of a line.
    Trailer(bool),
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

impl Conn {
    /// Reads more bytes after the unconsumed ones; 0 means the peer closed.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Err(bad("buffer full"));
        }
        let n = tokio::time::timeout(IDLE, self.stream.read(&mut self.buf[self.end..]))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "idle connection"))??;
        self.end += n;
        Ok(n)
    }

    async fn run(&mut self) -> io::Result<()> {
        loop {
            let Some(head) = self.read_head().await? else {
                return Ok(());
            };
            if head.expect_continue {
                self.stream
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .await?;
            }
            let (bytes, kind) = match head.framing {
                Framing::Length(n) => (self.count_length(n).await?, "length"),
                Framing::Chunked => (self.count_chunked().await?, "chunked"),
            };
            eprintln!(
                "count_upstream: {} {} {kind} body: {bytes} bytes",
                head.method, head.target
            );
            let body = format!("{{\"bytes\":{bytes}}}");
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{body}",
                body.len(),
                if head.close { "Connection: close\r\n" } else { "" },
            );
            self.stream.write_all(resp.as_bytes()).await?;
            if head.close {
                let _ = self.stream.shutdown().await;
                return Ok(());
            }
        }
    }

    /// The next request head, or None when the peer closed cleanly between requests.
    async fn read_head(&mut self) -> io::Result<Option<Head>> {
        let mut searched = 0;
        let len = loop {
            let avail = &self.buf[self.start..self.end];
            if let Some(i) = memchr::memmem::find(&avail[searched..], b"\r\n\r\n") {
                break searched + i + 4;
            }
            searched = avail.len().saturating_sub(3);
            if avail.len() > MAX_HEAD {
                return Err(bad("request head too large"));
            }
            if self.fill().await? == 0 {
                return if self.start == self.end {
                    Ok(None)
                } else {
                    Err(eof())
                };
            }
        };
        let text = std::str::from_utf8(&self.buf[self.start..self.start + len])
            .map_err(|_| bad("request head is not UTF-8"))?;
        let mut lines = text.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let method = first.next().unwrap_or("").to_string();
        let target = first.next().unwrap_or("").to_string();
        let version = first.next().unwrap_or("");
        let mut close = version != "HTTP/1.1";
        let mut length = None;
        let mut chunked = false;
        let mut expect_continue = false;
        for line in lines.filter(|l| !l.is_empty()) {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| bad(format!("bad Content-Length {value:?}")))?,
                );
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value
                    .rsplit(',')
                    .next()
                    .is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
            } else if name.eq_ignore_ascii_case("connection") {
                for token in value.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        close = false;
                    }
                }
            } else if name.eq_ignore_ascii_case("expect") {
                expect_continue = value.eq_ignore_ascii_case("100-continue");
            }
        }
        self.start += len;
        let framing = if chunked {
            Framing::Chunked
        } else {
            Framing::Length(length.unwrap_or(0))
        };
        Ok(Some(Head {
            method,
            target,
            framing,
            close,
            expect_continue,
        }))
    }

    async fn count_length(&mut self, n: u64) -> io::Result<u64> {
        let mut left = n;
        loop {
            let take = left.min((self.end - self.start) as u64);
            self.start += take as usize;
            left -= take;
            if left == 0 {
                return Ok(n);
            }
            if self.fill().await? == 0 {
                return Err(eof());
            }
        }
    }

    async fn count_chunked(&mut self) -> io::Result<u64> {
        let mut total = 0u64;
        let mut st = Chunk::Size {
            n: 0,
            digits: false,
            ext: false,
        };
        loop {
            if self.start == self.end && self.fill().await? == 0 {
                return Err(eof());
            }
            if let Chunk::Data(left) = st {
                let take = left.min((self.end - self.start) as u64);
                self.start += take as usize;
                total += take;
                st = if take == left {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left - take)
                };
                continue;
            }
            let b = self.buf[self.start];
            self.start += 1;
            st = match (st, b) {
                (Chunk::Size { n, digits, .. }, b'\n') => {
                    if !digits {
                        return Err(bad("chunk size line without a size"));
                    }
                    if n == 0 {
                        Chunk::Trailer(true)
                    } else {
                        Chunk::Data(n)
                    }
                }
                (Chunk::Size { n, digits, ext }, b'\r') => Chunk::Size { n, digits, ext },
                (Chunk::Size { n, digits, .. }, b';') => Chunk::Size {
                    n,
                    digits,
                    ext: true,
                },
                (
                    Chunk::Size {
                        n,
                        digits,
                        ext: true,
                    },
                    _,
                ) => Chunk::Size {
                    n,
                    digits,
                    ext: true,
                },
                (Chunk::Size { n, ext: false, .. }, _) => {
                    let d = (b as char)
                        .to_digit(16)
                        .ok_or_else(|| bad(format!("bad chunk size byte {b:#04x}")))?;
                    let n = n
                        .checked_mul(16)
                        .ok_or_else(|| bad("chunk size overflows"))?
                        + u64::from(d);
                    Chunk::Size {
                        n,
                        digits: true,
                        ext: false,
                    }
                }
                (Chunk::DataCr, b'\r') => Chunk::DataLf,
                (Chunk::DataLf, b'\n') => Chunk::Size {
                    n: 0,
                    digits: false,
                    ext: false,
                },
                (Chunk::DataCr | Chunk::DataLf, _) => {
                    return Err(bad("chunk data not followed by CRLF"))
                }
                (Chunk::Trailer(true), b'\n') => return Ok(total),
                (Chunk::Trailer(_), b'\n') => Chunk::Trailer(true),
                (Chunk::Trailer(at_start), b'\r') => Chunk::Trailer(at_start),
                (Chunk::Trailer(_), _) => Chunk::Trailer(false),
                (Chunk::Data(_), _) => unreachable!("handled above"),
            };
        }
    }
}
