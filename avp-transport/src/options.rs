//! Settings of an endpoint.

use std::sync::Arc;
use std::time::Duration;

use avp_wire::MapLookup;

/// How an endpoint behaves. `Options::default()` suits most uses.
#[derive(Clone, Debug)]
pub struct Options {
    /// This agent's id, sent in the handshake.
    pub agent_id: String,
    /// Largest message accepted or sent, in bytes. Enforced before allocating.
    pub max_message: u64,
    /// Pre-shared token. When the listener has one, connecting peers must prove
    /// they know it (HMAC-SHA256 challenge–response) before anything else happens.
    pub token: Option<String>,
    /// Shared-memory slots in the sender's pool (messages in flight).
    pub slots: usize,
    /// Bytes per slot; larger messages get a dedicated segment.
    pub slot_size: usize,
    /// Connect and handshake timeout.
    pub connect_timeout: Duration,
    /// How long `loan` waits for a free slot before failing (backpressure).
    pub loan_timeout: Duration,
    /// How long a receiver spins on the shared ring before blocking on the
    /// eventfd. [`Duration::MAX`] is spin mode: lowest latency, one busy core.
    pub spin: Duration,
    /// Session time to live; messages after it are refused.
    pub session_ttl: Duration,
    /// Whether a TCP connection to a peer on the same host may switch to shared memory.
    pub allow_shm_upgrade: bool,
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
    /// TLS for TCP sessions (feature `tls`): a client config to connect with and/or
    /// a server config to accept with. Shared-memory sessions never leave the host.
    #[cfg(feature = "tls")]
    pub tls: Option<Tls>,
}

/// TLS settings (feature `tls`).
#[cfg(feature = "tls")]
#[derive(Clone, Debug)]
pub struct Tls {
    /// Used by [`crate::Endpoint::connect`] over TCP.
    pub client: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// Used by [`crate::Listener::accept`] over TCP; peers must then speak TLS.
    pub server: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// Name checked against the server's certificate (default: the address's host).
    pub server_name: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            agent_id: String::new(),
            max_message: 4 << 30,
            token: None,
            slots: 4,
            slot_size: 16 << 20,
            connect_timeout: Duration::from_secs(10),
            loan_timeout: Duration::from_secs(10),
            spin: Duration::from_micros(50),
            session_ttl: Duration::from_secs(24 * 3600),
            allow_shm_upgrade: true,
            check_session_ids: true,
            vocabulary: None,
            maps: None,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}
