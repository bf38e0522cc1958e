//! The main channel's read buffers, kept across the migrations of a listener.
//!
//! Each migration used to allocate its 1 MiB read buffer afresh. The allocator hands such a
//! block out as untouched memory (a new mapping, or heap pages it gave back to the kernel when
//! the last one was freed), so the bytes of every migration were written into pages the kernel
//! first had to fault in and zero: about one fault per 4 KiB received, and the device-state tail
//! (tens of KiB, while both QEMUs are stopped) paid its share on the switchover. A buffer given
//! back at the end of a migration keeps its pages; the next migration reads into them.
//!
//! Budget: at most [`KEPT`] buffers per listener, each kept only if nothing else refers to it any
//! more and it is at most [`MAX_KEPT_BYTES`] (a held device phase may have grown it).

use std::sync::{Arc, Mutex, PoisonError};

use bytes::BytesMut;

/// Buffers kept per listener (more migrations at once allocate their own).
pub const KEPT: usize = 4;
/// Largest buffer kept.
pub const MAX_KEPT_BYTES: usize = 2 * super::pump::READ_BUFFER_BYTES;

/// A listener's kept read buffers: a cheap handle, shared by its migrations.
#[derive(Debug, Clone, Default)]
pub struct ReadBuffers {
    kept: Arc<Mutex<Vec<BytesMut>>>,
}

impl ReadBuffers {
    /// A kept buffer (empty, its pages already in memory), or a new one of `capacity` bytes.
    pub fn take(&self, capacity: usize) -> BytesMut {
        self.kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(capacity))
    }

    /// Keep `buffer` for the next migration if nothing refers to its memory any more (every
    /// frame cut from it has been written and dropped) and the budget allows; otherwise it is
    /// freed. Returns whether it was kept.
    pub fn give_back(&self, mut buffer: BytesMut, capacity: usize) -> bool {
        buffer.clear();
        // Succeeds, without allocating, only when this handle is the allocation's last one.
        if !buffer.try_reclaim(capacity) || buffer.capacity() > MAX_KEPT_BYTES {
            return false;
        }
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.len() >= KEPT {
            return false;
        }
        kept.push(buffer);
        true
    }

    /// How many buffers are kept.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: usize = 64 * 1024;

    #[test]
    fn a_buffer_comes_back_with_its_memory() {
        let buffers = ReadBuffers::default();
        let mut buffer = buffers.take(SIZE);
        buffer.extend_from_slice(&[7; 1000]);
        let first = buffer.as_ptr();
        // Frames cut from it and dropped, as after a migration whose output was written.
        drop(buffer.split_to(600).freeze());
        assert!(buffers.give_back(buffer, SIZE));
        assert_eq!(buffers.kept(), 1);
        let again = buffers.take(SIZE);
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), first, "the same allocation, from its start");
        assert!(again.capacity() >= SIZE);
        assert_eq!(buffers.kept(), 0);
    }

    #[test]
    fn a_buffer_still_referred_to_is_not_kept() {
        let buffers = ReadBuffers::default();
        let mut buffer = buffers.take(SIZE);
        buffer.extend_from_slice(&[7; 1000]);
        let frame = buffer.split_to(600).freeze();
        assert!(!buffers.give_back(buffer, SIZE));
        assert_eq!(buffers.kept(), 0);
        drop(frame);
    }

    #[test]
    fn the_budget_bounds_what_is_kept() {
        let buffers = ReadBuffers::default();
        let taken: Vec<BytesMut> = (0..KEPT + 2).map(|_| buffers.take(SIZE)).collect();
        let kept = taken
            .into_iter()
            .map(|buffer| buffers.give_back(buffer, SIZE))
            .filter(|kept| *kept)
            .count();
        assert_eq!(kept, KEPT);
        assert!(!buffers.give_back(BytesMut::with_capacity(MAX_KEPT_BYTES + 1), SIZE));
    }
}
