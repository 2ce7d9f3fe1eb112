//! `http://HOST:PORT`: the Python reference's HTTP binding, spoken both ways.
//!
//! Agents written with the reference `avp` 0.6.2 talk over
//! `POST /avp/v2/handshake`, `POST /avp/v2/transmit` (a v1 message as the
//! body), `POST /avp/v2/text` (a JSON message) and `GET /health`. An avp
//! listener at `http://…` serves those endpoints to any such client, and an avp
//! sender speaks them to any such server:
//!
//! - **Listener** ([`server`]): HTTP/1.1 and cleartext HTTP/2 (prior
//!   knowledge) on one port. The handshake answers with the listener's own
//!   identity and a session id (the reference's server echoes the client's
//!   identity, so its clients always resolve `hash_match`). A transmit's
//!   declared length is checked against `max_message` before its body is read
//!   (413), the bearer token when one is set (401, nothing delivered); v1 bodies
//!   are converted to v2 and every message reaches the session's [`Receiver`]
//!   like any other transport's. Requests carrying one `AVP-Agent-ID` form one
//!   session, which ends (the receiver sees the peer leave) when the last HTTP
//!   connection that carried them closes.
//! - **Sender** ([`client`]): one kept-alive connection; the handshake's answer
//!   says which format the server reads: v2 between avp agents (the message
//!   body is the loaned buffer itself, no copy), v1 for the reference (which
//!   decodes only v1: one conversion per message, said by `Session::explain`
//!   and counted in `Stats::format_conversions`).
//!
//! [`Receiver`]: crate::Receiver

mod client;
mod inbox;
mod json;
mod server;

use avp_wire::ModelIdentity;

use crate::error::Result;
use crate::options::Options;
use crate::port::SendPort;
use crate::scheme::{Acceptor, Scheme};
use crate::session::Session;

/// The handshake endpoint.
pub(crate) const HANDSHAKE: &str = "/avp/v2/handshake";
/// The message endpoint.
pub(crate) const TRANSMIT: &str = "/avp/v2/transmit";
/// The JSON-message endpoint.
pub(crate) const TEXT: &str = "/avp/v2/text";
/// The liveness endpoint.
pub(crate) const HEALTH: &str = "/health";
/// The content type of a binary message.
pub(crate) const CONTENT_TYPE: &str = "application/avp+binary";
/// The reference's `AVP-Version` header value (its "transport binding version").
pub(crate) const BINDING_VERSION: &str = "0.4";
/// The protocol version the reference writes in its JSON (`avp_version`).
pub(crate) const AVP_VERSION: &str = "0.6.2";
/// What avp says it is in the handshake's `capabilities.implementation`.
pub(crate) const IMPLEMENTATION: &str = "avp-rs";

/// The `http://` scheme.
pub(crate) struct HttpScheme;

/// `HOST:PORT`, without the trailing `/` the reference's client strips too.
fn host_port(target: &str) -> &str {
    target.strip_suffix('/').unwrap_or(target)
}

impl Scheme for HttpScheme {
    fn name(&self) -> &'static str {
        "http"
    }

    fn form(&self) -> &'static str {
        "http://HOST:PORT"
    }

    fn check(&self, target: &str) -> std::result::Result<(), String> {
        match host_port(target).rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && !h.contains('/') && p.parse::<u16>().is_ok() => Ok(()),
            _ => Err("expected http://HOST:PORT (no path: the endpoints are the binding's)".into()),
        }
    }

    fn bind(
        &self,
        target: &str,
        identity: &ModelIdentity,
        options: &Options,
    ) -> Result<Vec<Box<dyn Acceptor>>> {
        Ok(vec![Box::new(server::bind(
            host_port(target),
            identity,
            options,
        )?)])
    }

    fn connect(
        &self,
        target: &str,
        identity: &ModelIdentity,
        options: &Options,
    ) -> Result<(Session, Box<dyn SendPort>)> {
        let (session, port) = client::connect(host_port(target), identity, options)?;
        Ok((session, Box::new(port)))
    }
}
