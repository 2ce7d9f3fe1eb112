//! `avp generate --prompt TEXT`: run the model and stream its answer.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use avp_model::chat::{ChatMessage, render};
use avp_model::{Decoder, GgufFile, KvCache, Sampler, SamplingOptions, fetch};

/// Arguments of `avp generate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A known model name (`avp model list`) or the path of a GGUF file.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// The user's message (or the raw text with --raw).
    #[arg(long)]
    prompt: String,
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
    /// Feed the prompt as it is instead of through the model's chat template.
    #[arg(long)]
    raw: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let path = if Path::new(&a.model).is_file() {
        a.model.clone().into()
    } else {
        fetch::fetch(fetch::spec(&a.model)?, true)?
    };
    let g = GgufFile::open(&path).with_context(|| format!("open {}", path.display()))?;
    let tok = avp_model::tokenizer::from_gguf(&g)?;
    let model = Decoder::load(&g)?;
    let text = if a.raw {
        a.prompt.clone()
    } else {
        let template = g
            .get("tokenizer.chat_template")?
            .as_str()
            .context("tokenizer.chat_template is not a string")?;
        render(template, &[ChatMessage::user(a.prompt.clone())], true)?
    };
    let ids = tok
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenize: {e}"))?;
    let eos = g
        .get("tokenizer.ggml.eos_token_id")?
        .as_u64()
        .unwrap_or(u64::MAX) as u32;
    let mut sampler = Sampler::new(SamplingOptions {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    });
    let mut out: Vec<u32> = Vec::new();
    let mut shown = 0;
    let mut stdout = std::io::stdout();
    model.generate(
        ids.get_ids(),
        &mut KvCache::default(),
        a.max_tokens,
        &[eos],
        &mut sampler,
        |t| {
            out.push(t);
            // Print what the tokens so far decode to beyond what is already shown.
            if let Ok(s) = tok.decode(&out, true)
                && s.len() > shown
                && s.is_char_boundary(shown)
            {
                let _ = write!(stdout, "{}", &s[shown..]);
                let _ = stdout.flush();
                shown = s.len();
            }
            true
        },
    )?;
    println!();
    Ok(ExitCode::SUCCESS)
}
