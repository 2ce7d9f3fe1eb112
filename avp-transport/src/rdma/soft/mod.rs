//! A software RDMA device: the verbs semantics the transport relies on,
//! between processes on one host, with no kernel support. Chosen only
//! explicitly (`RdmaDevice::Emulated`); every session using it says so.
//!
//! Each opened device listens on an abstract Unix socket (its "port"). A
//! connected queue pair is one stream socket to the peer's port, dialled by
//! the end whose endpoint sorts first. A write travels as a packet with its
//! bytes; the peer's queue-pair thread (its "NIC") checks the remote key,
//! bounds and access against its live registrations before placing the bytes,
//! so a wrong key or an out-of-bounds write fails the requester with
//! `IBV_WC_REM_ACCESS_ERR` as hardware would. Also emulated: write-with-
//! immediate consuming a posted receive (receiver-not-ready answered with a
//! NAK and retried up to `rnr_retry`), order within one queue pair only,
//! cumulative acknowledgements, send-queue and completion-queue limits, and
//! the error state (the failing request reports its status, every other
//! outstanding and later one `IBV_WC_WR_FLUSH_ERR`). A peer that dies closes
//! the socket: outstanding requests fail with `IBV_WC_RETRY_EXC_ERR` (the
//! hardware's retry timeout, without the wait), and a passive responder sees
//! nothing, as with hardware.

mod packet;
mod qp;

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use crate::error::{Result, TransportError};
use crate::handshake::{boot_id, random_hex};
use crate::shm::segment::Event;

use crate::device::{Device, Region};
use crate::shm::segment::Mapping;

use super::verbs::{
    CompletionQueue, MemoryRegion, QpCaps, QpEndpoint, QueuePair, RdmaInfo, Verbs, Wc, own_cq,
};

use packet::Packet;
use qp::SoftQp;

/// What keeps registered memory alive (a mapping, a device region).
type Keep = Arc<dyn std::any::Any + Send + Sync>;

/// A live registration, as the device checks keys against it.
#[derive(Clone)]
struct Registration {
    base: u64,
    len: usize,
    remote_write: bool,
    _keep: Keep,
}

impl Registration {
    /// The `len` bytes at address `addr`, if they lie inside.
    fn span(&self, addr: u64, len: u64) -> Option<*mut u8> {
        let end = addr.checked_add(len)?;
        (addr >= self.base && end <= self.base + self.len as u64).then_some(addr as *mut u8)
    }
}

/// What the device's queue pairs share.
struct Shared {
    /// Registrations by local key and by remote key (the same value here).
    keys: RwLock<HashMap<u32, Registration>>,
    /// Queue pairs by number, for incoming connections.
    qps: Mutex<HashMap<u32, Weak<qp::Inner>>>,
    next_qpn: AtomicU32,
    port: String,
}

impl Shared {
    fn key(&self, key: u32) -> Option<Registration> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned()
    }
}

/// The emulated device: one per opened endpoint.
pub(crate) struct SoftVerbs {
    shared: Arc<Shared>,
    listener: Arc<UnixListener>,
    stop: Arc<AtomicBool>,
}

impl SoftVerbs {
    /// Open a device listening on a fresh abstract port.
    pub(crate) fn open() -> Result<SoftVerbs> {
        let port = format!("avp-soft-verbs/{}/{}", std::process::id(), random_hex(8));
        let addr = SocketAddr::from_abstract_name(port.as_bytes())
            .map_err(TransportError::io("soft verbs port name"))?;
        let listener = Arc::new(
            UnixListener::bind_addr(&addr).map_err(TransportError::io("soft verbs port"))?,
        );
        let shared = Arc::new(Shared {
            keys: RwLock::default(),
            qps: Mutex::default(),
            next_qpn: AtomicU32::new(0x100 + (std::process::id() & 0xfff) * 16),
            port,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s, st) = (
            Arc::clone(&listener),
            Arc::downgrade(&shared),
            Arc::clone(&stop),
        );
        std::thread::Builder::new()
            .name("avp-soft-verbs-port".into())
            .spawn(move || accept_loop(&l, &s, &st))
            .map_err(TransportError::io("spawn soft verbs port"))?;
        Ok(SoftVerbs {
            shared,
            listener,
            stop,
        })
    }
}

impl SoftVerbs {
    /// Register `len` bytes at `base`, kept alive by `keep`.
    fn register(&self, base: u64, len: usize, remote_write: bool, keep: Keep) -> Arc<SoftMr> {
        let mut keys = self.shared.keys.write().unwrap_or_else(|e| e.into_inner());
        let key = loop {
            let mut b = [0u8; 4];
            getrandom::fill(&mut b).expect("the OS random source works");
            let k = u32::from_ne_bytes(b);
            if k != 0 && !keys.contains_key(&k) {
                break k;
            }
        };
        keys.insert(
            key,
            Registration {
                base,
                len,
                remote_write,
                _keep: keep,
            },
        );
        Arc::new(SoftMr {
            base,
            len,
            key,
            shared: Arc::clone(&self.shared),
        })
    }
}

impl Drop for SoftVerbs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accepting thread: shutting a listening socket down makes accept fail.
        // SAFETY: the descriptor is the listener's, open until it is dropped after this.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// Take incoming queue-pair connections and hand each to its queue pair.
fn accept_loop(l: &UnixListener, shared: &Weak<Shared>, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        let Ok((mut stream, _)) = l.accept() else {
            if stop.load(Ordering::Acquire) {
                return;
            }
            continue;
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut hello = [0u8; Packet::LEN];
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
        if stream.read_exact(&mut hello).is_err() {
            continue;
        }
        let _ = stream.set_read_timeout(None);
        let p = Packet::decode(&hello);
        let target = shared
            .qps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(p.seq as u32))
            .and_then(Weak::upgrade);
        if let Some(q) = target {
            q.attach(stream, p.rkey);
        }
    }
}

impl Verbs for SoftVerbs {
    fn info(&self) -> RdmaInfo {
        RdmaInfo {
            backend: "emulated".into(),
            device: "soft".into(),
            host: boot_id(),
            link: String::new(),
        }
    }

    fn reach(&self, peer: &RdmaInfo) -> std::result::Result<String, String> {
        match (peer.backend.as_str(), peer.host == boot_id()) {
            ("emulated", true) => Ok("both ends use the emulated verbs device on this host".into()),
            ("emulated", false) => Err("the peer's emulated verbs device is on another host; \
                 the emulator reaches only this host"
                .into()),
            (other, _) => Err(format!(
                "this end's verbs device is emulated, the peer's is {other:?} ({})",
                peer.device
            )),
        }
    }

    fn alloc(&self, len: usize, remote_write: bool) -> Result<Arc<dyn MemoryRegion>> {
        let map = Arc::new(Mapping::anonymous(len)?);
        let (base, len) = (map.ptr() as u64, map.len());
        Ok(self.register(base, len, remote_write, map))
    }

    fn register_device(
        &self,
        region: Arc<dyn Region>,
        device: Device,
        remote_write: bool,
    ) -> Result<Arc<dyn MemoryRegion>> {
        if device != Device::Emulated {
            return Err(TransportError::rdma(
                "register",
                "EOPNOTSUPP",
                format!(
                    "the emulated verbs device reaches host memory only, not {device}; GPU \
                     memory needs a verbs device (feature rdma)"
                ),
            ));
        }
        let (base, len) = (region.addr(), region.len());
        Ok(self.register(base, len, remote_write, Arc::new(region)))
    }

    fn create_cq(&self, capacity: usize) -> Result<Arc<dyn CompletionQueue>> {
        Ok(Arc::new(SoftCq::new(capacity)?))
    }

    fn create_qp(
        &self,
        send_cq: &Arc<dyn CompletionQueue>,
        recv_cq: &Arc<dyn CompletionQueue>,
        caps: QpCaps,
    ) -> Result<Arc<dyn QueuePair>> {
        let qpn = self.shared.next_qpn.fetch_add(1, Ordering::Relaxed);
        let q = SoftQp::new(
            qpn,
            Arc::clone(&self.shared),
            own_cq::<SoftCq>(send_cq)?,
            own_cq::<SoftCq>(recv_cq)?,
            caps,
        )?;
        Ok(Arc::new(q))
    }
}

/// A registration of the emulated device (the memory stays alive with the
/// device's entry, until deregistration and any placement in progress end).
struct SoftMr {
    base: u64,
    len: usize,
    key: u32,
    shared: Arc<Shared>,
}

impl Drop for SoftMr {
    fn drop(&mut self) {
        // Deregister: later writes with this key fail; one being placed right
        // now keeps the memory mapped until it is done.
        self.shared
            .keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

impl MemoryRegion for SoftMr {
    fn ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }
    fn len(&self) -> usize {
        self.len
    }
    fn lkey(&self) -> u32 {
        self.key
    }
    fn rkey(&self) -> u32 {
        self.key
    }
}

/// A completion queue of the emulated device.
pub(crate) struct SoftCq {
    entries: Mutex<std::collections::VecDeque<Wc>>,
    capacity: usize,
    armed: AtomicBool,
    event: Event,
}

impl SoftCq {
    fn new(capacity: usize) -> Result<SoftCq> {
        Ok(SoftCq {
            entries: Mutex::new(std::collections::VecDeque::with_capacity(capacity)),
            capacity: capacity.max(1),
            armed: AtomicBool::new(false),
            event: Event::new()?,
        })
    }

    /// Add a completion; `false` when the queue is full (an overrun).
    fn push(&self, wc: Wc) -> bool {
        {
            let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            if e.len() >= self.capacity {
                tracing::error!(
                    "soft verbs: completion queue overrun ({} entries)",
                    self.capacity
                );
                return false;
            }
            e.push_back(wc);
        }
        if self.armed.swap(false, Ordering::AcqRel) {
            self.event.notify();
        }
        true
    }
}

impl CompletionQueue for SoftCq {
    fn poll(&self, out: &mut Vec<Wc>, max: usize) -> usize {
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let n = e.len().min(max);
        out.extend(e.drain(..n));
        n
    }

    fn fd(&self) -> RawFd {
        self.event.fd().as_raw_fd()
    }

    fn arm(&self) -> Result<()> {
        self.armed.store(true, Ordering::Release);
        Ok(())
    }

    fn ack(&self) {
        self.event.drain();
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

/// Dial the peer's port for queue pair `remote`, introducing ours as `local`.
fn dial(remote: &QpEndpoint, local: u32) -> Result<UnixStream> {
    let addr = SocketAddr::from_abstract_name(remote.port.as_bytes())
        .map_err(TransportError::io("soft verbs peer port"))?;
    let mut s = UnixStream::connect_addr(&addr).map_err(|e| {
        TransportError::rdma(
            "connect",
            "IBV_WC_RETRY_EXC_ERR",
            format!(
                "the peer's emulated device {:?} does not answer: {e}",
                remote.port
            ),
        )
    })?;
    let hello = Packet {
        kind: packet::Kind::Hello,
        seq: u64::from(remote.qpn),
        rkey: local,
        ..Packet::default()
    };
    std::io::Write::write_all(&mut s, &hello.encode())
        .map_err(TransportError::io("soft verbs hello"))?;
    Ok(s)
}

#[cfg(test)]
mod tests;
