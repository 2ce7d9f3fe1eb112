//! `avp demo`: the product's claim on a real model. Two agent processes (a
//! researcher and a solver) handshake; the researcher thinks on a task and its KV
//! cache moves to the solver over the transport the handshake chose; the solver
//! answers. The same task then runs as a text chain and as a single agent, and a
//! side-by-side table shows what each cost.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, bail};
use avp_cli::pipeline::agent::{ResearcherReport, SolverReport, ms};
use avp_cli::pipeline::{FINAL_ANSWER, Mode, direct_prompt};
use avp_model::{GenerateOptions, Model};
use serde_json::{Value, json};

/// A GSM8K training problem (the reference's benchmark family).
const DEFAULT_TASK: &str = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?";

/// Arguments of `avp demo`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// How the agents reach each other (shm: shared memory; tcp: loopback TCP;
    /// cuda: shared memory with the KV cache in GPU memory, device to device;
    /// rdma: RDMA writes over loopback, with `--rdma-device`; http: the Python
    /// reference's HTTP binding over loopback).
    /// Default: cuda for a model on a GPU (`--device cuda`), else shm.
    #[arg(long, value_enum)]
    transport: Option<Transport>,
    /// The device a `cuda` transport's messages use: `cuda:N` (default: the
    /// model's GPU) or `emulated` (host memory standing in for a GPU: the
    /// protocol without one, reported as such).
    #[arg(long)]
    transport_device: Option<avp_transport::Device>,
    /// The RDMA device of `--transport rdma`: verbs, verbs:NAME, or emulated
    /// (the software device: the protocol without an RDMA NIC, reported as such).
    #[arg(long)]
    rdma_device: Option<avp_transport::RdmaDevice>,
    /// The researcher's latent steps.
    #[arg(long, default_value_t = 10)]
    steps: u32,
    /// The KV cache's element type on the wire (f16 and bf16: half the bytes).
    #[arg(long, value_enum, default_value = "f32")]
    kv_dtype: super::KvDtype,
    /// Model name or path (GGUF file or Hugging Face directory).
    #[arg(long, default_value = "smollm2")]
    model: String,
    #[command(flatten)]
    run_on: super::RunOn,
    /// The researcher's model, when it differs from the solver's (`--model`): the
    /// handshake then negotiates a cross-model projection or the JSON fallback.
    #[arg(long)]
    source_model: Option<String>,
    /// Drop a cross-model context that fails the quality gate.
    #[arg(long)]
    enforce_quality: bool,
    /// The task.
    #[arg(long, default_value = DEFAULT_TASK)]
    prompt: String,
    /// Most tokens each agent generates.
    #[arg(long, default_value_t = 96)]
    max_tokens: usize,
    /// One JSON object per mode instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Transport {
    Shm,
    Tcp,
    Cuda,
    Rdma,
    Http,
}

impl Args {
    fn transport(&self) -> Transport {
        match (self.transport, self.run_on.device) {
            (Some(t), _) => t,
            (None, avp_model::Device::Cuda(_)) => Transport::Cuda,
            (None, avp_model::Device::Cpu) => Transport::Shm,
        }
    }
}

struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Agent {
    fn spawn(args: &[String]) -> anyhow::Result<Agent> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("agent")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("start an agent process")?;
        let stdin = child.stdin.take();
        let lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        Ok(Agent {
            child,
            stdin,
            lines,
        })
    }

    /// The rest of the first line starting with `tag`.
    fn expect(&mut self, tag: &str) -> anyhow::Result<String> {
        for line in self.lines.by_ref() {
            if let Some(rest) = line?.strip_prefix(tag) {
                return Ok(rest.trim().to_owned());
            }
        }
        let status = self.child.wait()?;
        bail!("an agent process ended ({status}) before printing {tag}")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// One mode's row of the table.
fn pipeline(a: &Args, mode: Mode) -> anyhow::Result<Value> {
    let name = format!("avp-demo-{}-{}", std::process::id(), mode.name());
    let addr = match a.transport() {
        Transport::Shm => format!("shm://{name}"),
        Transport::Tcp => "tcp://127.0.0.1:0".into(),
        Transport::Cuda => format!("cuda://{name}"),
        Transport::Rdma => "rdma://127.0.0.1:0".into(),
        Transport::Http => "http://127.0.0.1:0".into(),
    };
    let mut common = vec![
        "--mode".into(),
        mode.name().into(),
        "--task".into(),
        a.prompt.clone(),
        "--steps".into(),
        a.steps.to_string(),
        "--max-tokens".into(),
        a.max_tokens.to_string(),
        "--device".into(),
        a.run_on.device.to_string(),
    ];
    if a.transport() == Transport::Tcp {
        common.push("--no-shm-upgrade".into());
    }
    if let Some(d) = a.transport_device {
        common.extend(["--transport-device".into(), d.to_string()]);
    }
    if let Some(d) = &a.rdma_device {
        common.extend(["--rdma-device".into(), d.to_string()]);
    }
    common.extend(["--kv-dtype".into(), a.kv_dtype.name().into()]);
    if a.enforce_quality {
        common.push("--enforce-quality".into());
    }
    let with = |role: &str, addr: &str| {
        let model = match role {
            "researcher" => a.source_model.as_ref().unwrap_or(&a.model),
            _ => &a.model,
        };
        let mut v = vec![
            role.to_owned(),
            "--addr".into(),
            addr.to_owned(),
            "--model".into(),
            model.clone(),
        ];
        v.extend(common.iter().cloned());
        v
    };
    let mut solver = Agent::spawn(&with("solver", &addr))?;
    let bound = solver.expect("READY")?;
    let mut researcher = Agent::spawn(&with("researcher", &bound))?;
    researcher.expect("READY")?;
    writeln!(researcher.stdin.as_mut().expect("piped"), "go")?;
    let r: Value = serde_json::from_str(&researcher.expect("RESULT")?)?;
    let s: Value = serde_json::from_str(&solver.expect("RESULT")?)?;
    let rr: ResearcherReport = serde_json::from_value(r.clone())?;
    let sr: SolverReport = serde_json::from_value(s.clone())?;
    let span = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1e6;
    Ok(json!({
        "mode": mode.name(),
        "answer": sr.answer,
        "a_prompt_tokens": rr.prompt_tokens,
        "a_generated_tokens": rr.generated_tokens,
        "a_latent_steps": rr.latent_steps,
        "b_prefilled_tokens": sr.prefilled,
        "b_reused_positions": sr.reused,
        "b_generated_tokens": sr.generated_tokens,
        "payload": sr.payload,
        "bytes_moved": rr.bytes,
        "kv_dtype": a.kv_dtype.name(),
        "a_work_ms": rr.work_ms,
        "handoff_ms": span(rr.t_send_ns, sr.t_recv_ns),
        "b_ttft_ms": sr.ttft_ms,
        "end_to_end_ms": span(rr.t_start_ns, sr.t_done_ns),
        "transport": r["transport"],
        "transport_reason": r["transport_reason"],
        "negotiated_mode": r["mode"],
        "mode_path": r["mode_path"],
        "mode_reason": r["mode_reason"],
        "sent": rr.sent,
        "quality": sr.quality,
        "source_top_token": sr.source_top_token,
        "researcher_model": a.source_model.as_ref().unwrap_or(&a.model),
        "solver_model": a.model,
        "session": s["session"],
        "kv_on_device": sr.on_device,
        "host_device_bytes": rr.host_device_bytes + sr.host_device_bytes,
        "device_to_device_bytes": rr.device_to_device_bytes + sr.device_to_device_bytes,
    }))
}

fn direct(a: &Args) -> anyhow::Result<Value> {
    let model = Model::load_on(&a.model, a.run_on.device)?;
    let started = Instant::now();
    let options = GenerateOptions {
        max_tokens: a.max_tokens,
        ..Default::default()
    };
    let g = model.generate(
        &direct_prompt(&a.prompt, FINAL_ANSWER),
        None,
        &options,
        |_| {},
    )?;
    Ok(json!({
        "mode": "direct",
        "answer": g.text,
        "a_prompt_tokens": 0,
        "a_generated_tokens": 0,
        "a_latent_steps": 0,
        "b_prefilled_tokens": g.prefilled,
        "b_reused_positions": 0,
        "b_generated_tokens": g.tokens.len(),
        "payload": "none",
        "bytes_moved": 0,
        "a_work_ms": 0.0,
        "handoff_ms": 0.0,
        "b_ttft_ms": ms(g.time_to_first_token),
        "end_to_end_ms": ms(started.elapsed()),
        "transport": "none",
        "transport_reason": "one agent",
        "negotiated_mode": "direct",
        "mode_path": "",
        "mode_reason": "one agent",
        "sent": "none",
        "quality": null,
        "source_top_token": null,
        "researcher_model": "",
        "solver_model": a.model,
        "session": "",
        "kv_on_device": false,
        "host_device_bytes": 0,
        "device_to_device_bytes": 0,
    }))
}

pub fn run(a: Args) -> anyhow::Result<std::process::ExitCode> {
    // A device that cannot run here fails now, not as an agent's error later.
    a.run_on.device.check()?;
    if a.transport() == Transport::Cuda
        && a.transport_device.is_none()
        && a.run_on.device == avp_model::Device::Cpu
    {
        anyhow::bail!(
            "--transport cuda with a model on the CPU needs --transport-device: cuda:N, or \
             emulated to run the protocol in host memory"
        );
    }
    // Fetch (with a progress bar) before the agents start.
    for name in a.source_model.iter().chain([&a.model]) {
        let path = avp_model::fetch::spec(name)
            .ok()
            .map(|s| avp_cli::progress::fetch(s, !a.json))
            .transpose()?;
        if !a.json {
            eprintln!(
                "model {name} ({})",
                path.map_or(name.clone(), |p| p.display().to_string()),
            );
        }
    }
    if !a.json {
        eprintln!("task: {}", a.prompt);
    }
    let mut rows = Vec::new();
    for mode in [Mode::Latent, Mode::Text] {
        if !a.json {
            eprintln!("running the {} pipeline ...", mode.name());
        }
        rows.push(pipeline(&a, mode)?);
    }
    if !a.json {
        eprintln!("running the direct (single agent) baseline ...");
    }
    rows.push(direct(&a)?);
    if a.json {
        for r in &rows {
            let mut line = json!({"bench": "demo", "steps": a.steps});
            for (k, v) in r.as_object().expect("an object") {
                line[k] = v.clone();
            }
            println!("{line}");
        }
    } else {
        print_table(&rows);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn print_table(rows: &[Value]) {
    let cell = |r: &Value, k: &str| -> String {
        match &r[k] {
            Value::String(s) => s.clone(),
            Value::Number(n) if n.is_f64() => format!("{:.1}", n.as_f64().unwrap_or(0.0)),
            v => v.to_string(),
        }
    };
    let fields: [(&str, &str); 15] = [
        ("answer", "answer"),
        ("negotiated mode", "negotiated_mode"),
        ("A sent", "sent"),
        ("A: tokens generated", "a_generated_tokens"),
        ("A: latent steps", "a_latent_steps"),
        ("B: tokens prefilled", "b_prefilled_tokens"),
        ("B: positions reused", "b_reused_positions"),
        ("payload", "payload"),
        ("bytes moved", "bytes_moved"),
        ("handoff (ms)", "handoff_ms"),
        ("B: time to 1st token (ms)", "b_ttft_ms"),
        ("end to end (ms)", "end_to_end_ms"),
        ("B: tokens generated", "b_generated_tokens"),
        ("transport", "transport"),
        ("host<->device bytes", "host_device_bytes"),
    ];
    let width = 34;
    print!("{:<27}", "");
    for r in rows {
        print!(" | {:<width$}", cell(r, "mode"));
    }
    println!();
    println!("{}", "-".repeat(27 + rows.len() * (width + 3)));
    for (label, key) in fields {
        print!("{label:<27}");
        for r in rows {
            let mut c = cell(r, key).replace('\n', " ");
            if c.chars().count() > width {
                c = c.chars().take(width - 1).collect::<String>() + "…";
            }
            print!(" | {c:<width$}");
        }
        println!();
    }
    println!();
    for r in rows {
        println!("{} answer: {}", cell(r, "mode"), cell(r, "answer"));
    }
    for r in rows.iter().filter(|r| r["session"] != "") {
        println!("{} session: {}", cell(r, "mode"), cell(r, "session"));
    }
    if let Some(r) = rows.iter().find(|r| r["mode"] == "latent") {
        println!(
            "negotiated: {} ({}: {}); researcher {}, solver {}",
            cell(r, "negotiated_mode"),
            cell(r, "mode_path"),
            cell(r, "mode_reason"),
            cell(r, "researcher_model"),
            cell(r, "solver_model")
        );
        if let Value::Object(q) = &r["quality"] {
            println!(
                "cross-model quality gate: {} (next-token cosine {:.3}, source's top token {})",
                q["reason"].as_str().unwrap_or(""),
                q["next_token_cosine"].as_f64().unwrap_or(0.0),
                r["source_top_token"]
            );
        }
    }
}
