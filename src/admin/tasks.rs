//! `/debug/pprof/goroutine`: Go's goroutine dump, the tokio way. Lists the requests in flight
//! (always available) and, when built with `--cfg tokio_unstable` on Linux x86_64/aarch64,
//! a dump of every task with its async backtrace, per runtime.
//!
//! pingora runs each service on runtimes of its own, so the proxy's runtimes are recorded by
//! the proxy itself, once per worker thread, on its first request (`note_runtime`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Entry {
    method: String,
    target: String,
    start: Instant,
}

static IN_FLIGHT: Mutex<BTreeMap<u64, Entry>> = Mutex::new(BTreeMap::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A request in flight; it leaves the list when dropped.
pub struct Request(u64);

impl Request {
    pub fn start(method: &str, target: &str) -> Request {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        // Bounded: a dump must not echo megabytes of a client's URL.
        let target: String = target.chars().take(256).collect();
        if let Ok(mut m) = IN_FLIGHT.lock() {
            m.insert(
                id,
                Entry {
                    method: method.to_string(),
                    target,
                    start: Instant::now(),
                },
            );
        }
        Request(id)
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if let Ok(mut m) = IN_FLIGHT.lock() {
            m.remove(&self.0);
        }
    }
}

fn in_flight(out: &mut String) {
    let m = match IN_FLIGHT.lock() {
        Ok(m) => m,
        Err(p) => p.into_inner(),
    };
    let _ = writeln!(out, "requests in flight: {}", m.len());
    for (id, e) in m.iter().take(10_000) {
        let _ = writeln!(
            out,
            "request {id} [{:.3}s]: {} {}",
            e.start.elapsed().as_secs_f64(),
            e.method,
            e.target
        );
    }
}

#[cfg(all(
    tokio_unstable,
    feature = "taskdump",
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod dump {
    use std::fmt::Write as _;
    use std::sync::Mutex;
    use std::time::Duration;

    use tokio::runtime::{Handle, Id};

    static RUNTIMES: Mutex<Vec<(Id, &'static str, Handle)>> = Mutex::new(Vec::new());

    thread_local! {
        static NOTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    pub fn note_runtime(what: &'static str) {
        if NOTED.with(|n| n.replace(true)) {
            return;
        }
        let Ok(h) = Handle::try_current() else { return };
        if let Ok(mut rts) = RUNTIMES.lock() {
            if !rts.iter().any(|(id, _, _)| *id == h.id()) {
                rts.push((h.id(), what, h));
            }
        }
    }

    pub async fn tasks(out: &mut String, timeout: Duration) {
        note_runtime("admin");
        let rts: Vec<_> = match RUNTIMES.lock() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        };
        if !rts.iter().any(|(_, w, _)| *w == "proxy") {
            let _ = writeln!(out, "\nthe proxy's runtime has served no request yet");
        }
        for (id, what, h) in rts {
            // The dump runs on its own runtime; a worker blocked for long would hang it.
            let job = h.spawn({
                let h = h.clone();
                async move { h.dump().await }
            });
            match tokio::time::timeout(timeout, job).await {
                Ok(Ok(dump)) => {
                    let tasks = dump.tasks();
                    let _ = writeln!(
                        out,
                        "\n{what} runtime {id}: {} task(s)",
                        tasks.iter().count()
                    );
                    for (i, t) in tasks.iter().enumerate() {
                        let _ = writeln!(out, "\ntask {i} (id {}):\n{}", t.id(), t.trace());
                    }
                }
                Ok(Err(e)) => {
                    let _ = writeln!(out, "\n{what} runtime {id}: task dump failed: {e}");
                }
                Err(_) => {
                    let _ = writeln!(
                        out,
                        "\n{what} runtime {id}: task dump timed out after {timeout:?}"
                    );
                }
            }
        }
    }
}

#[cfg(not(all(
    tokio_unstable,
    feature = "taskdump",
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
mod dump {
    use std::fmt::Write as _;
    use std::time::Duration;

    pub fn note_runtime(_what: &'static str) {}

    pub async fn tasks(out: &mut String, _timeout: Duration) {
        let _ = writeln!(
            out,
            "\ntokio task dumps are not available in this build (they need --cfg tokio_unstable \
             on Linux x86_64/aarch64)"
        );
    }
}

pub use dump::note_runtime;

/// The text dump: requests in flight, then the tasks of every runtime known.
pub async fn dump(timeout: Duration) -> String {
    let mut out = String::new();
    in_flight(&mut out);
    dump::tasks(&mut out, timeout).await;
    out
}
