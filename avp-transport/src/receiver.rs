//! The receiving half of a session: [`Receiver::recv`] (blocking),
//! [`Receiver::try_recv`] (polling), and the [`RecvGuard`] that holds a received
//! message in transport memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use avp_wire::{Message, PREAMBLE_LEN, Preamble};

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
        drop(std::hint::black_box(self.guard(None, ptr, len, true)));
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
        let writable = d.peer_writable;
        self.guard(Some(d.held), d.ptr, d.len, writable)
    }

    /// [`deliver`](Self::deliver) of `len` bytes at `ptr`, held by `held`
    /// (`None`: the receiver's own stand-in, nothing to give back or count).
    #[inline(never)]
    fn guard(
        &self,
        held: Option<Held>,
        ptr: *const u8,
        len: usize,
        peer_writable: bool,
    ) -> Result<RecvGuard> {
        let counted = held.is_some();
        let mut guard = RecvGuard {
            msg: None,
            header: Box::default(),
            held,
            port: Arc::clone(&self.port),
        };
        // SAFETY: the port keeps the memory mapped (or owned) and unused by
        // this side until `held` is released, which happens only after the
        // guard has dropped `msg`; the guard keeps the port alive. (The
        // stand-in is owned by this receiver, which outlives its guard in
        // `warm`.) What the peer may write there is read as plain bytes only:
        // the header comes from the private copy below.
        let bytes: &'static [u8] = unsafe { std::slice::from_raw_parts(ptr, len) };
        let msg = if peer_writable {
            if counted {
                Counters::bump(&self.port.stats().header_copies);
            }
            guard.header = copy_prefix(bytes)?;
            // SAFETY: the copy is heap memory owned by the guard, never
            // written after this point and freed only after `msg` is dropped.
            let prefix: &'static [u8] = unsafe { &*std::ptr::from_ref::<[u8]>(&guard.header) };
            Message::parse_split(prefix, bytes)?
        } else {
            Message::parse(bytes)?
        };
        self.session.check_alive()?;
        let sid = msg.envelope().session_id();
        if self.check_session_ids && !sid.is_empty() && sid != self.session.id {
            return Err(TransportError::WrongSession {
                expected: self.session.id.clone(),
                found: sid.to_owned(),
            });
        }
        guard.msg = Some(msg);
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
fn copy_prefix(bytes: &[u8]) -> Result<Box<[u8]>> {
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
    /// The private copy of the preamble and header that `msg` reads (empty
    /// when the memory is private to this side anyway).
    header: Box<[u8]>,
    held: Option<Held>,
    port: Arc<dyn RecvPort>,
}

impl RecvGuard {
    /// The validated message; its borrows end with the guard.
    pub fn message(&self) -> &Message<'_> {
        self.msg.as_ref().expect("set before the guard is returned")
    }

    /// The raw message bytes, in transport memory. Over shared memory the
    /// sender could rewrite them: [`message`](Self::message) reads the header
    /// from a validated private copy instead.
    pub fn as_bytes(&self) -> &[u8] {
        self.message().as_bytes()
    }
}

impl Drop for RecvGuard {
    fn drop(&mut self) {
        self.msg.take();
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
