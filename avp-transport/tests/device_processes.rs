//! The `cuda` transport between real processes: the device pool's descriptor
//! crosses on SCM_RIGHTS and is mapped once, messages in device slots and
//! dedicated allocations arrive intact, a receiver keeps reading what it
//! holds after the exporter is gone, and peers killed mid-copy yield errors.
//!
//! The device is `AVP_TEST_DEVICE` (`emulated`, the default: host memory
//! standing in for a GPU; or `cuda:N` on a machine with an NVIDIA GPU, built
//! with `--features cuda`). With `AVP_REQUIRE_GPU=1` a run that is not on a
//! GPU fails instead of passing on the emulation. On the emulated device the
//! tests also check that no descriptor or mapping leaks (a GPU driver keeps
//! descriptors of its own).
//!
//! Child processes are this test binary re-executed with `AVP_TEST_ROLE`
//! set (see `child_role`).
#![cfg(target_os = "linux")]

#[path = "support/children.rs"]
mod children;
use children::{kill_later, resources, spawn_role, wait_for};
use std::time::{Duration, Instant};

use avp_transport::{
    Device, DeviceBuffer, DeviceOptions, Endpoint, Options, ShmOptions, TransportError,
    TransportKind,
};
use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, MessageLayout, ModelIdentity, Payload};

const T: Duration = Duration::from_secs(30);

/// These tests count the process's descriptors and mappings: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The device under test (see the module docs).
fn device() -> Device {
    let d = std::env::var("AVP_TEST_DEVICE")
        .ok()
        .map(|s| s.parse::<Device>().unwrap())
        .unwrap_or(Device::Emulated);
    if std::env::var("AVP_REQUIRE_GPU").as_deref() == Ok("1") {
        assert!(
            matches!(d, Device::Cuda(_)),
            "AVP_REQUIRE_GPU=1 but AVP_TEST_DEVICE is {d}"
        );
    }
    d
}

fn options() -> Options {
    Options::default()
        .shm(ShmOptions::default().slots(2).loan_timeout(T))
        .device(DeviceOptions::new(device()).slot_size(256 << 10))
}

/// Descriptors and mappings, compared before and after on the emulated
/// device only (a GPU driver opens descriptors of its own as it goes).
fn leak_check() -> Option<(usize, usize)> {
    (device() == Device::Emulated).then(resources)
}

/// 4 layers × K/V of `seq` positions: 8 KiB per section per 16 positions.
fn layout(seq: u64) -> MessageLayout {
    MessageLayout::new(
        &Envelope::default(),
        &Payload::KvCache(KvCacheDesc::new(4, 4, 32, seq, DType::F32, KvLayout::Hnd)),
    )
    .unwrap()
}

/// The bytes of section `i` of message `round`.
fn pattern(l: &MessageLayout, i: usize, round: u8) -> Vec<u8> {
    (0..l.section(i).len as usize)
        .map(|b| (b as u8).wrapping_mul(13) ^ (i as u8).wrapping_mul(7) ^ round)
        .collect()
}

/// Sizes of the rounds: device slots and, at 4096 positions (2 MiB a
/// section), dedicated allocations.
const ROUNDS: [(u8, u64); 4] = [(1, 16), (2, 4096), (3, 64), (4, 16)];

/// Send every round of [`ROUNDS`] with device-to-device copies from the
/// producer's device buffers.
fn send_rounds(tx: &mut avp_transport::Sender) {
    for (round, seq) in ROUNDS {
        let l = layout(seq);
        let srcs: Vec<DeviceBuffer> = (0..l.section_count())
            .map(|i| {
                let bytes = pattern(&l, i, round);
                let mut b = DeviceBuffer::new(device(), bytes.len()).unwrap();
                b.write(&bytes).unwrap();
                b
            })
            .collect();
        let mut loan = tx.loan_device(&l).unwrap();
        assert!(loan.on_device());
        for (i, s) in srcs.iter().enumerate() {
            // SAFETY: `s` is device memory of the section's length on the
            // session's device, unchanged until `finish`.
            unsafe { loan.write_from_device(i, s.span().addr) }.unwrap();
        }
        loan.finish().unwrap().send().unwrap();
    }
}

/// Check that `g` is round `round` of `seq` positions, byte for byte.
fn check_round(g: &avp_transport::RecvGuard, round: u8, seq: u64) {
    let l = layout(seq);
    assert!(g.on_device());
    assert_eq!(g.header().total_len(), l.total_len() as u64);
    for i in 0..l.section_count() {
        let mut got = vec![0u8; l.section(i).len as usize];
        g.copy_section_to_host(i, &mut got).unwrap();
        assert!(got == pattern(&l, i, round), "round {round} section {i}");
    }
}

/// Entry point of the child processes; does nothing in a normal test run.
#[test]
fn child_role() {
    let Some((role, arg)) = children::role() else {
        return;
    };
    let id = ModelIdentity::default();
    match role.as_str() {
        "sender" => {
            let mut tx = Endpoint::connect(&arg, &id, options()).unwrap();
            assert_eq!(tx.session().transport, TransportKind::Cuda);
            send_rounds(&mut tx);
            println!("sent");
        }
        "stall_sender" => {
            let mut tx = Endpoint::connect(&arg, &id, options()).unwrap();
            let l = layout(4096); // a dedicated allocation, half written
            let mut loan = tx.loan_device(&l).unwrap();
            let mut src = DeviceBuffer::new(device(), l.section(0).len as usize).unwrap();
            src.write(&pattern(&l, 0, 9)).unwrap();
            // SAFETY: as in `send_rounds`.
            unsafe { loan.write_from_device(0, src.span().addr) }.unwrap();
            println!("stalled");
            std::thread::sleep(Duration::from_secs(600));
        }
        "holding_receiver" => {
            let listener = Endpoint::bind(&arg, &id, options()).unwrap();
            println!("bound");
            let rx = listener.accept(T).unwrap();
            let a = rx.recv(T).unwrap();
            let b = rx.recv(T).unwrap();
            println!("holding");
            std::thread::sleep(Duration::from_secs(600));
            drop((a, b));
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn device_messages_cross_processes_and_outlive_their_exporter() {
    let _serial = serial();
    let id = ModelIdentity::default();
    drop(
        Endpoint::bind(
            &format!("cuda://warm-{}", std::process::id()),
            &id,
            options(),
        )
        .unwrap(),
    );
    let before = leak_check();
    {
        let name = format!("cuda://dev-proc-{}", std::process::id());
        let listener = Endpoint::bind(&name, &id, options()).unwrap();
        let mut child = spawn_role("sender", &name);
        let rx = listener.accept(T).unwrap();
        assert_eq!(rx.session().transport, TransportKind::Cuda);
        let why = rx.session().explain();
        match device() {
            Device::Emulated => assert!(why.contains("emulate"), "{why}"),
            _ => assert!(why.contains("GPU"), "{why}"),
        }
        println!("{why}");
        // Two slots: the sender can only finish once we give slots back.
        let first = rx.recv(T).unwrap();
        let second = rx.recv(T).unwrap();
        check_round(&first, ROUNDS[0].0, ROUNDS[0].1);
        check_round(&second, ROUNDS[1].0, ROUNDS[1].1);
        drop(first);
        let third = rx.recv(T).unwrap();
        drop(second);
        let fourth = rx.recv(T).unwrap();
        // Hold the last two while the sender exits: its process, the
        // exporter of the pool, is gone.
        wait_for(&mut child, "sent");
        assert!(child.wait().unwrap().success());
        check_round(&third, ROUNDS[2].0, ROUNDS[2].1);
        check_round(&fourth, ROUNDS[3].0, ROUNDS[3].1);
        let e = rx.recv(T).expect_err("the sender is gone");
        assert!(matches!(e, TransportError::PeerGone(_)), "{e}");
        // Still readable after the exporter exited and the session ended.
        check_round(&fourth, ROUNDS[3].0, ROUNDS[3].1);
        assert_eq!(rx.stats().device_messages, 4);
    }
    assert_eq!(leak_check(), before, "(fds, avp mappings) before vs after");
}

#[test]
fn device_messages_in_order_with_a_dedicated_one_held_past_the_exit() {
    let _serial = serial();
    let id = ModelIdentity::default();
    let name = format!("cuda://dev-order-{}", std::process::id());
    let listener = Endpoint::bind(&name, &id, options()).unwrap();
    let mut child = spawn_role("sender", &name);
    let rx = listener.accept(T).unwrap();
    let mut held = Vec::new();
    for (round, seq) in ROUNDS {
        let g = rx.recv(T).unwrap();
        check_round(&g, round, seq);
        if seq == 4096 {
            held.push(g); // a dedicated allocation (its slot's host part too)
        }
    }
    wait_for(&mut child, "sent");
    assert!(child.wait().unwrap().success());
    check_round(&held[0], ROUNDS[1].0, ROUNDS[1].1);
}

#[test]
fn peers_killed_mid_copy_yield_errors_and_leak_nothing() {
    let _serial = serial();
    let id = ModelIdentity::default();
    drop(
        Endpoint::bind(
            &format!("cuda://warm2-{}", std::process::id()),
            &id,
            options(),
        )
        .unwrap(),
    );
    let before = leak_check();
    // 1. The sender dies mid-copy (a dedicated device allocation half
    //    written, the message announced as being produced): the waiting
    //    receiver gets `PeerGone`, not a hang.
    {
        let name = format!("cuda://dev-stall-{}", std::process::id());
        let listener = Endpoint::bind(&name, &id, options()).unwrap();
        let mut child = spawn_role("stall_sender", &name);
        let rx = listener.accept(T).unwrap();
        wait_for(&mut child, "stalled");
        let t = Instant::now();
        let killer = kill_later(child, Duration::from_millis(300));
        let e = rx.recv(T).expect_err("the sender died");
        assert!(matches!(e, TransportError::PeerGone(_)), "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        killer.join().unwrap();
    }
    // 2. The receiver dies holding every slot: the sender's next device
    //    loan ends with an error, not the loan timeout.
    {
        let name = format!("cuda://dev-holder-{}", std::process::id());
        let mut child = spawn_role("holding_receiver", &name);
        wait_for(&mut child, "bound");
        let mut tx = Endpoint::connect(&name, &id, options()).unwrap();
        assert_eq!(tx.session().transport, TransportKind::Cuda);
        let l = layout(16);
        for _ in 0..2 {
            let mut loan = tx.loan_device(&l).unwrap();
            for i in 0..l.section_count() {
                loan.section(i).unwrap();
            }
            loan.finish().unwrap().send().unwrap();
        }
        wait_for(&mut child, "holding");
        let t = Instant::now();
        let killer = kill_later(child, Duration::from_millis(300));
        let e = tx.loan_device(&l).expect_err("the receiver died");
        assert!(matches!(e, TransportError::PeerGone(_)), "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        killer.join().unwrap();
    }
    assert_eq!(leak_check(), before, "(fds, avp mappings) before vs after");
}
