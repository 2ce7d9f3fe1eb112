//! The one error type of this crate.

use std::time::Duration;

/// Everything that can go wrong while connecting, sending or receiving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The address is not `shm://NAME` or `tcp://HOST:PORT`.
    #[error("invalid address {address:?}: {reason}")]
    InvalidAddress {
        /// What was given.
        address: String,
        /// Why it was refused.
        reason: String,
    },
    /// An operating-system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Nothing arrived (or no slot freed up) within the timeout.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// The peer closed the connection or died.
    #[error("peer disconnected ({0})")]
    PeerGone(String),
    /// The peer broke the protocol (bad frame, unexpected message).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Authentication failed; the cause says which side and why.
    #[error("authentication failed: {0}")]
    Auth(AuthFailure),
    /// A message is larger than the limit agreed for this session.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The session's time to live has passed.
    #[error("session {id} expired {ago:?} ago (ttl {ttl:?}); open a new session")]
    SessionExpired {
        /// Session id.
        id: String,
        /// Its ttl.
        ttl: Duration,
        /// How long ago it expired.
        ago: Duration,
    },
    /// A received message belongs to another session.
    #[error("message for session {found:?} arrived on session {expected:?}")]
    WrongSession {
        /// This session.
        expected: String,
        /// The message's session.
        found: String,
    },
    /// The message bytes are not a valid avp v2 message.
    #[error("invalid message: {0}")]
    Wire(#[from] avp_wire::WireError),
    /// An option has a value this transport cannot use.
    #[error("option {option}: {reason}")]
    InvalidOption {
        /// Which option.
        option: &'static str,
        /// What was expected and found.
        reason: String,
    },
    /// The shared-memory segment offered by the peer is unsafe to map.
    #[error("unsafe segment from peer: {0}")]
    Segment(String),
    /// A device (GPU) operation failed, or the device cannot be used.
    #[error("device memory, {op}: {reason}")]
    Device {
        /// What was being done.
        op: &'static str,
        /// What the driver (or the check) said.
        reason: String,
    },
    /// The operation needs the message (or loan) somewhere else: device
    /// sections read as host bytes, say.
    #[error("{0}")]
    Placement(String),
    /// An RDMA operation failed: a work completion with an error status (the
    /// peer died, a key or bound was refused), or the device refused a call.
    #[error("rdma {op}: {status}: {reason}")]
    Rdma {
        /// What was being done.
        op: &'static str,
        /// The work-completion status as verbs names it (`IBV_WC_REM_ACCESS_ERR`),
        /// or the failed call.
        status: String,
        /// What it means here.
        reason: String,
    },
    /// The peer refused a message and said why (an `http://` server's answer:
    /// 409 wrong session, 413 too large, 503 its receiver is behind); nothing
    /// was delivered, and the session goes on.
    #[error("the peer refused the message (HTTP {status}): {reason}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The server's message.
        reason: String,
    },
}

impl TransportError {
    pub(crate) fn device(op: &'static str, reason: impl Into<String>) -> TransportError {
        TransportError::Device {
            op,
            reason: reason.into(),
        }
    }
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(crate) fn rdma(
        op: &'static str,
        status: impl Into<String>,
        reason: impl Into<String>,
    ) -> TransportError {
        TransportError::Rdma {
            op,
            status: status.into(),
            reason: reason.into(),
        }
    }
    pub(crate) fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
        move |source| TransportError::Io { op, source }
    }
    pub(crate) fn errno(op: &'static str) -> impl FnOnce(nix::errno::Errno) -> TransportError {
        move |e| TransportError::Io {
            op,
            source: std::io::Error::from(e),
        }
    }
}

/// Why authentication failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthFailure {
    /// The listener requires a token and this side has none configured.
    #[error("the listener requires a token and none is configured")]
    TokenRequired,
    /// The peer's MAC did not verify: it does not know the token, or a frame of
    /// the handshake was changed on the way (the MAC covers the whole transcript).
    #[error(
        "{peer} could not prove it knows the token, or the handshake was tampered with on the way"
    )]
    BadProof {
        /// Which peer: "the listener" or "the connecting peer".
        peer: &'static str,
    },
    /// The peer refused the session.
    #[error("refused by the peer: {reason}")]
    Refused {
        /// The peer's reason.
        reason: String,
    },
    /// TLS could not be set up.
    #[error("TLS: {0}")]
    Tls(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;
