//! criterion benches of the v2 wire format: parse, verify, encode (copy + CRC) and
//! in-place finish, for KV messages of 1 MiB and 64 MiB, with memcpy as the reference.
//!
//! `cargo bench --bench wire`. `avp bench wire --json` prints the same measurements
//! as JSON lines with ratios taken in one run.

use std::hint::black_box;
use std::time::Duration;

use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, Message, MessageLayout, Payload};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn layout(size: usize) -> (MessageLayout, KvCacheDesc) {
    let seq = size / (32 * 2 * 8 * 128 * 2);
    let desc = KvCacheDesc::new(32, 8, 128, seq as u64, DType::F16, KvLayout::Hnd);
    let env = Envelope {
        model_id: "meta-llama/Meta-Llama-3-8B".into(),
        ..Default::default()
    };
    (
        MessageLayout::new(&env, &Payload::KvCache(desc)).unwrap(),
        desc,
    )
}

fn wire(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    for size in [1usize << 20, 64 << 20] {
        let (layout, desc) = layout(size);
        let src: Vec<u8> = (0..size).map(|i| (i * 7) as u8).collect();
        let tensor = desc.tensor_bytes().unwrap() as usize;
        let srcs: Vec<&[u8]> = src.chunks(tensor).collect();
        let mut dst = vec![0u8; layout.total_len()];
        // Encoded once up front, so that `parse` and `verify` also run alone
        // (`cargo bench --bench wire -- parse`).
        let mut w = layout.writer(&mut dst).unwrap();
        w.write_sections(&srcs).unwrap();
        w.finish().unwrap();
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(BenchmarkId::new("memcpy", size), |b| {
            b.iter(|| dst[..size].copy_from_slice(black_box(&src)))
        });
        g.bench_function(BenchmarkId::new("encode", size), |b| {
            b.iter(|| {
                let mut w = layout.writer(&mut dst).unwrap();
                w.write_sections(&srcs).unwrap();
                w.finish().unwrap();
            })
        });
        g.bench_function(BenchmarkId::new("finish_in_place", size), |b| {
            b.iter(|| {
                let mut w = layout.writer(&mut dst).unwrap();
                w.sections_mut();
                w.finish().unwrap();
            })
        });
        g.bench_function(BenchmarkId::new("verify", size), |b| {
            let m = Message::parse(&dst).unwrap();
            b.iter(|| m.verify().unwrap())
        });
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("parse", size), |b| {
            b.iter(|| black_box(Message::parse(black_box(&dst)).unwrap()))
        });
    }
    g.finish();
}

criterion_group!(benches, wire);
criterion_main!(benches);
