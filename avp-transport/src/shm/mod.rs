//! The shared-memory transport: a pool of pre-faulted slots in one sealed memfd,
//! handed to the receiver over a Unix socket (SCM_RIGHTS), two rings in the pool's
//! control page, and eventfd doorbells rung only when the other side sleeps.
//!
//! Slot life cycle: free (sender) → loaned (sender writes in place) → staged
//! (ring entry and the packed `newest` word, when the message is finished) →
//! published (`head`) → held (receiver's guard) → released (release ring) → free.
//! Messages larger than a slot travel in a dedicated sealed memfd sent with the
//! notification. A peer that dies is seen as EOF/HUP on the Unix socket; all its
//! mappings and descriptors are dropped with the endpoint.

pub mod control;
pub mod segment;

use std::cell::Cell;
use std::cell::RefCell;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::error::{Result, TransportError};
use crate::frame::{Frame, FrameIo, PacketIo};
use control::{CONTROL_LEN, Control, DEDICATED, Entry, RING, Rehearsal};
use segment::{Event, Mapping};

/// How often a spinning receiver re-touches its receive path while a message is
/// being written (see `ShmReceiver::keep_warm`).
const WARM_EVERY: Duration = Duration::from_micros(20);

/// Bytes of the waiting thread's stack that `ShmReceiver::keep_warm`
/// prefetches, from the frame of `warm_callers_stack` up: the frames a
/// delivered message returns through (the endpoint's and its caller's),
/// untouched since the wait began.
#[cfg(target_arch = "x86_64")]
const STACK_WARM_BYTES: usize = 4096;

/// How often a polling receiver asks the socket whether the sender left.
const PEER_CHECK_EVERY: Duration = Duration::from_millis(1);

/// Round up to a page.
fn page_up(n: usize) -> usize {
    n.div_ceil(4096) * 4096
}

/// Wait until one of `fds` is readable or `timeout` passes. Returns whether one was.
fn wait_any(fds: &[BorrowedFd<'_>], timeout: Duration) -> Result<bool> {
    let mut p: Vec<PollFd<'_>> = fds
        .iter()
        .map(|f| PollFd::new(*f, PollFlags::POLLIN))
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let ms = if ms == 0 && !timeout.is_zero() { 1 } else { ms };
    match poll(
        &mut p,
        PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
    ) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(TransportError::errno("poll")(e)),
    }
}

/// Memory a sender writes one message into.
pub enum Region {
    /// A pool slot.
    Slot {
        /// Slot index.
        index: u32,
        /// Start of the slot.
        ptr: *mut u8,
    },
    /// A dedicated segment for one large message.
    Dedicated {
        /// Its memfd.
        fd: OwnedFd,
        /// Its mapping.
        map: Mapping,
    },
}

// SAFETY: a region is memory loaned to exactly one owner; moving that owner to
// another thread moves the exclusive right to write it.
unsafe impl Send for Region {}

impl Region {
    /// Start of the writable memory.
    pub fn ptr(&self) -> *mut u8 {
        match self {
            Region::Slot { ptr, .. } => *ptr,
            Region::Dedicated { map, .. } => map.ptr(),
        }
    }
}

/// The sending half of a shared-memory session.
pub struct ShmSender {
    io: PacketIo,
    pool: Mapping,
    ctrl: Control,
    slots: u32,
    slot_size: usize,
    free: Vec<u32>,
    in_flight: Vec<bool>,
    head: u64,
    published: Event,
    released: Event,
    loan_timeout: Duration,
    scratch: Vec<u32>,
    /// The entry written for message number `head` by `stage`, not yet announced.
    staged: Option<Entry>,
    /// Where `stage` rehearses an announcement.
    rehearsal: Rehearsal,
}

impl ShmSender {
    /// Create the pool (`slots` × `slot_size`, pre-faulted) and hand it to the receiver.
    pub fn new(
        mut io: PacketIo,
        slots: usize,
        slot_size: usize,
        loan_timeout: Duration,
    ) -> Result<ShmSender> {
        let slots = slots.clamp(1, RING as usize / 2) as u32;
        let slot_size = page_up(slot_size.max(4096));
        let total = CONTROL_LEN + slots as usize * slot_size;
        let fd = segment::create_memfd("avp-pool", total)?;
        let pool = Mapping::map(&fd, 0, total, true)?;
        // Touch every page once so neither side pays first-touch faults while sending.
        for off in (0..total).step_by(4096) {
            // SAFETY: off < total, inside our fresh writable mapping.
            unsafe { pool.ptr().add(off).write_volatile(0) };
        }
        // SAFETY: the first CONTROL_LEN bytes of the page-aligned pool stay mapped as long as `pool`.
        let ctrl = unsafe { Control::new(pool.ptr()) };
        ctrl.init(slots, slot_size as u64);
        let (published, released) = (Event::new()?, Event::new()?);
        io.send_frame(
            &Frame::Pool {
                slots,
                slot_size: slot_size as u64,
                ring: RING,
            },
            &[
                fd.as_raw_fd(),
                published.fd().as_raw_fd(),
                released.fd().as_raw_fd(),
            ],
        )?;
        Ok(ShmSender {
            io,
            pool,
            ctrl,
            slots,
            slot_size,
            free: (0..slots).rev().collect(),
            in_flight: vec![false; slots as usize],
            head: 0,
            published,
            released,
            loan_timeout,
            scratch: Vec::new(),
            staged: None,
            rehearsal: Rehearsal::new(),
        })
    }

    /// Address range of the slot pool (for zero-copy checks).
    pub fn pool_range(&self) -> std::ops::Range<usize> {
        self.pool.range()
    }

    /// How long a loan waits for a free slot.
    pub fn loan_timeout(&self) -> Duration {
        self.loan_timeout
    }

    fn collect(&mut self) {
        self.scratch.clear();
        self.ctrl.collect_releases(&mut self.scratch);
        for &s in &self.scratch {
            // A slot the receiver did not hold is ignored (never double-freed).
            if (s as usize) < self.in_flight.len() && self.in_flight[s as usize] {
                self.in_flight[s as usize] = false;
                self.free.push(s);
            }
        }
    }

    /// Block until `ready` holds, the peer dies, or the loan timeout passes.
    fn wait_for(
        &mut self,
        what: &'static str,
        mut ready: impl FnMut(&mut Self) -> bool,
    ) -> Result<()> {
        let deadline = crate::deadline::from_now(self.loan_timeout);
        loop {
            if ready(self) {
                return Ok(());
            }
            if self.io.peer_closed() {
                // The receiver is gone: every slot is ours again.
                self.free = (0..self.slots).rev().collect();
                self.in_flight.iter_mut().for_each(|f| *f = false);
                return Err(TransportError::PeerGone(
                    "receiver closed the session".into(),
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Timeout(self.loan_timeout, what));
            }
            self.ctrl.set_tx_waiting(true);
            if ready(self) {
                self.ctrl.set_tx_waiting(false);
                return Ok(());
            }
            let slice = left.min(Duration::from_millis(50));
            let woke = wait_any(&[self.released.fd().as_fd(), self.io.fd()], slice);
            self.ctrl.set_tx_waiting(false);
            self.released.drain();
            woke?;
        }
    }

    /// Memory for one message of `len` bytes: a free slot, or a dedicated segment
    /// when `len` exceeds the slot size. While all slots are in flight it waits for
    /// a release up to the loan timeout (backpressure) when `wait` is set, and
    /// returns `None` otherwise.
    pub fn acquire(&mut self, len: usize, wait: bool) -> Result<Option<Region>> {
        if self.io.peer_closed() {
            return Err(TransportError::PeerGone(
                "receiver closed the session".into(),
            ));
        }
        let region = if len > self.slot_size {
            let fd = segment::create_memfd("avp-dedicated", page_up(len.max(1)))?;
            let map = Mapping::map(&fd, 0, page_up(len.max(1)), true)?;
            Region::Dedicated { fd, map }
        } else {
            self.collect();
            if self.free.is_empty() {
                if !wait {
                    return Ok(None);
                }
                self.wait_for("a free shared-memory slot", |s| {
                    s.collect();
                    !s.free.is_empty()
                })?;
            }
            let index = self.free.pop().expect("a free slot");
            self.in_flight[index as usize] = true;
            // SAFETY: index < slots, so the slot lies inside the pool mapping.
            let ptr = unsafe {
                self.pool
                    .ptr()
                    .add(CONTROL_LEN + index as usize * self.slot_size)
            };
            Region::Slot { index, ptr }
        };
        let slot = match &region {
            Region::Slot { index, .. } => *index,
            Region::Dedicated { .. } => u32::MAX,
        };
        if self.ctrl.begin(self.head, slot) {
            self.published.notify();
        }
        Ok(Some(region))
    }

    /// Descriptors that become readable when a slot may have been released or the
    /// receiver left (for async waiting). Set [`Self::set_waiting`] first.
    pub fn wait_fds(&self) -> [BorrowedFd<'_>; 2] {
        [self.released.fd().as_fd(), self.io.fd()]
    }

    /// Tell the receiver to ring the "released" doorbell (`true`) or not.
    pub fn set_waiting(&self, waiting: bool) {
        self.ctrl.set_tx_waiting(waiting);
        if !waiting {
            self.released.drain();
        }
    }

    /// Give back a region that will not be sent.
    pub fn abandon(&mut self, region: Region) {
        if self.staged.take().is_some() {
            self.ctrl.unstage();
        }
        self.ctrl.cancel(self.head);
        if let Region::Slot { index, .. } = region {
            self.in_flight[index as usize] = false;
            self.free.push(index);
        }
    }

    /// Get a finished message ready to go, so that [`publish`](Self::publish)
    /// has only to announce it: write its ring entry now (a pool slot, room in
    /// the ring; otherwise `publish` does the whole work), and rehearse the
    /// announcement on the private block so that the real one runs
    /// instructions that ran a moment ago. Nothing here is visible to the
    /// receiver.
    ///
    /// Writing a large message takes milliseconds and leaves caches and TLBs
    /// cold (see `ShmReceiver::keep_warm`); whatever the sender touches between
    /// `send` and the announcement delays the handoff, so it is done here,
    /// before `send`, instead.
    pub fn stage(&mut self, region: &Region, len: usize) {
        self.staged = None;
        if let Region::Slot { index, .. } = *region
            && has_room(&self.ctrl, self.head)
        {
            let entry = Entry {
                slot: index,
                flags: 0,
                len: len as u64,
            };
            self.ctrl.stage(self.head, entry);
            self.staged = Some(entry);
        }
        std::hint::black_box(commit(&self.rehearsal.control(), std::hint::black_box(0)));
    }

    /// Publish `len` bytes written into `region`.
    ///
    /// A message [`stage`](Self::stage)d for this very region and length is
    /// announced with one store; anything else goes through `publish_slow`.
    #[inline]
    pub fn publish(&mut self, region: Region, len: usize) -> Result<()> {
        if let Region::Slot { index, .. } = region
            && let Some(entry) = self.staged.take()
            && entry.slot == index
            && entry.len == len as u64
        {
            let wake = commit(&self.ctrl, self.head);
            self.head += 1;
            if wake {
                self.published.notify();
            }
            return Ok(());
        }
        self.publish_slow(region, len)
    }

    /// Whether the ring has room for one more entry. A tail ahead of the head
    /// (a receiver writing nonsense) reads as a full ring, which
    /// `publish_slow` then reports as a `Segment` error.
    #[inline]
    fn ring_has_room(&self) -> bool {
        has_room(&self.ctrl, self.head)
    }

    /// [`publish`](Self::publish) for a message that was not staged: the ring
    /// was full at `stage`, or the message is in a dedicated segment.
    #[inline(never)]
    fn publish_slow(&mut self, region: Region, len: usize) -> Result<()> {
        if !self.ring_has_room() {
            let tail = self.ctrl.tail();
            if tail > self.head {
                return Err(TransportError::Segment(format!(
                    "the receiver's ring tail {tail} is ahead of the head {}",
                    self.head
                )));
            }
            self.wait_for("room in the shared-memory ring", |s| s.ring_has_room())?;
        }
        let entry = match region {
            Region::Slot { index, .. } => Entry {
                slot: index,
                flags: 0,
                len: len as u64,
            },
            Region::Dedicated { fd, map } => {
                drop(map);
                // The descriptor travels first, so it is there when the entry is read.
                self.io
                    .send_frame(&Frame::Dedicated { len: len as u64 }, &[fd.as_raw_fd()])?;
                Entry {
                    slot: u32::MAX,
                    flags: DEDICATED,
                    len: len as u64,
                }
            }
        };
        if self.ctrl.publish(self.head, entry) {
            self.published.notify();
        }
        self.head += 1;
        Ok(())
    }
}

/// Whether `ctrl`'s ring has room for entry number `head`. A tail ahead of the
/// head (which only a misbehaving receiver writes) reads as a full ring.
#[inline]
fn has_room(ctrl: &Control, head: u64) -> bool {
    head.wrapping_sub(ctrl.tail()) < RING as u64
}

/// Announce the entry staged as number `head` on `ctrl`: `true` when the
/// receiver sleeps and needs its doorbell. Out of line: `ShmSender::stage`
/// runs these very instructions on its rehearsal block just before the real
/// announcement.
#[inline(never)]
fn commit(ctrl: &Control, head: u64) -> bool {
    ctrl.commit(head)
}

/// Prefetch `STACK_WARM_BYTES` of stack from this function's own frame up, so
/// that returning a message through the frames above the waiting loop does not
/// pay a cache miss per frame (0.2–0.3 µs at 64–256 MiB on a shared host, where a
/// line left alone for milliseconds is evicted). Out of line, so its frame lies
/// below the loop's.
#[inline(never)]
fn warm_callers_stack() {
    #[cfg(target_arch = "x86_64")]
    {
        let marker = 0u8;
        let frame = std::hint::black_box(&marker) as *const u8;
        for offset in (0..STACK_WARM_BYTES).step_by(64) {
            let line = frame.wrapping_add(offset) as *const i8;
            // SAFETY: a prefetch is a hint: it never faults (past the top of the
            // stack it is dropped), reads nothing into the program and changes
            // no memory.
            unsafe { std::arch::x86_64::_mm_prefetch(line, std::arch::x86_64::_MM_HINT_T0) };
        }
    }
}

/// Where a received message lives.
pub(crate) enum Held {
    /// A pool slot, released to the sender when the guard drops.
    Slot(u32),
    /// A dedicated segment, unmapped when the guard drops (the mapping is
    /// held for its `Drop`).
    Dedicated { _map: Mapping },
    /// The session's stand-in message (see `ShmReceiver::keep_warm`): nothing
    /// to give back.
    StandIn,
    /// A message the sender has staged but not yet published (see
    /// `ShmReceiver::pull_staged`): validated ahead, never handed out, nothing
    /// to give back.
    Staged,
}

/// A message the ring handed over: what holds it, where it starts, its length.
pub(crate) type Popped = (Held, *const u8, usize);

/// What the receiving endpoint does with a popped message: validate it, wrap it
/// in a guard. `ShmReceiver::keep_warm` also runs it on the session's stand-in
/// message, so that the whole path from the ring to the caller is cached when a
/// message arrives.
pub(crate) type Deliver<'a, T> = &'a dyn Fn(Popped) -> Result<T>;

/// The receiving half of a shared-memory session.
pub struct ShmReceiver {
    io: RefCell<PacketIo>,
    _ctrl_map: Mapping,
    data: Mapping,
    ctrl: Control,
    slots: u32,
    slot_size: usize,
    tail: Cell<u64>,
    published: Event,
    released: Event,
    spin: Duration,
    max_message: u64,
    /// When [`Self::keep_warm`] last ran (paces it while spinning).
    warmed: Cell<Instant>,
    /// When `try_recv` last asked the socket whether the sender left.
    peer_checked: Cell<Instant>,
    /// A tiny valid message of the session, delivered (validated, wrapped in a
    /// guard, dropped) by `keep_warm`.
    stand_in: Vec<u8>,
    /// Number + 1 of the message `pull_staged` validated ahead last.
    pulled: Cell<u64>,
}

impl ShmReceiver {
    /// Read the sender's `Pool` frame, check and map the pool. `stand_in` is a
    /// small valid message of the session, which `keep_warm` delivers.
    pub fn new(
        mut io: PacketIo,
        timeout: Duration,
        spin: Duration,
        max_message: u64,
        stand_in: Vec<u8>,
    ) -> Result<ShmReceiver> {
        let (frame, mut fds) = io.recv_frame(timeout)?;
        let Frame::Pool {
            slots,
            slot_size,
            ring,
        } = frame
        else {
            return Err(TransportError::Protocol(format!(
                "expected Pool, got {frame:?}"
            )));
        };
        if fds.len() != 3
            || ring != RING
            || slots == 0
            || slots > RING / 2
            || slot_size == 0
            || slot_size % 4096 != 0
        {
            return Err(TransportError::Segment(format!(
                "bad pool: {slots} slots of {slot_size} bytes, ring {ring}, {} descriptors",
                fds.len()
            )));
        }
        let total = (slots as u64)
            .checked_mul(slot_size)
            .and_then(|n| n.checked_add(CONTROL_LEN as u64))
            .filter(|&n| n <= isize::MAX as u64)
            .ok_or_else(|| TransportError::Segment("pool size overflows".into()))?
            as usize;
        let released = Event::from_fd(fds.pop().expect("3 fds"));
        let published = Event::from_fd(fds.pop().expect("3 fds"));
        let memfd = fds.pop().expect("3 fds");
        segment::check_memfd(&memfd, total)?;
        let ctrl_map = Mapping::map(&memfd, 0, CONTROL_LEN, true)?;
        let data = Mapping::map(&memfd, CONTROL_LEN, total - CONTROL_LEN, false)?;
        // SAFETY: ctrl_map is a page of shared memory that lives as long as the receiver.
        let ctrl = unsafe { Control::new(ctrl_map.ptr()) };
        if !ctrl.check(slots, slot_size) {
            return Err(TransportError::Segment(
                "control block does not match the Pool frame".into(),
            ));
        }
        Ok(ShmReceiver {
            io: RefCell::new(io),
            _ctrl_map: ctrl_map,
            data,
            ctrl,
            slots,
            slot_size: slot_size as usize,
            tail: Cell::new(0),
            published,
            released,
            spin,
            max_message,
            warmed: Cell::new(Instant::now()),
            peer_checked: Cell::new(Instant::now()),
            stand_in,
            pulled: Cell::new(0),
        })
    }

    /// Address range of the mapped slots (for zero-copy checks).
    pub fn pool_range(&self) -> std::ops::Range<usize> {
        self.data.range()
    }

    /// Check a ring entry and locate its message. Out of line: `keep_warm` runs
    /// it on a stand-in entry, and must warm the copy that real entries take.
    #[inline(never)]
    fn take(&self, e: Entry) -> Result<(Held, *const u8, usize)> {
        if e.len > self.max_message {
            return Err(TransportError::TooLarge {
                size: e.len,
                limit: self.max_message,
            });
        }
        if e.flags == DEDICATED {
            let (frame, mut fds) = self.io.borrow_mut().recv_frame(Duration::from_secs(5))?;
            let Frame::Dedicated { len } = frame else {
                return Err(TransportError::Protocol(format!(
                    "expected Dedicated, got {frame:?}"
                )));
            };
            let (Some(fd), true) = (fds.pop(), len == e.len && fds.is_empty()) else {
                return Err(TransportError::Protocol(
                    "dedicated segment frame does not match the ring".into(),
                ));
            };
            let size = page_up((len as usize).max(1));
            segment::check_memfd(&fd, size)?;
            let map = Mapping::map(&fd, 0, size, false)?;
            let ptr = map.ptr();
            return Ok((Held::Dedicated { _map: map }, ptr, len as usize));
        }
        if e.flags != 0 || e.slot >= self.slots || e.len as usize > self.slot_size {
            return Err(TransportError::Segment(format!(
                "ring entry out of bounds: slot {} of {}, {} bytes of {}",
                e.slot, self.slots, e.len, self.slot_size
            )));
        }
        // SAFETY: slot < slots and len <= slot_size, so the range is inside `data`.
        let ptr = unsafe { self.data.ptr().add(e.slot as usize * self.slot_size) };
        Ok((Held::Slot(e.slot), ptr, e.len as usize))
    }

    #[inline]
    fn pop(&self) -> Result<Option<Popped>> {
        let tail = self.tail.get();
        match self.ctrl.peek(tail).map_err(TransportError::Segment)? {
            None => Ok(None),
            Some(e) => {
                self.tail.set(tail + 1);
                self.ctrl.consume(tail + 1);
                self.take(e).map(Some)
            }
        }
    }

    /// The next message, delivered, if one is published; `PeerGone` if none is
    /// and the sender left. Made to be polled: whether the sender left is asked
    /// of the socket (a system call) at most once a millisecond, and while the
    /// sender writes, the receive path is re-touched (the stand-in delivered) every
    /// 20 µs, as in `recv`. `now` is the caller's reading of the clock (one per
    /// poll is enough).
    pub(crate) fn try_recv<T>(&self, now: Instant, deliver: Deliver<'_, T>) -> Result<Option<T>> {
        if let Some(m) = self.pop()? {
            return deliver(m).map(Some);
        }
        self.pace_warming(now, deliver);
        if now.saturating_duration_since(self.peer_checked.get()) < PEER_CHECK_EVERY {
            return Ok(None);
        }
        self.peer_checked.set(now);
        self.try_recv_checked()?.map(deliver).transpose()
    }

    /// [`try_recv`](Self::try_recv) that always asks the socket whether the
    /// sender left (before going to sleep on it).
    pub(crate) fn try_recv_checked(&self) -> Result<Option<Popped>> {
        if let Some(m) = self.pop()? {
            return Ok(Some(m));
        }
        if self.io.borrow().peer_closed()
            && self
                .ctrl
                .peek(self.tail.get())
                .map_err(TransportError::Segment)?
                .is_none()
        {
            return Err(TransportError::PeerGone("sender closed the session".into()));
        }
        Ok(None)
    }

    /// Whether the sender is writing a message now (worth waiting awake for).
    pub fn sender_writing(&self) -> bool {
        self.ctrl.producing()
    }

    /// Ask the sender to ring the "published" doorbell (`true`) or not.
    pub fn set_waiting(&self, waiting: bool) {
        self.ctrl.set_rx_waiting(waiting);
        if !waiting {
            self.published.drain();
        }
    }

    /// Raw descriptors that become readable on a publish or when the sender leaves.
    pub fn wait_raw_fds(&self) -> [std::os::fd::RawFd; 2] {
        [
            self.published.fd().as_raw_fd(),
            self.io.borrow().fd().as_raw_fd(),
        ]
    }

    /// Wait for the next message and deliver it: spin for the configured time,
    /// then sleep on the doorbell; a closed socket means the sender is gone.
    ///
    /// `deliver` runs what the caller does with a message once it has one, also
    /// on a stand-in, every 20 µs while the sender writes, so that it is still
    /// cached when the message arrives (see "Staying warm" in spec/transport.md).
    ///
    /// The spinning part is inlined (through [`Receiver::recv`](crate::Receiver::recv))
    /// into the code that waits for the message, so that a delivered message
    /// returns into instructions that ran a moment ago. Out of line, returning
    /// after a wait of milliseconds went through code and pages untouched all
    /// that time: 0.6–1.2 µs of a 256 MiB handoff in per-stage timestamps,
    /// about 0.35 µs inlined.
    #[inline]
    pub(crate) fn recv<T>(&self, timeout: Duration, deliver: Deliver<'_, T>) -> Result<T> {
        let start = Instant::now();
        let spin_until = crate::deadline::after(start, self.spin.min(timeout));
        let mut n = 0u32;
        loop {
            if let Some(m) = self.pop()? {
                return deliver(m);
            }
            let now = Instant::now();
            if now >= spin_until {
                return self.recv_wait(start, timeout, deliver);
            }
            std::hint::spin_loop();
            n = n.wrapping_add(1);
            self.pace_warming(now, deliver);
            // In long spins, look for a dead peer now and then.
            if n.is_multiple_of(100_000) {
                self.check_sender_left()?;
            }
        }
    }

    /// `PeerGone` if the sender left with nothing published.
    #[inline(never)]
    fn check_sender_left(&self) -> Result<()> {
        if self.io.borrow().peer_closed()
            && self.ctrl.peek(self.tail.get()).ok().flatten().is_none()
        {
            return Err(TransportError::PeerGone("sender closed the session".into()));
        }
        Ok(())
    }

    /// The rest of [`recv`](Self::recv) once the spin time is over: wait awake
    /// while the sender writes, else sleep on the doorbell.
    #[inline(never)]
    fn recv_wait<T>(
        &self,
        start: Instant,
        timeout: Duration,
        deliver: Deliver<'_, T>,
    ) -> Result<T> {
        loop {
            if let Some(m) = self.pop()? {
                return deliver(m);
            }
            let now = Instant::now();
            let left = timeout.saturating_sub(now - start);
            if left.is_zero() {
                return Err(TransportError::Timeout(timeout, "a message"));
            }
            if self.ctrl.producing() {
                // The sender is writing a message: wait awake, yielding the core.
                if let Some(m) = self.await_production(start, timeout, deliver)? {
                    return deliver(m);
                }
                continue;
            }
            self.ctrl.set_rx_waiting(true);
            if let Some(m) = self.pop()? {
                self.ctrl.set_rx_waiting(false);
                return deliver(m);
            }
            if self.ctrl.producing() {
                self.ctrl.set_rx_waiting(false);
                continue;
            }
            let woke = {
                let io = self.io.borrow();
                wait_any(
                    &[self.published.fd().as_fd(), io.fd()],
                    left.min(Duration::from_millis(100)),
                )
            };
            self.ctrl.set_rx_waiting(false);
            self.published.drain();
            woke?;
            if self
                .ctrl
                .peek(self.tail.get())
                .map_err(TransportError::Segment)?
                .is_none()
                && self.io.borrow().peer_closed()
            {
                return Err(TransportError::PeerGone("sender closed the session".into()));
            }
        }
    }

    /// Run `keep_warm` if the sender is writing and it has not run for
    /// `WARM_EVERY`. Warming takes a few hundred nanoseconds, during which a
    /// publish goes unseen, so it runs rarely; what it touches stays cached for
    /// about a millisecond even on a busy host.
    ///
    /// It also validates ahead a message the sender has staged
    /// ([`pull_staged`](Self::pull_staged)), which costs nothing until one is.
    #[inline]
    fn pace_warming<T>(&self, now: Instant, deliver: Deliver<'_, T>) {
        self.pull_staged(deliver);
        if now.saturating_duration_since(self.warmed.get()) >= WARM_EVERY && self.ctrl.producing() {
            self.keep_warm(deliver);
            self.warmed.set(now);
        }
    }

    /// Once the sender has staged the next message (its entry is in `newest`
    /// before the head moves; see `ShmSender::stage`), validate it ahead, once:
    /// `deliver` gets it as `Held::Staged`, which the endpoint validates and
    /// remembers without handing anything out. Validating then overlaps the
    /// sender's own last steps (checking its message, calling `send`); when
    /// the head moves, the endpoint compares the message's preamble and header
    /// with what it validated and, if they are the same bytes, skips parsing
    /// them again. Nothing read here is trusted: a mismatch, or anything out
    /// of bounds, just means the message is validated as usual.
    #[inline]
    fn pull_staged<T>(&self, deliver: Deliver<'_, T>) {
        let next = self.tail.get();
        if self.pulled.get() != next + 1
            && let Some(e) = self.ctrl.staged(next)
        {
            self.pulled.set(next + 1);
            self.validate_staged(e, deliver);
        }
    }

    /// The validation of [`pull_staged`](Self::pull_staged), out of line.
    ///
    /// Messages of every size are validated ahead: after writing a large
    /// message the sender's own last steps (checking its message, calling
    /// `send`) run cold and took 1.4–10 µs at 64–256 MiB in per-stage
    /// timestamps, longer than validating ahead (0.4–1.9 µs). Spin p50: 1 MiB
    /// 0.66 → 0.37–0.48 µs when it came; at 64 and 256 MiB, the medians of six
    /// alternating runs went 1.07 → 0.77 µs and 1.55 → 0.97 µs.
    #[inline(never)]
    fn validate_staged<T>(&self, e: Entry, deliver: Deliver<'_, T>) {
        if e.slot >= self.slots || e.len as usize > self.slot_size || e.len > self.max_message {
            return;
        }
        // SAFETY: slot < slots, so the slot lies inside the read-only data mapping.
        let ptr = unsafe { self.data.ptr().add(e.slot as usize * self.slot_size) };
        drop(deliver((Held::Staged, ptr, e.len as usize)));
    }

    /// While a message is being written, keep cached what receiving it will
    /// touch: the translation of the slot's first page (where the header will
    /// be), this receiver's bounds checks, the endpoint's delivery path
    /// (`deliver`: validating a message and wrapping it in a guard) on the
    /// session's stand-in message, and the stack frames above the wait. Writing a large
    /// message takes milliseconds, long enough for caches and TLBs to lose all of
    /// it (other work on the core, a write larger than the last-level cache);
    /// touching it again afterwards costs a cold page walk per page, a few
    /// hundred nanoseconds each under nested paging. Nothing here changes state.
    #[inline(never)]
    fn keep_warm<T>(&self, deliver: Deliver<'_, T>) {
        let slot = self.ctrl.writing_slot();
        if slot < self.slots {
            // SAFETY: slot < slots, so the byte lies inside the read-only data mapping.
            let _ = unsafe {
                std::ptr::read_volatile(self.data.ptr().add(slot as usize * self.slot_size))
            };
            let stand_in = Entry {
                slot,
                flags: 0,
                len: 0,
            };
            // A stand-in entry of a pool slot only computes a pointer (a pool
            // slot is released by the guard, not by dropping `Held::Slot`).
            std::hint::black_box(self.take(std::hint::black_box(stand_in)).is_ok());
        }
        // The stand-in's guard releases nothing when it drops.
        let stand_in = (Held::StandIn, self.stand_in.as_ptr(), self.stand_in.len());
        drop(std::hint::black_box(deliver(stand_in)));
        warm_callers_stack();
    }

    /// While the sender is writing, poll the ring, keeping the receive path warm
    /// and yielding the core every 64 looks. `None` when writing stopped unpublished.
    fn await_production<T>(
        &self,
        start: Instant,
        timeout: Duration,
        deliver: Deliver<'_, T>,
    ) -> Result<Option<Popped>> {
        let mut n = 0u32;
        while self.ctrl.producing() {
            if let Some(m) = self.pop()? {
                return Ok(Some(m));
            }
            self.pace_warming(Instant::now(), deliver);
            // Look often (a sched_yield costs about a microsecond in a VM), and
            // give the core away now and then.
            n = n.wrapping_add(1);
            if n.is_multiple_of(64) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
            if n.is_multiple_of(4096) {
                if start.elapsed() >= timeout {
                    return Err(TransportError::Timeout(timeout, "a message"));
                }
                if self.io.borrow().peer_closed() {
                    return Err(TransportError::PeerGone("sender closed the session".into()));
                }
            }
        }
        self.pop()
    }

    /// Return a slot to the sender.
    pub(crate) fn release(&self, held: Held) {
        if let Held::Slot(s) = held
            && self.ctrl.release(s)
        {
            self.released.notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private control block to exercise, and a pool-slot entry of 4 KiB.
    fn block_and_entry(slot: u32) -> (Rehearsal, Entry) {
        let e = Entry {
            slot,
            flags: 0,
            len: 4096,
        };
        (Rehearsal::new(), e)
    }

    #[test]
    fn a_staged_entry_is_unseen_until_committed() {
        let (block, e) = block_and_entry(3);
        let ctrl = &block.control();
        ctrl.stage(0, e);
        assert_eq!(ctrl.peek(0), Ok(None), "staged, not announced");
        assert!(!commit(ctrl, 0));
        assert_eq!(ctrl.peek(0), Ok(Some(e)));
        // Staging the next entry while the receiver is one behind: the ring
        // answers for the older entry, not the staged `newest`.
        let next = Entry { slot: 1, ..e };
        ctrl.stage(1, next);
        assert_eq!(ctrl.peek(0), Ok(Some(e)));
        ctrl.consume(1);
        assert_eq!(ctrl.peek(1), Ok(None));
        // A sleeping receiver is reported, so that its doorbell gets rung.
        ctrl.set_rx_waiting(true);
        assert!(commit(ctrl, 1));
        assert_eq!(ctrl.peek(1), Ok(Some(next)));
    }

    #[test]
    fn a_withdrawn_staged_entry_is_no_longer_announced() {
        let (block, e) = block_and_entry(1);
        let ctrl = &block.control();
        ctrl.stage(0, e);
        assert_eq!(ctrl.staged(0), Some(e));
        assert_eq!(ctrl.staged(1), None, "only under its own number");
        ctrl.unstage();
        assert_eq!(ctrl.staged(0), None);
        assert_eq!(ctrl.peek(0), Ok(None));
    }

    #[test]
    fn room_is_only_where_the_tail_allows() {
        let block = Rehearsal::new();
        let ctrl = &block.control();
        assert!(has_room(ctrl, 0));
        assert!(!has_room(ctrl, RING as u64), "RING entries ahead: full");
        // A tail ahead of the head reads as full, never as room.
        ctrl.consume(10);
        assert!(!has_room(ctrl, 5));
    }
}
