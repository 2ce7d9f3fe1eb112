//! The kernel's verbs (cargo feature `rdma`), through `sideway`, which loads
//! `libibverbs.so.1` at run time: building needs no RDMA library, and a host
//! without one gets a clear error (the session then runs over TCP).
//!
//! Why `sideway`: the released `ibverbs` crate (0.9.2) has only two-sided
//! SEND/RECV on its own buffers (no RDMA WRITE, no write-with-immediate, no
//! registration of external or dma-buf memory) and links `libibverbs` at load
//! time; `sideway` has all of these and loads the library lazily. What it does
//! not wrap (arming and acknowledging completion events, polling with the
//! queue-pair number) is called through `rdma-mummy-sys`, its bindings.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use rdma_mummy_sys as sys;
use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{BasicCompletionQueue, CompletionChannel, CompletionQueue as _};
use sideway::ibverbs::device::{DeviceInfo as _, DeviceList, GetDeviceListErrorKind};
use sideway::ibverbs::device_context::{DeviceContext, Mtu};
use sideway::ibverbs::memory_region::MemoryRegion as IbvMr;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    GenericQueuePair, PostSendGuard as _, QueuePair as _, QueuePairAttribute, QueuePairState,
    QueuePairType, SetScatterGatherEntry as _, WorkRequestFlags,
};

use crate::device::{Device, Region};
use crate::error::{Result, TransportError};

use super::verbs::{
    CompletionQueue, MemoryRegion, QpCaps, QpEndpoint, QueuePair, RdmaInfo, Verbs, Wc, WcOpcode,
    WcStatus, WriteWr, own_cq,
};
use crate::shm::segment::Mapping;

/// The port every queue pair uses.
const PORT: u8 = 1;

/// An error with its causes ("failed to open device: Permission denied").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !s.ends_with(&c_text) {
            s.push_str(": ");
            s.push_str(&c_text);
        }
        cause = c.source();
    }
    s
}

fn err(op: &'static str, e: impl std::error::Error) -> TransportError {
    TransportError::rdma(op, "verbs call failed", chain(&e))
}

/// Local access, and the peer's writes when `remote_write`.
fn access(remote_write: bool) -> AccessFlags {
    if remote_write {
        AccessFlags::LocalWrite | AccessFlags::RemoteWrite
    } else {
        AccessFlags::LocalWrite
    }
}

/// An opened verbs device and its protection domain.
pub(crate) struct IbVerbs {
    ctx: Arc<DeviceContext>,
    pd: Arc<ProtectionDomain>,
    name: String,
    lid: u16,
    gid: Gid,
    gid_index: u8,
    ethernet: bool,
    mtu: u32,
}

impl IbVerbs {
    /// Open device `name` (`""`: the first), with GID `gid_index` (RoCE; `None`
    /// picks the RoCE v2 entry of the port's first IPv4 address).
    pub(crate) fn open(name: &str, gid_index: Option<u8>) -> Result<IbVerbs> {
        let list = DeviceList::new().map_err(|e| {
            let errno = match &e.0 {
                GetDeviceListErrorKind::Ibverbs(io) => io.raw_os_error(),
                _ => None,
            };
            let why = match errno {
                Some(libc::EOPNOTSUPP) => {
                    "libibverbs.so.1 is not installed (Debian: ibverbs-providers and libibverbs1)"
                        .to_owned()
                }
                Some(libc::ENOSYS) => "the kernel has no RDMA support".to_owned(),
                _ => chain(&e),
            };
            let which = if name.is_empty() {
                "the first verbs device".to_owned()
            } else {
                format!("verbs device {name:?}")
            };
            TransportError::rdma("open", "ENODEV", format!("{which}: {why}"))
        })?;
        let dev = if name.is_empty() {
            list.get(0)
        } else {
            list.iter().find(|d| d.name() == name)
        }
        .ok_or_else(|| {
            let names: Vec<String> = list.iter().map(|d| d.name()).collect();
            let why = if names.is_empty() {
                "this host has no verbs devices (ibv_devices lists none)".to_owned()
            } else {
                format!("no verbs device {name:?}; this host has {names:?}")
            };
            TransportError::rdma("open", "ENODEV", why)
        })?;
        let name = dev.name();
        let ctx = dev.open().map_err(|e| err("open device", e))?;
        drop(list);
        let pd = ctx.alloc_pd().map_err(|e| err("alloc_pd", e))?;
        let port = ctx.query_port(PORT).map_err(|e| err("query_port", e))?;
        let ethernet = port.attr.link_layer == sys::IBV_LINK_LAYER_ETHERNET;
        let gid_index = match gid_index {
            Some(i) => i,
            None if ethernet => roce_v2_index(&ctx, port.attr.gid_tbl_len),
            None => 0,
        };
        let gid = ctx
            .query_gid(PORT, u32::from(gid_index))
            .map_err(|e| err("query_gid", e))?;
        Ok(IbVerbs {
            lid: port.attr.lid,
            mtu: port.attr.active_mtu,
            ctx,
            pd,
            name,
            gid,
            gid_index,
            ethernet,
        })
    }
}

/// The GID index of the port's first IPv4-mapped address, preferring the
/// later of two equal entries (the RoCE v2 one follows the v1 one in the table).
fn roce_v2_index(ctx: &DeviceContext, len: i32) -> u8 {
    let len = len.clamp(0, 256) as u32;
    let gids: Vec<(u32, [u8; 16])> = (0..len)
        .filter_map(|i| ctx.query_gid(PORT, i).ok().map(|g| (i, g.raw)))
        .collect();
    let v4 = |g: &[u8; 16]| g[..10].iter().all(|&b| b == 0) && g[10..12] == [0xff, 0xff];
    let Some(&(first, addr)) = gids.iter().find(|(_, g)| v4(g)) else {
        return 0;
    };
    let last = gids
        .iter()
        .filter(|(_, g)| *g == addr)
        .map(|&(i, _)| i)
        .max()
        .unwrap_or(first);
    last as u8
}

impl Verbs for IbVerbs {
    fn info(&self) -> RdmaInfo {
        RdmaInfo {
            backend: "verbs".into(),
            device: self.name.clone(),
            host: String::new(),
            link: if self.ethernet {
                "ethernet"
            } else {
                "infiniband"
            }
            .into(),
        }
    }

    fn reach(&self, peer: &RdmaInfo) -> std::result::Result<String, String> {
        let me = self.info();
        if peer.backend != "verbs" {
            return Err(format!(
                "this end has verbs device {}, the peer's device is {:?}",
                self.name, peer.backend
            ));
        }
        if !peer.link.is_empty() && peer.link != me.link {
            return Err(format!(
                "link layers differ: {} here, {} at the peer",
                me.link, peer.link
            ));
        }
        Ok(format!(
            "verbs devices {} ↔ {} over {}",
            self.name, peer.device, me.link
        ))
    }

    fn alloc(&self, len: usize, remote_write: bool) -> Result<Arc<dyn MemoryRegion>> {
        let map = Mapping::anonymous(len)?;
        let (addr, len) = (map.ptr() as u64, map.len());
        // SAFETY: the mapping outlives the registration (`IbMr` drops the
        // registration first) and is not moved.
        let mr = unsafe { self.pd.reg_mr(addr as usize, len, access(remote_write)) }
            .map_err(|e| err("reg_mr", e))?;
        Ok(Arc::new(IbMr::new(mr, addr, len, Box::new(map))))
    }

    fn register_device(
        &self,
        region: Arc<dyn Region>,
        device: Device,
        remote_write: bool,
    ) -> Result<Arc<dyn MemoryRegion>> {
        let (addr, len) = (region.addr(), region.len());
        let access = access(remote_write);
        let mr = match device {
            // The emulated device's memory is host memory.
            // SAFETY: `region` outlives the registration (`IbMr` drops the
            // registration first).
            Device::Emulated => unsafe { self.pd.reg_mr(addr as usize, len, access) },
            _ => {
                let fd = region.dmabuf()?;
                // SAFETY: as above; the dma-buf names the region's whole range,
                // addressed by its device address (iova).
                unsafe { self.pd.reg_dmabuf_mr(0, len, addr, fd.as_raw_fd(), access) }
            }
        }
        .map_err(|e| err("register device memory (GPUDirect RDMA)", e))?;
        Ok(Arc::new(IbMr::new(mr, addr, len, Box::new(region))))
    }

    fn create_cq(&self, capacity: usize) -> Result<Arc<dyn CompletionQueue>> {
        let chan = self
            .ctx
            .create_comp_channel()
            .map_err(|e| err("create_comp_channel", e))?;
        chan.set_nonblocking(true)
            .map_err(TransportError::io("completion channel nonblocking"))?;
        let mut b = self.ctx.create_cq_builder();
        b.setup_cqe(capacity.min(u32::MAX as usize) as u32)
            .setup_comp_channel(&chan, 0);
        let cq = b.build().map_err(|e| err("create_cq", e))?;
        Ok(Arc::new(IbCq { cq, chan }))
    }

    fn create_qp(
        &self,
        send_cq: &Arc<dyn CompletionQueue>,
        recv_cq: &Arc<dyn CompletionQueue>,
        caps: QpCaps,
    ) -> Result<Arc<dyn QueuePair>> {
        let (scq, rcq) = (own_cq::<IbCq>(send_cq)?, own_cq::<IbCq>(recv_cq)?);
        let mut b = self.pd.create_qp_builder();
        b.setup_qp_type(QueuePairType::ReliableConnection)
            .setup_max_send_wr(caps.max_send_wr as u32)
            .setup_max_recv_wr(caps.max_recv_wr as u32)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .setup_send_cq(Arc::clone(&scq.cq))
            .setup_recv_cq(Arc::clone(&rcq.cq));
        let qp: GenericQueuePair = b.build().map_err(|e| err("create_qp", e))?.into();
        let mut psn = [0u8; 4];
        getrandom::fill(&mut psn).expect("the OS random source works");
        Ok(Arc::new(IbQp {
            qpn: qp.qp_number(),
            qp: Mutex::new(qp),
            psn: u32::from_ne_bytes(psn) & 0xff_ffff,
            lid: self.lid,
            gid: self.gid,
            gid_index: self.gid_index,
            ethernet: self.ethernet,
            mtu: self.mtu,
            caps,
            _cqs: (scq, rcq),
        }))
    }
}

/// A registration of host or device memory at `addr`.
struct IbMr {
    // Dropped first: deregister, then release the memory.
    mr: Arc<IbvMr>,
    addr: u64,
    len: usize,
    /// The mapping or device region registered.
    _memory: Box<dyn std::any::Any + Send + Sync>,
}

impl IbMr {
    fn new(
        mr: Arc<IbvMr>,
        addr: u64,
        len: usize,
        memory: Box<dyn std::any::Any + Send + Sync>,
    ) -> IbMr {
        IbMr {
            mr,
            addr,
            len,
            _memory: memory,
        }
    }
}

impl MemoryRegion for IbMr {
    fn ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }
    fn len(&self) -> usize {
        self.len
    }
    fn lkey(&self) -> u32 {
        self.mr.lkey()
    }
    fn rkey(&self) -> u32 {
        self.mr.rkey()
    }
}

/// A completion queue with its completion channel.
struct IbCq {
    cq: Arc<BasicCompletionQueue>,
    chan: Arc<CompletionChannel>,
}

fn status(s: u32) -> WcStatus {
    use sys::ibv_wc_status::*;
    match s {
        IBV_WC_SUCCESS => WcStatus::Success,
        IBV_WC_LOC_PROT_ERR => WcStatus::LocProtErr,
        IBV_WC_REM_ACCESS_ERR => WcStatus::RemAccessErr,
        IBV_WC_RETRY_EXC_ERR => WcStatus::RetryExcErr,
        IBV_WC_RNR_RETRY_EXC_ERR => WcStatus::RnrRetryExcErr,
        IBV_WC_WR_FLUSH_ERR => WcStatus::WrFlushErr,
        IBV_WC_REM_OP_ERR => WcStatus::RemOpErr,
        other => WcStatus::Other(other),
    }
}

impl CompletionQueue for IbCq {
    fn poll(&self, out: &mut Vec<Wc>, max: usize) -> usize {
        let max = max.min(64);
        let mut wcs: Vec<sys::ibv_wc> = Vec::with_capacity(max);
        // SAFETY: the queue is live (we hold it); `wcs` has room for `max` entries.
        let n = unsafe { sys::ibv_poll_cq(self.cq.cq().as_ptr(), max as i32, wcs.as_mut_ptr()) };
        if n <= 0 {
            return 0;
        }
        // SAFETY: the device wrote `n` ≤ `max` entries.
        unsafe { wcs.set_len(n as usize) };
        for wc in &wcs {
            let with_imm = wc.wc_flags & sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
            let st = status(wc.status);
            out.push(Wc {
                wr_id: wc.wr_id,
                status: st,
                opcode: if st == WcStatus::Success
                    && wc.opcode == sys::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM
                {
                    WcOpcode::RecvWithImm
                } else {
                    WcOpcode::Write
                },
                // SAFETY: with IBV_WC_WITH_IMM set the union holds the immediate.
                imm: with_imm
                    .then(|| u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data })),
                byte_len: wc.byte_len,
                qpn: wc.qp_num,
            });
        }
        n as usize
    }

    fn fd(&self) -> RawFd {
        self.chan.as_raw_fd()
    }

    fn arm(&self) -> Result<()> {
        // SAFETY: the queue is live.
        let r = unsafe { sys::ibv_req_notify_cq(self.cq.cq().as_ptr(), 0) };
        if r != 0 {
            return Err(err(
                "ibv_req_notify_cq",
                std::io::Error::from_raw_os_error(r),
            ));
        }
        Ok(())
    }

    fn ack(&self) {
        loop {
            let mut cq: *mut sys::ibv_cq = std::ptr::null_mut();
            let mut ctx: *mut std::ffi::c_void = std::ptr::null_mut();
            // SAFETY: the channel is live and non-blocking; on success `cq`
            // is one of its queues, whose event is acknowledged at once.
            let got = unsafe {
                sys::ibv_get_cq_event(self.chan.comp_channel().as_ptr(), &mut cq, &mut ctx)
            };
            if got != 0 {
                return;
            }
            // SAFETY: `cq` came with the event just fetched.
            unsafe { sys::ibv_ack_cq_events(cq, 1) };
        }
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

impl Drop for IbCq {
    fn drop(&mut self) {
        // Destroying a queue waits for every fetched event to be acknowledged.
        self.ack();
    }
}

/// A reliable-connected queue pair.
struct IbQp {
    qpn: u32,
    qp: Mutex<GenericQueuePair>,
    psn: u32,
    lid: u16,
    gid: Gid,
    gid_index: u8,
    ethernet: bool,
    mtu: u32,
    caps: QpCaps,
    _cqs: (Arc<IbCq>, Arc<IbCq>),
}

fn hex(g: &[u8; 16]) -> String {
    g.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 16]> {
    let mut g = [0u8; 16];
    if s.len() != 32 {
        return None;
    }
    for (i, b) in g.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(g)
}

fn mtu(active: u32) -> Mtu {
    match active {
        1 => Mtu::Mtu256,
        2 => Mtu::Mtu512,
        3 => Mtu::Mtu1024,
        4 => Mtu::Mtu2048,
        _ => Mtu::Mtu4096,
    }
}

impl QueuePair for IbQp {
    fn endpoint(&self) -> QpEndpoint {
        QpEndpoint {
            qpn: self.qpn,
            lid: self.lid,
            gid: hex(&self.gid.raw),
            psn: self.psn,
            port: String::new(),
        }
    }

    fn connect(&self, remote: &QpEndpoint) -> Result<()> {
        let mut qp = self.qp.lock().unwrap_or_else(|e| e.into_inner());
        let mut a = QueuePairAttribute::new();
        a.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(PORT)
            .setup_access_flags(AccessFlags::LocalWrite | AccessFlags::RemoteWrite);
        qp.modify(&a).map_err(|e| err("modify_qp INIT", e))?;
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(remote.lid)
            .setup_port(PORT)
            .setup_service_level(0);
        let gid = unhex(&remote.gid).unwrap_or_default();
        if self.ethernet || gid.iter().any(|&b| b != 0) {
            ah.setup_grh(&Gid { raw: gid }, 0, self.gid_index, 64, 0);
        }
        // Hardware retries: ~67 ms × 7 before IBV_WC_RETRY_EXC_ERR (timeout 14).
        let timeout = 14u8;
        let _ = self.caps.timeout;
        let mut a = QueuePairAttribute::new();
        a.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(mtu(self.mtu))
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(1)
            .setup_min_rnr_timer(12)
            .setup_address_vector(&ah);
        qp.modify(&a).map_err(|e| err("modify_qp RTR", e))?;
        let mut a = QueuePairAttribute::new();
        a.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.psn)
            .setup_timeout(timeout)
            .setup_retry_cnt(7)
            .setup_rnr_retry(self.caps.rnr_retry.min(7) as u8)
            .setup_max_read_atomic(1);
        qp.modify(&a).map_err(|e| err("modify_qp RTS", e))
    }

    fn post_writes(&self, wrs: &[WriteWr]) -> Result<()> {
        if wrs.is_empty() {
            return Ok(());
        }
        let mut qp = self.qp.lock().unwrap_or_else(|e| e.into_inner());
        let mut g = qp.start_post_send();
        for w in wrs {
            let flags = if w.signaled {
                WorkRequestFlags::Signaled
            } else {
                WorkRequestFlags::none()
            };
            let h = g.construct_wr(w.wr_id, flags);
            let h = match w.imm {
                Some(i) => h.setup_write_imm(w.rkey, w.remote_addr, i.to_be()),
                None => h.setup_write(w.rkey, w.remote_addr),
            };
            // SAFETY: the source lies in a registration of ours (the caller's
            // contract) and stays unchanged until the request completes.
            unsafe { h.setup_sge(w.lkey, w.local_addr, w.len) };
        }
        g.post().map_err(|e| err("post_send", e))
    }

    fn post_recvs(&self, wr_ids: &[u64]) -> Result<()> {
        if wr_ids.is_empty() {
            return Ok(());
        }
        let mut qp = self.qp.lock().unwrap_or_else(|e| e.into_inner());
        let mut g = qp.start_post_recv();
        for &id in wr_ids {
            let _ = g.construct_wr(id);
        }
        g.post().map_err(|e| err("post_recv", e))
    }
}
