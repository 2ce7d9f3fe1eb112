//! `avp agent researcher|solver`: one agent of the two-agent pipeline as its own
//! process (spawned by `avp demo`). It prints `READY …` once loaded and connected,
//! then one `RESULT {json}` line.
//!
//! The researcher waits for a line on stdin before it starts, so the demo measures
//! the work, not model loading.

use std::io::BufRead;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use avp_cli::pipeline::{Mode, agent};
use avp_model::Model;
use avp_model::crossmodel::CrossOptions;
use avp_model::project::MapCache;
use avp_model::quality::QualityGate;
use avp_transport::{DeviceOptions, Endpoint, Options, ShmOptions, TcpOptions};
use avp_wire::MapLookup;

/// Arguments of `avp agent`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Which agent.
    #[arg(value_enum)]
    role: Role,
    /// The solver listens here; the researcher connects here.
    #[arg(long)]
    addr: String,
    /// How the solver learns what the researcher found.
    #[arg(long, value_enum, default_value = "latent")]
    mode: Mode,
    /// The task.
    #[arg(long)]
    task: String,
    /// Model name or path.
    #[arg(long, default_value = "smollm2")]
    model: String,
    #[command(flatten)]
    run_on: super::RunOn,
    /// The researcher's latent steps.
    #[arg(long, default_value_t = 10)]
    steps: u32,
    /// Most tokens each agent generates.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// The device a `cuda://` session's messages use: `cuda:N` (default: the
    /// model's GPU) or `emulated` (host memory standing in for a GPU).
    #[arg(long)]
    transport_device: Option<avp_transport::Device>,
    /// Stay on TCP even on one host.
    #[arg(long)]
    no_shm_upgrade: bool,
    /// The KV cache's element type on the wire (researcher).
    #[arg(long, value_enum, default_value = "f32")]
    kv_dtype: super::KvDtype,
    /// The RDMA device of an `rdma://` session: verbs, verbs:NAME, or emulated
    /// (the software device: the protocol on one host, reported as such).
    #[arg(long)]
    rdma_device: Option<avp_transport::RdmaDevice>,
    /// Drop a cross-model context that fails the quality gate (the solver then
    /// answers from its prompt alone) instead of using it with a warning.
    #[arg(long)]
    enforce_quality: bool,
    /// Seconds to wait for the peer.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
}

/// The two roles.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Role {
    Researcher,
    Solver,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let model =
        Model::load_on(&a.model, a.run_on.device).with_context(|| format!("load {}", a.model))?;
    let timeout = Duration::from_secs_f64(a.timeout);
    // The vocabulary lets the handshake find a cross-model path to another model;
    // cached maps let it skip the exchange.
    let vocabulary = Some(Arc::new(model.vocabulary()));
    let maps: Arc<dyn MapLookup> = Arc::new(MapCache(avp_model::fetch::cache_dir()));
    // A model on a GPU hands its KV cache over from device memory.
    let transport_device = a.transport_device.or(match model.device() {
        avp_model::Device::Cuda(n) => Some(avp_transport::Device::Cuda(n as u32)),
        avp_model::Device::Cpu => None,
    });
    let options = |agent: &str| {
        let mut o = Options::default()
            .agent_id(agent)
            .maps(maps.clone())
            .connect_timeout(timeout)
            .shm(ShmOptions::default().loan_timeout(timeout))
            .tcp(TcpOptions::default().shm_upgrade(!a.no_shm_upgrade));
        o.vocabulary = vocabulary.clone();
        o.rdma.device = a.rdma_device.clone();
        o.rdma.loan_timeout = timeout;
        match transport_device {
            Some(d) => o.device(DeviceOptions::new(d)),
            None => o,
        }
    };
    match a.role {
        Role::Solver => {
            let listener = Endpoint::bind(&a.addr, model.identity(), options("solver"))?;
            println!("READY {}", listener.local_addr());
            let rx = listener.accept(timeout)?;
            let session = rx.session().explain();
            let cross = CrossOptions {
                gate: QualityGate {
                    enforce: a.enforce_quality,
                    ..QualityGate::default()
                },
                ..CrossOptions::default()
            };
            let report = agent::solve(&model, &rx, &a.task, a.max_tokens, timeout, &cross)?;
            let mut v = serde_json::to_value(&report)?;
            v["session"] = session.into();
            println!("RESULT {v}");
        }
        Role::Researcher => {
            let mut tx = Endpoint::connect(&a.addr, model.identity(), options("researcher"))?;
            let session = tx.session().clone();
            println!("READY {}", session.explain());
            let mut go = String::new();
            std::io::stdin().lock().read_line(&mut go)?;
            let report = agent::research(
                &model,
                &mut tx,
                a.mode,
                &a.task,
                a.steps,
                a.max_tokens,
                a.kv_dtype.wire(),
            )?;
            let mut v = serde_json::to_value(&report)?;
            v["session"] = session.explain().into();
            v["transport"] = session.transport.name().into();
            v["transport_reason"] = session.transport_reason.clone().into();
            v["mode"] = session.mode.to_string().into();
            v["mode_path"] = session.path.to_string().into();
            v["mode_reason"] = session.mode_reason.clone().into();
            println!("RESULT {v}");
            // Stay until the solver has the message (it closes the session).
            let _ = std::io::stdin().lock().read_line(&mut go);
        }
    }
    Ok(ExitCode::SUCCESS)
}
