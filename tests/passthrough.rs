//! Everything that is not a multipart upload on a stream route passes through unchanged:
//! method, path, query, headers, body bytes and framing; responses relayed as they are.

mod support;

use std::io::{BufReader, Write};
use std::net::TcpStream;

use support::*;

#[test]
fn plain_requests_keep_method_path_headers_body_and_framing() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();

    let json = post(
        "/api/items?sort=desc&q=a%20b",
        "application/json",
        &body,
        "X-Trace: t1\r\nAuthorization: Bearer x\r\n",
    );
    let resp = raw_request(&unpart.addr, &json).unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-upstream"), Some("yes"));

    let chunked_req = post_chunked("/stream", "application/octet-stream", &body, 10_000);
    assert_eq!(raw_request(&unpart.addr, &chunked_req).unwrap().status, 200);

    for method in ["PUT", "PATCH", "DELETE"] {
        let req =
            format!("{method} /m/{method} HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\n\r\nabc");
        assert_eq!(
            raw_request(&unpart.addr, req.as_bytes()).unwrap().status,
            200
        );
    }

    let got = up.wait_for(5);
    let r = &got[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.target, "/api/items?sort=desc&q=a%20b");
    assert_eq!(r.framing, Framing::Length(body.len() as u64));
    assert_eq!(r.body_sha256, sha256_hex(&body));
    assert_eq!(r.header("x-trace"), Some("t1"));
    assert_eq!(r.header("authorization"), Some("Bearer x"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.complete);

    let c = &got[1];
    assert_eq!(c.framing, Framing::Chunked);
    assert_eq!(c.body_sha256, sha256_hex(&body));
    assert!(c.complete);

    for (rec, m) in got[2..].iter().zip(["PUT", "PATCH", "DELETE"]) {
        assert_eq!(rec.method, m);
        assert_eq!(rec.target, format!("/m/{m}"));
        assert_eq!(rec.body, b"abc");
    }
}

#[test]
fn multipart_on_a_passthrough_route_is_forwarded_as_sent() {
    let up = Upstream::start();
    let unpart = Unpart::start(
        &up.addr,
        "routes:\n  - prefix: /legacy/\n    mode: passthrough\n  - prefix: /any\n    methods: [PUT]\n    mode: passthrough\n",
    );
    // Even malformed multipart passes untouched where unpart is told not to parse it.
    let body = form(
        "pp",
        &[("f", Some("a.txt"), None, b"x"), ("late", None, None, b"1")],
    );
    let broken = b"--pp\r\nno colon\r\n\r\n".to_vec();
    for (path, method, b) in [
        ("/legacy/up", "POST", &body),
        ("/legacy/up", "POST", &broken),
        ("/any", "PUT", &body),
    ] {
        let mut req = post(path, &mp("pp"), b, "");
        req.splice(0..4, method.bytes());
        let resp = raw_request(&unpart.addr, &req).unwrap();
        assert_eq!(resp.status, 200, "{method} {path}");
    }
    for r in up.wait_for(3) {
        assert!(r.complete);
        assert_eq!(r.header("content-type"), Some(mp("pp").as_str()));
        assert!(r.body_sha256 == sha256_hex(&body) || r.body_sha256 == sha256_hex(&broken));
        assert!(r.header("x-file-name").is_none());
    }
    // A POST to /any is not covered by the PUT-only route: it streams.
    let resp = raw_request(&unpart.addr, &post("/any", &mp("pp"), &body, "")).unwrap();
    assert_eq!(resp.status, 422);
}

#[test]
fn whole_proxy_in_passthrough_mode() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "mode: passthrough\n");
    let body = form(
        "pp",
        &[("f", Some("a.txt"), None, b"x"), ("late", None, None, b"1")],
    );
    let resp = raw_request(
        &unpart.addr,
        &post("/u", &mp("pp"), &body, "X-Form-x: forged\r\n"),
    )
    .unwrap();
    assert_eq!(resp.status, 200);
    let r = &up.wait_for(1)[0];
    assert_eq!(r.body_sha256, sha256_hex(&body));
    assert!(
        r.header("x-form-x").is_none(),
        "reserved headers go in every mode"
    );
}

#[test]
fn other_content_types_pass_through_on_stream_routes() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    for ct in [
        "multipart/mixed; boundary=x",
        "application/x-www-form-urlencoded",
        "text/plain",
    ] {
        let resp = raw_request(&unpart.addr, &post("/u", ct, b"--x\r\n\r\n", "")).unwrap();
        assert_eq!(resp.status, 200, "{ct}");
    }
    for r in up.wait_for(3) {
        assert_eq!(r.body, b"--x\r\n\r\n");
    }
}

#[test]
fn keep_alive_for_plain_requests() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let s = TcpStream::connect(&unpart.addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    for i in 0..20 {
        w.write_all(format!("GET /k/{i} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .unwrap();
        let resp = read_response(&mut r).unwrap();
        assert_eq!(resp.status, 200);
        let v = resp.json();
        assert_eq!(v["len"], 0);
    }
    up.wait_for(20);
    assert!(
        up.connections() <= 2,
        "{} upstream connections for 20 requests",
        up.connections()
    );
}
