//! `upstream: unix:/path`, the usual sidecar wiring: uploads in stream and spool mode and
//! plain proxied requests reach a backend listening on a Unix socket.

mod support;

use support::*;

#[test]
fn every_mode_reaches_a_unix_socket_backend() {
    let dir = std::env::temp_dir().join(format!("unpart-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let up = Upstream::start_unix(&dir.join("app.sock"));
    let unpart = Unpart::start(
        &up.addr,
        "routes:\n  - prefix: /spool/\n    mode: spool\nspool: {dir: \"{dir}/spool\"}\n",
    );
    let data = vec![7u8; 300_000];
    let body = form(
        "ux",
        &[("a", None, None, b"1"), ("f", Some("f.bin"), None, &data)],
    );
    for (path, framing) in [
        ("/stream/x", Framing::Chunked),
        ("/spool/x", Framing::Length(300_000)),
    ] {
        let resp = raw_request(&unpart.addr, &post(path, &mp("ux"), &body, "")).unwrap();
        assert_eq!(resp.status, 200, "{path}");
        let r = up.wait_for(1).remove(0);
        up.take();
        assert!(r.complete, "{path}");
        assert_eq!(r.framing, framing, "{path}");
        assert_eq!(r.body_sha256, sha256_hex(&data));
        assert_eq!(r.header("x-form-a"), Some("1"));
    }
    let resp = raw_request(
        &unpart.addr,
        b"POST /plain HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    )
    .unwrap();
    assert_eq!(resp.status, 200);
    let r = up.wait_for(1).remove(0);
    assert_eq!(r.body, b"hello");
    drop(unpart);
    drop(up);
    std::fs::remove_dir_all(&dir).unwrap();
}
