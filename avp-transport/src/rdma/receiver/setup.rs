//! Setting a receiver up in the handshake: its slot pool registered once,
//! its queue pairs connected to the sender's with their receives posted, and
//! device slots when both ends keep sections in device memory.

use std::sync::Arc;

use crate::device::{DeviceMem, Region, round_up};
use crate::error::{Result, TransportError};
use crate::options::{DeviceOptions, Options};

use super::super::verbs::{
    CompletionQueue, DeviceGrant, MemoryRegion, QpCaps, QueuePair, RdmaGrant, RdmaOffer, Verbs,
};

/// What a receiver is built from in the handshake.
pub(crate) struct Parts {
    pub(super) verbs: Arc<dyn Verbs>,
    pub(super) cq: Arc<dyn CompletionQueue>,
    pub(super) _scq: Arc<dyn CompletionQueue>,
    pub(super) qps: Vec<Arc<dyn QueuePair>>,
    pub(super) pool: Arc<dyn MemoryRegion>,
    pub(super) slots: usize,
    pub(super) slot_size: usize,
    /// Device slots (GPUDirect RDMA), or why there are none ("" when
    /// neither end asked for any).
    pub(super) device: std::result::Result<ReceiverDevice, String>,
}

/// The receiver's device slots, registered for the sender's writes.
pub(super) struct ReceiverDevice {
    pub(super) mem: Arc<dyn DeviceMem>,
    pub(super) mr: Arc<dyn MemoryRegion>,
    pub(super) slot_size: usize,
}

impl Parts {
    /// What the session's explanation adds about device memory.
    pub(crate) fn device_note(&self) -> String {
        match &self.device {
            Ok(d) => format!(
                "; KV sections device to device (GPUDirect RDMA into {})",
                d.mem.info().name
            ),
            Err(why) if why.is_empty() => String::new(),
            Err(why) => format!("; device memory not used: {why}"),
        }
    }

    /// Register the pool, create and connect the queue pairs for `offer`,
    /// and post their receives.
    pub(crate) fn build(
        verbs: Arc<dyn Verbs>,
        options: &Options,
        offer: &RdmaOffer,
    ) -> Result<(Parts, RdmaGrant)> {
        let o = &options.rdma;
        let k = offer.qps.len();
        if !(1..=16).contains(&k) {
            return Err(TransportError::Protocol(format!(
                "the sender offers {k} queue pairs, expected 1–16"
            )));
        }
        let slot_size = o.slot_size.next_multiple_of(4096);
        // A receive per slot and per dedicated region (as many as slots), and spare.
        let recvs = 2 * o.slots + 2;
        let caps = QpCaps {
            max_recv_wr: recvs,
            ..QpCaps::default()
        };
        let cq = verbs.create_cq(k * recvs + 16)?;
        let scq = verbs.create_cq(16)?;
        let pool = verbs.alloc(o.slots * slot_size, true)?;
        let mut qps = Vec::with_capacity(k);
        for (i, remote) in offer.qps.iter().enumerate() {
            let q = verbs.create_qp(&scq, &cq, caps)?;
            q.post_recvs(&vec![i as u64; recvs])?;
            q.connect(remote)?;
            qps.push(q);
        }
        let device = match (&offer.device, &options.device) {
            (None, None) => Err(String::new()),
            (None, Some(_)) => Err("the sender offers none (no Options::device, or its NIC \
                                    cannot read its device memory)"
                .to_owned()),
            (Some(_), None) => Err("this listener has no Options::device".to_owned()),
            (Some(_), Some(d)) => {
                device_pool(verbs.as_ref(), d, o.slots).map_err(|e| e.to_string())
            }
        };
        let grant = RdmaGrant {
            qps: qps.iter().map(|q| q.endpoint()).collect(),
            pool: pool.remote(),
            slots: o.slots as u32,
            slot_size: slot_size as u64,
            device: device.as_ref().ok().map(|d| DeviceGrant {
                pool: d.mr.remote(),
                slot_size: d.slot_size as u64,
                info: d.mem.info(),
            }),
        };
        let parts = Parts {
            verbs,
            cq,
            _scq: scq,
            qps,
            pool,
            slots: o.slots,
            slot_size,
            device,
        };
        Ok((parts, grant))
    }
}

/// `slots` device slots of `d`, registered for the sender's writes.
fn device_pool(verbs: &dyn Verbs, d: &DeviceOptions, slots: usize) -> Result<ReceiverDevice> {
    let mem = crate::device::open(d.device)?;
    let slot_size =
        round_up(d.slot_size, mem.granularity()).ok_or_else(|| TransportError::InvalidOption {
            option: "device slot_size",
            reason: format!("{} bytes overflow when rounded", d.slot_size),
        })?;
    let region: Arc<dyn Region> = Arc::from(mem.alloc(slot_size * slots)?);
    let mr = verbs.register_device(region, d.device, true)?;
    Ok(ReceiverDevice { mem, mr, slot_size })
}
