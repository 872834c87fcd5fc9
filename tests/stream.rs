//! Stream mode with real clients: what the backend receives (DESIGN.md §1), keep-alive on
//! both sides, Expect: 100-continue, and the memory bound.

mod support;

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn reqwest_multipart_upload_arrives_as_raw_body_with_field_headers() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let file: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    let form = reqwest::multipart::Form::new()
        .text("title", "Quarterly report")
        .text("Tag", "a")
        .text("Tag", "b+c & d%")
        .text("note", "line1\r\nline2\0end")
        .text("备注", "你好")
        .part(
            "upload",
            reqwest::multipart::Part::bytes(file.clone())
                .file_name("dir/报告 final.pdf")
                .mime_str("application/pdf")
                .unwrap(),
        );
    let resp = reqwest::Client::new()
        .post(format!("http://{}/api/upload?id=42&x=%2F", unpart.addr))
        .header("X-Form-title", "forged")
        .header("X-File-Name", "forged.exe")
        .header("X-Request-Id", "r1")
        .multipart(form)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-upstream"], "yes");
    let summary: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(summary["len"], file.len());

    let r = &up.wait_for(1)[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.target, "/api/upload?id=42&x=%2F");
    assert!(r.complete);
    assert_eq!(r.framing, Framing::Chunked);
    assert_eq!(r.body_sha256, sha256_hex(&file));
    assert_eq!(r.header("content-type"), Some("application/pdf"));
    assert_eq!(r.header("x-request-id"), Some("r1"));
    // The base name, like Go's FileHeader.Filename.
    assert_eq!(
        unescape(r.header("x-file-name").unwrap()),
        "报告 final.pdf".as_bytes()
    );
    assert_eq!(r.header("x-file-field"), Some("upload"));
    let fields = r.form_fields();
    let want: Vec<(Vec<u8>, Vec<u8>)> = [
        ("title", "Quarterly report"),
        ("Tag", "a"),
        ("Tag", "b+c & d%"),
        ("note", "line1\r\nline2\0end"),
        ("备注", "你好"),
    ]
    .iter()
    .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
    .collect();
    assert_eq!(
        fields, want,
        "forged headers must be gone, real ones in order"
    );
    assert!(r.header("content-length").is_none());
}

#[test]
fn form_without_a_file_is_forwarded_with_an_empty_body() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let body = form("bnd", &[("a", None, None, b"1"), ("b", None, None, b"two")]);
    let resp = raw_request(&unpart.addr, &post("/f", &mp("bnd"), &body, "")).unwrap();
    assert_eq!(resp.status, 200);
    let r = &up.wait_for(1)[0];
    assert_eq!(r.framing, Framing::Length(0));
    assert!(r.complete);
    assert_eq!(r.body_len, 0);
    assert!(r.header("content-type").is_none());
    assert!(r.header("x-file-name").is_none());
    assert_eq!(
        r.form_fields(),
        vec![
            (b"a".to_vec(), b"1".to_vec()),
            (b"b".to_vec(), b"two".to_vec())
        ]
    );
}

/// `upstream: localhost:PORT` (a sidecar's usual setting) is looked up, for uploads and for
/// proxied requests alike. The backend listens where `localhost` resolves first (127.0.0.1
/// here, ::1 on some systems): the address unpart uses.
#[test]
fn a_host_name_upstream_is_looked_up() {
    use std::net::ToSocketAddrs;
    let first = ("localhost", 0)
        .to_socket_addrs()
        .expect("localhost resolves")
        .next()
        .expect("an address");
    let up = Upstream::start_at(first.ip());
    let port = up.addr.rsplit(':').next().unwrap();
    let unpart = Unpart::start(&format!("localhost:{port}"), "");
    for i in 0..3 {
        let body = form(
            "bh",
            &[("n", None, None, b"1"), ("f", Some("a.txt"), None, b"abc")],
        );
        let resp = raw_request(&unpart.addr, &post("/f", &mp("bh"), &body, "")).unwrap();
        assert_eq!(resp.status, 200, "upload {i}");
    }
    let resp = raw_request(&unpart.addr, b"GET /plain HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert_eq!(resp.status, 200);
    let got = up.wait_for(4);
    assert!(got[..3].iter().all(|r| r.complete && r.body_len == 3));
}

#[test]
fn keep_alive_on_both_sides() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let s = TcpStream::connect(&unpart.addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    for i in 0..5 {
        let data = format!("file number {i}").into_bytes();
        let body = form(
            "kk",
            &[("n", None, None, b"x"), ("f", Some("a.txt"), None, &data)],
        );
        w.write_all(&post("/k", &mp("kk"), &body, "")).unwrap();
        let resp = read_response(&mut r).unwrap();
        assert_eq!(resp.status, 200, "request {i}");
        // and a plain request on the same connection
        w.write_all(b"GET /plain HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        assert_eq!(read_response(&mut r).unwrap().status, 200);
    }
    let got = up.wait_for(10);
    assert!(got.iter().all(|r| r.complete));
    assert_eq!(got[8].body, b"file number 4");
    // Stream mode hands its upstream connection back to its pool before the client has the
    // response, so every upload finds it there: one connection for all five. (pingora's own
    // proxy path releases after answering; under load a quick next request may open another.)
    let uploads: std::collections::BTreeSet<usize> = got
        .iter()
        .filter(|r| r.target == "/k")
        .map(|r| r.conn)
        .collect();
    assert_eq!(uploads.len(), 1, "stream mode used connections {uploads:?}");
    assert!(up.connections() < 10, "no upstream reuse at all");
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let body = form("ee", &[("f", Some("a.bin"), None, &[7u8; 100_000])]);
    let s = TcpStream::connect(&unpart.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let head = format!(
        "POST /e HTTP/1.1\r\nHost: t\r\nContent-Type: {}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        mp("ee"),
        body.len()
    );
    w.write_all(head.as_bytes()).unwrap();
    let interim = read_response(&mut r).expect("100 Continue before any body byte");
    assert_eq!(interim.status, 100);
    w.write_all(&body).unwrap();
    assert_eq!(read_response(&mut r).unwrap().status, 200);
    let rec = &up.wait_for(1)[0];
    assert!(rec.header("expect").is_none());
    assert_eq!(rec.body_len, 100_000);
}

#[test]
fn reserved_headers_are_removed_from_every_request() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let forged =
        "X-Form-role: admin\r\nx-file-name: evil.sh\r\nX-FILE-Size: 1\r\nX-Formal: kept\r\n";
    let plain = format!("GET /g HTTP/1.1\r\nHost: t\r\n{forged}\r\n");
    assert_eq!(
        raw_request(&unpart.addr, plain.as_bytes()).unwrap().status,
        200
    );
    let json = post("/j", "application/json", b"{}", forged);
    assert_eq!(raw_request(&unpart.addr, &json).unwrap().status, 200);
    let body = form("rr", &[("f", Some("a"), None, b"x")]);
    let multi = post("/m", &mp("rr"), &body, forged);
    assert_eq!(raw_request(&unpart.addr, &multi).unwrap().status, 200);
    for r in up.wait_for(3) {
        assert!(r.header("x-form-role").is_none(), "{}", r.target);
        assert!(r.header("x-file-size").is_none(), "{}", r.target);
        assert_ne!(r.header("x-file-name"), Some("evil.sh"), "{}", r.target);
        assert_eq!(r.header("x-formal"), Some("kept"), "{}", r.target);
    }
}

#[test]
fn configured_header_names_are_used_and_reserved() {
    let up = Upstream::start();
    let unpart = Unpart::start(
        &up.addr,
        "headers:\n  reserved_prefixes: [X-Upload-]\n  field_prefix: X-Upload-Field-\n  file_name: X-Upload-Name\n  file_field: X-Upload-Part\n  file_size: X-Upload-Size\n  file_digest_prefix: X-Upload-\n",
    );
    let body = form(
        "cc",
        &[("a", None, None, b"1"), ("f", Some("n.txt"), None, b"x")],
    );
    let req = post(
        "/c",
        &mp("cc"),
        &body,
        "X-Upload-Name: forged\r\nX-Form-a: not-reserved-here\r\n",
    );
    assert_eq!(raw_request(&unpart.addr, &req).unwrap().status, 200);
    let r = &up.wait_for(1)[0];
    assert_eq!(r.all("x-upload-name"), ["n.txt"]);
    assert_eq!(r.header("x-upload-part"), Some("f"));
    assert_eq!(r.header("x-upload-field-a"), Some("1"));
    assert_eq!(r.header("x-form-a"), Some("not-reserved-here"));
}

#[test]
fn memory_does_not_grow_with_the_file() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    // Warm up, then measure the high-water mark across a file far larger than any buffer.
    let small = form("mm", &[("f", Some("a"), None, &[1u8; 1 << 20])]);
    assert_eq!(
        raw_request(&unpart.addr, &post("/w", &mp("mm"), &small, ""))
            .unwrap()
            .status,
        200
    );
    let before = unpart.status_kib("VmHWM:");
    assert!(before > 0, "cannot read /proc status");

    let size: u64 = 200 << 20;
    let mut head =
        b"--mm\r\nContent-Disposition: form-data; name=\"f\"; filename=\"big\"\r\n\r\n".to_vec();
    let tail = b"\r\n--mm--\r\n";
    let total = head.len() as u64 + size + tail.len() as u64;
    let s = TcpStream::connect(&unpart.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut req = format!(
        "POST /big HTTP/1.1\r\nHost: t\r\nContent-Type: {}\r\nContent-Length: {total}\r\n\r\n",
        mp("mm")
    )
    .into_bytes();
    req.append(&mut head);
    w.write_all(&req).unwrap();
    let chunk = vec![b'z'; 1 << 20];
    for _ in 0..(size >> 20) {
        w.write_all(&chunk).unwrap();
    }
    w.write_all(tail).unwrap();
    let mut r = BufReader::new(s);
    let resp = read_response(&mut r).unwrap();
    assert_eq!(resp.status, 200);
    let rec = &up.wait_for(2)[1];
    assert!(rec.complete);
    assert_eq!(rec.body_len, size);
    let after = unpart.status_kib("VmHWM:");
    let grown_mib = (after.saturating_sub(before)) / 1024;
    assert!(
        grown_mib < 24,
        "peak RSS grew by {grown_mib} MiB for a {} MiB file",
        size >> 20
    );
}
