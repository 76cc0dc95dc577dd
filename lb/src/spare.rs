//! Copy buffers released by idle directions, kept per thread for the next read.
//!
//! A direction gives its buffer back each time its reader has nothing more to read (so an idle
//! connection holds none), which on request/response traffic is after every message: without
//! this, each wake-up of a connection would allocate and free 64 KiB per direction. At most
//! [`KEEP`] buffers are kept per thread. Used by [`crate::proxy`].

use std::cell::RefCell;

use bytes::BytesMut;

use crate::proxy::BUF_SIZE;

pub const KEEP: usize = 8;

thread_local! {
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// A buffer with room for [`BUF_SIZE`] bytes (a kept one if any).
pub fn take() -> BytesMut {
    SPARE
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(BUF_SIZE))
}

/// Keeps an emptied buffer for [`take`] unless enough are kept (then it is freed).
pub fn put(mut buf: BytesMut) {
    if buf.capacity() == 0 {
        return;
    }
    buf.clear();
    // Only whole buffers: one whose room cannot be reclaimed without a new allocation
    // (grown or split) is freed instead.
    if buf.capacity() != BUF_SIZE {
        buf.reserve(BUF_SIZE);
        if buf.capacity() != BUF_SIZE {
            return;
        }
    }
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < KEEP {
            s.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Buf, BufMut};

    #[test]
    fn a_released_buffer_is_reused_whole_and_the_stock_is_bounded() {
        let mut b = take();
        let ptr = b.as_ptr();
        b.put_slice(&[7u8; 1000]);
        b.advance(1000);
        put(b);
        let b = take();
        assert_eq!(b.as_ptr(), ptr, "the same allocation, from its start");
        assert_eq!((b.len(), b.capacity()), (0, BUF_SIZE));
        put(BytesMut::new());
        for _ in 0..KEEP + 4 {
            put(BytesMut::with_capacity(BUF_SIZE));
        }
        assert_eq!(SPARE.with(|s| s.borrow().len()), KEEP);
        // A grown buffer is not kept.
        SPARE.with(|s| s.borrow_mut().clear());
        put(BytesMut::with_capacity(4 * BUF_SIZE));
        assert_eq!(SPARE.with(|s| s.borrow().len()), 0);
        drop(b);
    }
}
