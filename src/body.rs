//! Client body reader for stream and spool mode: reads a large `Content-Length` body in big
//! pieces straight from the client's socket, without pingora's 64 KiB-per-read, copy-per-read
//! path.
//!
//! pingora 0.9's h1 server reads a request body at most 64 KiB at a time and copies every piece
//! into a new `Bytes`; at upload speeds that costs a wakeup, two syscalls and a copy per 64 KiB.
//! pingora offers no way to read the body differently, and its session must stay in charge of
//! the connection (the response, keep-alive, the byte after this request). So the body is split
//! in three, and pingora's own reader keeps an exact account of its share:
//!
//! 1. **head**: before pingora's body reader exists (it is created lazily from the request
//!    header on first use), the `Content-Length` header is set to a small `head` length and the
//!    reader is created at once; then the header is restored. pingora's reader now believes the
//!    body is `head` bytes long. Its first read hands out the bytes it read together with the
//!    header (never lost), or reads the socket itself.
//! 2. **middle**: the next `Content-Length - head` bytes come straight from the socket, through a
//!    second descriptor (`dup`) of the same socket registered with tokio, into one reused buffer
//!    of up to [`MAX_READ`] bytes; each read is handed on zero-copy. It never reads past the
//!    middle, so the tail and anything after this request stay in the socket.
//! 3. **tail**: pingora's reader reads the last bytes of its `head` and reaches its end, so
//!    pingora sees a body read to its end and keeps the connection alive as usual.
//!
//! What this relies on, each checked at run time where it can be (a failed check falls back to
//! pingora's reader for the whole body, or closes the connection after the response):
//! - the downstream is plain HTTP/1 over TCP (a pingora l4 `Stream`; else: fallback);
//! - pingora's l4 stream has no read buffer of its own, so no body byte hides between pingora's
//!   reader and the socket (`main.rs` configures the listener that way; checked on the
//!   stream's `Debug` form, else: fallback);
//! - pingora's body reader is created from the header on first use, not before `request_filter`
//!   (true in pingora 0.9.1; if not, pingora's count disagrees at the end: the connection is
//!   closed after the response instead of being reused, and no byte is misread);
//! - pingora's content-length reader never reads past its length (true in 0.9.1).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use pingora::ErrorType;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::page;

/// Bodies smaller than this are read by pingora alone: the set-up costs a few syscalls, and
/// small bodies gain nothing.
pub const MIN_DIRECT: u64 = 4 << 20;
/// The largest single read from the socket, and so the largest buffer per upload (each read
/// starts mid-page within it, see `page.rs`).
pub const MAX_READ: usize = 1 << 20;
/// The smallest read buffer when many uploads share [`READ_BUDGET`].
pub const MIN_READ: usize = 64 << 10;
/// Read buffer bytes shared by all uploads reading directly at the same time: each read of an
/// upload is at most `READ_BUDGET / active`, within [`MIN_READ`]..=[`MAX_READ`], and its buffer
/// is replaced when that size halves, or grows (at least doubling) to the smaller of that size
/// and what [`GROW_READS`] reads of the body left fill. A new buffer never takes the total past
/// the budget (beyond [`MIN_READ`] each): when 64 uploads start at once, the first ones would
/// otherwise size theirs for a quieter moment (1 MiB, 512 KiB, ...) and the peak would be
/// several budgets until they shrink.
pub const READ_BUDGET: usize = 4 << 20;
/// A reader's buffer grows only to a size that at least this many reads of the body left will
/// fill. A replaced buffer's pages stay resident until the allocator decays them (about a
/// second: `dirty_decay_ms` in `main.rs`), and the new one's are touched afresh. When a crowd
/// of uploads ended together, the last ones grew step by step as the others left, and the
/// pages they left were the process's peak: 64 spooled uploads of 64 MiB (4 MiB of spool
/// blocks) peaked at 34.9 MiB, 30.2 without any growth. With 256, an upload with 32 MiB left
/// may still move from 64 to 128 KiB reads, one with 256 MiB left to 1 MiB.
pub const GROW_READS: u64 = 256;

/// Buffer bytes the direct readers hold now.
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

/// Uploads currently reading directly (for the buffer size).
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Why reading the client's body failed.
#[derive(Debug)]
pub enum BodyError {
    /// Nothing arrived for the idle timeout.
    Idle,
    /// The connection closed (or was half-closed) before the body's end: the client may
    /// still be there to read an answer.
    Closed(String),
    /// The client broke its framing, or the socket failed.
    Client(String),
}

pub fn from_pingora(e: Box<pingora::Error>) -> BodyError {
    if e.etype() == &ErrorType::ReadTimedout {
        BodyError::Idle
    } else if e.etype() == &ErrorType::ConnectionClosed {
        BodyError::Closed(e.to_string())
    } else {
        BodyError::Client(e.to_string())
    }
}

/// The middle part's own reading state.
struct Direct {
    /// A second descriptor of the client's socket, registered with tokio for reading.
    sock: TcpStream,
    buf: BytesMut,
    /// Middle bytes still to read.
    left: u64,
    /// Bytes pingora's reader reads after the middle.
    tail: u64,
    /// This reader's share of the budget: the size `buf` was allocated with.
    share: Share,
}

/// Counts one direct reader, and the buffer bytes it holds, while it lives.
struct Share {
    alloc: usize,
}

impl Share {
    fn new() -> Share {
        ACTIVE.fetch_add(1, Ordering::Relaxed);
        Share { alloc: 0 }
    }

    /// The read size for this reader now: its fair part of the budget, limited by what the
    /// others hold.
    fn read_size(&self) -> usize {
        let fair = (READ_BUDGET / ACTIVE.load(Ordering::Relaxed).max(1)).clamp(MIN_READ, MAX_READ);
        let others = ALLOCATED.load(Ordering::Relaxed).saturating_sub(self.alloc);
        fair.min(READ_BUDGET.saturating_sub(others)).max(MIN_READ)
    }

    fn resize(&mut self, size: usize) {
        ALLOCATED.fetch_add(size, Ordering::Relaxed);
        ALLOCATED.fetch_sub(self.alloc, Ordering::Relaxed);
        self.alloc = size;
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        ALLOCATED.fetch_sub(self.alloc, Ordering::Relaxed);
        ACTIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Phase {
    /// pingora reads everything (small or chunked bodies, or no direct access).
    Pingora,
    /// pingora's reader was made to believe the body is `head` bytes long; its first read is
    /// next, then the middle goes direct.
    Head { head: u64, direct: Box<Direct> },
    /// Reading the middle directly.
    Middle(Box<Direct>),
    /// The middle is done; pingora reads its last `left` bytes.
    Tail { left: u64 },
    /// The body has ended.
    Done,
    /// Reading failed; the reader is of no further use.
    Failed,
}

pub struct ClientBody {
    phase: Phase,
    idle: Duration,
}

impl ClientBody {
    /// A reader that leaves everything to pingora.
    pub fn pingora(idle: Duration) -> ClientBody {
        ClientBody {
            phase: Phase::Pingora,
            idle,
        }
    }

    /// Decides how the body will be read. Must run before anything uses pingora's body reader
    /// (reading the body, `is_body_done`, writing `100 Continue`).
    pub fn prepare(session: &mut Session, idle: Duration) -> ClientBody {
        let phase = match plan(session) {
            Some((head, direct)) => Phase::Head { head, direct },
            None => Phase::Pingora,
        };
        ClientBody { phase, idle }
    }

    /// The next piece of the body, `None` at its end.
    pub async fn read(&mut self, session: &mut Session) -> Result<Option<Bytes>, BodyError> {
        loop {
            match &mut self.phase {
                Phase::Pingora => return session.read_request_body().await.map_err(from_pingora),
                Phase::Done => return Ok(None),
                Phase::Failed => {
                    return Err(BodyError::Client(
                        "client body reader: failed earlier".into(),
                    ))
                }
                Phase::Head { head, .. } => {
                    let head = *head;
                    let first = match session.read_request_body().await {
                        Ok(b) => b,
                        Err(e) => {
                            self.phase = Phase::Failed;
                            return Err(from_pingora(e));
                        }
                    };
                    let got = first.as_ref().map_or(0, |b| b.len() as u64);
                    let Phase::Head { direct: mut d, .. } =
                        std::mem::replace(&mut self.phase, Phase::Failed)
                    else {
                        unreachable!("matched above")
                    };
                    if first.is_none() || got >= head || session.is_body_done() {
                        // pingora read more than `head` with the header, and holds what is past
                        // it out of reach. Unreachable with pingora's header buffer sizes.
                        return Err(BodyError::Client(format!(
                            "client body reader: pingora's first read returned {got} of {head} bytes"
                        )));
                    }
                    d.tail = head - got;
                    self.phase = Phase::Middle(d);
                    return Ok(first);
                }
                Phase::Middle(d) => {
                    if d.left == 0 {
                        // Dropping the direct reader deregisters and closes the second
                        // descriptor before pingora reads again.
                        self.phase = Phase::Tail { left: d.tail };
                        continue;
                    }
                    return match read_direct(d, self.idle).await {
                        Ok(b) => Ok(Some(b)),
                        Err(e) => {
                            self.phase = Phase::Failed;
                            Err(e)
                        }
                    };
                }
                Phase::Tail { left } => {
                    let b = match session.read_request_body().await {
                        Ok(b) => b,
                        Err(e) => {
                            self.phase = Phase::Failed;
                            return Err(from_pingora(e));
                        }
                    };
                    let Some(mut b) = b else {
                        let left = *left;
                        self.phase = Phase::Failed;
                        return Err(BodyError::Closed(format!(
                            "client body reader: the body ended {left} bytes early"
                        )));
                    };
                    if b.len() as u64 > *left {
                        // pingora's count disagrees (its reader existed before ours): keep the
                        // body's bytes, drop the rest and do not reuse the connection.
                        b.truncate(*left as usize);
                        session.set_keepalive(None);
                    }
                    *left -= b.len() as u64;
                    if *left == 0 {
                        if !session.is_body_done() {
                            log::warn!(
                                "client body reader: pingora expects more body bytes; \
                                 not reusing the connection"
                            );
                            session.set_keepalive(None);
                        }
                        self.phase = Phase::Done;
                    }
                    return Ok(Some(b));
                }
            }
        }
    }
}

/// One read of the middle, of at most the buffer's size and never past the middle's end.
async fn read_direct(d: &mut Direct, idle: Duration) -> Result<Bytes, BodyError> {
    if let Some(size) = resize_to(d.share.alloc, d.share.read_size(), d.left) {
        // The previous buffer goes when its last piece is dropped.
        d.buf = page::buffer(size);
        d.share.resize(size);
    }
    let want = (d.share.alloc as u64).min(d.left) as usize;
    // Reclaims the allocation when the previous piece has been dropped (it has, unless the
    // backend write still holds it), so one buffer serves the whole body; the read then
    // starts mid-page within it and is up to `page::SLACK` bytes shorter.
    d.buf.reserve(want);
    page::start_mid_page(&mut d.buf);
    let want = want.min(d.buf.capacity());
    let mut limited = (&mut d.sock).take(want as u64);
    let n = match tokio::time::timeout(idle, limited.read_buf(&mut d.buf)).await {
        Err(_) => return Err(BodyError::Idle),
        Ok(Err(e)) => return Err(BodyError::Client(format!("reading the body: {e}"))),
        Ok(Ok(n)) => n,
    };
    if n == 0 {
        return Err(BodyError::Closed(format!(
            "client closed the connection with {} body bytes left",
            d.left + d.tail
        )));
    }
    d.left -= n as u64;
    Ok(d.buf.split().freeze())
}

/// The size to replace a reader's buffer with, if any:
/// - its first buffer: the whole share, however little is left (a body qualifies for direct
///   reads only from `MIN_DIRECT`, and a lone upload should not start small);
/// - the share when it is half the buffer or less;
/// - when the share grew, the share or what [`GROW_READS`] reads of the body left fill,
///   whichever is smaller, if that at least doubles the buffer.
fn resize_to(alloc: usize, share: usize, left: u64) -> Option<usize> {
    if alloc == 0 || share <= alloc / 2 {
        return Some(share);
    }
    let fill = usize::try_from(left / GROW_READS).unwrap_or(usize::MAX);
    let grown = share.min(fill);
    (grown / 2 >= alloc).then_some(grown)
}

/// The head's length and the direct reader, when the body qualifies; pingora's body reader is
/// then already created with the head's length.
fn plan(session: &mut Session) -> Option<(u64, Box<Direct>)> {
    let cl = content_length(session.req_header())?;
    let cl_value = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)?
        .clone();
    if cl < MIN_DIRECT {
        return None;
    }
    // pingora read the header with up to a buffer's worth of body bytes; its buffer starts at
    // 4 KiB and at most doubles past the header. `head` must exceed whatever it holds.
    let header_len = session
        .as_downstream()
        .as_http1()?
        .get_headers_raw_bytes()
        .len() as u64;
    let head = (4 * header_len + (64 << 10)).max(256 << 10);
    if cl < head + MIN_READ as u64 {
        return None;
    }
    let sock = direct_socket(session)?;
    // Create pingora's body reader now, believing the body is `head` bytes long, and put the
    // real length back for everyone else.
    session
        .req_header_mut()
        .insert_header(http::header::CONTENT_LENGTH, head.to_string())
        .ok()?;
    let done = session.is_body_done();
    if let Err(e) = session
        .req_header_mut()
        .insert_header(http::header::CONTENT_LENGTH, cl_value)
    {
        log::warn!("client body reader: cannot restore Content-Length: {e}");
    }
    if done {
        return None;
    }
    let share = Share::new();
    Some((
        head,
        Box::new(Direct {
            sock,
            buf: BytesMut::new(),
            left: cl - head,
            tail: 0,
            share,
        }),
    ))
}

/// A second descriptor of the client's TCP socket, registered with tokio; `None` when the
/// downstream is not plain HTTP/1 over TCP through an unbuffered pingora l4 stream.
fn direct_socket(session: &Session) -> Option<TcpStream> {
    let h1 = session.as_downstream().as_http1()?;
    // TLS and Unix-socket clients are expected here: pingora reads their bodies.
    let l4 = crate::head::l4(h1.stream())?;
    // Bytes in an l4 read buffer (or put back with `rewind`) would be skipped by a direct
    // read. pingora exposes neither, so check its `Debug` form: an unknown form reads as
    // "buffered", which only means pingora reads this body.
    let form = format!("{l4:?}");
    if !form.contains("Some(UnbufferedRead(") || !form.contains("rewind_read_buf: []") {
        unavailable("the client connection's l4 stream may hold buffered bytes");
        return None;
    }
    // SAFETY: the descriptor belongs to `l4`, which outlives this call; it is only borrowed to
    // duplicate it. The duplicate is closed when the returned stream drops.
    let fd = match unsafe { BorrowedFd::borrow_raw(l4.as_raw_fd()) }.try_clone_to_owned() {
        Ok(fd) => fd,
        Err(e) => {
            log::warn!("client body reader: cannot duplicate the client socket: {e}");
            return None;
        }
    };
    let std = std::net::TcpStream::from(fd);
    // A Unix socket has no IP peer address; neither has a closed one.
    std.peer_addr().ok()?;
    // The descriptor shares the socket's file status, already non-blocking. tokio registers
    // it with its own epoll entry and removes that entry before closing it on drop (closing
    // alone would leave it, the socket being still open through pingora's descriptor).
    match TcpStream::from_std(std) {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!("client body reader: cannot register the client socket: {e}");
            None
        }
    }
}

/// Says once per process why large bodies go through pingora's reader (a pingora change, most
/// likely): correct, only slower.
fn unavailable(why: &str) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        log::warn!("client body reader: cannot read bodies directly ({why}); pingora reads them");
    }
}

/// The body's length when one `Content-Length` frames it (no Transfer-Encoding, no repeats).
pub fn content_length(req: &pingora::http::RequestHeader) -> Option<u64> {
    if req.headers.contains_key(http::header::TRANSFER_ENCODING) {
        return None;
    }
    let mut cls = req.headers.get_all(http::header::CONTENT_LENGTH).iter();
    let (Some(v), None) = (cls.next(), cls.next()) else {
        return None;
    };
    parse_content_length(v.as_bytes())
}

/// A `Content-Length` value: ASCII digits only, as pingora accepted it.
fn parse_content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_values() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b"4194304"), Some(4 << 20));
        assert_eq!(
            parse_content_length(b"1844674407370955161"),
            Some(1844674407370955161)
        );
        for bad in [
            &b""[..],
            b" 1",
            b"1 ",
            b"+1",
            b"-1",
            b"1e9",
            b"0x10",
            b"12345678901234567890",
        ] {
            assert_eq!(parse_content_length(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn buffers_shrink_with_the_share_and_grow_only_as_far_as_the_body_left_fills() {
        let k = 1024;
        let plenty = u64::MAX;
        assert_eq!(resize_to(0, 64 * k, 1), Some(64 * k), "the first buffer");
        assert_eq!(resize_to(64 * k, 64 * k, plenty), None);
        assert_eq!(
            resize_to(256 * k, 128 * k, 1),
            Some(128 * k),
            "shrinks, however little is left"
        );
        assert_eq!(
            resize_to(256 * k, 129 * k, plenty),
            None,
            "less than halved"
        );
        assert_eq!(
            resize_to(64 * k, 127 * k, plenty),
            None,
            "less than doubled"
        );
        let need = GROW_READS * 128 * k as u64;
        assert_eq!(resize_to(64 * k, 128 * k, need), Some(128 * k));
        assert_eq!(resize_to(64 * k, 128 * k, plenty), Some(128 * k));
        // The share is far above the buffer, but 100 KiB reads are all the body left fills.
        assert_eq!(
            resize_to(64 * k, 1024 * k, GROW_READS * 100 * k as u64),
            None
        );
        // A crowd ended at once: the share is 1 MiB, but 200 MiB left fill 800 KiB reads.
        let left = 200 << 20;
        assert_eq!(
            resize_to(64 * k, 1024 * k, left),
            Some((left / GROW_READS) as usize)
        );
        assert_eq!(
            resize_to(64 * k, 128 * k, need - 1),
            None,
            "too little left to grow"
        );
    }

    /// The counters are process-wide: the tests that count readers take turns.
    static COUNTERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn counters_turn() -> std::sync::MutexGuard<'static, ()> {
        COUNTERS.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[test]
    fn buffer_sizes_share_the_budget() {
        let _turn = counters_turn();
        let a = Share::new();
        assert_eq!(a.read_size(), READ_BUDGET.clamp(MIN_READ, MAX_READ));
        let many: Vec<_> = (0..100).map(|_| Share::new()).collect();
        assert_eq!(a.read_size(), MIN_READ);
        drop(many);
        // Readers that sized their buffers while alone keep the budget until they shrink:
        // a newcomer gets the smallest buffer, not a fair share on top of theirs.
        let mut early: Vec<_> = (0..4).map(|_| Share::new()).collect();
        for s in &mut early {
            s.resize(MAX_READ);
        }
        let late = Share::new();
        assert_eq!(late.read_size(), MIN_READ);
        drop(early);
        assert_eq!(
            late.read_size(),
            (READ_BUDGET / 2).clamp(MIN_READ, MAX_READ)
        );
        drop(late);
        drop(a);
        assert_eq!(ALLOCATED.load(Ordering::Relaxed), 0);
        assert_eq!(ACTIVE.load(Ordering::Relaxed), 0);
    }

    /// `read_direct` follows `resize_to` with a real socket: its buffer starts at the whole
    /// share, shrinks when a crowd arrives, grows back when the crowd leaves, and grows only
    /// as far as the body left fills; each read is at most the buffer.
    #[test]
    fn a_direct_reader_resizes_its_buffer_as_the_share_and_the_body_left_change() {
        let _turn = counters_turn();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use tokio::io::AsyncWriteExt;
            let k: u64 = 1024;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut client = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (server, _) = listener.accept().await.unwrap();
            // More than all the reads below take (about 2.4 MiB), so the writer never runs dry.
            let writer = tokio::spawn(async move {
                let _ = client.write_all(&vec![7u8; 6 << 20]).await;
                client
            });
            let mut d = Direct {
                sock: server,
                buf: BytesMut::new(),
                left: 1 << 40,
                tail: 0,
                share: Share::new(),
            };
            let idle = Duration::from_secs(10);
            // One read: at most the buffer, and into a buffer of that size, the read and
            // what is left after it filling all of it but the mid-page start.
            async fn one(d: &mut Direct, idle: Duration) -> usize {
                let n = read_direct(d, idle).await.expect("a read").len();
                let rest = d.buf.capacity();
                assert!(
                    n > 0 && n + rest <= d.share.alloc && n + rest + page::SLACK > d.share.alloc,
                    "read {n}, {rest} left, in a buffer of {}",
                    d.share.alloc
                );
                n
            }

            one(&mut d, idle).await;
            assert_eq!(d.share.alloc, MAX_READ, "alone: the whole share");
            assert_eq!(ALLOCATED.load(Ordering::Relaxed), MAX_READ);

            let crowd: Vec<_> = (0..63).map(|_| Share::new()).collect();
            one(&mut d, idle).await;
            assert_eq!(d.share.alloc, MIN_READ, "one of 64: shrunk");
            drop(crowd);
            one(&mut d, idle).await;
            assert_eq!(d.share.alloc, MAX_READ, "alone again, plenty left: grown");

            let crowd: Vec<_> = (0..63).map(|_| Share::new()).collect();
            one(&mut d, idle).await;
            assert_eq!(d.share.alloc, MIN_READ);
            drop(crowd);
            // 256 reads of 100 KiB left: not enough to double a 64 KiB buffer.
            d.left = GROW_READS * 100 * k;
            one(&mut d, idle).await;
            assert_eq!(d.share.alloc, MIN_READ, "too little left to grow");
            // Enough for 256 reads of 160 KiB: grown that far, not to the 1 MiB share.
            d.left = GROW_READS * 160 * k;
            one(&mut d, idle).await;
            assert_eq!(d.share.alloc, 160 * k as usize);
            assert_eq!(ALLOCATED.load(Ordering::Relaxed), 160 * k as usize);

            drop(d);
            assert_eq!(ALLOCATED.load(Ordering::Relaxed), 0);
            assert_eq!(ACTIVE.load(Ordering::Relaxed), 0);
            drop(writer.await.unwrap());
        });
    }
}
