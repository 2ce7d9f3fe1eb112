//! `avp bench kv`: what a narrower KV wire dtype costs in quality. For each
//! of N GSM8K test problems (the last N of the split, which no prompt here
//! was tuned on), agent A thinks about the problem; its context crosses the
//! wire as f32, f16 and bf16; agent B, greedy, answers from each. Reported
//! per dtype: bytes per cached position, the share of B's first `--tokens`
//! tokens equal (position by position) to B's answer from the f32 context,
//! how many answers match entirely, and the KL divergence of B's first
//! next-token distribution from f32's.

use avp_cli::eval::dataset::{self, Problem};
use avp_model::{Context, GenerateOptions, Model};
use avp_wire::{Envelope, Message};
use serde_json::json;

use super::KvDtype;

/// Arguments of `avp bench kv`.
#[derive(clap::Args, Debug)]
pub struct KvArgs {
    /// Model name or path.
    #[arg(long, default_value = "smollm2")]
    model: String,
    #[command(flatten)]
    run_on: super::RunOn,
    /// Print JSON lines (the default output is a table).
    #[arg(long)]
    json: bool,
    /// Problems (the last N of GSM8K's test split).
    #[arg(long, default_value_t = 20)]
    prompts: usize,
    /// B's tokens compared per problem.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// A's latent steps.
    #[arg(long, default_value_t = 10)]
    steps: u32,
    /// Wire dtypes compared with f32.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f16,bf16")]
    dtypes: Vec<KvDtype>,
}

/// What B is asked after A's context.
const QUESTION: &str = "Solve the problem step by step and give the final number.";

/// KL(p ‖ q) of the softmaxes of two logit vectors, in nats.
fn kl(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let softmax = |l: &[f32]| {
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = l.iter().map(|&x| (x as f64 - max).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|x| x / s).collect::<Vec<f64>>()
    };
    let (p, q) = (softmax(p_logits), softmax(q_logits));
    p.iter()
        .zip(&q)
        .filter(|(pi, _)| **pi > 0.0)
        .map(|(pi, qi)| pi * (pi / qi.max(1e-300)).ln())
        .sum()
}

/// B's greedy tokens and first next-token logits from `ctx`.
fn answer(model: &Model, ctx: &Context, tokens: usize) -> anyhow::Result<(Vec<u32>, Vec<f32>)> {
    let opts = GenerateOptions {
        max_tokens: tokens,
        ..GenerateOptions::default()
    };
    let g = model.generate(QUESTION, Some(ctx), &opts, |_| {})?;
    let ids = model.encode(&model.render(QUESTION)?)?;
    let mut kv = ctx
        .kv
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no KV cache"))?;
    let logits = model.forward(&ids, &mut kv)?;
    Ok((g.tokens, logits))
}

pub fn run(a: KvArgs) -> anyhow::Result<()> {
    let model = avp_cli::progress::load(&a.model, a.run_on.device, !a.json)?;
    let problems = dataset::load("gsm8k", !a.json)?;
    let take = a.prompts.min(problems.len());
    let held_out = &problems[problems.len() - take..];
    // Per dtype: agreeing tokens, compared tokens, identical answers, KL sum, bytes, positions.
    let mut sums = vec![(0usize, 0usize, 0usize, 0f64, 0u64, 0u64); a.dtypes.len()];
    let mut f32_bytes = (0u64, 0u64);
    for (n, p) in held_out.iter().enumerate() {
        let Problem::Gsm8k { question, .. } = p else {
            continue;
        };
        let ctx = model.think(question, a.steps, None)?;
        let full = ctx.to_bytes(Envelope::default())?;
        let section_bytes = |bytes: &[u8]| -> anyhow::Result<u64> {
            Ok(Message::parse(bytes)?
                .sections()
                .map(|s| s.bytes.len() as u64)
                .sum())
        };
        f32_bytes.0 += section_bytes(&full)?;
        f32_bytes.1 += ctx.seq_len() as u64;
        let (want, want_logits) = answer(&model, &Context::from_bytes(&full, &model)?, a.tokens)?;
        for (i, d) in a.dtypes.iter().enumerate() {
            let bytes = ctx.to_bytes_as(Envelope::default(), d.wire())?;
            let back = Context::from_bytes(&bytes, &model)?;
            let (got, logits) = answer(&model, &back, a.tokens)?;
            let s = &mut sums[i];
            let compared = want.len().max(got.len());
            s.0 += want.iter().zip(&got).filter(|(x, y)| x == y).count();
            s.1 += compared;
            s.2 += usize::from(want == got);
            s.3 += kl(&want_logits, &logits);
            s.4 += section_bytes(&bytes)?;
            s.5 += ctx.seq_len() as u64;
        }
        if !a.json {
            eprintln!("problem {}/{take}", n + 1);
        }
    }
    let per_pos = |b: u64, p: u64| b as f64 / p.max(1) as f64;
    let f32_pp = per_pos(f32_bytes.0, f32_bytes.1);
    for (d, s) in a.dtypes.iter().zip(&sums) {
        let row = json!({
            "bench": "kv_dtype",
            "model": a.model,
            "dtype": d.name(),
            "prompts": take,
            "tokens": a.tokens,
            "bytes_per_position": per_pos(s.4, s.5),
            "bytes_over_f32": (per_pos(s.4, s.5) / f32_pp * 1000.0).round() / 1000.0,
            "greedy_agreement": (s.0 as f64 / s.1.max(1) as f64 * 1000.0).round() / 1000.0,
            "identical_answers": s.2,
            "next_token_kl_mean": s.3 / take.max(1) as f64,
        });
        if a.json {
            println!("{row}");
        } else {
            println!(
                "{:>5} {:>8.0} B/position ({:.3}× f32)  greedy agreement {:.3}  identical {}/{}  KL {:.2e}",
                d.name(),
                per_pos(s.4, s.5),
                row["bytes_over_f32"].as_f64().unwrap_or(0.0),
                row["greedy_agreement"].as_f64().unwrap_or(0.0),
                s.2,
                take,
                row["next_token_kl_mean"].as_f64().unwrap_or(0.0),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::kl;

    #[test]
    fn kl_is_zero_for_equal_logits_and_positive_otherwise() {
        let a = [1.0f32, 2.0, 3.0];
        assert!(kl(&a, &a).abs() < 1e-12);
        assert!(kl(&a, &[3.0, 2.0, 1.0]) > 0.1);
        // Shifting every logit changes nothing.
        assert!(kl(&a, &[11.0, 12.0, 13.0]).abs() < 1e-9);
    }
}
