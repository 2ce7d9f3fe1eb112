//! The entry points: [`Endpoint::bind`] gives a [`Listener`] that accepts
//! [`Receiver`]s; [`Endpoint::connect`] gives a [`Sender`]. Which transport
//! serves an address is the address scheme's business (see `scheme`).

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use avp_wire::ModelIdentity;

use crate::address::Address;
use crate::error::{Result, TransportError};
use crate::options::Options;
use crate::receiver::Receiver;
use crate::scheme::{AcceptCtx, Acceptor};
use crate::sender::Sender;

/// Entry points.
pub struct Endpoint;

impl Endpoint {
    /// Listen at `addr` (`shm://NAME` or `tcp://HOST:PORT`; port 0 picks one).
    /// A TCP listener also offers a shared-memory socket to peers on the same host
    /// unless `options.tcp.shm_upgrade` is false.
    ///
    /// # Errors
    /// `InvalidAddress` for an address no installed transport takes (or one
    /// already bound), `Io` when the socket cannot be bound.
    pub fn bind(addr: &str, identity: &ModelIdentity, options: Options) -> Result<Listener> {
        let address = Address::parse(addr)?;
        let acceptors = address
            .transport()
            .bind(address.target(), identity, &options)?;
        Ok(Listener {
            address,
            identity: identity.clone(),
            options,
            acceptors,
        })
    }

    /// Connect to a listener at `addr`, handshake, and return the sending half.
    ///
    /// # Errors
    /// `InvalidAddress`, `Io` (nothing listens there), `Auth` (token refused),
    /// `Protocol` (the peer does not speak avp), `Timeout` (handshake too slow).
    pub fn connect(addr: &str, identity: &ModelIdentity, options: Options) -> Result<Sender> {
        let address = Address::parse(addr)?;
        let (session, port) = address
            .transport()
            .connect(address.target(), identity, &options)?;
        tracing::info!("{}", session.explain());
        Ok(Sender::new(
            session,
            port,
            options.device.as_ref().map(|d| d.device),
        ))
    }
}

/// A bound endpoint that accepts sessions.
#[derive(Debug)]
pub struct Listener {
    address: Address,
    identity: ModelIdentity,
    options: Options,
    acceptors: Vec<Box<dyn Acceptor>>,
}

impl Listener {
    /// The address peers connect to (with the actual port for `tcp://…:0`).
    pub fn local_addr(&self) -> String {
        self.acceptors
            .iter()
            .find_map(|a| a.local_addr())
            .unwrap_or_else(|| self.address.to_string())
    }

    /// Path of the shared-memory control socket this listener offers, if any.
    pub fn shm_socket(&self) -> Option<String> {
        self.acceptors.iter().find_map(|a| a.shm_offer())
    }

    /// Wait up to `timeout` for a peer, handshake, and return the receiving half.
    ///
    /// A peer that fails the handshake (bad token, garbage) yields an error for
    /// that peer only; call `accept` again to keep serving others.
    ///
    /// # Errors
    /// `Timeout` when no peer came; `Auth`, `Protocol`, `Segment` or `PeerGone`
    /// for a peer that failed its handshake.
    pub fn accept(&self, timeout: Duration) -> Result<Receiver> {
        let deadline = crate::wait::from_now(timeout);
        let ctx = AcceptCtx {
            identity: &self.identity,
            options: &self.options,
            shm_offer: self.shm_socket(),
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let fds: Vec<BorrowedFd<'_>> = self.acceptors.iter().map(|a| a.fd()).collect();
            let ready = crate::wait::which_readable(&fds, left)?;
            if !ready.contains(&true) {
                if left.is_zero() {
                    return Err(TransportError::Timeout(timeout, "a peer to connect"));
                }
                continue;
            }
            for (acceptor, _) in self.acceptors.iter().zip(ready).filter(|(_, r)| *r) {
                if let Some((session, port)) = acceptor.accept(&ctx)? {
                    return Ok(Receiver::new(session, port, &self.options));
                }
            }
        }
    }
}
