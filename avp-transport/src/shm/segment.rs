//! Shared-memory segments: sealed memfds, their mappings, and eventfds.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr::NonNull;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use crate::error::{Result, TransportError};

/// A memory mapping, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a mapping is plain memory; who may touch which bytes is governed by the
// slot protocol, not by the thread that holds the mapping.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Map `len` bytes of `fd` from `offset`, shared. `writable` picks PROT_WRITE;
    /// the pages are populated up front so first touches do not fault.
    pub fn map(fd: impl AsFd, offset: usize, len: usize, writable: bool) -> Result<Mapping> {
        let n = NonZeroUsize::new(len)
            .ok_or_else(|| TransportError::Segment("empty mapping".into()))?;
        let prot = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        // SAFETY: a fresh shared mapping chosen by the kernel overlaps nothing of ours;
        // the descriptor's size was checked by the caller to cover offset + len.
        let p = unsafe {
            mmap(
                None,
                n,
                prot,
                MapFlags::MAP_SHARED | MapFlags::MAP_POPULATE,
                fd,
                offset as i64,
            )
        }
        .map_err(TransportError::errno("mmap"))?;
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// Start of the mapping.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Address range, for zero-copy checks.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.ptr.as_ptr() as usize..self.ptr.as_ptr() as usize + self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap and nothing borrows the memory
        // any more (guards and loans borrow their Mapping's owner).
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// Create a sealed memfd of `len` bytes: it can never shrink or grow, so a peer that
/// maps it cannot be made to fault by truncation.
pub fn create_memfd(name: &str, len: usize) -> Result<OwnedFd> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
        .map_err(TransportError::errno("memfd_create"))?;
    nix::unistd::ftruncate(&fd, len as i64).map_err(TransportError::errno("ftruncate"))?;
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
        ),
    )
    .map_err(TransportError::errno("seal memfd"))?;
    Ok(fd)
}

/// Check a memfd received from a peer: sealed against shrinking and exactly `len` bytes.
pub fn check_memfd(fd: &OwnedFd, len: usize) -> Result<()> {
    let seals = fcntl(fd, FcntlArg::F_GET_SEALS)
        .map_err(|e| TransportError::Segment(format!("not a memfd: {e}")))?;
    let seals = SealFlag::from_bits_truncate(seals);
    if !seals.contains(SealFlag::F_SEAL_SHRINK) {
        return Err(TransportError::Segment(
            "memfd is not sealed against shrinking".into(),
        ));
    }
    let st = nix::sys::stat::fstat(fd).map_err(TransportError::errno("fstat"))?;
    if st.st_size as u64 != len as u64 {
        return Err(TransportError::Segment(format!(
            "memfd is {} bytes, expected {len}",
            st.st_size
        )));
    }
    Ok(())
}

/// An eventfd used as a doorbell.
pub struct Event {
    fd: OwnedFd,
}

impl Event {
    /// A new non-blocking eventfd.
    pub fn new() -> Result<Event> {
        // SAFETY: plain syscall; the result is checked and owned below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(TransportError::Io {
                op: "eventfd",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        Ok(Event {
            fd: unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) },
        })
    }

    /// Wrap a descriptor received from the peer.
    pub fn from_fd(fd: OwnedFd) -> Event {
        Event { fd }
    }

    /// The descriptor.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Ring the bell.
    pub fn notify(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our descriptor.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    /// Clear pending rings (non-blocking).
    pub fn drain(&self) {
        let mut b = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live buffer from our descriptor.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
    }
}
