//! `avp bench transport --transports cuda --device D`: the `cuda` transport's
//! handoff, with the device-to-device copy rate against the device's own
//! copy peak measured in the same run.
//!
//! - `p50_us` / `p99_us`: from `send()` of a finished device message to the
//!   receiver holding it validated, its sections as device pointers (the
//!   copies are not in this window: they are the producer's).
//! - `copy_gbps`: section bytes over the median time to produce a message
//!   (loan a device slot, copy every section device to device from the
//!   producer's buffer, synchronise, write the header); `dtod_peak_gbps`: one
//!   plain device-to-device copy of the same bytes between two buffers;
//!   `copy_over_peak` their ratio.
//! - `host_device_bytes`: bytes either end copied between host and device
//!   during the run (0 for a device-to-device handoff).
//!
//! `--device emulated` runs the same protocol in host memory (copies are
//! memcpy): a check of the path, not of a GPU.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use avp_transport::{
    Device, DeviceBuffer, DeviceOptions, Endpoint, Options, ShmOptions, TransportKind,
};
use avp_wire::ModelIdentity;

use super::bench_baseline::idle;
use super::bench_transport::{Pin, Placement, Row, Stamps, T, layout_for, pct};

/// One timed round of the cuda transport.
pub(super) fn cuda(
    size: usize,
    reps: usize,
    spin: bool,
    cpus: Option<Placement>,
    gap: Duration,
    device: Device,
) -> anyhow::Result<Row> {
    let layout = layout_for(size)?;
    let payload: usize = layout.sections().map(|s| s.len as usize).sum();
    let opts = Options::default()
        .shm(
            ShmOptions::default()
                .slot_size(1 << 20)
                .slots(2)
                .spin(if spin {
                    Duration::MAX
                } else {
                    ShmOptions::default().spin
                }),
        )
        .device(DeviceOptions::new(device).slot_size(layout.total_len()));
    let addr = format!("cuda://bench-dev-{}", std::process::id());
    let id = ModelIdentity::default();
    let listener = Endpoint::bind(&addr, &id, opts.clone())?;
    let epoch = Instant::now();
    let (ack_tx, ack_rx) = mpsc::channel::<()>();
    type Sent = (Vec<Stamps>, u64);
    let h = std::thread::spawn(move || -> anyhow::Result<Sent> {
        let _pin = Pin::to(cpus.map(|c| c.sender));
        let mut tx = Endpoint::connect(&addr, &ModelIdentity::default(), opts)?;
        let layout = layout_for(size)?;
        // The producer's tensors, in device memory.
        let mut src = DeviceBuffer::new(device, payload)?;
        src.write(&vec![0x3c; payload])?;
        let base = src.span().addr;
        let now = || epoch.elapsed().as_nanos() as u64;
        let mut stamps = Vec::with_capacity(reps + 1);
        for _ in 0..=reps {
            idle(gap);
            let started = now();
            let mut loan = tx.loan_device(&layout)?;
            anyhow::ensure!(loan.on_device(), "the session has no device pool");
            let mut off = 0;
            for (i, s) in layout.sections().enumerate() {
                // SAFETY: `src` is `payload` bytes of device memory on the
                // session's device; each section reads its own part of it,
                // and nothing writes `src` while the copies run.
                unsafe { loan.write_from_device(i, base + off) }?;
                off += s.len;
            }
            let ready = loan.finish()?;
            let sent = now();
            ready.send()?;
            stamps.push(Stamps { started, sent });
            ack_rx.recv()?;
        }
        let s = tx.stats();
        Ok((stamps, s.host_to_device_bytes + s.device_to_host_bytes))
    });
    let _pin = Pin::to(cpus.map(|c| c.receiver));
    let rx = listener.accept(T)?;
    anyhow::ensure!(
        rx.session().transport == TransportKind::Cuda,
        "negotiated {}",
        rx.session().explain()
    );
    let mut ends = Vec::with_capacity(reps + 1);
    for _ in 0..=reps {
        let g = rx.recv(T)?;
        ends.push(epoch.elapsed().as_nanos() as u64);
        std::hint::black_box(g.device_section(0)?);
        drop(g);
        ack_tx.send(())?;
    }
    let (stamps, tx_host_bytes) = h.join().expect("sender thread")?;
    let r = rx.stats();
    let host_bytes = tx_host_bytes + r.host_to_device_bytes + r.device_to_host_bytes;
    let peak = dtod_peak_gbps(device, payload, reps.clamp(5, 50))?;
    let mut row = Row::handoffs("cuda", size, &stamps, &ends);
    let copy = payload as f64 / pct(row.produce_s.clone(), 0.5) / 1e9;
    row.extra = vec![
        ("copy_gbps", copy),
        ("dtod_peak_gbps", peak),
        ("copy_over_peak", copy / peak),
        ("host_device_bytes", host_bytes as f64),
    ];
    Ok(row)
}

/// Median rate of one plain device-to-device copy of `bytes`.
fn dtod_peak_gbps(device: Device, bytes: usize, reps: usize) -> anyhow::Result<f64> {
    let src = DeviceBuffer::new(device, bytes)?;
    let mut dst = DeviceBuffer::new(device, bytes)?;
    dst.copy_from(&src)?; // warm-up: first touch, mappings
    let times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from(&src).map(|()| t.elapsed().as_secs_f64())
        })
        .collect::<Result<_, _>>()?;
    Ok(bytes as f64 / pct(times, 0.5) / 1e9)
}
