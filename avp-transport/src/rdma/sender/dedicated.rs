//! Messages larger than a slot: a region the receiver registers for one
//! message (and for a device message, device memory for its sections), and
//! the local regions kept for the next such message.

use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Instant;

use crate::device::{DeviceSpan, Region};
use crate::error::{Result, TransportError};
use crate::frame::{Frame, FrameIo};
use crate::port::LoanMem;

use super::super::imm;
use super::super::verbs::{MemoryRegion, RemoteRegion};
use super::{DEDICATED, RdmaSender};

/// A dedicated loan's memory.
pub(super) struct DedicatedLoan {
    pub(super) local: Arc<dyn MemoryRegion>,
    pub(super) remote: RemoteRegion,
    /// A device message: its sections' local and remote regions, and the
    /// length of its host part.
    pub(super) device: Option<(Arc<dyn MemoryRegion>, RemoteRegion, usize)>,
}
impl RdmaSender {
    /// Keep a finished dedicated message's regions for the next one (the
    /// larger of each kind).
    pub(super) fn keep_spare(
        &mut self,
        host: Arc<dyn MemoryRegion>,
        device: Option<Arc<dyn MemoryRegion>>,
    ) {
        let larger = |old: &Option<Arc<dyn MemoryRegion>>, new: &Arc<dyn MemoryRegion>| {
            old.as_ref().is_none_or(|o| o.len() < new.len())
        };
        if larger(&self.spare, &host) {
            self.spare = Some(host);
        }
        if let Some(d) = device
            && larger(&self.spare_device, &d)
        {
            self.spare_device = Some(d);
        }
    }

    /// A region registered for one message of `len` bytes; with
    /// `device_prefix`, its sections in device memory and its first
    /// `device_prefix` bytes in host memory.
    pub(super) fn dedicated(
        &mut self,
        len: usize,
        wait: bool,
        device_prefix: Option<usize>,
    ) -> Result<Option<LoanMem>> {
        let deadline = Instant::now() + self.loan_timeout;
        while self.regions_live >= self.credit.len() {
            self.reap()?;
            self.read_control()?;
            if self.regions_live < self.credit.len() {
                break;
            }
            if !wait {
                return Ok(None);
            }
            if Instant::now() >= deadline {
                return Err(TransportError::Timeout(
                    self.loan_timeout,
                    "the receiver to free a dedicated region",
                ));
            }
            self.wait(deadline)?;
        }
        let id = self.next_region;
        self.next_region = (self.next_region + 1) & imm::MAX_ID;
        self.io.send_frame(
            &Frame::RdmaRegion {
                id,
                len: len as u64,
                device_prefix: device_prefix.map(|p| p as u64),
            },
            &[],
        )?;
        self.regions_live += 1;
        let host_len = device_prefix.unwrap_or(len);
        let local = match self.spare.take() {
            Some(s) if s.len() >= host_len => s,
            _ => self.verbs.alloc(host_len, false)?,
        };
        let local_device = match (device_prefix, &self.device) {
            (Some(_), Some(d)) => Some(match self.spare_device.take() {
                Some(s) if s.len() >= len => s,
                _ => {
                    let region: Arc<dyn Region> = Arc::from(d.mem.alloc(len)?);
                    self.verbs.register_device(region, d.mem.device(), false)?
                }
            }),
            _ => None,
        };
        let (remote, remote_device) = loop {
            self.reap()?;
            self.read_control()?;
            if let Some(r) = self.grants.remove(&id) {
                break r;
            }
            if Instant::now() >= deadline {
                return Err(TransportError::Timeout(
                    self.loan_timeout,
                    "the receiver to register a region for a large message",
                ));
            }
            self.wait(deadline)?;
        };
        let device_len = remote_device.map_or(len as u64, |d| d.len);
        if remote.len < host_len as u64 || device_len < len as u64 {
            return Err(self.fail(TransportError::Protocol(format!(
                "the receiver granted {} (+ {device_len} device) bytes for a {len}-byte message",
                remote.len
            ))));
        }
        let device = match (local_device, remote_device, device_prefix) {
            (Some(l), Some(r), Some(p)) => Some((l, r, p)),
            (None, None, None) => None,
            _ => {
                return Err(self.fail(TransportError::Protocol(
                    "the receiver's grant does not match the region asked for (device part)".into(),
                )));
            }
        };
        let ptr = NonNull::new(local.ptr()).expect("a registered region is never at address 0");
        let cap = local.len();
        let span = device.as_ref().map(|(l, _, _)| DeviceSpan {
            addr: l.ptr() as u64,
            len: len as u64,
        });
        let mut mem = LoanMem::new(
            ptr,
            cap,
            DEDICATED | u64::from(id),
            Some(Box::new(DedicatedLoan {
                local,
                remote,
                device,
            })),
        );
        mem.device = span;
        Ok(Some(mem))
    }
}
