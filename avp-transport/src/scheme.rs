//! Address schemes and the transports installed under them.
//!
//! Each transport registers one [`Scheme`] in [`SCHEMES`]: it checks addresses
//! of its scheme, binds them (giving [`Acceptor`]s that a `Listener` polls) and
//! connects to them, handshaking over the authenticated control channel and
//! saying why the transport was chosen.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use avp_wire::ModelIdentity;

use crate::error::Result;
use crate::options::Options;
use crate::port::{RecvPort, SendPort};
use crate::session::Session;

/// One address scheme (`NAME://…`) and the transport behind it.
pub(crate) trait Scheme: Sync {
    /// The scheme's name, as written before `://`.
    fn name(&self) -> &'static str;
    /// What an address of this scheme looks like (for error messages).
    fn form(&self) -> &'static str;
    /// Check the part after `NAME://`; the error says why it is refused.
    fn check(&self, target: &str) -> std::result::Result<(), String>;
    /// Listen at `target`.
    fn bind(
        &self,
        target: &str,
        identity: &ModelIdentity,
        options: &Options,
    ) -> Result<Vec<Box<dyn Acceptor>>>;
    /// Connect to a listener at `target` and handshake.
    fn connect(
        &self,
        target: &str,
        identity: &ModelIdentity,
        options: &Options,
    ) -> Result<(Session, Box<dyn SendPort>)>;
}

/// What an acceptor's `accept` may use.
pub(crate) struct AcceptCtx<'a> {
    /// The listener's model.
    pub(crate) identity: &'a ModelIdentity,
    /// The listener's options.
    pub(crate) options: &'a Options,
    /// A shared-memory control socket on this host to offer peers that
    /// connected some other way (see `Hello::shm_socket`).
    pub(crate) shm_offer: Option<String>,
}

impl std::fmt::Debug for dyn Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("local_addr", &self.local_addr())
            .field("shm_offer", &self.shm_offer())
            .finish()
    }
}

/// One bound socket of a listener.
pub(crate) trait Acceptor: Send + Sync {
    /// Readable when a peer is waiting.
    fn fd(&self) -> BorrowedFd<'_>;
    /// The address peers connect to, if this acceptor is the listener's own.
    fn local_addr(&self) -> Option<String>;
    /// The shared-memory socket this acceptor is, to offer to peers.
    fn shm_offer(&self) -> Option<String> {
        None
    }
    /// Take the waiting peer and handshake. `None` when the peer moved on to
    /// another of the listener's acceptors (a TCP peer switching to shared memory).
    fn accept(&self, ctx: &AcceptCtx<'_>) -> Result<Option<(Session, Arc<dyn RecvPort>)>>;
}

/// Every installed transport, by scheme.
pub(crate) static SCHEMES: &[&dyn Scheme] = &[
    #[cfg(target_os = "linux")]
    &crate::shm::ShmScheme,
    #[cfg(not(target_os = "linux"))]
    &Unsupported {
        name: "shm",
        why: "shared memory needs Linux (memfd, sealing, eventfd); use tcp:// on this platform",
    },
    &crate::tcp::TcpScheme,
    #[cfg(target_os = "linux")]
    &crate::device::scheme::CudaScheme,
    #[cfg(not(target_os = "linux"))]
    &Unsupported {
        name: "cuda",
        why: "device transports need Linux (file-descriptor passing); use tcp:// on this platform",
    },
    #[cfg(target_os = "linux")]
    &crate::rdma::scheme::RdmaScheme,
    #[cfg(not(target_os = "linux"))]
    &Unsupported {
        name: "rdma",
        why: "the rdma transport needs Linux; use tcp:// on this platform",
    },
    &crate::http::HttpScheme,
];

/// The scheme named `name`.
pub(crate) fn find(name: &str) -> Option<&'static dyn Scheme> {
    SCHEMES.iter().copied().find(|s| s.name() == name)
}

/// A scheme known to avp whose transport this build or platform lacks.
#[cfg(not(target_os = "linux"))]
struct Unsupported {
    name: &'static str,
    why: &'static str,
}

#[cfg(not(target_os = "linux"))]
impl Scheme for Unsupported {
    fn name(&self) -> &'static str {
        self.name
    }
    fn form(&self) -> &'static str {
        self.why
    }
    fn check(&self, _: &str) -> std::result::Result<(), String> {
        Err(self.why.into())
    }
    fn bind(&self, _: &str, _: &ModelIdentity, _: &Options) -> Result<Vec<Box<dyn Acceptor>>> {
        unreachable!("check refuses every address")
    }
    fn connect(
        &self,
        _: &str,
        _: &ModelIdentity,
        _: &Options,
    ) -> Result<(Session, Box<dyn SendPort>)> {
        unreachable!("check refuses every address")
    }
}
