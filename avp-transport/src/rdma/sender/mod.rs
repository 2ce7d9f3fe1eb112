//! The sending half of an RDMA session: loans in registered local memory,
//! written into the receiver's slots (or a region registered for one large
//! message) in slices striped over the queue pairs.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::device::{DeviceMem, DeviceSpan};
use crate::error::{Result, TransportError};
use crate::frame::{Frame, FrameIo, StreamIo};
use crate::port::{Counters, LoanMem, SendPort};
use crate::tcp::Conn;

use super::imm;

mod dedicated;
mod setup;

use super::verbs::{
    CompletionQueue, MemoryRegion, QpCaps, QueuePair, RemoteRegion, Verbs, Wc, WcStatus, WriteWr,
};
use dedicated::DedicatedLoan;
pub(crate) use setup::Building;
use setup::SenderDevice;

/// Key bit of a loan in a dedicated region.
const DEDICATED: u64 = 1 << 63;
/// Writes posted per doorbell at most.
const BATCH: usize = 32;
/// Every this many writes one is signaled, so that send-queue room comes back.
const SIGNAL_EVERY: u64 = 64;

/// Where one part of a message goes: local memory (address and key) to
/// remote memory (address and key), at the message's offsets.
#[derive(Clone, Copy)]
struct Part {
    src: u64,
    lkey: u32,
    dst: u64,
    rkey: u32,
}

impl Part {
    /// From the start of `local` to `dst` (key `rkey`).
    fn between(local: &Arc<dyn MemoryRegion>, dst: u64, rkey: u32) -> Part {
        Part {
            src: local.ptr() as u64,
            lkey: local.lkey(),
            dst,
            rkey,
        }
    }
}

/// A device loan's host part: the preamble and header, this long.
struct DevicePart {
    prefix_len: usize,
}

/// Key bit of a loan whose sections are in device memory.
const DEVICE: u64 = 1 << 62;

/// A queue pair's send-queue accounting.
#[derive(Clone, Default)]
struct Track {
    /// Writes posted and not yet known complete.
    outstanding: usize,
    /// Since the last signaled write.
    unsignaled: u64,
    /// Signaled writes in order: how many writes each covers, and the
    /// message it ends, if it ends one.
    signaled: VecDeque<(usize, Option<u64>)>,
}

/// Local memory of a message in flight.
enum Buf {
    Slot(usize),
    /// A dedicated host region (kept for the next large message) and, for a
    /// device message, its device region.
    Dedicated(Arc<dyn MemoryRegion>, Option<Arc<dyn MemoryRegion>>),
}

/// The sending half of an RDMA session.
pub(crate) struct RdmaSender {
    io: StreamIo<Conn>,
    verbs: Arc<dyn Verbs>,
    cq: Arc<dyn CompletionQueue>,
    _rcq: Arc<dyn CompletionQueue>,
    qps: Vec<Arc<dyn QueuePair>>,
    qpn: HashMap<u32, usize>,
    track: Vec<Track>,
    caps: QpCaps,
    /// Local buffers, one per receiver slot.
    local: Arc<dyn MemoryRegion>,
    pool: RemoteRegion,
    slot_size: usize,
    slice: usize,
    /// Receiver slot `i` is free (its credit came back).
    credit: Vec<bool>,
    /// Local buffer `i` is still being written from.
    busy: Vec<bool>,
    /// Dedicated regions granted and not yet loaned (with the device part).
    grants: HashMap<u32, (RemoteRegion, Option<RemoteRegion>)>,
    next_region: u32,
    /// Dedicated regions the receiver holds for us.
    regions_live: usize,
    /// A local dedicated buffer kept for the next large message (host part),
    /// and one of device memory (a device message's sections): registering
    /// memory is slow, and fresh memory faults on first touch.
    spare: Option<Arc<dyn MemoryRegion>>,
    spare_device: Option<Arc<dyn MemoryRegion>>,
    inflight: HashMap<u64, (usize, Buf)>,
    next_token: u64,
    broken: Option<TransportError>,
    loan_timeout: Duration,
    wcs: Vec<Wc>,
    counters: Counters,
    device: Option<SenderDevice>,
}

/// What a failed write's status means to a sender.
fn meaning(status: WcStatus) -> &'static str {
    match status {
        WcStatus::RetryExcErr => "the receiver stopped answering (it died, or the link is down)",
        WcStatus::RemAccessErr => {
            "the receiver refused the write's key or bounds (its registration is gone or the grant was wrong)"
        }
        WcStatus::RnrRetryExcErr => "the receiver had no receive posted for the write's immediate",
        WcStatus::WrFlushErr => "flushed after an earlier error on the queue pair",
        WcStatus::LocProtErr => "a local buffer outside its registration",
        _ => "the write failed",
    }
}

fn broken_copy(e: &TransportError) -> TransportError {
    match e {
        TransportError::Rdma { op, status, reason } => TransportError::Rdma {
            op,
            status: status.clone(),
            reason: reason.clone(),
        },
        other => TransportError::PeerGone(other.to_string()),
    }
}

impl RdmaSender {
    fn check(&self) -> Result<()> {
        self.broken.as_ref().map_or(Ok(()), |e| Err(broken_copy(e)))
    }

    fn fail(&mut self, e: TransportError) -> TransportError {
        let copy = broken_copy(&e);
        self.broken = Some(e);
        copy
    }

    /// Take finished writes off the completion queue.
    fn reap(&mut self) -> Result<()> {
        let mut wcs = std::mem::take(&mut self.wcs);
        wcs.clear();
        self.cq.poll(&mut wcs, 256);
        let mut result = Ok(());
        for wc in &wcs {
            if wc.status != WcStatus::Success {
                if result.is_ok() {
                    result = Err(TransportError::rdma(
                        "write",
                        wc.status.to_string(),
                        meaning(wc.status),
                    ));
                }
                continue;
            }
            let Some(&q) = self.qpn.get(&wc.qpn) else {
                continue;
            };
            let Some((covers, token)) = self.track[q].signaled.pop_front() else {
                continue;
            };
            self.track[q].outstanding -= covers;
            if let Some(t) = token
                && let Some(entry) = self.inflight.get_mut(&t)
            {
                entry.0 -= 1;
                if entry.0 == 0 {
                    match self.inflight.remove(&t).expect("present").1 {
                        Buf::Slot(i) => self.busy[i] = false,
                        Buf::Dedicated(mr, device) => self.keep_spare(mr, device),
                    }
                }
            }
        }
        self.wcs = wcs;
        result.map_err(|e| self.fail(e))
    }

    /// Read the receiver's control frames that have arrived.
    fn read_control(&mut self) -> Result<()> {
        loop {
            let ready = self.io.stream.pending()
                || crate::wait::readable(&[self.io.stream.as_fd()], Duration::ZERO)?;
            if !ready {
                return Ok(());
            }
            let frame = match self.io.recv_frame(Duration::from_secs(2)) {
                Ok((f, _)) => f,
                Err(e) => {
                    let e = match e {
                        TransportError::PeerGone(m) => TransportError::PeerGone(format!(
                            "the receiver closed the rdma control connection ({m})"
                        )),
                        other => other,
                    };
                    return Err(self.fail(e));
                }
            };
            match frame {
                Frame::RdmaCredit { slot } if self.credit.get(slot as usize) == Some(&false) => {
                    self.credit[slot as usize] = true;
                }
                Frame::RdmaRegionGrant { id, region, device } => {
                    self.grants.insert(id, (region, device));
                }
                Frame::RdmaRegionFreed { .. } if self.regions_live > 0 => self.regions_live -= 1,
                other => {
                    let e = TransportError::Protocol(format!(
                        "unexpected rdma control frame {other:?}"
                    ));
                    return Err(self.fail(e));
                }
            }
        }
    }

    /// Wait until a completion or a control frame may have arrived, or `deadline`.
    fn wait(&mut self, deadline: Instant) -> Result<()> {
        self.cq.arm()?;
        self.reap()?;
        // SAFETY: the completion queue's descriptor stays open while `self.cq` lives.
        let cq_fd = unsafe { BorrowedFd::borrow_raw(self.cq.fd()) };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        if !self.io.stream.pending() {
            crate::wait::readable(&[cq_fd, self.io.stream.as_fd()], left)?;
        }
        self.cq.ack();
        Ok(())
    }

    /// A free slot whose local buffer is also free.
    fn free_slot(&self) -> Option<usize> {
        (0..self.credit.len()).find(|&i| self.credit[i] && !self.busy[i])
    }

    /// Post `wrs[q]` on each queue pair, as room allows, until all are posted.
    fn post_all(&mut self, mut wrs: Vec<VecDeque<WriteWr>>) -> Result<()> {
        let deadline = Instant::now() + self.loan_timeout;
        loop {
            let mut left = false;
            let mut posted = false;
            for (q, queue) in wrs.iter_mut().enumerate() {
                let room = self.caps.max_send_wr - self.track[q].outstanding;
                let n = room.min(queue.len()).min(BATCH);
                if n == 0 {
                    left |= !queue.is_empty();
                    continue;
                }
                let mut batch: Vec<WriteWr> = queue.drain(..n).collect();
                let t = &mut self.track[q];
                for wr in &mut batch {
                    t.unsignaled += 1;
                    let ends = wr.imm.is_some();
                    if ends || t.unsignaled >= SIGNAL_EVERY {
                        wr.signaled = true;
                        t.signaled
                            .push_back((t.unsignaled as usize, ends.then_some(wr.wr_id)));
                        t.unsignaled = 0;
                    }
                }
                t.outstanding += n;
                if let Err(e) = self.qps[q].post_writes(&batch) {
                    return Err(self.fail(e));
                }
                posted = true;
                left |= !queue.is_empty();
            }
            if !left {
                return Ok(());
            }
            self.reap()?;
            if !posted {
                if Instant::now() >= deadline {
                    return Err(TransportError::Timeout(
                        self.loan_timeout,
                        "room in the rdma send queues",
                    ));
                }
                self.wait(deadline)?;
            }
        }
    }
}

impl SendPort for RdmaSender {
    fn acquire(&mut self, len: usize, wait: bool) -> Result<Option<LoanMem>> {
        self.check()?;
        if len > self.slot_size {
            return self.dedicated(len, wait, None);
        }
        let deadline = Instant::now() + self.loan_timeout;
        loop {
            self.reap()?;
            self.read_control()?;
            if let Some(i) = self.free_slot() {
                self.credit[i] = false;
                self.busy[i] = true;
                // SAFETY: slot `i` of the local region, which lives as long as `self`.
                let ptr = unsafe { self.local.ptr().add(i * self.slot_size) };
                let ptr = NonNull::new(ptr).expect("inside a registered region");
                return Ok(Some(LoanMem::new(ptr, self.slot_size, i as u64, None)));
            }
            if !wait {
                return Ok(None);
            }
            if Instant::now() >= deadline {
                return Err(TransportError::Timeout(
                    self.loan_timeout,
                    "a free receiver slot (the receiver holds every slot: drop guards sooner, \
                     or raise RdmaOptions::slots)",
                ));
            }
            self.wait(deadline)?;
        }
    }

    fn publish(&mut self, mut mem: LoanMem, len: usize) -> Result<()> {
        self.check()?;
        // Where the host part and, for a device message, the device part go.
        let (id, host, dev, buf) = if mem.key & DEDICATED != 0 {
            let d = mem
                .take_keep::<DedicatedLoan>()
                .expect("a dedicated loan keeps its regions");
            let host = Part::between(&d.local, d.remote.addr, d.remote.rkey);
            let dev = d
                .device
                .as_ref()
                .map(|(l, r, prefix)| (Part::between(l, r.addr, r.rkey), *prefix));
            let keep = d.device.map(|(local, _, _)| local);
            (
                (mem.key & !DEDICATED) as u32,
                host,
                dev,
                Buf::Dedicated(d.local, keep),
            )
        } else {
            let i = (mem.key & !DEVICE) as usize;
            let host = Part {
                src: mem.ptr() as u64,
                lkey: self.local.lkey(),
                dst: self.pool.addr + (i * self.slot_size) as u64,
                rkey: self.pool.rkey,
            };
            let dev = match (mem.key & DEVICE != 0, &self.device) {
                (true, Some(d)) => {
                    let prefix = mem
                        .take_keep::<DevicePart>()
                        .expect("a device loan keeps its prefix length")
                        .prefix_len;
                    let span = mem.device.expect("a device loan has a device span");
                    let part = Part {
                        src: span.addr,
                        lkey: d.local.lkey(),
                        dst: d.remote.addr + (i * d.slot_size) as u64,
                        rkey: d.remote.rkey,
                    };
                    Some((part, prefix))
                }
                _ => None,
            };
            (i as u32, host, dev, Buf::Slot(i))
        };
        // Byte ranges of the message: the host part's, then the device part's
        // (each part holds the message at its own offsets).
        let parts = match dev {
            Some((d, prefix)) => {
                Counters::bump(&self.counters.device_messages);
                let prefix = prefix.min(len);
                vec![(host, 0..prefix), (d, prefix..len)]
            }
            None => vec![(host, 0..len)],
        };
        let device = parts.len() == 2;
        let dedicated = matches!(buf, Buf::Dedicated(..));
        let k = self.qps.len();
        let token = self.next_token;
        self.next_token += 1;
        // Slices of each part, dealt round robin over the queue pairs (slice 0,
        // the preamble's, always on queue pair 0).
        let mut wrs: Vec<VecDeque<WriteWr>> = vec![VecDeque::new(); k];
        let slice = self.slice;
        let slices = parts.iter().flat_map(|(p, range)| {
            let end = range.end;
            range
                .clone()
                .step_by(slice)
                .map(move |off| (p, off, slice.min(end - off)))
        });
        for (n, (p, off, bytes)) in slices.enumerate() {
            wrs[n % k].push_back(WriteWr {
                wr_id: token,
                local_addr: p.src + off as u64,
                len: bytes as u32,
                lkey: p.lkey,
                remote_addr: p.dst + off as u64,
                rkey: p.rkey,
                imm: None,
                signaled: false,
            });
        }
        wrs.retain(|q| !q.is_empty());
        let shares = wrs.len();
        let tag = imm::encode(imm::Imm {
            dedicated,
            device,
            shares,
            id,
        });
        for q in &mut wrs {
            q.back_mut().expect("every share has a slice").imm = Some(tag);
        }
        self.inflight.insert(token, (shares, buf));
        Counters::bump(&self.counters.messages);
        if dedicated {
            Counters::bump(&self.counters.dedicated);
        }
        self.post_all(wrs)
    }

    fn acquire_device(&mut self, len: usize, prefix_len: usize) -> Result<Option<LoanMem>> {
        let Some(dslot) = self.device.as_ref().map(|d| d.slot_size) else {
            return Ok(None);
        };
        if prefix_len > self.slot_size {
            return Err(TransportError::TooLarge {
                size: prefix_len as u64,
                limit: self.slot_size as u64,
            });
        }
        if len > dslot {
            return self.dedicated(len, true, Some(prefix_len));
        }
        let Some(mut mem) = self.acquire(prefix_len, true)? else {
            return Ok(None);
        };
        let i = mem.key as usize;
        let d = self.device.as_ref().expect("checked above");
        mem.key |= DEVICE;
        mem.keep = Some(Box::new(DevicePart { prefix_len }));
        mem.device = Some(DeviceSpan {
            addr: d.local.ptr() as u64 + (i * dslot) as u64,
            len: len as u64,
        });
        Ok(Some(mem))
    }

    fn device(&self) -> Option<Arc<dyn DeviceMem>> {
        self.device.as_ref().map(|d| Arc::clone(&d.mem))
    }

    fn abandon(&mut self, mut mem: LoanMem) {
        if mem.key & DEDICATED != 0 {
            let id = (mem.key & !DEDICATED) as u32;
            if let Some(d) = mem.take_keep::<DedicatedLoan>() {
                self.keep_spare(d.local, d.device.map(|(local, _, _)| local));
            }
            let _ = self.io.send_frame(&Frame::RdmaRegionFreed { id }, &[]);
            self.regions_live = self.regions_live.saturating_sub(1);
        } else {
            let i = (mem.key & !DEVICE) as usize;
            self.credit[i] = true;
            self.busy[i] = false;
        }
    }

    fn loan_timeout(&self) -> Duration {
        self.loan_timeout
    }

    fn stats(&self) -> &Counters {
        &self.counters
    }
}

impl Drop for RdmaSender {
    fn drop(&mut self) {
        // Let writes in flight finish (bounded) before the local memory goes:
        // the device may still be reading it.
        let deadline = Instant::now() + self.loan_timeout;
        while !self.inflight.is_empty() && self.broken.is_none() && Instant::now() < deadline {
            if self.reap().is_err() || self.wait(deadline).is_err() {
                break;
            }
        }
    }
}
