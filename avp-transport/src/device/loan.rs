//! A message whose sections come from device memory: [`DeviceLoan`] →
//! [`Ready`].
//!
//! On a `cuda` session the sections go into a device slot: the caller's
//! kernels write them in place ([`DeviceLoan::section`]) or the loan copies
//! them device to device ([`DeviceLoan::write_from_device`]); no byte crosses
//! to the host. On any other session the same calls copy the sections into
//! the host loan (device to host, counted in `Stats::device_to_host_bytes`)
//! and the message is an ordinary checksummed one: a GPU agent can always
//! talk to a CPU agent.
//!
//! Synchronisation contract: before [`DeviceLoan::finish`], the caller's own
//! work that writes the sections, or the buffers copied from, has finished
//! (synchronise your stream or event); `finish` then waits for the loan's
//! copies, writes the header on the host, and the message can be sent.

use std::sync::Arc;

use avp_wire::MessageLayout;

use crate::error::{Result, TransportError};
use crate::port::Counters;
use crate::sender::{Loan, Ready};

use super::{DeviceMem, DeviceSpan, Dir};

/// A loan for a message whose sections are written from device memory.
///
/// It wraps an ordinary [`Loan`]: on a device session its memory is a host
/// slot for the header plus a device slot (`LoanMem::device`) and it has no
/// writer; elsewhere it is the usual host loan with its writer.
pub struct DeviceLoan<'a> {
    /// `None` once finished.
    pub(crate) loan: Option<Loan<'a>>,
    pub(crate) layout: &'a MessageLayout,
    pub(crate) dev: Arc<dyn DeviceMem>,
    /// Device sessions: which sections were written.
    pub(crate) written: Vec<bool>,
    /// Why a copy into the loan failed: the message may hold stale bytes and
    /// is never finished.
    pub(crate) failed: Option<String>,
}

impl<'a> DeviceLoan<'a> {
    fn inner(&self) -> &Loan<'a> {
        self.loan.as_ref().expect("loan present until finish")
    }

    fn inner_mut(&mut self) -> &mut Loan<'a> {
        self.loan.as_mut().expect("loan present until finish")
    }

    /// Whether the sections go to device memory (a `cuda` session); `false`
    /// when the session keeps messages in host memory and the copies below
    /// cross to the host (`Session::explain` says why).
    pub fn on_device(&self) -> bool {
        self.device_base().is_some()
    }

    fn device_base(&self) -> Option<DeviceSpan> {
        self.inner().mem.as_ref().and_then(|m| m.device)
    }

    fn counters(&self) -> &Counters {
        self.inner()
            .port
            .as_deref()
            .expect("port present until finish")
            .stats()
    }

    /// Offset and length of section `index`.
    fn span(&self, index: usize) -> Result<(u64, u64)> {
        if index >= self.layout.section_count() {
            return Err(TransportError::Wire(avp_wire::WireError::BadSection {
                index,
                reason: format!(
                    "no such section; the message has {}",
                    self.layout.section_count()
                ),
            }));
        }
        let s = self.layout.section(index);
        Ok((s.offset, s.len))
    }

    /// Where section `index` lives in device memory, for the caller's kernels
    /// or copies to write (it counts as written). Only on a device session.
    ///
    /// # Errors
    /// `Placement` when the session keeps messages in host memory (use
    /// [`write_from_device`](Self::write_from_device), which copies).
    pub fn section(&mut self, index: usize) -> Result<DeviceSpan> {
        let span = self.device_span(index)?;
        self.written[index] = true;
        Ok(span)
    }

    /// Where section `index` lives in device memory (not marked written).
    fn device_span(&self, index: usize) -> Result<DeviceSpan> {
        let (offset, len) = self.span(index)?;
        let base = self.device_base().ok_or_else(|| {
            TransportError::Placement(
                "this session keeps messages in host memory, so a section has no device \
                 address: copy into it with write_from_device (Session::explain says why \
                 no device pool was set up)"
                    .into(),
            )
        })?;
        Ok(base
            .sub(offset, len)
            .expect("sections lie inside the message"))
    }

    /// Remember a failed copy: the loan can then only be dropped.
    fn note<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.failed.get_or_insert_with(|| e.to_string());
        }
        r
    }

    /// Copy `src` (host memory) into section `index`.
    ///
    /// # Errors
    /// `Wire` when `src` is not the section's length; `Device` when the copy fails.
    pub fn write_from_host(&mut self, index: usize, src: &[u8]) -> Result<()> {
        let (_, len) = self.span(index)?;
        check_len(index, len, src.len() as u64)?;
        if !self.on_device() {
            return Ok(self.inner_mut().writer().write_section(index, src)?);
        }
        let dst = self.device_span(index)?;
        // SAFETY: `dst` is the section's range of our device slot, `src` is
        // `len` readable host bytes borrowed until the copy is synchronised
        // right after (the borrow of `src` ends with this call).
        let copied = unsafe {
            self.dev
                .copy(dst.addr, src.as_ptr() as u64, src.len(), Dir::HostToDevice)
        }
        .and_then(|()| self.dev.sync());
        self.note(copied)?;
        self.written[index] = true;
        self.counters().copied(Dir::HostToDevice, len);
        Ok(())
    }

    /// Copy section `index` from `src`, a device address holding the
    /// section's length in bytes: device to device on a device session,
    /// device to host otherwise. The copy is issued on the loan's stream and
    /// finished by [`finish`](Self::finish).
    ///
    /// # Safety
    /// `src` must be readable device memory of the section's length on the
    /// session's device, finished by the caller's own work, and not written
    /// until `finish` returns.
    pub unsafe fn write_from_device(&mut self, index: usize, src: u64) -> Result<()> {
        let (_, len) = self.span(index)?;
        let on_device = self.on_device();
        let (dst, dir) = match on_device {
            true => (self.device_span(index)?.addr, Dir::DeviceToDevice),
            false => {
                let host = self.inner_mut().writer().section_mut(index)?;
                (host.as_mut_ptr() as u64, Dir::DeviceToHost)
            }
        };
        // SAFETY: `dst` is the section's range in our loan (host bytes of
        // the writer, or our device slot), exclusively ours until the loan
        // ends; `src` is the caller's promise.
        let copied = unsafe { self.dev.copy(dst, src, len as usize, dir) };
        self.note(copied)?;
        if on_device {
            self.written[index] = true;
        }
        self.counters().copied(dir, len);
        Ok(())
    }

    /// Wait for the loan's copies, write the header (on the host), and
    /// validate: the message can now be sent.
    ///
    /// # Errors
    /// `Wire` when a section was not written; `Device` when a copy failed
    /// (now or earlier: a loan with a failed copy is never sent). The memory
    /// goes back unsent either way.
    pub fn finish(mut self) -> Result<Ready<'a>> {
        let synced = self.dev.sync();
        self.note(synced)?;
        if let Some(why) = &self.failed {
            return Err(TransportError::device(
                "finish",
                format!("a copy into this loan failed earlier ({why}); it is not sent"),
            ));
        }
        let on_device = self.on_device();
        let loan = self.loan.take().expect("loan present until finish");
        if !on_device {
            return loan.finish();
        }
        if let Some(i) = self.written.iter().position(|w| !w) {
            let s = self.layout.section(i);
            return Err(avp_wire::WireError::SectionNotWritten {
                index: i,
                name: s.role.describe(s.layer),
            }
            .into());
        }
        let prefix = self.layout.device_prefix()?;
        let mem = loan.mem.as_ref().expect("memory present until finish");
        // SAFETY: the host part of a device loan is a slot of at least the
        // prefix's length (checked by the port), exclusively ours.
        let host = unsafe { std::slice::from_raw_parts_mut(mem.ptr(), prefix.len()) };
        // Checked in private memory, then written to the (shared) slot.
        avp_wire::Header::parse(&prefix)?;
        host.copy_from_slice(&prefix);
        Ok(loan.ready(self.layout.total_len()))
    }
}

fn check_len(index: usize, expected: u64, found: u64) -> Result<()> {
    if expected == found {
        return Ok(());
    }
    Err(TransportError::Wire(avp_wire::WireError::BadSection {
        index,
        reason: format!("section is {expected} bytes, {found} given"),
    }))
}

impl Drop for DeviceLoan<'_> {
    fn drop(&mut self) {
        if self.loan.is_some() {
            // Copies still in flight must land before the loan's memory goes
            // back (the inner loan gives it back as it drops).
            let _ = self.dev.sync();
        }
    }
}

impl std::fmt::Debug for DeviceLoan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLoan")
            .field("on_device", &(self.loan.is_some() && self.on_device()))
            .finish_non_exhaustive()
    }
}
