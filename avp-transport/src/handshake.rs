//! The handshake: identities and capabilities both ways, mutual authentication by
//! HMAC-SHA256 over the whole transcript with a pre-shared token, then the
//! listener's decision (mode from the avp-wire resolver, session id and ttl).
//!
//! ```text
//! connecting side                         listener
//!   Hello{identity, nonce_c, ...}  ──────▶
//!                                  ◀──────  Hello{identity, nonce_s, auth_required, shm_socket?}
//!   Auth{mac_c} | Switch{to:"shm"} ──────▶  verify mac_c (constant time)
//!   [Vocabulary{..}…]              ──────▶  (when the listener asked for it)
//!                                  ◀──────  Accept{session, mode, mac_s} | Refuse{reason}
//!   verify mac_s
//! ```
//! Both sides hash every frame in order, each as its JSON encoding, with the
//! MAC fields empty: `T_c` covers the two hellos and the Auth frame, `T_s`
//! everything up to and including the Accept. `mac_c = HMAC(token,
//! "avp-auth-v2 client" ‖ SHA-256(T_c))`, `mac_s = HMAC(token, "avp-auth-v2
//! server" ‖ SHA-256(T_s))`. A field changed on the way (an identity, the
//! offered socket, a limit, the mode, the session id) makes the MAC fail, and
//! the session is refused with `AuthFailure::BadProof`. Nothing is accepted
//! before `Accept`. Without a token nothing is authenticated (see the trust
//! model in spec/transport.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use avp_wire::{Mode, ModelIdentity, Resolver};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::device::DeviceMem;
use crate::error::{AuthFailure, Result, TransportError};
use crate::frame::{Accept, Frame, FrameIo, Hello, PROTOCOL};
use crate::options::Options;
use crate::rdma::verbs::{RdmaGrant, RdmaInfo, RdmaOffer};
use crate::session::{Session, TransportKind};

/// The listener's side of setting up RDMA in the handshake.
pub(crate) trait RdmaGrantor {
    /// What to tell the peer about this end's device.
    fn info(&self) -> RdmaInfo;
    /// Whether this end can reach the peer's device: `Ok(why)` or `Err(why not)`.
    fn reach(&self, peer: &RdmaInfo) -> std::result::Result<String, String>;
    /// Build the receiving side for the sender's queue pairs (`offer`); what
    /// to tell the sender. (The session's message limit is enforced when
    /// regions are asked for, after the handshake.)
    fn grant(&mut self, offer: &RdmaOffer) -> Result<RdmaGrant>;
}

/// What a listener offers a connecting peer besides the transport it came in on.
#[derive(Default)]
pub(crate) struct Offers<'a> {
    /// Its shared-memory control socket (to TCP peers on the same host).
    pub(crate) shm_socket: Option<String>,
    /// The device of `cuda://` sessions.
    pub(crate) device: Option<&'a dyn DeviceMem>,
    /// RDMA setup (`rdma://` listeners).
    pub(crate) rdma: Option<&'a mut dyn RdmaGrantor>,
}

/// The connecting side's RDMA setup: its offer, and the listener's grant once accepted.
pub(crate) struct RdmaClient {
    /// The sender's queue pairs.
    pub(crate) offer: RdmaOffer,
    /// The receiver's answer.
    pub(crate) grant: Option<RdmaGrant>,
}

type HmacSha256 = Hmac<Sha256>;

/// This host's boot id ("" if unknown).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// `n` random bytes as lower-case hex.
pub(crate) fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("the OS random source works");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The frames of one handshake so far, hashed in order.
#[derive(Clone, Default)]
struct Transcript(Sha256);

impl Transcript {
    /// Add `frame` as its JSON encoding.
    fn add(&mut self, frame: &Frame) {
        let bytes = serde_json::to_vec(frame).expect("frames always encode");
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    fn digest(&self) -> [u8; 32] {
        self.0.clone().finalize().into()
    }
}

fn mac(token: &str, role: &str, transcript: &Transcript) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(token.as_bytes()).expect("HMAC takes any key length");
    m.update(b"avp-auth-v2 ");
    m.update(role.as_bytes());
    m.update(&transcript.digest());
    m
}

fn mac_hex(token: &str, role: &str, transcript: &Transcript) -> String {
    mac(token, role, transcript)
        .finalize()
        .into_bytes()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn verify_mac(token: &str, role: &str, transcript: &Transcript, given: Option<&str>) -> bool {
    let Some(given) = given else { return false };
    let Some(bytes) = unhex(given) else {
        return false;
    };
    // `verify_slice` compares in constant time.
    mac(token, role, transcript).verify_slice(&bytes).is_ok()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Build our `Hello`.
pub(crate) fn hello(
    identity: &ModelIdentity,
    opts: &Options,
    shm_socket: Option<String>,
    reason: Option<String>,
) -> Hello {
    Hello {
        protocol: PROTOCOL,
        agent_id: opts.agent_id.clone(),
        identity: identity.clone(),
        max_message: opts.max_message,
        transports: vec!["shm".into(), "tcp".into()],
        device: None,
        rdma: None,
        boot_id: boot_id(),
        shm_socket,
        nonce: random_hex(32),
        auth_required: opts.token.is_some(),
        transport_reason: reason,
        vocab_tokens: opts
            .vocabulary
            .as_ref()
            .map_or(0, |v| v.len().min(u32::MAX as usize) as u32),
        want_vocabulary: false,
    }
}

fn expect_hello(frame: Frame) -> Result<Hello> {
    match frame {
        Frame::Hello(h) if h.protocol == PROTOCOL => Ok(h),
        Frame::Hello(h) => Err(TransportError::Protocol(format!(
            "peer speaks transport protocol {}, we speak {PROTOCOL}",
            h.protocol
        ))),
        Frame::Refuse { reason } => Err(TransportError::Auth(AuthFailure::Refused { reason })),
        other => Err(TransportError::Protocol(format!(
            "expected Hello, got {other:?}"
        ))),
    }
}

/// What the connecting side does after reading the listener's `Hello`.
pub(crate) enum ClientStep<'a> {
    /// Finish here; the string says why this transport (for the listener's logs).
    Stay(String),
    /// Finish here and set up RDMA (the string as for `Stay`): the offer goes
    /// in `Auth`, the listener's grant comes back in `Accept`.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Rdma(String, &'a mut RdmaClient),
    /// Leave for the listener's shared-memory socket.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Switch,
}

/// Connecting side, part 1: exchange hellos. Returns ours and theirs.
pub(crate) fn client_hello(
    io: &mut dyn FrameIo,
    ours: Hello,
    timeout: Duration,
) -> Result<(Hello, Hello)> {
    io.send_frame(&Frame::Hello(ours.clone()), &[])?;
    let (f, _) = io.recv_frame(timeout)?;
    Ok((ours, expect_hello(f)?))
}

/// Connecting side, part 2: authenticate (or announce a switch) and read the decision.
pub(crate) fn client_finish(
    io: &mut dyn FrameIo,
    ours: &Hello,
    theirs: &Hello,
    opts: &Options,
    step: ClientStep<'_>,
    transport: TransportKind,
    timeout: Duration,
) -> Result<Option<Session>> {
    let (why, rdma) = match step {
        ClientStep::Switch => {
            io.send_frame(&Frame::Switch { to: "shm".into() }, &[])?;
            return Ok(None);
        }
        ClientStep::Stay(why) => (why, None),
        ClientStep::Rdma(why, r) => (why, Some(r)),
    };
    if theirs.auth_required && opts.token.is_none() {
        return Err(TransportError::Auth(AuthFailure::TokenRequired));
    }
    let mut transcript = Transcript::default();
    transcript.add(&Frame::Hello(ours.clone()));
    transcript.add(&Frame::Hello(theirs.clone()));
    let mut auth = Frame::Auth {
        mac: None,
        reason: Some(why.clone()),
        transport: matches!(transport, TransportKind::Cuda | TransportKind::Rdma)
            .then(|| transport.name().to_owned()),
        rdma: rdma.as_ref().map(|r| r.offer.clone()),
    };
    transcript.add(&auth);
    if let (Some(t), Frame::Auth { mac, .. }) = (opts.token.as_deref(), &mut auth) {
        *mac = Some(mac_hex(t, "client", &transcript));
    }
    io.send_frame(&auth, &[])?;
    if theirs.want_vocabulary
        && let Some(vocab) = &opts.vocabulary
    {
        send_vocabulary(io, vocab, &mut transcript)?;
    }
    let (f, _) = io.recv_frame(timeout)?;
    let accept = match f {
        Frame::Accept(a) => a,
        Frame::Refuse { reason } => {
            return Err(TransportError::Auth(AuthFailure::Refused { reason }));
        }
        other => {
            return Err(TransportError::Protocol(format!(
                "expected Accept, got {other:?}"
            )));
        }
    };
    transcript.add(&Frame::Accept(Accept {
        mac: None,
        ..accept.clone()
    }));
    if let Some(token) = &opts.token
        && !verify_mac(token, "server", &transcript, accept.mac.as_deref())
    {
        return Err(TransportError::Auth(AuthFailure::BadProof {
            peer: "the listener",
        }));
    }
    if let Some(r) = rdma {
        r.grant = Some(accept.rdma.clone().ok_or_else(|| {
            TransportError::Protocol("the listener accepted rdma without its queue pairs".into())
        })?);
    }
    Ok(Some(session_from(accept, theirs, transport, why)))
}

fn session_from(
    a: Accept,
    peer: &Hello,
    transport: TransportKind,
    transport_reason: String,
) -> Session {
    Session {
        id: a.session_id,
        mode: a.mode,
        map_id: a.map_id,
        path: a.path,
        mode_reason: a.reason,
        transport,
        transport_reason,
        peer_agent: peer.agent_id.clone(),
        peer_identity: peer.identity.clone(),
        max_message: a.max_message,
        ttl: Duration::from_millis(a.ttl_ms),
        started: Instant::now(),
        peer_vocabulary: None,
    }
}

/// Most tokens a peer's vocabulary may hold (the largest real ones are ~260K).
pub(crate) const MAX_VOCAB_TOKENS: u32 = 4 << 20;
/// Bytes of token strings per `Vocabulary` frame (JSON escaping stays under
/// [`crate::frame::MAX_FRAME`]).
const VOCAB_PART_BYTES: usize = 40 << 10;

/// Send `vocab` as `Vocabulary` frames (each added to `transcript`).
fn send_vocabulary(
    io: &mut dyn FrameIo,
    vocab: &[String],
    transcript: &mut Transcript,
) -> Result<()> {
    let mut first = 0usize;
    loop {
        let mut end = first;
        let mut bytes = 0;
        // A token's JSON form is at most 6x its bytes (\u00XX) plus quotes and a comma.
        while end < vocab.len() && bytes + 6 * vocab[end].len() + 3 <= VOCAB_PART_BYTES {
            bytes += 6 * vocab[end].len() + 3;
            end += 1;
        }
        if end == first && end < vocab.len() {
            return Err(TransportError::Protocol(format!(
                "token {first} is {} bytes, too long to send",
                vocab[first].len()
            )));
        }
        let part = Frame::Vocabulary {
            first: first as u32,
            tokens: vocab[first..end].to_vec(),
            last: end == vocab.len(),
        };
        transcript.add(&part);
        io.send_frame(&part, &[])?;
        if end == vocab.len() {
            return Ok(());
        }
        first = end;
    }
}

/// Receive the peer's vocabulary of `announced` tokens, in order (each part
/// added to `transcript`).
fn recv_vocabulary(
    io: &mut dyn FrameIo,
    announced: u32,
    timeout: Duration,
    transcript: &mut Transcript,
) -> Result<Vec<String>> {
    if announced > MAX_VOCAB_TOKENS {
        return Err(TransportError::Protocol(format!(
            "peer announces a vocabulary of {announced} tokens, at most {MAX_VOCAB_TOKENS} are accepted"
        )));
    }
    let deadline = crate::wait::from_now(timeout);
    let mut vocab: Vec<String> = Vec::with_capacity(announced as usize);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = io.recv_frame(left)?.0;
        if let Frame::Vocabulary { .. } = &frame {
            transcript.add(&frame);
        }
        match frame {
            Frame::Vocabulary {
                first,
                tokens,
                last,
            } => {
                if first as usize != vocab.len() || vocab.len() + tokens.len() > announced as usize
                {
                    return Err(TransportError::Protocol(format!(
                        "vocabulary part at {first} with {} tokens does not follow {} of {announced} announced",
                        tokens.len(),
                        vocab.len()
                    )));
                }
                vocab.extend(tokens);
                if last {
                    return Ok(vocab);
                }
            }
            other => {
                return Err(TransportError::Protocol(format!(
                    "expected the peer's vocabulary, got {other:?}"
                )));
            }
        }
    }
}

/// Listener side: the whole handshake. `Ok(None)` when the peer switched to shared memory.
pub(crate) fn server(
    io: &mut dyn FrameIo,
    identity: &ModelIdentity,
    opts: &Options,
    offers: Offers<'_>,
    transport: TransportKind,
    timeout: Duration,
) -> Result<Option<Session>> {
    let Offers {
        shm_socket,
        device,
        rdma,
    } = offers;
    let (f, _) = io.recv_frame(timeout)?;
    let theirs = expect_hello(f)?;
    let resolver = match &opts.maps {
        Some(m) => Resolver::with_maps(m.as_ref()),
        None => Resolver::new(),
    };
    let mut ours = hello(identity, opts, shm_socket, None);
    if let Some(d) = device {
        ours.transports.push("cuda".into());
        ours.device = Some(d.info());
    }
    if let Some(r) = rdma.as_deref() {
        ours.transports.push("rdma".into());
        ours.rdma = Some(r.info());
    }
    // Only the vocabularies' overlap can still find a latent path: ask for the peer's.
    ours.want_vocabulary = opts.vocabulary.is_some()
        && theirs.vocab_tokens > 0
        && resolver.decide(&theirs.identity, identity, None).mode == Mode::Json;
    io.send_frame(&Frame::Hello(ours.clone()), &[])?;
    let mut transcript = Transcript::default();
    transcript.add(&Frame::Hello(theirs.clone()));
    transcript.add(&Frame::Hello(ours.clone()));
    let (f, _) = io.recv_frame(timeout)?;
    let (client_mac, why, chosen, offer) = match f {
        Frame::Auth {
            mac,
            reason,
            transport,
            rdma,
        } => {
            transcript.add(&Frame::Auth {
                mac: None,
                reason: reason.clone(),
                transport: transport.clone(),
                rdma: rdma.clone(),
            });
            (mac, reason, transport, rdma)
        }
        Frame::Switch { .. } => return Ok(None),
        other => {
            return Err(TransportError::Protocol(format!(
                "expected Auth, got {other:?}"
            )));
        }
    };
    if let Some(token) = &opts.token
        && !verify_mac(token, "client", &transcript, client_mac.as_deref())
    {
        let refuse = Frame::Refuse {
            reason: "authentication failed".into(),
        };
        let _ = io.send_frame(&refuse, &[]);
        return Err(TransportError::Auth(AuthFailure::BadProof {
            peer: "the connecting peer",
        }));
    }
    let refuse = |io: &mut dyn FrameIo, reason: String| {
        let _ = io.send_frame(
            &Frame::Refuse {
                reason: reason.clone(),
            },
            &[],
        );
        TransportError::Protocol(reason)
    };
    let mut grant = None;
    let transport = match (chosen.as_deref(), device, &theirs.device) {
        (None, _, _) => transport,
        (Some("rdma"), _, _) => {
            let (Some(r), Some(peer), Some(offer)) = (rdma, &theirs.rdma, &offer) else {
                return Err(refuse(
                    io,
                    "the peer chose rdma, which was not offered (or sent no queue pairs)".into(),
                ));
            };
            if let Err(why) = r.reach(peer) {
                return Err(refuse(
                    io,
                    format!("this listener cannot reach the sender's rdma device: {why}"),
                ));
            }
            match r.grant(offer) {
                Ok(g) => grant = Some(g),
                Err(e) => {
                    return Err(refuse(
                        io,
                        format!("rdma setup failed on the listener: {e}"),
                    ));
                }
            }
            TransportKind::Rdma
        }
        (Some("cuda"), Some(d), Some(peer)) => match d.reach(peer) {
            Ok(_) => TransportKind::Cuda,
            // The sender judged from its side; this end cannot map its memory.
            Err(why) => {
                return Err(refuse(
                    io,
                    format!("this listener cannot map the sender's device memory: {why}"),
                ));
            }
        },
        (Some(other), _, _) => {
            return Err(refuse(
                io,
                format!("the peer chose transport {other:?}, which was not offered"),
            ));
        }
    };
    let peer_vocabulary = match ours.want_vocabulary {
        true => Some(Arc::new(recv_vocabulary(
            io,
            theirs.vocab_tokens,
            timeout,
            &mut transcript,
        )?)),
        false => None,
    };
    let overlap = peer_vocabulary
        .as_ref()
        .zip(opts.vocabulary.as_ref())
        .map(|(a, b)| {
            Resolver::vocab_overlap(
                a.iter().map(String::as_str).filter(|t| !t.is_empty()),
                b.iter().map(String::as_str).filter(|t| !t.is_empty()),
            )
        });
    // The connecting side sends (source), the listener receives (target).
    let r = resolver.resolve(&theirs.identity, identity, overlap);
    let mut accept = Accept {
        session_id: random_hex(16),
        mode: r.mode,
        map_id: r.map_id,
        path: r.path,
        reason: r.reason,
        ttl_ms: opts.session_ttl.as_millis().min(u64::MAX as u128) as u64,
        max_message: opts.max_message.min(theirs.max_message),
        rdma: grant,
        mac: None,
    };
    transcript.add(&Frame::Accept(accept.clone()));
    accept.mac = opts
        .token
        .as_deref()
        .map(|t| mac_hex(t, "server", &transcript));
    io.send_frame(&Frame::Accept(accept.clone()), &[])?;
    let mut reason = why
        .or_else(|| theirs.transport_reason.clone())
        .unwrap_or_else(|| format!("peer connected over {}", transport.name()));
    if ours.device.is_some() && theirs.device.is_none() {
        reason.push_str("; device not used: the connecting peer offered none (it connected with shm://, or without Options::device)");
    }
    let mut s = session_from(accept, &theirs, transport, reason);
    s.peer_vocabulary = peer_vocabulary;
    tracing::info!("{}", s.explain());
    Ok(Some(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_verify_only_with_the_same_token_role_and_transcript() {
        let hello = |nonce: &str| {
            let mut h = super::hello(&ModelIdentity::default(), &Options::default(), None, None);
            h.nonce = nonce.into();
            Frame::Hello(h)
        };
        let mut t = Transcript::default();
        t.add(&hello("aa"));
        let m = mac_hex("secret", "client", &t);
        assert!(verify_mac("secret", "client", &t, Some(&m)));
        assert!(!verify_mac("secret", "server", &t, Some(&m)));
        assert!(!verify_mac("other", "client", &t, Some(&m)));
        assert!(!verify_mac("secret", "client", &t, None));
        assert!(!verify_mac("secret", "client", &t, Some("zz")));
        let mut other = Transcript::default();
        other.add(&hello("ab"));
        assert!(!verify_mac("secret", "client", &other, Some(&m)));
        let mut longer = t.clone();
        longer.add(&hello("aa"));
        assert!(!verify_mac("secret", "client", &longer, Some(&m)));
        assert_eq!(random_hex(16).len(), 32);
        assert_ne!(random_hex(16), random_hex(16));
    }
}
