//! The `rdma` transport on the emulated verbs device: between threads and
//! between processes, messages of 1 KiB to 256 MiB byte-compared, the TCP
//! fallback and its reasons, backpressure, a wrong remote key, and peers
//! killed mid-message. The same protocol code runs on a real device
//! (feature `rdma`); only the verbs backend differs.
//!
//! Child processes are this test binary re-executed with `AVP_TEST_ROLE`
//! set (see `child_role`).
#![cfg(target_os = "linux")]

#[path = "support/children.rs"]
mod children;

use std::time::{Duration, Instant};

use avp_transport::{
    Device, DeviceBuffer, DeviceOptions, Endpoint, KvAssembly, Options, RdmaDevice, RdmaOptions,
    Receiver, Sender, TransportError, TransportKind,
};
use avp_wire::{
    DType, Envelope, KvCacheDesc, KvLayout, LayerRange, MessageLayout, ModelIdentity, Payload,
};
use children::{kill_later, read_after, spawn_role};

const T: Duration = Duration::from_secs(30);

fn emulated() -> RdmaOptions {
    RdmaOptions::default()
        .device(RdmaDevice::Emulated)
        .loan_timeout(T)
}

fn options(r: RdmaOptions) -> Options {
    Options::default().rdma(r)
}

/// 4 layers × 2 heads × 64 × f16: 2 KiB of sections per position.
fn layout(seq: u64) -> MessageLayout {
    MessageLayout::new(
        &Envelope::default(),
        &Payload::KvCache(KvCacheDesc::new(4, 2, 64, seq, DType::F16, KvLayout::Hnd)),
    )
    .unwrap()
}

/// Positions of the messages byte-compared across processes: 2 KiB, a few
/// slices, 1 MiB, just over a 16 MiB slot (a dedicated region), 256 MiB.
const SIZES: [u64; 5] = [1, 37, 512, 8193, 131_072];

fn word(i: usize, j: usize, n: u64) -> u64 {
    (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (j as u64).wrapping_mul(31) ^ n
}

/// Fill section `i` with 8-byte words `word(i, j, n)` (fast enough in debug builds).
fn fill(s: &mut [u8], i: usize, n: u64) {
    for (j, c) in s.chunks_mut(8).enumerate() {
        c.copy_from_slice(&word(i, j, n).to_le_bytes()[..c.len()]);
    }
}

fn send(tx: &mut Sender, seq: u64, n: u64) {
    let l = layout(seq);
    let mut loan = tx.loan(&l).unwrap();
    for (i, s) in loan.writer().sections_mut().into_iter().enumerate() {
        fill(s, i, n);
    }
    loan.finish().unwrap().send().unwrap();
}

/// Receive message `n` of `seq` positions and compare every byte.
fn check(rx: &Receiver, seq: u64, n: u64) -> bool {
    let g = rx.recv(T).unwrap();
    let m = g.message();
    assert_eq!(m.total_len(), layout(seq).total_len() as u64, "message {n}");
    m.verify().unwrap();
    let mut want = Vec::new();
    for (i, s) in m.sections().enumerate() {
        want.resize(s.bytes.len(), 0);
        fill(&mut want, i, n);
        assert!(s.bytes == want.as_slice(), "message {n} section {i}");
    }
    let at = m.as_bytes().as_ptr() as usize;
    rx.pool_range().is_some_and(|r| r.contains(&at))
}

fn bind(r: RdmaOptions) -> avp_transport::Listener {
    Endpoint::bind("rdma://127.0.0.1:0", &ModelIdentity::default(), options(r)).unwrap()
}

#[test]
fn messages_round_trip_between_threads() {
    let listener = bind(emulated().slot_size(1 << 20).queue_pairs(3));
    let addr = listener.local_addr();
    assert!(addr.starts_with("rdma://127.0.0.1:"), "{addr}");
    let seqs = [1u64, 37, 100, 512, 600, 3];
    let sender = std::thread::spawn(move || {
        let r = emulated().queue_pairs(3);
        let mut tx = Endpoint::connect(&addr, &ModelIdentity::default(), options(r)).unwrap();
        for (n, seq) in seqs.into_iter().enumerate() {
            send(&mut tx, seq, n as u64);
        }
        (tx.session().clone(), tx.stats())
    });
    let rx = listener.accept(T).unwrap();
    assert_eq!(rx.session().transport, TransportKind::Rdma);
    let explain = rx.session().explain();
    assert!(explain.contains("emulated verbs device"), "{explain}");
    assert!(explain.contains("3 queue pairs"), "{explain}");
    for (n, seq) in seqs.into_iter().enumerate() {
        let in_pool = check(&rx, seq, n as u64);
        // Messages within a slot are read in the registered pool itself.
        assert_eq!(in_pool, layout(seq).total_len() <= 1 << 20, "message {n}");
    }
    let (session, stats) = sender.join().unwrap();
    assert_eq!(session.transport, TransportKind::Rdma);
    assert_eq!(session.id, rx.session().id);
    assert_eq!(stats.messages, 6);
    // 512 and 600 positions (with the header) exceed a 1 MiB slot.
    assert_eq!(stats.dedicated, 2);
    assert_eq!(rx.stats().dedicated, 2);
}

#[test]
fn without_a_device_on_both_ends_it_is_tcp_and_says_why() {
    // The listener has no device configured.
    let listener = Endpoint::bind(
        "rdma://127.0.0.1:0",
        &ModelIdentity::default(),
        Options::default(),
    )
    .unwrap();
    let addr = listener.local_addr();
    let t = std::thread::spawn(move || {
        let tx = Endpoint::connect(&addr, &ModelIdentity::default(), options(emulated())).unwrap();
        tx.session().clone()
    });
    let rx = listener.accept(T).unwrap();
    let s = t.join().unwrap();
    assert_eq!(s.transport, TransportKind::Tcp);
    assert!(
        s.explain()
            .contains("RDMA not used: the listener offers no RDMA device"),
        "{}",
        s.explain()
    );
    assert_eq!(rx.session().transport, TransportKind::Tcp);
    // The connecting side has none.
    let listener = bind(emulated());
    let addr = listener.local_addr();
    let t = std::thread::spawn(move || {
        let mut tx =
            Endpoint::connect(&addr, &ModelIdentity::default(), Options::default()).unwrap();
        send(&mut tx, 4, 1);
        tx.session().clone()
    });
    let rx = listener.accept(T).unwrap();
    let s = t.join().unwrap();
    assert_eq!(s.transport, TransportKind::Tcp);
    // Without the `rdma` feature none is configured; with it, none opens here
    // (no RDMA library or kernel support in CI), and the reason says which.
    let why = s.explain();
    assert!(
        why.contains("RDMA not used: no RDMA device: none configured")
            || why.contains("RDMA not used: no usable RDMA device"),
        "{why}"
    );
    check(&rx, 4, 1);
}

#[test]
fn options_out_of_range_are_refused_by_name() {
    for (r, name) in [
        (emulated().queue_pairs(0), "rdma.queue_pairs"),
        (emulated().slice(100), "rdma.slice"),
        (emulated().slots(65), "rdma.slots"),
    ] {
        let e = Endpoint::bind("rdma://127.0.0.1:0", &ModelIdentity::default(), options(r))
            .unwrap_err();
        assert!(matches!(e, TransportError::InvalidOption { option, .. } if option == name));
    }
    let e = Endpoint::bind(
        "rdma://127.0.0.1:0",
        &ModelIdentity::default(),
        options(RdmaOptions::default().device(RdmaDevice::Verbs("mlx5_9".into()))),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("mlx5_9"), "{e}");
}

#[test]
fn a_receiver_that_holds_every_slot_stops_the_sender_without_a_hang() {
    let listener = bind(emulated().slots(2));
    let addr = listener.local_addr();
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let sender = std::thread::spawn(move || {
        let r = emulated().loan_timeout(Duration::from_millis(300));
        let mut tx = Endpoint::connect(&addr, &ModelIdentity::default(), options(r)).unwrap();
        send(&mut tx, 8, 0);
        send(&mut tx, 8, 1);
        let l = layout(8);
        let started = Instant::now();
        let Err(e) = tx.loan(&l) else {
            panic!("no slot is free")
        };
        assert!(matches!(e, TransportError::Timeout(..)), "{e}");
        assert!(started.elapsed() >= Duration::from_millis(300));
        wait.recv().unwrap();
        send(&mut tx, 8, 2); // a slot came back
    });
    let rx = listener.accept(T).unwrap();
    let a = rx.recv(T).unwrap();
    let b = rx.recv(T).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    drop(a);
    go.send(()).unwrap();
    check(&rx, 8, 2);
    drop(b);
    sender.join().unwrap();
}

#[test]
fn a_wrong_remote_key_fails_both_ends_and_the_listener_serves_on() {
    let listener = bind(emulated());
    let addr = listener.local_addr();
    let a2 = addr.clone();
    let sender = std::thread::spawn(move || {
        let mut r = emulated();
        r.wrong_rkey_for_tests = true;
        let mut tx = Endpoint::connect(&a2, &ModelIdentity::default(), options(r)).unwrap();
        let l = layout(4);
        let mut loan = tx.loan(&l).unwrap();
        for (i, s) in loan.writer().sections_mut().into_iter().enumerate() {
            fill(s, i, 0);
        }
        loan.finish().unwrap().send().unwrap();
        // The refusal comes back as a completion: the next call reports it.
        let deadline = Instant::now() + T;
        loop {
            match tx.loan(&l) {
                Err(e) => return e.to_string(),
                Ok(loan) => drop(loan),
            }
            assert!(Instant::now() < deadline, "the write was never refused");
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let rx = listener.accept(T).unwrap();
    let Err(e) = rx.recv(T) else {
        panic!("nothing may be delivered")
    };
    let e = e.to_string();
    assert!(
        e.contains("IBV_WC_WR_FLUSH_ERR") || e.contains("peer"),
        "{e}"
    );
    let e = sender.join().unwrap();
    assert!(e.contains("IBV_WC_REM_ACCESS_ERR"), "{e}");
    // Another peer is served as usual.
    let t = std::thread::spawn(move || {
        let mut tx =
            Endpoint::connect(&addr, &ModelIdentity::default(), options(emulated())).unwrap();
        send(&mut tx, 3, 7);
    });
    let rx = listener.accept(T).unwrap();
    check(&rx, 3, 7);
    t.join().unwrap();
}

/// Device messages across processes: in device slots, and one (400 KiB) in
/// a dedicated device region.
const DEVICE_SEQS: [u64; 4] = [16, 24, 200, 32];

/// Options for GPUDirect RDMA on the emulated device: device slots of 256 KiB.
fn with_device(r: RdmaOptions) -> Options {
    options(r).device(DeviceOptions::new(Device::Emulated).slot_size(256 << 10))
}

/// Send a device message of `seq` positions (its sections copied in from
/// device buffers); whether it went into a device slot.
fn send_device(tx: &mut Sender, seq: u64, n: u64) -> bool {
    let l = layout(seq);
    let srcs: Vec<DeviceBuffer> = (0..l.section_count())
        .map(|i| {
            let mut bytes = vec![0u8; l.section(i).len as usize];
            fill(&mut bytes, i, n);
            let mut b = DeviceBuffer::new(Device::Emulated, bytes.len()).unwrap();
            b.write(&bytes).unwrap();
            b
        })
        .collect();
    let mut loan = tx.loan_device(&l).unwrap();
    let on_device = loan.on_device();
    for (i, s) in srcs.iter().enumerate() {
        // SAFETY: `s` is device memory of the section's length on the
        // session's device, unchanged until `finish`.
        unsafe { loan.write_from_device(i, s.span().addr) }.unwrap();
    }
    loan.finish().unwrap().send().unwrap();
    on_device
}

/// Receive device message `n` of `seq` positions; whether it arrived in device memory.
fn check_device(rx: &Receiver, seq: u64, n: u64) -> bool {
    let g = rx.recv(T).unwrap();
    let l = layout(seq);
    assert_eq!(g.header().total_len(), l.total_len() as u64);
    let mut want = Vec::new();
    for i in 0..l.section_count() {
        let mut got = vec![0u8; l.section(i).len as usize];
        g.copy_section_to_host(i, &mut got).unwrap();
        want.resize(got.len(), 0);
        fill(&mut want, i, n);
        assert!(got == want, "message {n} section {i}");
    }
    g.on_device()
}

#[test]
fn device_sections_go_device_to_device_in_slots_and_dedicated_regions() {
    let listener = Endpoint::bind(
        "rdma://127.0.0.1:0",
        &ModelIdentity::default(),
        with_device(emulated()),
    )
    .unwrap();
    let addr = listener.local_addr();
    let sender = std::thread::spawn(move || {
        let mut tx =
            Endpoint::connect(&addr, &ModelIdentity::default(), with_device(emulated())).unwrap();
        // 16 positions fit a 256 KiB device slot; 200 (400 KiB) get a
        // dedicated device region.
        let placed = [
            send_device(&mut tx, 16, 0),
            send_device(&mut tx, 200, 1),
            send_device(&mut tx, 40, 2),
        ];
        (tx.session().clone(), tx.stats(), placed)
    });
    let rx = listener.accept(T).unwrap();
    let explain = rx.session().explain();
    assert!(explain.contains("GPUDirect RDMA"), "{explain}");
    let arrived = [
        check_device(&rx, 16, 0),
        check_device(&rx, 200, 1),
        check_device(&rx, 40, 2),
    ];
    let (session, stats, placed) = sender.join().unwrap();
    assert!(
        session.explain().contains("GPUDirect RDMA"),
        "{}",
        session.explain()
    );
    assert_eq!(placed, [true; 3]);
    assert_eq!(arrived, [true; 3]);
    assert_eq!((stats.device_messages, stats.dedicated), (3, 1));
    assert_eq!(rx.stats().device_messages, 3);
    assert_eq!(rx.stats().dedicated, 1);
    // Not a byte of the sections crossed into host memory on the sender.
    assert_eq!(stats.device_to_host_bytes, 0);
}

#[test]
fn device_memory_on_one_end_only_is_said_and_host_memory_is_used() {
    let listener = bind(emulated());
    let addr = listener.local_addr();
    let sender = std::thread::spawn(move || {
        let mut tx =
            Endpoint::connect(&addr, &ModelIdentity::default(), with_device(emulated())).unwrap();
        assert!(!send_device(&mut tx, 16, 0));
        tx.session().clone()
    });
    let rx = listener.accept(T).unwrap();
    assert!(!check_device(&rx, 16, 0));
    let s = sender.join().unwrap();
    assert!(
        s.explain()
            .contains("device memory not used: the listener has no device slots"),
        "{}",
        s.explain()
    );
}

/// Entry point of the child processes; does nothing in a normal test run.
#[test]
fn child_role() {
    let Some((role, arg)) = children::role() else {
        return;
    };
    let id = ModelIdentity::default();
    match role.as_str() {
        "receiver" => {
            let listener = bind(emulated());
            println!("ADDR {}", listener.local_addr());
            let rx = listener.accept(T).unwrap();
            assert_eq!(rx.session().transport, TransportKind::Rdma);
            for (n, seq) in SIZES.into_iter().enumerate() {
                check(&rx, seq, n as u64);
            }
            let e = rx.recv(T).err().unwrap();
            assert!(matches!(e, TransportError::PeerGone(_)), "{e}");
        }
        "first_then_gone" => {
            let listener = bind(emulated());
            println!("ADDR {}", listener.local_addr());
            let rx = listener.accept(T).unwrap();
            check(&rx, 64, 0);
            println!("GOT");
            std::thread::sleep(Duration::from_secs(600));
        }
        "flushed_receiver" => {
            let listener = bind(emulated());
            println!("ADDR {}", listener.local_addr());
            let rx = listener.accept(T).unwrap();
            let Err(e) = rx.recv(T) else {
                panic!("a write with a wrong key was delivered")
            };
            assert!(e.to_string().contains("IBV_WC_WR_FLUSH_ERR"), "{e}");
        }
        "holding_receiver" => {
            let listener = bind(emulated().slots(2));
            println!("ADDR {}", listener.local_addr());
            let rx = listener.accept(T).unwrap();
            let held = (rx.recv(T).unwrap(), rx.recv(T).unwrap());
            println!("HOLDING");
            std::thread::sleep(Duration::from_secs(600));
            drop(held);
        }
        "layered_sender" => {
            // One message per layer, a layer every 40 ms (the model computing it).
            let mut tx = Endpoint::connect(&arg, &id, options(emulated())).unwrap();
            let desc = KvCacheDesc::new(8, 2, 64, 700, DType::F16, KvLayout::Hnd);
            for l in 0..8u32 {
                std::thread::sleep(Duration::from_millis(40));
                let one = Payload::KvCache(desc.with_layers(LayerRange::new(l, l + 1)));
                let layout = MessageLayout::new(&Envelope::default(), &one).unwrap();
                let mut loan = tx.loan(&layout).unwrap();
                for (i, s) in loan.writer().sections_mut().into_iter().enumerate() {
                    fill(s, i, u64::from(l));
                }
                loan.finish().unwrap().send().unwrap();
            }
        }
        "device_receiver" => {
            let listener = Endpoint::bind(
                "rdma://127.0.0.1:0",
                &ModelIdentity::default(),
                with_device(emulated()),
            )
            .unwrap();
            println!("ADDR {}", listener.local_addr());
            let rx = listener.accept(T).unwrap();
            for (n, seq) in DEVICE_SEQS.into_iter().enumerate() {
                assert!(check_device(&rx, seq, n as u64));
            }
        }
        "endless_sender" => {
            let mut tx = Endpoint::connect(&arg, &id, options(emulated())).unwrap();
            for n in 0.. {
                send(&mut tx, 8193, n);
            }
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn messages_of_1k_to_256m_cross_processes_intact() {
    let mut child = spawn_role("receiver", "");
    let addr = read_after(&mut child, "ADDR ");
    let mut tx = Endpoint::connect(&addr, &ModelIdentity::default(), options(emulated())).unwrap();
    assert_eq!(tx.session().transport, TransportKind::Rdma);
    for (n, seq) in SIZES.into_iter().enumerate() {
        send(&mut tx, seq, n as u64);
    }
    drop(tx);
    let status = child.wait().unwrap();
    assert!(status.success(), "the receiving process failed: {status}");
}

#[test]
fn a_sender_killed_mid_message_is_an_error_not_a_hang() {
    let listener = bind(emulated());
    let child = spawn_role("endless_sender", &listener.local_addr());
    let rx = listener.accept(T).unwrap();
    let g = rx.recv(T).unwrap();
    drop(g);
    let killer = kill_later(child, Duration::from_millis(5));
    let started = Instant::now();
    let e = loop {
        match rx.recv(T) {
            Ok(g) => drop(g),
            Err(e) => break e,
        }
    };
    assert!(matches!(e, TransportError::PeerGone(_)), "{e}");
    assert!(started.elapsed() < T, "{e}");
    killer.join().unwrap();
    // The listener keeps serving.
    let addr = listener.local_addr();
    let t = std::thread::spawn(move || {
        let mut tx =
            Endpoint::connect(&addr, &ModelIdentity::default(), options(emulated())).unwrap();
        send(&mut tx, 2, 5);
    });
    check(&listener.accept(T).unwrap(), 2, 5);
    t.join().unwrap();
}

#[test]
fn a_receiver_killed_mid_session_fails_the_sender_with_the_status() {
    let mut child = spawn_role("first_then_gone", "");
    let addr = read_after(&mut child, "ADDR ");
    let mut tx = Endpoint::connect(&addr, &ModelIdentity::default(), options(emulated())).unwrap();
    send(&mut tx, 64, 0);
    read_after(&mut child, "GOT");
    child.kill().unwrap();
    child.wait().unwrap();
    let started = Instant::now();
    let l = layout(64);
    let e = loop {
        let r = tx.loan(&l).and_then(|mut loan| {
            for s in loan.writer().sections_mut() {
                s.fill(1);
            }
            loan.finish()?.send()
        });
        if let Err(e) = r {
            break e;
        }
        assert!(started.elapsed() < T, "the sender never noticed");
    };
    let s = e.to_string();
    assert!(
        s.contains("IBV_WC_RETRY_EXC_ERR") || matches!(e, TransportError::PeerGone(_)),
        "{s}"
    );
}

#[test]
fn layers_are_ready_one_by_one_while_later_ones_are_produced() {
    // Every layer (1.4 MiB, over a 1 MiB slot: dedicated regions) held at once.
    let listener = bind(emulated().slots(8).slot_size(1 << 20));
    let mut child = spawn_role("layered_sender", &listener.local_addr());
    let rx = listener.accept(T).unwrap();
    let mut cache = KvAssembly::new(&rx);
    let mut at = Vec::new();
    for l in 0..8u32 {
        let layer = cache.wait_layer(l, T).unwrap();
        at.push(Instant::now());
        assert_eq!(layer.index, l);
        let mut want = vec![0u8; layer.k.len()];
        fill(&mut want, 0, u64::from(l));
        assert!(layer.k == want.as_slice(), "layer {l} K");
        fill(&mut want, 1, u64::from(l));
        assert!(layer.v == want.as_slice(), "layer {l} V");
        // Nothing of a later layer was needed to hand out this one.
        assert_eq!(cache.ready(), l + 1, "layer {l}");
    }
    assert!(cache.is_complete());
    // Layer 0 was in hand while the sender was still producing the others
    // (7 more layers, 40 ms apart).
    let spread = at[7] - at[0];
    assert!(spread >= Duration::from_millis(200), "{spread:?}");
    assert!(child.wait().unwrap().success());
}

#[test]
fn device_messages_cross_processes_device_to_device() {
    let mut child = spawn_role("device_receiver", "");
    let addr = read_after(&mut child, "ADDR ");
    let mut tx =
        Endpoint::connect(&addr, &ModelIdentity::default(), with_device(emulated())).unwrap();
    for (n, seq) in DEVICE_SEQS.into_iter().enumerate() {
        assert!(send_device(&mut tx, seq, n as u64));
    }
    assert_eq!(tx.stats().device_to_host_bytes, 0);
    drop(tx);
    assert!(child.wait().unwrap().success());
}

#[test]
fn across_processes_a_wrong_key_fails_both_ends() {
    let mut child = spawn_role("flushed_receiver", "");
    let addr = read_after(&mut child, "ADDR ");
    let mut r = emulated();
    r.wrong_rkey_for_tests = true;
    let mut tx = Endpoint::connect(&addr, &ModelIdentity::default(), options(r)).unwrap();
    let l = layout(4);
    let mut loan = tx.loan(&l).unwrap();
    for s in loan.writer().sections_mut() {
        s.fill(3);
    }
    loan.finish().unwrap().send().unwrap();
    let deadline = Instant::now() + T;
    let e = loop {
        match tx.loan(&l) {
            Err(e) => break e.to_string(),
            Ok(loan) => drop(loan),
        }
        assert!(Instant::now() < deadline, "the write was never refused");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(e.contains("IBV_WC_REM_ACCESS_ERR"), "{e}");
    assert!(
        child.wait().unwrap().success(),
        "the receiver saw the flush"
    );
}

#[test]
fn across_processes_a_receiver_that_stops_releasing_stops_the_sender_without_a_hang() {
    let mut child = spawn_role("holding_receiver", "");
    let addr = read_after(&mut child, "ADDR ");
    let r = emulated().loan_timeout(Duration::from_millis(300));
    let mut tx = Endpoint::connect(&addr, &ModelIdentity::default(), options(r)).unwrap();
    send(&mut tx, 8, 0);
    send(&mut tx, 8, 1);
    read_after(&mut child, "HOLDING");
    let started = Instant::now();
    let Err(e) = tx.loan(&layout(8)) else {
        panic!("no slot is free")
    };
    assert!(matches!(e, TransportError::Timeout(..)), "{e}");
    assert!(started.elapsed() < T);
    child.kill().unwrap();
    child.wait().unwrap();
}
