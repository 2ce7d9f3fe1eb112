//! `avp bench transport`: handoff latency and throughput per transport, with the
//! reference lines (memcpy, raw TCP, the raw shared-memory floor; see
//! `bench_baseline`) measured in the same run.
//!
//! - `p50_us` / `p99_us`: from `send()` to the receiver holding a validated
//!   (parsed, not yet verified) message; one message in flight at a time.
//! - `gbps`: size / median time from `send()` of a finished message (tensors
//!   already written into the loaned slot or buffer, checksums computed) to the
//!   receiver holding it. For shared memory no byte moves, so this is the
//!   zero-copy handoff rate; `produce_gbps` is what writing the message into the
//!   loan cost the producer (copy from its own buffer + CRC + header, and
//!   `finish` bringing back into cache what `send` will touch: that cost is
//!   counted here, not in the handoff).
//! - `transport_ratio` lines: `tcp_over_raw_tcp` (throughput) and
//!   `shm_over_raw_shm_p50` (how many times the machine's own handoff floor the
//!   shared-memory handoff takes).
//! - `--gap-us`: the sender idles before each message, as a producer busy with
//!   other work does; on shared hosts, caches and TLBs lose what was not touched
//!   for a few milliseconds, and the handoff then pays for it.
//!
//! The receiving thread is pinned to one CPU and the sending thread to the others
//! (unless `--no-pin`, or fewer than two are available), as latency benchmarks do: the
//! harness wakes the sender after each message, and the scheduler likes to put a
//! woken thread on its waker's CPU, where it then waits for the receiver's core
//! (measured here: rounds of 4 KiB at 9 µs instead of 0.4 µs).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use avp_transport::{Endpoint, Options, RdmaDevice, RdmaOptions, ShmOptions, TcpOptions};
use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, MessageLayout, ModelIdentity, Payload};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;
use serde_json::json;

use super::bench::{PageBuf, parse_size};
use super::bench_baseline::{idle, memcpy, raw_shm, raw_tcp};
use super::bench_device;

/// Arguments of `avp bench transport`.
#[derive(clap::Args, Debug)]
pub struct TransportArgs {
    /// Print JSON lines (the default output is a table).
    #[arg(long)]
    json: bool,
    /// Message sizes.
    #[arg(long, value_delimiter = ',', default_value = "4KiB,1MiB,64MiB,256MiB")]
    sizes: Vec<String>,
    /// Transports to measure: memcpy, raw_tcp, raw_shm, shm, tcp, http, cuda, rdma.
    #[arg(
        long,
        alias = "transport",
        value_delimiter = ',',
        default_value = "memcpy,raw_tcp,raw_shm,shm,tcp"
    )]
    transports: Vec<String>,
    /// Spin instead of sleeping while waiting for shared-memory messages.
    #[arg(long)]
    spin: bool,
    /// Timed repetitions (default: scaled to the size).
    #[arg(long)]
    reps: Option<usize>,
    /// Threads for checksums and copies (0 = all cores).
    #[arg(long, default_value_t = 0)]
    checksum_threads: usize,
    /// Leave the receiving and sending threads where the scheduler puts them.
    #[arg(long)]
    no_pin: bool,
    /// Idle time before each message, in microseconds: the sender sleeps this
    /// long (outside the measured window), as a producer busy with other work
    /// would between handoffs. 0 sends back to back.
    #[arg(long, default_value_t = 0)]
    gap_us: u64,
    /// The device of the `cuda` transport: cuda:N, or emulated (host memory
    /// standing in for a GPU, to run the protocol without one).
    #[arg(long)]
    device: Option<avp_transport::Device>,
    /// The device of the `rdma` transport: verbs, verbs:NAME, or emulated (the
    /// software device: runs the protocol between two threads here; its
    /// figures are not a measurement of RDMA hardware and are marked so).
    #[arg(long)]
    rdma_device: Option<avp_transport::RdmaDevice>,
}

/// Which avp transport a row measures.
enum Via {
    Shm,
    Tcp,
    Rdma(Option<RdmaDevice>),
    Http,
}

impl Via {
    fn name(&self) -> &'static str {
        match self {
            Via::Shm => "shm",
            Via::Tcp => "tcp",
            Via::Rdma(_) => "rdma",
            Via::Http => "http",
        }
    }
}

/// Where the two threads of a measurement run: the receiver on one CPU, the
/// sender (and the checksum threads it starts) on all the others this process
/// may use. `None` with fewer than two CPUs.
#[derive(Clone, Copy)]
pub(super) struct Placement {
    pub(super) receiver: CpuSet,
    pub(super) sender: CpuSet,
}

fn placement() -> Option<Placement> {
    let all = sched_getaffinity(Pid::from_raw(0)).ok()?;
    let mut cpus = (0..CpuSet::count()).filter(|&c| all.is_set(c).unwrap_or(false));
    let first = cpus.next()?;
    cpus.next()?;
    let mut receiver = CpuSet::new();
    receiver.set(first).ok()?;
    let mut sender = all;
    sender.unset(first).ok()?;
    Some(Placement { receiver, sender })
}

/// The calling thread held to `cpus` until dropped (then its old mask is back).
/// A failure is reported on stderr and the thread stays where it was.
pub(super) struct Pin(Option<CpuSet>);

impl Pin {
    pub(super) fn to(cpus: Option<CpuSet>) -> Pin {
        let me = Pid::from_raw(0);
        let Some(cpus) = cpus else { return Pin(None) };
        let pinned = sched_getaffinity(me).and_then(|old| {
            sched_setaffinity(me, &cpus)?;
            Ok(old)
        });
        match pinned {
            Ok(old) => Pin(Some(old)),
            Err(e) => {
                eprintln!("warning: could not pin a bench thread ({e}); results may be bimodal");
                Pin(None)
            }
        }
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = sched_setaffinity(Pid::from_raw(0), old);
        }
    }
}

pub(super) const T: Duration = Duration::from_secs(60);

pub(super) fn layout_for(size: usize) -> anyhow::Result<MessageLayout> {
    // A Llama-3-8B-shaped f16 cache for large sizes, a small one for 4 KiB.
    let desc = if size < 128 << 10 {
        KvCacheDesc::new(2, 1, 64, (size / 512) as u64, DType::F16, KvLayout::Hnd)
    } else {
        KvCacheDesc::new(
            32,
            8,
            128,
            (size / (128 << 10)) as u64,
            DType::F16,
            KvLayout::Hnd,
        )
    };
    Ok(MessageLayout::new(
        &Envelope::default(),
        &Payload::KvCache(desc),
    )?)
}

pub(super) fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub(super) struct Row {
    pub(super) transport: &'static str,
    pub(super) size: usize,
    pub(super) lat_us: Vec<f64>,
    pub(super) e2e_s: Vec<f64>,
    pub(super) produce_s: Vec<f64>,
    /// Further figures of this row (JSON key, value), printed as they are.
    pub(super) extra: Vec<(&'static str, f64)>,
    /// What stood in for the hardware, when something did (printed as `device`).
    pub(super) device: Option<&'static str>,
}

impl Row {
    /// A row of handoffs: latency from each `sent` stamp to the receiver's
    /// `ends` stamp of the same message, producing time from `started` to
    /// `sent`. The first message is a warm-up and left out.
    pub(super) fn handoffs(
        transport: &'static str,
        size: usize,
        stamps: &[Stamps],
        ends: &[u64],
    ) -> Row {
        let pairs = || stamps.iter().zip(ends).skip(1);
        let lat: Vec<f64> = pairs()
            .map(|(s, &end)| end.saturating_sub(s.sent) as f64 / 1e3)
            .collect();
        Row {
            transport,
            size,
            e2e_s: lat.iter().map(|us| us / 1e6).collect(),
            lat_us: lat,
            produce_s: pairs()
                .map(|(s, _)| s.sent.saturating_sub(s.started) as f64 / 1e9)
                .collect(),
            extra: Vec::new(),
            device: None,
        }
    }

    /// Pool another round's samples into this row.
    fn absorb(&mut self, other: Row) {
        self.lat_us.extend(other.lat_us);
        self.e2e_s.extend(other.e2e_s);
        self.produce_s.extend(other.produce_s);
        for (k, v) in other.extra {
            match self.extra.iter_mut().find(|(key, _)| *key == k) {
                // Counters add up across rounds; rates keep the best round.
                Some((_, old)) if k.ends_with("_bytes") => *old += v,
                Some((_, old)) => *old = old.max(v),
                None => self.extra.push((k, v)),
            }
        }
    }

    /// Size over the median end-to-end time.
    fn gbps(&self) -> f64 {
        self.size as f64 / pct(self.e2e_s.clone(), 0.5) / 1e9
    }

    /// Median and 99th percentile of the handoff latency (of the whole
    /// transfer where there is no separate handoff), in µs.
    fn latency_us(&self) -> (f64, f64) {
        if self.lat_us.is_empty() {
            (
                pct(self.e2e_s.clone(), 0.5) * 1e6,
                pct(self.e2e_s.clone(), 0.99) * 1e6,
            )
        } else {
            (
                pct(self.lat_us.clone(), 0.5),
                pct(self.lat_us.clone(), 0.99),
            )
        }
    }

    /// Whether the receiver spun: `raw_shm` always does, the avp transports as
    /// `--spin` says (memcpy and raw TCP report the flag as given).
    fn spun(&self, spin: bool) -> bool {
        spin || self.transport == "raw_shm"
    }

    /// The idle gap before each message: none for memcpy, which has no sender.
    fn gap(&self, gap_us: u64) -> Option<u64> {
        (self.transport != "memcpy").then_some(gap_us)
    }

    fn emit(&self, json_out: bool, spin: bool, gap_us: u64) {
        let gbps = self.gbps();
        let (p50, p99) = self.latency_us();
        let r2 = |x: f64| (x * 100.0).round() / 100.0;
        let produce = (!self.produce_s.is_empty())
            .then(|| r2(self.size as f64 / pct(self.produce_s.clone(), 0.5) / 1e9));
        if json_out {
            let mut row = json!({"bench": "transport", "transport": self.transport, "size_bytes": self.size,
                       "p50_us": r2(p50), "p99_us": r2(p99), "gbps": r2(gbps), "spin": self.spun(spin),
                       "gap_us": self.gap(gap_us), "reps": self.e2e_s.len()});
            if let Some(p) = produce {
                row["produce_gbps"] = json!(p);
            }
            for (k, v) in &self.extra {
                row[*k] = json!(r2(*v));
            }
            if let Some(d) = self.device {
                row["device"] = json!(d);
            }
            println!("{row}");
        } else {
            let mut extra = produce
                .map(|p| format!("  (producing {p:.2} GB/s)"))
                .unwrap_or_default();
            for (k, v) in &self.extra {
                extra.push_str(&format!("  {k} {v:.2}"));
            }
            if let Some(d) = self.device {
                extra.push_str(&format!("  [{d}]"));
            }
            println!(
                "{:>8} {:>10} B  p50 {:>10.2} us  p99 {:>10.2} us  {:>9.2} GB/s{extra}",
                self.transport, self.size, p50, p99, gbps
            );
        }
    }
}

/// Rounds each transport's repetitions are split into, interleaved across
/// transports, so that machine noise lands on all of them alike.
const ROUNDS: usize = 4;

pub fn run(a: TransportArgs) -> anyhow::Result<()> {
    avp_wire::checksum::set_max_threads(a.checksum_threads);
    // Count the cores before any thread is pinned (the count is cached).
    avp_wire::checksum::cores();
    let cpus = if a.no_pin { None } else { placement() };
    let gap = Duration::from_micros(a.gap_us);
    for s in &a.sizes {
        let size = parse_size(s)?;
        let reps = a
            .reps
            .unwrap_or_else(|| ((1usize << 30) / size).clamp(40, 300));
        let per_round = reps.div_ceil(ROUNDS);
        let mut rows: Vec<Row> = Vec::new();
        for _ in 0..ROUNDS {
            for (i, t) in a.transports.iter().enumerate() {
                let row = match t.as_str() {
                    "memcpy" => memcpy(size, per_round),
                    "raw_tcp" => raw_tcp(size, per_round, cpus, gap)?,
                    "raw_shm" => raw_shm(size, per_round, cpus, gap)?,
                    "shm" => avp_transport(size, per_round, &Via::Shm, a.spin, cpus, gap)?,
                    "tcp" => avp_transport(size, per_round, &Via::Tcp, a.spin, cpus, gap)?,
                    "http" => avp_transport(size, per_round, &Via::Http, a.spin, cpus, gap)?,
                    "rdma" => {
                        let via = Via::Rdma(a.rdma_device.clone());
                        avp_transport(size, per_round, &via, a.spin, cpus, gap)?
                    }
                    "cuda" => {
                        let device = a.device.ok_or_else(|| {
                            anyhow::anyhow!(
                                "the cuda transport needs --device (cuda:N, or emulated to run \
                                 its protocol in host memory)"
                            )
                        })?;
                        bench_device::cuda(size, per_round, a.spin, cpus, gap, device)?
                    }
                    other => {
                        anyhow::bail!(
                            "unknown transport {other:?} (memcpy, raw_tcp, raw_shm, shm, tcp, http, cuda, rdma)"
                        )
                    }
                };
                match rows.get_mut(i) {
                    Some(r) => r.absorb(row),
                    None => rows.push(row),
                }
            }
        }
        for row in &rows {
            row.emit(a.json, a.spin, a.gap_us);
        }
        emit_ratios(&rows, size, a.json);
    }
    Ok(())
}

/// Each transport against its reference line, where both were measured: TCP's
/// throughput over raw TCP's, and shared memory's p50 handoff over the raw
/// floor's (how many times the machine's own floor avp takes; the floor always
/// spins, so without `--spin` this includes avp's wake-up).
fn emit_ratios(rows: &[Row], size: usize, json_out: bool) {
    let row = |name: &str| rows.iter().find(|r| r.transport == name);
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    let mut ratios = Vec::new();
    if let (Some(tcp), Some(raw)) = (row("tcp"), row("raw_tcp")) {
        ratios.push((
            "tcp_over_raw_tcp",
            "tcp / raw_tcp",
            r2(tcp.gbps() / raw.gbps()),
        ));
    }
    if let (Some(shm), Some(raw)) = (row("shm"), row("raw_shm")) {
        let p50 = |r: &Row| r.latency_us().0;
        ratios.push((
            "shm_over_raw_shm_p50",
            "shm p50 / raw_shm p50",
            r2(p50(shm) / p50(raw)),
        ));
    }
    if ratios.is_empty() {
        return;
    }
    if json_out {
        let mut line = json!({"bench": "transport_ratio", "size_bytes": size});
        for (key, _, v) in &ratios {
            line[*key] = json!(v);
        }
        println!("{line}");
    } else {
        let text: Vec<String> = ratios
            .iter()
            .map(|(_, n, v)| format!("{n} = {v:.2}"))
            .collect();
        println!("{:>8} {:>10} B  {}", "ratio", size, text.join(", "));
    }
}

fn avp_transport(
    size: usize,
    reps: usize,
    via: &Via,
    spin: bool,
    cpus: Option<Placement>,
    gap: Duration,
) -> anyhow::Result<Row> {
    let layout = layout_for(size)?;
    let opts = Options::default()
        .shm(
            ShmOptions::default()
                .slot_size(layout.total_len().max(1 << 20))
                .slots(2)
                .spin(if spin {
                    Duration::MAX
                } else {
                    ShmOptions::default().spin
                }),
        )
        .tcp(TcpOptions::default().shm_upgrade(matches!(via, Via::Shm)));
    let (opts, addr) = match via {
        Via::Shm => (opts, format!("shm://bench-{}", std::process::id())),
        Via::Tcp => (opts, "tcp://127.0.0.1:0".to_string()),
        Via::Http => (opts, "http://127.0.0.1:0".to_string()),
        Via::Rdma(device) => {
            let mut r = RdmaOptions::default()
                .slots(2)
                .slot_size(layout.total_len().max(1 << 20))
                .loan_timeout(T);
            r.device = device.clone();
            (opts.rdma(r), "rdma://127.0.0.1:0".to_string())
        }
    };
    let id = ModelIdentity::default();
    let listener = Endpoint::bind(&addr, &id, opts.clone())?;
    let connect_to = listener.local_addr();
    let epoch = Instant::now();
    let (ack_tx, ack_rx) = mpsc::channel::<()>();
    let h = std::thread::spawn(move || -> anyhow::Result<Vec<Stamps>> {
        let _pin = Pin::to(cpus.map(|c| c.sender));
        let mut tx = Endpoint::connect(&connect_to, &ModelIdentity::default(), opts)?;
        let layout = layout_for(size)?;
        let src = PageBuf::new(layout.sections().map(|s| s.len as usize).sum());
        let mut srcs: Vec<&[u8]> = Vec::new();
        let mut off = 0;
        for s in layout.sections() {
            srcs.push(&src.as_slice()[off..off + s.len as usize]);
            off += s.len as usize;
        }
        let now = || epoch.elapsed().as_nanos() as u64;
        let mut stamps = Vec::with_capacity(reps + 1);
        for _ in 0..=reps {
            idle(gap);
            let started = now();
            let mut loan = tx.loan(&layout)?;
            loan.writer().write_sections(&srcs)?;
            let ready = loan.finish()?;
            let sent = now();
            ready.send()?;
            stamps.push(Stamps { started, sent });
            ack_rx.recv()?;
        }
        Ok(stamps)
    });
    // Pinned after the sender thread started, so it never inherits this one CPU.
    let _pin = Pin::to(cpus.map(|c| c.receiver));
    let rx = listener.accept(T)?;
    anyhow::ensure!(
        rx.session().transport.name() == via.name(),
        "negotiated {}",
        rx.session().explain()
    );
    let mut ends = Vec::with_capacity(reps + 1);
    for _ in 0..=reps {
        let g = rx.recv(T)?;
        ends.push(epoch.elapsed().as_nanos() as u64);
        std::hint::black_box(g.message().total_len());
        drop(g);
        ack_tx.send(())?;
    }
    let stamps = h.join().expect("sender thread")?;
    let mut row = Row::handoffs(via.name(), size, &stamps, &ends);
    if let Via::Rdma(Some(RdmaDevice::Emulated)) = via {
        row.device = Some("emulated (software verbs; not RDMA hardware)");
    }
    Ok(row)
}

/// When the sender of one message started producing it and when it called
/// `send` (ns since the run's epoch). Each thread keeps its own stamps and they
/// are paired after the run: a stamp written to memory the other thread reads
/// would put a cross-core transfer inside the window it measures.
pub(super) struct Stamps {
    pub(super) started: u64,
    pub(super) sent: u64,
}
