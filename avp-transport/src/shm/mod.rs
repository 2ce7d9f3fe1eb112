//! The shared-memory transport (Linux): a pool of pre-faulted slots in one
//! sealed memfd, handed to the receiver over a Unix socket (SCM_RIGHTS), two
//! rings in the pool's control block, and eventfd doorbells rung only when the
//! other side sleeps.
//!
//! Slot life cycle: free (sender) → loaned (sender writes in place) → staged
//! (ring entry written when the message is finished) → published (`head`) →
//! held (receiver's guard, on any thread) → released (release ring) → free.
//! Messages larger than a slot travel in a dedicated sealed memfd sent with the
//! notification. A peer that dies is seen as EOF/HUP on the Unix socket; all its
//! mappings and descriptors are dropped with the endpoint.
//!
//! The sender can write a slot at any time, so the receiver validates and reads
//! every header from a private copy (the endpoint does, as for any delivery
//! marked peer-writable).

mod control;
mod packet;
mod receiver;
pub(crate) mod segment;
mod sender;

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;

use avp_wire::ModelIdentity;

use crate::device::DeviceMem;
use crate::error::{Result, TransportError};
use crate::frame::Hello;
use crate::handshake::{self, ClientStep};
use crate::options::Options;
use crate::port::{RecvPort, SendPort};
use crate::scheme::{AcceptCtx, Acceptor, Scheme};
use crate::session::{Session, TransportKind};

pub(crate) use packet::PacketIo;
use packet::{UdsListener, connect_uds, socket_path};
use receiver::ShmReceiver;
use sender::ShmSender;

/// Longest name in `shm://NAME` (it becomes a socket file name).
const MAX_NAME: usize = 64;

/// `shm://NAME`: shared memory on this host; `NAME` names the control socket
/// in the runtime directory.
pub(crate) struct ShmScheme;

impl Scheme for ShmScheme {
    fn name(&self) -> &'static str {
        "shm"
    }

    fn form(&self) -> &'static str {
        "shm://NAME"
    }

    fn check(&self, name: &str) -> std::result::Result<(), String> {
        let ok = !name.is_empty()
            && name.len() <= MAX_NAME
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !name.starts_with('.');
        ok.then_some(()).ok_or_else(|| {
            format!("NAME must be 1-{MAX_NAME} characters of [A-Za-z0-9._-], not starting with '.'")
        })
    }

    fn bind(
        &self,
        name: &str,
        _identity: &ModelIdentity,
        _options: &Options,
    ) -> Result<Vec<Box<dyn Acceptor>>> {
        bind_named("shm", name, None)
    }

    fn connect(
        &self,
        name: &str,
        identity: &ModelIdentity,
        options: &Options,
    ) -> Result<(Session, Box<dyn SendPort>)> {
        let io = connect_uds(&socket_path(name))?;
        let reason = format!("address shm://{name} is shared memory on this host");
        connect_over(io, identity, options, reason, None)
    }
}

/// Listen on the control socket of `NAME` for `SCHEME://NAME`, offering
/// `device` to peers that ask for it (`cuda`).
pub(crate) fn bind_named(
    scheme: &str,
    name: &str,
    device: Option<Arc<dyn DeviceMem>>,
) -> Result<Vec<Box<dyn Acceptor>>> {
    let uds = UdsListener::bind(&socket_path(name))?;
    Ok(vec![Box::new(ShmAcceptor {
        uds,
        address: Some(format!("{scheme}://{name}")),
        device,
    })])
}

/// Connect to the control socket of `NAME`.
pub(crate) fn connect_named(name: &str) -> Result<PacketIo> {
    connect_uds(&socket_path(name))
}

/// A shared-memory control socket for a listener of another scheme to offer
/// peers on this host (named after `label`, made unique).
pub(crate) fn bind_offer(label: &str) -> Result<Box<dyn Acceptor>> {
    let name = format!("{label}-{}", handshake::random_hex(4));
    Ok(Box::new(ShmAcceptor {
        uds: UdsListener::bind(&socket_path(&name))?,
        address: None,
        device: None,
    }))
}

/// Whether a peer's offered shared memory can be used, and why (not).
pub(crate) fn try_upgrade(ours: &Hello, theirs: &Hello, o: &Options) -> (Option<PacketIo>, String) {
    let Some(path) = theirs.shm_socket.as_deref() else {
        return (None, "listener offers no shared memory".into());
    };
    if !o.tcp.shm_upgrade {
        return (None, "shared memory upgrade disabled by options".into());
    }
    if ours.boot_id.is_empty() || ours.boot_id != theirs.boot_id {
        return (None, "peer is on another host (boot ids differ)".into());
    }
    match connect_uds(Path::new(path)) {
        Ok(io) => (
            Some(io),
            format!(
                "same host (boot id {}…) and its shared-memory socket is reachable: switched from tcp",
                &ours.boot_id[..8.min(ours.boot_id.len())]
            ),
        ),
        Err(e) => (
            None,
            format!("same host but its shared-memory socket is not reachable ({e})"),
        ),
    }
}

/// Handshake over a connected control socket and set up the pool. With a
/// `device`, offer it and use it when the listener's device can map its
/// memory (a `cuda` session); otherwise the session is plain shared memory
/// and its explanation says why the device was not used.
pub(crate) fn connect_over(
    mut io: PacketIo,
    identity: &ModelIdentity,
    o: &Options,
    reason: String,
    device: Option<Arc<dyn DeviceMem>>,
) -> Result<(Session, Box<dyn SendPort>)> {
    let t = o.connect_timeout;
    let mut hello = handshake::hello(identity, o, None, Some(reason.clone()));
    if let Some(d) = &device {
        hello.transports.push("cuda".into());
        hello.device = Some(d.info());
    }
    let (ours, theirs) = handshake::client_hello(&mut io, hello, t)?;
    let (kind, reason, device) = match (device, &theirs.device) {
        (None, _) => (TransportKind::Shm, reason, None),
        (Some(_), None) => (
            TransportKind::Shm,
            format!(
                "{reason}; device not used: the listener offers none (bound without cuda:// \
                 and Options::device)"
            ),
            None,
        ),
        (Some(d), Some(peer)) => match d.reach(peer) {
            Ok(why) if !ours.boot_id.is_empty() && ours.boot_id == theirs.boot_id => {
                (TransportKind::Cuda, format!("{reason}; {why}"), Some(d))
            }
            Ok(_) => (
                TransportKind::Shm,
                format!("{reason}; device not used: the peer is on another host"),
                None,
            ),
            Err(why) => (
                TransportKind::Shm,
                format!("{reason}; device not used: {why}"),
                None,
            ),
        },
    };
    if kind == TransportKind::Shm && o.device.is_some() {
        tracing::warn!("falling back to shared memory: {reason}");
    }
    let session = handshake::client_finish(
        &mut io,
        &ours,
        &theirs,
        o,
        ClientStep::Stay(reason),
        kind,
        t,
    )?
    .expect("stay yields a session");
    let slot_size = o.device.as_ref().map_or(0, |d| d.slot_size);
    let port = ShmSender::new(
        io,
        o.shm.slots,
        o.shm.slot_size,
        o.shm.loan_timeout,
        device.map(|d| (d, slot_size)),
    )?;
    Ok((session, Box::new(port)))
}

/// A listener's control socket.
struct ShmAcceptor {
    uds: UdsListener,
    /// `shm://NAME` when this is the listener's own address.
    address: Option<String>,
    /// The device offered to peers (`cuda://NAME`).
    device: Option<Arc<dyn DeviceMem>>,
}

impl Acceptor for ShmAcceptor {
    fn fd(&self) -> BorrowedFd<'_> {
        self.uds.fd()
    }

    fn local_addr(&self) -> Option<String> {
        self.address.clone()
    }

    fn shm_offer(&self) -> Option<String> {
        Some(self.uds.path().display().to_string())
    }

    fn accept(&self, ctx: &AcceptCtx<'_>) -> Result<Option<(Session, Arc<dyn RecvPort>)>> {
        let mut io = self.uds.accept()?;
        let t = ctx.options.connect_timeout;
        let session = handshake::server(
            &mut io,
            ctx.identity,
            ctx.options,
            handshake::Offers {
                device: self.device.as_deref(),
                ..handshake::Offers::default()
            },
            TransportKind::Shm,
            t,
        )?
        .ok_or_else(|| {
            TransportError::Protocol("peer asked to switch away from shared memory".into())
        })?;
        let device = self
            .device
            .clone()
            .filter(|_| session.transport == TransportKind::Cuda);
        let port = ShmReceiver::new(io, t, ctx.options.shm.spin, session.max_message, device)?;
        Ok(Some((session, Arc::new(port))))
    }
}

#[cfg(test)]
mod tests {
    use super::control::{Entry, PrivateBlock, RING};
    use super::sender::has_room;

    #[test]
    fn a_staged_entry_is_unseen_until_committed() {
        let block = PrivateBlock::new();
        let ctrl = &block.control();
        let e = Entry {
            slot: 3,
            flags: 0,
            len: 4096,
        };
        ctrl.stage(0, e);
        assert_eq!(ctrl.peek(0), Ok(None), "staged, not announced");
        assert!(!ctrl.commit(0));
        assert_eq!(ctrl.peek(0), Ok(Some(e)));
        // Staging the next entry while the receiver is one behind: the ring
        // answers for the older entry, not the staged `newest`.
        let next = Entry { slot: 1, ..e };
        ctrl.stage(1, next);
        assert_eq!(ctrl.peek(0), Ok(Some(e)));
        ctrl.consume(1);
        assert_eq!(ctrl.peek(1), Ok(None));
        // A withdrawn entry is never announced by its `newest` word.
        ctrl.unstage();
        assert_eq!(ctrl.peek(1), Ok(None));
        ctrl.stage(1, next);
        // A sleeping receiver is reported, so that its doorbell gets rung.
        ctrl.set_rx_waiting(true);
        assert!(ctrl.commit(1));
        assert_eq!(ctrl.peek(1), Ok(Some(next)));
    }

    #[test]
    fn room_is_only_where_the_tail_allows() {
        let block = PrivateBlock::new();
        let ctrl = &block.control();
        assert!(has_room(ctrl, 0));
        assert!(!has_room(ctrl, RING as u64), "RING entries ahead: full");
        // A tail ahead of the head reads as full, never as room.
        ctrl.consume(10);
        assert!(!has_room(ctrl, 5));
    }
}
