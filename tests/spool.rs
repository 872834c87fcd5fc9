//! Spool mode end to end: every field reaches the backend whatever its place in the form, the
//! file arrives with an exact length, size and digests, and spool files are private, never
//! visible by name, and gone on every path: success, client abort, malformed body, backend
//! down, the spool cap, and a disk that refuses the write.

mod support;

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

const SPOOL: &str = "mode: spool\nspool:\n  dir: \"{dir}/spool\"\n";

fn spool_dir(u: &Unpart) -> PathBuf {
    u.dir.join("spool")
}

/// unpart's open descriptors on files in `dir`: (fd target, permission bits).
fn spool_fds(u: &Unpart, dir: &Path) -> Vec<(String, u32)> {
    let fd_dir = format!("/proc/{}/fd", u.child.id());
    let Ok(entries) = std::fs::read_dir(&fd_dir) else {
        return Vec::new();
    };
    let prefix = dir.display().to_string();
    entries
        .flatten()
        .filter_map(|e| {
            let target = std::fs::read_link(e.path()).ok()?.display().to_string();
            if !target.starts_with(&prefix) {
                return None;
            }
            let mode = std::fs::metadata(e.path()).ok()?.permissions().mode();
            Some((target, mode & 0o777))
        })
        .collect()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn no_spool_left(u: &Unpart) {
    let dir = spool_dir(u);
    wait_until("spool descriptors closed", || spool_fds(u, &dir).is_empty());
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert!(names.is_empty(), "spool names left: {names:?}");
}

#[test]
fn every_field_in_order_with_exact_length_size_and_digests() {
    use sha2::Digest as _;
    let up = Upstream::start();
    let unpart = Unpart::start(
        &up.addr,
        &format!("{SPOOL}  digests: [md5, sha1, sha256, sha512, crc32c]\n"),
    );
    let data = payload(700_000);
    // A browser form: a field, the file, then more fields and the submit button.
    let body = form(
        "sp",
        &[
            ("title", None, None, b"Holiday"),
            ("photo", Some("beach.jpg"), Some("image/jpeg"), &data),
            ("tag", None, None, b"sea"),
            ("tag", None, None, b"sun & sand"),
            ("submit", None, None, b"Upload"),
        ],
    );
    for req in [
        post("/u?x=1", &mp("sp"), &body, ""),
        post_chunked("/u?x=1", &mp("sp"), &body, 10_000),
    ] {
        let resp = raw_request(&unpart.addr, &req).unwrap();
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        let r = up.wait_for(1).remove(0);
        up.take();
        assert!(r.complete);
        assert_eq!(r.framing, Framing::Length(data.len() as u64));
        assert_eq!(r.body_sha256, sha256_hex(&data));
        assert_eq!(r.target, "/u?x=1");
        let fields: Vec<(Vec<u8>, Vec<u8>)> = [
            ("title", "Holiday"),
            ("tag", "sea"),
            ("tag", "sun & sand"),
            ("submit", "Upload"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
        assert_eq!(r.form_fields(), fields);
        assert_eq!(r.header("content-type"), Some("image/jpeg"));
        assert_eq!(r.header("x-file-name"), Some("beach.jpg"));
        assert_eq!(r.header("x-file-field"), Some("photo"));
        assert_eq!(r.header("x-file-size"), Some("700000"));
        assert_eq!(
            r.header("x-file-md5").unwrap(),
            hex(&md5::Md5::digest(&data))
        );
        assert_eq!(
            r.header("x-file-sha1").unwrap(),
            hex(&sha1::Sha1::digest(&data))
        );
        assert_eq!(r.header("x-file-sha256").unwrap(), sha256_hex(&data));
        assert_eq!(
            r.header("x-file-sha512").unwrap(),
            hex(&sha2::Sha512::digest(&data))
        );
        assert_eq!(
            r.header("x-file-crc32c").unwrap(),
            format!("{:08x}", crc32c::crc32c(&data))
        );
        assert!(r.header("transfer-encoding").is_none());
        no_spool_left(&unpart);
    }

    // No file part: the fields alone, with an empty body.
    let body = form("sp", &[("a", None, None, b"1"), ("b", None, None, b"2")]);
    let resp = raw_request(&unpart.addr, &post("/u", &mp("sp"), &body, "")).unwrap();
    assert_eq!(resp.status, 200);
    let r = up.wait_for(1).remove(0);
    assert_eq!(r.framing, Framing::Length(0));
    assert_eq!(r.form_fields().len(), 2);
    assert!(r.header("x-file-size").is_none());
}

#[test]
fn a_second_file_is_422_and_never_reaches_the_backend() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, SPOOL);
    let body = form(
        "sp",
        &[
            ("a", Some("1.txt"), None, b"one"),
            ("b", Some("2.txt"), None, b"two"),
        ],
    );
    let resp = raw_request(&unpart.addr, &post("/u", &mp("sp"), &body, "")).unwrap();
    assert_eq!(resp.status, 422);
    assert_eq!(resp.json()["error"], "extra_file");
    assert!(up.received_after(Duration::from_millis(200)).is_empty());
    no_spool_left(&unpart);
}

/// Sends the head and the first part of a file, and holds the connection open.
fn start_slow_upload(addr: &str, file_len: usize) -> (TcpStream, Vec<u8>) {
    let data = payload(file_len);
    let body = form("sl", &[("f", Some("slow.bin"), None, &data)]);
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut w = s.try_clone().unwrap();
    let head = format!(
        "POST /slow HTTP/1.1\r\nHost: t\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
        mp("sl"),
        body.len()
    );
    w.write_all(head.as_bytes()).unwrap();
    w.write_all(&body[..body.len() / 2]).unwrap();
    (s, body)
}

#[test]
fn spool_files_are_private_nameless_and_closed_after_the_answer() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, SPOOL);
    let dir = spool_dir(&unpart);
    let (s, body) = start_slow_upload(&unpart.addr, 2 << 20);
    // Unlinked right after it is created: it may be seen in between, but only just.
    wait_until("a spool descriptor", || {
        !spool_fds(&unpart, &dir).is_empty()
    });
    let seen = Instant::now();
    wait_until("an unlinked spool descriptor", || {
        spool_fds(&unpart, &dir)
            .iter()
            .all(|(t, _)| t.ends_with(" (deleted)"))
    });
    assert!(
        seen.elapsed() < Duration::from_millis(500),
        "named for {:?}",
        seen.elapsed()
    );
    let fds = spool_fds(&unpart, &dir);
    assert_eq!(fds.len(), 1, "{fds:?}");
    let (target, mode) = &fds[0];
    assert_eq!(*mode, 0o600, "{target}");
    assert!(target.ends_with(" (deleted)"), "unlinked at once: {target}");
    assert!(target.contains("/unpart-"), "{target}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    assert_eq!(
        up.connections(),
        0,
        "nothing goes upstream before the body ends"
    );

    let mut w = s.try_clone().unwrap();
    w.write_all(&body[body.len() / 2..]).unwrap();
    let resp = read_response(&mut BufReader::new(s)).unwrap();
    assert_eq!(resp.status, 200);
    assert!(up.wait_for(1)[0].complete);
    no_spool_left(&unpart);
}

#[test]
fn every_failure_path_removes_the_spool_file() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, SPOOL);
    let dir = spool_dir(&unpart);

    // The client goes away mid-file.
    let (s, _) = start_slow_upload(&unpart.addr, 2 << 20);
    wait_until("a spool descriptor", || {
        !spool_fds(&unpart, &dir).is_empty()
    });
    drop(s);
    no_spool_left(&unpart);

    // The body breaks off: the closing boundary never comes.
    let data = payload(300_000);
    let mut body = form("sp", &[("f", Some("x"), None, &data)]);
    body.truncate(body.len() - 12);
    let req = [
        format!(
            "POST /u HTTP/1.1\r\nHost: t\r\nContent-Type: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
            mp("sp")
        )
        .into_bytes(),
        chunked(&body, 50_000),
    ]
    .concat();
    let resp = raw_request(&unpart.addr, &req).unwrap();
    assert_eq!(resp.status, 400);
    assert_eq!(resp.json()["error"], "malformed_multipart");
    no_spool_left(&unpart);
    assert!(up.received_after(Duration::from_millis(100)).is_empty());

    // The backend is down when the body has ended.
    let down = Unpart::start("127.0.0.1:1", SPOOL);
    let body = form("sp", &[("f", Some("x"), None, &data)]);
    let resp = raw_request(&down.addr, &post("/u", &mp("sp"), &body, "")).unwrap();
    assert_eq!(resp.status, 502);
    assert_eq!(resp.json()["error"], "upstream_unreachable");
    no_spool_left(&down);

    // The backend answers early and stops reading.
    up.set_behaviour(Behaviour::Early413);
    let big = form("sp", &[("f", Some("x"), None, &payload(8 << 20))]);
    let resp = raw_request(&unpart.addr, &post("/u", &mp("sp"), &big, "")).unwrap();
    assert_eq!(resp.status, 413);
    no_spool_left(&unpart);
    assert!(up.take().iter().all(|r| !r.complete));
}

#[test]
fn the_spool_cap_gives_507_before_the_disk_fills_and_frees_its_bytes() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, &format!("{SPOOL}  max_total_bytes: 200KiB\n"));
    let big = form("sp", &[("f", Some("x"), None, &payload(1 << 20))]);
    let resp = raw_request(&unpart.addr, &post("/u", &mp("sp"), &big, "")).unwrap();
    assert_eq!(resp.status, 507, "{}", String::from_utf8_lossy(&resp.body));
    let v = resp.json();
    assert_eq!(v["error"], "spool_full");
    assert_eq!(v["limit"], "spool.max_total_bytes");
    assert!(up.received_after(Duration::from_millis(100)).is_empty());
    no_spool_left(&unpart);
    assert!(unpart.log_text().contains("spool_full"));
    // The refused upload's bytes were given back.
    for _ in 0..3 {
        let ok = form("sp", &[("f", Some("x"), None, &payload(150_000))]);
        let resp = raw_request(&unpart.addr, &post("/u", &mp("sp"), &ok, "")).unwrap();
        assert_eq!(resp.status, 200);
    }
}

#[test]
fn a_disk_write_error_is_507_and_never_a_partial_upload() {
    let up = Upstream::start();
    // dash's `ulimit -f` counts 512-byte blocks: spool files may not grow past 1 MiB.
    let unpart = Unpart::start_wrapped(&up.addr, SPOOL, Some("ulimit -f 2048"));
    let big = form("sp", &[("f", Some("x"), None, &payload(4 << 20))]);
    let resp = raw_request(&unpart.addr, &post("/u", &mp("sp"), &big, "")).unwrap();
    assert_eq!(resp.status, 507, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.json()["error"], "spool_full");
    assert!(up.received_after(Duration::from_millis(100)).is_empty());
    no_spool_left(&unpart);
    assert!(unpart.log_text().contains("spool: File too large"));
    // Still serving.
    let ok = form("sp", &[("f", Some("x"), None, &payload(100_000))]);
    let resp = raw_request(&unpart.addr, &post("/u", &mp("sp"), &ok, "")).unwrap();
    assert_eq!(resp.status, 200);
}

#[test]
fn left_overs_of_a_dead_process_are_removed_at_startup() {
    let dir = std::env::temp_dir().join(format!("unpart-sweep-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let dead = dir.join("unpart-2147483646-0123abcd.spool");
    let foreign = dir.join("keep.me");
    std::fs::write(&dead, b"left over").unwrap();
    std::fs::write(&foreign, b"not ours").unwrap();
    let up = Upstream::start();
    let unpart = Unpart::start(
        &up.addr,
        &format!("mode: spool\nspool: {{dir: \"{}\"}}\n", dir.display()),
    );
    assert!(!dead.exists());
    assert!(foreign.exists());
    assert!(unpart.log_text().contains("removed 1 left-over spool file"));
    drop(unpart);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn memory_does_not_grow_with_a_spooled_file() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, SPOOL);
    let small = form("mm", &[("f", Some("a"), None, &[1u8; 1 << 20])]);
    let resp = raw_request(&unpart.addr, &post("/w", &mp("mm"), &small, "")).unwrap();
    assert_eq!(resp.status, 200);
    let before = unpart.status_kib("VmHWM:");
    assert!(before > 0, "cannot read /proc status");

    let size: u64 = 128 << 20;
    let head = b"--mm\r\nContent-Disposition: form-data; name=\"f\"; filename=\"big\"\r\n\r\n";
    let tail = b"\r\n--mm--\r\n";
    let total = head.len() as u64 + size + tail.len() as u64;
    let s = TcpStream::connect(&unpart.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut w = s.try_clone().unwrap();
    let req = format!(
        "POST /big HTTP/1.1\r\nHost: t\r\nContent-Type: {}\r\nContent-Length: {total}\r\n\r\n",
        mp("mm")
    );
    w.write_all(req.as_bytes()).unwrap();
    w.write_all(head).unwrap();
    let chunk = vec![b'z'; 1 << 20];
    for _ in 0..(size >> 20) {
        w.write_all(&chunk).unwrap();
    }
    w.write_all(tail).unwrap();
    let resp = read_response(&mut BufReader::new(s)).unwrap();
    assert_eq!(resp.status, 200);
    let rec = &up.wait_for(2)[1];
    assert!(rec.complete);
    assert_eq!(rec.body_len, size);
    assert_eq!(rec.framing, Framing::Length(size));
    let grown_mib = unpart.status_kib("VmHWM:").saturating_sub(before) / 1024;
    assert!(
        grown_mib < 24,
        "peak RSS grew by {grown_mib} MiB for a {} MiB spooled file",
        size >> 20
    );
    no_spool_left(&unpart);
}

/// Spool work goes through a fixed set of file threads (`jobs::THREADS`), not a thread per
/// upload: on tokio's blocking pool, 64 concurrent spooled uploads kept 235 threads alive.
#[test]
fn concurrent_spooled_uploads_share_a_few_file_threads() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const UPLOADS: usize = 32;
    let size = 4 << 20;
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, SPOOL);
    let threads_at_start = unpart.status_kib("Threads:");
    assert!(threads_at_start > 0, "cannot read /proc status");

    let done = Arc::new(AtomicBool::new(false));
    let pid = unpart.child.id();
    let sampler = {
        let done = Arc::clone(&done);
        thread::spawn(move || {
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                most = most.max(proc_status(pid, "Threads:"));
                thread::sleep(Duration::from_millis(5));
            }
            most
        })
    };
    let body = form("cc", &[("f", Some("a.bin"), None, &vec![7u8; size][..])]);
    let req = Arc::new(post("/c", &mp("cc"), &body, ""));
    let clients: Vec<_> = (0..UPLOADS)
        .map(|_| {
            let (addr, req) = (unpart.addr.clone(), Arc::clone(&req));
            thread::spawn(move || raw_request(&addr, &req).map(|r| r.status))
        })
        .collect();
    let statuses: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    done.store(true, Ordering::Relaxed);
    let most = sampler.join().unwrap();
    assert!(
        statuses.iter().all(|s| matches!(s, Ok(200))),
        "{statuses:?}"
    );
    let got = up.wait_for(UPLOADS);
    assert!(got.iter().all(|r| r.complete && r.body_len == size as u64));
    let limit = threads_at_start + unpart::jobs::THREADS as u64;
    assert!(
        most <= limit,
        "{most} threads during {UPLOADS} spooled uploads ({threads_at_start} at start, at most {limit} expected)"
    );
    no_spool_left(&unpart);
}
