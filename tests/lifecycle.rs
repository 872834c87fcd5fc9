//! Stopping and upgrading without losing uploads: SIGTERM stops accepting and drains the
//! uploads in flight (then exits at once, not after a fixed grace period); SIGQUIT plus a new
//! process started with `-u` hands the sockets over while uploads keep running, with zero
//! failures across the switch.

mod support;

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

fn signal(child: &Child, sig: i32) {
    // SAFETY: sends a signal to a process this test started.
    let r = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(r, 0, "kill failed");
}

/// Waits up to `limit` for the process to exit; its exit status, or None.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

/// One upload of `pieces` x 256 KiB, with `pause` between pieces; the response status.
fn upload(addr: &str, pieces: usize, pause: Duration) -> Result<u16, String> {
    let piece = vec![b'u'; 256 * 1024];
    let head = b"--lc\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x\"\r\n\r\n";
    let tail = b"\r\n--lc--\r\n";
    let len = head.len() + pieces * piece.len() + tail.len();
    let s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let req = format!(
        "POST /lc HTTP/1.1\r\nHost: t\r\nContent-Type: {}\r\nContent-Length: {len}\r\n\r\n",
        mp("lc")
    );
    let send = |w: &mut TcpStream, b: &[u8]| w.write_all(b).map_err(|e| format!("write: {e}"));
    send(&mut w, req.as_bytes())?;
    send(&mut w, head)?;
    for _ in 0..pieces {
        send(&mut w, &piece)?;
        thread::sleep(pause);
    }
    send(&mut w, tail)?;
    let resp = read_response(&mut BufReader::new(s)).map_err(|e| format!("read: {e}"))?;
    Ok(resp.status)
}

#[test]
fn sigterm_when_idle_exits_at_once() {
    let up = Upstream::start();
    let mut unpart = Unpart::start(&up.addr, "grace_period_seconds: 60\n");
    let t = Instant::now();
    signal(&unpart.child, libc::SIGTERM);
    let st = wait_exit(&mut unpart.child, Duration::from_secs(10)).expect("exited");
    assert!(st.success(), "{st:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(unpart.log_text().contains("drained: exiting"));
}

#[test]
fn sigterm_drains_uploads_in_flight() {
    let up = Upstream::start();
    let mut unpart = Unpart::start(&up.addr, "grace_period_seconds: 60\n");
    let addr = unpart.addr.clone();
    // Three uploads of 10 MiB that take about 4 s each; SIGTERM once all three are in flight.
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let a = addr.clone();
            thread::spawn(move || upload(&a, 40, Duration::from_millis(100)))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = raw_request(&unpart.admin, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n");
        if r.is_ok_and(|r| String::from_utf8_lossy(&r.body).contains("unpart_uploads_in_flight 3"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the three uploads never were in flight"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    signal(&unpart.child, libc::SIGTERM);
    // New connections are refused soon; the uploads in flight finish.
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(&addr).is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        thread::sleep(Duration::from_millis(20));
    }
    for w in workers {
        assert_eq!(w.join().unwrap(), Ok(200));
    }
    let st = wait_exit(&mut unpart.child, Duration::from_secs(20)).expect("exited");
    assert!(st.success());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "exit took {:?}",
        t.elapsed()
    );
    let got = up.wait_for(3);
    assert!(got
        .iter()
        .all(|r| r.complete && r.body_len == 40 * 256 * 1024));
    assert!(unpart
        .log_text()
        .contains("draining 3 in-flight request(s)"));
}

#[test]
fn upgrade_hands_over_with_zero_failed_uploads() {
    let up = Upstream::start();
    let mut old = Unpart::start(&up.addr, "grace_period_seconds: 60\n");
    let addr = old.addr.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (a, stop, ok, failed) = (addr.clone(), stop.clone(), ok.clone(), failed.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match upload(&a, 8, Duration::from_millis(40)) {
                        Ok(200) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => failed.lock().unwrap().push(format!("{other:?}")),
                    }
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_secs(1));

    // The new process waits for the sockets; the old one sends them on SIGQUIT.
    let conf = old.dir.join("unpart.yaml");
    let new_log = old.dir.join("new.log");
    let mut new = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_unpart"))
            .args(["-u", "-c"])
            .arg(&conf)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&new_log).unwrap())
            .spawn()
            .unwrap(),
    );
    thread::sleep(Duration::from_millis(300));
    let before = ok.load(Ordering::Relaxed);
    signal(&old.child, libc::SIGQUIT);
    let st = wait_exit(&mut old.child, Duration::from_secs(30)).expect("old process exited");
    assert!(st.success());
    // Keep uploading to the new process for a while.
    let after_exit = ok.load(Ordering::Relaxed);
    thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let failed = failed.lock().unwrap();
    assert!(failed.is_empty(), "failed uploads: {failed:?}");
    let total = ok.load(Ordering::Relaxed);
    assert!(
        before > 0 && total > after_exit,
        "{before} {after_exit} {total}"
    );
    assert!(old.log_text().contains("drained: exiting"));
    assert!(
        new.0.try_wait().unwrap().is_none(),
        "new process still serving"
    );
    let got = up.take();
    assert_eq!(got.len(), total);
    assert!(got.iter().all(|r| r.complete));
}

/// A process killed when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
