//! The CPU sampler behind `/debug/pprof/profile` and `/debug/pprof/flamegraph`.
//!
//! pprof-rs's own sampler keeps its sample table (4096 × 4 entries of 128-frame stacks, ~18 MB,
//! written at construction) and a copy of every module's unwind sections in statics for the
//! life of the process once a profile was taken. For a proxy whose point is a flat memory
//! graph that is not acceptable, so the sampling is done here with everything owned by one
//! `Running` value: SIGPROF from `setitimer(ITIMER_PROF)` at `HZ`, frames unwound with
//! framehop from the interrupted registers into a buffer sized for the requested duration,
//! and all of it dropped when the profile ends. pprof-rs still provides the report model and
//! its encoders (pprof protobuf, flame graph). Symbolization uses backtrace-rs, whose global
//! DWARF cache is cleared afterwards (see `symbolize`).
//!
//! x86_64 Linux only (register extraction from `ucontext_t`).

use std::collections::HashMap;
use std::ffi::c_void;
use std::ops::{Deref, Range};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::Unwinder as _;
use framehop::{ExplicitModuleSectionInfo, FrameAddress, Module, MustNotAllocateDuringUnwind};
use object::{Object as _, ObjectSection as _};

/// Go's default rate. 999 Hz delivered about 200 samples a second on the 2-core machine.
pub const HZ: u32 = 99;
/// Deepest stack kept; async stacks through pingora and tokio stay well under it.
const MAX_FRAMES: usize = 128;
/// Words per sample slot: depth, thread id, 16 bytes of thread name, then the frames.
const SLOT_WORDS: usize = 4 + MAX_FRAMES;
/// Caches for concurrent signal handlers (one per thread interrupted at the same moment).
const CACHES: usize = 8;

/// The sampler running now; the signal handler reads it. Null when none is.
static ACTIVE: AtomicPtr<Sampler> = AtomicPtr::new(std::ptr::null_mut());
/// Signal handlers currently inside `Sampler::sample`.
static IN_HANDLER: AtomicUsize = AtomicUsize::new(0);

/// Section bytes borrowed from a mapped object file (no copies on the heap).
#[derive(Clone)]
struct Mapped {
    map: Arc<memmap2::Mmap>,
    range: Range<usize>,
}

impl Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }
}

struct CacheSlot {
    busy: AtomicBool,
    cache: std::cell::UnsafeCell<CacheX86_64<MustNotAllocateDuringUnwind>>,
}

struct Sampler {
    unwinder: UnwinderX86_64<Mapped, MustNotAllocateDuringUnwind>,
    caches: Vec<CacheSlot>,
    /// `SLOT_WORDS` words per sample, written by handlers through `base`.
    words: Vec<u64>,
    base: *mut u64,
    ready: Vec<AtomicBool>,
    next: AtomicUsize,
    lost: AtomicUsize,
}

/// A profile being taken. Dropping it stops the timer and frees everything.
pub struct Running {
    sampler: *mut Sampler,
    started: Instant,
    wall: SystemTime,
}

// The raw pointer is only shared with signal handlers, which stop before it is freed.
unsafe impl Send for Running {}

/// Unsymbolized stacks and their counts.
pub struct Collected {
    stacks: HashMap<(Vec<u64>, String), isize>,
    pub samples: usize,
    pub lost: usize,
    wall: SystemTime,
    duration: Duration,
}

/// Starts sampling the whole process for about `seconds`. Errors are one line for the client.
pub fn start(seconds: u64) -> Result<Running, String> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Every core busy for the whole time, plus slack for timer jitter.
    let slots = (seconds as usize * HZ as usize * threads * 5 / 4).clamp(64, 64 * 1024);
    let mut unwinder = UnwinderX86_64::new();
    for m in modules() {
        unwinder.add_module(m);
    }
    let mut words = vec![0u64; slots * SLOT_WORDS];
    let base = words.as_mut_ptr();
    let sampler = Box::into_raw(Box::new(Sampler {
        unwinder,
        caches: (0..CACHES)
            .map(|_| CacheSlot {
                busy: AtomicBool::new(false),
                cache: std::cell::UnsafeCell::new(CacheX86_64::new_in()),
            })
            .collect(),
        words,
        base,
        ready: (0..slots).map(|_| AtomicBool::new(false)).collect(),
        next: AtomicUsize::new(0),
        lost: AtomicUsize::new(0),
    }));
    if ACTIVE
        .compare_exchange(
            std::ptr::null_mut(),
            sampler,
            Ordering::SeqCst,
            Ordering::SeqCst,
        )
        .is_err()
    {
        // SAFETY: never shared: the exchange failed.
        drop(unsafe { Box::from_raw(sampler) });
        return Err("a CPU profile is already running".into());
    }
    if let Err(e) = unsafe { arm(HZ) } {
        ACTIVE.store(std::ptr::null_mut(), Ordering::SeqCst);
        // SAFETY: no handler can have seen it: the signal was never installed.
        drop(unsafe { Box::from_raw(sampler) });
        return Err(format!("cannot start the profiling timer: {e}"));
    }
    Ok(Running {
        sampler,
        started: Instant::now(),
        wall: SystemTime::now(),
    })
}

impl Running {
    /// Stops sampling and returns the stacks, still as addresses.
    pub fn stop(mut self) -> Collected {
        let duration = self.started.elapsed();
        let sampler = self.halt();
        let n = sampler.next.load(Ordering::SeqCst).min(sampler.ready.len());
        let mut stacks: HashMap<(Vec<u64>, String), isize> = HashMap::new();
        let mut samples = 0;
        for i in 0..n {
            if !sampler.ready[i].load(Ordering::Acquire) {
                continue;
            }
            let slot = &sampler.words[i * SLOT_WORDS..(i + 1) * SLOT_WORDS];
            let depth = (slot[0] as usize).min(MAX_FRAMES);
            let mut name = [0u8; 16];
            name[..8].copy_from_slice(&slot[2].to_ne_bytes());
            name[8..].copy_from_slice(&slot[3].to_ne_bytes());
            let len = name.iter().position(|&c| c == 0).unwrap_or(16);
            let thread = String::from_utf8_lossy(&name[..len]).into_owned();
            *stacks
                .entry((slot[4..4 + depth].to_vec(), thread))
                .or_default() += 1;
            samples += 1;
        }
        let lost = sampler.lost.load(Ordering::SeqCst);
        Collected {
            stacks,
            samples,
            lost,
            wall: self.wall,
            duration,
        }
    }

    /// Disarms the timer, waits for handlers still running and takes the sampler back.
    fn halt(&mut self) -> Box<Sampler> {
        unsafe { disarm() };
        ACTIVE.store(std::ptr::null_mut(), Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(1);
        while IN_HANDLER.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let p = std::mem::replace(&mut self.sampler, std::ptr::null_mut());
        // SAFETY: created by Box::into_raw in `start`; no handler holds it any more.
        unsafe { Box::from_raw(p) }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.sampler.is_null() {
            drop(self.halt());
        }
    }
}

/// Resolves the addresses to names (inlined frames included) into pprof-rs's report model.
/// backtrace-rs caches the parsed debug info of every object it touched in a global for
/// good (tens of MB with line tables); it is cleared here, after the last lookup.
pub fn symbolize(c: Collected) -> pprof::Report {
    let mut names: HashMap<u64, Vec<pprof::Symbol>> = HashMap::new();
    let mut data = HashMap::new();
    for ((addrs, thread), count) in c.stacks {
        let mut frames = Vec::with_capacity(addrs.len());
        for a in addrs {
            let syms = names.entry(a).or_insert_with(|| resolve(a)).clone();
            frames.push(syms);
        }
        let key = pprof::Frames {
            frames,
            thread_name: thread,
            thread_id: 0,
            sample_timestamp: c.wall,
        };
        *data.entry(key).or_insert(0) += count;
    }
    backtrace::clear_symbol_cache();
    let mut report = pprof::Report {
        data,
        timing: Default::default(),
    };
    report.timing.frequency = HZ as i32;
    report.timing.start_time = c.wall;
    report.timing.duration = c.duration;
    report
}

/// One address's symbols, innermost inlined frame first; a bare address when unknown.
pub fn resolve(addr: u64) -> Vec<pprof::Symbol> {
    let mut out = Vec::new();
    backtrace::resolve(addr as *mut c_void, |s| {
        out.push(pprof::Symbol {
            name: s.name().map(|n| n.as_bytes().to_vec()),
            addr: s.addr(),
            lineno: s.lineno(),
            filename: s.filename().map(PathBuf::from),
        });
    });
    if out.is_empty() {
        out.push(pprof::Symbol {
            name: Some(format!("{addr:#x}").into_bytes()),
            addr: None,
            lineno: None,
            filename: None,
        });
    }
    out
}

/// Every loaded object with unwind information, its sections borrowed from a file mapping.
fn modules() -> Vec<Module<Mapped>> {
    use findshlibs::{SharedLibrary as _, TargetSharedLibrary};
    let mut out = Vec::new();
    TargetSharedLibrary::each(|lib| {
        let path = PathBuf::from(lib.name());
        let Ok(file) = std::fs::File::open(&path) else {
            return; // the vdso, or a deleted file
        };
        // SAFETY: a read-only private mapping of a loaded object; if the file changes under
        // us the worst outcome is a wrong stack in a profile.
        let Ok(map) = (unsafe { memmap2::Mmap::map(&file) }) else {
            return;
        };
        let map = Arc::new(map);
        let Ok(obj) = object::File::parse(&**map) else {
            return;
        };
        let section = |name: &str| -> (Option<Range<u64>>, Option<Mapped>) {
            match obj.section_by_name(name) {
                Some(s) => {
                    let svma = s.address()..s.address() + s.size();
                    let data = s.file_range().map(|(off, len)| Mapped {
                        map: map.clone(),
                        range: off as usize..(off + len) as usize,
                    });
                    (Some(svma), data)
                }
                None => (None, None),
            }
        };
        let (text_svma, text) = section(".text");
        let (eh_frame_svma, eh_frame) = section(".eh_frame");
        let (eh_frame_hdr_svma, eh_frame_hdr) = section(".eh_frame_hdr");
        let (got_svma, _) = section(".got");
        let info = ExplicitModuleSectionInfo {
            base_svma: obj.relative_address_base(),
            text_svma,
            text,
            got_svma,
            eh_frame_svma,
            eh_frame,
            eh_frame_hdr_svma,
            eh_frame_hdr,
            stubs_svma: None,
            stub_helper_svma: None,
            unwind_info: None,
            debug_frame: None,
            text_segment_svma: None,
            text_segment: None,
        };
        let start = lib.actual_load_addr().0 as u64;
        let bias = lib.virtual_memory_bias().0 as u64;
        out.push(Module::new(
            path.to_string_lossy().into_owned(),
            start..start + lib.len() as u64,
            bias.wrapping_add(obj.relative_address_base()),
            info,
        ));
    });
    out
}

unsafe fn arm(hz: u32) -> std::io::Result<()> {
    let mut sa: libc::sigaction = std::mem::zeroed();
    sa.sa_sigaction = on_sigprof as *const () as libc::sighandler_t;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    libc::sigemptyset(&mut sa.sa_mask);
    if libc::sigaction(libc::SIGPROF, &sa, std::ptr::null_mut()) != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let usec = (1_000_000 / hz.max(1)) as libc::suseconds_t;
    let t = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 0,
            tv_usec: usec,
        },
        it_value: libc::timeval {
            tv_sec: 0,
            tv_usec: usec,
        },
    };
    if libc::setitimer(libc::ITIMER_PROF, &t, std::ptr::null_mut()) != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

unsafe fn disarm() {
    let zero: libc::itimerval = std::mem::zeroed();
    libc::setitimer(libc::ITIMER_PROF, &zero, std::ptr::null_mut());
    // A SIGPROF still pending would kill the process under the default action.
    libc::signal(libc::SIGPROF, libc::SIG_IGN);
}

/// Async-signal-safe: no allocation, no locks; atomics, the preallocated buffer and syscalls.
extern "C" fn on_sigprof(_sig: libc::c_int, _info: *mut libc::siginfo_t, uctx: *mut c_void) {
    // SAFETY: errno belongs to the interrupted code; the handler must leave it as it was.
    let errno = unsafe { *libc::__errno_location() };
    IN_HANDLER.fetch_add(1, Ordering::SeqCst);
    let p = ACTIVE.load(Ordering::SeqCst);
    if !p.is_null() {
        // SAFETY: `halt` nulls ACTIVE and then waits for IN_HANDLER to drop to zero before
        // freeing, and this handler counted itself in before loading the pointer.
        unsafe { (*p).sample(uctx) };
    }
    IN_HANDLER.fetch_sub(1, Ordering::SeqCst);
    unsafe { *libc::__errno_location() = errno };
}

impl Sampler {
    unsafe fn sample(&self, uctx: *mut c_void) {
        if uctx.is_null() {
            return;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if i >= self.ready.len() {
            self.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(cache) = self.caches.iter().find(|c| {
            c.busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        }) else {
            self.lost.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let uc = &*(uctx as *const libc::ucontext_t);
        let g = &uc.uc_mcontext.gregs;
        let (ip, sp, bp) = (
            g[libc::REG_RIP as usize] as u64,
            g[libc::REG_RSP as usize] as u64,
            g[libc::REG_RBP as usize] as u64,
        );
        let slot = self.base.add(i * SLOT_WORDS);
        let frames = slot.add(4);
        let mut depth = 0;
        let mut read = |addr: u64| read_stack(addr);
        let mut it = self.unwinder.iter_frames(
            ip,
            UnwindRegsX86_64::new(ip, sp, bp),
            &mut *cache.cache.get(),
            &mut read,
        );
        while depth < MAX_FRAMES {
            match it.next() {
                Ok(Some(f)) => {
                    *frames.add(depth) = match f {
                        FrameAddress::InstructionPointer(a) => a,
                        r => r.address_for_lookup(),
                    };
                    depth += 1;
                }
                _ => break,
            }
        }
        cache.busy.store(false, Ordering::Release);
        let mut name = [0u8; 16];
        libc::prctl(
            libc::PR_GET_NAME,
            name.as_mut_ptr() as libc::c_ulong,
            0,
            0,
            0,
        );
        *slot = depth as u64;
        *slot.add(1) = libc::syscall(libc::SYS_gettid) as u64;
        *slot.add(2) = u64::from_ne_bytes([
            name[0], name[1], name[2], name[3], name[4], name[5], name[6], name[7],
        ]);
        *slot.add(3) = u64::from_ne_bytes([
            name[8], name[9], name[10], name[11], name[12], name[13], name[14], name[15],
        ]);
        self.ready[i].store(true, Ordering::Release);
    }
}

/// Reads one stack word for the unwinder, refusing addresses that are not mapped (a wrong
/// unwind rule must give a short stack, not a SIGSEGV).
fn read_stack(addr: u64) -> Result<u64, ()> {
    let aligned = addr & !0b111;
    if pprof::validate(aligned as *const c_void) {
        // SAFETY: just checked readable.
        Ok(unsafe { (aligned as *const u64).read() })
    } else {
        Err(())
    }
}
