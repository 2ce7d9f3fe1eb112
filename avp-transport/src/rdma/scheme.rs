//! `rdma://HOST:PORT`: binding (a TCP listener that offers its RDMA device)
//! and connecting (TCP, the handshake, then the queue pairs), falling back
//! to TCP with the reason when either end has no usable device.

use std::net::TcpListener;
use std::sync::Arc;

use avp_wire::ModelIdentity;

use crate::error::{Result, TransportError};
use crate::handshake::{self, ClientStep, RdmaClient, RdmaGrantor};
use crate::options::Options;
use crate::port::SendPort;
use crate::scheme::{Acceptor, Scheme};
use crate::session::{Session, TransportKind};
use crate::tcp::{self, Conn, TcpAcceptor, TcpScheme};

use super::receiver::{Parts, RdmaReceiver};
use super::sender::Building;
use super::verbs::{RdmaGrant, RdmaInfo, RdmaOffer, Verbs};

/// `rdma://HOST:PORT`.
pub(crate) struct RdmaScheme;

/// How a session's transport reason names the device.
fn device_words(info: &RdmaInfo) -> String {
    match info.backend.as_str() {
        "emulated" => "the emulated verbs device (software, this host only; not a measurement of \
                       RDMA hardware)"
            .into(),
        _ => format!("verbs device {}", info.device),
    }
}

impl Scheme for RdmaScheme {
    fn name(&self) -> &'static str {
        "rdma"
    }

    fn form(&self) -> &'static str {
        "rdma://HOST:PORT"
    }

    fn check(&self, host_port: &str) -> std::result::Result<(), String> {
        TcpScheme
            .check(host_port)
            .map_err(|_| "expected rdma://HOST:PORT".into())
    }

    fn bind(
        &self,
        host_port: &str,
        _identity: &ModelIdentity,
        options: &Options,
    ) -> Result<Vec<Box<dyn Acceptor>>> {
        options.rdma.check()?;
        let rdma = match super::open(options)? {
            Ok(verbs) => Some(Accepting { verbs }),
            Err(why) => {
                tracing::warn!("rdma://{host_port}: {why}; peers will be served over TCP");
                None
            }
        };
        let listener = TcpListener::bind(host_port).map_err(TransportError::io("bind tcp"))?;
        Ok(vec![Box::new(TcpAcceptor {
            listener,
            scheme: "rdma",
            rdma,
        })])
    }

    fn connect(
        &self,
        host_port: &str,
        identity: &ModelIdentity,
        options: &Options,
    ) -> Result<(Session, Box<dyn SendPort>)> {
        options.rdma.check()?;
        let verbs = super::open(options)?;
        let t = options.connect_timeout;
        let mut io = tcp::dial("rdma", host_port, options)?;
        let mut ours = handshake::hello(identity, options, None, None);
        if let Ok(v) = &verbs {
            ours.transports.push("rdma".into());
            ours.rdma = Some(v.info());
        }
        let (ours, theirs) = handshake::client_hello(&mut io, ours, t)?;
        let chosen = match (verbs, &theirs.rdma) {
            (Err(why), _) => Err(why),
            (Ok(_), None) => Err(
                "the listener offers no RDMA device (a tcp:// listener, or one \
                                  whose device could not be opened)"
                    .to_owned(),
            ),
            (Ok(v), Some(peer)) => match v.reach(peer) {
                Ok(why) => Ok((v, why)),
                Err(why) => Err(why),
            },
        };
        let (verbs, why) = match chosen {
            Ok(c) => c,
            Err(why) => {
                tracing::warn!("rdma://{host_port}: {why}; using TCP");
                let reason = format!("address rdma://{host_port}; RDMA not used: {why}");
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
                return Ok((session, Box::new(tcp::TcpSender::new(io.stream))));
            }
        };
        let reason = format!(
            "address rdma://{host_port}: {} queue pairs on {} ({why})",
            options.rdma.queue_pairs,
            device_words(&verbs.info())
        );
        let building = Building::new(verbs, options)?;
        let mut client = RdmaClient {
            offer: building.offer(),
            grant: None,
        };
        let mut session = handshake::client_finish(
            &mut io,
            &ours,
            &theirs,
            options,
            ClientStep::Rdma(reason, &mut client),
            TransportKind::Rdma,
            t,
        )?
        .expect("stay yields a session");
        let grant = client
            .grant
            .expect("an accepted rdma session carries a grant");
        let note = match (&grant.device, building.device_offered()) {
            (Some(g), _) => format!(
                "; KV sections device to device (GPUDirect RDMA into {})",
                g.info.name
            ),
            (None, Some(Err(why))) => format!("; device memory not used: {why}"),
            (None, Some(Ok(()))) => "; device memory not used: the listener has no device \
                                     slots (no Options::device, or its NIC cannot write its \
                                     device memory)"
                .to_owned(),
            (None, None) => String::new(),
        };
        session.transport_reason.push_str(&note);
        let port = building.finish(io, grant, &options.rdma)?;
        Ok((session, Box::new(port)))
    }
}

/// A listener's RDMA device.
pub(crate) struct Accepting {
    verbs: Arc<dyn Verbs>,
}

impl Accepting {
    /// The RDMA side of one incoming session's handshake.
    pub(crate) fn session(&self, options: &Options) -> AcceptSession {
        AcceptSession {
            verbs: Arc::clone(&self.verbs),
            options: options.clone(),
            parts: None,
        }
    }
}

/// The listener's RDMA setup for one session, built when the peer chooses it.
pub(crate) struct AcceptSession {
    verbs: Arc<dyn Verbs>,
    options: Options,
    parts: Option<Parts>,
}

impl AcceptSession {
    /// The receiving port, once the handshake accepted an RDMA session.
    pub(crate) fn into_receiver(self, conn: Conn, session: &mut Session) -> Result<RdmaReceiver> {
        let parts = self.parts.ok_or_else(|| {
            TransportError::Protocol("an rdma session was accepted without its setup".into())
        })?;
        session.transport_reason.push_str(&parts.device_note());
        Ok(RdmaReceiver::new(parts, conn, session.max_message))
    }
}

impl RdmaGrantor for AcceptSession {
    fn info(&self) -> RdmaInfo {
        self.verbs.info()
    }

    fn reach(&self, peer: &RdmaInfo) -> std::result::Result<String, String> {
        self.verbs.reach(peer)
    }

    fn grant(&mut self, offer: &RdmaOffer) -> Result<RdmaGrant> {
        let (parts, grant) = Parts::build(Arc::clone(&self.verbs), &self.options, offer)?;
        self.parts = Some(parts);
        Ok(grant)
    }
}
