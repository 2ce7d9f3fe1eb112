//! Control frames and how they travel: one JSON document per frame, with a u32
//! length prefix on byte streams (TCP, here) or as one packet on shared
//! memory's Unix socket (`shm::packet`, with descriptors attached).

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use avp_wire::{Mode, ModelIdentity, ResolutionPath};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TransportError};

/// Largest control frame.
pub(crate) const MAX_FRAME: usize = 64 << 10;
/// Protocol version spoken in `Hello`.
pub(crate) const PROTOCOL: u32 = 3;

/// First frame each side sends.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct Hello {
    /// Transport protocol version ([`PROTOCOL`]).
    pub protocol: u32,
    /// The agent's id.
    pub agent_id: String,
    /// The model the agent runs.
    pub identity: ModelIdentity,
    /// Largest message the agent accepts.
    pub max_message: u64,
    /// Transports the agent can use ("shm", "tcp", "cuda").
    pub transports: Vec<String>,
    /// The device the agent offers for device transports (`cuda`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<crate::device::DeviceInfo>,
    /// The RDMA device the agent offers (`rdma://` listeners and connecting peers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma: Option<crate::rdma::verbs::RdmaInfo>,
    /// `/proc/sys/kernel/random/boot_id`: equal boot ids mean the same host.
    pub boot_id: String,
    /// A listener's shared-memory control socket, offered to TCP peers on the same host.
    pub shm_socket: Option<String>,
    /// 32 random bytes, hex: the challenge for the peer's authentication.
    pub nonce: String,
    /// Whether the agent requires a token.
    pub auth_required: bool,
    /// The transport the connecting side chose and why (client only).
    pub transport_reason: Option<String>,
    /// Tokens in the vocabulary the agent can send (0: none). Older peers omit it.
    #[serde(default)]
    pub vocab_tokens: u32,
    /// The listener asks for the peer's vocabulary (no other latent path was found,
    /// so the vocabularies' overlap decides between cross-model and JSON).
    #[serde(default)]
    pub want_vocabulary: bool,
}

/// The listener's answer when it accepts a session.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct Accept {
    /// Session id (32 hex characters).
    pub session_id: String,
    /// Negotiated mode.
    pub mode: Mode,
    /// Cross-model map id ("" unless cross-model).
    pub map_id: String,
    /// Rule that decided the mode.
    pub path: ResolutionPath,
    /// Why, in words.
    pub reason: String,
    /// Session time to live in milliseconds.
    pub ttl_ms: u64,
    /// The smaller of the two sides' message limits.
    pub max_message: u64,
    /// With transport "rdma": the receiver's queue pairs and slot pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma: Option<crate::rdma::verbs::RdmaGrant>,
    /// The listener's proof of the token (when one is configured).
    pub mac: Option<String>,
}

/// Every control frame.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
// A handful of frames per session, never stored in bulk: boxing `Hello` would
// buy nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Frame {
    /// Opening frame.
    Hello(Hello),
    /// The connecting side's proof of the token.
    Auth {
        /// HMAC-SHA256, hex.
        mac: Option<String>,
        /// Why the connecting side chose this transport.
        reason: Option<String>,
        /// The transport it chose, when not the one it connected over ("cuda", "rdma").
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transport: Option<String>,
        /// With transport "rdma": the sender's queue pairs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rdma: Option<crate::rdma::verbs::RdmaOffer>,
    },
    /// Session accepted.
    Accept(Accept),
    /// Session refused; the connection closes.
    Refuse {
        /// Why.
        reason: String,
    },
    /// Part of the connecting side's vocabulary, sent after `Auth` when the
    /// listener asked for it: token strings of ids `first..first + tokens.len()`
    /// ("" for an id without a token).
    Vocabulary {
        /// Id of the first token in this part.
        first: u32,
        /// Token strings, by id.
        tokens: Vec<String>,
        /// Whether this is the last part.
        last: bool,
    },
    /// The connecting side leaves this TCP connection for the listener's shared memory.
    Switch {
        /// Where it goes ("shm").
        to: String,
    },
    /// The sender's slot pool: attached are the memfd, the "published" eventfd and the "released" eventfd.
    Pool {
        /// Slots.
        slots: u32,
        /// Bytes per slot.
        slot_size: u64,
        /// Entries in each ring.
        ring: u32,
    },
    /// A dedicated segment for one large message: attached is its memfd.
    Dedicated {
        /// Message length.
        len: u64,
    },
    /// The sender's device pool (`cuda` transport), paired slot for slot with
    /// the shared-memory pool: attached is the allocation's descriptor.
    DevicePool {
        /// Slots (as many as the shared-memory pool has).
        slots: u32,
        /// Bytes per slot (a multiple of the device's granularity).
        slot_size: u64,
        /// Bytes of the allocation (`slots × slot_size`).
        len: u64,
    },
    /// RDMA, receiver to sender: pool slot `slot` is free again (its guard was dropped).
    RdmaCredit {
        /// The slot.
        slot: u32,
    },
    /// RDMA, sender to receiver: register a dedicated region for one message
    /// larger than a slot.
    RdmaRegion {
        /// The sender's name for it.
        id: u32,
        /// Message length.
        len: u64,
        /// For a message whose sections are in device memory: the length of
        /// its host part (preamble and header); the sections then get a
        /// device region of `len` bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device_prefix: Option<u64>,
    },
    /// RDMA, receiver to sender: the dedicated region `id`, registered.
    RdmaRegionGrant {
        /// The sender's name for it.
        id: u32,
        /// Where to write (a device message: its host part).
        region: crate::rdma::verbs::RemoteRegion,
        /// A device message: where its sections go.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<crate::rdma::verbs::RemoteRegion>,
    },
    /// RDMA: dedicated region `id` is gone (receiver: its guard was dropped;
    /// sender: the loan was abandoned).
    RdmaRegionFreed {
        /// The sender's name for it.
        id: u32,
    },
    /// A dedicated device allocation for one message larger than a device
    /// slot: attached is its descriptor.
    DeviceDedicated {
        /// Message length.
        len: u64,
        /// Bytes of the allocation.
        size: u64,
    },
}

/// A stream or packet connection that carries frames.
pub(crate) trait FrameIo {
    /// Send one frame, with descriptors attached where the socket supports it.
    fn send_frame(&mut self, frame: &Frame, fds: &[RawFd]) -> Result<()>;
    /// Receive one frame (and its descriptors) within `timeout`.
    fn recv_frame(&mut self, timeout: Duration) -> Result<(Frame, Vec<OwnedFd>)>;
}

/// Wait until `fd` is readable; `Err(Timeout)` after `timeout`.
pub(crate) fn wait_readable(
    fd: BorrowedFd<'_>,
    timeout: Duration,
    what: &'static str,
) -> Result<()> {
    let deadline = crate::wait::from_now(timeout);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if crate::wait::readable(&[fd], left)? {
            return Ok(());
        }
        if left.is_zero() {
            return Err(TransportError::Timeout(timeout, what));
        }
    }
}

pub(crate) fn encode(frame: &Frame) -> Result<Vec<u8>> {
    let body = serde_json::to_vec(frame)
        .map_err(|e| TransportError::Protocol(format!("encode frame: {e}")))?;
    if body.len() > MAX_FRAME {
        return Err(TransportError::Protocol(format!(
            "frame of {} bytes exceeds {MAX_FRAME}",
            body.len()
        )));
    }
    Ok(body)
}

pub(crate) fn decode(body: &[u8]) -> Result<Frame> {
    serde_json::from_slice(body)
        .map_err(|e| TransportError::Protocol(format!("bad control frame: {e}")))
}

/// A byte stream that frames can travel on.
pub(crate) trait Stream: Read + Write + AsFd {
    /// Bound every following read (`None`: wait forever).
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl Stream for std::net::TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, t)
    }
}

impl Stream for crate::tcp::Conn {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.tcp().set_read_timeout(t)
    }
}

/// Frames on a byte stream (TCP): u32 little-endian length, then JSON. No descriptors.
pub(crate) struct StreamIo<S> {
    /// The stream.
    pub(crate) stream: S,
}

impl<S: Stream> FrameIo for StreamIo<S> {
    fn send_frame(&mut self, frame: &Frame, fds: &[RawFd]) -> Result<()> {
        if !fds.is_empty() {
            return Err(TransportError::Protocol(
                "descriptors cannot cross TCP".into(),
            ));
        }
        let body = encode(frame)?;
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&body);
        self.stream
            .write_all(&out)
            .map_err(peer_or_io("send frame"))
    }

    fn recv_frame(&mut self, timeout: Duration) -> Result<(Frame, Vec<OwnedFd>)> {
        wait_readable(self.stream.as_fd(), timeout, "a control frame")?;
        // A peer that stops halfway through a frame cannot hold us longer than `timeout`.
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(TransportError::io("set timeout"))?;
        let mut len = [0u8; 4];
        self.stream
            .read_exact(&mut len)
            .map_err(stalled_after(timeout, "read frame length"))?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(TransportError::Protocol(format!(
                "control frame of {len} bytes exceeds {MAX_FRAME} (is the peer speaking avp?)"
            )));
        }
        let mut body = vec![0u8; len];
        self.stream
            .read_exact(&mut body)
            .map_err(stalled_after(timeout, "read frame"))?;
        Ok((decode(&body)?, Vec::new()))
    }
}

/// [`peer_or_io`] for a read bounded by `timeout`: a read that timed out
/// says how long it waited.
fn stalled_after(
    timeout: Duration,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> TransportError {
    move |e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            TransportError::Timeout(timeout, "the rest of a control frame (peer stalled)")
        }
        _ => peer_or_io(op)(e),
    }
}

/// Map EOF and resets to `PeerGone`, other errors to `Io` (writes and reads
/// without a timeout of their own).
pub(crate) fn peer_or_io(op: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    move |e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::BrokenPipe
        | std::io::ErrorKind::ConnectionAborted => TransportError::PeerGone(format!("{op}: {e}")),
        _ => TransportError::Io { op, source: e },
    }
}
