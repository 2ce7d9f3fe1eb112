//! The sending half of a session: [`Sender`], and the type states of a message
//! written in place, [`Loan`] → [`Ready`].

use avp_wire::{Message, MessageLayout, MessageWriter, checksum};

use std::sync::Arc;

use crate::device::loan::DeviceLoan;
use crate::device::{Device, DeviceMem};
use crate::error::{Result, TransportError};
use crate::port::{LoanMem, SendPort, Stats};
use crate::session::Session;

/// The sending half of a session.
pub struct Sender {
    pub(crate) session: Session,
    pub(crate) port: Box<dyn SendPort>,
    /// `Options::device`, opened on first use when the port has none.
    device: Option<Device>,
    opened: Option<Arc<dyn DeviceMem>>,
}

impl Sender {
    pub(crate) fn new(session: Session, port: Box<dyn SendPort>, device: Option<Device>) -> Sender {
        let opened = port.device();
        Sender {
            session,
            port,
            device,
            opened,
        }
    }

    /// The device to copy from: the session's, else `Options::device` opened.
    fn device_mem(&mut self) -> Result<Arc<dyn DeviceMem>> {
        if let Some(d) = &self.opened {
            return Ok(Arc::clone(d));
        }
        let device = self.device.ok_or_else(|| TransportError::InvalidOption {
            option: "device",
            reason: "loan_device needs Options::device (the device the sections come from)".into(),
        })?;
        let d = crate::device::open(device)?;
        self.opened = Some(Arc::clone(&d));
        Ok(d)
    }

    /// Borrow memory for one message laid out by `layout` whose sections come
    /// from device memory (see [`DeviceLoan`]): a device slot on a `cuda`
    /// session, else host memory that the sections are copied into.
    ///
    /// # Errors
    /// `InvalidOption` without `Options::device`; then as [`loan`](Self::loan).
    pub fn loan_device<'a>(&'a mut self, layout: &'a MessageLayout) -> Result<DeviceLoan<'a>> {
        let len = layout.total_len();
        self.check(len as u64)?;
        let dev = self.device_mem()?;
        let prefix_len = layout.sections().next().map_or(len, |s| s.offset as usize);
        let loan = match self.port.acquire_device(len, prefix_len)? {
            // The device slot takes the sections; the header is written at
            // `finish`, so the loan has no writer.
            Some(mem) => Loan {
                port: Some(&mut *self.port),
                mem: Some(mem),
                writer: None,
            },
            None => {
                let mem = self
                    .port
                    .acquire(len, true)?
                    .expect("a waiting acquire yields memory");
                self.loan_in(layout, mem)?
            }
        };
        Ok(DeviceLoan {
            loan: Some(loan),
            layout,
            dev,
            written: vec![false; layout.section_count()],
            failed: None,
        })
    }

    /// The device message sections come from ([`Options::device`](crate::Options::device)),
    /// when one was given: [`loan_device`](Self::loan_device) needs it.
    pub fn device(&self) -> Option<Device> {
        self.device
    }

    /// What was negotiated.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Address range of memory shared with the receiver (shared memory only).
    pub fn pool_range(&self) -> Option<std::ops::Range<usize>> {
        self.port.pool_range()
    }

    /// What this end has done so far, by path taken.
    pub fn stats(&self) -> Stats {
        self.port.stats().snapshot()
    }

    /// `Err` unless the session is alive and `len` bytes fit its limit.
    pub(crate) fn check(&self, len: u64) -> Result<()> {
        self.session.check_alive()?;
        if len > self.session.max_message {
            return Err(TransportError::TooLarge {
                size: len,
                limit: self.session.max_message,
            });
        }
        Ok(())
    }

    /// Borrow memory for one message laid out by `layout`: a shared-memory slot
    /// (waiting for one while all are in flight), or a pooled buffer on TCP.
    ///
    /// # Errors
    /// `TooLarge` or `SessionExpired` before anything is borrowed; `Timeout`
    /// when no slot frees up within `ShmOptions::loan_timeout`; `PeerGone`.
    pub fn loan<'a>(&'a mut self, layout: &'a MessageLayout) -> Result<Loan<'a>> {
        let len = layout.total_len();
        self.check(len as u64)?;
        let mem = self
            .port
            .acquire(len, true)?
            .expect("a waiting acquire yields memory");
        self.loan_in(layout, mem)
    }

    /// A loan over memory already obtained for `layout`.
    pub(crate) fn loan_in<'a>(
        &'a mut self,
        layout: &'a MessageLayout,
        mem: LoanMem,
    ) -> Result<Loan<'a>> {
        let len = layout.total_len();
        let mem = self.fits(mem, len)?;
        // SAFETY: `mem` is exclusively ours until published or abandoned, spans at
        // least `len` bytes (checked above), and its memory (pool mapping,
        // dedicated mapping or heap buffer) does not move and outlives the loan.
        let bytes = unsafe { std::slice::from_raw_parts_mut(mem.ptr(), len) };
        let mut writer = match layout.writer(bytes) {
            Ok(w) => w,
            Err(e) => {
                self.port.abandon(mem);
                return Err(e.into());
            }
        };
        if self.port.receiver_shares_host() && checksum::max_threads() == 0 {
            // The receiver waits awake on this host: copies and checksums leave it
            // a core (on 2 cores, helper threads would preempt it and add
            // microseconds to every large handoff).
            writer.set_max_threads(checksum::cores().saturating_sub(1).max(1));
        }
        Ok(Loan {
            port: Some(&mut *self.port),
            mem: Some(mem),
            writer: Some(writer),
        })
    }

    /// Send a message that is already encoded (it is parsed, not verified, first).
    ///
    /// # Errors
    /// `Wire` for bytes that are not a v2 message; then as [`loan`](Self::loan).
    pub fn send_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        Message::parse(bytes)?;
        self.check(bytes.len() as u64)?;
        let mem = self
            .port
            .acquire(bytes.len(), true)?
            .expect("a waiting acquire yields memory");
        let mem = self.copy_in(mem, bytes)?;
        self.port.publish(mem, bytes.len())
    }

    /// `mem` if it holds `len` bytes; otherwise it goes back and the error says why.
    fn fits(&mut self, mem: LoanMem, len: usize) -> Result<LoanMem> {
        if mem.capacity() >= len {
            return Ok(mem);
        }
        let cap = mem.capacity();
        self.port.abandon(mem);
        Err(TransportError::Protocol(format!(
            "the transport loaned {cap} bytes for a message of {len}"
        )))
    }

    /// Copy `bytes` into `mem` and stage them: ready to publish.
    pub(crate) fn copy_in(&mut self, mem: LoanMem, bytes: &[u8]) -> Result<LoanMem> {
        let mem = self.fits(mem, bytes.len())?;
        // SAFETY: the loaned memory is ours and at least bytes.len() long (checked).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), mem.ptr(), bytes.len()) };
        self.port.stage(&mem, bytes.len());
        Ok(mem)
    }

    /// Send a message from the caller's section buffers: copied once into a slot
    /// (shared memory) or written with vectored I/O straight from them (TCP).
    ///
    /// # Errors
    /// `Wire` when the buffers do not match the layout; then as [`loan`](Self::loan).
    pub fn send_sections(&mut self, layout: &MessageLayout, sections: &[&[u8]]) -> Result<()> {
        if !self.port.vectored() {
            let mut loan = self.loan(layout)?;
            loan.writer().write_sections(sections)?;
            return loan.finish()?.send();
        }
        self.check(layout.total_len() as u64)?;
        if sections.len() != layout.section_count()
            || sections
                .iter()
                .zip(layout.sections())
                .any(|(s, sp)| s.len() as u64 != sp.len)
        {
            return Err(TransportError::Wire(avp_wire::WireError::BadSection {
                index: 0,
                reason: format!(
                    "section buffers do not match the layout ({} given, {} expected, or a length differs)",
                    sections.len(),
                    layout.section_count()
                ),
            }));
        }
        let crcs = checksum::crc_many(sections);
        let prefix = layout.prefix(&crcs)?;
        let parts: Vec<(u64, &[u8])> = layout
            .sections()
            .zip(sections)
            .map(|(sp, s)| (sp.offset, *s))
            .collect();
        self.port
            .send_parts(&prefix, &parts)
            .expect("a vectored port sends parts")
    }
}

/// Memory loaned for one message, being written.
///
/// Write every section (through [`writer`](Self::writer)), then
/// [`finish`](Self::finish) to get a [`Ready`] message that can be sent. Dropping
/// a loan returns the memory unsent.
pub struct Loan<'a> {
    pub(crate) port: Option<&'a mut dyn SendPort>,
    pub(crate) mem: Option<LoanMem>,
    pub(crate) writer: Option<MessageWriter<'a>>,
}

impl<'a> Loan<'a> {
    /// The writer over the loaned memory (sections in place).
    pub fn writer(&mut self) -> &mut MessageWriter<'a> {
        self.writer.as_mut().expect("writer present until finish")
    }

    /// Checksum, write the header, and validate: the message can now be sent.
    ///
    /// # Errors
    /// `Wire` when a section was not written (the memory goes back unsent).
    pub fn finish(mut self) -> Result<Ready<'a>> {
        let writer = self.writer.take().expect("writer present until finish");
        let len = writer.layout().total_len();
        let bytes = writer.seal()?;
        // Validated from a private copy of the header: the loaned memory may be
        // shared, and reading a header twice where someone else can write it
        // (check, then use) is how parsers get fooled.
        let prefix = crate::receiver::copy_prefix(bytes)?;
        Message::parse_split(&prefix, bytes)?;
        Ok(self.ready(len))
    }

    /// Stage the finished `len` bytes in the loaned memory: a message ready to send.
    pub(crate) fn ready(mut self, len: usize) -> Ready<'a> {
        let port = self.port.take().expect("port present until finish");
        let mem = self.mem.take().expect("memory present until finish");
        port.stage(&mem, len);
        Ready {
            port,
            mem: Some(mem),
            len,
        }
    }
}

impl Drop for Loan<'_> {
    fn drop(&mut self) {
        self.writer.take();
        if let (Some(port), Some(mem)) = (self.port.take(), self.mem.take()) {
            port.abandon(mem);
        }
    }
}

/// A finished message in loaned memory, ready to send.
pub struct Ready<'a> {
    pub(crate) port: &'a mut dyn SendPort,
    pub(crate) mem: Option<LoanMem>,
    pub(crate) len: usize,
}

impl Ready<'_> {
    /// Bytes of the message.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the message is empty (never: a message has at least a preamble).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hand the message to the receiver.
    ///
    /// # Errors
    /// `PeerGone` when the receiver left; `Io` on a socket error (TCP).
    pub fn send(mut self) -> Result<()> {
        let mem = self.mem.take().expect("memory present until sent");
        self.port.publish(mem, self.len)
    }
}

impl Drop for Ready<'_> {
    fn drop(&mut self) {
        if let Some(mem) = self.mem.take() {
            self.port.abandon(mem);
        }
    }
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("session", &self.session.id)
            .field("transport", &self.session.transport)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Loan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loan")
            .field("capacity", &self.mem.as_ref().map(LoanMem::capacity))
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Ready<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ready")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}
