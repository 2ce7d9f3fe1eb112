//! `avp eval --task gsm8k|humaneval --n N --mode direct|latent|text|all`: accuracy,
//! tokens and wall time of the two-agent pipeline on real tasks.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use avp_cli::eval::{self, EvalOptions, dataset};
use avp_cli::pipeline::Mode;
use serde_json::json;

/// Arguments of `avp eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The task.
    #[arg(long, value_parser = ["gsm8k", "humaneval"])]
    task: String,
    /// Problems to run (a seeded random subset of the test set).
    #[arg(long, default_value_t = 10)]
    n: usize,
    /// Model name or path.
    #[arg(long, default_value = "smollm2")]
    model: String,
    #[command(flatten)]
    run_on: super::RunOn,
    /// The researcher's model, when it differs from the solver's (`--model`):
    /// latent mode is then the cross-model handoff.
    #[arg(long)]
    source_model: Option<String>,
    /// Which pipelines to run.
    #[arg(long, value_enum, default_value = "all")]
    mode: EvalMode,
    /// Seed of the subset (and of sampling when --temperature > 0).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The researcher's latent steps.
    #[arg(long, default_value_t = 10)]
    steps: u32,
    /// Most tokens per generation.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Python that runs HumanEval's tests.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Seconds each HumanEval program may run.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// JSON lines: one per problem and mode, then one summary per mode.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum EvalMode {
    Direct,
    Latent,
    Text,
    All,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let model = avp_cli::progress::load(&a.model, a.run_on.device, !a.json)
        .with_context(|| format!("load {}", a.model))?;
    let source = a
        .source_model
        .as_ref()
        .map(|m| avp_cli::progress::load(m, a.run_on.device, !a.json))
        .transpose()?;
    let agents = eval::Agents::new(source.as_ref().unwrap_or(&model), &model);
    let pair = match &source {
        Some(s) => format!("{} -> {}", s.name(), model.name()),
        None => model.name().to_owned(),
    };
    let problems = eval::subset(dataset::load(&a.task, !a.json)?, a.n, a.seed);
    let modes: Vec<Mode> = match a.mode {
        EvalMode::Direct => vec![Mode::Direct],
        EvalMode::Latent => vec![Mode::Latent],
        EvalMode::Text => vec![Mode::Text],
        EvalMode::All => vec![Mode::Direct, Mode::Latent, Mode::Text],
    };
    let o = EvalOptions {
        n: a.n,
        seed: a.seed,
        steps: a.steps,
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        python: a.python.clone(),
        timeout: Duration::from_secs_f64(a.timeout),
    };
    let ids: Vec<String> = problems.iter().map(|p| p.id()).collect();
    if !a.json {
        eprintln!(
            "{} on {} problems of {} (seed {}): {}",
            pair,
            problems.len(),
            a.task,
            a.seed,
            ids.join(", ")
        );
    }
    let mut outcomes = Vec::new();
    for p in &problems {
        for &mode in &modes {
            let out = eval::run_one(&agents, p, mode, &o)?;
            if a.json {
                let mut v = serde_json::to_value(&out)?;
                v["bench"] = "eval".into();
                v["task"] = a.task.clone().into();
                println!("{v}");
            } else {
                eprintln!(
                    "  {:<14} {:<6} {:<13} {} ({} tokens, {:.1} s)",
                    out.id,
                    mode.name(),
                    out.handoff,
                    if out.correct { "correct" } else { "wrong" },
                    out.generated_tokens,
                    out.wall_ms / 1e3
                );
            }
            outcomes.push(out);
        }
    }
    let summaries: Vec<_> = modes
        .iter()
        .map(|&m| eval::summarize(m, &outcomes))
        .collect();
    if a.json {
        for s in &summaries {
            let mut v = serde_json::to_value(s)?;
            for (k, x) in [
                ("bench", json!("eval_summary")),
                ("task", json!(a.task)),
                ("model", json!(model.name())),
                ("source_model", json!(source.as_ref().map(|s| s.name()))),
                (
                    "shared_tokens",
                    json!(agents.map.as_ref().map(|m| m.overlap_count())),
                ),
                ("seed", json!(a.seed)),
                ("steps", json!(a.steps)),
                ("ids", json!(ids)),
            ] {
                v[k] = x;
            }
            println!("{v}");
        }
    } else {
        println!(
            "{} · {} · n={} · seed {} · latent steps {} · max tokens {}",
            a.task,
            pair,
            problems.len(),
            a.seed,
            a.steps,
            a.max_tokens
        );
        println!(
            "{:<8} {:>9} {:>9} {:>15} {:>15} {:>12}",
            "mode", "correct", "accuracy", "gen tokens/pb", "prefill/pb", "wall s/pb"
        );
        for s in &summaries {
            println!(
                "{:<8} {:>9} {:>8.1}% {:>15.1} {:>15.1} {:>12.2}",
                s.mode.name(),
                format!("{}/{}", s.correct, s.n),
                s.accuracy * 100.0,
                s.mean_generated_tokens,
                s.mean_prefilled_tokens,
                s.mean_wall_ms / 1e3
            );
        }
        println!("problems: {}", ids.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
