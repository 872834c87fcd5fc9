//! Shutting down without cutting uploads.
//!
//! On SIGTERM (and after handing its sockets to a new process on SIGQUIT) pingora closes the
//! listeners and then sleeps `grace_period_seconds` before it stops the runtimes, cutting
//! whatever is still running: a fixed wait when idle, a cut upload when busy. unpart counts its
//! in-flight requests and exits as soon as the count reaches zero, so `grace_period_seconds`
//! becomes a deadline for the drain rather than a fixed wait.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Held for the life of one request (its context), whatever path the request takes.
#[derive(Debug)]
pub struct InFlight(());

impl InFlight {
    pub fn start() -> InFlight {
        IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Requests being served right now.
pub fn in_flight() -> usize {
    IN_FLIGHT.load(Ordering::Relaxed)
}

/// Waits for shutdown, then for the last in-flight request, then exits the process.
pub struct Drain;

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        let n = in_flight();
        log::info!("shutting down: not accepting; draining {n} in-flight request(s)");
        loop {
            if in_flight() == 0 {
                log::info!("drained: exiting");
                std::process::exit(0);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
