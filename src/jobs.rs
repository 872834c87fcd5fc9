//! A fixed set of threads for blocking file work (spool writes, reads and file creation).
//!
//! tokio's blocking pool starts a thread whenever no idle one is ready (up to 512), and each
//! idles 10 s before it exits. Spool work comes as a stream of blocks (up to 256 KiB) from
//! every upload at once, so with 64 spooled uploads unpart kept 235 threads alive and its RSS
//! peaked at 95 MiB; capping the jobs in flight with a semaphore was not enough, because a
//! finished thread is not counted idle until after its job's waiter has already handed the slot
//! on. The work is copies and hashing on a machine with few cores, with the page cache taking
//! the writes: [`THREADS`] threads keep up. They start on the first job, so a process that
//! never spools has none.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use tokio::sync::oneshot;

/// Threads doing file work. Jobs beyond that wait in order. More than the cores: a thread
/// writing into the page cache is put to sleep once too much of it is dirty, and the others
/// should go on hashing meanwhile.
pub const THREADS: usize = 8;

type Task = Box<dyn FnOnce() + Send>;

static QUEUE: OnceLock<Mutex<mpsc::Sender<Task>>> = OnceLock::new();

fn queue() -> &'static Mutex<mpsc::Sender<Task>> {
    QUEUE.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Task>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        let arena = shared_arena();
        for i in 0..THREADS {
            let rx = std::sync::Arc::clone(&rx);
            let spawned = std::thread::Builder::new()
                .name(format!("unpart file {i}"))
                .spawn(move || {
                    if let Some(a) = arena {
                        join_arena(a);
                    }
                    loop {
                        // The lock is held only to take the next task, not to run it.
                        let next = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(poisoned) => poisoned.into_inner().recv(),
                        };
                        let Ok(task) = next else { return };
                        // A panicking job loses its own answer (its waiter gets an error),
                        // not the thread.
                        let _ = catch_unwind(AssertUnwindSafe(task));
                    }
                });
            if let Err(e) = spawned {
                log::error!("cannot start file thread {i}: {e}");
            }
        }
        Mutex::new(tx)
    })
}

/// A jemalloc arena of their own for the file threads. Memory freed by one thread goes back to
/// the arena that allocated it, and freed pages stay resident until that arena reuses or
/// decays them: when the file threads allocated the blocks read back (now the workers do,
/// `spool.rs`) and each was on a different arena, 64 spooled uploads peaked at 118-137 MiB of
/// RSS. They now allocate only short-lived temporaries (a spool file's name, error strings);
/// the shared arena stays as a guard, so that whatever they allocate later does not spread over
/// eight arenas. `None` when jemalloc refuses (the threads then keep the arenas jemalloc gives
/// them).
fn shared_arena() -> Option<u32> {
    // SAFETY: "arenas.create" takes no input and returns the new arena's index as an unsigned.
    match unsafe { tikv_jemalloc_ctl::raw::read::<u32>(b"arenas.create\0") } {
        Ok(a) => Some(a),
        Err(e) => {
            log::warn!("file threads: cannot create a jemalloc arena: {e}");
            None
        }
    }
}

fn join_arena(arena: u32) {
    // SAFETY: "thread.arena" takes an unsigned arena index, which "arenas.create" returned.
    if let Err(e) = unsafe { tikv_jemalloc_ctl::raw::write(b"thread.arena\0", arena) } {
        log::warn!("file thread: cannot move to jemalloc arena {arena}: {e}");
    }
}

/// A job's answer, once it has run.
pub struct Pending<T>(oneshot::Receiver<io::Result<T>>);

impl<T> Pending<T> {
    pub async fn wait(self) -> io::Result<T> {
        self.0.await.unwrap_or_else(|_| {
            Err(io::Error::other(
                "file job lost: it panicked, or no file thread runs",
            ))
        })
    }
}

/// Queues `f` for the file threads. Dropping the [`Pending`] does not cancel it.
pub fn run<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> Pending<T> {
    let (tx, rx) = oneshot::channel();
    let task: Task = Box::new(move || {
        let _ = tx.send(f());
    });
    let sent = match queue().lock() {
        Ok(q) => q.send(task),
        Err(poisoned) => poisoned.into_inner().send(task),
    };
    // Fails only when no file thread started: the task comes back unrun and its sender is
    // dropped with it, so the waiter gets an error.
    drop(sent);
    Pending(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_and_answer() {
        let pending: Vec<_> = (0..32u64).map(|i| run(move || Ok(i * 2))).collect();
        for (i, p) in pending.into_iter().enumerate() {
            assert_eq!(p.wait().await.unwrap(), i as u64 * 2);
        }
    }

    #[tokio::test]
    async fn a_panicking_job_is_an_error_and_the_threads_go_on() {
        for _ in 0..THREADS + 1 {
            let e = run(|| -> io::Result<()> { panic!("boom") })
                .wait()
                .await
                .unwrap_err();
            assert!(e.to_string().contains("lost"), "{e}");
        }
        assert_eq!(run(|| Ok(7)).wait().await.unwrap(), 7);
    }

    #[tokio::test]
    async fn errors_reach_the_waiter() {
        let e = run(|| -> io::Result<()> { Err(io::Error::other("disk full")) })
            .wait()
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "disk full");
    }
}
