//! `avp recv ADDR` and `avp send ADDR FILE...`: move message files between
//! processes or hosts (for debugging a pipeline, and for tests).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use avp_transport::{Endpoint, Options};
use avp_wire::{Message, ModelIdentity, Payload};

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
        Options {
            agent_id: self.agent.clone(),
            token: self.token.clone(),
            max_message: self.max_message,
            connect_timeout: self.timeout(),
            loan_timeout: self.timeout(),
            // Message files may come from other sessions: relay them as they are.
            check_session_ids: false,
            allow_shm_upgrade: !self.no_shm_upgrade,
            ..Options::default()
        }
    }
    fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout)
    }
}

/// Arguments of `avp recv`.
#[derive(clap::Args, Debug)]
pub struct RecvArgs {
    /// Address to listen at: shm://NAME or tcp://HOST:PORT.
    addr: String,
    /// Directory to write each message to (msg-000001.avp, ...).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Stop after this many messages (default: until the sender leaves).
    #[arg(long)]
    count: Option<u64>,
    #[command(flatten)]
    common: Common,
}

/// Arguments of `avp send`.
#[derive(clap::Args, Debug)]
pub struct SendArgs {
    /// Address of the listener: shm://NAME or tcp://HOST:PORT.
    addr: String,
    /// Message files (v2) to send, in order.
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

pub fn recv(a: RecvArgs) -> anyhow::Result<ExitCode> {
    let listener = Endpoint::bind(&a.addr, &ModelIdentity::default(), a.common.options())?;
    eprintln!("listening on {}", listener.local_addr());
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let rx = listener.accept(a.common.timeout())?;
    eprintln!("{}", rx.session().explain());
    let mut n = 0u64;
    while a.count.is_none_or(|c| n < c) {
        let g = match rx.recv(a.common.timeout()) {
            Ok(g) => g,
            Err(avp_transport::TransportError::PeerGone(_)) if a.count.is_none() => break,
            Err(e) => return Err(e.into()),
        };
        let t = Instant::now();
        let m = g.message();
        let check = match m.verify() {
            Ok(()) => "checksums ok".to_string(),
            Err(e) => format!("CHECKSUM FAILED: {e}"),
        };
        n += 1;
        let dest = match &a.out {
            Some(dir) => {
                let p = dir.join(format!("msg-{n:06}.avp"));
                std::fs::write(&p, m.as_bytes())
                    .with_context(|| format!("write {}", p.display()))?;
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
        if check.starts_with("CHECKSUM") {
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn send(a: SendArgs) -> anyhow::Result<ExitCode> {
    let mut tx = Endpoint::connect(&a.addr, &ModelIdentity::default(), a.common.options())?;
    eprintln!("{}", tx.session().explain());
    for f in &a.files {
        let bytes = std::fs::read(f).with_context(|| format!("read {}", f.display()))?;
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
