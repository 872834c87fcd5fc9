//! `/debug/pprof/goroutine`: Go's goroutine dump, the tokio way. Lists the requests in flight
//! and the number of live tasks per runtime (always), and, only when `admin.task_dump` is on
//! and the build has `--cfg tokio_unstable` on Linux x86_64/aarch64, every task with its async
//! backtrace.
//!
//! Full task dumps are off by default because tokio 1.54's can wedge a worker thread for good:
//! a worker that reaches the dump's barrier late (250 ms, easy on a loaded 2-core machine)
//! leaves its arrival counted, the next dump's leader then waits for it for ever, and that
//! worker's connections stop (tokio-rs/tokio#8370, #7478; seen in tests/faults.rs). Counting
//! live tasks reads a counter and is always safe.
//!
//! pingora runs each service on runtimes of its own, so the proxy's runtimes are recorded by
//! the proxy itself, once per worker thread, on its first request (`note_runtime`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::runtime::{Handle, Id};

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

static RUNTIMES: Mutex<Vec<(Id, &'static str, Handle)>> = Mutex::new(Vec::new());

thread_local! {
    static NOTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Records the runtime this thread works for, once per thread.
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

fn runtimes() -> Vec<(Id, &'static str, Handle)> {
    match RUNTIMES.lock() {
        Ok(r) => r.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

/// Live tasks of each runtime known, as `(name, id, count)`.
pub fn alive_tasks() -> Vec<(&'static str, Id, usize)> {
    runtimes()
        .into_iter()
        .map(|(id, what, h)| (what, id, h.metrics().num_alive_tasks()))
        .collect()
}

#[cfg(all(
    tokio_unstable,
    feature = "taskdump",
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
async fn trace(out: &mut String, what: &str, id: Id, h: Handle, timeout: Duration) {
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
                "\n{what} runtime {id}: {} task(s) traced",
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

#[cfg(not(all(
    tokio_unstable,
    feature = "taskdump",
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
async fn trace(out: &mut String, what: &str, id: Id, _h: Handle, _timeout: Duration) {
    let _ = writeln!(
        out,
        "\n{what} runtime {id}: task traces are not available in this build (they need \
         --cfg tokio_unstable on Linux x86_64/aarch64)"
    );
}

/// The text dump: requests in flight, live tasks per runtime, then, when `full`, every task's
/// trace.
pub async fn dump(full: bool, timeout: Duration) -> String {
    note_runtime("admin");
    let mut out = String::new();
    in_flight(&mut out);
    let rts = runtimes();
    if !rts.iter().any(|(_, w, _)| *w == "proxy") {
        let _ = writeln!(out, "the proxy's runtime has served no request yet");
    }
    for (id, what, h) in &rts {
        let n = h.metrics().num_alive_tasks();
        let _ = writeln!(out, "{what} runtime {id}: {n} live task(s)");
    }
    if !full {
        let _ = writeln!(
            out,
            "\ntask traces are off (admin.task_dump: false): tokio's task dumps can stall a \
             worker thread"
        );
        return out;
    }
    for (id, what, h) in rts {
        trace(&mut out, what, id, h, timeout).await;
    }
    out
}
