//! Memory to register: anonymous, page-aligned mappings.

use std::ptr::NonNull;

use crate::error::{Result, TransportError};
use crate::shm::segment::page_up;

/// Anonymous page-aligned memory, unmapped when the last holder drops it
/// (a registration, or a queue-pair thread writing into it right now).
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain memory; who reads and writes it is governed by the verbs
// rules (a region is written by the NIC thread only while the owner lets the
// peer write it).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// At least `len` bytes (whole pages), zeroed.
    pub(crate) fn new(len: usize) -> Result<Mapping> {
        let len = page_up(len.max(1));
        let size = std::num::NonZeroUsize::new(len).expect("at least a page");
        use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous};
        // SAFETY: a fresh private anonymous mapping aliases nothing.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .map_err(TransportError::errno("mmap rdma region"))?;
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Mapping {
    /// Start of the memory.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes (whole pages).
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping; every user holds an Arc to it, so none is left.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
}
