//! The receiving half of a session: [`Receiver::recv`] (blocking),
//! [`Receiver::try_recv`] (polling), and the [`RecvGuard`] that holds a received
//! message in transport memory.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use avp_wire::Message;

use crate::buf::PageBuf;
use crate::error::{Result, TransportError};
use crate::options::Options;
use crate::session::Session;
use crate::shm::{Held, Popped, ShmReceiver};
use crate::tcp::TcpReceiver;

pub(crate) enum RecvInner {
    Shm(ShmReceiver),
    Tcp(TcpReceiver),
}

/// The receiving half of a session.
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
/// // ... or block: `recv` spins for `Options::spin`, then sleeps on a doorbell.
/// assert!(rx.recv(Duration::from_millis(10)).is_err()); // the sender left
/// # Ok(())
/// # }
/// ```
pub struct Receiver {
    pub(crate) session: Session,
    pub(crate) inner: RecvInner,
    check_session_ids: bool,
    /// A staged shared-memory message validated ahead (see `deliver_shm`).
    early: RefCell<Early>,
}

/// A message validated before it was published: where it is, the bytes its
/// validation depended on (preamble and header), and the result.
#[derive(Default)]
struct Early {
    /// The slot's address (as a number: only compared).
    ptr: usize,
    len: usize,
    /// The preamble and header validated (the buffer is reused).
    prefix: Vec<u8>,
    /// The result; `None` when nothing is remembered.
    msg: Option<Message<'static>>,
}

/// Headers longer than this are not validated ahead (they are a few KiB).
const EARLY_PREFIX_MAX: usize = 16 << 10;

/// A minimal valid KV-cache message (one layer, one head, one position) carrying
/// `session_id`, so that validating it takes the same path as a real message.
pub(crate) fn stand_in_message(session_id: &str) -> Vec<u8> {
    use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, MessageLayout, Payload};
    let desc = KvCacheDesc::new(1, 1, 1, 1, DType::F16, KvLayout::Hnd);
    let envelope = Envelope {
        session_id: session_id.to_owned(),
        ..Envelope::default()
    };
    MessageLayout::new(&envelope, &Payload::KvCache(desc))
        .and_then(|l| {
            let zero: Vec<Vec<u8>> = l.sections().map(|s| vec![0u8; s.len as usize]).collect();
            let parts: Vec<&[u8]> = zero.iter().map(Vec::as_slice).collect();
            l.encode_to_vec(&parts)
        })
        .unwrap_or_default()
}

pub(crate) enum HeldMem {
    Shm(Held),
    Tcp(PageBuf),
}

impl Receiver {
    pub(crate) fn new(session: Session, inner: RecvInner, options: &Options) -> Receiver {
        Receiver {
            session,
            inner,
            check_session_ids: options.check_session_ids,
            early: RefCell::new(Early::default()),
        }
    }

    /// What was negotiated.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Address range of the mapped slot pool (shared memory only).
    pub fn pool_range(&self) -> Option<std::ops::Range<usize>> {
        match &self.inner {
            RecvInner::Shm(s) => Some(s.pool_range()),
            RecvInner::Tcp(_) => None,
        }
    }

    /// Wait up to `timeout` for the next message. The guard holds the message in
    /// transport memory (a shared slot, or a pooled buffer on TCP); dropping it
    /// returns the memory.
    ///
    /// Marked `#[inline]`: over shared memory its spin loop then runs in the
    /// caller's own code, which a message returns into (see "Staying warm" in
    /// spec/transport.md).
    #[inline]
    pub fn recv(&self, timeout: Duration) -> Result<RecvGuard<'_>> {
        self.session.check_alive()?;
        match &self.inner {
            RecvInner::Shm(s) => s.recv(timeout, &|m| self.deliver_shm(m)),
            RecvInner::Tcp(t) => {
                let (mut b, l) = t.recv(timeout)?;
                let p = b.as_mut_ptr() as *const u8;
                self.guard(HeldMem::Tcp(b), p, l)
            }
        }
    }

    /// The next message if one has arrived, without waiting: `Ok(None)` when none
    /// has. On shared memory this looks at the ring (and, while a message is
    /// being written, keeps the receive path cached and validates a staged
    /// message ahead, as `recv` does); over TCP a
    /// message whose first bytes have arrived is read whole, waiting for the rest
    /// up to the stall timeout (`Options::connect_timeout`), after which the
    /// connection is closed as in `recv`. Over TLS a readable socket may carry no
    /// message data yet (a key update, say): the call then waits the same way.
    ///
    /// Made for polling from a loop of your own (an engine's scheduler, say): an
    /// empty poll costs about 100 ns, and a busy poll loop hands over as fast as
    /// [`recv`](Self::recv) in spin mode. Whether the sender left is asked of the
    /// operating system at most once a millisecond, so `PeerGone` may come that
    /// much later.
    pub fn try_recv(&self) -> Result<Option<RecvGuard<'_>>> {
        let now = Instant::now();
        self.session.check_alive_at(now)?;
        match &self.inner {
            RecvInner::Shm(s) => s.try_recv(now, &|m| self.deliver_shm(m)),
            RecvInner::Tcp(t) => {
                if !t.readable_now()? {
                    return Ok(None);
                }
                let (mut b, l) = t.recv(Duration::ZERO)?;
                let p = b.as_mut_ptr() as *const u8;
                self.guard(HeldMem::Tcp(b), p, l).map(Some)
            }
        }
    }

    /// Parse `bytes` and check that they belong to this live session.
    #[inline(never)]
    fn validate<'m>(&self, bytes: &'m [u8]) -> Result<Message<'m>> {
        let msg = Message::parse(bytes)?;
        self.session.check_alive()?;
        let sid = msg.envelope().session_id();
        if self.check_session_ids && !sid.is_empty() && sid != self.session.id {
            return Err(TransportError::WrongSession {
                expected: self.session.id.clone(),
                found: sid.to_owned(),
            });
        }
        Ok(msg)
    }

    /// Validate a message the shared-memory ring handed over and wrap it in a
    /// guard. The session's stand-in message (`Held::StandIn`, whose guard gives
    /// nothing back) goes through the very same instructions, so delivering it
    /// while a large message is written keeps the path a real message takes
    /// cached.
    ///
    /// A message the sender has only staged (`Held::Staged`) is validated and
    /// remembered, and the guard returned for it holds nothing. When the
    /// message is then published, its preamble and header are compared with
    /// the remembered bytes; equal bytes validate the same way, so the
    /// remembered result is used (the session is still checked alive).
    #[inline(never)]
    pub(crate) fn deliver_shm(&self, (held, ptr, len): Popped) -> Result<RecvGuard<'_>> {
        if let Held::Staged = held {
            self.validate_ahead(ptr, len);
            return Ok(RecvGuard {
                rx: self,
                held: None,
                msg: None,
            });
        }
        if let Held::Slot(_) = held
            && let Some(msg) = self.validated_ahead(ptr, len)
        {
            // The guard first: if the session has expired, dropping it gives
            // the slot back.
            let guard = RecvGuard {
                rx: self,
                held: Some(HeldMem::Shm(held)),
                msg: Some(msg),
            };
            self.session.check_alive()?;
            return Ok(guard);
        }
        self.guard(HeldMem::Shm(held), ptr, len)
    }

    /// Validate a staged message and remember the result (see `deliver_shm`).
    ///
    /// The preamble and header are copied before they are parsed and compared
    /// again after: a sender that drops a staged message and writes another
    /// into the slot meanwhile leaves a copy that no longer matches, and
    /// nothing is remembered. (Parsing depends on these bytes and the length
    /// alone.)
    fn validate_ahead(&self, ptr: *const u8, len: usize) {
        // SAFETY: as in `guard`: the slot stays mapped as long as this receiver.
        // What is read here is only remembered if it is the same before and
        // after parsing, and used only if it is still the same on delivery.
        let bytes: &'static [u8] = unsafe { std::slice::from_raw_parts(ptr, len) };
        let mut early = self.early.borrow_mut();
        early.msg = None;
        // As far as the preamble says the header reaches (bytes 4..8, the
        // header length; checked by the parse below like everything else).
        let declared = bytes
            .get(4..8)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
        let copy = avp_wire::PREAMBLE_LEN
            .saturating_add(declared)
            .min(len)
            .min(EARLY_PREFIX_MAX);
        early.prefix.clear();
        early.prefix.extend_from_slice(&bytes[..copy]);
        let Ok(msg) = self.validate(bytes) else {
            return;
        };
        let end = avp_wire::PREAMBLE_LEN + msg.header_len() as usize;
        if end > early.prefix.len() || !bytes.starts_with(&early.prefix[..end]) {
            return;
        }
        early.prefix.truncate(end);
        (early.ptr, early.len, early.msg) = (ptr as usize, len, Some(msg));
    }

    /// The remembered validation of the pool-slot message at `ptr`, if its
    /// preamble and header are still the bytes that were validated. Any
    /// remembered validation is used up by the next slot message, matching or
    /// not.
    #[inline]
    fn validated_ahead(&self, ptr: *const u8, len: usize) -> Option<Message<'static>> {
        let mut early = self.early.borrow_mut();
        let msg = early.msg.take()?;
        // SAFETY: as in `guard`.
        let bytes: &[u8] = unsafe { std::slice::from_raw_parts(ptr, len) };
        (early.ptr == ptr as usize && early.len == len && bytes.starts_with(&early.prefix))
            .then_some(msg)
    }

    /// Wrap received bytes in a guard after validating them.
    pub(crate) fn guard(&self, held: HeldMem, ptr: *const u8, len: usize) -> Result<RecvGuard<'_>> {
        let mut guard = RecvGuard {
            rx: self,
            held: Some(held),
            msg: None,
        };
        // SAFETY: the bytes stay valid and unchanged while the guard holds them
        // (a slot is not reused before release; a mapping or buffer is owned by the
        // guard; the stand-in is owned by the receiver the guard borrows), and
        // `msg` is only ever lent out for the guard's lifetime.
        let bytes: &'static [u8] = unsafe { std::slice::from_raw_parts(ptr, len) };
        guard.msg = Some(self.validate(bytes)?);
        Ok(guard)
    }
}

/// A received message, held in transport memory until dropped.
pub struct RecvGuard<'r> {
    rx: &'r Receiver,
    held: Option<HeldMem>,
    msg: Option<Message<'static>>,
}

impl RecvGuard<'_> {
    /// The validated message; its borrows end with the guard.
    pub fn message(&self) -> &Message<'_> {
        self.msg.as_ref().expect("set before the guard is returned")
    }

    /// The raw message bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.message().as_bytes()
    }
}

impl Drop for RecvGuard<'_> {
    fn drop(&mut self) {
        self.msg.take();
        match (self.held.take(), &self.rx.inner) {
            (Some(HeldMem::Shm(h)), RecvInner::Shm(s)) => s.release(h),
            (Some(HeldMem::Tcp(b)), RecvInner::Tcp(t)) => t.give_back(b),
            (None, _) => {}
            (Some(HeldMem::Shm(_) | HeldMem::Tcp(_)), _) => {
                unreachable!("a guard's memory comes from its own receiver's transport")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
