//! The sending half of a shared-memory session: owns the pool, loans slots,
//! publishes on the ring.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use crate::error::{Result, TransportError};
use crate::frame::{Frame, FrameIo};
use crate::port::{AcquireArmed, Counters, LoanMem, SendPort};

use crate::device::pool::{DeviceKeep, DevicePool};

use super::control::{CONTROL_LEN, Control, DEDICATED, DEVICE, Entry, RING};
use super::packet::PacketIo;
use super::segment::{self, Event, Mapping, page_size, page_up};

/// The key of a loan in a dedicated segment (pool slots are their index).
const DEDICATED_KEY: u64 = u64::MAX;

/// Longest single sleep while waiting for a slot (the peer is re-checked between).
const WAIT_SLICE: Duration = Duration::from_millis(50);

/// Where the slots start in the pool: the first page boundary after the
/// control block (the same on both ends of a host).
pub(crate) fn data_offset() -> usize {
    page_up(CONTROL_LEN)
}

/// The sending half of a shared-memory session.
pub(crate) struct ShmSender {
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
    /// The device pool of a `cuda` session.
    device: Option<DevicePool>,
    counters: Counters,
}

impl ShmSender {
    /// Create the pool (`slots` × `slot_size`, pre-faulted) and hand it to the
    /// receiver, then the device pool if the session has one (`device`: the
    /// device and its slot size). `slots` must be 1..=32 and `slot_size` at
    /// least a page (it is rounded up to whole pages).
    pub(crate) fn new(
        mut io: PacketIo,
        slots: usize,
        slot_size: usize,
        loan_timeout: Duration,
        device: Option<(std::sync::Arc<dyn crate::device::DeviceMem>, usize)>,
    ) -> Result<ShmSender> {
        let max_slots = RING as usize / 2;
        if !(1..=max_slots).contains(&slots) {
            return Err(TransportError::InvalidOption {
                option: "shm slots",
                reason: format!("expected 1..={max_slots}, found {slots}"),
            });
        }
        let slots = slots as u32;
        let device = device
            .map(|(mem, size)| DevicePool::create(mem, slots, size))
            .transpose()?;
        let slot_size = page_up(slot_size.max(page_size()));
        let total = data_offset() + slots as usize * slot_size;
        let fd = segment::create_memfd("avp-pool", total)?;
        let pool = Mapping::map(&fd, 0, total, true)?;
        // Touch every page once so neither side pays first-touch faults while sending.
        for off in (0..total).step_by(page_size()) {
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
        if let Some(d) = &device {
            d.send(&mut io)?;
        }
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
            device,
            counters: Counters::default(),
        })
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

    fn peer_gone(&mut self) -> TransportError {
        // The receiver is gone: every slot is ours again.
        self.free = (0..self.slots).rev().collect();
        self.in_flight.iter_mut().for_each(|f| *f = false);
        TransportError::PeerGone("receiver closed the session".into())
    }

    /// Block until `ready` holds, the peer dies, or the loan timeout passes.
    fn wait_for(
        &mut self,
        what: &'static str,
        mut ready: impl FnMut(&mut Self) -> bool,
    ) -> Result<()> {
        let deadline = crate::wait::from_now(self.loan_timeout);
        loop {
            if ready(self) {
                return Ok(());
            }
            if self.io.peer_closed() {
                return Err(self.peer_gone());
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
            let woke = crate::wait::readable(
                &[self.released.fd().as_fd(), self.io.fd()],
                left.min(WAIT_SLICE),
            );
            self.ctrl.set_tx_waiting(false);
            self.released.drain();
            woke?;
        }
    }

    /// A free slot as a loan, if there is one.
    fn take_slot(&mut self) -> Option<LoanMem> {
        self.collect();
        let index = self.free.pop()?;
        self.in_flight[index as usize] = true;
        // SAFETY: index < slots, so the slot lies inside the pool mapping.
        let ptr = unsafe {
            self.pool
                .ptr()
                .add(data_offset() + index as usize * self.slot_size)
        };
        let ptr = NonNull::new(ptr).expect("a mapping is never at address 0");
        Some(LoanMem::new(ptr, self.slot_size, index as u64, None))
    }

    /// Announce that the message in `mem` is being written (a sleeping
    /// receiver is woken, so that its wake-up overlaps the writing).
    fn begin(&mut self, mem: &LoanMem) {
        let slot = u32::try_from(mem.key).unwrap_or(u32::MAX);
        if self.ctrl.begin(self.head, slot) {
            Counters::bump(&self.counters.doorbells);
            self.published.notify();
        }
    }

    fn ring_has_room(&self) -> bool {
        has_room(&self.ctrl, self.head)
    }

    /// [`SendPort::publish`] for a message that was not staged: the ring was
    /// full at `stage`, or the message is in a dedicated segment. On an error
    /// the memory goes back, as when abandoned.
    fn publish_slow(&mut self, mut mem: LoanMem, len: usize) -> Result<()> {
        let r = self.try_publish_slow(&mut mem, len);
        if r.is_err() {
            self.abandon(mem);
        }
        r
    }

    fn try_publish_slow(&mut self, mem: &mut LoanMem, len: usize) -> Result<()> {
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
        let entry = if let Some(keep) = mem.take_keep::<DeviceKeep>() {
            let fd = keep
                .fd
                .as_ref()
                .expect("a sender's dedicated region is exported");
            // The descriptor travels first, so it is there when the entry is
            // read; in flight, it keeps the allocation alive after `keep` drops.
            self.io.send_frame(
                &Frame::DeviceDedicated {
                    len: len as u64,
                    size: keep.region.len() as u64,
                },
                &[fd.as_raw_fd()],
            )?;
            Counters::bump(&self.counters.dedicated);
            Entry {
                slot: mem.key as u32,
                flags: DEVICE | DEDICATED,
                len: len as u64,
            }
        } else if mem.key == DEDICATED_KEY {
            let Some((fd, map)) = mem.take_keep::<(OwnedFd, Mapping)>() else {
                unreachable!("a dedicated loan keeps its segment");
            };
            drop(map);
            // The descriptor travels first, so it is there when the entry is read.
            self.io
                .send_frame(&Frame::Dedicated { len: len as u64 }, &[fd.as_raw_fd()])?;
            Counters::bump(&self.counters.dedicated);
            Entry {
                slot: u32::MAX,
                flags: DEDICATED,
                len: len as u64,
            }
        } else {
            Entry {
                slot: mem.key as u32,
                flags: entry_flags(mem),
                len: len as u64,
            }
        };
        if self.ctrl.publish(self.head, entry) {
            Counters::bump(&self.counters.doorbells);
            self.published.notify();
        }
        self.head += 1;
        Ok(())
    }
}

impl SendPort for ShmSender {
    /// A free slot, or a dedicated segment when `len` exceeds the slot size.
    /// While all slots are in flight it waits for a release up to the loan
    /// timeout (backpressure) when `wait` is set.
    fn acquire(&mut self, len: usize, wait: bool) -> Result<Option<LoanMem>> {
        if self.io.peer_closed() {
            return Err(self.peer_gone());
        }
        let mem = if len > self.slot_size {
            let size = page_up(len.max(1));
            let fd = segment::create_memfd("avp-dedicated", size)?;
            let map = Mapping::map(&fd, 0, size, true)?;
            let ptr = NonNull::new(map.ptr()).expect("a mapping is never at address 0");
            LoanMem::new(ptr, size, DEDICATED_KEY, Some(Box::new((fd, map))))
        } else {
            match self.take_slot() {
                Some(m) => m,
                None if !wait => return Ok(None),
                None => {
                    self.wait_for("a free shared-memory slot", |s| {
                        s.collect();
                        !s.free.is_empty()
                    })?;
                    self.take_slot().expect("a free slot")
                }
            }
        };
        self.begin(&mem);
        Ok(Some(mem))
    }

    /// Write the ring entry of a finished pool-slot message now, so that
    /// [`publish`](SendPort::publish) has only to move the head (one store).
    /// Nothing here is visible to the receiver: it reads entries below the
    /// head only.
    fn stage(&mut self, mem: &LoanMem, len: usize) {
        self.staged = None;
        let device_dedicated = mem.keep.as_ref().is_some_and(|k| k.is::<DeviceKeep>());
        if mem.key != DEDICATED_KEY && !device_dedicated && self.ring_has_room() {
            let entry = Entry {
                slot: mem.key as u32,
                flags: entry_flags(mem),
                len: len as u64,
            };
            self.ctrl.stage(self.head, entry);
            self.staged = Some(entry);
        }
    }

    fn publish(&mut self, mem: LoanMem, len: usize) -> Result<()> {
        Counters::bump(&self.counters.messages);
        if mem.device.is_some() {
            Counters::bump(&self.counters.device_messages);
        }
        if let Some(entry) = self.staged.take()
            && u64::from(entry.slot) == mem.key
            && entry.len == len as u64
            && entry.flags == entry_flags(&mem)
        {
            Counters::bump(&self.counters.staged_publishes);
            let wake = self.ctrl.commit(self.head);
            self.head += 1;
            if wake {
                Counters::bump(&self.counters.doorbells);
                self.published.notify();
            }
            return Ok(());
        }
        self.publish_slow(mem, len)
    }

    /// A host slot for the preamble and header, and the device slot of the
    /// same index for the sections (or a dedicated device allocation when
    /// `len` exceeds a device slot).
    fn acquire_device(&mut self, len: usize, prefix_len: usize) -> Result<Option<LoanMem>> {
        let Some(pool) = &self.device else {
            return Ok(None);
        };
        if prefix_len > self.slot_size {
            return Err(TransportError::TooLarge {
                size: prefix_len as u64,
                limit: self.slot_size as u64,
            });
        }
        let dedicated = if len > pool.slot_size() {
            Some(pool.dedicated(len)?)
        } else {
            None
        };
        let mut mem = self
            .acquire(prefix_len, true)?
            .expect("a waiting acquire yields memory");
        let pool = self.device.as_ref().expect("checked above");
        mem.device = Some(match dedicated {
            Some((span, keep)) => {
                mem.keep = Some(Box::new(keep));
                span
            }
            None => pool
                .slot(mem.key as u32, len)
                .expect("host and device slots pair up"),
        });
        Ok(Some(mem))
    }

    fn abandon(&mut self, mem: LoanMem) {
        if self.staged.take().is_some() {
            self.ctrl.unstage();
        }
        self.ctrl.cancel(self.head);
        // Only a slot still ours goes back (a session whose receiver left
        // has taken every slot back already).
        if mem.key != DEDICATED_KEY && self.in_flight[mem.key as usize] {
            self.in_flight[mem.key as usize] = false;
            self.free.push(mem.key as u32);
        }
    }

    fn loan_timeout(&self) -> Duration {
        self.loan_timeout
    }

    fn arm_acquire(&mut self, len: usize) -> Result<AcquireArmed> {
        if let Some(m) = self.acquire(len, false)? {
            return Ok(AcquireArmed::Ready(m));
        }
        self.ctrl.set_tx_waiting(true);
        if let Some(m) = self.acquire(len, false)? {
            self.ctrl.set_tx_waiting(false);
            return Ok(AcquireArmed::Ready(m));
        }
        Ok(AcquireArmed::Wait([
            self.released.fd().as_raw_fd(),
            self.io.fd().as_raw_fd(),
        ]))
    }

    fn disarm_acquire(&mut self) {
        self.ctrl.set_tx_waiting(false);
        self.released.drain();
    }

    fn receiver_shares_host(&self) -> bool {
        true
    }

    fn device(&self) -> Option<std::sync::Arc<dyn crate::device::DeviceMem>> {
        self.device.as_ref().map(|p| std::sync::Arc::clone(&p.mem))
    }

    fn pool_range(&self) -> Option<std::ops::Range<usize>> {
        Some(self.pool.range())
    }

    fn stats(&self) -> &Counters {
        &self.counters
    }
}

/// The ring-entry flags of a pool-slot message in `mem`.
fn entry_flags(mem: &LoanMem) -> u32 {
    if mem.device.is_some() { DEVICE } else { 0 }
}

/// Whether `ctrl`'s ring has room for entry number `head`. A tail ahead of the
/// head (which only a misbehaving receiver writes) reads as a full ring.
#[inline]
pub(crate) fn has_room(ctrl: &Control, head: u64) -> bool {
    head.wrapping_sub(ctrl.tail()) < RING as u64
}
