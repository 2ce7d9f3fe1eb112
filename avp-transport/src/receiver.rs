//! The receiving half of a session: [`Receiver::recv`] (blocking),
//! [`Receiver::try_recv`] (polling), and the [`RecvGuard`] that holds a received
//! message in transport memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use avp_wire::{Header, Message, PREAMBLE_LEN, Preamble};

use crate::device::{Device, DeviceMem, DeviceSpan, Dir};
use crate::error::{Result, TransportError};
use crate::options::Options;
use crate::port::{Counters, Delivery, Held, RecvPort, Stats};
use crate::session::Session;

/// The receiving half of a session. It is `Send + Sync`: one thread may wait
/// in [`recv`](Self::recv) while others drop the guards of earlier messages,
/// and a guard may move to (and be dropped on) any thread.
///
/// ```
/// use std::time::Duration;
/// use avp_transport::{Endpoint, Options};
/// use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, MessageLayout, ModelIdentity, Payload};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let name = format!("shm://doc-receiver-{}", std::process::id());
/// let listener = Endpoint::bind(&name, &ModelIdentity::default(), Options::default())?;
/// let sender = std::thread::spawn(move || -> avp_transport::Result<()> {
///     let mut tx = Endpoint::connect(&name, &ModelIdentity::default(), Options::default())?;
///     let kv = KvCacheDesc::new(2, 1, 8, 4, DType::F16, KvLayout::Hnd);
///     let layout = MessageLayout::new(&Envelope::default(), &Payload::KvCache(kv))?;
///     let mut loan = tx.loan(&layout)?;
///     for section in loan.writer().sections_mut() {
///         section.fill(1);
///     }
///     loan.finish()?.send()
/// });
/// let rx = listener.accept(Duration::from_secs(10))?;
///
/// // Poll from your own loop (e.g. an engine's scheduler) ...
/// let guard = loop {
///     if let Some(guard) = rx.try_recv()? {
///         break guard;
///     }
///     std::hint::spin_loop();
/// };
/// assert_eq!(guard.message().section_count(), 4);
/// drop(guard); // the slot goes back to the sender
/// sender.join().unwrap()?;
///
/// // ... or block: `recv` spins for `ShmOptions::spin`, then sleeps on a doorbell.
/// assert!(rx.recv(Duration::from_millis(10)).is_err()); // the sender left
/// # Ok(())
/// # }
/// ```
pub struct Receiver {
    pub(crate) session: Session,
    pub(crate) port: Arc<dyn RecvPort>,
    check_session_ids: bool,
    /// A small valid message of this session, which the idle work delivers.
    stand_in: Vec<u8>,
}

impl Receiver {
    pub(crate) fn new(session: Session, port: Arc<dyn RecvPort>, options: &Options) -> Receiver {
        let stand_in = stand_in_message(&session.id);
        Receiver {
            session,
            port,
            check_session_ids: options.check_session_ids,
            stand_in,
        }
    }

    /// The idle work of a waiting receive (see `port::Idle`): deliver the
    /// stand-in message through the path a real one takes (header copy,
    /// validation, session checks, the guard), and drop it. Private memory;
    /// nothing is given back to the transport.
    #[inline(never)]
    fn warm(&self) {
        let (ptr, len) = (self.stand_in.as_ptr(), self.stand_in.len());
        drop(std::hint::black_box(self.guard(None, ptr, len, true, None)));
    }

    /// What was negotiated.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Address range of memory shared with the sender (shared memory only).
    pub fn pool_range(&self) -> Option<std::ops::Range<usize>> {
        self.port.pool_range()
    }

    /// What this end has done so far, by path taken.
    pub fn stats(&self) -> Stats {
        self.port.stats().snapshot()
    }

    /// Wait up to `timeout` for the next message. The guard holds the message in
    /// transport memory (a shared slot, or a pooled buffer on TCP); dropping it,
    /// on any thread, returns the memory.
    ///
    /// Over shared memory it spins for `ShmOptions::spin`, waits awake while the
    /// sender announces it is writing, else sleeps on a doorbell. Calls from
    /// several threads take turns.
    ///
    /// # Errors
    /// `Timeout`; `PeerGone` once the sender left and everything it sent was
    /// delivered; `Wire` or `WrongSession` for a message that fails validation
    /// (its memory is given back); `SessionExpired`.
    pub fn recv(&self, timeout: Duration) -> Result<RecvGuard> {
        self.session.check_alive()?;
        let d = self.port.recv(timeout, &|| self.warm())?;
        self.deliver(d)
    }

    /// The next message if one has arrived, without waiting: `Ok(None)` when none
    /// has (or another thread is receiving right now). Over TCP a message whose
    /// first bytes have arrived is read whole, waiting for the rest up to the
    /// stall timeout (`TcpOptions::stall_timeout`), after which the connection
    /// is closed as in `recv`. Over TLS a readable socket may carry no message
    /// data yet (a key update, say): the call then waits the same way.
    ///
    /// Made for polling from a loop of your own (an engine's scheduler, say).
    /// Whether the sender left is asked of the operating system at most once a
    /// millisecond, so `PeerGone` may come that much later.
    ///
    /// # Errors
    /// As [`recv`](Self::recv), without `Timeout`.
    pub fn try_recv(&self) -> Result<Option<RecvGuard>> {
        let now = Instant::now();
        self.session.check_alive_at(now)?;
        self.port
            .try_recv(now, &|| self.warm())?
            .map(|d| self.deliver(d))
            .transpose()
    }

    /// Validate a delivered message and wrap it in a guard. Memory the peer
    /// can still write has its preamble and header copied out first, and only
    /// the copy is validated and read (see `Message::parse_split`).
    pub(crate) fn deliver(&self, d: Delivery) -> Result<RecvGuard> {
        self.guard(Some(d.held), d.ptr, d.len, d.peer_writable, d.device)
    }

    /// The session still lives and the message belongs to it.
    fn check_envelope(&self, envelope: &avp_wire::EnvelopeRef<'_>) -> Result<()> {
        self.session.check_alive()?;
        let sid = envelope.session_id();
        if self.check_session_ids && !sid.is_empty() && sid != self.session.id {
            return Err(TransportError::WrongSession {
                expected: self.session.id.clone(),
                found: sid.to_owned(),
            });
        }
        Ok(())
    }

    /// [`deliver`](Self::deliver) of `len` bytes at `ptr`, held by `held`
    /// (`None`: the receiver's own stand-in, nothing to give back or count).
    /// With `device`, the sections are in device memory there and the bytes
    /// at `ptr` hold only the preamble and header, which alone are read.
    #[inline(never)]
    fn guard(
        &self,
        held: Option<Held>,
        ptr: *const u8,
        len: usize,
        peer_writable: bool,
        device: Option<DeviceSpan>,
    ) -> Result<RecvGuard> {
        let counted = held.is_some();
        let mut guard = RecvGuard {
            msg: None,
            head: None,
            device,
            header: Box::default(),
            held,
            port: Arc::clone(&self.port),
        };
        // SAFETY: the port keeps the memory mapped (or owned) and unused by
        // this side until `held` is released, which happens only after the
        // guard has dropped `msg` and `head`; the guard keeps the port alive.
        // (The stand-in is owned by this receiver, which outlives its guard
        // in `warm`.) What the peer may write there is read as plain bytes
        // only: the header comes from the private copy below.
        let bytes: &'static [u8] = unsafe { std::slice::from_raw_parts(ptr, len) };
        let prefix = if peer_writable || device.is_some() {
            if counted {
                Counters::bump(&self.port.stats().header_copies);
            }
            guard.header = copy_prefix(bytes)?;
            // SAFETY: the copy is heap memory owned by the guard, never
            // written after this point and freed only after `msg` and `head`
            // are dropped.
            Some(unsafe { &*std::ptr::from_ref::<[u8]>(&guard.header) })
        } else {
            None
        };
        match (device, prefix) {
            (Some(span), Some(prefix)) => {
                let head = Header::parse(prefix)?;
                if !head.device_sections() || head.total_len() != span.len {
                    return Err(TransportError::Segment(format!(
                        "device ring entry of {} bytes, header of {} bytes{}",
                        span.len,
                        head.total_len(),
                        if head.device_sections() {
                            ""
                        } else {
                            " without the device-sections flag"
                        }
                    )));
                }
                self.check_envelope(&head.envelope())?;
                guard.head = Some(head);
            }
            (_, prefix) => {
                let msg = match prefix {
                    Some(prefix) => Message::parse_split(prefix, bytes)?,
                    None => Message::parse(bytes)?,
                };
                if msg.header().device_sections() {
                    // Only a device delivery carries device sections; in host
                    // memory the flag would only mean sections without checksums.
                    return Err(TransportError::Wire(avp_wire::WireError::InvalidField {
                        field: "flags",
                        reason: "FLAG_DEVICE_SECTIONS on a message delivered in host memory".into(),
                    }));
                }
                self.check_envelope(&msg.envelope())?;
                guard.msg = Some(msg);
            }
        }
        Ok(guard)
    }
}

/// A minimal valid KV-cache message (one layer, one head, one position) carrying
/// `session_id`, so that validating it takes the same path as a real message.
fn stand_in_message(session_id: &str) -> Vec<u8> {
    use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, MessageLayout, Payload};
    let desc = KvCacheDesc::new(1, 1, 1, 1, DType::F16, KvLayout::Hnd);
    let envelope = Envelope {
        session_id: session_id.to_owned(),
        ..Envelope::default()
    };
    MessageLayout::new(&envelope, &Payload::KvCache(desc))
        .and_then(|l| l.encode_to_vec(&[&[0u8; 2][..], &[0u8; 2][..]]))
        .expect("a one-position cache always encodes")
}

/// A private copy of the preamble and the header it declares (a few KiB), in
/// one allocation of its exact size.
pub(crate) fn copy_prefix(bytes: &[u8]) -> Result<Box<[u8]>> {
    let mut pre = [0u8; PREAMBLE_LEN];
    let n = bytes.len().min(PREAMBLE_LEN);
    pre[..n].copy_from_slice(&bytes[..n]);
    let p = Preamble::read(&pre[..n])?;
    let end = (PREAMBLE_LEN + p.header_len as usize).min(bytes.len());
    let mut copy = Box::<[u8]>::from(&bytes[..end]);
    // The preamble that was checked, even if the peer rewrote it meanwhile.
    copy[..PREAMBLE_LEN].copy_from_slice(&pre);
    Ok(copy)
}

/// A received message, held in transport memory until dropped. `Send` and
/// `Sync`: hand it to a worker thread, which drops it when done.
pub struct RecvGuard {
    msg: Option<Message<'static>>,
    /// The header of a device message (whose sections the host cannot read).
    head: Option<Header<'static>>,
    /// Where a device message's sections are.
    device: Option<DeviceSpan>,
    /// The private copy of the preamble and header that `msg` reads (empty
    /// when the memory is private to this side anyway).
    header: Box<[u8]>,
    held: Option<Held>,
    port: Arc<dyn RecvPort>,
}

impl RecvGuard {
    /// The validated message; its borrows end with the guard.
    ///
    /// # Panics
    /// When the sections are in device memory ([`on_device`](Self::on_device)),
    /// which host code cannot read: use [`header`](Self::header),
    /// [`device_section`](Self::device_section) and the copies. Only a
    /// receiver bound at `cuda://` gets such messages.
    pub fn message(&self) -> &Message<'_> {
        match &self.msg {
            Some(m) => m,
            None => panic!(
                "the message's sections are in device memory: read them with \
                 RecvGuard::device_section or copy_section_to_host (RecvGuard::on_device)"
            ),
        }
    }

    /// The raw message bytes, in transport memory. Over shared memory the
    /// sender could rewrite them: [`message`](Self::message) reads the header
    /// from a validated private copy instead.
    ///
    /// # Panics
    /// As [`message`](Self::message), for device messages.
    pub fn as_bytes(&self) -> &[u8] {
        self.message().as_bytes()
    }

    /// The validated preamble and header, wherever the sections are.
    pub fn header(&self) -> &Header<'_> {
        match (&self.msg, &self.head) {
            (Some(m), _) => m.header(),
            (None, Some(h)) => h,
            (None, None) => unreachable!("a guard holds a message or a header"),
        }
    }

    /// Whether the sections are in device memory (a `cuda` session).
    pub fn on_device(&self) -> bool {
        self.device.is_some()
    }

    /// The session's device (`Options::device`), when it has one: where
    /// [`device_section`](Self::device_section) points and what
    /// [`copy_section_to_device`](Self::copy_section_to_device) can write.
    pub fn device(&self) -> Option<Device> {
        self.port.device().map(|d| d.device())
    }

    /// Where section `index` is in device memory, for the receiver's kernels
    /// or copies to read until the guard drops. The bytes are the sender's
    /// and carry no checksum (see `avp_wire::FLAG_DEVICE_SECTIONS`).
    ///
    /// Dropping the guard hands the slot back to the sender, who may write it
    /// at once: synchronise the work that reads it (your stream) before the
    /// guard drops, or copy what you keep.
    ///
    /// # Errors
    /// `Wire` for no such section; `Placement` for a host message.
    pub fn device_section(&self, index: usize) -> Result<DeviceSpan> {
        let info = self.header().section(index)?;
        let span = self.device.ok_or_else(|| {
            TransportError::Placement(
                "this message is in host memory: read it with RecvGuard::message".into(),
            )
        })?;
        Ok(span
            .sub(info.offset, info.len)
            .expect("validated sections lie inside the message"))
    }

    /// Copy section `index` into `dst` (host memory of the section's
    /// length): device to host for a device message (counted in
    /// `Stats::device_to_host_bytes`), a plain copy otherwise.
    ///
    /// # Errors
    /// `Wire` for no such section or a `dst` of another length; `Device`.
    pub fn copy_section_to_host(&self, index: usize, dst: &mut [u8]) -> Result<()> {
        let info = self.header().section(index)?;
        check_dst(index, info.len, dst.len())?;
        let Some(span) = self.device else {
            dst.copy_from_slice(self.message().section(index)?.bytes);
            return Ok(());
        };
        let src = span.sub(info.offset, info.len).expect("validated");
        let dev = self.device_mem()?;
        // SAFETY: `src` is the section inside the mapped device slot, held
        // until the guard drops; `dst` is `len` writable bytes borrowed until
        // the copy is synchronised below.
        unsafe {
            dev.copy(
                dst.as_mut_ptr() as u64,
                src.addr,
                dst.len(),
                Dir::DeviceToHost,
            )
        }?;
        dev.sync()?;
        self.port.stats().copied(Dir::DeviceToHost, info.len);
        Ok(())
    }

    /// Copy section `index` to `dst`, device memory of the section's length
    /// on the session's device: device to device for a device message, host
    /// to device otherwise (counted). Finished when this returns.
    ///
    /// # Errors
    /// `Wire` for no such section; `Placement` when the session has no
    /// device; `Device`.
    ///
    /// # Safety
    /// `dst` must be writable device memory of the section's length on the
    /// session's device, unused by anyone else during the call.
    pub unsafe fn copy_section_to_device(&self, index: usize, dst: u64) -> Result<()> {
        let info = self.header().section(index)?;
        let dev = self.device_mem()?;
        let (src, dir) = match self.device {
            Some(span) => (
                span.sub(info.offset, info.len).expect("validated").addr,
                Dir::DeviceToDevice,
            ),
            None => (
                self.message().section(index)?.bytes.as_ptr() as u64,
                Dir::HostToDevice,
            ),
        };
        // SAFETY: `src` is the section (device slot or host bytes) held
        // until the guard drops; `dst` is the caller's promise.
        unsafe { dev.copy(dst, src, info.len as usize, dir) }?;
        dev.sync()?;
        self.port.stats().copied(dir, info.len);
        Ok(())
    }

    fn device_mem(&self) -> Result<Arc<dyn DeviceMem>> {
        self.port.device().ok_or_else(|| {
            TransportError::Placement(
                "this session has no device (it is not a cuda:// session)".into(),
            )
        })
    }
}

fn check_dst(index: usize, expected: u64, found: usize) -> Result<()> {
    if expected == found as u64 {
        return Ok(());
    }
    Err(TransportError::Wire(avp_wire::WireError::BadSection {
        index,
        reason: format!("section is {expected} bytes, the destination {found}"),
    }))
}

impl Drop for RecvGuard {
    fn drop(&mut self) {
        self.msg.take();
        self.head.take();
        if let Some(held) = self.held.take() {
            self.port.release(held);
        }
    }
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("session", &self.session.id)
            .field("transport", &self.session.transport)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RecvGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvGuard")
            .field("message", &self.msg)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn receivers_and_guards_cross_threads() {
        assert_send_sync::<Receiver>();
        assert_send_sync::<RecvGuard>();
    }

    #[test]
    fn the_stand_in_is_a_valid_message_of_its_session() {
        let bytes = stand_in_message("0123456789abcdef0123456789abcdef");
        let m = Message::parse(&bytes).expect("the stand-in parses");
        assert_eq!(
            m.envelope().session_id(),
            "0123456789abcdef0123456789abcdef"
        );
        m.verify().expect("and its checksums hold");
    }

    #[test]
    fn the_prefix_copy_stops_at_the_declared_header() {
        use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, MessageLayout, Payload};
        let desc = KvCacheDesc::new(1, 1, 4, 2, DType::F16, KvLayout::Hnd);
        let l = MessageLayout::new(&Envelope::default(), &Payload::KvCache(desc)).unwrap();
        let bytes = l.encode_to_vec(&[&[1u8; 16][..], &[2u8; 16][..]]).unwrap();
        let copy = copy_prefix(&bytes).unwrap();
        let header_len = Preamble::read(&bytes).unwrap().header_len as usize;
        assert_eq!(&copy[..], &bytes[..PREAMBLE_LEN + header_len]);
        assert!(copy_prefix(&bytes[..10]).is_err(), "a short preamble");
        assert!(copy_prefix(b"XY not a message at all, no").is_err());
    }
}
