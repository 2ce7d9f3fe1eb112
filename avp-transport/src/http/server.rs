//! The listening half: an HTTP server (HTTP/1.1 and cleartext HTTP/2 on one
//! port) on its own small runtime, serving the reference's endpoints and
//! feeding one [`Inbox`] per session.
//!
//! A session is the requests of one agent (`AVP-Agent-ID`, else the agent id
//! in the body): opened by its handshake, or by its first message when it
//! skips the handshake (the reference's client may), and ended when the last
//! HTTP connection that carried its requests closes.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use avp_wire::v1::{self, Limits};
use avp_wire::{Envelope, Message, ModelIdentity, Payload, Resolver, TextDesc, TextFormat};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{Value, json};

use super::inbox::{Body, Doorbell, Inbox, Receiving, Refused};
use super::json::{self, Hello, JsonMessage};
use super::{HANDSHAKE, HEALTH, IMPLEMENTATION, TEXT, TRANSMIT};
use crate::error::{Result, TransportError};
use crate::options::Options;
use crate::port::RecvPort;
use crate::scheme::{AcceptCtx, Acceptor};
use crate::session::{Session, TransportKind};
use crate::tcp::buf::BufPool;

/// Sessions opened but not yet accepted; more are refused (503).
const MAX_PENDING: usize = 64;
/// Largest handshake or JSON message body.
const MAX_JSON: u64 = 16 << 20;
/// The largest buffer taken for a body before its bytes arrive; it grows as
/// they do, so a declared length costs little until its bytes are there.
const FIRST_BUFFER: u64 = 64 << 20;
/// HTTP/2 flow-control windows: large enough that a KV cache is not paced by
/// window updates.
const H2_STREAM_WINDOW: u32 = 16 << 20;
const H2_CONN_WINDOW: u32 = 32 << 20;

/// What the server's tasks share.
struct Shared {
    identity: ModelIdentity,
    options: Options,
    /// Open sessions by agent id.
    sessions: Mutex<HashMap<String, Arc<Inbox>>>,
    /// Sessions opened and not yet accepted.
    pending: Mutex<VecDeque<Arc<Inbox>>>,
    /// Readable while `pending` is not empty.
    bell: Doorbell,
    /// Buffers bodies are read into, back when their messages are released.
    pool: Arc<Mutex<BufPool>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The server's thread: stopped (and joined) when the listener and every
/// receiver it fed are gone.
struct Life {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Life {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A bound `http://` listener.
pub(super) struct HttpAcceptor {
    shared: Arc<Shared>,
    local: SocketAddr,
    life: Arc<Life>,
}

/// Listen at `host_port`.
pub(super) fn bind(
    host_port: &str,
    identity: &ModelIdentity,
    options: &Options,
) -> Result<HttpAcceptor> {
    let listener =
        std::net::TcpListener::bind(host_port).map_err(TransportError::io("bind http"))?;
    listener
        .set_nonblocking(true)
        .map_err(TransportError::io("bind http"))?;
    let local = listener
        .local_addr()
        .map_err(TransportError::io("local_addr"))?;
    let shared = Arc::new(Shared {
        identity: identity.clone(),
        options: options.clone(),
        sessions: Mutex::default(),
        pending: Mutex::default(),
        bell: Doorbell::new()?,
        pool: Arc::default(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("avp-http")
        .enable_all()
        .build()
        .map_err(TransportError::io("http server runtime"))?;
    let listener = {
        let _in = rt.enter();
        tokio::net::TcpListener::from_std(listener).map_err(TransportError::io("bind http"))?
    };
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let served = shared.clone();
    let thread = std::thread::Builder::new()
        .name("avp-http-server".into())
        .spawn(move || rt.block_on(serve(listener, served, stopped)))
        .map_err(TransportError::io("spawn the http server"))?;
    tracing::info!("avp http listener at http://{local}");
    Ok(HttpAcceptor {
        shared,
        local,
        life: Arc::new(Life {
            stop: Some(stop),
            thread: Some(thread),
        }),
    })
}

impl Acceptor for HttpAcceptor {
    fn fd(&self) -> BorrowedFd<'_> {
        self.shared.bell.fd()
    }

    fn local_addr(&self) -> Option<String> {
        Some(format!("http://{}", self.local))
    }

    fn accept(&self, _ctx: &AcceptCtx<'_>) -> Result<Option<(Session, Arc<dyn RecvPort>)>> {
        let mut pending = lock(&self.shared.pending);
        self.shared.bell.drain();
        let next = pending.pop_front();
        if !pending.is_empty() {
            self.shared.bell.ring();
        }
        drop(pending);
        Ok(next.map(|inbox| {
            let session = inbox.session.clone();
            let port: Arc<dyn RecvPort> = Arc::new(Receiving {
                inbox,
                _server: self.life.clone(),
            });
            (session, port)
        }))
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(connection(stream, peer, shared.clone()));
                }
                Err(e) => {
                    // Out of descriptors, say: try again shortly.
                    tracing::warn!("http accept: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    for inbox in lock(&shared.sessions).drain().map(|(_, i)| i) {
        inbox.end("the http listener closed");
    }
}

/// The sessions one HTTP connection carried requests of; when the connection
/// closes, each loses one connection (and ends with its last).
struct Connection {
    peer: SocketAddr,
    shared: Arc<Shared>,
    sessions: Mutex<Vec<Arc<Inbox>>>,
    /// The server refused a body without reading it, so the connection closes
    /// on the server's initiative.
    unread_body: AtomicBool,
}

impl Connection {
    fn carry(&self, inbox: &Arc<Inbox>) {
        let mut s = lock(&self.sessions);
        if !s.iter().any(|i| Arc::ptr_eq(i, inbox)) {
            inbox.connection_opened();
            s.push(inbox.clone());
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let by_peer = !self.unread_body.load(Ordering::Relaxed);
        for inbox in lock(&self.sessions).drain(..) {
            if inbox.connection_closed(by_peer) {
                let mut open = lock(&self.shared.sessions);
                if open
                    .get(&inbox.session.peer_agent)
                    .is_some_and(|i| Arc::ptr_eq(i, &inbox))
                {
                    open.remove(&inbox.session.peer_agent);
                }
            }
        }
    }
}

async fn connection(stream: tokio::net::TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let conn = Arc::new(Connection {
        peer,
        shared,
        sessions: Mutex::default(),
        unread_body: AtomicBool::new(false),
    });
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |req| {
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(handle(req, &conn).await) }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A peer that opens a connection and dribbles its headers is cut off.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(conn.shared.options.http.body_timeout);
    builder
        .http2()
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONN_WINDOW)
        .max_frame_size(1 << 20);
    if let Err(e) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!("http connection from {peer}: {e}");
    }
}

/// A request refused: the status and the reference's `{"success": false}` message.
struct Refusal(StatusCode, String);

impl Refusal {
    fn bad(message: impl Into<String>) -> Refusal {
        Refusal(StatusCode::BAD_REQUEST, message.into())
    }
}

type Answer = std::result::Result<Value, Refusal>;

async fn handle(req: Request<Incoming>, conn: &Connection) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let answer = match (req.method(), path.as_str()) {
        (&Method::GET, HEALTH) => Ok(json!({"status": "ok"})),
        (&Method::POST, HANDSHAKE) => handshake(req, conn).await,
        (&Method::POST, TRANSMIT) => transmit(req, conn).await,
        (&Method::POST, TEXT) => text(req, conn).await,
        (m, p) if [HANDSHAKE, TRANSMIT, TEXT, HEALTH].contains(&p) => Err(Refusal(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{m} {p} is not served: use {}",
                if p == HEALTH { "GET" } else { "POST" }
            ),
        )),
        (m, p) => Err(Refusal(
            StatusCode::NOT_FOUND,
            format!(
                "no endpoint {m} {p}: avp serves POST {HANDSHAKE}, POST {TRANSMIT}, POST {TEXT} and GET {HEALTH}"
            ),
        )),
    };
    let (status, body) = match answer {
        Ok(v) if path == HEALTH => (StatusCode::OK, v),
        Ok(v) => (StatusCode::OK, json::ok(v)),
        Err(Refusal(status, message)) => {
            tracing::debug!("http {path} from {}: {status}: {message}", conn.peer);
            if [StatusCode::PAYLOAD_TOO_LARGE, StatusCode::REQUEST_TIMEOUT].contains(&status) {
                conn.unread_body.store(true, Ordering::Relaxed);
            }
            (status, json::error(message))
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if status == StatusCode::UNAUTHORIZED {
        h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

/// Refuse a request without the listener's bearer token (when it has one).
fn authorize(req: &Request<Incoming>, shared: &Shared) -> std::result::Result<(), Refusal> {
    let Some(token) = &shared.options.token else {
        return Ok(());
    };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match given {
        Some(g) if same(g, token.as_bytes()) => Ok(()),
        Some(_) => Err(Refusal(
            StatusCode::UNAUTHORIZED,
            "wrong bearer token; nothing was delivered".into(),
        )),
        None => Err(Refusal(
            StatusCode::UNAUTHORIZED,
            "this listener requires `Authorization: Bearer <token>`; nothing was delivered".into(),
        )),
    }
}

/// Equality that takes as long whatever the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The agent a request speaks for: its `AVP-Agent-ID`, else `fallback`.
fn agent_of(req: &Request<Incoming>, fallback: &str) -> String {
    req.headers()
        .get("avp-agent-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .unwrap_or(fallback)
        .to_owned()
}

/// Read a body of at most `limit` bytes into a pooled buffer: a declared
/// length over it is refused before anything is read (413), a body that
/// stalls past the body timeout is refused (408).
async fn read_body(
    req: Request<Incoming>,
    limit: u64,
    timeout: Duration,
    pool: &Arc<Mutex<BufPool>>,
) -> std::result::Result<Body, Refusal> {
    let too_large = |n: u64| {
        Refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a body of {n} bytes exceeds this listener's limit of {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > limit) {
        return Err(too_large(n));
    }
    let mut body = req.into_body();
    // The declared length is trusted only up to FIRST_BUFFER before its bytes come.
    let want = declared.unwrap_or(0) as usize;
    let mut buf = lock(pool).take_to_fill(want, FIRST_BUFFER as usize);
    let mut len = 0usize;
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Refusal::bad(format!("reading the body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                let n = len + data.len();
                if n as u64 > limit {
                    return Err(too_large(n as u64));
                }
                if n > buf.capacity() {
                    let cap = if n <= want {
                        want
                    } else {
                        n.max(2 * buf.capacity())
                    };
                    buf = buf.grown(cap.min(limit as usize), len);
                }
                buf.slice_mut(n)[len..].copy_from_slice(&data);
                len = n;
            }
        }
        Ok(())
    };
    let read = tokio::time::timeout(timeout, read).await;
    let body = Body::Pooled {
        buf: Some(buf),
        len,
        pool: pool.clone(),
    };
    match read {
        Ok(r) => r.map(|()| body),
        Err(_) => Err(Refusal(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body stalled: {} bytes in {timeout:?}; nothing was delivered",
                body.bytes().len()
            ),
        )),
    }
}

/// How a session was opened, for `Session::explain`.
enum Opened<'a> {
    Handshake(&'a Hello),
    FirstMessage,
}

impl Shared {
    /// A new session for `agent`, whose model is `peer`.
    fn new_session(
        &self,
        agent: &str,
        peer: ModelIdentity,
        id: Option<String>,
        opened: Opened<'_>,
        conn: &Connection,
        version: Version,
    ) -> Session {
        let resolver = match &self.options.maps {
            Some(m) => Resolver::with_maps(m.as_ref()),
            None => Resolver::new(),
        };
        // The peer is the sender: it is the source of what crosses.
        let r = resolver.resolve(&peer, &self.identity, None);
        let who = match opened {
            Opened::Handshake(h)
                if h.capabilities.get("implementation").and_then(Value::as_str)
                    == Some(IMPLEMENTATION) =>
            {
                "an avp agent, handshake".to_owned()
            }
            Opened::Handshake(h) => format!(
                "a client of the reference's binding (avp_version {}), handshake",
                h.avp_version
            ),
            Opened::FirstMessage => "no handshake: its first message opened the session \
                 (the peer's model is known only from that message)"
                .to_owned(),
        };
        Session {
            id: id
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| crate::handshake::random_hex(16)),
            mode: r.mode,
            map_id: r.map_id,
            path: r.path,
            mode_reason: r.reason,
            transport: TransportKind::Http,
            transport_reason: format!("{version:?} from {}: {who}", conn.peer),
            peer_agent: agent.to_owned(),
            peer_identity: peer,
            max_message: self.options.max_message,
            ttl: self.options.session_ttl,
            started: Instant::now(),
            peer_vocabulary: None,
        }
    }

    /// `agent`'s open session, if it has one that `keep` accepts.
    fn open_session(&self, agent: &str, keep: impl Fn(&Inbox) -> bool) -> Option<Arc<Inbox>> {
        let open = lock(&self.sessions);
        let inbox = open.get(agent)?;
        (inbox.open() && keep(inbox)).then(|| inbox.clone())
    }

    /// Open `session` (replacing the agent's previous one) for the listener to accept.
    fn open(&self, session: Session) -> std::result::Result<Arc<Inbox>, Refusal> {
        let mut pending = lock(&self.pending);
        if pending.len() >= MAX_PENDING {
            return Err(Refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{MAX_PENDING} sessions are waiting to be accepted; try again later"),
            ));
        }
        let agent = session.peer_agent.clone();
        let inbox = Arc::new(
            Inbox::new(session, self.options.http.queue)
                .map_err(|e| Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
        );
        if let Some(old) = lock(&self.sessions).insert(agent.clone(), inbox.clone()) {
            old.end(&format!("agent {agent:?} opened a new session"));
        }
        tracing::info!("http: {}", inbox.session.explain());
        pending.push_back(inbox.clone());
        self.bell.ring();
        Ok(inbox)
    }
}

async fn handshake(req: Request<Incoming>, conn: &Connection) -> Answer {
    let shared = &*conn.shared;
    authorize(&req, shared)?;
    let version = req.version();
    let header_agent = agent_of(&req, "");
    let body = read_body(
        req,
        MAX_JSON,
        shared.options.http.body_timeout,
        &shared.pool,
    )
    .await?;
    let hello: Hello = serde_json::from_slice(body.bytes())
        .map_err(|e| Refusal::bad(format!("Invalid handshake: {e}")))?;
    let agent = if header_agent.is_empty() {
        hello.agent_id.clone()
    } else {
        header_agent
    };
    let peer = hello.identity.clone().unwrap_or_default();
    let inbox = match shared.open_session(&agent, |i| i.session.peer_identity == peer) {
        Some(i) => i,
        None => shared.open(shared.new_session(
            &agent,
            peer,
            None,
            Opened::Handshake(&hello),
            conn,
            version,
        ))?,
    };
    conn.carry(&inbox);
    let s = &inbox.session;
    Ok(json!({
        "agent_id": shared.options.agent_id,
        "avp_version": super::AVP_VERSION,
        "identity": shared.identity,
        "session_id": s.id,
        "mode": s.mode.name(),
        "resolution_path": s.path.as_str(),
        "capabilities": json::capabilities(),
        "max_message": shared.options.max_message,
    }))
}

/// What a message says about its sender's model.
fn identity_of(m: &Message<'_>) -> ModelIdentity {
    let env = m.envelope();
    let mut id = ModelIdentity {
        model_family: env.model_family().into(),
        model_id: env.model_id().into(),
        model_hash: env.model_hash().into(),
        tokenizer_hash: env.tokenizer_hash().into(),
        ..Default::default()
    };
    if let Payload::KvCache(kv) = m.payload() {
        id.num_layers = kv.num_layers;
        id.num_kv_heads = kv.num_kv_heads;
        id.head_dim = kv.head_dim;
    }
    id
}

/// Deliver a v2 message to its agent's session (opened by this message when
/// there is none), waiting for room up to the delivery timeout.
async fn deliver(
    message: Body,
    header_agent: String,
    conn: &Connection,
    version: Version,
) -> Answer {
    let shared = &*conn.shared;
    let (agent, session_id, peer, kind) = {
        let m = Message::parse(message.bytes()).map_err(|e| Refusal::bad(e.to_string()))?;
        let env = m.envelope();
        let agent = if header_agent.is_empty() {
            env.source_agent_id().to_owned()
        } else {
            header_agent
        };
        (
            agent,
            env.session_id().to_owned(),
            identity_of(&m),
            m.payload().kind_name(),
        )
    };
    let bytes = message.bytes().len();
    let deadline = tokio::time::Instant::now() + shared.options.http.delivery_timeout;
    let mut message = message;
    // Twice at most: a receiver dropped between lookup and delivery gets the
    // message a new session.
    for _ in 0..2 {
        let inbox = match shared.open_session(&agent, |_| true) {
            Some(i) => i,
            None => shared.open(shared.new_session(
                &agent,
                peer.clone(),
                Some(session_id.clone()),
                Opened::FirstMessage,
                conn,
                version,
            ))?,
        };
        conn.carry(&inbox);
        let ours = &inbox.session.id;
        if shared.options.check_session_ids && !session_id.is_empty() && &session_id != ours {
            return Err(Refusal(
                StatusCode::CONFLICT,
                format!(
                    "the message names session {session_id:?}, but agent {agent:?}'s session here is \
                     {ours:?} (from its handshake): send it with that session id, or none; nothing was delivered"
                ),
            ));
        }
        loop {
            let room = inbox.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match inbox.push(message) {
                Ok(()) => {
                    return Ok(json!({
                        "session_id": ours,
                        "bytes": bytes,
                        "payload_type": kind,
                    }));
                }
                Err(Refused::Closed(m)) => {
                    message = m;
                    break;
                }
                Err(Refused::Full(m)) => {
                    message = m;
                    if tokio::time::timeout_at(deadline, room).await.is_err() {
                        return Err(Refusal(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!(
                                "agent {agent:?}'s receiver has {} messages waiting and took none for {:?}; \
                                 nothing was delivered, try again",
                                shared.options.http.queue, shared.options.http.delivery_timeout
                            ),
                        ));
                    }
                }
            }
        }
    }
    Err(Refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("agent {agent:?}'s receiver went away twice; nothing was delivered"),
    ))
}

async fn transmit(req: Request<Incoming>, conn: &Connection) -> Answer {
    let shared = &*conn.shared;
    authorize(&req, shared)?;
    let version = req.version();
    let agent = agent_of(&req, "");
    let limit = shared.options.max_message;
    let body = read_body(req, limit, shared.options.http.body_timeout, &shared.pool).await?;
    let message = match avp_wire::sniff_version(body.bytes()) {
        Ok(avp_wire::VERSION_V2) => body,
        Ok(v1::VERSION_V1) => {
            let d = v1::decode_with_limits(
                body.bytes(),
                &Limits {
                    max_decompressed: limit,
                },
            )
            .map_err(|e| Refusal::bad(format!("v1 message: {e}")))?;
            let m = v1::to_v2(&d).map_err(|e| Refusal::bad(format!("v1 message: {e}")))?;
            if m.len() as u64 > limit {
                return Err(Refusal(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the message is {} bytes in the v2 format, over this listener's limit of {limit}",
                        m.len()
                    ),
                ));
            }
            Body::Owned(m)
        }
        Ok(v) => {
            return Err(Refusal::bad(format!(
                "wire format version {v} is not read here (v1 and v2 are)"
            )));
        }
        Err(e) => return Err(Refusal::bad(format!("not an avp message: {e}"))),
    };
    deliver(message, agent, conn, version).await
}

async fn text(req: Request<Incoming>, conn: &Connection) -> Answer {
    let shared = &*conn.shared;
    authorize(&req, shared)?;
    let version = req.version();
    let agent = agent_of(&req, "");
    let body = read_body(
        req,
        MAX_JSON.min(shared.options.max_message),
        shared.options.http.body_timeout,
        &shared.pool,
    )
    .await?;
    let m: JsonMessage = serde_json::from_slice(body.bytes())
        .map_err(|e| Refusal::bad(format!("Invalid message: {e}")))?;
    let doc = serde_json::to_vec(&m).expect("a JSON message serializes");
    let envelope = Envelope {
        session_id: m.session_id.clone(),
        source_agent_id: m.source_agent_id.clone(),
        target_agent_id: m.target_agent_id.clone(),
        ..Default::default()
    };
    let payload = Payload::Text(TextDesc {
        format: TextFormat::Json,
        len: doc.len() as u64,
    });
    let message = Body::Owned(
        avp_wire::encode_to_vec(&envelope, &payload, &[&doc])
            .map_err(|e| Refusal::bad(e.to_string()))?,
    );
    let agent = if agent.is_empty() {
        m.source_agent_id
    } else {
        agent
    };
    deliver(message, agent, conn, version).await
}
