//! Page-aligned, pre-faulted buffers, reused across messages.

/// The page size buffers are aligned to (alignment only: a larger host page
/// just means more than one buffer page per host page).
const ALIGN: usize = 4096;

/// A page-aligned heap buffer whose pages were touched once at allocation.
pub(crate) struct PageBuf {
    storage: Vec<u8>,
    offset: usize,
    cap: usize,
}

impl PageBuf {
    /// A buffer of at least `cap` bytes.
    pub(crate) fn new(cap: usize) -> PageBuf {
        let cap = cap.max(1).div_ceil(ALIGN) * ALIGN;
        let mut storage = vec![0u8; cap + ALIGN];
        let offset = storage.as_ptr().align_offset(ALIGN);
        // Touch every page now: first-touch faults cost ~30x a memcpy on small VMs.
        storage[offset..]
            .iter_mut()
            .step_by(ALIGN)
            .for_each(|b| *b = 0);
        PageBuf {
            storage,
            offset,
            cap,
        }
    }

    /// Usable bytes.
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// The first `len` bytes.
    pub(crate) fn slice(&self, len: usize) -> &[u8] {
        &self.storage[self.offset..self.offset + len]
    }

    /// The first `len` bytes, writable.
    pub(crate) fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + len]
    }

    /// Start of the buffer.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.slice_mut(0).as_mut_ptr()
    }

    /// A buffer of at least `cap` bytes holding this one's first `keep` bytes.
    pub(crate) fn grown(&self, cap: usize, keep: usize) -> PageBuf {
        let mut b = PageBuf::new(cap);
        b.slice_mut(keep).copy_from_slice(self.slice(keep));
        b
    }
}

/// A small stack of reusable buffers.
#[derive(Default)]
pub(crate) struct BufPool {
    free: Vec<PageBuf>,
}

/// Buffers kept for reuse.
const KEPT: usize = 2;

impl BufPool {
    /// A buffer of at least `len` bytes, reused when one is big enough.
    pub(crate) fn take(&mut self, len: usize) -> PageBuf {
        match self.free.iter().position(|b| b.capacity() >= len) {
            Some(i) => self.free.swap_remove(i),
            None => PageBuf::new(len),
        }
    }

    /// A buffer to start receiving `len` bytes into: one of at least `len`
    /// bytes when the pool has it, else the largest kept, else a new one of at
    /// most `first` bytes (the receiver grows it as bytes arrive).
    pub(crate) fn take_to_fill(&mut self, len: usize, first: usize) -> PageBuf {
        let fits = self.free.iter().position(|b| b.capacity() >= len);
        let largest = (0..self.free.len()).max_by_key(|&i| self.free[i].capacity());
        match fits.or(largest) {
            Some(i) => self.free.swap_remove(i),
            None => PageBuf::new(len.min(first)),
        }
    }

    /// Keep a buffer for later (the largest few are kept).
    pub(crate) fn give(&mut self, b: PageBuf) {
        self.free.push(b);
        if self.free.len() > KEPT {
            let smallest = (0..self.free.len())
                .min_by_key(|&i| self.free[i].capacity())
                .expect("not empty");
            self.free.swap_remove(smallest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_grow_keeping_their_bytes_and_the_largest_are_kept() {
        let mut b = PageBuf::new(10);
        assert_eq!(b.capacity(), ALIGN);
        assert_eq!(b.as_mut_ptr() as usize % ALIGN, 0);
        b.slice_mut(3).copy_from_slice(b"abc");
        let g = b.grown(3 * ALIGN, 3);
        assert_eq!(g.slice(3), b"abc");
        assert_eq!(g.capacity(), 3 * ALIGN);
        let mut pool = BufPool::default();
        for cap in [1, 5, 3] {
            pool.give(PageBuf::new(cap * ALIGN));
        }
        assert_eq!(pool.take_to_fill(100 * ALIGN, ALIGN).capacity(), 5 * ALIGN);
        assert_eq!(pool.take_to_fill(2 * ALIGN, ALIGN).capacity(), 3 * ALIGN);
        assert_eq!(pool.take_to_fill(2 * ALIGN, ALIGN).capacity(), ALIGN);
    }
}
