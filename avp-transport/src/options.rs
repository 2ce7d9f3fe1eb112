//! Settings of an endpoint: the session-wide ones in [`Options`], each
//! transport's tuning knobs in its own ([`ShmOptions`], [`TcpOptions`]).
//! Built in the builder style, so that adding a knob breaks no caller:
//!
//! ```
//! use std::time::Duration;
//! use avp_transport::{Options, ShmOptions, TcpOptions};
//! let o = Options::default()
//!     .token("s3cret")
//!     .shm(ShmOptions::default().slots(8).spin(Duration::MAX))
//!     .tcp(TcpOptions::default().shm_upgrade(false));
//! assert_eq!(o.shm.slots, 8);
//! ```

use std::sync::Arc;
use std::time::Duration;

use avp_wire::MapLookup;

use crate::device::Device;
use crate::rdma::RdmaDevice;

/// How an endpoint behaves, whichever transport carries the session.
/// `Options::default()` suits most uses.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Options {
    /// This agent's id, sent in the handshake.
    pub agent_id: String,
    /// Largest message accepted or sent, in bytes. Enforced before allocating.
    pub max_message: u64,
    /// Pre-shared token. When the listener has one, connecting peers must prove
    /// they know it (HMAC-SHA256 over the handshake's transcript) before
    /// anything else happens. Over `http://` it is the binding's bearer token
    /// (`Authorization: Bearer`), sent as it is.
    pub token: Option<String>,
    /// Connect and handshake timeout (and the longest wait for one control frame).
    pub connect_timeout: Duration,
    /// Session time to live; messages after it are refused.
    pub session_ttl: Duration,
    /// Whether a receiver refuses messages whose envelope names another session
    /// (messages with an empty session id are always accepted). Turn off to relay
    /// recorded messages.
    pub check_session_ids: bool,
    /// This agent's vocabulary (token strings by id). A listener with one asks a
    /// connecting peer for its vocabulary when no other latent path exists, and the
    /// overlap decides between cross-model and JSON; a connecting agent with one
    /// sends it when asked. `None`: no vocabulary-overlap path.
    pub vocabulary: Option<Arc<Vec<String>>>,
    /// Where a listener looks up cached cross-model maps (the resolver's rule 4).
    pub maps: Option<Arc<dyn MapLookup>>,
    /// Shared-memory knobs.
    pub shm: ShmOptions,
    /// TCP knobs.
    pub tcp: TcpOptions,
    /// The device that `cuda://` sessions keep message sections on; `None`
    /// (the default) offers no device. Listeners bound at `cuda://` offer it;
    /// senders use it to copy from device memory on any transport.
    pub device: Option<DeviceOptions>,
    /// RDMA knobs (`rdma://` sessions).
    pub rdma: RdmaOptions,
    /// HTTP knobs (`http://` sessions).
    pub http: HttpOptions,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            agent_id: String::new(),
            max_message: 4 << 30,
            token: None,
            connect_timeout: Duration::from_secs(10),
            session_ttl: Duration::from_secs(24 * 3600),
            check_session_ids: true,
            vocabulary: None,
            maps: None,
            shm: ShmOptions::default(),
            tcp: TcpOptions::default(),
            device: None,
            rdma: RdmaOptions::default(),
            http: HttpOptions::default(),
        }
    }
}

impl Options {
    /// This agent's id.
    pub fn agent_id(mut self, id: impl Into<String>) -> Self {
        self.agent_id = id.into();
        self
    }
    /// Largest message accepted or sent, in bytes.
    pub fn max_message(mut self, bytes: u64) -> Self {
        self.max_message = bytes;
        self
    }
    /// A pre-shared token both sides must know.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }
    /// Connect and handshake timeout.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }
    /// Session time to live.
    pub fn session_ttl(mut self, t: Duration) -> Self {
        self.session_ttl = t;
        self
    }
    /// Whether messages of other sessions are refused.
    pub fn check_session_ids(mut self, check: bool) -> Self {
        self.check_session_ids = check;
        self
    }
    /// This agent's vocabulary (token strings by id).
    pub fn vocabulary(mut self, v: Arc<Vec<String>>) -> Self {
        self.vocabulary = Some(v);
        self
    }
    /// Where a listener looks up cached cross-model maps.
    pub fn maps(mut self, maps: Arc<dyn MapLookup>) -> Self {
        self.maps = Some(maps);
        self
    }
    /// Shared-memory knobs.
    pub fn shm(mut self, shm: ShmOptions) -> Self {
        self.shm = shm;
        self
    }
    /// TCP knobs.
    pub fn tcp(mut self, tcp: TcpOptions) -> Self {
        self.tcp = tcp;
        self
    }
    /// Set [`device`](Self::device).
    pub fn rdma(mut self, rdma: RdmaOptions) -> Self {
        self.rdma = rdma;
        self
    }
    /// The device of `cuda://` sessions.
    pub fn device(mut self, device: DeviceOptions) -> Self {
        self.device = Some(device);
        self
    }
    /// HTTP knobs.
    pub fn http(mut self, http: HttpOptions) -> Self {
        self.http = http;
        self
    }
}

/// The `http://` transport's knobs (the Python reference's HTTP binding).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HttpOptions {
    /// Listener: messages of one session received but not yet taken by its
    /// receiver; a sender's request waits while the queue is full (backpressure).
    pub queue: usize,
    /// Listener: how long a request waits for room in a full queue before it is
    /// answered 503 (nothing delivered). Sender: how long it waits for an answer.
    pub delivery_timeout: Duration,
    /// Listener: how long a request's headers may take to arrive, and then the
    /// rest of its body; a stalled body is answered 408 and nothing is
    /// delivered, stalled headers close the connection.
    pub body_timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            queue: 4,
            delivery_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
        }
    }
}

impl HttpOptions {
    /// Messages a session may have waiting for its receiver (at least 1).
    pub fn queue(mut self, n: usize) -> Self {
        self.queue = n;
        self
    }
    /// How long a request waits for room, or a sender for an answer.
    pub fn delivery_timeout(mut self, t: Duration) -> Self {
        self.delivery_timeout = t;
        self
    }
    /// How long a request body may take.
    pub fn body_timeout(mut self, t: Duration) -> Self {
        self.body_timeout = t;
        self
    }
}

/// Shared memory's knobs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ShmOptions {
    /// Slots in the sender's pool (messages in flight), 1–32.
    pub slots: usize,
    /// Bytes per slot (rounded up to whole pages); larger messages get a
    /// dedicated segment.
    pub slot_size: usize,
    /// How long `loan` waits for a free slot before failing (backpressure).
    pub loan_timeout: Duration,
    /// How long a receiver spins on the ring before blocking on the
    /// eventfd. [`Duration::MAX`] is spin mode: lowest latency, one busy core.
    pub spin: Duration,
}

impl Default for ShmOptions {
    fn default() -> Self {
        ShmOptions {
            slots: 4,
            slot_size: 16 << 20,
            loan_timeout: Duration::from_secs(10),
            spin: Duration::from_micros(50),
        }
    }
}

impl ShmOptions {
    /// Slots in the sender's pool, 1–32.
    pub fn slots(mut self, n: usize) -> Self {
        self.slots = n;
        self
    }
    /// Bytes per slot.
    pub fn slot_size(mut self, bytes: usize) -> Self {
        self.slot_size = bytes;
        self
    }
    /// How long `loan` waits for a free slot.
    pub fn loan_timeout(mut self, t: Duration) -> Self {
        self.loan_timeout = t;
        self
    }
    /// How long a receiver spins before sleeping (`Duration::MAX`: always).
    pub fn spin(mut self, t: Duration) -> Self {
        self.spin = t;
        self
    }
}

/// TCP's knobs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct TcpOptions {
    /// Whether a TCP connection to a peer on the same host may switch to
    /// shared memory (a listener offers its socket, a connecting peer takes it).
    pub shm_upgrade: bool,
    /// How long a receiver waits for the rest of a message once its first
    /// bytes arrived; a stalled peer's connection is then closed.
    pub stall_timeout: Duration,
    /// TLS for TCP sessions (feature `tls`): a client config to connect with and/or
    /// a server config to accept with. Shared-memory sessions never leave the host.
    #[cfg(feature = "tls")]
    pub tls: Option<Tls>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            shm_upgrade: true,
            stall_timeout: Duration::from_secs(10),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

impl TcpOptions {
    /// Whether a peer on the same host may switch to shared memory.
    pub fn shm_upgrade(mut self, allow: bool) -> Self {
        self.shm_upgrade = allow;
        self
    }
    /// How long a receiver waits for the rest of a message.
    pub fn stall_timeout(mut self, t: Duration) -> Self {
        self.stall_timeout = t;
        self
    }
    /// TLS settings (feature `tls`).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// TLS settings (feature `tls`).
#[cfg(feature = "tls")]
#[derive(Clone, Debug, Default)]
pub struct Tls {
    /// Used by [`crate::Endpoint::connect`] over TCP.
    pub client: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// Used by [`crate::Listener::accept`] over TCP; peers must then speak TLS.
    pub server: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// Name checked against the server's certificate (default: the address's host).
    pub server_name: Option<String>,
}

/// The device of `cuda://` sessions and how its pool is cut.
///
/// ```
/// use avp_transport::{Device, DeviceOptions, Options};
/// let o = Options::default().device(DeviceOptions::new(Device::Emulated).slot_size(1 << 20));
/// assert_eq!(o.device.unwrap().device, Device::Emulated);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeviceOptions {
    /// Which device.
    pub device: Device,
    /// Bytes per device slot (rounded up to the device's allocation
    /// granularity); there are as many device slots as shared-memory slots
    /// (`ShmOptions::slots`). Larger messages get a dedicated allocation.
    /// Default 64 MiB.
    pub slot_size: usize,
}

impl DeviceOptions {
    /// `device` with the default pool.
    pub fn new(device: Device) -> Self {
        DeviceOptions {
            device,
            slot_size: 64 << 20,
        }
    }
    /// Set [`slot_size`](Self::slot_size).
    pub fn slot_size(mut self, bytes: usize) -> Self {
        self.slot_size = bytes;
        self
    }
}

/// RDMA's knobs: the device, and how messages are cut and striped.
///
/// ```
/// use avp_transport::{Options, RdmaDevice, RdmaOptions};
/// // The software emulator (tests, machines without an RDMA NIC): chosen
/// // explicitly, and every session using it says so in `Session::explain`.
/// let o = Options::default().rdma(RdmaOptions::default().device(RdmaDevice::Emulated).queue_pairs(4));
/// assert_eq!(o.rdma.queue_pairs, 4);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RdmaOptions {
    /// The device; `None` (the default) takes the first verbs device when
    /// avp is built with the `rdma` feature. Without a usable device an
    /// `rdma://` session runs over TCP and `Session::explain` says why.
    pub device: Option<RdmaDevice>,
    /// Reliable-connected queue pairs a message is striped over (1–16, default 2).
    pub queue_pairs: usize,
    /// Bytes per RDMA write (4 KiB – 16 MiB, default 64 KiB).
    pub slice: usize,
    /// Receiver: slots in its registered pool, i.e. messages in flight (1–64, default 4).
    pub slots: usize,
    /// Receiver: bytes per slot (default 16 MiB); a larger message gets a
    /// region registered for it alone.
    pub slot_size: usize,
    /// Sender: how long `loan` waits for a free slot (backpressure).
    pub loan_timeout: Duration,
    /// The port's GID index (RoCE); `None` takes the RoCE v2 entry of the
    /// port's first IPv4 address (InfiniBand: 0).
    pub gid_index: Option<u8>,
    /// Tests only: the sender writes with a wrong remote key, as a broken
    /// or hostile peer would (the receiver's device must refuse every write).
    #[doc(hidden)]
    pub wrong_rkey_for_tests: bool,
}

impl Default for RdmaOptions {
    fn default() -> Self {
        RdmaOptions {
            device: None,
            queue_pairs: 2,
            slice: 64 << 10,
            slots: 4,
            slot_size: 16 << 20,
            loan_timeout: Duration::from_secs(10),
            gid_index: None,
            wrong_rkey_for_tests: false,
        }
    }
}

impl RdmaOptions {
    /// Use `device`.
    pub fn device(mut self, device: RdmaDevice) -> Self {
        self.device = Some(device);
        self
    }
    /// Queue pairs per session, 1–16.
    pub fn queue_pairs(mut self, n: usize) -> Self {
        self.queue_pairs = n;
        self
    }
    /// Bytes per write.
    pub fn slice(mut self, bytes: usize) -> Self {
        self.slice = bytes;
        self
    }
    /// Receiver pool slots, 1–64.
    pub fn slots(mut self, n: usize) -> Self {
        self.slots = n;
        self
    }
    /// Receiver pool bytes per slot.
    pub fn slot_size(mut self, bytes: usize) -> Self {
        self.slot_size = bytes;
        self
    }
    /// How long `loan` waits for a free slot.
    pub fn loan_timeout(mut self, t: Duration) -> Self {
        self.loan_timeout = t;
        self
    }
    /// The port's GID index (RoCE).
    pub fn gid_index(mut self, i: u8) -> Self {
        self.gid_index = Some(i);
        self
    }

    /// Refuse values out of range, naming the knob.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(crate) fn check(&self) -> crate::Result<()> {
        let bad = |option: &'static str, reason: String| {
            Err(crate::TransportError::InvalidOption { option, reason })
        };
        if !(1..=16).contains(&self.queue_pairs) {
            return bad(
                "rdma.queue_pairs",
                format!("expected 1–16, found {}", self.queue_pairs),
            );
        }
        if !(4096..=16 << 20).contains(&self.slice) {
            return bad(
                "rdma.slice",
                format!("expected 4 KiB – 16 MiB, found {} bytes", self.slice),
            );
        }
        if !(1..=64).contains(&self.slots) {
            return bad("rdma.slots", format!("expected 1–64, found {}", self.slots));
        }
        if self.slot_size < 4096 || self.slot_size > 1 << 30 {
            return bad(
                "rdma.slot_size",
                format!("expected 4 KiB – 1 GiB, found {} bytes", self.slot_size),
            );
        }
        Ok(())
    }
}
