//! `avp think --prompt TEXT --steps N --out FILE`: agent A's half of a latent
//! handoff, written to a file another process continues from with
//! `avp generate --context FILE`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use avp_wire::Envelope;

/// Arguments of `avp think`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A known model name (`avp model list`), a GGUF file or a Hugging Face directory.
    #[arg(long, default_value = "smollm2")]
    model: String,
    #[command(flatten)]
    run_on: super::RunOn,
    /// What the agent reads and thinks about.
    #[arg(long)]
    prompt: String,
    /// Latent steps after the prompt (0: prefill only).
    #[arg(long, default_value_t = 10)]
    steps: u32,
    /// Where to write the context (an AVP message).
    #[arg(long)]
    out: PathBuf,
    /// Write the Python reference's v1 format instead of v2.
    #[arg(long)]
    v1: bool,
    /// Keep only the last hidden state (a few KB) instead of the KV cache.
    #[arg(long)]
    hidden_only: bool,
    /// The KV cache's element type in the file (f16 and bf16: half the bytes).
    #[arg(long, value_enum, default_value = "f32")]
    kv_dtype: super::KvDtype,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let model = avp_cli::progress::load(&a.model, a.run_on.device, true)?;
    let started = std::time::Instant::now();
    let mut ctx = model.think(&a.prompt, a.steps, None)?;
    let took = started.elapsed();
    if a.hidden_only {
        ctx = ctx.hidden_only()?;
    }
    let envelope = Envelope {
        model_id: model.name().to_owned(),
        tokenizer_hash: model.identity().tokenizer_hash.clone(),
        ..Default::default()
    };
    if a.v1 && a.kv_dtype != super::KvDtype::F32 {
        anyhow::bail!("--v1 writes the reference's format, whose KV is f32: drop --kv-dtype");
    }
    let bytes = match a.v1 {
        true => ctx.to_v1(envelope)?,
        false => ctx.to_bytes_as(envelope, a.kv_dtype.wire())?,
    };
    std::fs::write(&a.out, &bytes).with_context(|| format!("write {}", a.out.display()))?;
    println!(
        "{}: {} positions ({} prompt tokens + {} latent steps), {} bytes, {:.0} ms, model {}",
        a.out.display(),
        ctx.seq_len(),
        ctx.prompt_tokens,
        ctx.num_steps,
        bytes.len(),
        took.as_secs_f64() * 1e3,
        &model.identity().model_hash[..12]
    );
    Ok(ExitCode::SUCCESS)
}
