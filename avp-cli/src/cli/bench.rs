//! `avp bench ...`: benchmarks that print one JSON object per line.
//!
//! Every buffer is allocated and pre-faulted before timing starts (first-touch page
//! faults run ~30x slower than memcpy on small VMs), and memcpy is measured in the
//! same run on the same buffers, so ratios are meaningful on a noisy machine.

use std::hint::black_box;
use std::time::Instant;

use anyhow::{Context, bail};
use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, Message, MessageLayout, Payload, checksum};
use serde_json::json;

/// Benchmarks.
#[derive(clap::Subcommand, Debug)]
pub enum Bench {
    /// Wire format: parse, verify and encode KV messages, against memcpy.
    Wire(WireArgs),
    /// memcpy speed versus destination offset modulo 4096 (why large sections are page-aligned).
    MemcpyOffsets(OffsetArgs),
    /// Transports: handoff latency and throughput for shm and tcp, against raw TCP and memcpy.
    Transport(super::bench_transport::TransportArgs),
    /// Model: prefill/decode tokens per second, one latent step, and agent B's time
    /// to first token from a KV handoff versus re-reading text.
    Model(super::bench_model::ModelArgs),
    /// KV wire dtypes (f16, bf16) against f32: bytes and answer agreement.
    Kv(super::bench_kv::KvArgs),
    /// Every bench above (wire, transport, model) as JSON lines.
    All(super::bench_report::AllArgs),
    /// An HTML page with SVG plots of the benches (runs them, or reads --input).
    Report(super::bench_report::ReportArgs),
}

/// Arguments of `avp bench wire`.
#[derive(clap::Args, Debug)]
pub struct WireArgs {
    /// Print JSON lines (the default output is a table).
    #[arg(long)]
    json: bool,
    /// Payload sizes (KV bytes): numbers with optional KiB/MiB/GiB suffix.
    #[arg(long, value_delimiter = ',', default_value = "1MiB,64MiB,256MiB")]
    sizes: Vec<String>,
    /// Section alignment (default: the library's choice for the size).
    #[arg(long)]
    alignment: Option<u32>,
    /// Timed repetitions per measurement (default: scaled to the size).
    #[arg(long)]
    reps: Option<usize>,
}

/// Arguments of `avp bench memcpy-offsets`.
#[derive(clap::Args, Debug)]
pub struct OffsetArgs {
    /// Bytes copied per repetition.
    #[arg(long, default_value = "256MiB")]
    size: String,
    /// Destination offsets to try.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,16,64,128,256,448,2048,4096"
    )]
    offsets: Vec<usize>,
}

pub fn run(b: Bench) -> anyhow::Result<std::process::ExitCode> {
    match b {
        Bench::Wire(a) => wire(a)?,
        Bench::MemcpyOffsets(a) => offsets(a)?,
        Bench::Transport(a) => super::bench_transport::run(a)?,
        Bench::Kv(a) => super::bench_kv::run(a)?,
        Bench::Model(a) => super::bench_model::run(a)?,
        Bench::All(a) => super::bench_report::all(a)?,
        Bench::Report(a) => super::bench_report::report(a)?,
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Parse "64MiB", "1GiB", "4096".
pub fn parse_size(s: &str) -> anyhow::Result<usize> {
    let s = s.trim();
    let (num, mul) = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
        .iter()
        .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
        .unwrap_or((s, 1));
    let n: usize = num
        .trim()
        .parse()
        .with_context(|| format!("bad size {s:?}"))?;
    Ok(n * mul)
}

/// A page-aligned, pre-faulted buffer.
pub struct PageBuf {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
}

impl PageBuf {
    pub fn new(len: usize) -> Self {
        let mut storage = vec![0u8; len + 4096];
        let offset = storage.as_ptr().align_offset(4096);
        // Touch every page now so no timed loop pays for first-touch faults.
        storage.iter_mut().step_by(4096).for_each(|b| *b = 1);
        PageBuf {
            storage,
            offset,
            len,
        }
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.offset..self.offset + self.len]
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of `reps` runs of `f` (after one warm-up).
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// A Llama-3-8B-shaped f16 KV cache (32 layers, 8 KV heads, head_dim 128: 128 KiB per position).
fn kv_desc(size: usize) -> anyhow::Result<KvCacheDesc> {
    let per_pos = 32 * 2 * 8 * 128 * 2;
    if size < per_pos || !size.is_multiple_of(per_pos) {
        bail!("size must be a multiple of {per_pos} bytes (one position of the benchmark cache)");
    }
    Ok(KvCacheDesc::new(
        32,
        8,
        128,
        (size / per_pos) as u64,
        DType::F16,
        KvLayout::Hnd,
    ))
}

fn wire(a: WireArgs) -> anyhow::Result<()> {
    for s in &a.sizes {
        let size = parse_size(s)?;
        let desc = kv_desc(size)?;
        let env = Envelope {
            model_id: "meta-llama/Meta-Llama-3-8B".into(),
            session_id: "bench".into(),
            ..Default::default()
        };
        let payload = Payload::KvCache(desc);
        let layout = match a.alignment {
            Some(al) => MessageLayout::with_alignment(&env, &payload, al)?,
            None => MessageLayout::new(&env, &payload)?,
        };
        let reps = a
            .reps
            .unwrap_or_else(|| ((2usize << 30) / size).clamp(5, 50));
        let mut src = PageBuf::new(size);
        src.as_mut_slice()
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i * 7 + i / 4099) as u8);
        let tensor = desc.tensor_bytes()? as usize;
        let srcs: Vec<&[u8]> = src.as_slice().chunks(tensor).collect();
        let mut dst = PageBuf::new(layout.total_len());

        let memcpy = time(reps, || {
            dst.as_mut_slice()[..size].copy_from_slice(src.as_slice());
            black_box(dst.as_slice());
        });
        // In place: the producer already wrote its tensors into the message buffer;
        // finishing computes every section CRC and writes the header.
        let finish = time(reps, || {
            let mut w = layout
                .writer(dst.as_mut_slice())
                .expect("buffer sized by layout");
            w.sections_mut();
            w.finish().expect("all sections marked written");
        });
        let mut encode_for = |threads: usize| -> anyhow::Result<f64> {
            checksum::set_max_threads(threads);
            let mut err = None;
            let t = time(reps, || {
                let r = layout
                    .writer(dst.as_mut_slice())
                    .and_then(|mut w| w.write_sections(&srcs).map(|_| w))
                    .and_then(|w| w.finish().map(|_| ()));
                if let Err(e) = r {
                    err = Some(e);
                }
            });
            checksum::set_max_threads(0);
            err.map_or(Ok(t), |e| Err(e.into()))
        };
        let encode = encode_for(0)?;
        let encode_1t = encode_for(1)?;
        let bytes = dst.as_slice();
        let msg = Message::parse(bytes)?;
        msg.verify()?;
        for (i, s) in srcs.iter().enumerate() {
            anyhow::ensure!(
                msg.section(i)?.bytes == *s,
                "section {i} differs after encode"
            );
        }
        // Batches of 1000 parses until 200 ms have passed.
        let (mut n, t) = (0u64, Instant::now());
        while t.elapsed().as_millis() < 200 {
            for _ in 0..1000 {
                black_box(Message::parse(black_box(bytes))?);
            }
            n += 1000;
        }
        let parse_ns = t.elapsed().as_secs_f64() * 1e9 / n as f64;
        let verify = time(reps, || msg.verify().expect("verified above"));
        checksum::set_max_threads(1);
        let verify_1t = time(reps, || msg.verify().expect("verified above"));
        checksum::set_max_threads(0);

        let gbps = |secs: f64| size as f64 / secs / 1e9;
        let row = json!({
            "bench": "wire",
            "size_bytes": size,
            "parse_ns": (parse_ns * 10.0).round() / 10.0,
            "verify_gbps": round2(gbps(verify)),
            "encode_gbps": round2(gbps(encode)),
            "encode_in_place_gbps": round2(gbps(finish)),
            "memcpy_gbps": round2(gbps(memcpy)),
            "verify_1t_gbps": round2(gbps(verify_1t)),
            "encode_1t_gbps": round2(gbps(encode_1t)),
            "verify_ratio": round2(memcpy / verify),
            "encode_ratio": round2(memcpy / encode),
            "encode_in_place_ratio": round2(memcpy / finish),
            "alignment": layout.alignment(),
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "reps": reps,
        });
        if a.json {
            println!("{row}");
        } else {
            println!(
                "{:>10} B  parse {:>7.1} ns  verify {:>6.2} GB/s ({:.2} 1t)  encode {:>6.2} GB/s ({:.2} 1t)  memcpy {:>6.2} GB/s  align {}",
                size,
                parse_ns,
                gbps(verify),
                gbps(verify_1t),
                gbps(encode),
                gbps(encode_1t),
                gbps(memcpy),
                layout.alignment()
            );
        }
    }
    Ok(())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn offsets(a: OffsetArgs) -> anyhow::Result<()> {
    let size = parse_size(&a.size)?;
    let max_off = a.offsets.iter().copied().max().unwrap_or(0);
    let src = PageBuf::new(size);
    let mut dst = PageBuf::new(size + max_off);
    let reps = ((2usize << 30) / size).clamp(5, 30);
    for &off in &a.offsets {
        let t = time(reps, || {
            dst.as_mut_slice()[off..off + size].copy_from_slice(src.as_slice());
            black_box(dst.as_slice());
        });
        println!(
            "{}",
            json!({"bench": "memcpy_offset", "size_bytes": size, "dst_offset_mod_4096": off % 4096, "gbps": round2(size as f64 / t / 1e9)})
        );
    }
    Ok(())
}
