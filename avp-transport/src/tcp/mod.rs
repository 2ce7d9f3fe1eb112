//! The TCP transport: messages travel as they are (the preamble carries the
//! length), written with vectored writes straight from the caller's sections
//! and read into pooled, page-aligned buffers (the kernel's copy only). Over
//! TLS with the `tls` feature. A listener on a host with shared memory also
//! offers it, and a peer on the same host switches (`TcpOptions::shm_upgrade`).

pub(crate) mod buf;
mod conn;
mod receiver;
mod sender;

use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use avp_wire::ModelIdentity;

use crate::error::{Result, TransportError};
use crate::frame::StreamIo;
use crate::handshake::{self, ClientStep};
use crate::options::Options;
use crate::port::{RecvPort, SendPort};
use crate::scheme::{AcceptCtx, Acceptor, Scheme};
use crate::session::{Session, TransportKind};

pub(crate) use conn::Conn;
#[cfg(target_os = "linux")]
pub(crate) use conn::write_all_vectored;
use receiver::TcpReceiver;
pub(crate) use sender::TcpSender;

/// `tcp://HOST:PORT` (port 0 picks one when binding).
pub(crate) struct TcpScheme;

impl Scheme for TcpScheme {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn form(&self) -> &'static str {
        "tcp://HOST:PORT"
    }

    fn check(&self, host_port: &str) -> std::result::Result<(), String> {
        match host_port.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(()),
            _ => Err("expected tcp://HOST:PORT".into()),
        }
    }

    fn bind(
        &self,
        host_port: &str,
        _identity: &ModelIdentity,
        options: &Options,
    ) -> Result<Vec<Box<dyn Acceptor>>> {
        let l = TcpListener::bind(host_port).map_err(TransportError::io("bind tcp"))?;
        let mut acceptors: Vec<Box<dyn Acceptor>> = Vec::new();
        #[cfg(target_os = "linux")]
        if options.tcp.shm_upgrade {
            let port = l
                .local_addr()
                .map_err(TransportError::io("local_addr"))?
                .port();
            acceptors.push(crate::shm::bind_offer(&format!("tcp{port}"))?);
        }
        let _ = options;
        acceptors.insert(
            0,
            Box::new(TcpAcceptor {
                listener: l,
                scheme: "tcp",
                #[cfg(target_os = "linux")]
                rdma: None,
            }),
        );
        Ok(acceptors)
    }

    fn connect(
        &self,
        host_port: &str,
        identity: &ModelIdentity,
        options: &Options,
    ) -> Result<(Session, Box<dyn SendPort>)> {
        let t = options.connect_timeout;
        let mut io = dial("tcp", host_port, options)?;
        let (ours, theirs) =
            handshake::client_hello(&mut io, handshake::hello(identity, options, None, None), t)?;
        #[cfg(target_os = "linux")]
        let reason = {
            let (upgrade, reason) = crate::shm::try_upgrade(&ours, &theirs, options);
            if let Some(pio) = upgrade {
                handshake::client_finish(
                    &mut io,
                    &ours,
                    &theirs,
                    options,
                    ClientStep::Switch,
                    TransportKind::Shm,
                    t,
                )?;
                drop(io);
                return crate::shm::connect_over(pio, identity, options, reason, None);
            }
            reason
        };
        #[cfg(not(target_os = "linux"))]
        let reason = String::from("shared memory needs Linux");
        let session = handshake::client_finish(
            &mut io,
            &ours,
            &theirs,
            options,
            ClientStep::Stay(reason),
            TransportKind::Tcp,
            t,
        )?
        .expect("stay yields a session");
        Ok((session, Box::new(TcpSender::new(io.stream))))
    }
}

/// Connect to `host_port` (named `scheme://host_port` in errors), with TLS
/// when the options ask for it.
pub(crate) fn dial(scheme: &str, host_port: &str, options: &Options) -> Result<StreamIo<Conn>> {
    let sa = host_port
        .to_socket_addrs()
        .map_err(TransportError::io("resolve"))?
        .next()
        .ok_or_else(|| TransportError::InvalidAddress {
            address: format!("{scheme}://{host_port}"),
            reason: "resolves to nothing".into(),
        })?;
    let stream = TcpStream::connect_timeout(&sa, options.connect_timeout)
        .map_err(TransportError::io("connect tcp"))?;
    stream
        .set_nodelay(true)
        .map_err(TransportError::io("nodelay"))?;
    Ok(StreamIo {
        stream: client_conn(stream, host_port, options)?,
    })
}

/// A listening TCP socket (of a `tcp://` listener, or an `rdma://` one,
/// which offers its RDMA device).
pub(crate) struct TcpAcceptor {
    pub(crate) listener: TcpListener,
    /// The scheme the listener was bound with ("tcp", "rdma").
    pub(crate) scheme: &'static str,
    #[cfg(target_os = "linux")]
    pub(crate) rdma: Option<crate::rdma::Accepting>,
}

impl Acceptor for TcpAcceptor {
    fn fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    fn local_addr(&self) -> Option<String> {
        let a = self.listener.local_addr().ok()?;
        Some(format!("{}://{a}", self.scheme))
    }

    fn accept(&self, ctx: &AcceptCtx<'_>) -> Result<Option<(Session, Arc<dyn RecvPort>)>> {
        let (stream, peer) = self
            .listener
            .accept()
            .map_err(TransportError::io("accept tcp"))?;
        stream
            .set_nodelay(true)
            .map_err(TransportError::io("nodelay"))?;
        let mut io = StreamIo {
            stream: server_conn(stream, ctx.options)?,
        };
        let offer = ctx
            .shm_offer
            .clone()
            .filter(|_| ctx.options.tcp.shm_upgrade);
        let t = ctx.options.connect_timeout;
        #[cfg(target_os = "linux")]
        let mut rdma = self.rdma.as_ref().map(|a| a.session(ctx.options));
        #[cfg(target_os = "linux")]
        let grantor = rdma.as_mut().map(|r| r as &mut dyn handshake::RdmaGrantor);
        #[cfg(not(target_os = "linux"))]
        let grantor = None;
        let session = handshake::server(
            &mut io,
            ctx.identity,
            ctx.options,
            handshake::Offers {
                shm_socket: offer,
                device: None,
                rdma: grantor,
            },
            TransportKind::Tcp,
            t,
        )
        .map_err(|e| with_peer(e, &peer.to_string()))?;
        let Some(session) = session else {
            return Ok(None);
        };
        #[cfg(target_os = "linux")]
        if session.transport == TransportKind::Rdma
            && let Some(r) = rdma
        {
            let mut session = session;
            let port = r.into_receiver(io.stream, &mut session)?;
            return Ok(Some((session, Arc::new(port) as Arc<dyn RecvPort>)));
        }
        let stall = ctx.options.tcp.stall_timeout;
        let port = TcpReceiver::new(io.stream, session.max_message, stall);
        Ok(Some((session, Arc::new(port) as Arc<dyn RecvPort>)))
    }
}

fn with_peer(e: TransportError, peer: &str) -> TransportError {
    match e {
        TransportError::Protocol(m) => TransportError::Protocol(format!("{peer}: {m}")),
        other => other,
    }
}

/// Wrap a connected socket in TLS when the options ask for it.
fn client_conn(stream: TcpStream, host_port: &str, o: &Options) -> Result<Conn> {
    #[cfg(feature = "tls")]
    if let Some(cfg) = o.tcp.tls.as_ref().and_then(|t| t.client.clone()) {
        let host = o
            .tcp
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
            .map_err(|e| TransportError::Auth(crate::error::AuthFailure::Tls(e.to_string())))?;
        return Ok(Conn::Client(Box::new(rustls::StreamOwned::new(
            conn, stream,
        ))));
    }
    let _ = (host_port, o);
    Ok(Conn::Plain(stream))
}

fn server_conn(stream: TcpStream, o: &Options) -> Result<Conn> {
    #[cfg(feature = "tls")]
    if let Some(cfg) = o.tcp.tls.as_ref().and_then(|t| t.server.clone()) {
        let conn = rustls::ServerConnection::new(cfg)
            .map_err(|e| TransportError::Auth(crate::error::AuthFailure::Tls(e.to_string())))?;
        return Ok(Conn::Server(Box::new(rustls::StreamOwned::new(
            conn, stream,
        ))));
    }
    let _ = o;
    Ok(Conn::Plain(stream))
}
