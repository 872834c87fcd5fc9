//! The admin listener (never the proxy port): health, Prometheus metrics and Go-style
//! `/debug/pprof/*` profiles that the stock `go tool pprof` reads.
//!
//! Safety: it binds loopback by default; with `admin.token` set every endpoint but the health
//! checks wants `Authorization: Bearer <token>`. Profiles are one at a time per kind, capped
//! in length (`profile_max_seconds`) and spaced (`profile_min_interval`), so the listener
//! cannot be used to burn CPU or memory.

pub mod cpu;
pub mod heap;
pub mod pprof_index;
pub mod tasks;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use tokio::sync::Mutex;

use crate::config::{Settings, UpstreamAddr};

pub struct Admin {
    settings: Arc<Settings>,
    /// When the last CPU profile ended; held for the whole profile (one at a time).
    cpu: Mutex<Option<Instant>>,
    heap: Mutex<Option<Instant>>,
    /// Task dumps pause the runtimes and symbol lookups load the debug info: both take turns
    /// like profiles, so parallel requests cannot stall the proxy or pile up memory.
    dump: Mutex<Option<Instant>>,
    symbols: Mutex<Option<Instant>>,
}

impl Admin {
    pub fn new(settings: Arc<Settings>) -> Admin {
        Admin {
            settings,
            cpu: Mutex::new(None),
            heap: Mutex::new(None),
            dump: Mutex::new(None),
            symbols: Mutex::new(None),
        }
    }
}

type Resp = Response<Vec<u8>>;

fn respond(status: u16, content_type: &str, body: Vec<u8>) -> Resp {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .unwrap_or_default()
}

fn text(status: u16, body: &str) -> Resp {
    respond(
        status,
        "text/plain; charset=utf-8",
        body.as_bytes().to_vec(),
    )
}

/// A refusal: the status and one line saying why.
fn refuse(status: u16, why: &str) -> Resp {
    text(status, &format!("{why}\n"))
}

fn attachment(content_type: &str, name: &str, body: Vec<u8>) -> Resp {
    let mut r = respond(200, content_type, body);
    if let Ok(v) = http::HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        r.headers_mut().insert(http::header::CONTENT_DISPOSITION, v);
    }
    r
}

/// The value of `key` in a query string (no percent-decoding: every value here is a number).
fn query<'a>(q: Option<&'a str>, key: &str) -> Option<&'a str> {
    q?.split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

const NOT_AVAILABLE: &[(&str, &str)] = &[
    (
        "allocs",
        "allocs is not available: jemalloc samples live allocations only; use heap",
    ),
    (
        "block",
        "block is not available: Rust has no runtime that records blocking events",
    ),
    (
        "mutex",
        "mutex is not available: Rust has no runtime that records lock contention",
    ),
    (
        "trace",
        "trace is not available: there is no execution tracer for tokio here",
    ),
    (
        "threadcreate",
        "threadcreate is not available: thread creation is not recorded",
    ),
];

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Resp {
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_string();
        let q = req.uri.query().map(str::to_string);
        let q = q.as_deref();
        let is_get = method == http::Method::GET || method == http::Method::HEAD;

        match path.as_str() {
            "/healthz" if is_get => return text(200, "ok\n"),
            "/readyz" if is_get => return self.readyz().await,
            "/healthz" | "/readyz" => return refuse(405, "method not allowed"),
            _ => {}
        }
        if let Some(token) = &self.settings.admin.token {
            let given = req
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if !given.is_some_and(|g| same(g.trim().as_bytes(), token.as_bytes())) {
                let mut r = refuse(
                    401,
                    "unauthorized: send Authorization: Bearer <admin.token>",
                );
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer"),
                );
                return r;
            }
        }
        let is_symbol = path == "/debug/pprof/symbol";
        if !(is_get || is_symbol && method == http::Method::POST) {
            return refuse(405, "method not allowed");
        }
        match path.as_str() {
            "/metrics" => respond(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::metrics::render(),
            ),
            "/debug/pprof" | "/debug/pprof/" => {
                respond(200, "text/html; charset=utf-8", pprof_index::html())
            }
            "/debug/pprof/profile" => self.cpu_profile(q, false).await,
            "/debug/pprof/flamegraph" => self.cpu_profile(q, true).await,
            "/debug/pprof/heap" => self.heap_profile().await,
            "/debug/pprof/goroutine" => {
                let mut turn = match self.turn(&self.dump, "goroutine") {
                    Ok(g) => g,
                    Err(r) => return *r,
                };
                let a = &self.settings.admin;
                let body = tasks::dump(a.task_dump, a.dump_timeout.0).await;
                *turn = Some(Instant::now());
                respond(200, "text/plain; charset=utf-8", body.into_bytes())
            }
            "/debug/pprof/cmdline" => {
                // As Go: the arguments separated by NUL bytes.
                let args: Vec<String> = std::env::args().collect();
                text(200, &args.join("\0"))
            }
            "/debug/pprof/symbol" => {
                let post = method == http::Method::POST;
                let addrs = match symbol_input(session, q, post).await {
                    Ok(a) => a,
                    Err(r) => return *r,
                };
                if addrs.is_empty() {
                    // Go answers the bare request with the count line only.
                    return text(200, "num_symbols: 1\n");
                }
                let mut turn = match self.turn(&self.symbols, "symbol") {
                    Ok(g) => g,
                    Err(r) => return *r,
                };
                let r = symbolize_addrs(addrs).await;
                *turn = Some(Instant::now());
                r
            }
            p => match NOT_AVAILABLE
                .iter()
                .find(|(name, _)| p.strip_prefix("/debug/pprof/") == Some(name))
            {
                Some((_, why)) => refuse(501, why),
                None => refuse(404, "not found"),
            },
        }
    }
}

impl Admin {
    /// Ready when the proxy port accepts connections and the backend does too.
    async fn readyz(&self) -> Resp {
        let t = self
            .settings
            .timeouts
            .upstream_connect
            .0
            .min(Duration::from_secs(2));
        let mut listen = self.settings.listen.clone();
        if let Ok(mut a) = listen.parse::<std::net::SocketAddr>() {
            if a.ip().is_unspecified() {
                a.set_ip(match a {
                    std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            listen = a.to_string();
        }
        if let Err(e) = connect_tcp(&listen, t).await {
            return refuse(503, &format!("not ready: the proxy listener {listen}: {e}"));
        }
        let up = match &self.settings.upstream {
            UpstreamAddr::Tcp(a) => connect_tcp(a, t).await,
            UpstreamAddr::Unix(p) => {
                match tokio::time::timeout(t, tokio::net::UnixStream::connect(p)).await {
                    Ok(r) => r.map(|_| ()).map_err(|e| e.to_string()),
                    Err(_) => Err("timed out".into()),
                }
            }
        };
        match up {
            Ok(()) => text(200, "ready\n"),
            Err(e) => refuse(
                503,
                &format!(
                    "not ready: upstream {} unreachable: {e}",
                    self.settings.upstream
                ),
            ),
        }
    }

    /// Waits for the kind's turn: one at a time and spaced by `profile_min_interval`.
    fn turn<'a>(
        &self,
        lock: &'a Mutex<Option<Instant>>,
        kind: &str,
    ) -> Result<tokio::sync::MutexGuard<'a, Option<Instant>>, Box<Resp>> {
        let Ok(guard) = lock.try_lock() else {
            crate::metrics::profile(kind, "busy");
            return Err(Box::new(refuse(
                409,
                &format!("a {kind} profile is already being taken; try again when it ends"),
            )));
        };
        let gap = Duration::from_secs(self.settings.admin.profile_min_interval);
        if let Some(wait) = guard.and_then(|last| gap.checked_sub(last.elapsed())) {
            crate::metrics::profile(kind, "too_soon");
            let secs = wait.as_secs() + 1;
            let mut r = refuse(
                429,
                &format!("the last {kind} profile ended less than admin.profile_min_interval ago; retry in {secs} s"),
            );
            if let Ok(v) = http::HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(http::header::RETRY_AFTER, v);
            }
            return Err(Box::new(r));
        }
        Ok(guard)
    }

    async fn cpu_profile(&self, q: Option<&str>, flamegraph: bool) -> Resp {
        let max = self.settings.admin.profile_max_seconds;
        let seconds = match query(q, "seconds") {
            None | Some("") => 30.min(max),
            Some(s) => match s.parse::<u64>() {
                Ok(n) if (1..=max).contains(&n) => n,
                Ok(n) if n > max => {
                    return refuse(
                        400,
                        &format!("seconds={n} is over admin.profile_max_seconds = {max}"),
                    )
                }
                _ => {
                    return refuse(
                        400,
                        &format!("seconds=`{s}` is not a whole number of seconds from 1 to {max}"),
                    )
                }
            },
        };
        let mut guard = match self.turn(&self.cpu, "cpu") {
            Ok(g) => g,
            Err(r) => return *r,
        };
        let kind = if flamegraph { "flamegraph" } else { "cpu" };
        let result = take_cpu_profile(seconds, flamegraph).await;
        *guard = Some(Instant::now());
        drop(guard);
        heap::purge();
        match result {
            Ok(body) if flamegraph => {
                crate::metrics::profile(kind, "ok");
                respond(200, "image/svg+xml", body)
            }
            Ok(body) => {
                crate::metrics::profile(kind, "ok");
                attachment("application/octet-stream", "profile.pb.gz", body)
            }
            Err(e) => {
                crate::metrics::profile(kind, "error");
                refuse(500, &format!("CPU profile failed: {e}"))
            }
        }
    }

    async fn heap_profile(&self) -> Resp {
        let mut guard = match self.turn(&self.heap, "heap") {
            Ok(g) => g,
            Err(r) => return *r,
        };
        let result = off_thread(heap::profile).await;
        *guard = Some(Instant::now());
        drop(guard);
        heap::purge();
        match result {
            Ok(body) => {
                crate::metrics::profile("heap", "ok");
                attachment("application/octet-stream", "heap.pb.gz", body)
            }
            Err(e) => {
                crate::metrics::profile("heap", "error");
                refuse(501, &e)
            }
        }
    }
}

async fn connect_tcp(addr: &str, t: Duration) -> Result<(), String> {
    match tokio::time::timeout(t, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no connection within {t:?}")),
    }
}

/// Runs `f` on a short-lived thread: symbolization is seconds of CPU that must not stall the
/// runtime, and everything the thread allocated (its jemalloc thread cache included) goes
/// back when it exits.
async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("unpart-profile".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    rx.await
        .map_err(|_| "the profiling thread failed".to_string())?
}

const EMPTY_SVG: &str = "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg \
    xmlns=\"http://www.w3.org/2000/svg\" width=\"600\" height=\"60\"><text x=\"10\" y=\"35\">No \
    samples: unpart used no CPU during the profile.</text></svg>\n";

async fn take_cpu_profile(seconds: u64, flamegraph: bool) -> Result<Vec<u8>, String> {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return Err("CPU profiles need Linux on x86_64".into());
    }
    let running = cpu::start(seconds)?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let collected = running.stop();
    log::info!(
        "CPU profile: {} samples in {seconds} s ({} lost)",
        collected.samples,
        collected.lost
    );
    off_thread(move || {
        let report = cpu::symbolize(collected);
        if flamegraph && report.data.is_empty() {
            // inferno refuses an empty graph; an idle process has no samples to draw.
            return Ok(EMPTY_SVG.as_bytes().to_vec());
        }
        if flamegraph {
            let mut svg = Vec::new();
            report
                .flamegraph(&mut svg)
                .map_err(|e| format!("flame graph: {e}"))?;
            Ok(svg)
        } else {
            use pprof::protos::Message as _;
            let p = report.pprof().map_err(|e| format!("pprof: {e}"))?;
            heap::gzip(&p.encode_to_vec())
        }
    })
    .await
}

/// Go's symbol endpoint takes addresses separated by `+`, in the query for GET and in the
/// body for POST.
async fn symbol_input(
    session: &mut ServerSession,
    q: Option<&str>,
    post: bool,
) -> Result<Vec<u64>, Box<Resp>> {
    const MAX_BODY: usize = 64 * 1024;
    let refused = |status, why: &str| Box::new(refuse(status, why));
    let input = if post {
        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(b)) => {
                    if body.len() + b.len() > MAX_BODY {
                        return Err(refused(
                            413,
                            "symbol lookups take at most 64 KiB of addresses",
                        ));
                    }
                    body.extend_from_slice(&b);
                }
                Ok(None) => break,
                Err(e) => return Err(refused(400, &format!("reading the body: {e}"))),
            }
        }
        String::from_utf8_lossy(&body).into_owned()
    } else {
        q.unwrap_or("").to_string()
    };
    let mut addrs = Vec::new();
    for word in input
        .split(['+', ' ', '\n', '\r', '\t'])
        .filter(|w| !w.is_empty())
    {
        let hex = word.trim_start_matches("0x").trim_start_matches("0X");
        match u64::from_str_radix(hex, 16) {
            Ok(a) => addrs.push(a),
            Err(_) => {
                return Err(refused(
                    400,
                    &format!("`{word}` is not a hexadecimal address"),
                ))
            }
        }
        if addrs.len() > 4096 {
            return Err(refused(413, "symbol lookups take at most 4096 addresses"));
        }
    }
    Ok(addrs)
}

/// One line per address that names a function: `0xADDR name`, as Go answers.
async fn symbolize_addrs(addrs: Vec<u64>) -> Resp {
    let names = off_thread(move || {
        let mut out = String::new();
        for a in addrs {
            // The last symbol is the function the address is in; the others were inlined.
            if let Some(s) = cpu::resolve(a).last().filter(|s| s.addr.is_some()) {
                out.push_str(&format!("{a:#x} {}\n", s.name()));
            }
        }
        backtrace::clear_symbol_cache();
        Ok(out)
    })
    .await;
    heap::purge();
    match names {
        Ok(out) => text(200, &out),
        Err(e) => refuse(500, &e),
    }
}
