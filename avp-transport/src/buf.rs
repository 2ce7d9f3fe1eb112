//! Page-aligned, pre-faulted buffers, reused across messages.

/// A page-aligned heap buffer whose pages were touched once at allocation.
pub struct PageBuf {
    storage: Vec<u8>,
    offset: usize,
    cap: usize,
}

impl PageBuf {
    /// A buffer of at least `cap` bytes.
    pub fn new(cap: usize) -> PageBuf {
        let cap = cap.max(1).div_ceil(4096) * 4096;
        let mut storage = vec![0u8; cap + 4096];
        let offset = storage.as_ptr().align_offset(4096);
        // Touch every page now: first-touch faults cost ~30x a memcpy on small VMs.
        storage[offset..]
            .iter_mut()
            .step_by(4096)
            .for_each(|b| *b = 0);
        PageBuf {
            storage,
            offset,
            cap,
        }
    }

    /// Usable bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The first `len` bytes.
    pub fn slice(&self, len: usize) -> &[u8] {
        &self.storage[self.offset..self.offset + len]
    }

    /// The first `len` bytes, writable.
    pub fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + len]
    }

    /// Start of the buffer.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.slice_mut(0).as_mut_ptr()
    }
}

/// A small stack of reusable buffers.
#[derive(Default)]
pub struct BufPool {
    free: Vec<PageBuf>,
}

impl BufPool {
    /// A buffer of at least `len` bytes, reused when one is big enough.
    pub fn take(&mut self, len: usize) -> PageBuf {
        match self.free.iter().position(|b| b.capacity() >= len) {
            Some(i) => self.free.swap_remove(i),
            None => PageBuf::new(len),
        }
    }

    /// Keep a buffer for later (at most two are kept).
    pub fn give(&mut self, b: PageBuf) {
        if self.free.len() < 2 {
            self.free.push(b);
        }
    }
}
