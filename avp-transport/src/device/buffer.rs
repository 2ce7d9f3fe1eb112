//! [`DeviceBuffer`]: device memory owned by the caller, for tensors that are
//! not a framework's (tests, benchmarks, the C ABI's examples).

use std::sync::Arc;

use crate::error::{Result, TransportError};

use super::{Device, DeviceMem, DeviceSpan, Dir, Region};

/// A buffer of device memory on `device`, freed on drop.
///
/// ```
/// use avp_transport::{Device, DeviceBuffer};
/// let mut a = DeviceBuffer::new(Device::Emulated, 8)?;
/// a.write(&[1, 2, 3, 4, 5, 6, 7, 8])?;
/// let mut b = DeviceBuffer::new(Device::Emulated, 8)?;
/// b.copy_from(&a)?;
/// let mut out = [0u8; 8];
/// b.read(&mut out)?;
/// assert_eq!(out, [1, 2, 3, 4, 5, 6, 7, 8]);
/// # Ok::<(), avp_transport::TransportError>(())
/// ```
pub struct DeviceBuffer {
    mem: Arc<dyn DeviceMem>,
    region: Box<dyn Region>,
    len: usize,
    device: Device,
}

impl DeviceBuffer {
    /// `len` bytes (contents unspecified) on `device`.
    ///
    /// # Errors
    /// `Device` when the device cannot be opened or the memory allocated.
    pub fn new(device: Device, len: usize) -> Result<DeviceBuffer> {
        let mem = super::open(device)?;
        let region = mem.alloc(len)?;
        Ok(DeviceBuffer {
            mem,
            region,
            len,
            device,
        })
    }

    /// The device.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The device's name (a GPU's model, or the emulation's).
    pub fn device_name(&self) -> String {
        self.mem.info().name
    }

    /// Where the buffer is.
    pub fn span(&self) -> DeviceSpan {
        DeviceSpan {
            addr: self.region.addr(),
            len: self.len as u64,
        }
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, n: usize) -> Result<()> {
        if n > self.len {
            return Err(TransportError::Placement(format!(
                "{n} bytes do not fit a device buffer of {}",
                self.len
            )));
        }
        Ok(())
    }

    /// Copy `src` (host) to the start of the buffer.
    pub fn write(&mut self, src: &[u8]) -> Result<()> {
        self.check(src.len())?;
        // SAFETY: the buffer holds at least src.len() bytes (checked) and is
        // ours (`&mut self`); `src` is borrowed until the sync below.
        unsafe {
            self.mem.copy(
                self.region.addr(),
                src.as_ptr() as u64,
                src.len(),
                Dir::HostToDevice,
            )
        }?;
        self.mem.sync()
    }

    /// Copy the start of the buffer into `dst` (host).
    pub fn read(&self, dst: &mut [u8]) -> Result<()> {
        self.check(dst.len())?;
        // SAFETY: as in `write`, the other way; `dst` is borrowed mutably
        // until the sync below.
        unsafe {
            self.mem.copy(
                dst.as_mut_ptr() as u64,
                self.region.addr(),
                dst.len(),
                Dir::DeviceToHost,
            )
        }?;
        self.mem.sync()
    }

    /// Copy all of `src` (device) to the start of this buffer, device to
    /// device, and wait for it.
    pub fn copy_from(&mut self, src: &DeviceBuffer) -> Result<()> {
        self.check(src.len)?;
        if src.device != self.device {
            return Err(TransportError::Placement(format!(
                "copy from {} into {}: buffers on different devices",
                src.device, self.device
            )));
        }
        // SAFETY: both regions are live allocations of at least src.len bytes
        // on this device; `self` is exclusively borrowed, `src` shared.
        unsafe {
            self.mem.copy(
                self.region.addr(),
                src.region.addr(),
                src.len,
                Dir::DeviceToDevice,
            )
        }?;
        self.mem.sync()
    }
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("device", &self.device)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}
