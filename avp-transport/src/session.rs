//! A negotiated session: who the peer is, which mode and transport, and for how long.

use std::sync::Arc;
use std::time::{Duration, Instant};

use avp_wire::{Mode, ModelIdentity, ResolutionPath};

use crate::error::{Result, TransportError};

/// Which transport carries the session's messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// Shared memory on one host.
    Shm,
    /// TCP.
    Tcp,
    /// Shared memory on one host with message sections in device memory (a
    /// GPU's, or host memory emulating one: `Session::explain` says which).
    Cuda,
    /// RDMA writes into the receiver's registered memory, with a TCP control
    /// connection (a real device, or the emulator: `Session::explain` says which).
    Rdma,
    /// HTTP: the Python reference's binding (`POST /avp/v2/transmit`), spoken
    /// with the reference's agents and between avp agents.
    Http,
}

impl TransportKind {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Shm => "shm",
            TransportKind::Tcp => "tcp",
            TransportKind::Cuda => "cuda",
            TransportKind::Rdma => "rdma",
            TransportKind::Http => "http",
        }
    }
}

/// The outcome of a handshake, held by both ends.
#[derive(Clone, Debug)]
pub struct Session {
    /// Session id, 32 hex characters.
    pub id: String,
    /// Exchange mode decided from both identities.
    pub mode: Mode,
    /// Cross-model map id ("" unless cross-model).
    pub map_id: String,
    /// The rule that decided the mode.
    pub path: ResolutionPath,
    /// Why that mode, in words.
    pub mode_reason: String,
    /// The transport in use.
    pub transport: TransportKind,
    /// Why that transport, in words.
    pub transport_reason: String,
    /// The peer's agent id.
    pub peer_agent: String,
    /// The peer's model.
    pub peer_identity: ModelIdentity,
    /// Largest message either side accepts.
    pub max_message: u64,
    /// Time to live.
    pub ttl: Duration,
    /// When the session was established (local clock).
    pub started: Instant,
    /// The connecting peer's vocabulary, when the listener asked for it.
    pub peer_vocabulary: Option<Arc<Vec<String>>>,
}

impl Session {
    /// One line saying what was negotiated and why.
    pub fn explain(&self) -> String {
        format!(
            "session {}: mode {} ({}: {}); transport {} ({})",
            &self.id[..self.id.len().min(8)],
            self.mode,
            self.path,
            self.mode_reason,
            self.transport.name(),
            self.transport_reason
        )
    }

    /// `Err(SessionExpired)` once the ttl has passed.
    pub fn check_alive(&self) -> Result<()> {
        self.check_alive_at(Instant::now())
    }

    /// [`check_alive`](Self::check_alive) with the time already read.
    pub fn check_alive_at(&self, now: Instant) -> Result<()> {
        let age = now.saturating_duration_since(self.started);
        if age > self.ttl {
            return Err(TransportError::SessionExpired {
                id: self.id.clone(),
                ttl: self.ttl,
                ago: age - self.ttl,
            });
        }
        Ok(())
    }
}
