//! Bad input, limits and broken peers: the client gets the documented status and a one-line
//! JSON reason; the backend never sees a rejected or truncated upload end cleanly.

mod support;

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

fn json_error(resp: &Response) -> (String, Option<String>) {
    let v = resp.json();
    assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()), "{v}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    (
        v["error"].as_str().unwrap().to_string(),
        v["limit"].as_str().map(str::to_string),
    )
}

/// Nothing the upstream received (if anything) ended as a complete request.
fn assert_never_complete(up: &Upstream) {
    for r in up.received_after(Duration::from_millis(200)) {
        assert!(
            !r.complete,
            "backend saw a complete request for {}",
            r.target
        );
    }
}

#[test]
fn broken_content_types_are_400() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let long = "b".repeat(71);
    for ct in [
        "multipart/form-data".to_string(),
        "multipart/form-data; boundary=".to_string(),
        "multipart/form-data; boundary=a; boundary=b".to_string(),
        format!("multipart/form-data; boundary={long}"),
        "multipart/form-data; boundary=\"unterminated".to_string(),
    ] {
        let resp = raw_request(&unpart.addr, &post("/u", &ct, b"--a--\r\n", "")).unwrap();
        assert_eq!(resp.status, 400, "{ct}");
        assert_eq!(json_error(&resp).0, "malformed_multipart", "{ct}");
    }
    assert!(up.received_after(Duration::from_millis(50)).is_empty());
    assert!(unpart
        .log_text()
        .contains("rejected: 400 malformed_multipart"));
}

#[test]
fn malformed_bodies_are_400_and_never_complete_upstream() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let file_then_cut =
        b"--b\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x\"\r\n\r\nsome file bytes"
            .to_vec();
    let bad_header = b"--b\r\nContent-Disposition form-data\r\n\r\nx\r\n--b--\r\n".to_vec();
    let bad_boundary_line =
        b"--b\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x\"\r\n\r\nabc\r\n--b junk\r\n".to_vec();
    let cr_flood = vec![b'\r'; 100_000];
    let lf_then_garbage = [b"\n".repeat(50_000), b"garbage".to_vec()].concat();
    let bad_ct = b"--b\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x\"\r\nContent-Type: text/\x01plain\r\n\r\nx\r\n--b--\r\n".to_vec();
    for (what, body) in [
        ("no closing boundary", file_then_cut),
        ("header without colon", bad_header),
        ("garbage after boundary", bad_boundary_line),
        ("CR flood", cr_flood),
        ("LF flood", lf_then_garbage),
        ("control byte in file Content-Type", bad_ct),
    ] {
        for req in [
            post("/u", &mp("b"), &body, ""),
            post_chunked("/u", &mp("b"), &body, 1000),
        ] {
            let resp = raw_request(&unpart.addr, &req).unwrap();
            assert_eq!(
                resp.status,
                400,
                "{what}: {:?}",
                String::from_utf8_lossy(&resp.body)
            );
            assert_eq!(json_error(&resp).0, "malformed_multipart", "{what}");
        }
    }
    assert_never_complete(&up);
}

fn part(name: &str, value: &str) -> (String, String) {
    (name.to_string(), value.to_string())
}

#[test]
fn every_limit_is_413_naming_the_limit() {
    let up = Upstream::start();
    let unpart = Unpart::start(
        &up.addr,
        "limits:\n  part_header_bytes: 200\n  parts: 4\n  fields: 2\n  field_value_bytes: 10\n  header_bytes: 300\n  bytes_before_file: 1000\n  file_bytes: 100000\n",
    );
    let file = |data: &[u8]| -> Vec<u8> {
        let mut v =
            b"--b\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x\"\r\n\r\n".to_vec();
        v.extend_from_slice(data);
        v.extend_from_slice(b"\r\n--b--\r\n");
        v
    };
    let fields = |fs: &[(String, String)]| -> Vec<u8> {
        let mut v = Vec::new();
        for (n, val) in fs {
            v.extend_from_slice(
                format!("--b\r\nContent-Disposition: form-data; name=\"{n}\"\r\n\r\n{val}\r\n")
                    .as_bytes(),
            );
        }
        v
    };
    let long_header = [
        format!(
            "--b\r\nContent-Disposition: form-data; name=\"a\"\r\nX-Pad: {}\r\n\r\n1\r\n",
            "p".repeat(300)
        )
        .into_bytes(),
        file(b"x"),
    ]
    .concat();
    let many_parts = [b"--b\r\nA: 1\r\n\r\n\r\n".repeat(5), file(b"x")].concat();
    let many_fields = [
        fields(&[part("a", "1"), part("b", "2"), part("c", "3")]),
        file(b"x"),
    ]
    .concat();
    let long_value = [fields(&[part("a", "12345678901")]), file(b"x")].concat();
    let big_headers = [
        fields(&[part(&"n".repeat(150), "1"), part(&"m".repeat(150), "2")]),
        file(b"x"),
    ]
    .concat();
    let long_preamble = [b"preamble\r\n".repeat(200), file(b"x")].concat();
    let big_file = file(&vec![b'z'; 150_000]);
    for (limit, body) in [
        ("part_header_bytes", long_header),
        ("parts", many_parts),
        ("fields", many_fields),
        ("field_value_bytes", long_value),
        ("header_bytes", big_headers),
        ("bytes_before_file", long_preamble),
        ("file_bytes", big_file),
    ] {
        let resp = raw_request(&unpart.addr, &post("/u", &mp("b"), &body, "")).unwrap();
        assert_eq!(
            resp.status,
            413,
            "{limit}: {:?}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_eq!(
            json_error(&resp),
            ("limit_exceeded".into(), Some(limit.to_string()))
        );
    }
    assert_never_complete(&up);
    // The same limits let a small upload through.
    up.take();
    let ok = [fields(&[part("a", "1")]), file(b"fine")].concat();
    assert_eq!(
        raw_request(&unpart.addr, &post("/u", &mp("b"), &ok, ""))
            .unwrap()
            .status,
        200
    );
}

#[test]
fn route_limits_override_the_top_level() {
    let up = Upstream::start();
    let unpart = Unpart::start(
        &up.addr,
        "limits: {file_bytes: 10}\nroutes:\n  - prefix: /big\n    methods: [POST]\n    limits: {file_bytes: 1MiB}\n  - prefix: /raw\n    mode: passthrough\n",
    );
    let body = form("b", &[("f", Some("x"), None, &[1u8; 1000])]);
    assert_eq!(
        raw_request(&unpart.addr, &post("/small", &mp("b"), &body, ""))
            .unwrap()
            .status,
        413
    );
    assert_eq!(
        raw_request(&unpart.addr, &post("/big/1", &mp("b"), &body, ""))
            .unwrap()
            .status,
        200
    );
    let raw = raw_request(&unpart.addr, &post("/raw/1", &mp("b"), &body, "")).unwrap();
    assert_eq!(raw.status, 200);
    let got = up.wait_for(3);
    let raw_rec = got.iter().find(|r| r.target == "/raw/1").unwrap();
    assert_eq!(
        raw_rec.body_sha256,
        sha256_hex(&body),
        "passthrough route forwards as sent"
    );
}

#[test]
fn late_field_and_second_file_are_422_with_a_fix() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let late = form(
        "b",
        &[
            ("f", Some("x"), None, &[1u8; 50_000]),
            ("after", None, None, b"1"),
        ],
    );
    let resp = raw_request(&unpart.addr, &post("/u", &mp("b"), &late, "")).unwrap();
    assert_eq!(resp.status, 422);
    let v = resp.json();
    assert_eq!(v["error"], "late_field");
    let detail = v["detail"].as_str().unwrap();
    assert!(
        detail.contains("before the file") && detail.contains("spool"),
        "{detail}"
    );
    let two = form(
        "b",
        &[("f", Some("x"), None, b"1"), ("g", Some("y"), None, b"2")],
    );
    let resp = raw_request(&unpart.addr, &post_chunked("/u", &mp("b"), &two, 3)).unwrap();
    assert_eq!(resp.status, 422);
    assert_eq!(resp.json()["error"], "extra_file");
    let got = up.wait_for(2);
    assert!(got.iter().all(|r| !r.complete));
    let lens: Vec<u64> = got.iter().map(|r| r.body_len).collect();
    assert!(
        lens.contains(&50_000),
        "the file had streamed before the late field came: {lens:?}"
    );
}

/// Sends the head and part of a file, then gives up in the way `quit` says.
fn partial_upload(addr: &str, file_bytes: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let head = format!(
        "POST /u HTTP/1.1\r\nHost: t\r\nContent-Type: {}\r\nContent-Length: 10000000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x\"\r\n\r\n",
        mp("b")
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&vec![b'q'; file_bytes]).unwrap();
    s
}

#[test]
fn client_disconnect_mid_file_aborts_the_upstream_request() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let sizes = [1usize, 1000, 65_536, 300_000];
    for n in sizes {
        let s = partial_upload(&unpart.addr, n);
        // Let the head and the bytes so far reach the backend, then vanish.
        std::thread::sleep(Duration::from_millis(200));
        drop(s);
        let got = up.wait_for(1);
        assert_eq!(got[0].framing, Framing::Chunked, "{n}");
        assert!(!got[0].complete, "{n}: a truncated upload ended cleanly");
        assert!(got[0].body_len as usize <= n, "{n}");
        up.take();
    }
    // The client closed (FIN) mid-body: an access log line with that outcome for each. The
    // line is written in pingora's last hook, which may run after the backend saw the abort.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let log = unpart.log_text();
        let n = log
            .lines()
            .filter(|l| l.ends_with(" incomplete_body"))
            .count();
        if n >= sizes.len() {
            assert_eq!(n, sizes.len(), "{log}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} incomplete_body lines:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn idle_client_gets_408_and_upstream_sees_an_abort() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "timeouts: {client_body_idle: 0.5}\n");
    let s = partial_upload(&unpart.addr, 10);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let resp = read_response(&mut BufReader::new(s)).unwrap();
    assert_eq!(resp.status, 408);
    assert_eq!(json_error(&resp).0, "client_timeout");
    assert!(started.elapsed() < Duration::from_secs(8));
    let got = up.wait_for(1);
    assert!(!got[0].complete);
}

#[test]
fn unreachable_upstream_is_502_at_once() {
    // A port nobody listens on; a freed ephemeral port could be taken by a concurrent test.
    let dead = "127.0.0.1:1".to_string();
    let unpart = Unpart::start(&dead, "");
    let body = form("b", &[("f", Some("x"), None, b"data")]);
    let started = Instant::now();
    let resp = raw_request(&unpart.addr, &post("/u", &mp("b"), &body, "")).unwrap();
    assert_eq!(resp.status, 502);
    assert_eq!(json_error(&resp).0, "upstream_unreachable");
    let plain = raw_request(&unpart.addr, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert_eq!(plain.status, 502);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn upstream_failing_mid_stream_is_502() {
    let up = Upstream::start();
    up.set_behaviour(Behaviour::CloseAfter(100_000));
    let unpart = Unpart::start(&up.addr, "");
    let body = form("b", &[("f", Some("x"), None, &vec![3u8; 8 << 20])]);
    let resp = raw_request(&unpart.addr, &post("/u", &mp("b"), &body, "")).unwrap();
    assert_eq!(
        resp.status,
        502,
        "{:?}",
        String::from_utf8_lossy(&resp.body)
    );
    assert_eq!(json_error(&resp).0, "upstream_failed");
    assert!(!up.wait_for(1)[0].complete);
}

#[test]
fn upstream_answering_early_is_relayed() {
    let up = Upstream::start();
    up.set_behaviour(Behaviour::Early413);
    let unpart = Unpart::start(&up.addr, "");
    let body = form("b", &[("f", Some("x"), None, &vec![3u8; 16 << 20])]);
    let resp = raw_request(&unpart.addr, &post("/u", &mp("b"), &body, "")).unwrap();
    assert_eq!(resp.status, 413);
    assert_eq!(resp.body, b"too large");
}

#[test]
fn silent_upstream_is_504_after_the_read_timeout() {
    let up = Upstream::start();
    // Far longer than the bound below, so a loaded machine cannot turn the timeout into a
    // backend that closed.
    up.set_behaviour(Behaviour::Stall(Duration::from_secs(30)));
    let unpart = Unpart::start(&up.addr, "timeouts: {upstream_read: 0.5}\n");
    let body = form("b", &[("f", Some("x"), None, b"data")]);
    let started = Instant::now();
    let resp = raw_request(&unpart.addr, &post("/u", &mp("b"), &body, "")).unwrap();
    assert_eq!(
        resp.status,
        504,
        "{:?}",
        String::from_utf8_lossy(&resp.body)
    );
    assert_eq!(json_error(&resp).0, "upstream_timeout");
    // At least the configured 0.5 s (a misread "0.5" would not be); the upper bound is loose
    // for a loaded machine and still far from the backend's 30 s or the 60 s default.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(15),
        "{took:?}"
    );
    assert!(
        up.wait_for(1)[0].complete,
        "the request itself was complete"
    );
}

#[test]
fn backend_that_stops_reading_is_502_after_the_write_timeout() {
    let up = Upstream::start();
    up.set_behaviour(Behaviour::StopReading(1 << 20, Duration::from_secs(12)));
    let unpart = Unpart::start(&up.addr, "timeouts: {upstream_write: 0.5}\n");
    // Far more than the loopback socket buffers can hold.
    let body = form("b", &[("f", Some("x"), None, &vec![5u8; 64 << 20])]);
    let started = Instant::now();
    let resp = raw_request(&unpart.addr, &post("/u", &mp("b"), &body, "")).unwrap();
    assert_eq!(
        resp.status,
        502,
        "{:?}",
        String::from_utf8_lossy(&resp.body)
    );
    assert_eq!(json_error(&resp).0, "upstream_failed");
    assert!(
        started.elapsed() >= Duration::from_millis(400)
            && started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert!(!up.wait_for(1)[0].complete);
}
