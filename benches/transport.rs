//! criterion benches of the transports: one message handed from a sender thread
//! to a receiver (send → receiver holds the validated message), over shared memory
//! and TCP, for 4 KiB and 1 MiB KV messages.
//!
//! `cargo bench --bench transport`. `avp bench transport --json` measures the same
//! with p50/p99 latencies, more sizes, and raw TCP / memcpy references.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use avp_transport::{Endpoint, Options, TcpOptions};
use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, MessageLayout, ModelIdentity, Payload};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn layout(size: usize) -> MessageLayout {
    let desc = KvCacheDesc::new(2, 1, 64, (size / 512) as u64, DType::F16, KvLayout::Hnd);
    MessageLayout::new(&Envelope::default(), &Payload::KvCache(desc)).unwrap()
}

/// Time `iters` round trips: the sender sends when asked, the receiver waits for the message.
fn run(addr: &str, opts: Options, size: usize, iters: u64) -> Duration {
    let listener = Endpoint::bind(addr, &ModelIdentity::default(), opts.clone()).unwrap();
    let to = listener.local_addr();
    let (go_tx, go_rx) = mpsc::channel::<bool>();
    let h = std::thread::spawn(move || {
        let mut tx = Endpoint::connect(&to, &ModelIdentity::default(), opts).unwrap();
        let l = layout(size);
        while go_rx.recv().unwrap() {
            let mut loan = tx.loan(&l).unwrap();
            loan.writer().sections_mut();
            loan.finish().unwrap().send().unwrap();
        }
    });
    let rx = listener.accept(Duration::from_secs(10)).unwrap();
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        go_tx.send(true).unwrap();
        let t = Instant::now();
        let g = rx.recv(Duration::from_secs(10)).unwrap();
        total += t.elapsed();
        drop(g);
    }
    go_tx.send(false).unwrap();
    h.join().unwrap();
    total
}

fn transport(c: &mut Criterion) {
    let mut g = c.benchmark_group("transport");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    for size in [4usize << 10, 1 << 20] {
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(BenchmarkId::new("shm", size), |b| {
            b.iter_custom(|iters| {
                run(
                    &format!("shm://bench-crit-{}", std::process::id()),
                    Options::default(),
                    size,
                    iters,
                )
            })
        });
        let tcp = Options::default().tcp(TcpOptions::default().shm_upgrade(false));
        g.bench_function(BenchmarkId::new("tcp", size), |b| {
            b.iter_custom(|iters| run("tcp://127.0.0.1:0", tcp.clone(), size, iters))
        });
    }
    g.finish();
}

criterion_group!(benches, transport);
criterion_main!(benches);
