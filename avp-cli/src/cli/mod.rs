//! Subcommands of the `avp` binary.

mod agent;
mod bench;
mod bench_baseline;
mod bench_device;
mod bench_kv;
mod bench_model;
mod bench_report;
mod bench_transport;
mod demo;
mod eval;
mod generate;
mod inspect;
mod model;
mod think;
mod transfer;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `--device` of the commands that load a model.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct RunOn {
    /// Where the model runs: cpu, cuda or cuda:N (cuda needs a build with the `cuda`
    /// feature and an NVIDIA driver).
    #[arg(long, env = "AVP_DEVICE", default_value = "cpu")]
    pub device: avp_model::Device,
}

/// The element type a KV cache travels in (the model computes in f32).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// 4 bytes per value, exactly what the model holds.
    #[default]
    F32,
    /// 2 bytes per value (IEEE half precision), converted as it is written.
    F16,
    /// 2 bytes per value (bfloat16: f32's range, 8 bits of mantissa).
    Bf16,
}

impl KvDtype {
    /// As avp-wire names it.
    pub fn wire(self) -> avp_wire::DType {
        match self {
            KvDtype::F32 => avp_wire::DType::F32,
            KvDtype::F16 => avp_wire::DType::F16,
            KvDtype::Bf16 => avp_wire::DType::Bf16,
        }
    }

    /// As the command line names it.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Bf16 => "bf16",
        }
    }
}

/// Agent Vector Protocol: move KV caches and hidden states between agents.
#[derive(Parser, Debug)]
#[command(name = "avp", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The main job: a researcher and a solver agent hand off a task as KV cache
    /// (latent), as text, and a single agent answers alone; prints the comparison.
    Demo(demo::Args),
    /// Accuracy, tokens and time of the pipeline on GSM8K or HumanEval, per mode.
    Eval(eval::Args),
    /// One agent of the demo's pipeline as its own process (used by `avp demo`).
    #[command(hide = true)]
    Agent(agent::Args),
    /// Summarize a v1 or v2 message file and verify its checksums (exit 1 if malformed).
    Inspect(inspect::Args),
    /// Receive messages at ADDR and write each to a file.
    Recv(transfer::RecvArgs),
    /// Send message files to ADDR.
    Send(transfer::SendArgs),
    /// Run the model on a prompt (optionally continuing from a context file) and
    /// stream the answer.
    Generate(generate::Args),
    /// Read a prompt, think N latent steps, and write the context to a file.
    Think(think::Args),
    /// Fetch and list models.
    #[command(subcommand)]
    Model(model::Model),
    /// Run benchmarks.
    #[command(subcommand)]
    Bench(bench::Bench),
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Agent(a) => agent::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Bench(b) => bench::run(b),
        Command::Recv(a) => transfer::recv(a),
        Command::Model(m) => model::run(m),
        Command::Generate(a) => generate::run(a),
        Command::Think(a) => think::run(a),
        Command::Send(a) => transfer::send(a),
    }
}
