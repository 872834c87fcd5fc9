//! Spool files: where spool mode keeps a file part on disk until the body has ended.
//!
//! Each file is created private (0600, `O_EXCL`, a random name) and unlinked at once, so it
//! lives only as an open descriptor: whatever happens to the request — success, any failure
//! path, a dropped task, even a crash or SIGKILL — the kernel frees the space when the last
//! descriptor closes, and nobody else can open it. Only a crash in the microseconds between
//! create and unlink can leave a name behind; `SpoolDir::prepare` sweeps those at startup.
//!
//! Writes and reads go through the file threads (`jobs`) in blocks, double-buffered, so a
//! request holds at most two blocks whatever the file's size, and digests are computed by the
//! same thread that writes, off the proxy's workers. Blocks are sized from a budget shared by
//! every spool file in use (see [`BLOCK_BUDGET`]), so many uploads at once do not multiply
//! the memory a lone one uses.
//!
//! A file smaller than one block never touches the disk: no spool file is created,
//! and it is sent from that block. Most files of browser forms are that small, and for them
//! the disk round trip (create and unlink, write, read back: three hand-overs to the file
//! threads) was most of spool mode's cost per request.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::config::SpoolConf;
use crate::digest::{Algorithm, Digests};
use crate::jobs::{self, Pending};

/// The largest disk write or read: a lone upload's block.
pub const MAX_BLOCK: usize = 256 * 1024;
/// The smallest block, however many uploads share [`BLOCK_BUDGET`]: below it the file
/// threads' per-block hand-over (a wake-up each way) starts to cost more than the copy.
pub const MIN_BLOCK: usize = 32 * 1024;
/// Block bytes shared by every spool file in use, written or read back. Each holds at most two
/// blocks (one filling or being sent, one with the file threads), so a block is
/// `BLOCK_BUDGET / (2 * files)`, rounded down to a power of two within
/// [`MIN_BLOCK`]..=[`MAX_BLOCK`]: 256 KiB up to 8 files, 128 KiB with 9-16, 64 KiB with 17-32,
/// 32 KiB from 33; past 64 files the floor wins and the total grows by 64 KiB a file. With
/// fixed 256 KiB blocks, 64 uploads spooling at once held 32 MiB of blocks and unpart's RSS
/// peaked at 65 MiB; with an 8 MiB budget, at 38.9-39.4 MiB, and with this one at 34.9 (the
/// rest of the way to 30 MiB was `GROW_READS` in `body.rs`). A block's size is decided when it
/// starts, so a share that shrinks takes effect within two blocks. A smaller block also means a
/// smaller file that stays in memory: up to 128 KiB from 9 files spooling at once, 32 KiB from
/// 33.
pub const BLOCK_BUDGET: usize = 4 << 20;

/// A file kept in memory is hashed on the proxy's own thread up to this many bytes times
/// digests (sha256 takes about 40 µs for 64 KiB here); a larger one goes to the file threads.
const INLINE_DIGEST: usize = 64 * 1024;

/// The block size for a file when `files` are in use.
fn block_for(files: usize) -> usize {
    let fair = BLOCK_BUDGET / (2 * files.max(1));
    // Powers of two: a recycled buffer fits the next block unless the share halved or doubled.
    ((fair + 1).next_power_of_two() / 2).clamp(MIN_BLOCK, MAX_BLOCK)
}

/// Makes room for `more` bytes in `v`, growing by doubling but never past `limit` (the block's
/// size), so a first block grows with the file and a small file never holds a whole block.
fn reserve_within(v: &mut Vec<u8>, more: usize, limit: usize) {
    if v.capacity() - v.len() >= more {
        return;
    }
    let want = (v.len() + more).max(v.capacity() * 2).min(limit);
    v.reserve_exact(want - v.len());
}

const PREFIX: &str = "unpart-";
const SUFFIX: &str = ".spool";
/// A named spool file older than this is a left-over whatever its pid says.
const STALE: Duration = Duration::from_secs(60);

/// The spool directory and the running total of bytes spooled in it.
#[derive(Debug)]
pub struct SpoolDir {
    dir: PathBuf,
    max_total: u64,
    used: AtomicU64,
    /// Files in use, from their file part's start to the last block read back (or a failure):
    /// what the block budget is shared by.
    files: AtomicUsize,
    digests: Vec<Algorithm>,
}

#[derive(Debug)]
pub enum SpoolError {
    /// `spool.max_total_bytes` would be exceeded.
    Cap(u64),
    Io(io::Error),
}

impl From<io::Error> for SpoolError {
    fn from(e: io::Error) -> Self {
        SpoolError::Io(e)
    }
}

impl SpoolDir {
    /// Creates the directory (0700) if it is missing, proves it writable, and removes
    /// left-overs of earlier processes. Called once at startup, before any request.
    pub fn prepare(conf: &SpoolConf) -> io::Result<SpoolDir> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&conf.dir)?;
        let d = SpoolDir {
            dir: conf.dir.clone(),
            max_total: conf.max_total_bytes.0,
            used: AtomicU64::new(0),
            files: AtomicUsize::new(0),
            digests: conf.digests.clone(),
        };
        let removed = sweep(&d.dir)?;
        if removed > 0 {
            log::warn!(
                "removed {removed} left-over spool file(s) from {}",
                d.dir.display()
            );
        }
        drop(d.create_file()?);
        Ok(d)
    }

    /// Gives the directory to `user` (and `group`, else the user's own group) when unpart
    /// starts as root: pingora drops to that user after startup (`-d` with `user:`), and a
    /// directory left to root (0700) would fail every spooled upload. Runs before any thread
    /// is started, which `getpwnam` and `getgrnam` need.
    pub fn hand_over(&self, user: &str, group: Option<&str>) -> io::Result<()> {
        // SAFETY: plain getter.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(());
        }
        let cstr = |s: &str| std::ffi::CString::new(s).map_err(io::Error::other);
        let user_c = cstr(user)?;
        // SAFETY: a valid C string; the result points to static storage read at once.
        let pw = unsafe { libc::getpwnam(user_c.as_ptr()) };
        if pw.is_null() {
            return Err(io::Error::other(format!("no user `{user}`")));
        }
        // SAFETY: non-null, just returned by getpwnam.
        let (uid, mut gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        if let Some(group) = group {
            let group_c = cstr(group)?;
            // SAFETY: as above, with getgrnam.
            let gr = unsafe { libc::getgrnam(group_c.as_ptr()) };
            if gr.is_null() {
                return Err(io::Error::other(format!("no group `{group}`")));
            }
            // SAFETY: non-null, just returned by getgrnam.
            gid = unsafe { (*gr).gr_gid };
        }
        std::os::unix::fs::chown(&self.dir, Some(uid), Some(gid))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Spool files in use (see `files`).
    pub fn files(&self) -> usize {
        self.files.load(Ordering::Relaxed)
    }

    fn block_size(&self) -> usize {
        block_for(self.files())
    }

    /// Bytes spooled right now, all requests together.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn create_file(&self) -> io::Result<File> {
        let mut rnd = [0u8; 12];
        getrandom::getrandom(&mut rnd).map_err(io::Error::other)?;
        let name: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
        let path = self
            .dir
            .join(format!("{PREFIX}{}-{name}{SUFFIX}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        // A spool file that could not be unlinked would outlive its request: refuse it.
        std::fs::remove_file(&path)?;
        Ok(file)
    }

    /// A new, empty spool file for one request. The file on disk is created when its first
    /// block is full.
    pub fn writer(self: &Arc<Self>) -> SpoolWriter {
        SpoolWriter {
            file: None,
            reservation: Reservation::new(self),
            block: Vec::new(),
            block_len: 0,
            pending: None,
            digests: Some(Digests::new(&self.digests)),
            flushed: 0,
        }
    }
}

/// Removes `unpart-<pid>-<random>.spool` names whose process is gone or that are stale.
/// A live process's names (a graceful upgrade runs two) are only ever microseconds old.
fn sweep(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_suffix(SUFFIX))
            .and_then(|r| r.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_none_or(|age| age > STALE);
        if (stale || !process_alive(pid)) && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // Signal 0 checks existence; EPERM means it exists under another user.
    // SAFETY: kill with signal 0 sends nothing.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Bytes counted against `spool.max_total_bytes`, and the file counted in `SpoolDir::files`,
/// until the spool file is dropped.
#[derive(Debug)]
struct Reservation {
    dir: Arc<SpoolDir>,
    bytes: u64,
}

impl Reservation {
    fn new(dir: &Arc<SpoolDir>) -> Reservation {
        dir.files.fetch_add(1, Ordering::Relaxed);
        Reservation {
            dir: Arc::clone(dir),
            bytes: 0,
        }
    }

    fn grow(&mut self, n: u64) -> Result<(), SpoolError> {
        let max = self.dir.max_total;
        let before = self.dir.used.fetch_add(n, Ordering::Relaxed);
        if max > 0 && before + n > max {
            self.dir.used.fetch_sub(n, Ordering::Relaxed);
            return Err(SpoolError::Cap(max));
        }
        self.bytes += n;
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.dir.used.fetch_sub(self.bytes, Ordering::Relaxed);
        // A block already handed to the file threads outlives a dropped writer until its
        // job ends; the budget is what the living files share, not a hard cap.
        self.dir.files.fetch_sub(1, Ordering::Relaxed);
    }
}

type BlockResult = (Vec<u8>, Digests);

/// Appends a file part's bytes to its spool file.
pub struct SpoolWriter {
    /// `None` until the first block is full.
    file: Option<Arc<File>>,
    reservation: Reservation,
    /// The block being filled, and the size it is filled to (decided when it starts).
    block: Vec<u8>,
    block_len: usize,
    /// The block being hashed and written, which hands back its buffer and the digests.
    pending: Option<Pending<BlockResult>>,
    /// Here while no block is pending.
    digests: Option<Digests>,
    flushed: u64,
}

impl SpoolWriter {
    pub async fn append(&mut self, mut data: &[u8]) -> Result<(), SpoolError> {
        self.reservation.grow(data.len() as u64)?;
        while !data.is_empty() {
            if self.block.is_empty() {
                self.block_len = self.reservation.dir.block_size();
                // A buffer from a larger share would hold on to the difference.
                if self.block.capacity() > self.block_len {
                    self.block = Vec::new();
                }
            }
            let take = (self.block_len - self.block.len()).min(data.len());
            reserve_within(&mut self.block, take, self.block_len);
            self.block.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.block.len() == self.block_len {
                self.flush_block().await?;
            }
        }
        Ok(())
    }

    /// Waits for the block in flight, then hands the full one to the file threads.
    async fn flush_block(&mut self) -> Result<(), SpoolError> {
        let (spare, mut digests) = match self.wait_pending().await? {
            Some(r) => r,
            None => (Vec::new(), self.digests.take().ok_or_else(lost_digests)?),
        };
        let file = match &self.file {
            Some(f) => Arc::clone(f),
            None => {
                let dir = Arc::clone(&self.reservation.dir);
                let f = Arc::new(jobs::run(move || dir.create_file()).wait().await?);
                self.file = Some(Arc::clone(&f));
                f
            }
        };
        let mut full = std::mem::replace(&mut self.block, spare);
        let offset = self.flushed;
        self.flushed += full.len() as u64;
        self.pending = Some(jobs::run(move || {
            digests.update(&full);
            file.write_all_at(&full, offset)?;
            full.clear();
            Ok((full, digests))
        }));
        Ok(())
    }

    async fn wait_pending(&mut self) -> Result<Option<(Vec<u8>, Digests)>, SpoolError> {
        match self.pending.take() {
            Some(h) => Ok(Some(h.wait().await?)),
            None => Ok(None),
        }
    }

    /// Writes what is left and returns the complete file with its size and digests.
    pub async fn finish(mut self) -> Result<SpoolFile, SpoolError> {
        let Some(file) = self.file.clone() else {
            return self.keep_in_memory().await;
        };
        if !self.block.is_empty() {
            self.flush_block().await?;
        }
        let digests = match self.wait_pending().await? {
            Some((_, d)) => d,
            None => self.digests.take().ok_or_else(lost_digests)?,
        };
        Ok(SpoolFile {
            stored: Stored::Disk(file),
            len: self.flushed,
            digests: digests.finish(),
            reservation: self.reservation,
        })
    }

    /// The whole file is in its first block: it stays there.
    async fn keep_in_memory(mut self) -> Result<SpoolFile, SpoolError> {
        let block = std::mem::take(&mut self.block);
        let mut digests = self.digests.take().ok_or_else(lost_digests)?;
        let (block, digests) = if hash_inline(block.len(), self.reservation.dir.digests.len()) {
            digests.update(&block);
            (block, digests)
        } else {
            jobs::run(move || {
                digests.update(&block);
                Ok((block, digests))
            })
            .wait()
            .await?
        };
        Ok(SpoolFile {
            len: block.len() as u64,
            stored: Stored::Memory(Bytes::from(block)),
            digests: digests.finish(),
            reservation: self.reservation,
        })
    }
}

/// Whether a file kept in memory is hashed on the proxy's own thread (see [`INLINE_DIGEST`]).
fn hash_inline(len: usize, algorithms: usize) -> bool {
    len * algorithms.max(1) <= INLINE_DIGEST
}

fn lost_digests() -> io::Error {
    io::Error::other("spool digests lost")
}

/// Where a complete file is.
enum Stored {
    Disk(Arc<File>),
    /// Small enough to have stayed in its first block.
    Memory(Bytes),
}

/// A complete spool file.
pub struct SpoolFile {
    stored: Stored,
    pub len: u64,
    pub digests: Vec<(Algorithm, String)>,
    reservation: Reservation,
}

impl SpoolFile {
    /// Reads the file back in blocks, the next one read ahead while the caller sends this one.
    /// The file (and its share of the cap) goes when the `Blocks` does.
    pub fn into_blocks(self) -> Blocks {
        Blocks {
            spool: self,
            offset: 0,
            pending: None,
        }
    }
}

pub struct Blocks {
    spool: SpoolFile,
    offset: u64,
    pending: Option<Pending<Bytes>>,
}

impl Blocks {
    fn read_ahead(&mut self) {
        let len = self.spool.len;
        if self.pending.is_some() || self.offset >= len {
            return;
        }
        let Stored::Disk(file) = &self.spool.stored else {
            return;
        };
        let block = self.spool.reservation.dir.block_size();
        let n = (len - self.offset).min(block as u64) as usize;
        let (file, offset) = (Arc::clone(file), self.offset);
        self.offset += n as u64;
        // Allocated here, on a proxy worker, not by the file thread: then it comes from a
        // worker's arena, where the blocks written before were freed, and can reuse their
        // pages instead of adding the file threads' arena's on top (64 spooled uploads, two
        // runs each: peak RSS 38.9-39.4 against 40.1-40.2 MiB).
        let mut buf = Vec::with_capacity(n);
        self.pending = Some(jobs::run(move || {
            // Reads at the file's cursor (blocks are read one at a time, in order) into spare
            // capacity: `read_to_end` does not zero the buffer first, `read_exact_at` would.
            (&*file).take(n as u64).read_to_end(&mut buf)?;
            if buf.len() != n {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "spool file ended at {} of {offset}+{n}",
                        offset + buf.len() as u64
                    ),
                ));
            }
            Ok(Bytes::from(buf))
        }));
    }

    pub async fn next(&mut self) -> io::Result<Option<Bytes>> {
        if let Stored::Memory(b) = &self.spool.stored {
            if self.offset >= self.spool.len {
                return Ok(None);
            }
            self.offset = self.spool.len;
            return Ok(Some(b.clone()));
        }
        self.read_ahead();
        let Some(h) = self.pending.take() else {
            return Ok(None);
        };
        let block = h.wait().await?;
        self.read_ahead();
        Ok(Some(block))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ByteSize;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("unpart-spool-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn conf(dir: &Path, max: u64) -> SpoolConf {
        SpoolConf {
            dir: dir.to_path_buf(),
            max_total_bytes: ByteSize(max),
            digests: vec![Algorithm::Sha256, Algorithm::Crc32c],
        }
    }

    /// The digests the test files are checked against (those of `conf`).
    fn digests_of(data: &[u8]) -> Vec<(Algorithm, String)> {
        let mut d = Digests::new(&[Algorithm::Sha256, Algorithm::Crc32c]);
        d.update(data);
        d.finish()
    }

    /// Every block read back, each non-empty and at most `max` bytes, joined.
    async fn read_all(blocks: &mut Blocks, max: usize) -> Vec<u8> {
        let mut back = Vec::new();
        while let Some(b) = blocks.next().await.unwrap() {
            assert!(!b.is_empty() && b.len() <= max, "{}", b.len());
            back.extend_from_slice(&b);
        }
        back
    }

    #[tokio::test]
    async fn round_trip_leaves_no_name_and_frees_the_reservation() {
        let d = temp_dir("rt");
        let spool = Arc::new(SpoolDir::prepare(&conf(&d, 0)).unwrap());
        let data: Vec<u8> = (0..MAX_BLOCK * 2 + 12345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut w = spool.writer();
        for piece in data.chunks(65_000) {
            w.append(piece).await.unwrap();
        }
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            0,
            "unlinked at once"
        );
        let f = w.finish().await.unwrap();
        assert_eq!(f.len, data.len() as u64);
        assert_eq!(spool.used(), data.len() as u64);
        assert_eq!(f.digests, digests_of(&data));
        let mut blocks = f.into_blocks();
        assert!(read_all(&mut blocks, MAX_BLOCK).await == data);
        assert_eq!(spool.used(), data.len() as u64);
        drop(blocks);
        assert_eq!(spool.used(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn blocks_are_the_budget_shared_by_the_files_in_use() {
        assert_eq!(block_for(0), MAX_BLOCK);
        assert_eq!(block_for(1), MAX_BLOCK);
        assert_eq!(block_for(8), MAX_BLOCK);
        assert_eq!(block_for(9), 128 << 10);
        assert_eq!(block_for(16), 128 << 10);
        assert_eq!(block_for(17), 64 << 10);
        assert_eq!(block_for(32), 64 << 10);
        assert_eq!(block_for(33), 32 << 10);
        assert_eq!(block_for(64), 32 << 10);
        assert_eq!(block_for(100_000), MIN_BLOCK);
        for files in 1..300 {
            let b = block_for(files);
            assert!(b.is_power_of_two(), "{files}: {b}");
            assert!(
                files * 2 * b <= BLOCK_BUDGET || b == MIN_BLOCK,
                "{files}: {b}"
            );
        }
    }

    #[test]
    fn a_block_grows_with_its_data_but_never_past_its_size() {
        let mut v = Vec::new();
        reserve_within(&mut v, 10_000, MAX_BLOCK);
        assert!(v.capacity() >= 10_000 && v.capacity() < MAX_BLOCK);
        v.resize(10_000, 0);
        for _ in 0..40 {
            let more = (MAX_BLOCK - v.len()).min(7_000);
            reserve_within(&mut v, more, MAX_BLOCK);
            assert!(v.capacity() <= MAX_BLOCK, "{}", v.capacity());
            v.resize(v.len() + more, 0);
        }
        assert_eq!(v.len(), MAX_BLOCK);
        assert_eq!(v.capacity(), MAX_BLOCK);
    }

    #[tokio::test]
    async fn blocks_shrink_while_many_files_share_the_budget() {
        let d = temp_dir("share");
        let spool = Arc::new(SpoolDir::prepare(&conf(&d, 0)).unwrap());
        let data: Vec<u8> = (0..MAX_BLOCK * 3 + 777)
            .map(|i| (i * 13 % 251) as u8)
            .collect();
        let mut w = spool.writer();
        assert_eq!(spool.files(), 1);
        w.append(&data[..MAX_BLOCK + 10]).await.unwrap();
        // Alone, a whole 256 KiB block went to disk.
        assert!(w.file.is_some());
        assert_eq!(w.flushed, MAX_BLOCK as u64);
        // 32 files: a share above the floor, so this is the budget at work.
        let others: Vec<_> = (0..31).map(|_| spool.writer()).collect();
        assert_eq!(spool.files(), 32);
        let small = block_for(32);
        assert!(small > MIN_BLOCK && small < MAX_BLOCK, "{small}");
        w.append(&data[MAX_BLOCK + 10..]).await.unwrap();
        // The blocks started after the share shrank are smaller, and the larger buffer handed
        // back by the file threads was not kept.
        assert_eq!(w.block_len, small);
        assert!(w.block.capacity() <= small, "{}", w.block.capacity());
        let f = w.finish().await.unwrap();
        assert_eq!(f.digests, digests_of(&data));
        let mut blocks = f.into_blocks();
        assert!(read_all(&mut blocks, small).await == data);
        drop(blocks);
        assert_eq!(spool.files(), 31);
        drop(others);
        assert_eq!(spool.files(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_file_smaller_than_a_block_stays_in_memory() {
        let d = temp_dir("mem");
        let spool = Arc::new(SpoolDir::prepare(&conf(&d, 0)).unwrap());
        // Alone, a file has 256 KiB blocks: shorter ones stay in memory, whether their digests
        // are computed inline or by the file threads (over 32 KiB with two digests); a file of
        // exactly a block or more goes to disk. Both hashing paths are among these lengths:
        assert!(hash_inline(5_000, 2) && hash_inline(MIN_BLOCK, 2));
        assert!(!hash_inline(MIN_BLOCK + 1, 2) && !hash_inline(100 << 10, 2));
        let lens = [
            0,
            1,
            5_000,
            MIN_BLOCK - 1,
            100 << 10,
            MAX_BLOCK - 1,
            MAX_BLOCK,
            MAX_BLOCK * 2,
            MAX_BLOCK * 2 + 5,
        ];
        for len in lens {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 253) as u8).collect();
            let mut w = spool.writer();
            for piece in data.chunks(3_000) {
                w.append(piece).await.unwrap();
            }
            let f = w.finish().await.unwrap();
            assert_eq!(
                matches!(f.stored, Stored::Memory(_)),
                len < MAX_BLOCK,
                "{len}"
            );
            assert_eq!(f.len, len as u64);
            assert_eq!(spool.used(), len as u64);
            assert_eq!(f.digests, digests_of(&data), "{len}");
            let mut blocks = f.into_blocks();
            assert!(read_all(&mut blocks, MAX_BLOCK).await == data, "{len}");
            drop(blocks);
            assert_eq!(spool.used(), 0);
            assert_eq!(spool.files(), 0);
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn the_cap_counts_every_open_file() {
        let d = temp_dir("cap");
        let spool = Arc::new(SpoolDir::prepare(&conf(&d, 1000)).unwrap());
        let mut a = spool.writer();
        let mut b = spool.writer();
        a.append(&[1; 600]).await.unwrap();
        assert!(matches!(
            b.append(&[2; 500]).await,
            Err(SpoolError::Cap(1000))
        ));
        b.append(&[2; 400]).await.unwrap();
        drop(a);
        b.append(&[2; 500]).await.unwrap();
        let f = b.finish().await.unwrap();
        assert_eq!(f.len, 900);
        drop(f);
        assert_eq!(spool.used(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn prepare_creates_a_private_dir_and_sweeps_only_dead_left_overs() {
        use std::os::unix::fs::PermissionsExt;
        let d = temp_dir("sweep");
        std::fs::create_dir_all(&d).unwrap();
        // A dead process's left-over (pid far above pid_max), a live one's, and a stranger.
        let dead = d.join("unpart-2147483646-00ff.spool");
        let live = d.join(format!("unpart-{}-00ff.spool", std::process::id()));
        let other = d.join("notes.txt");
        for p in [&dead, &live, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        // A live pid's name that is older than STALE is a left-over too: names live only
        // microseconds.
        let stale = d.join(format!("unpart-{}-beef.spool", std::process::id()));
        let f = std::fs::File::create(&stale).unwrap();
        f.set_modified(SystemTime::now() - STALE - Duration::from_secs(5))
            .unwrap();
        drop(f);
        let s = SpoolDir::prepare(&conf(&d, 0)).unwrap();
        assert!(!dead.exists() && live.exists() && other.exists());
        assert!(!stale.exists(), "a stale name is swept whatever its pid");
        std::fs::remove_dir_all(s.dir()).unwrap();

        let fresh = temp_dir("fresh").join("a/b");
        SpoolDir::prepare(&conf(&fresh, 0)).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::remove_dir_all(fresh.parent().unwrap().parent().unwrap()).unwrap();
    }
}
