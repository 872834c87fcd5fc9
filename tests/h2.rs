//! TLS termination and HTTP/2 downstream, with curl (nghttp2) as the client: the multipart
//! rewrite works the same over h2c, h2 over TLS and HTTP/1.1 over TLS; an HTTP/2 client that
//! stalls mid-body gets 408 (pingora's HTTP/2 reads have no timeout of their own).

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

struct Tmp(PathBuf);

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmp(tag: &str) -> Tmp {
    let d = std::env::temp_dir().join(format!("unpart-h2-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Tmp(d)
}

/// A self-signed certificate for 127.0.0.1 (openssl; `.ci/run` installs it).
fn cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    let st = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&k)
        .arg("-out")
        .arg(&c)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success());
    (c, k)
}

/// `curl` with `args` plus `-F` parts; (status, HTTP version) as curl reports them.
fn curl(args: &[&str], url: &str, file: &Path) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "-o", "/dev/null"])
        .args(["-w", "%{http_code} %{http_version}"])
        .args(args)
        .args(["-F", "title=sea & sun", "-F"])
        .arg(format!("photo=@{};type=image/jpeg", file.display()))
        .arg(url)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut it = text.split_whitespace();
    let status = it.next().unwrap_or("").to_string();
    let version = it.next().unwrap_or("").to_string();
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (status, version)
}

fn check_upload(up: &Upstream, data: &[u8]) {
    let r = up.wait_for(1).remove(0);
    up.take();
    assert!(r.complete);
    assert_eq!(r.framing, Framing::Chunked);
    assert_eq!(r.body_len, data.len() as u64);
    assert_eq!(r.body_sha256, sha256_hex(data));
    assert_eq!(r.header("x-form-title"), Some("sea%20&%20sun"));
    assert_eq!(r.header("content-type"), Some("image/jpeg"));
    assert!(r.header("x-file-name").is_some());
}

fn data_file(dir: &Path, n: usize) -> (PathBuf, Vec<u8>) {
    let data = payload(n);
    let p = dir.join("photo.jpg");
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

#[test]
fn h2c_uploads_are_rewritten_like_http1() {
    let t = tmp("h2c");
    let (file, data) = data_file(&t.0, 8 << 20);
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "h2c: true\n");
    let url = format!("http://{}/u", unpart.addr);
    let (status, version) = curl(&["--http2-prior-knowledge"], &url, &file);
    assert_eq!((status.as_str(), version.as_str()), ("200", "2"));
    check_upload(&up, &data);
    // HTTP/1.1 still works on the same listener.
    let (status, version) = curl(&["--http1.1"], &url, &file);
    assert_eq!((status.as_str(), version.as_str()), ("200", "1.1"));
    check_upload(&up, &data);
}

#[test]
fn tls_with_h2_by_alpn_and_http1() {
    let t = tmp("tls");
    let (c, k) = cert(&t.0);
    let (file, data) = data_file(&t.0, 3 << 20);
    let up = Upstream::start();
    let unpart = Unpart::start(
        &up.addr,
        &format!("tls:\n  cert: {}\n  key: {}\n", c.display(), k.display()),
    );
    let url = format!("https://{}/u", unpart.addr);
    let ca = c.display().to_string();
    let (status, version) = curl(&["--http2", "--cacert", &ca], &url, &file);
    assert_eq!((status.as_str(), version.as_str()), ("200", "2"));
    check_upload(&up, &data);
    let (status, version) = curl(&["--http1.1", "--cacert", &ca], &url, &file);
    assert_eq!((status.as_str(), version.as_str()), ("200", "1.1"));
    check_upload(&up, &data);

    // h2: false offers HTTP/1.1 only.
    let h1 = Unpart::start(
        &up.addr,
        &format!(
            "tls:\n  cert: {}\n  key: {}\n  h2: false\n",
            c.display(),
            k.display()
        ),
    );
    let url = format!("https://{}/u", h1.addr);
    let (_, version) = curl(&["--http2", "--cacert", &ca], &url, &file);
    assert_eq!(version, "1.1");
    check_upload(&up, &data);
}

#[test]
fn a_stalled_h2_upload_gets_408() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "h2c: true\ntimeouts: {client_body_idle: 1}\n");
    let mut child = Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "--max-time",
            "20",
            "-X",
            "POST",
        ])
        .args(["-H", "Content-Type: multipart/form-data; boundary=st"])
        .args(["-T", "-", "-w", "%{http_code}", "-o", "/dev/null"])
        .arg(format!("http://{}/u", unpart.addr))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("curl");
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(
            b"--st\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x\"\r\n\r\nsome bytes",
        )
        .unwrap();
    stdin.flush().unwrap();
    // Hold stdin open past the idle timeout: curl has nothing more to send. curl prints the
    // answer's status but exits only once its input ends.
    let start = Instant::now();
    let rejected = "rejected: 408 client_timeout";
    while !unpart.log_text().contains(rejected) {
        assert!(start.elapsed() < Duration::from_secs(10), "no 408");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(start.elapsed() >= Duration::from_millis(900));
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "408");
    let got = up.received_after(Duration::from_millis(200));
    assert!(got.iter().all(|r| !r.complete));
}

/// Reads from `s` until the peer closes it; how long that took. A read timeout fails.
/// How long after `from` the connection was closed. `from` is taken before the step that
/// starts unpart's clock, so the test thread's own delays can only lengthen it.
fn closed_after(s: &mut impl std::io::Read, from: Instant) -> Duration {
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .expect("closed by unpart, not a read timeout");
    from.elapsed()
}

/// With h2c on, unpart (not pingora, whose h2c check reads exactly 24 bytes with no timeout)
/// tells HTTP/2 from HTTP/1 at the start of a connection: a request shorter than the preface
/// is answered, and silent or idle connections are still closed after `client_keepalive`.
#[test]
fn with_h2c_on_http1_connections_are_answered_and_bounded() {
    use std::io::BufReader;
    use std::net::TcpStream;

    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "h2c: true\ntimeouts: {client_keepalive: 2}\n");
    let in_time = |held: Duration, what: &str| {
        assert!(
            held >= Duration::from_millis(1500) && held < Duration::from_secs(6),
            "{what}: closed after {held:?}, expected about 2 s"
        );
    };

    // 18 bytes, less than the 24-byte preface.
    let r = raw_request(&unpart.addr, b"GET / HTTP/1.0\r\n\r\n").expect("an answer");
    assert_eq!(r.status, 200);
    let got = up.wait_for(1);
    assert_eq!(got[0].method, "GET");
    up.take();

    // A connection that sends nothing.
    let from = Instant::now();
    let mut s = TcpStream::connect(&unpart.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    in_time(closed_after(&mut s, from), "silent connection");

    // One that stops inside the preface.
    let from = Instant::now();
    let mut s = TcpStream::connect(&unpart.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    in_time(closed_after(&mut s, from), "partial preface");

    // An idle keep-alive connection, after two requests on it.
    let mut s = TcpStream::connect(&unpart.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    s.write_all(b"GET /k HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut r).unwrap().status, 200);
    let from = Instant::now();
    s.write_all(b"GET /k HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut r).unwrap().status, 200);
    in_time(closed_after(&mut r, from), "idle keep-alive connection");
    assert_eq!(up.take().len(), 2);

    // HTTP/2 with prior knowledge still works on the same listener.
    let out = Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "--max-time", "10"])
        .args(["-o", "/dev/null", "-w", "%{http_code} %{http_version}"])
        .arg(format!("http://{}/h", unpart.addr))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 2");
}
