//! The receiving half of an RDMA session: a slot pool registered once, the
//! queue pairs' receives, and the control connection that returns slots to
//! the sender and registers regions for large messages.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use avp_wire::{PREAMBLE_LEN, Preamble};

use crate::device::{DeviceMem, DeviceSpan, Region};
use crate::error::{Result, TransportError};
use crate::frame::{Frame, FrameIo, StreamIo};
use crate::port::{Armed, Counters, Delivery, Held, Idle, RecvPort};
use crate::tcp::Conn;

use super::imm;

mod setup;

use super::verbs::{MemoryRegion, Wc, WcStatus};
pub(crate) use setup::Parts;

/// Key bit of a delivery in a dedicated region.
const DEDICATED: u64 = 1 << 63;

/// A region registered for one message: host memory, and for a device
/// message (its preamble and header there) device memory for its sections.
#[derive(Clone)]
struct Dedicated {
    host: Arc<dyn MemoryRegion>,
    device: Option<Arc<dyn MemoryRegion>>,
}

impl Dedicated {
    /// Whether it can hold a message of `len` bytes (with `device_prefix`:
    /// that much host memory and `len` bytes of device memory).
    fn fits(&self, len: u64, device_prefix: Option<u64>) -> bool {
        match (device_prefix, &self.device) {
            (None, None) => self.host.len() as u64 >= len,
            (Some(p), Some(d)) => self.host.len() as u64 >= p && d.len() as u64 >= len,
            _ => false,
        }
    }
}

/// What one receiving thread at a time touches.
struct Rx {
    /// Shares landed per slot.
    seen: Vec<usize>,
    /// Shares landed per dedicated region.
    region_seen: HashMap<u32, usize>,
    /// Messages in the order they were sent: (dedicated, slot or region).
    /// Every message has a share on queue pair 0, whose order is the send order.
    order: VecDeque<(bool, u32)>,
    /// Messages whose every share has landed.
    complete: HashSet<(bool, u32)>,
    /// Per slot: whether its message's sections are in the device slot.
    on_device: Vec<bool>,
    /// Why the session failed, once it has.
    broken: Option<String>,
    /// The sender closed the control connection.
    peer_left: bool,
    wcs: Vec<Wc>,
}

/// The receiving half of an RDMA session.
pub(crate) struct RdmaReceiver {
    parts: Parts,
    qpn: HashMap<u32, usize>,
    rx: Mutex<Rx>,
    /// The control connection: credits out (from any thread), requests in.
    ctl: Mutex<StreamIo<Conn>>,
    ctl_fd: RawFd,
    /// Dedicated regions registered for the sender, by its name for them.
    regions: Mutex<HashMap<u32, Dedicated>>,
    /// The last region given back, kept for the next large message:
    /// registering memory is slow, and fresh memory faults on first touch.
    spare: Mutex<Option<Dedicated>>,
    max_message: u64,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RdmaReceiver {
    pub(crate) fn new(parts: Parts, conn: Conn, max_message: u64) -> RdmaReceiver {
        use std::os::fd::AsRawFd;
        let qpn = parts
            .qps
            .iter()
            .enumerate()
            .map(|(i, q)| (q.endpoint().qpn, i))
            .collect();
        let ctl_fd = conn.tcp().as_raw_fd();
        RdmaReceiver {
            rx: Mutex::new(Rx {
                seen: vec![0; parts.slots],
                region_seen: HashMap::new(),
                order: VecDeque::new(),
                complete: HashSet::new(),
                on_device: vec![false; parts.slots],
                broken: None,
                peer_left: false,
                wcs: Vec::new(),
            }),
            parts,
            qpn,
            ctl: Mutex::new(StreamIo { stream: conn }),
            ctl_fd,
            regions: Mutex::new(HashMap::new()),
            spare: Mutex::new(None),
            max_message,
            counters: Counters::default(),
        }
    }

    /// Count landed shares; queue complete messages.
    fn reap(&self, rx: &mut Rx) -> Result<()> {
        let mut wcs = std::mem::take(&mut rx.wcs);
        wcs.clear();
        self.parts.cq.poll(&mut wcs, 256);
        let mut result = Ok(());
        for wc in &wcs {
            if wc.status != WcStatus::Success || wc.imm.is_none() {
                if result.is_ok() && rx.broken.is_none() {
                    let why = match wc.status {
                        WcStatus::WrFlushErr => {
                            "the queue pair failed (the sender wrote outside its grant, or left)"
                        }
                        _ => "a receive failed",
                    };
                    rx.broken = Some(format!("{}: {why}", wc.status));
                    result = Err(TransportError::rdma("receive", wc.status.to_string(), why));
                }
                continue;
            }
            let q = self.qpn.get(&wc.qpn).copied();
            if let Some(q) = q
                && self.parts.qps[q].post_recvs(&[q as u64]).is_err()
            {
                tracing::warn!("rdma: could not repost a receive on queue pair {q}");
            }
            let imm::Imm {
                dedicated,
                device,
                shares,
                id,
            } = imm::decode(wc.imm.expect("checked"));
            if device && self.parts.device.is_err() {
                result = result.and(Err(
                    self.protocol(rx, "device sections without device slots")
                ));
                continue;
            }
            if q == Some(0) {
                rx.order.push_back((dedicated, id));
                if let Some(d) = rx.on_device.get_mut(id as usize)
                    && !dedicated
                {
                    *d = device;
                }
                if dedicated
                    && lock(&self.regions)
                        .get(&id)
                        .is_some_and(|r| r.device.is_some() != device)
                {
                    result = result.and(Err(self.protocol(rx, "a region used as the other kind")));
                    continue;
                }
            }
            let seen = if dedicated {
                if !lock(&self.regions).contains_key(&id) {
                    result =
                        result.and(Err(self.protocol(rx, "a write into a region never granted")));
                    continue;
                }
                rx.region_seen.entry(id).or_default()
            } else {
                match rx.seen.get_mut(id as usize) {
                    Some(s) => s,
                    None => {
                        result =
                            result.and(Err(self.protocol(rx, "a write for a slot out of range")));
                        continue;
                    }
                }
            };
            *seen += 1;
            if *seen == shares {
                *seen = 0;
                if dedicated {
                    rx.region_seen.remove(&id);
                }
                rx.complete.insert((dedicated, id));
            } else if *seen > shares {
                result = result.and(Err(self.protocol(rx, "more shares than announced")));
            }
        }
        rx.wcs = wcs;
        result
    }

    fn protocol(&self, rx: &mut Rx, what: &str) -> TransportError {
        let why = format!("rdma sender broke the protocol: {what}");
        rx.broken.get_or_insert(why.clone());
        TransportError::Protocol(why)
    }

    /// Serve the sender's control frames that have arrived.
    fn serve_control(&self, rx: &mut Rx) -> Result<()> {
        let Ok(mut ctl) = self.ctl.try_lock() else {
            return Ok(());
        };
        loop {
            let ready = ctl.stream.pending()
                || crate::wait::readable(&[ctl.stream.as_fd()], Duration::ZERO)?;
            if !ready || rx.peer_left {
                return Ok(());
            }
            let frame = match ctl.recv_frame(Duration::from_secs(2)) {
                Ok((f, _)) => f,
                Err(TransportError::PeerGone(_)) => {
                    rx.peer_left = true;
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            match frame {
                Frame::RdmaRegion {
                    id,
                    len,
                    device_prefix,
                } => {
                    let mut regions = lock(&self.regions);
                    if len > self.max_message {
                        drop(regions);
                        return Err(self.protocol(
                            rx,
                            &format!(
                                "a region of {len} bytes, over the session's limit of {}",
                                self.max_message
                            ),
                        ));
                    }
                    if regions.len() >= self.parts.slots || regions.contains_key(&id) {
                        drop(regions);
                        return Err(self.protocol(rx, "more dedicated regions than slots"));
                    }
                    let spare = lock(&self.spare).take_if(|s| s.fits(len, device_prefix));
                    let d = match (device_prefix, &self.parts.device) {
                        _ if spare.is_some() => spare.expect("checked"),
                        (None, _) => Dedicated {
                            host: self.parts.verbs.alloc(len as usize, true)?,
                            device: None,
                        },
                        (Some(p), Ok(dev)) if p <= len && p <= self.parts.slot_size as u64 => {
                            let region: Arc<dyn Region> = Arc::from(dev.mem.alloc(len as usize)?);
                            Dedicated {
                                host: self.parts.verbs.alloc(p as usize, true)?,
                                device: Some(self.parts.verbs.register_device(
                                    region,
                                    dev.mem.device(),
                                    true,
                                )?),
                            }
                        }
                        (Some(_), _) => {
                            drop(regions);
                            return Err(self.protocol(
                                rx,
                                "a device region asked of a session without device slots, or \
                                 with a host part larger than a slot",
                            ));
                        }
                    };
                    let grant = Frame::RdmaRegionGrant {
                        id,
                        region: d.host.remote(),
                        device: d.device.as_ref().map(|m| m.remote()),
                    };
                    regions.insert(id, d);
                    drop(regions);
                    ctl.send_frame(&grant, &[])?;
                }
                Frame::RdmaRegionFreed { id } => {
                    self.retire(id);
                    rx.region_seen.remove(&id);
                }
                other => {
                    return Err(self.protocol(rx, &format!("unexpected control frame {other:?}")));
                }
            }
        }
    }

    /// A complete message, if there is one.
    fn poll(&self, rx: &mut Rx) -> Result<Option<Delivery>> {
        if let Some(why) = &rx.broken {
            return Err(TransportError::PeerGone(format!(
                "rdma session failed: {why}"
            )));
        }
        self.reap(rx)?;
        self.serve_control(rx)?;
        let Some((dedicated, id)) = Self::next_ready(rx) else {
            return Ok(None);
        };
        // The host part, and where the sections are when in device memory.
        let (ptr, cap, key, keep, device_base) = if dedicated {
            let d = lock(&self.regions)
                .get(&id)
                .cloned()
                .ok_or_else(|| self.protocol(rx, "a message in a freed region"))?;
            let base = d.device.as_ref().map(|m| (m.ptr() as u64, m.len()));
            let (ptr, cap) = (d.host.ptr(), d.host.len());
            let keep: Box<dyn std::any::Any + Send + Sync> = Box::new(d);
            (ptr, cap, DEDICATED | u64::from(id), Some(keep), base)
        } else {
            // SAFETY: slot `id` (checked against the slot count) of the pool.
            let ptr = unsafe {
                self.parts
                    .pool
                    .ptr()
                    .add(id as usize * self.parts.slot_size)
            };
            let base = match (&self.parts.device, rx.on_device[id as usize]) {
                (Ok(d), true) => Some((
                    d.mr.ptr() as u64 + (id as usize * d.slot_size) as u64,
                    d.slot_size,
                )),
                _ => None,
            };
            (ptr, self.parts.slot_size, u64::from(id), None, base)
        };
        let held = Held { key, keep };
        let on_device = device_base.is_some();
        let mut pre = [0u8; PREAMBLE_LEN];
        let n = cap.min(PREAMBLE_LEN);
        // SAFETY: `n` bytes at the start of the slot or region, which stays
        // registered while `held` lives; read as plain bytes.
        unsafe { std::ptr::copy_nonoverlapping(ptr, pre.as_mut_ptr(), n) };
        // The sections' room: the slot or region itself, or its device part.
        let room = device_base.map_or(cap, |(_, room)| room);
        let (len, device) = match Preamble::read(&pre[..n]) {
            Ok(p) if p.total_len > room as u64 => {
                self.release(held);
                return Err(TransportError::Segment(format!(
                    "the message declares {} bytes, its rdma slot holds {room}",
                    p.total_len
                )));
            }
            Ok(p) if on_device => {
                let prefix = PREAMBLE_LEN as u64 + u64::from(p.header_len);
                if prefix > cap as u64 {
                    self.release(held);
                    return Err(TransportError::Segment(format!(
                        "a header of {} bytes in a host slot of {cap}",
                        p.header_len
                    )));
                }
                let span = DeviceSpan {
                    addr: device_base.expect("on device").0,
                    len: p.total_len,
                };
                Counters::bump(&self.counters.device_messages);
                (prefix as usize, Some(span))
            }
            Ok(p) => (p.total_len as usize, None),
            Err(e) => {
                self.release(held);
                return Err(e.into());
            }
        };
        Counters::bump(&self.counters.messages);
        if dedicated {
            Counters::bump(&self.counters.dedicated);
        }
        Ok(Some(Delivery {
            held,
            ptr,
            len,
            peer_writable: true,
            device,
        }))
    }

    /// Region `id` is done with: kept for the next large message when it is
    /// the larger of it and the spare, else deregistered (once a guard's
    /// clone is gone too).
    fn retire(&self, id: u32) {
        let Some(d) = lock(&self.regions).remove(&id) else {
            return;
        };
        let size = |r: &Dedicated| r.host.len() + r.device.as_ref().map_or(0, |m| m.len());
        let mut spare = lock(&self.spare);
        if spare.as_ref().is_none_or(|s| size(s) <= size(&d)) {
            *spare = Some(d);
        }
    }

    /// The next message in send order, if all of it has landed.
    fn next_ready(rx: &mut Rx) -> Option<(bool, u32)> {
        let first = *rx.order.front()?;
        rx.complete.remove(&first).then(|| rx.order.pop_front())?
    }

    /// Whether the next message in send order has landed.
    fn has_ready(rx: &Rx) -> bool {
        rx.order.front().is_some_and(|f| rx.complete.contains(f))
    }

    fn gone() -> TransportError {
        TransportError::PeerGone("the rdma sender closed its control connection".into())
    }
}

impl RecvPort for RdmaReceiver {
    fn recv(&self, timeout: Duration, _idle: Idle<'_>) -> Result<Delivery> {
        let deadline = crate::wait::from_now(timeout);
        let mut rx = lock(&self.rx);
        loop {
            if let Some(d) = self.poll(&mut rx)? {
                return Ok(d);
            }
            if rx.peer_left {
                // Everything that landed before the sender left was delivered.
                self.reap(&mut rx)?;
                if !Self::has_ready(&rx) {
                    return Err(Self::gone());
                }
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TransportError::Timeout(timeout, "a message"));
            }
            self.parts.cq.arm()?;
            self.reap(&mut rx)?;
            if Self::has_ready(&rx) {
                continue;
            }
            // SAFETY: both descriptors stay open while `self` lives.
            let fds = unsafe {
                [
                    BorrowedFd::borrow_raw(self.parts.cq.fd()),
                    BorrowedFd::borrow_raw(self.ctl_fd),
                ]
            };
            crate::wait::readable(&fds, deadline - now)?;
            self.parts.cq.ack();
        }
    }

    fn try_recv(&self, _now: Instant, _idle: Idle<'_>) -> Result<Option<Delivery>> {
        let Ok(mut rx) = self.rx.try_lock() else {
            return Ok(None);
        };
        match self.poll(&mut rx)? {
            Some(d) => Ok(Some(d)),
            None if rx.peer_left => Err(Self::gone()),
            None => Ok(None),
        }
    }

    fn arm(&self) -> Result<Armed> {
        let mut rx = lock(&self.rx);
        if let Some(d) = self.poll(&mut rx)? {
            return Ok(Armed::Ready(d));
        }
        if rx.peer_left {
            return Err(Self::gone());
        }
        self.parts.cq.arm()?;
        self.reap(&mut rx)?;
        if Self::has_ready(&rx) {
            return Ok(Armed::Busy);
        }
        Ok(Armed::Wait([self.parts.cq.fd(), self.ctl_fd]))
    }

    fn disarm(&self) {
        self.parts.cq.ack();
    }

    fn release(&self, held: Held) {
        let frame = if held.key & DEDICATED != 0 {
            let id = (held.key & !DEDICATED) as u32;
            drop(held.keep);
            self.retire(id);
            Frame::RdmaRegionFreed { id }
        } else {
            Frame::RdmaCredit {
                slot: held.key as u32,
            }
        };
        // A sender that left needs no credit.
        let _ = lock(&self.ctl).send_frame(&frame, &[]);
    }

    fn device(&self) -> Option<Arc<dyn DeviceMem>> {
        self.parts.device.as_ref().ok().map(|d| Arc::clone(&d.mem))
    }

    fn pool_range(&self) -> Option<std::ops::Range<usize>> {
        let start = self.parts.pool.ptr() as usize;
        Some(start..start + self.parts.pool.len())
    }

    fn stats(&self) -> &Counters {
        &self.counters
    }
}
