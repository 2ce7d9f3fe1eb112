//! The public face: [`Endpoint::bind`] gives a [`Listener`] that accepts
//! [`Receiver`]s; [`Endpoint::connect`] gives a [`Sender`].

use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use avp_wire::{Message, MessageLayout, MessageWriter, ModelIdentity, checksum};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, accept4, bind, connect, listen, socket,
};

use crate::address::{Address, runtime_dir};
use crate::buf::PageBuf;
use crate::error::{Result, TransportError};
use crate::frame::{Frame, FrameIo, PacketIo, StreamIo};
use crate::handshake::{self, ClientStep};
use crate::options::Options;
use crate::receiver::{Receiver, RecvInner};
use crate::session::{Session, TransportKind};
use crate::shm::{Region, ShmReceiver, ShmSender};
use crate::tcp::{Conn, TcpReceiver, TcpSender};

/// Entry points.
pub struct Endpoint;

impl Endpoint {
    /// Listen at `addr` (`shm://NAME` or `tcp://HOST:PORT`; port 0 picks one).
    /// A TCP listener also offers a shared-memory socket to peers on the same host
    /// unless `options.allow_shm_upgrade` is false.
    pub fn bind(addr: &str, identity: &ModelIdentity, options: Options) -> Result<Listener> {
        let address = Address::parse(addr)?;
        let (tcp, uds) = match &address {
            Address::Shm(name) => (None, Some(bind_uds(&Address::shm_socket_path(name))?)),
            Address::Tcp(hp) => {
                let l = TcpListener::bind(hp).map_err(TransportError::io("bind tcp"))?;
                let uds = if options.allow_shm_upgrade {
                    let port = l
                        .local_addr()
                        .map_err(TransportError::io("local_addr"))?
                        .port();
                    let name = format!("tcp{port}-{}", handshake::random_hex(4));
                    Some(bind_uds(&Address::shm_socket_path(&name))?)
                } else {
                    None
                };
                (Some(l), uds)
            }
        };
        Ok(Listener {
            address,
            identity: identity.clone(),
            options,
            tcp,
            uds,
        })
    }

    /// Connect to a listener at `addr`, handshake, and return the sending half.
    pub fn connect(addr: &str, identity: &ModelIdentity, options: Options) -> Result<Sender> {
        let address = Address::parse(addr)?;
        let t = options.connect_timeout;
        match &address {
            Address::Shm(name) => {
                let path = Address::shm_socket_path(name);
                let io = connect_uds(&path)?;
                shm_sender(
                    io,
                    identity,
                    &options,
                    format!("address {address} is shared memory on this host"),
                )
            }
            Address::Tcp(hp) => {
                let sa = hp
                    .to_socket_addrs()
                    .map_err(TransportError::io("resolve"))?
                    .next()
                    .ok_or_else(|| TransportError::InvalidAddress {
                        address: addr.into(),
                        reason: "resolves to nothing".into(),
                    })?;
                let stream = TcpStream::connect_timeout(&sa, t)
                    .map_err(TransportError::io("connect tcp"))?;
                stream
                    .set_nodelay(true)
                    .map_err(TransportError::io("nodelay"))?;
                let mut io = StreamIo {
                    stream: client_conn(stream, hp, &options)?,
                };
                let (ours, theirs) = handshake::client_hello(
                    &mut io,
                    handshake::hello(identity, &options, None, None),
                    t,
                )?;
                let (upgrade, reason) = shm_choice(&ours, &theirs, &options);
                if let Some(pio) = upgrade {
                    handshake::client_finish(
                        &mut io,
                        &ours,
                        &theirs,
                        &options,
                        ClientStep::Switch,
                        TransportKind::Shm,
                        t,
                    )?;
                    drop(io);
                    return shm_sender(pio, identity, &options, reason);
                }
                let session = handshake::client_finish(
                    &mut io,
                    &ours,
                    &theirs,
                    &options,
                    ClientStep::Stay(reason),
                    TransportKind::Tcp,
                    t,
                )?
                .expect("stay yields a session");
                tracing::info!("{}", session.explain());
                Ok(Sender {
                    session,
                    inner: SenderInner::Tcp(TcpSender::new(io.stream)),
                })
            }
        }
    }
}

/// Wrap a connected socket in TLS when the options ask for it.
fn client_conn(stream: TcpStream, host_port: &str, o: &Options) -> Result<Conn> {
    #[cfg(feature = "tls")]
    if let Some(cfg) = o.tls.as_ref().and_then(|t| t.client.clone()) {
        let host = o
            .tls
            .as_ref()
            .and_then(|t| t.server_name.clone())
            .unwrap_or_else(|| {
                host_port
                    .rsplit_once(':')
                    .map_or(host_port, |(h, _)| h)
                    .trim_matches(['[', ']'])
                    .to_owned()
            });
        let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
            TransportError::InvalidAddress {
                address: host,
                reason: format!("not a TLS server name: {e}"),
            }
        })?;
        let conn = rustls::ClientConnection::new(cfg, name)
            .map_err(|e| TransportError::Auth(format!("TLS: {e}")))?;
        return Ok(Conn::Client(Box::new(rustls::StreamOwned::new(
            conn, stream,
        ))));
    }
    let _ = (host_port, o);
    Ok(Conn::Plain(stream))
}

fn server_conn(stream: TcpStream, o: &Options) -> Result<Conn> {
    #[cfg(feature = "tls")]
    if let Some(cfg) = o.tls.as_ref().and_then(|t| t.server.clone()) {
        let conn = rustls::ServerConnection::new(cfg)
            .map_err(|e| TransportError::Auth(format!("TLS: {e}")))?;
        return Ok(Conn::Server(Box::new(rustls::StreamOwned::new(
            conn, stream,
        ))));
    }
    let _ = o;
    Ok(Conn::Plain(stream))
}

/// Decide whether a TCP peer's shared memory can be used, and say why.
fn shm_choice(
    ours: &crate::frame::Hello,
    theirs: &crate::frame::Hello,
    o: &Options,
) -> (Option<PacketIo>, String) {
    let Some(path) = theirs.shm_socket.as_deref() else {
        return (None, "listener offers no shared memory".into());
    };
    if !o.allow_shm_upgrade {
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

fn shm_sender(
    mut io: PacketIo,
    identity: &ModelIdentity,
    o: &Options,
    reason: String,
) -> Result<Sender> {
    let t = o.connect_timeout;
    let (ours, theirs) = handshake::client_hello(
        &mut io,
        handshake::hello(identity, o, None, Some(reason.clone())),
        t,
    )?;
    let session = handshake::client_finish(
        &mut io,
        &ours,
        &theirs,
        o,
        ClientStep::Stay(reason),
        TransportKind::Shm,
        t,
    )?
    .expect("stay yields a session");
    let shm = ShmSender::new(io, o.slots, o.slot_size, o.loan_timeout)?;
    tracing::info!("{}", session.explain());
    Ok(Sender {
        session,
        inner: SenderInner::Shm(shm),
    })
}

fn uds_socket() -> Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(TransportError::errno("socket"))
}

fn connect_uds(path: &Path) -> Result<PacketIo> {
    let fd = uds_socket()?;
    let addr = UnixAddr::new(path).map_err(TransportError::errno("socket path"))?;
    connect(fd.as_raw_fd(), &addr).map_err(|e| TransportError::Io {
        op: "connect to shared-memory socket",
        source: std::io::Error::from(e),
    })?;
    Ok(PacketIo::new(fd))
}

/// A bound Unix socket file, removed on drop.
struct UdsListener {
    fd: OwnedFd,
    path: PathBuf,
}

impl Drop for UdsListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn bind_uds(path: &Path) -> Result<UdsListener> {
    let dir = path.parent().unwrap_or(Path::new("/tmp"));
    std::fs::create_dir_all(dir).map_err(TransportError::io("create runtime dir"))?;
    if dir == runtime_dir() {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    if path.exists() {
        // A live listener answers; a stale socket file (its owner died) is replaced.
        if connect_uds(path).is_ok() {
            return Err(TransportError::InvalidAddress {
                address: path.display().to_string(),
                reason: "another listener is already bound there".into(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let fd = uds_socket()?;
    let addr = UnixAddr::new(path).map_err(TransportError::errno("socket path"))?;
    bind(fd.as_raw_fd(), &addr).map_err(TransportError::errno("bind shared-memory socket"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(TransportError::io("chmod socket"))?;
    listen(&fd, Backlog::new(64).expect("valid backlog"))
        .map_err(TransportError::errno("listen"))?;
    Ok(UdsListener {
        fd,
        path: path.to_owned(),
    })
}

/// A bound endpoint that accepts sessions.
pub struct Listener {
    address: Address,
    identity: ModelIdentity,
    options: Options,
    tcp: Option<TcpListener>,
    uds: Option<UdsListener>,
}

impl Listener {
    /// The address peers connect to (with the actual port for `tcp://…:0`).
    pub fn local_addr(&self) -> String {
        match (&self.address, &self.tcp) {
            (Address::Tcp(_), Some(l)) => format!(
                "tcp://{}",
                l.local_addr().map(|a| a.to_string()).unwrap_or_default()
            ),
            (a, _) => a.to_string(),
        }
    }

    /// Path of the shared-memory control socket, if any.
    pub fn shm_socket(&self) -> Option<&Path> {
        self.uds.as_ref().map(|u| u.path.as_path())
    }

    /// Wait up to `timeout` for a peer, handshake, and return the receiving half.
    ///
    /// A peer that fails the handshake (bad token, garbage) yields an error for
    /// that peer only; call `accept` again to keep serving others.
    pub fn accept(&self, timeout: Duration) -> Result<Receiver> {
        let deadline = crate::deadline::from_now(timeout);
        let t = self.options.connect_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds: Vec<PollFd<'_>> = Vec::new();
            if let Some(l) = &self.tcp {
                fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
            }
            if let Some(u) = &self.uds {
                fds.push(PollFd::new(u.fd.as_fd(), PollFlags::POLLIN));
            }
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            match poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) => return Err(TransportError::Timeout(timeout, "a peer to connect")),
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(TransportError::errno("poll")(e)),
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            drop(fds);
            let mut i = 0;
            if let Some(l) = &self.tcp {
                if ready[i] {
                    let (stream, peer) = l.accept().map_err(TransportError::io("accept tcp"))?;
                    stream
                        .set_nodelay(true)
                        .map_err(TransportError::io("nodelay"))?;
                    let mut io = StreamIo {
                        stream: server_conn(stream, &self.options)?,
                    };
                    let shm = self.uds.as_ref().map(|u| u.path.display().to_string());
                    match handshake::server(
                        &mut io,
                        &self.identity,
                        &self.options,
                        shm,
                        TransportKind::Tcp,
                        t,
                    )
                    .map_err(|e| with_peer(e, &peer.to_string()))?
                    {
                        Some(session) => {
                            let max = session.max_message;
                            let tcp = TcpReceiver::new(io.stream, max, t);
                            return Ok(Receiver::new(session, RecvInner::Tcp(tcp), &self.options));
                        }
                        None => continue, // the peer moves to our shared-memory socket
                    }
                }
                i += 1;
            }
            if let Some(u) = &self.uds
                && ready[i]
            {
                {
                    let raw = accept4(u.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
                        .map_err(TransportError::errno("accept"))?;
                    // SAFETY: accept4 returned a fresh descriptor that we now own.
                    let mut io = PacketIo::new(unsafe { OwnedFd::from_raw_fd(raw) });
                    let session = handshake::server(
                        &mut io,
                        &self.identity,
                        &self.options,
                        None,
                        TransportKind::Shm,
                        t,
                    )?
                    .ok_or_else(|| {
                        TransportError::Protocol(
                            "peer asked to switch away from shared memory".into(),
                        )
                    })?;
                    let stand_in = crate::receiver::stand_in_message(&session.id);
                    let shm =
                        ShmReceiver::new(io, t, self.options.spin, session.max_message, stand_in)?;
                    return Ok(Receiver::new(session, RecvInner::Shm(shm), &self.options));
                }
            }
        }
    }
}

fn with_peer(e: TransportError, peer: &str) -> TransportError {
    match e {
        TransportError::Protocol(m) => TransportError::Protocol(format!("{peer}: {m}")),
        TransportError::Auth(m) => TransportError::Auth(format!("{peer}: {m}")),
        other => other,
    }
}

pub(crate) enum SenderInner {
    Shm(ShmSender),
    Tcp(TcpSender),
}

/// The sending half of a session.
pub struct Sender {
    pub(crate) session: Session,
    pub(crate) inner: SenderInner,
}

pub(crate) enum LoanMem {
    Shm(Region),
    Tcp(PageBuf),
}

impl LoanMem {
    fn ptr(&mut self) -> *mut u8 {
        match self {
            LoanMem::Shm(r) => r.ptr(),
            LoanMem::Tcp(b) => b.as_mut_ptr(),
        }
    }
}

impl Sender {
    /// What was negotiated.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Address range of the shared slot pool (shared memory only).
    pub fn pool_range(&self) -> Option<std::ops::Range<usize>> {
        match &self.inner {
            SenderInner::Shm(s) => Some(s.pool_range()),
            SenderInner::Tcp(_) => None,
        }
    }

    pub(crate) fn check(&self, len: u64) -> Result<()> {
        self.session.check_alive()?;
        if len > self.session.max_message {
            return Err(TransportError::TooLarge {
                size: len,
                limit: self.session.max_message,
            });
        }
        Ok(())
    }

    /// Borrow memory for one message laid out by `layout`: a shared-memory slot
    /// (waiting for one while all are in flight), or a pooled buffer on TCP.
    pub fn loan<'a>(&'a mut self, layout: &'a MessageLayout) -> Result<Loan<'a>> {
        let len = layout.total_len();
        self.check(len as u64)?;
        let mem = match &mut self.inner {
            SenderInner::Shm(s) => LoanMem::Shm(s.acquire(len, true)?.expect("waits for memory")),
            SenderInner::Tcp(t) => LoanMem::Tcp(t.acquire(len)),
        };
        self.loan_in(layout, mem)
    }

    /// A loan over memory already obtained for `layout`.
    pub(crate) fn loan_in<'a>(
        &'a mut self,
        layout: &'a MessageLayout,
        mut mem: LoanMem,
    ) -> Result<Loan<'a>> {
        let len = layout.total_len();
        // SAFETY: `mem` is exclusively ours until published or abandoned, spans at
        // least `len` bytes, and its memory (pool mapping, dedicated mapping or heap
        // buffer) does not move and outlives the loan.
        let bytes = unsafe { std::slice::from_raw_parts_mut(mem.ptr(), len) };
        let mut writer = layout.writer(bytes)?;
        if matches!(self.inner, SenderInner::Shm(_)) && checksum::max_threads() == 0 {
            // The receiver waits awake on this host: copies and checksums leave it
            // a core (on 2 cores, helper threads would preempt it and add
            // microseconds to every large handoff).
            writer.set_max_threads(checksum::cores().saturating_sub(1).max(1));
        }
        Ok(Loan {
            sender: &mut self.inner,
            mem: Some(mem),
            writer: Some(writer),
        })
    }

    /// Send a message that is already encoded (it is parsed, not verified, first).
    pub fn send_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        Message::parse(bytes)?;
        self.check(bytes.len() as u64)?;
        match &mut self.inner {
            SenderInner::Tcp(t) => t.write_all_vectored(&[bytes]),
            SenderInner::Shm(s) => {
                let r = s.acquire(bytes.len(), true)?.expect("waits for memory");
                // SAFETY: the region is ours and at least bytes.len() long.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), r.ptr(), bytes.len()) };
                s.stage(&r, bytes.len());
                s.publish(r, bytes.len())
            }
        }
    }

    /// Send a message from the caller's section buffers: copied once into a slot
    /// (shared memory) or written with vectored I/O straight from them (TCP).
    pub fn send_sections(&mut self, layout: &MessageLayout, sections: &[&[u8]]) -> Result<()> {
        if let SenderInner::Tcp(t) = &mut self.inner {
            self.session.check_alive()?;
            let len = layout.total_len() as u64;
            if len > self.session.max_message {
                return Err(TransportError::TooLarge {
                    size: len,
                    limit: self.session.max_message,
                });
            }
            if sections.len() != layout.section_count()
                || sections
                    .iter()
                    .zip(layout.sections())
                    .any(|(s, sp)| s.len() as u64 != sp.len)
            {
                return Err(TransportError::Wire(avp_wire::WireError::BadSection {
                    index: 0,
                    reason: "section buffers do not match the layout".into(),
                }));
            }
            let crcs = checksum::crc_many(sections);
            let prefix = layout.prefix(&crcs)?;
            let parts: Vec<(u64, &[u8])> = layout
                .sections()
                .zip(sections)
                .map(|(sp, s)| (sp.offset, *s))
                .collect();
            return t.send_parts(&prefix, &parts);
        }
        let mut loan = self.loan(layout)?;
        loan.writer().write_sections(sections)?;
        loan.finish()?.send()
    }
}

/// Memory loaned for one message, being written.
///
/// Write every section (through [`writer`](Self::writer)), then
/// [`finish`](Self::finish) to get a [`Ready`] message that can be sent. Dropping
/// a loan returns the memory unsent.
pub struct Loan<'a> {
    pub(crate) sender: &'a mut SenderInner,
    pub(crate) mem: Option<LoanMem>,
    pub(crate) writer: Option<MessageWriter<'a>>,
}

impl<'a> Loan<'a> {
    /// The writer over the loaned memory (sections in place).
    pub fn writer(&mut self) -> &mut MessageWriter<'a> {
        self.writer.as_mut().expect("writer present until finish")
    }

    /// Checksum, write the header, and validate: the message can now be sent.
    ///
    /// Over shared memory the message is staged (see `ShmSender::stage`) as
    /// soon as its bytes are in place, before it is validated, so that a
    /// waiting receiver can fetch its header while this side checks it.
    pub fn finish(mut self) -> Result<Ready<'a>> {
        let writer = self.writer.take().expect("writer present until finish");
        let len = writer.layout().total_len();
        let bytes = writer.seal()?;
        if let (SenderInner::Shm(s), Some(LoanMem::Shm(region))) = (&mut *self.sender, &self.mem) {
            s.stage(region, len);
        }
        Message::parse(bytes)?;
        Ok(Ready {
            sender: unsafe_reborrow(&mut self.sender),
            mem: self.mem.take(),
            len,
        })
    }
}

/// Move the `&'a mut` out of a struct that is being consumed.
fn unsafe_reborrow<'a>(r: &mut &'a mut SenderInner) -> &'a mut SenderInner {
    // The loan is consumed by `finish`; its `Drop` sees `mem == None` and does
    // nothing, so the sender reference is used by exactly one owner afterwards.
    let p: *mut SenderInner = *r;
    // SAFETY: `p` comes from a live `&'a mut`, and the only other holder (the
    // consumed Loan) never dereferences it again.
    unsafe { &mut *p }
}

impl Drop for Loan<'_> {
    fn drop(&mut self) {
        self.writer.take();
        if let Some(mem) = self.mem.take() {
            abandon(self.sender, mem);
        }
    }
}

fn abandon(sender: &mut SenderInner, mem: LoanMem) {
    match (sender, mem) {
        (SenderInner::Shm(s), LoanMem::Shm(r)) => s.abandon(r),
        (SenderInner::Tcp(t), LoanMem::Tcp(b)) => t.abandon(b),
        _ => {}
    }
}

/// A finished message in loaned memory, ready to send.
pub struct Ready<'a> {
    pub(crate) sender: &'a mut SenderInner,
    pub(crate) mem: Option<LoanMem>,
    pub(crate) len: usize,
}

impl Ready<'_> {
    /// Bytes of the message.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the message is empty (never: a message has at least a preamble).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hand the message to the receiver.
    #[inline]
    pub fn send(mut self) -> Result<()> {
        let mem = self.mem.take().expect("memory present until sent");
        match (&mut *self.sender, mem) {
            (SenderInner::Shm(s), LoanMem::Shm(r)) => s.publish(r, self.len),
            (SenderInner::Tcp(t), LoanMem::Tcp(b)) => t.publish(b, self.len),
            _ => unreachable!("loan memory matches its sender"),
        }
    }
}

impl Drop for Ready<'_> {
    fn drop(&mut self) {
        if let Some(mem) = self.mem.take() {
            abandon(self.sender, mem);
        }
    }
}

#[allow(dead_code)]
fn _assert_frame_io_object_safe(_: &dyn FrameIo, _: Frame) {}
