//! Real parts for the integration tests: a recording HTTP/1.1 upstream on a real socket, the
//! real unpart binary on ephemeral ports, and a raw-TCP client. Everything binds 127.0.0.1,
//! every wait has a timeout, and every process, port and temp file is cleaned up on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const TIMEOUT: Duration = Duration::from_secs(20);

/// How a request's body was framed on the wire the upstream saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    Chunked,
    Length(u64),
    None,
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub target: String,
    /// Names as sent (case kept), in order.
    pub headers: Vec<(String, String)>,
    pub framing: Framing,
    pub body_len: u64,
    pub body_sha256: String,
    /// The first MiB of the body.
    pub body: Vec<u8>,
    /// The body ended the way its framing says (last chunk, or all Content-Length bytes).
    pub complete: bool,
    /// Which upstream connection carried it (0 for the first accepted).
    pub conn: usize,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The form fields, decoded as the README tells backend authors to: lower-case the name
    /// after the prefix, then percent-decode name and value.
    pub fn form_fields(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.headers
            .iter()
            .filter(|(n, _)| n.len() > 7 && n[..7].eq_ignore_ascii_case("x-form-"))
            .map(|(n, v)| (unescape(&n[7..].to_ascii_lowercase()), unescape(v)))
            .collect()
    }
}

/// The first value of `name`, case-insensitively.
pub fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

pub fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).expect("ascii");
            out.push(u8::from_str_radix(hex, 16).expect("valid escape"));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// `n` bytes of a pattern that repeats only every 251 bytes, so a shifted or dropped byte shows.
pub fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i.wrapping_mul(7) % 251) as u8).collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|c| format!("{c:02x}")).collect()
}

/// What the upstream does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Read the whole body, answer 200 with a small JSON summary.
    Normal,
    /// Read this many body bytes, then close the connection without answering.
    CloseAfter(u64),
    /// Read this many body bytes, then reset the connection (RST, not FIN).
    ResetAfter(u64),
    /// Answer 413 right after the head and close, without reading the body.
    Early413,
    /// Read the whole body, then say nothing for this long before closing.
    Stall(Duration),
    /// Read this many body bytes, then neither read nor answer for a while (a hung backend).
    StopReading(u64, Duration),
    /// Like many WSGI and older Java servers: a chunked body gets 411 without being read;
    /// a Content-Length body is served as in `Normal`.
    RejectChunked,
}

struct Shared {
    received: Mutex<Vec<Received>>,
    cond: Condvar,
    behaviour: Mutex<Behaviour>,
    connections: std::sync::atomic::AtomicUsize,
}

/// A recording HTTP/1.1 server on 127.0.0.1, with keep-alive.
pub struct Upstream {
    pub addr: String,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
}

/// What the recording upstream needs of a connection, TCP or Unix.
trait Conn: Read + Write + Send + Sized + std::os::fd::AsRawFd + 'static {
    fn try_clone(&self) -> std::io::Result<Self>;
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    fn shutdown(&self, how: Shutdown) -> std::io::Result<()>;
    fn set_nonblocking_false(&self) -> std::io::Result<()>;
}

macro_rules! conn {
    ($t:ty) => {
        impl Conn for $t {
            fn try_clone(&self) -> std::io::Result<Self> {
                <$t>::try_clone(self)
            }
            fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
                <$t>::set_read_timeout(self, t)
            }
            fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
                <$t>::shutdown(self, how)
            }
            fn set_nonblocking_false(&self) -> std::io::Result<()> {
                <$t>::set_nonblocking(self, false)
            }
        }
    };
}
conn!(TcpStream);
conn!(std::os::unix::net::UnixStream);

impl Upstream {
    pub fn start() -> Upstream {
        Upstream::start_at("127.0.0.1".parse().expect("IP"))
    }

    /// The same upstream on a free port of `ip`.
    pub fn start_at(ip: std::net::IpAddr) -> Upstream {
        let listener = TcpListener::bind((ip, 0)).expect("bind upstream");
        let addr = listener.local_addr().expect("addr").to_string();
        listener.set_nonblocking(true).expect("nonblocking");
        Upstream::serve(addr, move || listener.accept().map(|(c, _)| c))
    }

    /// The same upstream on a Unix socket at `path`; `addr` is `unix:<path>`.
    pub fn start_unix(path: &std::path::Path) -> Upstream {
        let _ = std::fs::remove_file(path);
        let listener = std::os::unix::net::UnixListener::bind(path).expect("bind unix upstream");
        let addr = format!("unix:{}", path.display());
        listener.set_nonblocking(true).expect("nonblocking");
        Upstream::serve(addr, move || listener.accept().map(|(c, _)| c))
    }

    fn serve<C: Conn>(
        addr: String,
        mut accept: impl FnMut() -> std::io::Result<C> + Send + 'static,
    ) -> Upstream {
        let shared = Arc::new(Shared {
            received: Mutex::new(Vec::new()),
            cond: Condvar::new(),
            behaviour: Mutex::new(Behaviour::Normal),
            connections: Default::default(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (shared.clone(), stop.clone());
        thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match accept() {
                    Ok(conn) => {
                        // Accepted sockets inherit non-blocking mode on some systems.
                        let _ = conn.set_nonblocking_false();
                        let id = s.connections.fetch_add(1, Ordering::Relaxed);
                        let s = s.clone();
                        thread::spawn(move || serve_conn(conn, s, id));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Upstream { addr, shared, stop }
    }

    pub fn set_behaviour(&self, b: Behaviour) {
        *self.shared.behaviour.lock().unwrap() = b;
    }

    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Waits until `n` requests have been recorded (complete or not).
    pub fn wait_for(&self, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + TIMEOUT;
        let mut got = self.shared.received.lock().unwrap();
        while got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "upstream got {} requests, wanted {n}",
                got.len()
            );
            got = self.shared.cond.wait_timeout(got, left).unwrap().0;
        }
        got.clone()
    }

    /// Waits for the request whose target is `target` and returns it, complete or not; every
    /// other one recorded by then must be incomplete (a refused upload is recorded when unpart
    /// drops it, possibly after the client has its answer, so it can come before or after).
    pub fn wait_for_target(&self, target: &str) -> Received {
        let mut n = 1;
        loop {
            let got = self.wait_for(n);
            let others: Vec<&Received> = got.iter().filter(|r| r.target != target).collect();
            assert!(
                others.iter().all(|r| !r.complete),
                "a complete request other than {target}: {:?}",
                others.iter().map(|r| &r.target).collect::<Vec<_>>()
            );
            if let Some(r) = got.iter().find(|r| r.target == target) {
                return r.clone();
            }
            n = got.len() + 1;
        }
    }

    /// The requests recorded so far, after a short settle time.
    pub fn received_after(&self, settle: Duration) -> Vec<Received> {
        thread::sleep(settle);
        self.shared.received.lock().unwrap().clone()
    }

    pub fn take(&self) -> Vec<Received> {
        std::mem::take(&mut *self.shared.received.lock().unwrap())
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_conn<C: Conn>(conn: C, shared: Arc<Shared>, id: usize) {
    let _ = conn.set_read_timeout(Some(TIMEOUT));
    let mut w = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::with_capacity(256 * 1024, conn);
    loop {
        let Some((method, target, headers)) = read_head(&mut r) else {
            return;
        };
        let behaviour = *shared.behaviour.lock().unwrap();
        let get = |n: &str| find_header(&headers, n).map(str::to_string);
        let framing = if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            Framing::Chunked
        } else if let Some(n) = get("content-length") {
            Framing::Length(n.trim().parse().unwrap_or(0))
        } else {
            Framing::None
        };
        let mut rec = Received {
            method,
            target,
            headers,
            framing: framing.clone(),
            body_len: 0,
            body_sha256: String::new(),
            body: Vec::new(),
            complete: false,
            conn: id,
        };
        let refuse_chunked = behaviour == Behaviour::RejectChunked && framing == Framing::Chunked;
        if behaviour == Behaviour::Early413 || refuse_chunked {
            let answer: &[u8] = if refuse_chunked {
                b"HTTP/1.1 411 Length Required\r\nContent-Length: 15\r\nConnection: close\r\n\r\nLength Required"
            } else {
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large"
            };
            let _ = w.write_all(answer);
            rec.body_sha256 = sha256_hex(b"");
            record(&shared, rec);
            // Like real servers: stop sending, drain what the client still sends, then close
            // (closing with unread data would reset the connection and lose the answer).
            let _ = w.shutdown(Shutdown::Write);
            let mut sink = vec![0u8; 64 * 1024];
            let _ = r.get_ref().set_read_timeout(Some(Duration::from_secs(2)));
            while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
            return;
        }
        let limit = match behaviour {
            Behaviour::CloseAfter(n) | Behaviour::ResetAfter(n) | Behaviour::StopReading(n, _) => {
                Some(n)
            }
            _ => None,
        };
        let mut hasher = Sha256::new();
        let complete = read_body(&mut r, &framing, limit, &mut |d: &[u8]| {
            hasher.update(d);
            if rec.body.len() < 1 << 20 {
                let room = (1 << 20) - rec.body.len();
                rec.body.extend_from_slice(&d[..d.len().min(room)]);
            }
            rec.body_len += d.len() as u64;
        });
        if let Behaviour::StopReading(_, d) = behaviour {
            thread::sleep(d);
        }
        if let Behaviour::ResetAfter(_) = behaviour {
            reset(&w);
            record(&shared, rec);
            return;
        }
        rec.complete = complete == BodyEnd::Complete;
        rec.body_sha256 = hex(&hasher.finalize());
        let summary = format!(
            "{{\"len\":{},\"sha256\":\"{}\",\"complete\":{}}}",
            rec.body_len, rec.body_sha256, rec.complete
        );
        record(&shared, rec);
        if complete != BodyEnd::Complete {
            let _ = w.shutdown(Shutdown::Both);
            return;
        }
        if let Behaviour::Stall(d) = behaviour {
            thread::sleep(d);
            let _ = w.shutdown(Shutdown::Both);
            return;
        }
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Upstream: yes\r\nContent-Length: {}\r\n\r\n{}",
            summary.len(),
            summary
        );
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

fn record(shared: &Shared, rec: Received) {
    shared.received.lock().unwrap().push(rec);
    shared.cond.notify_all();
}

type Head = (String, String, Vec<(String, String)>);

fn read_head(r: &mut impl BufRead) -> Option<Head> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.trim_end().splitn(3, ' ');
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).ok()? == 0 {
            return None;
        }
        let l = l.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':')?;
        headers.push((n.to_string(), v.trim().to_string()));
    }
    Some((method, target, headers))
}

#[derive(Debug, PartialEq, Eq)]
enum BodyEnd {
    Complete,
    Broken,
}

fn read_body(
    r: &mut impl BufRead,
    framing: &Framing,
    limit: Option<u64>,
    sink: &mut dyn FnMut(&[u8]),
) -> BodyEnd {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    let mut take = |r: &mut dyn BufRead, n: u64, total: &mut u64| -> bool {
        let mut left = n;
        while left > 0 {
            let want = (left as usize).min(buf.len());
            let want = match limit {
                Some(l) if *total >= l => return false,
                Some(l) => want.min((l - *total) as usize),
                None => want,
            };
            match r.read(&mut buf[..want]) {
                Ok(0) | Err(_) => return false,
                Ok(k) => {
                    sink(&buf[..k]);
                    left -= k as u64;
                    *total += k as u64;
                }
            }
        }
        true
    };
    match framing {
        Framing::None => BodyEnd::Complete,
        Framing::Length(n) => {
            if take(r, *n, &mut total) {
                BodyEnd::Complete
            } else {
                BodyEnd::Broken
            }
        }
        Framing::Chunked => loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return BodyEnd::Broken,
                Ok(_) => {}
            }
            let size = line.trim_end().split(';').next().unwrap_or("");
            let Ok(n) = u64::from_str_radix(size, 16) else {
                return BodyEnd::Broken;
            };
            if n == 0 {
                // Trailers, then the empty line.
                loop {
                    let mut t = String::new();
                    match r.read_line(&mut t) {
                        Ok(0) | Err(_) => return BodyEnd::Broken,
                        Ok(_) if t == "\r\n" => return BodyEnd::Complete,
                        Ok(_) => {}
                    }
                }
            }
            if !take(r, n, &mut total) {
                return BodyEnd::Broken;
            }
            let mut crlf = [0u8; 2];
            if r.read_exact(&mut crlf).is_err() || &crlf != b"\r\n" {
                return BodyEnd::Broken;
            }
        },
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// One IPv4 TCP socket a process holds, from `/proc/PID/net/tcp`.
#[derive(Debug)]
pub struct TcpSocket {
    pub local_port: u16,
    pub remote_port: u16,
    /// The kernel's state number in hex, as the table has it: `0A` is LISTEN.
    pub state: String,
}

/// The IPv4 TCP sockets process `pid` holds: the namespace's table, kept to the inodes among
/// the process's descriptors.
pub fn tcp_sockets_of(pid: u32) -> Vec<TcpSocket> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|t| {
                    let t = t.display().to_string();
                    Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap_or("0"), 16).unwrap_or(0);
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            inodes
                .iter()
                .any(|i| Some(&i.as_str()) == c.get(9))
                .then(|| TcpSocket {
                    local_port: port(c[1]),
                    remote_port: port(c[2]),
                    state: c[3].to_string(),
                })
        })
        .collect()
}

/// Whether process `pid` holds the listening socket of `addr` (an IPv4 `ip:port`).
pub fn listens_on(pid: u32, addr: &str) -> bool {
    let Some(port) = addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()) else {
        return false;
    };
    tcp_sockets_of(pid)
        .iter()
        .any(|s| s.local_port == port && s.state == "0A")
}

/// The real unpart binary, on ephemeral ports, with its own temp dir.
pub struct Unpart {
    pub addr: String,
    pub admin: String,
    pub child: Child,
    pub dir: PathBuf,
    pub log: PathBuf,
}

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Unpart {
    /// Starts unpart in front of `upstream` with `yaml` appended to the generated config;
    /// `{dir}` in `yaml` stands for unpart's own temp dir (removed on drop).
    pub fn start(upstream: &str, yaml: &str) -> Unpart {
        Unpart::start_full(upstream, "", yaml, None, &[])
    }

    /// Like `start`, with a shell command run first in the process that then execs unpart
    /// (for example `ulimit -f 64`), so `child` is still unpart itself.
    pub fn start_wrapped(upstream: &str, yaml: &str, shell_prefix: Option<&str>) -> Unpart {
        Unpart::start_full(upstream, "", yaml, shell_prefix, &[])
    }

    /// As `start`, with `admin` (e.g. `"token: x, profile_min_interval: 0"`) added to the
    /// `admin:` map next to the generated listen address.
    pub fn start_with_admin(upstream: &str, admin: &str, yaml: &str) -> Unpart {
        Unpart::start_full(upstream, admin, yaml, None, &[])
    }

    /// As `start_with_admin`, with extra environment variables for unpart's process.
    pub fn start_with_env(upstream: &str, admin: &str, yaml: &str, env: &[(&str, &str)]) -> Unpart {
        Unpart::start_full(upstream, admin, yaml, None, env)
    }

    fn start_full(
        upstream: &str,
        admin: &str,
        yaml: &str,
        shell_prefix: Option<&str>,
        env: &[(&str, &str)],
    ) -> Unpart {
        for _ in 0..5 {
            if let Some(u) = Unpart::try_start(upstream, admin, yaml, shell_prefix, env) {
                return u;
            }
        }
        panic!("unpart did not start");
    }

    fn try_start(
        upstream: &str,
        admin_extra: &str,
        yaml: &str,
        shell_prefix: Option<&str>,
        env: &[(&str, &str)],
    ) -> Option<Unpart> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("unpart-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let addr = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let conf = dir.join("unpart.yaml");
        let admin_conf = if admin_extra.is_empty() {
            admin.clone()
        } else {
            format!("{{listen: {admin}, {admin_extra}}}")
        };
        std::fs::write(
            &conf,
            format!(
                "listen: {addr}\nadmin: {admin_conf}\nupstream: {upstream}\nthreads: 2\npid_file: {d}/unpart.pid\nupgrade_sock: {d}/upgrade.sock\n{yaml}",
                d = dir.display(),
                yaml = yaml.replace("{dir}", &dir.display().to_string()),
            ),
        )
        .expect("write conf");
        let log = dir.join("unpart.log");
        let mut cmd = match shell_prefix {
            None => Command::new(env!("CARGO_BIN_EXE_unpart")),
            Some(prefix) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("{prefix} && exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_unpart"));
                c
            }
        };
        let child = cmd
            .arg("-c")
            .arg(&conf)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn unpart");
        let mut u = Unpart {
            addr,
            admin,
            child,
            dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = u.child.try_wait() {
                return None; // most likely a port race: try again
            }
            let healthy = raw_request(&u.admin, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
                .is_ok_and(|r| r.status == 200);
            // The ports were free when chosen, not when unpart bound them: a concurrent test's
            // listener could answer for it (and pingora retries a failed bind for 30 s).
            if healthy
                && TcpStream::connect(&u.addr).is_ok()
                && listens_on(u.child.id(), &u.addr)
                && listens_on(u.child.id(), &u.admin)
            {
                return Some(u);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = u.child.kill();
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// VmRSS / VmHWM of the unpart process in KiB.
    pub fn status_kib(&self, key: &str) -> u64 {
        proc_status(self.child.id(), key)
    }
}

impl Drop for Unpart {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A field of `/proc/PID/status` (`VmRSS:` in KiB, `Threads:` a count); 0 when unreadable.
pub fn proc_status(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A response as a raw client saw it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Reads one response (Content-Length, chunked, or to EOF).
pub fn read_response(s: &mut BufReader<TcpStream>) -> std::io::Result<Response> {
    let (status_line, _, headers) = read_head(s)
        .map(|(a, b, h)| (b, a, h))
        .ok_or_else(|| std::io::Error::other("no response head"))?;
    let status: u16 = status_line
        .parse()
        .map_err(|_| std::io::Error::other("bad status"))?;
    let resp_headers = headers;
    let get = |n: &str| find_header(&resp_headers, n).map(str::to_string);
    let framing = if get("transfer-encoding").is_some() {
        Framing::Chunked
    } else if let Some(n) = get("content-length") {
        Framing::Length(n.parse().unwrap_or(0))
    } else if status == 100 || status == 204 || status == 304 {
        Framing::Length(0)
    } else {
        Framing::None
    };
    let mut body = Vec::new();
    if framing == Framing::None {
        s.read_to_end(&mut body)?;
    } else {
        read_body(s, &framing, None, &mut |d: &[u8]| body.extend_from_slice(d));
    }
    Ok(Response {
        status,
        headers: resp_headers,
        body,
    })
}

/// Sends raw bytes on a new connection and reads one final response (skipping 1xx).
pub fn raw_request(addr: &str, bytes: &[u8]) -> std::io::Result<Response> {
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let mut w = s.try_clone()?;
    // Write from a thread so a server that answers early cannot deadlock us.
    let data = bytes.to_vec();
    let writer = thread::spawn(move || {
        let _ = w.write_all(&data);
    });
    let mut r = BufReader::new(s);
    let resp = loop {
        let resp = read_response(&mut r)?;
        if resp.status >= 200 {
            break resp;
        }
    };
    let _ = writer.join();
    Ok(resp)
}

/// `head` (request line + headers, without the blank line) with `body` as chunked, cut into
/// chunks of `chunk` bytes.
pub fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / chunk.max(1) * 8 + 8);
    for c in body.chunks(chunk.max(1)) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// One part of a hand-built form: `(name, filename, content_type, data)`.
pub type FormPart<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);

/// A multipart body built by hand.
pub fn form(boundary: &str, parts: &[FormPart]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, filename, ct, data) in parts {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let mut cd = format!("Content-Disposition: form-data; name=\"{name}\"");
        if let Some(f) = filename {
            cd.push_str(&format!("; filename=\"{f}\""));
        }
        out.extend_from_slice(cd.as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(ct) = ct {
            out.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

/// A POST with Content-Length framing.
pub fn post(path: &str, content_type: &str, body: &[u8], extra: &str) -> Vec<u8> {
    let mut out = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A POST with chunked framing.
pub fn post_chunked(path: &str, content_type: &str, body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    out.extend_from_slice(&chunked(body, chunk));
    out
}

pub fn mp(boundary: &str) -> String {
    format!("multipart/form-data; boundary={boundary}")
}

/// Makes closing `sock` send a reset instead of a FIN (SO_LINGER with a zero timeout); the
/// caller then drops every handle of it.
pub fn reset(sock: &impl std::os::fd::AsRawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid descriptor and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
