//! The two roles as functions over a connected endpoint, so they run in separate
//! processes (`avp agent`, spawned by `avp demo`) or in tests.
//!
//! Times that cross processes are wall-clock nanoseconds since the Unix epoch (both
//! agents run on one host in the demo); durations within a process are monotonic.

use std::borrow::Cow;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use avp_model::crossmodel::{CrossOptions, SOURCE_LOGITS, SourceLogits};
use avp_model::quality::Quality;
use avp_model::{Context, GenerateOptions, Model};
use avp_transport::{Receiver, Sender};
use avp_wire::{Envelope, MessageLayout, Mode as WireMode, Payload, TextDesc, TextFormat};
use serde::Serialize;

use super::{FINAL_ANSWER, JsonMessage, Mode, researcher_prompt, solver_prompt};

/// Wall-clock nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What the researcher did.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ResearcherReport {
    /// When it started on the task (ns since the epoch).
    pub t_start_ns: u64,
    /// When it started sending (ns since the epoch).
    pub t_send_ns: u64,
    /// Tokens it read.
    pub prompt_tokens: usize,
    /// Tokens it generated (text mode).
    pub generated_tokens: usize,
    /// Latent steps it took (latent mode).
    pub latent_steps: u32,
    /// Bytes of the message it sent.
    pub bytes: u64,
    /// Its analysis (text mode).
    pub analysis: String,
    /// Milliseconds thinking or writing.
    pub work_ms: f64,
    /// Milliseconds from loaning the buffer to the message being sent.
    pub send_ms: f64,
    /// What it sent: "kv_cache" (latent), "source_logits" (cross-model), "json"
    /// (the fallback) or "text" (text mode).
    pub sent: String,
    /// The session's mode and why, as negotiated.
    pub negotiated: String,
    /// Bytes its transport copied between host and device memory (either way).
    pub host_device_bytes: u64,
    /// Bytes its transport copied device to device.
    pub device_to_device_bytes: u64,
}

/// What the solver did.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct SolverReport {
    /// When it held the validated message (ns since the epoch).
    pub t_recv_ns: u64,
    /// When it finished its answer (ns since the epoch).
    pub t_done_ns: u64,
    /// From holding the message to its first token, in ms (context decode and
    /// prefill included).
    pub ttft_ms: f64,
    /// The answer.
    pub answer: String,
    /// Tokens it prefilled.
    pub prefilled: usize,
    /// Positions it took from the researcher's KV cache.
    pub reused: usize,
    /// Tokens it generated.
    pub generated_tokens: usize,
    /// The payload it received ("kv_cache", "text", ...).
    pub payload: String,
    /// Bytes it received.
    pub bytes: u64,
    /// The cross-model quality gate's verdict, when it projected.
    pub quality: Option<Quality>,
    /// The token the source ranked first, seen in this model's vocabulary
    /// (cross-model).
    pub source_top_token: Option<String>,
    /// Whether the message's sections were in device memory (`cuda://`).
    pub on_device: bool,
    /// Bytes its transport copied between host and device memory (either way).
    pub host_device_bytes: u64,
    /// Bytes its transport copied device to device.
    pub device_to_device_bytes: u64,
}

/// Agent A: work on `task` and send the result through `tx`.
///
/// In latent mode what goes out follows the session's negotiated mode: the KV
/// cache (same model), the logits of the last hidden state (cross-model: the solver
/// projects them into its own embeddings), or an analysis as a JSON text message
/// (no latent path). Text mode always writes and sends an analysis.
pub fn research(
    model: &Model,
    tx: &mut Sender,
    mode: Mode,
    task: &str,
    steps: u32,
    max_tokens: usize,
    kv_dtype: avp_wire::DType,
) -> anyhow::Result<ResearcherReport> {
    let t_start_ns = now_ns();
    let started = Instant::now();
    let session = tx.session().clone();
    let envelope = Envelope {
        session_id: session.id.clone(),
        model_id: model.name().to_owned(),
        tokenizer_hash: model.identity().tokenizer_hash.clone(),
        source_agent_id: "researcher".into(),
        target_agent_id: "solver".into(),
        ..Default::default()
    };
    let mut report = ResearcherReport {
        t_start_ns,
        t_send_ns: 0,
        prompt_tokens: 0,
        generated_tokens: 0,
        latent_steps: 0,
        bytes: 0,
        analysis: String::new(),
        work_ms: 0.0,
        send_ms: 0.0,
        sent: String::new(),
        negotiated: format!(
            "{} ({}: {})",
            session.mode, session.path, session.mode_reason
        ),
        host_device_bytes: 0,
        device_to_device_bytes: 0,
    };
    let latent = mode == Mode::Latent && session.mode != WireMode::Json;
    if mode == Mode::Direct {
        bail!("the researcher has no part in direct mode");
    }
    if latent {
        let prompt = researcher_prompt(task, mode);
        let ctx = model.think(&prompt, steps, None)?;
        report.latent_steps = ctx.num_steps;
        report.prompt_tokens = ctx.prompt_tokens as usize;
        let logits = match session.mode {
            WireMode::CrossModel => Some(SourceLogits::from_context(model, &ctx, &session.map_id)?),
            _ => None,
        };
        report.work_ms = ms(started.elapsed());
        report.t_send_ns = now_ns();
        let sending = Instant::now();
        // Written straight into the transport's buffer.
        match &logits {
            None => {
                let layout = ctx.layout_as(envelope, kv_dtype)?;
                report.bytes = layout.total_len() as u64;
                super::handoff::send(tx, &ctx, &layout)?;
                report.sent = "kv_cache".into();
            }
            Some(l) => {
                let layout = l.layout(envelope)?;
                report.bytes = layout.total_len() as u64;
                let mut loan = tx.loan(&layout)?;
                l.write_into(loan.writer())?;
                loan.finish()?.send()?;
                report.sent = SOURCE_LOGITS.into();
            }
        }
        report.send_ms = ms(sending.elapsed());
        let stats = tx.stats();
        report.host_device_bytes = stats.host_to_device_bytes + stats.device_to_host_bytes;
        report.device_to_device_bytes = stats.device_to_device_bytes;
        return Ok(report);
    }
    // Text: the analysis as plain text (text mode) or as the JSON fallback message.
    let prompt = researcher_prompt(task, Mode::Text);
    let options = GenerateOptions {
        max_tokens,
        ..Default::default()
    };
    let g = model.generate(&prompt, None, &options, |_| {})?;
    report.generated_tokens = g.tokens.len();
    report.prompt_tokens = g.prefilled;
    report.analysis = g.text;
    report.work_ms = ms(started.elapsed());
    report.t_send_ns = now_ns();
    let sending = Instant::now();
    let (format, body, sent): (_, Cow<'_, [u8]>, _) = match mode {
        Mode::Latent => {
            let m = JsonMessage::new(&envelope, &report.analysis);
            (TextFormat::Json, serde_json::to_vec(&m)?.into(), "json")
        }
        _ => (TextFormat::Plain, report.analysis.as_bytes().into(), "text"),
    };
    report.sent = sent.into();
    let payload = Payload::Text(TextDesc {
        format,
        len: body.len() as u64,
    });
    let layout = MessageLayout::new(&envelope, &payload)?;
    report.bytes = layout.total_len() as u64;
    tx.send_sections(&layout, &[&body])?;
    report.send_ms = ms(sending.elapsed());
    Ok(report)
}

/// Agent B: receive one message on `rx` and answer `task` from it. A KV cache or
/// hidden state of this model continues directly; source logits of another model
/// are projected (map built from the vocabulary the handshake brought, or read
/// from the cache) and judged by `cross.gate`; text is pasted into the prompt.
pub fn solve(
    model: &Model,
    rx: &Receiver,
    task: &str,
    max_tokens: usize,
    timeout: Duration,
    cross: &CrossOptions,
) -> anyhow::Result<SolverReport> {
    let guard = rx.recv(timeout).context("waiting for the researcher")?;
    let t_recv_ns = now_ns();
    let received = Instant::now();
    let on_device = guard.on_device();
    if on_device {
        let header = guard.header();
        let (bytes, kind) = (header.total_len(), header.payload().kind_name().to_owned());
        let context = super::handoff::receive_device(&guard, model)?;
        drop(guard);
        let report = SolverReport {
            t_recv_ns,
            payload: kind,
            bytes,
            on_device,
            ..SolverReport::default()
        };
        return answer(
            model,
            rx,
            task,
            None,
            Some(context),
            (max_tokens, received),
            report,
        );
    }
    let msg = guard.message();
    let bytes = msg.total_len();
    let payload = msg.payload();
    let mut quality = None;
    let mut source_top_token = None;
    let mut kind = payload.kind_name().to_owned();
    let (context, analysis) = match &payload {
        Payload::Text(t) => {
            let text = msg.text()?.as_str()?;
            let analysis = match t.format {
                TextFormat::Json => {
                    kind = "json".into();
                    serde_json::from_str::<JsonMessage>(text)
                        .context("reading the JSON fallback message")?
                        .content
                }
                _ => text.to_owned(),
            };
            (None, Some(analysis))
        }
        _ if SourceLogits::is_source_logits(msg) => {
            kind = SOURCE_LOGITS.into();
            let src = SourceLogits::from_message(msg)?;
            let session = rx.session();
            if src.map_id != session.map_id {
                bail!(
                    "the logits name map {:?}, the session negotiated {:?}",
                    src.map_id,
                    session.map_id
                );
            }
            let map = model.projection_map(
                &session.peer_identity,
                session.peer_vocabulary.as_deref().map(Vec::as_slice),
            )?;
            let imported = model.import(&src, &map, cross)?;
            source_top_token = imported
                .top_tokens
                .first()
                .map(|&t| model.decode(&[t]))
                .transpose()?;
            quality = Some(imported.quality);
            (imported.context, None)
        }
        _ => {
            let ctx = Context::from_message(msg, model)?;
            (Some(ctx), None)
        }
    };
    // Everything needed is decoded: give the slot back before generating.
    drop(guard);
    let report = SolverReport {
        t_recv_ns,
        payload: kind,
        bytes,
        quality,
        source_top_token,
        ..SolverReport::default()
    };
    answer(
        model,
        rx,
        task,
        analysis.as_deref(),
        context,
        (max_tokens, received),
        report,
    )
}

/// The solver's answer from `context` (or the `analysis` pasted into its
/// prompt), completing `report`.
fn answer(
    model: &Model,
    rx: &Receiver,
    task: &str,
    analysis: Option<&str>,
    context: Option<Context>,
    (max_tokens, received): (usize, Instant),
    report: SolverReport,
) -> anyhow::Result<SolverReport> {
    let options = GenerateOptions {
        max_tokens,
        ..Default::default()
    };
    let prompt = solver_prompt(task, analysis, FINAL_ANSWER);
    let before_generate = received.elapsed();
    let g = model.generate(&prompt, context.as_ref(), &options, |_| {})?;
    let ttft = before_generate + g.time_to_first_token;
    let stats = rx.stats();
    Ok(SolverReport {
        t_done_ns: now_ns(),
        ttft_ms: ms(ttft),
        answer: g.text,
        prefilled: g.prefilled,
        reused: g.reused,
        generated_tokens: g.tokens.len(),
        host_device_bytes: stats.host_to_device_bytes + stats.device_to_host_bytes,
        device_to_device_bytes: stats.device_to_device_bytes,
        ..report
    })
}

/// Milliseconds of `d`.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
