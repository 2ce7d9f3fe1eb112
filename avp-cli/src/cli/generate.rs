//! `avp generate --prompt TEXT [--context FILE]`: run the model (continuing from a
//! context another agent wrote, if given) and stream its answer.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use avp_model::{Context, GenerateOptions, SamplingOptions};

/// Arguments of `avp generate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A known model name (`avp model list`), a GGUF file or a Hugging Face directory.
    #[arg(long, default_value = "smollm2")]
    model: String,
    #[command(flatten)]
    run_on: super::RunOn,
    /// The user's message (or the raw text with --raw).
    #[arg(long)]
    prompt: String,
    /// Continue from this context (an AVP message written by `avp think --out`).
    #[arg(long)]
    context: Option<PathBuf>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy; higher samples more freely.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the answer contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Feed the prompt as it is instead of through the model's chat template.
    #[arg(long)]
    raw: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let model = avp_cli::progress::load(&a.model, a.run_on.device, true)?;
    let context = match &a.context {
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
            let ctx = Context::from_bytes(&bytes, &model)
                .with_context(|| format!("context {}", path.display()))?;
            tracing::info!(
                positions = ctx.seq_len(),
                steps = ctx.num_steps,
                "continuing from {}",
                path.display()
            );
            Some(ctx)
        }
        None => None,
    };
    let options = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling: SamplingOptions {
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
        },
        stop: a.stop,
        raw: a.raw,
    };
    let mut stdout = std::io::stdout();
    model.generate(&a.prompt, context.as_ref(), &options, |t| {
        let _ = write!(stdout, "{t}");
        let _ = stdout.flush();
    })?;
    println!();
    Ok(ExitCode::SUCCESS)
}
