//! Shared-memory segments: sealed memfds, their mappings, and eventfds.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use crate::error::{Result, TransportError};

/// A memory mapping, unmapped on drop.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a mapping is plain memory; who may touch which bytes is governed by the
// slot protocol, not by the thread that holds the mapping.
unsafe impl Send for Mapping {}
// SAFETY: as for Send: a shared reference to a mapping only hands out its address.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `len` bytes of `fd` from `offset`, shared. `writable` picks PROT_WRITE;
    /// the pages are populated up front so first touches do not fault.
    pub(crate) fn map(fd: impl AsFd, offset: usize, len: usize, writable: bool) -> Result<Mapping> {
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

    /// At least `len` bytes (whole pages) of private anonymous memory,
    /// zeroed and populated up front (memory to register for RDMA).
    pub(crate) fn anonymous(len: usize) -> Result<Mapping> {
        let len = page_up(len.max(1));
        let n = NonZeroUsize::new(len).expect("at least a page");
        // SAFETY: a fresh private anonymous mapping aliases nothing.
        let p = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                n,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_POPULATE,
            )
        }
        .map_err(TransportError::errno("mmap"))?;
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// Start of the mapping.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Address range, for zero-copy checks.
    pub(crate) fn range(&self) -> std::ops::Range<usize> {
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
pub(crate) fn create_memfd(name: &str, len: usize) -> Result<OwnedFd> {
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
pub(crate) fn check_memfd(fd: &OwnedFd, len: usize) -> Result<()> {
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
pub(crate) struct Event {
    fd: OwnedFd,
}

impl Event {
    /// A new non-blocking eventfd.
    pub(crate) fn new() -> Result<Event> {
        let fd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(TransportError::errno("eventfd"))?;
        Ok(Event { fd: fd.into() })
    }

    /// Wrap a descriptor received from the peer (whatever it is, ringing it
    /// only writes 8 bytes to it and draining reads at most 8).
    pub(crate) fn from_fd(fd: OwnedFd) -> Event {
        Event { fd }
    }

    /// The descriptor.
    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Ring the bell.
    pub(crate) fn notify(&self) {
        let _ = nix::unistd::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// Clear pending rings (non-blocking).
    pub(crate) fn drain(&self) {
        let mut b = [0u8; 8];
        let _ = nix::unistd::read(&self.fd, &mut b);
    }
}

/// The size of a memory page on this host (`sysconf`), 4096 if unknown.
pub(crate) fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| usize::try_from(p).ok())
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096)
    })
}

/// `n` rounded up to a whole number of pages.
pub(crate) fn page_up(n: usize) -> usize {
    n.div_ceil(page_size()) * page_size()
}
