//! The receiving half of a shared-memory session: maps the sender's pool
//! read-only, takes messages off the ring, and gives slots back from any thread.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use crate::error::{Result, TransportError};
use crate::frame::{Frame, FrameIo};
use crate::port::{Armed, Counters, Delivery, Held, Idle, RecvPort};

use crate::device::DeviceMem;
use crate::device::pool::DevicePool;

use super::control::{CONTROL_LEN, Control, DEDICATED, DEVICE, Entry, RING};
use super::packet::PacketIo;
use super::segment::{self, Event, Mapping, page_size, page_up};
use super::sender::data_offset;

/// How often a waiting receiver runs its idle work while the sender writes.
const WARM_EVERY: Duration = Duration::from_micros(20);
/// How often a polling receiver asks the socket whether the sender left.
const PEER_CHECK_EVERY: Duration = Duration::from_millis(1);
/// Longest single sleep on the doorbell (the peer is re-checked between).
const SLEEP_SLICE: Duration = Duration::from_millis(100);
/// How long the dedicated segment's descriptor may trail its ring entry.
const DEDICATED_FRAME_WAIT: Duration = Duration::from_secs(5);
/// Spins between looks at whether the sender left, in a long spin.
const SPINS_PER_PEER_CHECK: u32 = 100_000;
/// Looks at the ring between yields while the sender writes.
const LOOKS_PER_YIELD: u32 = 64;
/// Looks at the ring between deadline and peer checks while the sender writes.
const LOOKS_PER_CHECK: u32 = 4096;

/// The key of a delivered dedicated segment (pool slots are their index).
const DEDICATED_KEY: u64 = u64::MAX;

/// What only one receiving thread at a time touches.
struct RxState {
    io: PacketIo,
    /// Messages taken off the ring.
    tail: u64,
    /// When `try_recv` last asked the socket whether the sender left.
    peer_checked: Instant,
    /// When the idle work last ran.
    warmed: Instant,
}

/// The receiving half of a shared-memory session.
pub(crate) struct ShmReceiver {
    state: Mutex<RxState>,
    io_fd: RawFd,
    _ctrl_map: Mapping,
    data: Mapping,
    ctrl: Control,
    slots: u32,
    slot_size: usize,
    published: Event,
    released: Event,
    /// Serialises writers of the release ring (guards dropped on any thread);
    /// held for a few stores, never while waiting.
    releasing: Mutex<()>,
    spin: Duration,
    max_message: u64,
    /// The sender's device pool, mapped (a `cuda` session).
    device: Option<DevicePool>,
    counters: Counters,
}

impl ShmReceiver {
    /// Read the sender's `Pool` frame, check and map the pool; then, with a
    /// `device`, its `DevicePool` frame, and import that pool.
    pub(crate) fn new(
        mut io: PacketIo,
        timeout: Duration,
        spin: Duration,
        max_message: u64,
        device: Option<Arc<dyn DeviceMem>>,
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
            || !slot_size.is_multiple_of(page_size() as u64)
        {
            return Err(TransportError::Segment(format!(
                "bad pool: {slots} slots of {slot_size} bytes, ring {ring}, {} descriptors",
                fds.len()
            )));
        }
        let offset = data_offset();
        let total = (slots as u64)
            .checked_mul(slot_size)
            .and_then(|n| n.checked_add(offset as u64))
            .filter(|&n| n <= isize::MAX as u64)
            .ok_or_else(|| TransportError::Segment("pool size overflows".into()))?
            as usize;
        let released = Event::from_fd(fds.pop().expect("3 fds"));
        let published = Event::from_fd(fds.pop().expect("3 fds"));
        let memfd = fds.pop().expect("3 fds");
        segment::check_memfd(&memfd, total)?;
        let ctrl_map = Mapping::map(&memfd, 0, page_up(CONTROL_LEN), true)?;
        let data = Mapping::map(&memfd, offset, total - offset, false)?;
        // SAFETY: ctrl_map is at least a CONTROL_LEN page of shared memory that
        // lives as long as the receiver.
        let ctrl = unsafe { Control::new(ctrl_map.ptr()) };
        if !ctrl.check(slots, slot_size) {
            return Err(TransportError::Segment(
                "control block does not match the Pool frame (or is another layout version)".into(),
            ));
        }
        let device = match device {
            Some(mem) => {
                let (frame, fds) = io.recv_frame(timeout)?;
                Some(DevicePool::receive(mem, frame, fds, slots, max_message)?)
            }
            None => None,
        };
        let io_fd = io.fd().as_raw_fd();
        Ok(ShmReceiver {
            state: Mutex::new(RxState {
                io,
                tail: 0,
                peer_checked: Instant::now(),
                warmed: Instant::now(),
            }),
            io_fd,
            _ctrl_map: ctrl_map,
            data,
            ctrl,
            slots,
            slot_size: slot_size as usize,
            published,
            released,
            releasing: Mutex::new(()),
            spin,
            max_message,
            device,
            counters: Counters::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, RxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Check a ring entry and locate its message. A refused entry gives its
    /// slot back (when it names one) and has its dedicated frame consumed
    /// first, so that the session goes on.
    fn take(&self, st: &mut RxState, e: Entry) -> Result<Delivery> {
        // The frame of a dedicated entry precedes it, whatever else is wrong.
        let frame = (e.flags & DEDICATED != 0)
            .then(|| st.io.recv_frame(DEDICATED_FRAME_WAIT))
            .transpose();
        let taken = frame.and_then(|frame| {
            if e.len > self.max_message {
                return Err(TransportError::TooLarge {
                    size: e.len,
                    limit: self.max_message,
                });
            }
            if e.flags & DEVICE != 0 {
                self.device_delivery(e, frame)
            } else {
                self.host_delivery(e, frame)
            }
        });
        // Pool-slot and device entries name a slot; a host dedicated one does not.
        if taken.is_err() && e.flags != DEDICATED && e.slot < self.slots {
            self.release(Held {
                key: u64::from(e.slot),
                keep: None,
            });
        }
        taken
    }

    /// [`take`](Self::take) of a host message, its dedicated frame (if any) read.
    fn host_delivery(
        &self,
        e: Entry,
        frame: Option<(Frame, Vec<std::os::fd::OwnedFd>)>,
    ) -> Result<Delivery> {
        if let Some((frame, mut fds)) = frame {
            let Frame::Dedicated { len } = frame else {
                return Err(TransportError::Protocol(format!(
                    "expected Dedicated, got {frame:?}"
                )));
            };
            let (Some(fd), true) = (
                fds.pop(),
                len == e.len && fds.is_empty() && e.flags == DEDICATED,
            ) else {
                return Err(TransportError::Protocol(
                    "dedicated segment frame does not match the ring".into(),
                ));
            };
            let size = page_up((len as usize).max(1));
            segment::check_memfd(&fd, size)?;
            let map = Mapping::map(&fd, 0, size, false)?;
            let ptr = map.ptr() as *const u8;
            return Ok(Delivery {
                held: Held {
                    key: DEDICATED_KEY,
                    keep: Some(Box::new(map)),
                },
                ptr,
                len: len as usize,
                peer_writable: true,
                device: None,
            });
        }
        if e.flags != 0 || e.slot >= self.slots || e.len as usize > self.slot_size {
            return Err(TransportError::Segment(format!(
                "ring entry out of bounds: slot {} of {}, {} bytes of {}",
                e.slot, self.slots, e.len, self.slot_size
            )));
        }
        // SAFETY: slot < slots and len <= slot_size, so the range is inside `data`.
        let ptr = unsafe { self.data.ptr().add(e.slot as usize * self.slot_size) };
        Ok(Delivery {
            held: Held {
                key: u64::from(e.slot),
                keep: None,
            },
            ptr,
            len: e.len as usize,
            peer_writable: true,
            device: None,
        })
    }

    /// [`take`](Self::take) of a device message, its dedicated frame (if any) read.
    fn device_delivery(
        &self,
        e: Entry,
        frame: Option<(Frame, Vec<std::os::fd::OwnedFd>)>,
    ) -> Result<Delivery> {
        let Some(pool) = &self.device else {
            return Err(TransportError::Segment(
                "a device message on a session without a device pool".into(),
            ));
        };
        if e.slot >= self.slots || (e.flags != DEVICE && e.flags != DEVICE | DEDICATED) {
            return Err(TransportError::Segment(format!(
                "device ring entry out of bounds: slot {} of {}, flags {:#x}",
                e.slot, self.slots, e.flags
            )));
        }
        let (span, keep) = match frame {
            Some((frame, mut fds)) => {
                let Frame::DeviceDedicated { len, size } = frame else {
                    return Err(TransportError::Protocol(format!(
                        "expected DeviceDedicated, got {frame:?}"
                    )));
                };
                let (Some(fd), true) = (fds.pop(), len == e.len && fds.is_empty()) else {
                    return Err(TransportError::Protocol(
                        "dedicated device frame does not match the ring".into(),
                    ));
                };
                let (span, keep) = pool.import_dedicated(fd, size, len)?;
                (
                    span,
                    Some(Box::new(keep) as Box<dyn std::any::Any + Send + Sync>),
                )
            }
            None => {
                let span = pool.slot(e.slot, e.len as usize).ok_or_else(|| {
                    TransportError::Segment(format!(
                        "device message of {} bytes exceeds a device slot of {}",
                        e.len,
                        pool.slot_size()
                    ))
                })?;
                (span, None)
            }
        };
        Counters::bump(&self.counters.device_messages);
        // SAFETY: slot < slots, so the host slot lies inside `data`.
        let ptr = unsafe { self.data.ptr().add(e.slot as usize * self.slot_size) };
        Ok(Delivery {
            held: Held {
                key: u64::from(e.slot),
                keep,
            },
            ptr,
            len: self.slot_size,
            peer_writable: true,
            device: Some(span),
        })
    }

    /// The next published message, if any.
    #[inline]
    fn pop(&self, st: &mut RxState) -> Result<Option<Delivery>> {
        let Some((e, from_head_line)) = self
            .ctrl
            .peek_traced(st.tail)
            .map_err(TransportError::Segment)?
        else {
            return Ok(None);
        };
        if from_head_line {
            Counters::bump(&self.counters.head_line_entries);
        }
        st.tail += 1;
        self.ctrl.consume(st.tail);
        let d = self.take(st, e)?;
        Counters::bump(&self.counters.messages);
        Ok(Some(d))
    }

    /// [`pop`](Self::pop), or `PeerGone` when nothing is published and the
    /// sender left (a system call: ask it only now and then).
    fn pop_or_gone(&self, st: &mut RxState) -> Result<Option<Delivery>> {
        if let Some(d) = self.pop(st)? {
            return Ok(Some(d));
        }
        if st.io.peer_closed() {
            // Whatever it published before leaving is still delivered.
            return match self.pop(st)? {
                Some(d) => Ok(Some(d)),
                None => Err(TransportError::PeerGone("sender closed the session".into())),
            };
        }
        Ok(None)
    }

    /// Run `idle` if the sender is writing and it has not run for `WARM_EVERY`.
    #[inline]
    fn pace(&self, st: &mut RxState, now: Instant, idle: Idle<'_>) {
        if now.saturating_duration_since(st.warmed) >= WARM_EVERY && self.ctrl.producing() {
            idle();
            st.warmed = now;
            Counters::bump(&self.counters.warmups);
        }
    }

    /// The rest of `recv` once the spin time is over: wait awake while the
    /// sender writes, else sleep on the doorbell.
    fn recv_wait(
        &self,
        st: &mut RxState,
        start: Instant,
        timeout: Duration,
        idle: Idle<'_>,
    ) -> Result<Delivery> {
        loop {
            if let Some(d) = self.pop(st)? {
                return Ok(d);
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(TransportError::Timeout(timeout, "a message"));
            }
            if self.ctrl.producing() {
                Counters::bump(&self.counters.awake_for_writing);
                if let Some(d) = self.await_production(st, start, timeout, idle)? {
                    return Ok(d);
                }
                continue;
            }
            self.ctrl.set_rx_waiting(true);
            if let Some(d) = self.pop(st)? {
                self.ctrl.set_rx_waiting(false);
                return Ok(d);
            }
            if self.ctrl.producing() {
                self.ctrl.set_rx_waiting(false);
                continue;
            }
            let woke = crate::wait::readable(
                &[self.published.fd().as_fd(), st.io.fd()],
                left.min(SLEEP_SLICE),
            );
            self.ctrl.set_rx_waiting(false);
            self.published.drain();
            woke?;
            if let Some(d) = self.pop_or_gone(st)? {
                Counters::bump(&self.counters.after_sleep);
                return Ok(d);
            }
        }
    }

    /// While the sender is writing, poll the ring, yielding the core now and
    /// then. `None` when writing stopped unpublished.
    fn await_production(
        &self,
        st: &mut RxState,
        start: Instant,
        timeout: Duration,
        idle: Idle<'_>,
    ) -> Result<Option<Delivery>> {
        let mut n = 0u32;
        while self.ctrl.producing() {
            if let Some(d) = self.pop(st)? {
                return Ok(Some(d));
            }
            self.pace(st, Instant::now(), idle);
            n = n.wrapping_add(1);
            if n.is_multiple_of(LOOKS_PER_YIELD) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
            if n.is_multiple_of(LOOKS_PER_CHECK) {
                if start.elapsed() >= timeout {
                    return Err(TransportError::Timeout(timeout, "a message"));
                }
                if st.io.peer_closed() {
                    return Err(TransportError::PeerGone("sender closed the session".into()));
                }
            }
        }
        self.pop(st)
    }
}

impl RecvPort for ShmReceiver {
    /// Spin for the configured time, then wait awake while the sender writes,
    /// else sleep on the doorbell; a closed socket means the sender is gone.
    fn recv(&self, timeout: Duration, idle: Idle<'_>) -> Result<Delivery> {
        let mut st = self.lock();
        let start = Instant::now();
        let spin_until = crate::wait::after(start, self.spin.min(timeout));
        let mut n = 0u32;
        loop {
            if let Some(d) = self.pop(&mut st)? {
                Counters::bump(&self.counters.spin_hits);
                return Ok(d);
            }
            let now = Instant::now();
            if now >= spin_until {
                return self.recv_wait(&mut st, start, timeout, idle);
            }
            std::hint::spin_loop();
            self.pace(&mut st, now, idle);
            n = n.wrapping_add(1);
            if n.is_multiple_of(SPINS_PER_PEER_CHECK) && st.io.peer_closed() {
                return self
                    .pop_or_gone(&mut st)?
                    .ok_or_else(|| TransportError::PeerGone("sender closed the session".into()));
            }
        }
    }

    /// Whether the sender left is asked of the socket at most once a
    /// millisecond. A receive in progress on another thread reads as "none yet".
    fn try_recv(&self, now: Instant, idle: Idle<'_>) -> Result<Option<Delivery>> {
        let mut st = match self.state.try_lock() {
            Ok(st) => st,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(None),
        };
        if let Some(d) = self.pop(&mut st)? {
            Counters::bump(&self.counters.spin_hits);
            return Ok(Some(d));
        }
        self.pace(&mut st, now, idle);
        if now.saturating_duration_since(st.peer_checked) < PEER_CHECK_EVERY {
            return Ok(None);
        }
        st.peer_checked = now;
        self.pop_or_gone(&mut st)
    }

    fn arm(&self) -> Result<Armed> {
        let mut st = self.lock();
        if let Some(d) = self.pop_or_gone(&mut st)? {
            return Ok(Armed::Ready(d));
        }
        if self.ctrl.producing() {
            return Ok(Armed::Busy);
        }
        self.ctrl.set_rx_waiting(true);
        let again = self.pop(&mut st);
        if !matches!(again, Ok(None)) || self.ctrl.producing() {
            self.ctrl.set_rx_waiting(false);
            return Ok(again?.map_or(Armed::Busy, Armed::Ready));
        }
        Ok(Armed::Wait([self.published.fd().as_raw_fd(), self.io_fd]))
    }

    fn disarm(&self) {
        self.ctrl.set_rx_waiting(false);
        self.published.drain();
    }

    fn release(&self, held: Held) {
        if held.key == DEDICATED_KEY {
            return; // unmapped as `held.keep` drops
        }
        let rang = {
            let _one_writer = self.releasing.lock().unwrap_or_else(|e| e.into_inner());
            self.ctrl.release(held.key as u32)
        };
        if rang {
            Counters::bump(&self.counters.doorbells);
            self.released.notify();
        }
    }

    fn pool_range(&self) -> Option<std::ops::Range<usize>> {
        Some(self.data.range())
    }

    fn device(&self) -> Option<Arc<dyn DeviceMem>> {
        self.device.as_ref().map(|p| Arc::clone(&p.mem))
    }

    fn stats(&self) -> &Counters {
        &self.counters
    }
}
