//! `/debug/pprof/heap` (jemalloc's sampled in-use heap as a pprof profile) and the allocator's
//! housekeeping: statistics for /metrics and returning freed pages to the OS.

use std::io::{Read as _, Write as _};

use pprof::protos::Message as _;

/// Function-name prefixes of the allocator's own frames. jemalloc records every stack from
/// inside itself; like Go's `runtime.mallocgc`, those frames say nothing about the caller.
const ALLOCATOR_FRAMES: &[&str] = &[
    "_rjem_",
    "je_",
    "tikv_jemallocator",
    "<tikv_jemallocator",
    "__rust_alloc",
    "__rust_realloc",
    "__rust_alloc_zeroed",
    "__rg_alloc",
    "__rg_realloc",
    "alloc::alloc::",
    "<alloc::alloc::Global",
];

/// A gzipped pprof `inuse_space` profile with the allocator's frames removed from the top of
/// each stack. Symbolizes in the calling thread: call it from a short-lived one.
pub fn profile() -> Result<Vec<u8>, String> {
    let Some(ctl) = jemalloc_pprof::PROF_CTL.as_ref() else {
        return Err(
            "heap profiling is off: jemalloc runs without opt.prof (see _RJEM_MALLOC_CONF)".into(),
        );
    };
    let gz = {
        let mut ctl = ctl.blocking_lock();
        if !ctl.activated() {
            return Err("heap profiling is inactive (prof_active is false)".into());
        }
        ctl.dump_pprof()
            .map_err(|e| format!("heap dump failed: {e}"))?
    };
    // jemalloc_pprof symbolizes with backtrace-rs, which keeps the parsed debug info cached
    // globally for good; free it now that the dump is symbolized.
    backtrace::clear_symbol_cache();
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut raw)
        .map_err(|e| format!("heap dump is not gzip: {e}"))?;
    let mut p = pprof::protos::Profile::decode(&raw[..])
        .map_err(|e| format!("heap dump is not a pprof profile: {e}"))?;
    drop_allocator_frames(&mut p);
    // The names are final. Without mappings `go tool pprof` takes them as they are; with them
    // it re-demangles and shortens Rust paths to their last segment (`run`, `poll`).
    p.mapping.clear();
    for loc in &mut p.location {
        loc.mapping_id = 0;
    }
    gzip(&p.encode_to_vec())
}

pub fn gzip(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data)
        .and_then(|_| gz.finish())
        .map_err(|e| format!("gzip: {e}"))
}

/// Removes the allocator's frames from the leaf end of each stack, as pprof's `drop_frames`
/// would. A location's lines are its inlined frames, innermost first: `__rust_alloc` and
/// friends are inlined into their callers, so allocator lines are cut from the front of a
/// location too. jemalloc's C internals have no `::` and are skipped over on the way to the
/// last allocator entry point; the first other Rust frame ends the search.
fn drop_allocator_frames(p: &mut pprof::protos::Profile) {
    use std::collections::HashMap;
    let names: HashMap<u64, &str> = p
        .function
        .iter()
        .map(|f| {
            let n = p
                .string_table
                .get(f.name as usize)
                .map_or("", |s| s.as_str());
            (f.id, n)
        })
        .collect();
    // 0: user code, 1: an allocator entry point, 2: unnamed or C internals.
    let kind = |fid: u64| -> u8 {
        let n = names.get(&fid).copied().unwrap_or("");
        if ALLOCATOR_FRAMES.iter().any(|a| n.starts_with(a)) {
            1
        } else if n.contains("::") {
            0
        } else {
            2
        }
    };
    let mut loc_kind: HashMap<u64, u8> = HashMap::new();
    for loc in &mut p.location {
        let kinds: Vec<u8> = loc.line.iter().map(|l| kind(l.function_id)).collect();
        let k = match kinds.iter().position(|&k| k == 0) {
            Some(user) => {
                if let Some(last) = kinds[..user].iter().rposition(|&k| k == 1) {
                    loc.line.drain(..=last);
                }
                0
            }
            None if kinds.contains(&1) => 1,
            None => 2,
        };
        loc_kind.insert(loc.id, k);
    }
    for s in &mut p.sample {
        let mut cut = None;
        for (i, id) in s.location_id.iter().enumerate() {
            match loc_kind.get(id).copied().unwrap_or(0) {
                0 => break,
                1 => cut = Some(i + 1),
                _ => {}
            }
        }
        if let Some(n) = cut {
            if n < s.location_id.len() {
                s.location_id.drain(..n);
            }
        }
    }
}

/// Returns every arena's unused dirty pages to the OS now, instead of after the decay time.
pub fn purge() {
    // "arena.<MALLCTL_ARENAS_ALL>.purge" takes no value: both pointers null, length 0.
    let name = b"arena.4096.purge\0";
    // SAFETY: a documented void mallctl, called with the null arguments it requires.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr() as *const _,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

/// jemalloc's own view of memory, in bytes.
pub struct AllocStats {
    pub allocated: u64,
    pub active: u64,
    pub resident: u64,
    pub mapped: u64,
    pub retained: u64,
    pub metadata: u64,
}

pub fn stats() -> Option<AllocStats> {
    use tikv_jemalloc_ctl::{epoch, stats};
    epoch::advance().ok()?;
    Some(AllocStats {
        allocated: stats::allocated::read().ok()? as u64,
        active: stats::active::read().ok()? as u64,
        resident: stats::resident::read().ok()? as u64,
        mapped: stats::mapped::read().ok()? as u64,
        retained: stats::retained::read().ok()? as u64,
        metadata: stats::metadata::read().ok()? as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pprof::protos::{Function, Line, Location, Profile, Sample};

    #[test]
    fn allocator_frames_leave_the_top_of_stacks() {
        let names = [
            "",
            "je_prof_backtrace",
            "imalloc_body",
            "_rjem_malloc",
            "__rust_alloc",
            "alloc::raw_vec::RawVec<T>::grow",
            "unpart::upload::Upload::run",
            "main",
        ];
        let mut p = Profile {
            string_table: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        for i in 1..names.len() as u64 {
            p.function.push(Function {
                id: i,
                name: i as i64,
                ..Default::default()
            });
            p.location.push(Location {
                id: i,
                line: vec![Line {
                    function_id: i,
                    line: 0,
                }],
                ..Default::default()
            });
        }
        p.sample.push(Sample {
            location_id: vec![1, 2, 3, 4, 5, 6, 7],
            value: vec![10],
            ..Default::default()
        });
        // __rust_alloc inlined into its caller: the location keeps the caller's lines only.
        p.location[5].line.insert(
            0,
            Line {
                function_id: 4,
                line: 0,
            },
        );
        // A stack with no allocator frame at all is left alone.
        p.sample.push(Sample {
            location_id: vec![6, 7],
            value: vec![1],
            ..Default::default()
        });
        drop_allocator_frames(&mut p);
        assert_eq!(p.sample[0].location_id, vec![5, 6, 7]);
        assert_eq!(p.sample[1].location_id, vec![6, 7]);
        assert_eq!(p.location[5].line.len(), 1);
        assert_eq!(p.location[5].line[0].function_id, 6);
    }
}
