//! Setting a sender up: its queue pairs before the receiver answers, the
//! device memory its NIC can read, and the port once the grant is in.

use std::collections::HashMap;
use std::sync::Arc;

use crate::device::{Device, DeviceMem, Region};
use crate::error::{Result, TransportError};
use crate::frame::StreamIo;
use crate::options::{Options, RdmaOptions};
use crate::port::Counters;
use crate::tcp::Conn;

use super::super::verbs::{
    CompletionQueue, MemoryRegion, QpCaps, QueuePair, RdmaGrant, RdmaOffer, RemoteRegion, Verbs,
};
use super::{RdmaSender, Track};

/// The sender's queue pairs before the receiver answered.
pub(crate) struct Building {
    verbs: Arc<dyn Verbs>,
    cq: Arc<dyn CompletionQueue>,
    rcq: Arc<dyn CompletionQueue>,
    qps: Vec<Arc<dyn QueuePair>>,
    caps: QpCaps,
    /// The device whose memory this NIC can read (`Options::device`), or why
    /// not; `None` without `Options::device`.
    device: Option<Probed>,
}

impl Building {
    /// Create the session's completion queue and queue pairs.
    pub(crate) fn new(verbs: Arc<dyn Verbs>, options: &Options) -> Result<Building> {
        let o = &options.rdma;
        let device = options
            .device
            .as_ref()
            .map(|d| probe_device(verbs.as_ref(), d.device));
        let caps = QpCaps::default();
        let cq = verbs.create_cq(o.queue_pairs * caps.max_send_wr + 16)?;
        let rcq = verbs.create_cq(16)?;
        let qps = (0..o.queue_pairs)
            .map(|_| verbs.create_qp(&cq, &rcq, caps))
            .collect::<Result<Vec<_>>>()?;
        Ok(Building {
            verbs,
            cq,
            rcq,
            qps,
            caps,
            device,
        })
    }

    /// Whether this end offers device memory: `None` without
    /// `Options::device`, else `Ok` or why not.
    pub(crate) fn device_offered(&self) -> Option<std::result::Result<(), &str>> {
        self.device
            .as_ref()
            .map(|r| r.as_ref().map(|_| ()).map_err(String::as_str))
    }

    /// What the receiver needs to connect.
    pub(crate) fn offer(&self) -> RdmaOffer {
        RdmaOffer {
            qps: self.qps.iter().map(|q| q.endpoint()).collect(),
            device: self
                .device
                .as_ref()
                .and_then(|r| r.as_ref().ok())
                .map(|(_, m)| m.info()),
        }
    }

    /// Connect to the receiver's queue pairs and register the local buffers.
    pub(crate) fn finish(
        self,
        io: StreamIo<Conn>,
        grant: RdmaGrant,
        o: &RdmaOptions,
    ) -> Result<RdmaSender> {
        let bad = |why: String| TransportError::Protocol(format!("rdma grant: {why}"));
        if grant.qps.len() != self.qps.len() {
            return Err(bad(format!(
                "{} queue pairs for our {}",
                grant.qps.len(),
                self.qps.len()
            )));
        }
        let slots = grant.slots as usize;
        let slot_size = usize::try_from(grant.slot_size).unwrap_or(usize::MAX);
        let pool_len = slots.checked_mul(slot_size);
        if !(1..=64).contains(&slots)
            || slot_size < 4096
            || pool_len.is_none_or(|n| n as u64 > grant.pool.len || n > 1 << 36)
        {
            return Err(bad(format!(
                "{slots} slots of {slot_size} bytes in a pool of {} bytes",
                grant.pool.len
            )));
        }
        for (q, r) in self.qps.iter().zip(&grant.qps) {
            q.connect(r)?;
        }
        let local = self.verbs.alloc(pool_len.expect("checked"), false)?;
        let device = match (grant.device, self.device) {
            (Some(g), Some(Ok((kind, mem)))) => {
                let dslot = usize::try_from(g.slot_size).unwrap_or(usize::MAX);
                let len = dslot.checked_mul(slots).filter(|&n| n as u64 <= g.pool.len);
                let Some(len) = len else {
                    return Err(bad(format!(
                        "{slots} device slots of {dslot} bytes in a pool of {} bytes",
                        g.pool.len
                    )));
                };
                let region: Arc<dyn Region> = Arc::from(mem.alloc(len)?);
                let mr = self.verbs.register_device(region, kind, false)?;
                Some(SenderDevice {
                    mem,
                    local: mr,
                    remote: g.pool,
                    slot_size: dslot,
                })
            }
            _ => None,
        };
        let qpn = self
            .qps
            .iter()
            .enumerate()
            .map(|(i, q)| (q.endpoint().qpn, i))
            .collect();
        let mut pool = grant.pool;
        if o.wrong_rkey_for_tests {
            pool.rkey ^= 0x5a5a_5a5a;
        }
        Ok(RdmaSender {
            io,
            verbs: self.verbs,
            cq: self.cq,
            _rcq: self.rcq,
            track: vec![Track::default(); self.qps.len()],
            qps: self.qps,
            qpn,
            caps: self.caps,
            local,
            pool,
            slot_size,
            slice: o.slice,
            credit: vec![true; slots],
            busy: vec![false; slots],
            grants: HashMap::new(),
            next_region: 0,
            regions_live: 0,
            spare: None,
            spare_device: None,
            inflight: HashMap::new(),
            next_token: 1,
            broken: None,
            loan_timeout: o.loan_timeout,
            wcs: Vec::new(),
            counters: Counters::default(),
            device,
        })
    }
}

/// A device whose memory this NIC can read, or why not.
type Probed = std::result::Result<(Device, Arc<dyn DeviceMem>), String>;

/// Allocate and register a little of `device`'s memory: whether this NIC
/// can read it (GPUDirect RDMA), or why not.
fn probe_device(verbs: &dyn Verbs, device: Device) -> Probed {
    let probe = || -> Result<Arc<dyn DeviceMem>> {
        let mem = crate::device::open(device)?;
        let region: Arc<dyn Region> = Arc::from(mem.alloc(mem.granularity())?);
        verbs.register_device(region, device, false)?;
        Ok(mem)
    };
    probe().map(|m| (device, m)).map_err(|e| e.to_string())
}

/// The sender's device slots (its loans' sections) and the receiver's.
pub(super) struct SenderDevice {
    pub(super) mem: Arc<dyn DeviceMem>,
    /// Local device slots, registered (one per receiver slot).
    pub(super) local: Arc<dyn MemoryRegion>,
    pub(super) remote: RemoteRegion,
    pub(super) slot_size: usize,
}
