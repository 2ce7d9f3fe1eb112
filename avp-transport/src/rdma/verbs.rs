//! The narrow verbs interface the RDMA transport is written against, with the
//! types of work requests and completions. Two backends implement it: the
//! software emulator ([`super::soft`], always built, chosen explicitly) and
//! the kernel's verbs (cargo feature `rdma`).
//!
//! The semantics are those of reliable-connected queue pairs: work requests
//! on one queue pair execute in order, a write's data is visible before the
//! completion of a later write-with-immediate on the same queue pair, nothing
//! is ordered across queue pairs, and after any error a queue pair completes
//! every outstanding and later request with [`WcStatus::WrFlushErr`].

// The transport using these is Linux-only; the handshake's types are everywhere.
#![cfg_attr(not(target_os = "linux"), allow(dead_code))]

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::device::{Device, Region};
use crate::error::Result;

/// What an end tells its peer about its RDMA device, in the handshake.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct RdmaInfo {
    /// "verbs" or "emulated".
    pub backend: String,
    /// The device's name (`mlx5_0`), or "soft" for the emulator.
    pub device: String,
    /// For the emulator: the host's boot id (it reaches only this host).
    pub host: String,
    /// The link layer ("infiniband", "ethernet"; "" for the emulator).
    #[serde(default)]
    pub link: String,
}

/// How a peer reaches one queue pair (exchanged in the handshake).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct QpEndpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// Local identifier (InfiniBand) or 0.
    #[serde(default)]
    pub lid: u16,
    /// Global identifier, hex (RoCE), or "".
    #[serde(default)]
    pub gid: String,
    /// First packet sequence number.
    #[serde(default)]
    pub psn: u32,
    /// The emulator's port (an abstract Unix socket name), or "".
    #[serde(default)]
    pub port: String,
}

/// A registered region as the peer addresses it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct RemoteRegion {
    /// Start address in the owner's address space.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Remote key.
    pub rkey: u32,
}

/// The sender's part of an RDMA session, in its `Auth` frame.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct RdmaOffer {
    /// Its queue pairs, one per stripe.
    pub qps: Vec<QpEndpoint>,
    /// Its device, when its messages' sections can come from device memory
    /// registered with its NIC (GPUDirect RDMA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<crate::device::DeviceInfo>,
}

/// The receiver's device slots (GPUDirect RDMA), paired one to one with the
/// host slots that hold each device message's preamble and header.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct DeviceGrant {
    /// The device pool, registered once.
    pub pool: RemoteRegion,
    /// Bytes per device slot.
    pub slot_size: u64,
    /// The receiver's device.
    pub info: crate::device::DeviceInfo,
}

/// The receiver's part of an RDMA session, in its `Accept` frame.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct RdmaGrant {
    /// Its queue pairs, paired in order with the offer's.
    pub qps: Vec<QpEndpoint>,
    /// The slot pool, registered once for the session.
    pub pool: RemoteRegion,
    /// Slots in the pool (messages in flight).
    pub slots: u32,
    /// Bytes per slot.
    pub slot_size: u64,
    /// Device slots, when both ends keep sections in device memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceGrant>,
}

/// Registered memory, owned by this process; deregistered and freed on drop.
pub(crate) trait MemoryRegion: Send + Sync {
    /// Start of the memory in this process.
    fn ptr(&self) -> *mut u8;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Local key.
    fn lkey(&self) -> u32;
    /// Remote key.
    fn rkey(&self) -> u32;
    /// How the peer addresses this region.
    fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.ptr() as u64,
            len: self.len() as u64,
            rkey: self.rkey(),
        }
    }
}

/// One RDMA WRITE (with an immediate value when `imm` is set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WriteWr {
    /// Returned in the completion.
    pub wr_id: u64,
    /// Local source: address, length, and the region's local key.
    pub local_addr: u64,
    /// Bytes to write.
    pub len: u32,
    /// Local key of the region holding the source.
    pub lkey: u32,
    /// Remote destination address.
    pub remote_addr: u64,
    /// Remote key of the region holding the destination.
    pub rkey: u32,
    /// Write-with-immediate: consumes a posted receive on the peer, whose
    /// completion carries this value.
    pub imm: Option<u32>,
    /// Whether a successful completion is reported (errors always are).
    pub signaled: bool,
}

/// A completion's status, as verbs names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WcStatus {
    /// Done.
    Success,
    /// A local address or key outside a registered region.
    LocProtErr,
    /// The remote key, bounds or access rights refused the write.
    RemAccessErr,
    /// The peer never answered (it died, or the link went down).
    RetryExcErr,
    /// The peer had no receive posted for a write-with-immediate, retries exhausted.
    RnrRetryExcErr,
    /// Flushed: the queue pair was already in the error state.
    WrFlushErr,
    /// The peer's queue pair failed the operation.
    RemOpErr,
    /// Any other status, by number.
    Other(u32),
}

impl std::fmt::Display for WcStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WcStatus::Success => f.write_str("IBV_WC_SUCCESS"),
            WcStatus::LocProtErr => f.write_str("IBV_WC_LOC_PROT_ERR"),
            WcStatus::RemAccessErr => f.write_str("IBV_WC_REM_ACCESS_ERR"),
            WcStatus::RetryExcErr => f.write_str("IBV_WC_RETRY_EXC_ERR"),
            WcStatus::RnrRetryExcErr => f.write_str("IBV_WC_RNR_RETRY_EXC_ERR"),
            WcStatus::WrFlushErr => f.write_str("IBV_WC_WR_FLUSH_ERR"),
            WcStatus::RemOpErr => f.write_str("IBV_WC_REM_OP_ERR"),
            WcStatus::Other(n) => write!(f, "ibv_wc_status {n}"),
        }
    }
}

/// What completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WcOpcode {
    /// A write this end posted.
    Write,
    /// A peer's write-with-immediate consumed a receive posted here.
    RecvWithImm,
}

/// One work completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Wc {
    /// The work request's id.
    pub wr_id: u64,
    /// How it ended.
    pub status: WcStatus,
    /// What it was.
    pub opcode: WcOpcode,
    /// The immediate value of a received write-with-immediate.
    pub imm: Option<u32>,
    /// Bytes the peer wrote (receives only).
    pub byte_len: u32,
    /// The queue pair it belongs to.
    pub qpn: u32,
}

/// Limits of a queue pair.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QpCaps {
    /// Send work requests outstanding at most (posting more fails).
    pub max_send_wr: usize,
    /// Receives posted at most.
    pub max_recv_wr: usize,
    /// Times a write-with-immediate is retried while the peer has no receive posted.
    pub rnr_retry: u32,
    /// How long the peer may stay silent before requests fail with
    /// [`WcStatus::RetryExcErr`].
    pub timeout: Duration,
}

impl Default for QpCaps {
    fn default() -> QpCaps {
        QpCaps {
            max_send_wr: 256,
            max_recv_wr: 256,
            rnr_retry: 7,
            timeout: Duration::from_secs(4),
        }
    }
}

/// A completion queue.
pub(crate) trait CompletionQueue: Send + Sync {
    /// Move up to `max` completions into `out`; how many moved.
    fn poll(&self, out: &mut Vec<Wc>, max: usize) -> usize;
    /// A descriptor that becomes readable once a completion arrives after
    /// [`arm`](Self::arm).
    fn fd(&self) -> RawFd;
    /// Ask for one notification on the next completion; poll again after
    /// arming (a completion may have come in between).
    fn arm(&self) -> Result<()>;
    /// Consume a notification after the descriptor was readable.
    fn ack(&self);
    /// The queue as `Any`, so a backend can recognise its own.
    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync>;
}

/// `c` as a backend's own completion queue type `T`: a queue pair completes
/// only on queues of its own device.
pub(crate) fn own_cq<T: Send + Sync + 'static>(c: &Arc<dyn CompletionQueue>) -> Result<Arc<T>> {
    Arc::clone(c).into_any().downcast::<T>().map_err(|_| {
        crate::error::TransportError::rdma(
            "create_qp",
            "EINVAL",
            "a completion queue of another device",
        )
    })
}

/// A reliable-connected queue pair.
pub(crate) trait QueuePair: Send + Sync {
    /// How the peer reaches it.
    fn endpoint(&self) -> QpEndpoint;
    /// Connect to the peer's queue pair (RESET → INIT → RTR → RTS).
    fn connect(&self, remote: &QpEndpoint) -> Result<()>;
    /// Post writes, in order, ringing the doorbell once. Fails (nothing
    /// posted) when the queue pair is not connected or the send queue would
    /// hold more than `max_send_wr`.
    fn post_writes(&self, wrs: &[WriteWr]) -> Result<()>;
    /// Post receives for writes-with-immediate, by work-request id.
    fn post_recvs(&self, wr_ids: &[u64]) -> Result<()>;
}

/// An opened RDMA device with its protection domain.
pub(crate) trait Verbs: Send + Sync {
    /// What to tell the peer.
    fn info(&self) -> RdmaInfo;
    /// Whether this device can connect to the peer's: `Ok(why)` or `Err(why not)`.
    fn reach(&self, peer: &RdmaInfo) -> std::result::Result<String, String>;
    /// Page-aligned memory of at least `len` bytes, registered for local
    /// access and, when `remote_write`, for the peer's writes.
    fn alloc(&self, len: usize, remote_write: bool) -> Result<Arc<dyn MemoryRegion>>;
    /// Register device memory for GPUDirect RDMA: `region` of `device`,
    /// kept alive by the registration, for local access and, when
    /// `remote_write`, the peer's writes. Its `ptr` is the device address.
    fn register_device(
        &self,
        region: Arc<dyn Region>,
        device: Device,
        remote_write: bool,
    ) -> Result<Arc<dyn MemoryRegion>>;
    /// A completion queue of `capacity` entries.
    fn create_cq(&self, capacity: usize) -> Result<Arc<dyn CompletionQueue>>;
    /// A queue pair completing sends on `send_cq` and receives on `recv_cq`.
    fn create_qp(
        &self,
        send_cq: &Arc<dyn CompletionQueue>,
        recv_cq: &Arc<dyn CompletionQueue>,
        caps: QpCaps,
    ) -> Result<Arc<dyn QueuePair>>;
}
