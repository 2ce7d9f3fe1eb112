//! `avp bench model --json`: the decoder's speed (prefill, decode, one latent step)
//! and the handoff claim: agent B's time to first token when it receives A's KV
//! cache over shared memory, against re-reading A's text.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use avp_cli::pipeline::agent::ms;
use avp_model::{Context, GenerateOptions, KvCache, Model};
use avp_transport::{Endpoint, Options};
use avp_wire::Envelope;
use serde_json::json;

/// Arguments of `avp bench model`.
#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// Model name or path.
    #[arg(long, default_value = "smollm2")]
    model: String,
    #[command(flatten)]
    run_on: super::RunOn,
    /// Print JSON lines (the default output is a table).
    #[arg(long)]
    json: bool,
    /// Context lengths (tokens) for the handoff comparison.
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    contexts: Vec<usize>,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// A Python with torch and transformers: also measure Hugging Face
    /// transformers (CPU, f32) on the same GGUF and workload
    /// (`benches/transformers_decode.py`; `scripts/bench-transformers` sets one up).
    #[arg(long)]
    python: Option<String>,
}

/// Text agent A has read: real prose, repeated to any length.
const PASSAGE: &str = "The harbour town woke before dawn. Fishermen checked their nets by lantern light while the baker pulled the first loaves from the oven, and the smell of bread drifted down to the water. By six the market square was full: farmers with crates of apples and cabbages, a cheesemaker arguing about the price of salt, children weaving between the stalls. The mayor, who had promised a new sea wall before the winter storms, walked through the crowd shaking hands and counting, in his head, the votes he still needed. ";

const QUESTION: &str = "In one sentence, what is the town worried about?";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn context_tokens(model: &Model, n: usize) -> anyhow::Result<Vec<u32>> {
    let one = model.encode(PASSAGE)?;
    Ok(one.iter().copied().cycle().take(n).collect())
}

pub fn run(a: ModelArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.python.is_none() || a.run_on.device == avp_model::Device::Cpu,
        "--python compares with transformers on the CPU; it needs --device cpu, not {}",
        a.run_on.device
    );
    let model = avp_cli::progress::load(&a.model, a.run_on.device, !a.json)
        .with_context(|| format!("load {}", a.model))?;
    let reps = a.reps.max(1);

    // Prefill: 128 tokens into an empty cache.
    let prompt = context_tokens(&model, 128)?;
    let prefill = median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                model
                    .forward(&prompt, &mut KvCache::default())
                    .map(|_| ms(t.elapsed()))
            })
            .collect::<Result<_, _>>()?,
    );
    // Decode: 32 tokens after that prompt, one at a time.
    let decode_n = 32;
    let decode = median(
        (0..reps)
            .map(|_| -> anyhow::Result<f64> {
                let mut cache = KvCache::default();
                model.forward(&prompt, &mut cache)?;
                let t = Instant::now();
                let mut next = prompt[0];
                for _ in 0..decode_n {
                    let logits = model.forward(&[next], &mut cache)?;
                    next = argmax(&logits);
                }
                Ok(ms(t.elapsed()))
            })
            .collect::<Result<_, _>>()?,
    );
    // One latent step: think with 10 steps minus think with none, per step.
    let steps = 10;
    let latent = median(
        (0..reps)
            .map(|_| -> anyhow::Result<f64> {
                let t = Instant::now();
                model.think_tokens(&prompt, 0, None)?;
                let zero = t.elapsed();
                let t = Instant::now();
                model.think_tokens(&prompt, steps, None)?;
                Ok(ms(t.elapsed().saturating_sub(zero)) / steps as f64)
            })
            .collect::<Result<_, _>>()?,
    );
    let line = json!({
        "bench": "model",
        "model": model.name(),
        "device": a.run_on.device.to_string(),
        "prefill_tokens": prompt.len(),
        "prefill_tok_s": prompt.len() as f64 / (prefill / 1e3),
        "decode_tok_s": decode_n as f64 / (decode / 1e3),
        "latent_step_ms": latent,
    });
    emit(&a, &line);
    if let Some(python) = &a.python {
        let reference = transformers(&a, python, reps)?;
        emit(&a, &reference);
        let ratio =
            |k: &str| line[k].as_f64().unwrap_or(0.0) / reference[k].as_f64().unwrap_or(f64::NAN);
        emit(
            &a,
            &json!({
                "bench": "model_vs_transformers",
                "model": model.name(),
                "decode_ratio": ratio("decode_tok_s"),
                "prefill_ratio": ratio("prefill_tok_s"),
            }),
        );
    }

    for &n in &a.contexts {
        let (latent_ms, text_ms, bytes) = handoff(&model, n, reps)?;
        emit(
            &a,
            &json!({
                "bench": "handoff",
                "model": model.name(),
                "device": a.run_on.device.to_string(),
                "context_tokens": n,
                "transport": "shm",
                "kv_bytes": bytes,
                "ttft_latent_ms": latent_ms,
                "ttft_text_ms": text_ms,
                "speedup": text_ms / latent_ms,
            }),
        );
    }
    Ok(())
}

/// Run `benches/transformers_decode.py` on the model's GGUF file with `python`.
fn transformers(a: &ModelArgs, python: &str, reps: usize) -> anyhow::Result<serde_json::Value> {
    let path = match avp_model::fetch::spec(&a.model) {
        Ok(spec) => avp_model::fetch::fetch(spec)?,
        Err(_) => std::path::PathBuf::from(&a.model),
    };
    anyhow::ensure!(
        path.is_file(),
        "the transformers comparison needs a GGUF file, {} is not one",
        path.display()
    );
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../benches/transformers_decode.py"
    );
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(&path)
        .args(["--reps", &reps.to_string()])
        .output()
        .with_context(|| format!("run {python}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{python} {script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = String::from_utf8(out.stdout)?
        .lines()
        .last()
        .map(str::to_owned)
        .context("the transformers script printed nothing")?;
    let mut v: serde_json::Value = serde_json::from_str(&last)?;
    v["model"] = json!(a.model);
    Ok(v)
}

fn emit(a: &ModelArgs, line: &serde_json::Value) {
    if a.json {
        println!("{line}");
    } else {
        let fields: Vec<String> = line
            .as_object()
            .expect("an object")
            .iter()
            .map(|(k, v)| match v.as_f64() {
                Some(f) if v.is_f64() => format!("{k}={f:.2}"),
                _ => format!("{k}={v}"),
            })
            .collect();
        println!("{}", fields.join("  "));
    }
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len())
        .max_by(|&a, &b| v[a].total_cmp(&v[b]))
        .unwrap_or(0) as u32
}

/// B's time to first token for an `n`-token context: from A sending its KV cache
/// over shared memory (received, validated, decoded, then B's question prefilled),
/// and from B re-reading the same `n` tokens as text with the question.
fn handoff(model: &Model, n: usize, reps: usize) -> anyhow::Result<(f64, f64, u64)> {
    let tokens = context_tokens(model, n)?;
    let question = model.encode(&model.render(QUESTION)?)?;
    let one = GenerateOptions {
        max_tokens: 1,
        ..Default::default()
    };
    let ctx = model.think_tokens(&tokens, 0, None)?;
    let addr = format!("shm://avp-bench-model-{}-{n}", std::process::id());
    let listener = Endpoint::bind(&addr, model.identity(), Options::default())?;
    let (mut go_tx, go_rx) = mpsc::channel::<()>();
    let (sent_tx, sent_rx) = mpsc::channel::<Instant>();
    let identity = model.identity().clone();
    let mut bytes = 0;
    let latent = std::thread::scope(|s| -> anyhow::Result<Vec<f64>> {
        let (ctx, addr_ref, identity) = (&ctx, &addr, &identity);
        let sender = s.spawn(move || -> anyhow::Result<u64> {
            let mut tx = Endpoint::connect(addr_ref, identity, Options::default())?;
            let layout = ctx.layout(Envelope {
                session_id: tx.session().id.clone(),
                ..Default::default()
            })?;
            while go_rx.recv().is_ok() {
                let t0 = Instant::now();
                let mut loan = tx.loan(&layout)?;
                ctx.write_into(loan.writer())?;
                loan.finish()?.send()?;
                sent_tx.send(t0).ok();
            }
            Ok(layout.total_len() as u64)
        });
        let rx = listener.accept(Duration::from_secs(30))?;
        let mut times = Vec::new();
        for _ in 0..reps {
            go_tx.send(()).ok();
            let guard = rx.recv(Duration::from_secs(30))?;
            let received = Context::from_message(guard.message(), model)?;
            drop(guard);
            model.generate_tokens(&question, Some(&received), &one, |_| {})?;
            let t0 = sent_rx.recv()?;
            times.push(ms(t0.elapsed()));
        }
        // Replacing the sender closes the channel: the sender thread finishes.
        go_tx = mpsc::channel().0;
        bytes = sender.join().expect("sender thread")?;
        Ok(times)
    })?;
    let text: Vec<u32> = tokens.iter().chain(&question).copied().collect();
    let text_times = (0..reps)
        .map(|_| {
            let t = Instant::now();
            model
                .generate_tokens(&text, None, &one, |_| {})
                .map(|_| ms(t.elapsed()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((median(latent), median(text_times), bytes))
}
