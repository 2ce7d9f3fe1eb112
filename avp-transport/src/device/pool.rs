//! A session's device pool: one exportable device allocation cut into slots,
//! paired one to one with the shared-memory pool's slots. A device message
//! keeps its preamble and header in host slot `i` (the ring, doorbells and
//! slot life cycle are shared memory's) and its sections in device slot `i`,
//! at the offsets the header gives. A message larger than a device slot gets
//! a dedicated allocation, sent with its descriptor before the ring entry.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use crate::error::{Result, TransportError};
use crate::frame::{Frame, FrameIo};

use super::{DeviceMem, DeviceSpan, Region, round_up};

/// A device pool, on either end.
pub(crate) struct DevicePool {
    /// This end's device.
    pub(crate) mem: Arc<dyn DeviceMem>,
    region: Box<dyn Region>,
    slots: u32,
    slot_size: usize,
}

/// Keeps a dedicated device allocation alive with a loan or a delivery.
pub(crate) struct DeviceKeep {
    /// The allocation (the sender's, or the receiver's mapping of it).
    pub(crate) region: Box<dyn Region>,
    /// Sender: its exported descriptor, made when the loan was taken so that
    /// a failing export surfaces before the caller's work.
    pub(crate) fd: Option<OwnedFd>,
}

impl DevicePool {
    /// Allocate `slots` device slots of at least `slot_size` bytes each
    /// (rounded up to the device's granularity).
    pub(crate) fn create(
        mem: Arc<dyn DeviceMem>,
        slots: u32,
        slot_size: usize,
    ) -> Result<DevicePool> {
        let slot_size = round_up(slot_size, mem.granularity()).ok_or_else(|| {
            TransportError::InvalidOption {
                option: "device slot_size",
                reason: format!("{slot_size} bytes overflow when rounded to the granularity"),
            }
        })?;
        let total =
            slot_size
                .checked_mul(slots as usize)
                .ok_or_else(|| TransportError::InvalidOption {
                    option: "device slot_size",
                    reason: format!("{slots} slots of {slot_size} bytes overflow"),
                })?;
        let region = mem.alloc(total)?;
        Ok(DevicePool {
            mem,
            region,
            slots,
            slot_size,
        })
    }

    /// Hand the pool to the receiver: a `DevicePool` frame with its descriptor.
    pub(crate) fn send(&self, io: &mut dyn FrameIo) -> Result<()> {
        let fd = self.region.export()?;
        io.send_frame(
            &Frame::DevicePool {
                slots: self.slots,
                slot_size: self.slot_size as u64,
                len: self.region.len() as u64,
            },
            &[fd.as_raw_fd()],
        )
    }

    /// Receiver: import the pool a `DevicePool` frame announced. Its geometry
    /// must pair with the host pool's `slots` and fit the device's granularity.
    pub(crate) fn receive(
        mem: Arc<dyn DeviceMem>,
        frame: Frame,
        mut fds: Vec<OwnedFd>,
        host_slots: u32,
        max_message: u64,
    ) -> Result<DevicePool> {
        let Frame::DevicePool {
            slots,
            slot_size,
            len,
        } = frame
        else {
            return Err(TransportError::Protocol(format!(
                "expected DevicePool, got {frame:?}"
            )));
        };
        let g = mem.granularity() as u64;
        // A slot larger than the largest message would only reserve address
        // space (a granule of slack for an exporter of another granularity).
        let most = max_message
            .checked_next_multiple_of(g)
            .and_then(|n| n.checked_add(g))
            .unwrap_or(u64::MAX);
        let fits = slots == host_slots
            && slot_size > 0
            && slot_size <= most
            && slot_size.is_multiple_of(g)
            && slot_size.checked_mul(slots as u64) == Some(len)
            && len <= isize::MAX as u64;
        let (Some(fd), true, true) = (fds.pop(), fds.is_empty(), fits) else {
            return Err(TransportError::Segment(format!(
                "bad device pool: {slots} slots of {slot_size} bytes ({len} in all) for \
                 {host_slots} host slots at granularity {g}, {} descriptors",
                fds.len() + 1
            )));
        };
        let region = mem.import(fd, len as usize)?;
        Ok(DevicePool {
            mem,
            region,
            slots,
            slot_size: slot_size as usize,
        })
    }

    /// Bytes per slot.
    pub(crate) fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// The first `len` bytes of slot `index` (`len` at most the slot size).
    pub(crate) fn slot(&self, index: u32, len: usize) -> Option<DeviceSpan> {
        if index >= self.slots || len > self.slot_size {
            return None;
        }
        Some(DeviceSpan {
            addr: self.region.addr() + index as u64 * self.slot_size as u64,
            len: len as u64,
        })
    }

    /// Sender: a dedicated allocation for a message of `len` bytes, exported.
    pub(crate) fn dedicated(&self, len: usize) -> Result<(DeviceSpan, DeviceKeep)> {
        let region = self.mem.alloc(len)?;
        let fd = Some(region.export()?);
        let span = DeviceSpan {
            addr: region.addr(),
            len: len as u64,
        };
        Ok((span, DeviceKeep { region, fd }))
    }

    /// Receiver: import a dedicated allocation of `size` bytes holding a
    /// message of `len`: `size` is `len` rounded up to the granularity (one
    /// granule of slack for an exporter whose granularity differs), no more.
    pub(crate) fn import_dedicated(
        &self,
        fd: OwnedFd,
        size: u64,
        len: u64,
    ) -> Result<(DeviceSpan, DeviceKeep)> {
        let g = self.mem.granularity() as u64;
        let most = len
            .checked_next_multiple_of(g)
            .and_then(|n| n.checked_add(g));
        if len == 0 || size < len || !size.is_multiple_of(g) || most.is_none_or(|m| size > m) {
            return Err(TransportError::Segment(format!(
                "bad dedicated device region: {size} bytes for a message of {len} at granularity {g}"
            )));
        }
        let region = self.mem.import(fd, size as usize)?;
        let span = DeviceSpan {
            addr: region.addr(),
            len,
        };
        Ok((span, DeviceKeep { region, fd: None }))
    }
}
