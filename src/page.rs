//! Where in a memory page a large read buffer starts.
//!
//! A body byte is copied twice by the kernel: from the client's socket into unpart's buffer,
//! then from the buffer into the upstream socket's pages. Socket pages are recycled and filled
//! from their start, so in the second copy the destination often sits at a page boundary plus
//! the few bytes of the chunk header (`100000\r\n`). A buffer that starts at a page boundary
//! (as the direct reader's did: strace showed its reads at page offset 0) puts the destination
//! those few bytes *ahead* of the source modulo 4 KiB, and the CPU then takes each load for one
//! that may depend on the store just before it (4K aliasing). Measured on this project's 2-core
//! AMD EPYC machine with a plain C relay: a 1 GiB relay with an 8-byte header took 0.52-0.85
//! CPU-s per GiB from a page-aligned buffer and 0.27-0.36 from one that starts half a page in;
//! any header under 16 bytes was slow, none of 16 bytes or more, nor no header at all. Half a
//! page keeps both copies far from each other whatever small offset either socket's pages
//! start at.
//!
//! The buffer gives up the bytes before that point instead of being allocated larger: a few
//! KiB more would put a 1 MiB buffer in the allocator's next size class, a quarter larger.

use bytes::{Buf, BufMut, BytesMut};

const PAGE: usize = 4096;
/// Where a read buffer's first byte lands within its page.
const OFFSET: usize = PAGE / 2;

/// At most this much of a buffer's capacity is given up.
pub const SLACK: usize = PAGE;

/// Moves an empty buffer's start to `OFFSET` bytes into a page, giving up fewer than
/// [`SLACK`] bytes of its capacity; a buffer too small to keep any room is left alone.
pub fn start_mid_page(buf: &mut BytesMut) {
    debug_assert!(buf.is_empty());
    let skip = OFFSET.wrapping_sub(buf.as_ptr() as usize) % PAGE;
    if skip > 0 && buf.capacity() > skip {
        buf.put_bytes(0, skip);
        buf.advance(skip);
    }
}

/// An empty buffer of `n` bytes' allocation, starting mid-page: room for more than
/// `n - SLACK` bytes (all `n` when it is under a page).
pub fn buffer(n: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(n);
    start_mid_page(&mut b);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_mid_page_within_their_allocation() {
        for n in [4097, 65_536, 1 << 20] {
            let b = buffer(n);
            assert_eq!(b.as_ptr() as usize % PAGE, OFFSET, "{n}");
            assert!(
                b.capacity() > n - SLACK && b.capacity() <= n,
                "{n}: {}",
                b.capacity()
            );
            assert!(b.is_empty());
        }
        // Too small to give anything up: left where it is, all its room kept.
        let b = buffer(16);
        assert!(b.capacity() >= 16);
    }

    #[test]
    fn a_reclaimed_buffer_starts_at_the_same_place() {
        let mut b = buffer(1 << 20);
        let first = b.as_ptr();
        let room = b.capacity();
        b.extend_from_slice(&[7; 1000]);
        drop(b.split());
        // The piece is gone: reserving takes the allocation back from its start, and the
        // buffer moves to the same mid-page spot (one allocation per upload, as body.rs
        // relies on).
        b.reserve(room);
        start_mid_page(&mut b);
        assert_eq!(b.as_ptr(), first);
        assert_eq!(b.capacity(), room);
        // Still held: a new allocation, moved too.
        b.extend_from_slice(&[7; 1000]);
        let held = b.split();
        b.reserve(room);
        start_mid_page(&mut b);
        assert_eq!(b.as_ptr() as usize % PAGE, OFFSET);
        assert!(b.capacity() > room - SLACK);
        drop(held);
    }
}
