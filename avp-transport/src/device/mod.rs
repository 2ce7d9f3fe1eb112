//! Device memory for the `cuda` transport: which device an endpoint uses
//! ([`Device`]), spans of device memory ([`DeviceSpan`]), and the operations a
//! transport needs from a device (the crate-private [`DeviceMem`]), with two
//! backends:
//!
//! - `cuda` (cargo feature `cuda`): the CUDA virtual-memory API. A pool is one
//!   `cuMemCreate` allocation exportable as a POSIX file descriptor; the peer
//!   imports and maps it once per session.
//! - `emulated` (always built): host memory standing in for a device. A pool
//!   is a sealed memfd, copies are `memcpy`, synchronisation is a no-op. It runs
//!   the whole protocol (descriptor passing, mapping, slot life cycle) in CI on
//!   machines without a GPU. It is only ever chosen explicitly
//!   ([`Device::Emulated`]) and every session using it says so in
//!   `Session::explain`.

#[cfg(target_os = "linux")]
pub(crate) mod buffer;
#[cfg(all(feature = "cuda", target_os = "linux"))]
mod cuda;
#[cfg(target_os = "linux")]
mod host;
pub(crate) mod loan;
#[cfg(target_os = "linux")]
pub(crate) mod pool;
#[cfg(target_os = "linux")]
pub(crate) mod scheme;

use std::os::fd::OwnedFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// The device an endpoint keeps messages on (see `Options::device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Device {
    /// An NVIDIA GPU, by ordinal as this process numbers them (after
    /// `CUDA_VISIBLE_DEVICES`). Needs the `cuda` feature and a driver with
    /// virtual-memory management and POSIX file-descriptor handles.
    Cuda(u32),
    /// Host memory standing in for a device: for tests and machines without a
    /// GPU. Both ends must choose it; sessions report it as emulated.
    Emulated,
}

impl std::str::FromStr for Device {
    type Err = String;

    /// `emulated`, `cuda` (GPU 0) or `cuda:N`.
    fn from_str(s: &str) -> std::result::Result<Device, String> {
        match s {
            "emulated" => Ok(Device::Emulated),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("device {s:?}: expected emulated, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Emulated => f.write_str("emulated"),
        }
    }
}

/// A range of device memory: an address in the device's address space (a
/// CUDA device pointer; a host address under [`Device::Emulated`]) and a
/// length. Only device copies and kernels may touch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSpan {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

impl DeviceSpan {
    /// The `len` bytes at `offset` into this span, if they lie inside it.
    pub fn sub(&self, offset: u64, len: u64) -> Option<DeviceSpan> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then(|| DeviceSpan {
            addr: self.addr + offset,
            len,
        })
    }
}

/// What an endpoint tells its peer about its device, in the handshake.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct DeviceInfo {
    /// "cuda" or "emulated".
    pub backend: String,
    /// The device's UUID (CUDA), or an id of the host (emulated).
    pub uuid: String,
    /// Human-readable name, for explanations.
    pub name: String,
}

/// Which way a copy goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    /// Host memory into device memory.
    HostToDevice,
    /// Device memory into host memory.
    DeviceToHost,
    /// Device memory into device memory.
    DeviceToDevice,
}

/// Device memory that this process allocated or imported; released on drop.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))] // the backends are Linux-only
pub(crate) trait Region: Send + Sync {
    /// Start address on the device.
    fn addr(&self) -> u64;
    /// Length in bytes (a whole number of the device's granularity).
    fn len(&self) -> usize;
    /// A descriptor a peer on this host can import (allocated regions only).
    fn export(&self) -> Result<OwnedFd>;
    /// The region as a dma-buf descriptor, for an RDMA NIC to register
    /// (GPUDirect RDMA); an error where the device has none.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    fn dmabuf(&self) -> Result<OwnedFd> {
        Err(crate::error::TransportError::device(
            "dma-buf",
            "this device's memory cannot be exported as a dma-buf",
        ))
    }
}

/// What a transport needs from a device.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))] // the backends are Linux-only
pub(crate) trait DeviceMem: Send + Sync {
    /// Which device this is.
    fn device(&self) -> Device;
    /// What to tell the peer.
    fn info(&self) -> DeviceInfo;
    /// Whether memory this end exports can be mapped and read by the peer
    /// whose device is `peer`: `Ok(why)` or `Err(why not)`.
    fn reach(&self, peer: &DeviceInfo) -> std::result::Result<String, String>;
    /// Allocation granularity (sizes are rounded up to it).
    fn granularity(&self) -> usize;
    /// A new exportable allocation of at least `len` bytes (rounded up).
    fn alloc(&self, len: usize) -> Result<Box<dyn Region>>;
    /// Map a peer's exported allocation of `len` bytes (as the peer's
    /// `Region::len`), read-only where the device allows.
    fn import(&self, fd: OwnedFd, len: usize) -> Result<Box<dyn Region>>;
    /// Copy `len` bytes from `src` to `dst` in direction `dir`, on this end's
    /// stream; finished only after [`sync`](Self::sync).
    ///
    /// # Safety
    /// `src` must be `len` readable bytes and `dst` `len` writable bytes of
    /// the memory `dir` names (host pointers as integers for the host side),
    /// unused by anyone else until the copy is synchronised.
    unsafe fn copy(&self, dst: u64, src: u64, len: usize, dir: Dir) -> Result<()>;
    /// Wait until every copy issued so far has finished.
    fn sync(&self) -> Result<()>;
}

/// Open `device` for this process.
#[cfg(target_os = "linux")]
pub(crate) fn open(device: Device) -> Result<Arc<dyn DeviceMem>> {
    match device {
        Device::Emulated => Ok(Arc::new(host::HostMem::new())),
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => Ok(Arc::new(cuda::CudaVmm::open(ordinal)?)),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(ordinal) => Err(crate::error::TransportError::device(
            "open",
            format!(
                "cuda:{ordinal} needs avp built with the `cuda` feature; this build has none \
                 (Device::Emulated stands in for tests)"
            ),
        )),
    }
}

/// Open `device` for this process.
#[cfg(not(target_os = "linux"))]
pub(crate) fn open(device: Device) -> Result<Arc<dyn DeviceMem>> {
    Err(crate::error::TransportError::device(
        "open",
        format!("{device}: device transports need Linux (file-descriptor passing, memfd)"),
    ))
}

/// `n` rounded up to a multiple of `g` (a power of two or any positive size).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(crate) fn round_up(n: usize, g: usize) -> Option<usize> {
    n.max(1).checked_next_multiple_of(g.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_spans_stay_inside() {
        let s = DeviceSpan {
            addr: 0x1000,
            len: 100,
        };
        assert_eq!(
            s.sub(10, 90),
            Some(DeviceSpan {
                addr: 0x100a,
                len: 90
            })
        );
        assert_eq!(s.sub(10, 91), None);
        assert_eq!(s.sub(u64::MAX, 2), None);
        assert_eq!(round_up(0, 4096), Some(4096));
        assert_eq!(round_up(4097, 4096), Some(8192));
        assert_eq!(round_up(usize::MAX, 4096), None);
    }
}
