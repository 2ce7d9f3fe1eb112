//! The shared-memory control channel: a `SOCK_SEQPACKET` Unix socket in the
//! runtime directory, one frame per packet, descriptors attached (SCM_RIGHTS).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, accept4, bind, connect, listen, recvmsg, sendmsg, socket,
};

use crate::error::{Result, TransportError};
use crate::frame::{Frame, FrameIo, MAX_FRAME, decode, encode, wait_readable};

/// Frames on a `SOCK_SEQPACKET` Unix socket: one packet per frame, descriptors attached.
pub(crate) struct PacketIo {
    fd: OwnedFd,
}

impl PacketIo {
    /// Wrap a connected seqpacket socket.
    pub(crate) fn new(fd: OwnedFd) -> Self {
        PacketIo { fd }
    }

    /// The socket.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Whether the peer has closed its end (non-blocking check).
    pub(crate) fn peer_closed(&self) -> bool {
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => false,
            Ok(_) => {
                let ev = fds[0].revents().unwrap_or(PollFlags::empty());
                if ev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                    return true;
                }
                let mut b = [0u8; 1];
                matches!(
                    nix::sys::socket::recv(
                        self.fd.as_raw_fd(),
                        &mut b,
                        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
                    ),
                    Ok(0) | Err(nix::errno::Errno::ECONNRESET)
                )
            }
            Err(_) => true,
        }
    }
}

impl FrameIo for PacketIo {
    fn send_frame(&mut self, frame: &Frame, fds: &[RawFd]) -> Result<()> {
        let body = encode(frame)?;
        let iov = [std::io::IoSlice::new(&body)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
        match sendmsg::<()>(
            self.fd.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => Ok(()),
            Err(nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET) => {
                Err(TransportError::PeerGone("control socket closed".into()))
            }
            Err(e) => Err(TransportError::errno("sendmsg")(e)),
        }
    }

    fn recv_frame(&mut self, timeout: Duration) -> Result<(Frame, Vec<OwnedFd>)> {
        wait_readable(self.fd.as_fd(), timeout, "a control frame")?;
        let mut buf = vec![0u8; MAX_FRAME];
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(
            self.fd.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::ECONNRESET) => {
                return Err(TransportError::PeerGone("control socket reset".into()));
            }
            Err(e) => return Err(TransportError::errno("recvmsg")(e)),
        };
        let mut fds = Vec::new();
        for c in msg
            .cmsgs()
            .map_err(TransportError::errno("recvmsg cmsgs"))?
        {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors in our table for us.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
        let n = msg.bytes;
        let truncated =
            msg.flags.contains(MsgFlags::MSG_TRUNC) || msg.flags.contains(MsgFlags::MSG_CTRUNC);
        if n == 0 {
            return Err(TransportError::PeerGone("control socket closed".into()));
        }
        if truncated {
            return Err(TransportError::Protocol("oversized control frame".into()));
        }
        Ok((decode(&buf[..n])?, fds))
    }
}

/// The control-socket path of a shared-memory name: `$AVP_RUNTIME_DIR/NAME.sock`,
/// else `$XDG_RUNTIME_DIR/avp/NAME.sock`, else `/tmp/avp-UID/NAME.sock`.
pub(crate) fn socket_path(name: &str) -> PathBuf {
    runtime_dir().join(format!("{name}.sock"))
}

/// The directory holding control sockets (created 0700 on bind).
pub(crate) fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AVP_RUNTIME_DIR") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("avp");
    }
    PathBuf::from(format!("/tmp/avp-{}", nix::unistd::getuid()))
}

/// Most pending connections on a control socket.
const BACKLOG: i32 = 64;

fn uds_socket() -> Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(TransportError::errno("socket"))
}

/// Connect to the control socket at `path`.
pub(crate) fn connect_uds(path: &Path) -> Result<PacketIo> {
    let fd = uds_socket()?;
    let addr = UnixAddr::new(path).map_err(TransportError::errno("socket path"))?;
    connect(fd.as_raw_fd(), &addr).map_err(|e| TransportError::Io {
        op: "connect to shared-memory socket",
        source: std::io::Error::from(e),
    })?;
    Ok(PacketIo::new(fd))
}

/// A bound control socket, its file removed on drop.
pub(crate) struct UdsListener {
    fd: OwnedFd,
    path: PathBuf,
}

impl Drop for UdsListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl UdsListener {
    /// Bind at `path` (mode 0600, its directory 0700 when it is the runtime
    /// directory). A stale socket file whose owner died is replaced.
    pub(crate) fn bind(path: &Path) -> Result<UdsListener> {
        let dir = path.parent().unwrap_or(Path::new("/tmp"));
        std::fs::create_dir_all(dir).map_err(TransportError::io("create runtime dir"))?;
        if dir == runtime_dir() {
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        if path.exists() {
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
        listen(&fd, Backlog::new(BACKLOG).expect("a valid backlog"))
            .map_err(TransportError::errno("listen"))?;
        Ok(UdsListener {
            fd,
            path: path.to_owned(),
        })
    }

    /// The socket file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The listening socket (readable when a peer connects).
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Take one pending connection.
    pub(crate) fn accept(&self) -> Result<PacketIo> {
        let raw = accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
            .map_err(TransportError::errno("accept"))?;
        // SAFETY: accept4 returned a fresh descriptor that we now own.
        Ok(PacketIo::new(unsafe { OwnedFd::from_raw_fd(raw) }))
    }
}
