//! The reference lines of `avp bench transport`, measured in the same run as the
//! transports: what the machine itself does without avp.
//!
//! - `memcpy`: one copy between pre-faulted buffers.
//! - `raw_tcp`: a plain write / read_exact loop over loopback into a pre-faulted
//!   buffer (the bar for `tcp`'s throughput).
//! - `raw_shm`: the floor of a handoff from one core to another through memory on
//!   this machine (the bar for `shm`'s latency), between two threads of this
//!   process in ordinary memory. The sender writes a message of the same size into its own
//!   buffer (as it would into a loan), then a header's worth of fresh bytes (the
//!   size of the avp header for that message), and bumps a sequence number; the
//!   receiver spins on the number (re-reading the header every 20 µs while the
//!   sender writes, as avp's receiver keeps its path warm) and then reads every
//!   header line. It always spins, with or without `--spin`. No ring, no
//!   validation, no system call: only the cache-line transfers between the two
//!   cores that any shared-memory handoff of that header pays.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use avp_wire::PREAMBLE_LEN;

use super::bench::PageBuf;
use super::bench_transport::{Pin, Placement, Row, Stamps, T, layout_for};

/// The sender's pause before a message (`--gap-us`).
pub(super) fn idle(gap: Duration) {
    if !gap.is_zero() {
        std::thread::sleep(gap);
    }
}

pub(super) fn memcpy(size: usize, reps: usize) -> Row {
    let src = PageBuf::new(size);
    let mut dst = PageBuf::new(size);
    let mut e2e = Vec::with_capacity(reps);
    for i in 0..=reps {
        let t = Instant::now();
        dst.as_mut_slice().copy_from_slice(src.as_slice());
        std::hint::black_box(dst.as_slice());
        if i > 0 {
            e2e.push(t.elapsed().as_secs_f64());
        }
    }
    Row {
        transport: "memcpy",
        size,
        lat_us: Vec::new(),
        e2e_s: e2e,
        produce_s: Vec::new(),
        extra: Vec::new(),
        device: None,
    }
}

pub(super) fn raw_tcp(
    size: usize,
    reps: usize,
    cpus: Option<Placement>,
    gap: Duration,
) -> anyhow::Result<Row> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let epoch = Instant::now();
    let (ack_tx, ack_rx) = mpsc::channel::<()>();
    let h = std::thread::spawn(move || -> anyhow::Result<Vec<u64>> {
        let _pin = Pin::to(cpus.map(|c| c.sender));
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let src = PageBuf::new(size);
        let mut started = Vec::with_capacity(reps + 1);
        for _ in 0..=reps {
            idle(gap);
            started.push(epoch.elapsed().as_nanos() as u64);
            s.write_all(src.as_slice())?;
            ack_rx.recv()?;
        }
        Ok(started)
    });
    // Pinned after the sender thread started, so it never inherits this one CPU.
    let _pin = Pin::to(cpus.map(|c| c.receiver));
    let (mut c, _) = l.accept()?;
    c.set_nodelay(true)?;
    let mut dst = PageBuf::new(size);
    let mut ends = Vec::with_capacity(reps + 1);
    for _ in 0..=reps {
        c.read_exact(dst.as_mut_slice())?;
        ends.push(epoch.elapsed().as_nanos() as u64);
        ack_tx.send(())?;
    }
    // Paired after the run (see `Stamps`); the first transfer is a warm-up.
    let started = h.join().expect("raw tcp sender")?;
    Ok(Row {
        transport: "raw_tcp",
        size,
        lat_us: Vec::new(),
        e2e_s: started
            .iter()
            .zip(&ends)
            .skip(1)
            .map(|(&s, &end)| end.saturating_sub(s) as f64 / 1e9)
            .collect(),
        produce_s: Vec::new(),
        extra: Vec::new(),
        device: None,
    })
}

/// How often the spinning receiver re-reads the header while a message is
/// written: the pace of avp's receiver (`WARM_EVERY` in avp-transport's shm
/// module; keep the two equal).
const WARM_EVERY: Duration = Duration::from_micros(20);

/// A word on a cache line of its own (two, for the adjacent-line prefetcher).
#[repr(align(128))]
struct Line(AtomicU64);

/// What the two threads of `raw_shm` share.
struct Floor {
    /// Messages handed over so far.
    seq: Line,
    /// Non-zero while the sender writes a message (avp's `producing`).
    writing: Line,
    /// The header's bytes, as words.
    header: Vec<AtomicU64>,
}

/// See the module doc. Latency is from the sequence bump to the receiver having
/// read the whole header, always spinning (it is the floor of spin mode).
pub(super) fn raw_shm(
    size: usize,
    reps: usize,
    cpus: Option<Placement>,
    gap: Duration,
) -> anyhow::Result<Row> {
    let header_len = PREAMBLE_LEN + layout_for(size)?.header_len();
    let shared = Arc::new(Floor {
        seq: Line(AtomicU64::new(0)),
        writing: Line(AtomicU64::new(0)),
        header: (0..header_len.div_ceil(8))
            .map(|_| AtomicU64::new(0))
            .collect(),
    });
    let epoch = Instant::now();
    let now = move || epoch.elapsed().as_nanos() as u64;
    let (ack_tx, ack_rx) = mpsc::channel::<()>();
    let tx_side = shared.clone();
    let h = std::thread::spawn(move || -> anyhow::Result<Vec<Stamps>> {
        let _pin = Pin::to(cpus.map(|c| c.sender));
        let (src, mut dst) = (PageBuf::new(size), PageBuf::new(size));
        let mut stamps = Vec::with_capacity(reps + 1);
        for i in 1..=reps as u64 + 1 {
            idle(gap);
            let started = now();
            tx_side.writing.0.store(1, Ordering::Relaxed);
            dst.as_mut_slice().copy_from_slice(src.as_slice());
            std::hint::black_box(dst.as_slice());
            for w in &tx_side.header {
                w.store(i, Ordering::Relaxed);
            }
            let sent = now();
            tx_side.seq.0.store(i, Ordering::Release);
            tx_side.writing.0.store(0, Ordering::Relaxed);
            stamps.push(Stamps { started, sent });
            ack_rx.recv()?;
        }
        Ok(stamps)
    });
    // Pinned after the sender thread started, so it never inherits this one CPU.
    let _pin = Pin::to(cpus.map(|c| c.receiver));
    let mut ends = Vec::with_capacity(reps + 1);
    for i in 1..=reps as u64 + 1 {
        let give_up = Instant::now() + T;
        let mut warmed = Instant::now();
        while shared.seq.0.load(Ordering::Acquire) != i {
            std::hint::spin_loop();
            let t = Instant::now();
            if t - warmed >= WARM_EVERY && shared.writing.0.load(Ordering::Relaxed) != 0 {
                // As avp's receiver does while a message is written: keep the
                // header's page translated and its lines close by.
                for w in shared.header.iter().step_by(8) {
                    std::hint::black_box(w.load(Ordering::Relaxed));
                }
                warmed = t;
            }
            if h.is_finished() {
                anyhow::bail!("raw_shm: the sender stopped before message {i}");
            }
            if t > give_up {
                anyhow::bail!("raw_shm: no message {i} within {T:?}");
            }
        }
        // Reads every header line, as validating a header does.
        let whole = shared.header.iter().all(|w| w.load(Ordering::Relaxed) == i);
        ends.push(now());
        anyhow::ensure!(whole, "raw_shm: header {i} read before it was written");
        ack_tx.send(())?;
    }
    let stamps = h.join().expect("raw shm sender")?;
    Ok(Row::handoffs("raw_shm", size, &stamps, &ends))
}
