//! `avp inspect FILE [--json]`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use avp_wire::{Message, Payload, v1};
use serde::Serialize;
use serde_json::{Value, json};

/// Arguments of `avp inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The message file.
    file: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// What `inspect` reports.
#[derive(Serialize)]
struct Summary {
    file: String,
    version: u8,
    size_bytes: u64,
    kind: &'static str,
    payload: Value,
    sections: usize,
    alignment: Option<u32>,
    compressed: bool,
    identity: BTreeMap<&'static str, String>,
    extra: BTreeMap<String, String>,
    checksum: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(&args.file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.file.display()))?;
    let file = args.file.display().to_string();
    let (summary, problem) = match avp_wire::sniff_version(&bytes) {
        Err(e) => return fail(&file, &e),
        Ok(2) => match Message::parse(&bytes) {
            Ok(m) => v2_summary(file.clone(), &m),
            Err(e) => return fail(&file, &e),
        },
        Ok(_) => match v1::decode(&bytes) {
            Ok(m) => v1_summary(file.clone(), bytes.len() as u64, &m),
            Err(e) => return fail(&file, &e),
        },
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_text(&summary);
    }
    Ok(match problem {
        None => ExitCode::SUCCESS,
        Some(e) => {
            eprintln!("error: {file}: {e}");
            ExitCode::FAILURE
        }
    })
}

fn fail(file: &str, e: &avp_wire::WireError) -> anyhow::Result<ExitCode> {
    eprintln!("error: {file}: {e}");
    Ok(ExitCode::FAILURE)
}

fn v2_summary(file: String, m: &Message<'_>) -> (Summary, Option<avp_wire::WireError>) {
    let env = m.envelope();
    let payload = m.payload();
    let verify = m.verify();
    let identity = [
        ("model_id", env.model_id()),
        ("model_hash", env.model_hash()),
        ("model_family", env.model_family()),
        ("tokenizer_hash", env.tokenizer_hash()),
        ("session_id", env.session_id()),
        ("source_agent_id", env.source_agent_id()),
        ("target_agent_id", env.target_agent_id()),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_owned()))
    .collect();
    let summary = Summary {
        file,
        version: 2,
        size_bytes: m.total_len(),
        kind: payload.kind_name(),
        payload: serde_json::to_value(
            match &payload {
                Payload::KvCache(kv) => serde_json::to_value(kv),
                Payload::HiddenState(h) => serde_json::to_value(h),
                Payload::Text(t) => serde_json::to_value(t),
            }
            .expect("plain data serializes"),
        )
        .expect("plain data serializes"),
        sections: m.section_count(),
        alignment: Some(m.alignment()),
        compressed: false,
        identity,
        extra: env
            .extra()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        checksum: match &verify {
            Ok(()) => format!("ok ({} sections)", m.section_count()),
            Err(e) => format!("FAILED: {e}"),
        },
    };
    (summary, verify.err())
}

fn v1_summary(
    file: String,
    size: u64,
    m: &v1::Decoded<'_>,
) -> (Summary, Option<avp_wire::WireError>) {
    let md = &m.metadata;
    let mut problem = None;
    let payload = match m.payload_type() {
        v1::PayloadType::KvCache => match m.kv() {
            Ok(kv) => json!({
                "num_layers": kv.header.num_layers,
                "num_kv_heads": kv.header.num_kv_heads,
                "head_dim": kv.header.head_dim,
                "seq_len": kv.header.seq_len,
                "dtype": kv.header.dtype.name(),
                "layout": "HND",
                "payload_bytes": m.payload.len(),
            }),
            Err(e) => {
                let v = json!({ "error": e.to_string() });
                problem = Some(e);
                v
            }
        },
        v1::PayloadType::HiddenState => json!({
            "dtype": m.dtype().name(),
            "tensor_shape": md.tensor_shape,
            "hidden_dim": md.hidden_dim,
            "map_id": md.avp_map_id,
            "payload_bytes": m.payload.len(),
        }),
    };
    let identity = [
        ("model_id", md.model_id.clone()),
        ("session_id", md.session_id.clone()),
        ("source_agent_id", md.source_agent_id.clone()),
        ("target_agent_id", md.target_agent_id.clone()),
        (
            "mode",
            if md.mode == 0 { "latent" } else { "json" }.to_owned(),
        ),
        ("hidden_dim", md.hidden_dim.to_string()),
        ("num_layers", md.num_layers.to_string()),
    ]
    .into_iter()
    .collect();
    let summary = Summary {
        file,
        version: 1,
        size_bytes: size,
        kind: match m.payload_type() {
            v1::PayloadType::KvCache => "kv_cache",
            v1::PayloadType::HiddenState => "hidden_state",
        },
        payload,
        sections: 1,
        alignment: None,
        compressed: m.compressed(),
        identity,
        extra: md.extra.clone(),
        checksum: match md.payload_checksum {
            Some(c) => format!("ok (crc32 0x{c:08x})"),
            None => "absent (pre-0.4.1 sender)".into(),
        },
    };
    (summary, problem)
}

fn print_text(s: &Summary) {
    println!(
        "{}: avp v{} message, {} bytes",
        s.file, s.version, s.size_bytes
    );
    println!("  kind:      {}", s.kind);
    if let Value::Object(map) = &s.payload {
        for (k, v) in map {
            println!("  {k:<10} {v}");
        }
    }
    match s.alignment {
        Some(a) => println!("  sections:  {} (aligned to {a} bytes)", s.sections),
        None => println!("  compressed: {}", s.compressed),
    }
    for (k, v) in &s.identity {
        if !v.is_empty() {
            println!("  {k:<16} {v}");
        }
    }
    for (k, v) in &s.extra {
        println!("  extra.{k} = {v}");
    }
    println!("  checksum:  {}", s.checksum);
}
