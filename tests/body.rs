//! The client body reader (src/body.rs): large Content-Length bodies are read straight from
//! the socket between pingora's head and tail. Every byte must arrive in order, the connection
//! must stay usable afterwards, and timeouts, early answers and aborts must work in the middle.

mod support;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use support::*;

/// Bodies from this size on are read directly (body::MIN_DIRECT).
const DIRECT: usize = 4 << 20;

/// Deterministic bytes that never contain CR, so no boundary can occur in them.
fn data(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match (x >> 24) as u8 {
                b'\r' => b'r',
                b => b,
            }
        })
        .collect()
}

fn file_form(boundary: &str, file: &[u8]) -> Vec<u8> {
    form(
        boundary,
        &[
            ("title", None, None, b"t"),
            ("f", Some("big.bin"), None, file),
        ],
    )
}

fn connect(addr: &str) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    let w = s.try_clone().unwrap();
    (w, BufReader::new(s))
}

/// Writes `bytes` in pieces of `piece` bytes, pausing after the first `pause_after` bytes.
fn write_in_pieces(w: &mut TcpStream, bytes: &[u8], piece: usize, pause_after: Option<usize>) {
    let mut sent = 0;
    let mut paused = false;
    for p in bytes.chunks(piece) {
        w.write_all(p).unwrap();
        sent += p.len();
        if !paused && pause_after.is_some_and(|n| sent >= n) {
            paused = true;
            thread::sleep(Duration::from_millis(150));
        }
    }
}

fn assert_no_fallback(unpart: &Unpart) {
    let log = unpart.log_text();
    assert!(
        !log.contains("client body reader"),
        "the body reader complained: {log}"
    );
}

#[test]
fn large_uploads_arrive_intact_and_keep_the_connection() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let (mut w, mut r) = connect(&unpart.addr);
    // Just above the threshold, odd sizes, and one far past the read buffer.
    let sizes = [DIRECT, DIRECT + 12_345, 9 << 20];
    let mut files = Vec::new();
    for (i, n) in sizes.iter().enumerate() {
        let file = data(*n, i as u64 + 7);
        let body = file_form("bb", &file);
        w.write_all(&post("/big", &mp("bb"), &body, "")).unwrap();
        let resp = read_response(&mut r).unwrap();
        assert_eq!(resp.status, 200, "upload {i}");
        assert_ne!(resp.header("connection"), Some("close"), "upload {i}");
        // A plain request on the same connection right after.
        w.write_all(b"GET /plain HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        assert_eq!(
            read_response(&mut r).unwrap().status,
            200,
            "after upload {i}"
        );
        files.push((file, body.len()));
    }
    let got = up.wait_for(2 * sizes.len());
    for (i, (file, _)) in files.iter().enumerate() {
        let rec = &got[2 * i];
        assert!(rec.complete, "upload {i}");
        assert_eq!(rec.framing, Framing::Chunked);
        assert_eq!(rec.body_len, file.len() as u64, "upload {i}");
        assert_eq!(rec.body_sha256, sha256_hex(file), "upload {i}");
    }
    // The access log counts every body byte read.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let log = unpart.log_text();
        let ups: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" access]") && l.contains("POST /big"))
            .collect();
        if ups.len() == files.len() {
            for (line, (_, body_len)) in ups.iter().zip(&files) {
                assert!(line.contains(&format!("in={body_len} ")), "{line}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "access log: {log}");
        thread::sleep(Duration::from_millis(20));
    }
    assert_no_fallback(&unpart);
}

#[test]
fn odd_writes_and_pauses_at_every_phase() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let file = data(5 << 20, 3);
    let body = file_form("pp", &file);
    let req = post("/p", &mp("pp"), &body, "");
    let head_len = req.len() - body.len();
    // Pause with: only the header sent (pingora's first read must read the socket itself),
    // the header and one body byte, the end of pingora's head, inside the middle, and one
    // byte before the end (the tail is pingora's again).
    let pauses = [
        head_len,
        head_len + 1,
        head_len + (256 << 10),
        head_len + (3 << 20),
        req.len() - 1,
    ];
    for (i, pause) in pauses.iter().enumerate() {
        let (mut w, mut r) = connect(&unpart.addr);
        let piece = [7777, 1, 65_536, 333_333, 4096][i];
        let (a, b) = req.split_at(*pause);
        write_in_pieces(&mut w, a, piece, None);
        thread::sleep(Duration::from_millis(150));
        write_in_pieces(&mut w, b, piece, Some(1));
        let resp = read_response(&mut r).unwrap();
        assert_eq!(resp.status, 200, "pause {i}");
    }
    let got = up.wait_for(pauses.len());
    for (i, rec) in got.iter().enumerate() {
        assert!(rec.complete, "pause {i}");
        assert_eq!(rec.body_sha256, sha256_hex(&file), "pause {i}");
    }
    assert_no_fallback(&unpart);
}

#[test]
fn pipelined_request_after_a_large_upload_is_answered() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let file = data(DIRECT + 1000, 11);
    let mut bytes = post("/pl", &mp("q"), &file_form("q", &file), "");
    bytes.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n");
    let (mut w, mut r) = connect(&unpart.addr);
    let writer = thread::spawn(move || w.write_all(&bytes).map(|_| w));
    assert_eq!(read_response(&mut r).unwrap().status, 200);
    assert_eq!(read_response(&mut r).unwrap().status, 200);
    writer.join().unwrap().unwrap();
    let got = up.wait_for(2);
    assert_eq!(got[0].body_sha256, sha256_hex(&file));
    assert_eq!(got[1].target, "/next");
}

#[test]
fn expect_100_continue_with_a_large_body() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let file = data(6 << 20, 5);
    let body = file_form("ee", &file);
    let (mut w, mut r) = connect(&unpart.addr);
    let head = format!(
        "POST /e HTTP/1.1\r\nHost: t\r\nContent-Type: {}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        mp("ee"),
        body.len()
    );
    w.write_all(head.as_bytes()).unwrap();
    assert_eq!(read_response(&mut r).unwrap().status, 100);
    w.write_all(&body).unwrap();
    assert_eq!(read_response(&mut r).unwrap().status, 200);
    let rec = &up.wait_for(1)[0];
    assert!(rec.complete);
    assert_eq!(rec.body_sha256, sha256_hex(&file));
    assert_no_fallback(&unpart);
}

/// The head and `file_bytes` of a large file, then nothing.
fn stalled_upload(addr: &str, file_bytes: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let head = format!(
        "POST /u HTTP/1.1\r\nHost: t\r\nContent-Type: {}\r\nContent-Length: 100000000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x\"\r\n\r\n",
        mp("b")
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&vec![b'q'; file_bytes]).unwrap();
    s
}

#[test]
fn idle_client_in_the_middle_gets_408() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "timeouts: {client_body_idle: 0.5}\n");
    for n in [100usize, 300 << 10, 2 << 20] {
        let s = stalled_upload(&unpart.addr, n);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = Instant::now();
        let resp = read_response(&mut BufReader::new(s)).unwrap();
        assert_eq!(resp.status, 408, "{n}");
        assert!(started.elapsed() < Duration::from_secs(8), "{n}");
        let got = up.wait_for(1);
        assert!(!got[0].complete, "{n}");
        up.take();
    }
}

#[test]
fn client_vanishing_in_the_middle_aborts_the_upstream_request() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    for n in [1usize << 20, 5 << 20] {
        let s = stalled_upload(&unpart.addr, n);
        thread::sleep(Duration::from_millis(300));
        drop(s);
        let got = up.wait_for(1);
        assert!(!got[0].complete, "{n}: a truncated upload ended cleanly");
        assert!(got[0].body_len as usize <= n, "{n}");
        up.take();
    }
    let deadline = Instant::now() + TIMEOUT;
    // A close (FIN) mid-body is `incomplete_body`; a reset would be `client_aborted`.
    while !unpart.log_text().contains(" incomplete_body") {
        assert!(Instant::now() < deadline, "no incomplete_body in the log");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn early_413_in_the_middle_reaches_the_client() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "limits:\n  file_bytes: 1000000\n");
    let file = data(8 << 20, 9);
    let bytes = post("/l", &mp("l"), &file_form("l", &file), "");
    let (mut w, mut r) = connect(&unpart.addr);
    // The client keeps sending while unpart answers; unpart reads on for a moment so that the
    // client sees the answer, not a reset.
    let writer = thread::spawn(move || {
        let _ = w.write_all(&bytes);
    });
    let resp = read_response(&mut r).unwrap();
    assert_eq!(resp.status, 413);
    assert_eq!(resp.header("connection"), Some("close"));
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    let _ = writer.join();
    let got = up.wait_for(1);
    assert!(!got[0].complete);
}
