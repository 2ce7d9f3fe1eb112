//! The transport seam: what a transport provides to the generic endpoint.
//!
//! A transport is one module that implements three things and one line in
//! [`crate::scheme::SCHEMES`]:
//!
//! - a [`SendPort`]: loans memory for a message, optionally stages it, publishes
//!   or abandons it;
//! - a [`RecvPort`]: hands over published messages ([`Delivery`]) by polling or
//!   waiting until a deadline, takes them back ([`RecvPort::release`]) from any
//!   thread, and names the descriptors an event loop waits on;
//! - a [`Scheme`](crate::scheme::Scheme): binds and connects addresses of its
//!   scheme over the authenticated control channel, saying why the transport
//!   was (or was not) chosen.
//!
//! Everything transport-independent lives above the seam: the handshake, loans
//! and their type states, validation (the header is always read from a private
//! copy when the transport says the memory is peer-writable), session checks,
//! guards, the async layer and the counters. See "Adding a transport" in
//! spec/transport.md.

use std::any::Any;
use std::future::Future;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::sync::Arc;

use crate::device::{DeviceMem, DeviceSpan, Dir};
use crate::error::Result;

/// A future a port returns from an async operation.
pub(crate) type PortFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// Memory loaned to a sender for one message.
pub(crate) struct LoanMem {
    ptr: NonNull<u8>,
    cap: usize,
    /// The transport's name for this memory (a slot index, say).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(crate) key: u64,
    /// What keeps the memory alive (a mapping, a buffer), if the transport needs it.
    pub(crate) keep: Option<Box<dyn Any + Send>>,
    /// Device memory for the sections of a device message (the host memory
    /// at `ptr` then holds only its preamble and header).
    pub(crate) device: Option<DeviceSpan>,
}

// SAFETY: a loan is memory owned by exactly one holder until it is published or
// abandoned; moving the holder to another thread moves that exclusive right.
unsafe impl Send for LoanMem {}

impl LoanMem {
    /// `cap` writable bytes at `ptr`, named `key`, kept alive by `keep`.
    ///
    /// The memory must stay valid, unmoved and unused by anyone else until the
    /// loan is handed back to the port that made it.
    pub(crate) fn new(
        ptr: NonNull<u8>,
        cap: usize,
        key: u64,
        keep: Option<Box<dyn Any + Send>>,
    ) -> LoanMem {
        LoanMem {
            ptr,
            cap,
            key,
            keep,
            device: None,
        }
    }

    /// Start of the memory.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Usable bytes.
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// The kept object, if it is a `T`.
    pub(crate) fn take_keep<T: 'static>(&mut self) -> Option<T> {
        let keep = self.keep.take()?;
        match keep.downcast::<T>() {
            Ok(t) => Some(*t),
            Err(other) => {
                self.keep = Some(other);
                None
            }
        }
    }
}

/// What a receive guard holds until the message is released.
pub(crate) struct Held {
    /// The transport's name for the memory (a slot index, say).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(crate) key: u64,
    /// What keeps the memory alive (a mapping, a buffer), if anything.
    pub(crate) keep: Option<Box<dyn Any + Send + Sync>>,
}

/// A message a receive port hands over.
pub(crate) struct Delivery {
    /// What to give back with [`RecvPort::release`].
    pub(crate) held: Held,
    /// Where the message starts.
    pub(crate) ptr: *const u8,
    /// Its length.
    pub(crate) len: usize,
    /// Whether the peer can still write the memory (shared memory): the header
    /// is then validated and read from a private copy.
    pub(crate) peer_writable: bool,
    /// Where the sections are when they are in device memory (`ptr`/`len`
    /// then hold the preamble and header, and at most `len` bytes are read).
    pub(crate) device: Option<DeviceSpan>,
}

// SAFETY: the pointer is to memory that `held` keeps (a slot, a mapping, a
// buffer), usable from any thread; a delivery moves with what keeps it.
unsafe impl Send for Delivery {}

/// What [`RecvPort::arm`] found, for an event loop.
pub(crate) enum Armed {
    /// A message.
    Ready(Delivery),
    /// The peer is busy producing one: poll again soon (yield, don't sleep).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Busy,
    /// Nothing: wait until one of these descriptors is readable, then
    /// [`RecvPort::disarm`] and poll again.
    Wait([RawFd; 2]),
}

/// Work a receive port runs now and then while it waits for a peer that
/// announced it is producing a message: the endpoint's delivery path run on a
/// private stand-in message, so that what a message will touch is still cached
/// when it comes (writing a large message takes milliseconds, long enough for
/// caches and TLBs to lose it).
pub(crate) type Idle<'a> = &'a dyn Fn();

/// The receiving half of a transport.
pub(crate) trait RecvPort: Send + Sync {
    /// Wait up to `timeout` for the next message, running `idle` now and then
    /// while the peer is producing one.
    fn recv(&self, timeout: Duration, idle: Idle<'_>) -> Result<Delivery>;
    /// The next message if one is there; `now` is the caller's clock reading.
    /// `idle` as in [`recv`](Self::recv), paced across calls.
    fn try_recv(&self, now: Instant, idle: Idle<'_>) -> Result<Option<Delivery>>;
    /// Prepare to wait in an event loop (see [`Armed`]).
    fn arm(&self) -> Result<Armed>;
    /// Undo [`arm`](Self::arm) after waiting.
    fn disarm(&self);
    /// Give a delivered message's memory back. Callable from any thread, at any
    /// time, never waiting for a concurrent `recv`.
    fn release(&self, held: Held);
    /// Address range of memory shared with the peer, if any (zero-copy checks).
    fn pool_range(&self) -> Option<std::ops::Range<usize>> {
        None
    }
    /// The device that device deliveries are on, if the session has one.
    fn device(&self) -> Option<Arc<dyn DeviceMem>> {
        None
    }
    /// The port's counters.
    fn stats(&self) -> &Counters;
}

/// What [`SendPort::arm_acquire`] found.
pub(crate) enum AcquireArmed {
    /// Memory.
    Ready(LoanMem),
    /// Wait until one of these descriptors is readable, then
    /// [`SendPort::disarm_acquire`] and try again.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Wait([RawFd; 2]),
}

/// The sending half of a transport.
pub(crate) trait SendPort: Send {
    /// Memory for one message of `len` bytes. When none is free now, wait up to
    /// the loan timeout if `wait`, else return `None`.
    fn acquire(&mut self, len: usize, wait: bool) -> Result<Option<LoanMem>>;
    /// Optional: the message in `mem` is finished (`len` bytes); get it ready
    /// so that [`publish`](Self::publish) has little left to do.
    fn stage(&mut self, _mem: &LoanMem, _len: usize) {}
    /// Hand `len` bytes written into `mem` to the receiver.
    fn publish(&mut self, mem: LoanMem, len: usize) -> Result<()>;
    /// Memory for a device message of `len` bytes whose preamble and header
    /// take `prefix_len`: host memory for those, device memory for the
    /// sections ([`LoanMem::device`]); waits for a slot up to the loan
    /// timeout. `None` when the session has no device pool.
    fn acquire_device(&mut self, _len: usize, _prefix_len: usize) -> Result<Option<LoanMem>> {
        Ok(None)
    }
    /// Give back memory that will not be sent.
    fn abandon(&mut self, mem: LoanMem);
    /// How long `acquire` waits.
    fn loan_timeout(&self) -> Duration;
    /// For event loops: memory now, or the descriptors to wait on (the port
    /// asks the receiver to signal them).
    fn arm_acquire(&mut self, len: usize) -> Result<AcquireArmed> {
        let mem = self.acquire(len, true)?;
        Ok(AcquireArmed::Ready(
            mem.expect("a waiting acquire yields memory"),
        ))
    }
    /// Undo [`arm_acquire`](Self::arm_acquire).
    fn disarm_acquire(&mut self) {}
    /// [`publish`](Self::publish) as a future, for transports whose publish can
    /// wait (on socket space, say).
    fn publish_async(&mut self, mem: LoanMem, len: usize) -> PortFuture<'_, ()> {
        let r = self.publish(mem, len);
        Box::pin(std::future::ready(r))
    }
    /// Whether [`send_parts`](Self::send_parts) sends without a loan.
    fn vectored(&self) -> bool {
        false
    }
    /// Send a message from separate parts without a loan (vectored I/O): the
    /// header prefix, then each section at its offset. `None` when the
    /// transport has no such path ([`vectored`](Self::vectored) is false; the
    /// caller then copies into a loan).
    fn send_parts(&mut self, _prefix: &[u8], _parts: &[(u64, &[u8])]) -> Option<Result<()>> {
        None
    }
    /// Whether the receiver waits awake on this host, so that checksumming a
    /// message should leave it a core.
    fn receiver_shares_host(&self) -> bool {
        false
    }
    /// Address range of memory shared with the peer, if any.
    fn pool_range(&self) -> Option<std::ops::Range<usize>> {
        None
    }
    /// The device of the session's device pool, if it has one.
    fn device(&self) -> Option<Arc<dyn DeviceMem>> {
        None
    }
    /// The port's counters.
    fn stats(&self) -> &Counters;
}

/// Counters of what a port did; read through `Sender::stats` and
/// `Receiver::stats`.
#[derive(Default, Debug)]
pub(crate) struct Counters {
    pub(crate) messages: AtomicU64,
    pub(crate) spin_hits: AtomicU64,
    pub(crate) after_sleep: AtomicU64,
    pub(crate) awake_for_writing: AtomicU64,
    pub(crate) head_line_entries: AtomicU64,
    pub(crate) staged_publishes: AtomicU64,
    pub(crate) doorbells: AtomicU64,
    pub(crate) header_copies: AtomicU64,
    pub(crate) dedicated: AtomicU64,
    pub(crate) warmups: AtomicU64,
    pub(crate) device_messages: AtomicU64,
    pub(crate) host_to_device_bytes: AtomicU64,
    pub(crate) device_to_host_bytes: AtomicU64,
    pub(crate) device_to_device_bytes: AtomicU64,
    pub(crate) format_conversions: AtomicU64,
}

impl Counters {
    /// Add one to `c`.
    #[inline]
    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Count `bytes` copied in direction `dir`.
    pub(crate) fn copied(&self, dir: Dir, bytes: u64) {
        let c = match dir {
            Dir::HostToDevice => &self.host_to_device_bytes,
            Dir::DeviceToHost => &self.device_to_host_bytes,
            Dir::DeviceToDevice => &self.device_to_device_bytes,
        };
        c.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A snapshot.
    pub(crate) fn snapshot(&self) -> Stats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            messages: r(&self.messages),
            spin_hits: r(&self.spin_hits),
            after_sleep: r(&self.after_sleep),
            awake_for_writing: r(&self.awake_for_writing),
            head_line_entries: r(&self.head_line_entries),
            staged_publishes: r(&self.staged_publishes),
            doorbells: r(&self.doorbells),
            header_copies: r(&self.header_copies),
            dedicated: r(&self.dedicated),
            warmups: r(&self.warmups),
            device_messages: r(&self.device_messages),
            host_to_device_bytes: r(&self.host_to_device_bytes),
            device_to_host_bytes: r(&self.device_to_host_bytes),
            device_to_device_bytes: r(&self.device_to_device_bytes),
            format_conversions: r(&self.format_conversions),
        }
    }
}

/// What one end of a session did, by path taken: a test or a dashboard can see
/// which fast paths ran. Counters a transport has no use for stay 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Messages sent (sender) or delivered (receiver).
    pub messages: u64,
    /// Receiver: messages found while spinning, before any system call.
    pub spin_hits: u64,
    /// Receiver: messages found after sleeping on the doorbell.
    pub after_sleep: u64,
    /// Receiver: waits that stayed awake because the sender announced it was
    /// writing a message (shared memory: the wake-up overlaps the writing).
    pub awake_for_writing: u64,
    /// Receiver: ring entries read from the head's cache line (shared memory's
    /// packed `newest` word) instead of the ring.
    pub head_line_entries: u64,
    /// Sender: messages staged when finished and announced with one store.
    pub staged_publishes: u64,
    /// Doorbells rung because the other side slept.
    pub doorbells: u64,
    /// Receiver: headers copied out of peer-writable memory and validated there.
    pub header_copies: u64,
    /// Messages too large for a slot, sent in a dedicated segment.
    pub dedicated: u64,
    /// Receiver: runs of the delivery path on a private stand-in message while
    /// the sender was writing (shared memory), to keep that path cached.
    pub warmups: u64,
    /// Messages whose sections were in device memory (`cuda`).
    pub device_messages: u64,
    /// Bytes this end copied from host memory into device memory while
    /// sending or receiving (0 on a device-to-device handoff).
    pub host_to_device_bytes: u64,
    /// Bytes this end copied from device memory into host memory (a device
    /// context sent over a host transport, or read on the host).
    pub device_to_host_bytes: u64,
    /// Bytes this end copied between device buffers (into and out of device slots).
    pub device_to_device_bytes: u64,
    /// Sender: messages converted to another wire format because the peer
    /// does not read v2 (an `http://` server of the Python reference reads v1).
    pub format_conversions: u64,
}
