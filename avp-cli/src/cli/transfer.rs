//! `avp recv ADDR` and `avp send ADDR FILE...`: move message files between
//! processes or hosts (for debugging a pipeline, and for tests).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use avp_transport::{Endpoint, Options, ShmOptions, TcpOptions, TransportError};
use avp_wire::{Message, ModelIdentity, Payload, v1};

/// Arguments shared by `send` and `recv`.
#[derive(clap::Args, Debug)]
pub struct Common {
    /// Pre-shared token (peers must present the same one).
    #[arg(long, env = "AVP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// This agent's id.
    #[arg(long, default_value = "avp-cli")]
    agent: String,
    /// Seconds to wait for a peer or a message.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Largest message accepted, in bytes.
    #[arg(long, default_value_t = 4u64 << 30)]
    max_message: u64,
    /// Stay on TCP even when the peer is on the same host.
    #[arg(long)]
    no_shm_upgrade: bool,
}

impl Common {
    fn options(&self) -> Options {
        let mut o = Options::default()
            .agent_id(self.agent.clone())
            .max_message(self.max_message)
            .connect_timeout(self.timeout())
            // Message files may come from other sessions: relay them as they are.
            .check_session_ids(false)
            .shm(ShmOptions::default().loan_timeout(self.timeout()))
            .tcp(
                TcpOptions::default()
                    .shm_upgrade(!self.no_shm_upgrade)
                    .stall_timeout(self.timeout()),
            );
        o.token = self.token.clone();
        o
    }
    fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout)
    }
}

/// Arguments of `avp recv`.
#[derive(clap::Args, Debug)]
pub struct RecvArgs {
    /// Address to listen at: shm://NAME, tcp://HOST:PORT, or http://HOST:PORT
    /// (the Python reference's HTTP binding: its clients can send here).
    addr: String,
    /// Directory to write each message to (msg-000001.avp, ...).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Stop after this many messages in all (default: serve one sender after
    /// another until stopped).
    #[arg(long)]
    count: Option<u64>,
    /// Stop when the first sender leaves.
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    common: Common,
}

/// Arguments of `avp send`.
#[derive(clap::Args, Debug)]
pub struct SendArgs {
    /// Address of the listener: shm://NAME, tcp://HOST:PORT, or http://HOST:PORT
    /// (an avp listener, or a server of the Python reference's binding).
    addr: String,
    /// Message files to send, in order: v2, or v1 files of the Python
    /// reference (converted to v2 first, which is reported).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[command(flatten)]
    common: Common,
}

fn summary(m: &Message<'_>) -> String {
    match m.payload() {
        Payload::KvCache(kv) => format!(
            "kv_cache layers {}..{} of {}, {} kv heads x {} x {} positions, {} {}",
            kv.layers.start,
            kv.layers.end,
            kv.num_layers,
            kv.num_kv_heads,
            kv.head_dim,
            kv.seq_len,
            kv.dtype,
            kv.layout
        ),
        Payload::HiddenState(h) => format!(
            "hidden_state {} x {} {} map {:?}",
            h.rows, h.dim, h.dtype, h.map_id
        ),
        Payload::Text(t) => format!("text {} bytes ({})", t.len, t.format.name()),
    }
}

/// What became of one message.
enum Outcome {
    Ok,
    ChecksumFailed,
}

/// Report one received message (and write it to `out`, if given) as number `n`.
fn report(
    n: u64,
    m: &Message<'_>,
    out: Option<&std::path::Path>,
    t: Instant,
) -> anyhow::Result<Outcome> {
    let (check, outcome) = match m.verify() {
        Ok(()) => ("checksums ok".to_string(), Outcome::Ok),
        Err(e) => (format!("CHECKSUM FAILED: {e}"), Outcome::ChecksumFailed),
    };
    let dest = match out {
        Some(dir) => {
            let p = dir.join(format!("msg-{n:06}.avp"));
            std::fs::write(&p, m.as_bytes()).with_context(|| format!("write {}", p.display()))?;
            format!(" -> {}", p.display())
        }
        None => String::new(),
    };
    println!(
        "#{n} {} bytes, {}, {check} ({:.1} ms){dest}",
        m.total_len(),
        summary(m),
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(outcome)
}

/// Serve senders one after another: each until it leaves (or fails, which
/// is reported and ends that sender only), until `--count` messages in all or,
/// with `--once`, the first sender's end. Exits with failure when a message
/// failed its checksums or was refused.
pub fn recv(a: RecvArgs) -> anyhow::Result<ExitCode> {
    let listener = Endpoint::bind(&a.addr, &ModelIdentity::default(), a.common.options())?;
    eprintln!("listening on {}", listener.local_addr());
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let (mut n, mut bad) = (0u64, 0u64);
    let done = |n: u64| a.count.is_some_and(|c| n >= c);
    while !done(n) {
        // The first sender (and with --once the only one) is waited for
        // --timeout; later ones for as long as it takes.
        let wait = if n == 0 || a.once {
            a.common.timeout()
        } else {
            Duration::MAX
        };
        let rx = match listener.accept(wait) {
            Ok(rx) => rx,
            Err(e @ TransportError::Timeout(..)) => return Err(e.into()),
            Err(e) => {
                eprintln!("a peer failed its handshake: {e}");
                continue;
            }
        };
        eprintln!("{}", rx.session().explain());
        let mut from_this = 0u64;
        let why = loop {
            if done(n) {
                break None;
            }
            let g = match rx.recv(a.common.timeout()) {
                Ok(g) => g,
                Err(TransportError::PeerGone(_)) => break None,
                Err(e @ (TransportError::Wire(_) | TransportError::WrongSession { .. })) => {
                    bad += 1;
                    eprintln!("refused a message: {e}");
                    continue;
                }
                Err(e) => break Some(e),
            };
            n += 1;
            from_this += 1;
            if let Outcome::ChecksumFailed =
                report(n, g.message(), a.out.as_deref(), Instant::now())?
            {
                bad += 1;
            }
        };
        match why {
            None => eprintln!(
                "sender {:?} done after {from_this} messages",
                rx.session().peer_agent
            ),
            Some(e) => eprintln!(
                "sender {:?} dropped after {from_this} messages: {e}",
                rx.session().peer_agent
            ),
        }
        if a.once {
            break;
        }
    }
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A message file as v2 bytes: v1 files are converted (losslessly: envelope,
/// shape and tensor bytes), and the conversion is said on stderr.
fn as_v2(f: &std::path::Path, bytes: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    match avp_wire::sniff_version(&bytes).with_context(|| format!("{}", f.display()))? {
        2 => Ok(bytes),
        v => {
            let decoded =
                v1::decode(&bytes).with_context(|| format!("decode v{v} file {}", f.display()))?;
            let v2 =
                v1::to_v2(&decoded).with_context(|| format!("convert {} to v2", f.display()))?;
            eprintln!(
                "{}: a v{v} message ({} bytes) converted to v2 ({} bytes)",
                f.display(),
                bytes.len(),
                v2.len()
            );
            Ok(v2)
        }
    }
}

pub fn send(a: SendArgs) -> anyhow::Result<ExitCode> {
    let mut tx = Endpoint::connect(&a.addr, &ModelIdentity::default(), a.common.options())?;
    eprintln!("{}", tx.session().explain());
    for f in &a.files {
        let bytes = std::fs::read(f).with_context(|| format!("read {}", f.display()))?;
        let bytes = as_v2(f, bytes)?;
        let t = Instant::now();
        tx.send_bytes(&bytes)
            .with_context(|| format!("send {}", f.display()))?;
        println!(
            "sent {} ({} bytes, {:.1} ms)",
            f.display(),
            bytes.len(),
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(ExitCode::SUCCESS)
}
