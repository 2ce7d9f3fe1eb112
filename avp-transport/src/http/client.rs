//! The sending half: a kept-alive HTTP/1.1 connection to an avp listener or
//! to a server of the reference's binding (its FastAPI `create_app`), driven
//! by a one-thread runtime of its own so that both the blocking and the async
//! API can use it.
//!
//! The handshake's answer says which format the server reads. An avp server
//! announces v2: a message's body is then the loaned buffer itself (no copy).
//! Any other server gets v1, which is all the reference decodes: each message
//! is converted once (counted in `Stats::format_conversions`), and text
//! messages go to `/avp/v2/text` as the reference's JSON message.

use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use avp_wire::v1::{self, Compression};
use avp_wire::{Message, ModelIdentity, Payload, Resolver, TextFormat};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::json::{self, Hello, JsonMessage};
use super::{BINDING_VERSION, HANDSHAKE, TEXT, TRANSMIT};
use crate::error::{AuthFailure, Result, TransportError};
use crate::options::Options;
use crate::port::{Counters, LoanMem, PortFuture, SendPort};
use crate::session::{Session, TransportKind};
use crate::tcp::buf::{BufPool, PageBuf};

/// Largest answer read from a server.
const MAX_ANSWER: usize = 1 << 20;

/// A runtime dropped without waiting (a sender may be dropped inside another
/// runtime, where waiting is not allowed).
struct Rt(Option<tokio::runtime::Runtime>);

impl Rt {
    fn get(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("the runtime lives until drop")
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A loaned buffer as a request body; back to the pool once sent.
struct Loaned {
    buf: Option<PageBuf>,
    len: usize,
    pool: Arc<Mutex<BufPool>>,
}

impl AsRef<[u8]> for Loaned {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| b.slice(self.len))
    }
}

impl Drop for Loaned {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            lock(&self.pool).give(b);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The sending half of an `http://` session.
pub(super) struct HttpSender {
    rt: Arc<Rt>,
    /// `HOST:PORT`.
    addr: String,
    conn: Option<SendRequest<Full<Bytes>>>,
    agent_id: String,
    token: Option<String>,
    /// Whether the server reads v2 (an avp server); else v1.
    v2: bool,
    session_id: String,
    max_message: u64,
    connect_timeout: Duration,
    answer_timeout: Duration,
    pool: Arc<Mutex<BufPool>>,
    counters: Counters,
}

/// Connect to the server at `addr` and handshake.
pub(super) fn connect(
    addr: &str,
    identity: &ModelIdentity,
    options: &Options,
) -> Result<(Session, HttpSender)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("avp-http-client")
        .enable_all()
        .build()
        .map_err(TransportError::io("http client runtime"))?;
    let mut port = HttpSender {
        rt: Arc::new(Rt(Some(rt))),
        addr: addr.to_owned(),
        conn: None,
        agent_id: options.agent_id.clone(),
        token: options.token.clone(),
        v2: false,
        session_id: String::new(),
        max_message: options.max_message,
        connect_timeout: options.connect_timeout,
        answer_timeout: options.http.delivery_timeout,
        pool: Arc::default(),
        counters: Counters::default(),
    };
    let hello = Hello {
        agent_id: options.agent_id.clone(),
        avp_version: super::AVP_VERSION.into(),
        capabilities: json::capabilities(),
        identity: Some(identity.clone()),
    };
    let body = Bytes::from(serde_json::to_vec(&hello).expect("a hello serializes"));
    let rt = port.rt.clone();
    let (status, answer) = rt
        .get()
        .block_on(port.post(HANDSHAKE, "application/json", body))?;
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Err(TransportError::Auth(AuthFailure::Refused {
            reason: format!("{status}: {}", json::error_message(&answer)),
        }));
    }
    if !status.is_success() {
        return Err(TransportError::Protocol(format!(
            "http://{addr} refused the handshake: {status}: {}",
            json::error_message(&answer)
        )));
    }
    let v: Value = serde_json::from_slice(&answer).map_err(|e| {
        TransportError::Protocol(format!(
            "http://{addr} answered the handshake with something other than JSON ({e}): is it an avp server?"
        ))
    })?;
    if v.get("success") == Some(&Value::Bool(false)) {
        return Err(TransportError::Protocol(format!(
            "http://{addr} refused the handshake: {}",
            json::error_message(&answer)
        )));
    }
    let remote: ModelIdentity = match v.get("identity") {
        Some(i) => serde_json::from_value(i.clone()).map_err(|e| {
            TransportError::Protocol(format!("the handshake's identity is malformed: {e}"))
        })?,
        None => ModelIdentity::default(),
    };
    let capabilities = v
        .get("capabilities")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    port.v2 = json::reads_v2(&capabilities);
    // An avp server says how large a message it takes: larger ones are refused
    // here, before they are written (its 413 would come after the bytes).
    if let Some(theirs) = v.get("max_message").and_then(Value::as_u64) {
        port.max_message = port.max_message.min(theirs);
    }
    let given_id = v
        .get("session_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    // The reference's server, without a handshake handler, answers with the
    // client's own identity and no session id: that says nothing of its model.
    let echoed = given_id.is_none() && remote == *identity && !port.v2;
    port.session_id = given_id.unwrap_or_else(|| crate::handshake::random_hex(16));
    let resolver = match &options.maps {
        Some(m) => Resolver::with_maps(m.as_ref()),
        None => Resolver::new(),
    };
    let r = resolver.resolve(identity, &remote, None);
    let mut mode_reason = r.reason;
    if echoed {
        mode_reason.push_str(
            " (the server echoed this agent's own identity, as the reference's server does \
             without a handshake handler: it did not say which model it runs)",
        );
    }
    let transport_reason = if port.v2 {
        format!("HTTP/1.1 to {addr}, an avp server: v2 messages, sent from the loaned buffer")
    } else {
        format!(
            "HTTP/1.1 to {addr}, a server of the reference's binding that does not read v2: \
             each message is converted to v1 (one more copy)"
        )
    };
    let session = Session {
        id: port.session_id.clone(),
        mode: r.mode,
        map_id: r.map_id,
        path: r.path,
        mode_reason,
        transport: TransportKind::Http,
        transport_reason,
        peer_agent: v
            .get("agent_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        peer_identity: remote,
        max_message: port.max_message,
        ttl: options.session_ttl,
        started: Instant::now(),
        peer_vocabulary: None,
    };
    Ok((session, port))
}

/// Open a connection to `addr` (on the sender's runtime, which drives it).
async fn open(addr: String, timeout: Duration) -> Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr))
        .await
        .map_err(|_| TransportError::Timeout(timeout, "an http connection"))?
        .map_err(TransportError::io("connect http"))?;
    let _ = stream.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| TransportError::Protocol(format!("http connection to {addr}: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("http connection: {e}");
        }
    });
    Ok(send)
}

impl HttpSender {
    /// POST `body` to `path` and read the answer; a request the connection
    /// closed before sending is sent again once on a new connection.
    async fn post(
        &mut self,
        path: &str,
        content_type: &'static str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes)> {
        for attempt in 0..2 {
            if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
                let opened = self
                    .rt
                    .get()
                    .spawn(open(self.addr.clone(), self.connect_timeout))
                    .await
                    .map_err(|e| TransportError::Protocol(format!("http connect: {e}")))??;
                self.conn = Some(opened);
            }
            let conn = self.conn.as_mut().expect("connected above");
            if conn.ready().await.is_err() {
                self.conn = None;
                continue;
            }
            let mut req = Request::post(path)
                .header(HOST, self.addr.as_str())
                .header(CONTENT_TYPE, content_type)
                .header("AVP-Version", BINDING_VERSION)
                .header("AVP-Agent-ID", self.agent_id.as_str());
            if let Some(t) = &self.token {
                req = req.header(AUTHORIZATION, format!("Bearer {t}"));
            }
            let req = req
                .body(Full::new(body.clone()))
                .map_err(|e| TransportError::Protocol(format!("http request: {e}")))?;
            let sent = tokio::time::timeout(self.answer_timeout, conn.try_send_request(req)).await;
            let resp = match sent {
                Err(_) => {
                    self.conn = None;
                    return Err(TransportError::Timeout(
                        self.answer_timeout,
                        "the http server's answer",
                    ));
                }
                Ok(Ok(r)) => r,
                Ok(Err(mut e)) => {
                    self.conn = None;
                    if e.take_message().is_some() && attempt == 0 {
                        continue;
                    }
                    return Err(TransportError::PeerGone(format!(
                        "http://{}: {}",
                        self.addr,
                        e.error()
                    )));
                }
            };
            let status = resp.status();
            let answer = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| {
                    TransportError::PeerGone(format!("http://{}: the answer: {e}", self.addr))
                })?
                .to_bytes();
            return Ok((status, answer));
        }
        Err(TransportError::PeerGone(format!(
            "http://{}: the connection closed twice before the request was sent",
            self.addr
        )))
    }

    /// The request for a finished message: the loaned buffer itself (v2), or
    /// its conversion to v1 or to a JSON message.
    fn request_for(
        &mut self,
        buf: PageBuf,
        len: usize,
    ) -> Result<(&'static str, &'static str, Bytes)> {
        if self.v2 {
            let body = Bytes::from_owner(Loaned {
                buf: Some(buf),
                len,
                pool: self.pool.clone(),
            });
            return Ok((TRANSMIT, super::CONTENT_TYPE, body));
        }
        let converted = {
            let m = Message::parse(buf.slice(len))?;
            match m.payload() {
                Payload::Text(t) => {
                    let text = m.text()?.as_str()?;
                    let parsed = (t.format == TextFormat::Json)
                        .then(|| serde_json::from_str::<JsonMessage>(text).ok())
                        .flatten();
                    let env = m.envelope();
                    let msg = parsed.unwrap_or_else(|| JsonMessage {
                        avp_version: super::AVP_VERSION.into(),
                        session_id: env.session_id().into(),
                        source_agent_id: env.source_agent_id().into(),
                        target_agent_id: env.target_agent_id().into(),
                        content: text.into(),
                        extra: Default::default(),
                    });
                    let doc = serde_json::to_vec(&msg).expect("a JSON message serializes");
                    (TEXT, "application/json", doc)
                }
                _ => (
                    TRANSMIT,
                    super::CONTENT_TYPE,
                    v1::from_v2(&m, Compression::None)?,
                ),
            }
        };
        lock(&self.pool).give(buf);
        Counters::bump(&self.counters.format_conversions);
        Ok((converted.0, converted.1, Bytes::from(converted.2)))
    }

    async fn send_message(&mut self, mut mem: LoanMem, len: usize) -> Result<()> {
        let buf: PageBuf = mem.take_keep().expect("an http loan keeps its buffer");
        let (path, content_type, body) = self.request_for(buf, len)?;
        let (status, answer) = self.post(path, content_type, body).await?;
        if !status.is_success() {
            let reason = json::error_message(&answer);
            return Err(
                if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                    TransportError::Auth(AuthFailure::Refused {
                        reason: format!("{status}: {reason}"),
                    })
                } else {
                    TransportError::Refused {
                        status: status.as_u16(),
                        reason,
                    }
                },
            );
        }
        self.counters.messages.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl SendPort for HttpSender {
    fn acquire(&mut self, len: usize, _wait: bool) -> Result<Option<LoanMem>> {
        if len as u64 > self.max_message {
            return Err(TransportError::TooLarge {
                size: len as u64,
                limit: self.max_message,
            });
        }
        let mut buf = lock(&self.pool).take(len);
        let ptr = NonNull::new(buf.as_mut_ptr()).expect("a buffer is not null");
        let cap = buf.capacity();
        Ok(Some(LoanMem::new(ptr, cap, 0, Some(Box::new(buf)))))
    }

    fn publish(&mut self, mem: LoanMem, len: usize) -> Result<()> {
        let rt = self.rt.clone();
        rt.get().block_on(self.send_message(mem, len))
    }

    fn publish_async(&mut self, mem: LoanMem, len: usize) -> PortFuture<'_, ()> {
        Box::pin(self.send_message(mem, len))
    }

    fn abandon(&mut self, mut mem: LoanMem) {
        if let Some(b) = mem.take_keep::<PageBuf>() {
            lock(&self.pool).give(b);
        }
    }

    fn loan_timeout(&self) -> Duration {
        self.answer_timeout
    }

    fn stats(&self) -> &Counters {
        &self.counters
    }
}
