//! Both halves in one process (threads): the protocol, zero copy, backpressure,
//! authentication and session rules, over shared memory and TCP.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use avp_transport::{Endpoint, Options, ShmOptions, TcpOptions, TransportError, TransportKind};
use avp_wire::{
    DType, Envelope, KvCacheDesc, KvLayout, MessageLayout, Mode, ModelIdentity, Payload,
};

const T: Duration = Duration::from_secs(10);

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn identity() -> ModelIdentity {
    ModelIdentity {
        model_family: "llama".into(),
        model_id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
        model_hash: "ab".repeat(32),
        hidden_dim: 576,
        num_layers: 30,
        num_kv_heads: 3,
        head_dim: 64,
        ..Default::default()
    }
}

fn layout(seq: u64) -> MessageLayout {
    MessageLayout::new(
        &Envelope::default(),
        &Payload::KvCache(KvCacheDesc::new(4, 2, 64, seq, DType::F16, KvLayout::Hnd)),
    )
    .unwrap()
}

fn fill(i: usize, j: usize, n: u32) -> u8 {
    (i as u32 * 31 + j as u32 * 7 + n) as u8
}

/// Loan a message of layout `l`, fill section `i` byte `j` with `fill(i, j, n)`, send it.
fn send_filled(tx: &mut avp_transport::Sender, l: &MessageLayout, n: u32) {
    let mut loan = tx.loan(l).unwrap();
    for (i, s) in loan.writer().sections_mut().into_iter().enumerate() {
        s.iter_mut()
            .enumerate()
            .for_each(|(j, b)| *b = fill(i, j, n));
    }
    loan.finish().unwrap().send().unwrap();
}

/// Verify message `n` sent by [`send_filled`]: checksums and every byte.
fn check_filled(m: &avp_wire::Message<'_>, n: u32, what: &str) {
    m.verify().unwrap();
    for (i, s) in m.sections().enumerate() {
        assert!(
            s.bytes.iter().enumerate().all(|(j, &b)| b == fill(i, j, n)),
            "{what}message {n} section {i}"
        );
    }
}

/// Send `count` KV messages of `seq` positions from a thread; receive and check every byte.
fn round_trip(addr: &str, opts: Options, seq: u64, count: u32) -> (TransportKind, bool) {
    let listener = Endpoint::bind(addr, &identity(), opts.clone()).unwrap();
    let connect_to = listener.local_addr();
    let sender = std::thread::spawn(move || {
        let mut tx = Endpoint::connect(&connect_to, &identity(), opts).unwrap();
        let l = layout(seq);
        for n in 0..count {
            send_filled(&mut tx, &l, n);
        }
        tx.session().clone()
    });
    let rx = listener.accept(T).unwrap();
    let mut zero_copy = true;
    for n in 0..count {
        let g = rx.recv(T).unwrap();
        let m = g.message();
        check_filled(m, n, "");
        if let Some(r) = rx.pool_range() {
            zero_copy &= r.contains(&(m.as_bytes().as_ptr() as usize)) || m.total_len() > 16 << 20;
        } else {
            zero_copy = false;
        }
    }
    let s = sender.join().unwrap();
    assert_eq!(s.id, rx.session().id);
    assert_eq!(s.mode, Mode::Latent);
    (rx.session().transport, zero_copy)
}

#[test]
fn shm_round_trip_is_zero_copy() {
    let (kind, zero_copy) = round_trip(
        &format!("shm://{}", unique("rt")),
        Options::default(),
        16,
        20,
    );
    assert_eq!(kind, TransportKind::Shm);
    assert!(zero_copy, "received sections must lie in the shared pool");
}

#[test]
fn shm_large_messages_use_dedicated_segments() {
    let opts = Options::default().shm(ShmOptions::default().slot_size(64 << 10));
    let (kind, _) = round_trip(&format!("shm://{}", unique("big")), opts, 2048, 3);
    assert_eq!(kind, TransportKind::Shm);
}

#[test]
fn tcp_without_upgrade_stays_on_tcp() {
    let opts = Options::default().tcp(TcpOptions::default().shm_upgrade(false));
    let (kind, _) = round_trip("tcp://127.0.0.1:0", opts, 64, 10);
    assert_eq!(kind, TransportKind::Tcp);
}

#[test]
fn tcp_on_the_same_host_switches_to_shm() {
    let (kind, zero_copy) = round_trip("tcp://127.0.0.1:0", Options::default(), 16, 5);
    assert_eq!(kind, TransportKind::Shm);
    assert!(zero_copy);
}

#[test]
fn tcp_vectored_send_sections() {
    let opts = Options::default().tcp(TcpOptions::default().shm_upgrade(false));
    let listener = Endpoint::bind("tcp://127.0.0.1:0", &identity(), opts.clone()).unwrap();
    let addr = listener.local_addr();
    let h = std::thread::spawn(move || {
        let mut tx = Endpoint::connect(&addr, &identity(), opts).unwrap();
        let l = layout(8);
        let data: Vec<Vec<u8>> = l
            .sections()
            .enumerate()
            .map(|(i, s)| vec![i as u8; s.len as usize])
            .collect();
        let refs: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
        tx.send_sections(&l, &refs).unwrap();
        tx.send_bytes(&l.encode_to_vec(&refs).unwrap()).unwrap();
    });
    let rx = listener.accept(T).unwrap();
    for _ in 0..2 {
        let g = rx.recv(T).unwrap();
        g.message().verify().unwrap();
        assert_eq!(g.message().kv().unwrap().v(3).unwrap()[0], 7);
    }
    h.join().unwrap();
}

#[test]
fn backpressure_times_out_then_recovers() {
    let opts = Options::default().shm(
        ShmOptions::default()
            .slots(2)
            .loan_timeout(Duration::from_millis(200)),
    );
    let name = format!("shm://{}", unique("bp"));
    let listener = Endpoint::bind(&name, &identity(), opts.clone()).unwrap();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<String>();
    let h = std::thread::spawn(move || {
        let mut tx = Endpoint::connect(&name, &identity(), opts).unwrap();
        let l = layout(4);
        for _ in 0..2 {
            let mut loan = tx.loan(&l).unwrap();
            loan.writer().sections_mut();
            loan.finish().unwrap().send().unwrap();
        }
        // Both slots are held by the receiver: the third loan must time out.
        let e = tx.loan(&l).expect_err("no free slot");
        done_tx.send(e.to_string()).unwrap();
        go_rx.recv().unwrap();
        let mut loan = tx.loan(&l).unwrap();
        loan.writer().sections_mut();
        loan.finish().unwrap().send().unwrap();
    });
    let rx = listener.accept(T).unwrap();
    let a = rx.recv(T).unwrap();
    let b = rx.recv(T).unwrap();
    let err = done_rx.recv().unwrap();
    assert!(
        err.contains("timed out") && err.contains("free shared-memory slot"),
        "{err}"
    );
    drop((a, b));
    go_tx.send(()).unwrap();
    rx.recv(T).unwrap().message().verify().unwrap();
    h.join().unwrap();
}

#[test]
fn wrong_token_is_refused_and_nothing_is_delivered() {
    let server = Options::default().token("right");
    let name = format!("shm://{}", unique("auth"));
    let listener = Endpoint::bind(&name, &identity(), server).unwrap();
    // The listener serves three peers in turn: wrong token, no token, right token.
    let h = std::thread::spawn(move || {
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            match listener.accept(T) {
                Ok(rx) => {
                    let g = rx.recv(T).unwrap();
                    g.message().verify().unwrap();
                    outcomes.push("delivered".to_string());
                }
                Err(e) => outcomes.push(e.to_string()),
            }
        }
        outcomes
    });
    let bad = Options::default().token("wrong");
    let e1 = Endpoint::connect(&name, &identity(), bad).expect_err("wrong token refused");
    assert!(matches!(e1, TransportError::Auth(_)), "{e1}");
    let e2 = Endpoint::connect(&name, &identity(), Options::default())
        .expect_err("missing token refused");
    assert!(e2.to_string().contains("requires a token"), "{e2}");
    let good = Options::default().token("right");
    let mut tx = Endpoint::connect(&name, &identity(), good).unwrap();
    let l = layout(2);
    let mut loan = tx.loan(&l).unwrap();
    loan.writer().sections_mut();
    loan.finish().unwrap().send().unwrap();
    let outcomes = h.join().unwrap();
    assert!(
        outcomes[0].contains("authentication failed"),
        "{outcomes:?}"
    );
    assert!(!outcomes[1].contains("delivered"), "{outcomes:?}");
    assert_eq!(outcomes[2], "delivered", "{outcomes:?}");
}

#[test]
fn expired_sessions_and_foreign_session_ids_are_refused() {
    let opts = Options::default().session_ttl(Duration::from_millis(300));
    let name = format!("shm://{}", unique("ttl"));
    let listener = Endpoint::bind(&name, &identity(), opts.clone()).unwrap();
    let h = std::thread::spawn(move || {
        let mut tx = Endpoint::connect(&name, &identity(), opts).unwrap();
        let env = Envelope {
            session_id: "not-this-session".into(),
            ..Default::default()
        };
        let l = MessageLayout::new(
            &env,
            &Payload::KvCache(KvCacheDesc::new(1, 1, 8, 1, DType::F32, KvLayout::Hnd)),
        )
        .unwrap();
        let mut loan = tx.loan(&l).unwrap();
        loan.writer().sections_mut();
        loan.finish().unwrap().send().unwrap();
        std::thread::sleep(Duration::from_millis(400));
        let e = tx.loan(&layout(1)).expect_err("expired");
        assert!(matches!(e, TransportError::SessionExpired { .. }), "{e}");
    });
    let rx = listener.accept(T).unwrap();
    let e = rx.recv(T).expect_err("foreign session id");
    assert!(matches!(e, TransportError::WrongSession { .. }), "{e}");
    h.join().unwrap();
    let e = rx.recv(T).expect_err("expired");
    assert!(matches!(e, TransportError::SessionExpired { .. }), "{e}");
    assert!(e.to_string().contains("expired"));
    let e = rx.try_recv().expect_err("polling an expired session");
    assert!(matches!(e, TransportError::SessionExpired { .. }), "{e}");
}

#[test]
fn cross_model_identities_negotiate_json_or_latent() {
    let name = format!("shm://{}", unique("mode"));
    let listener = Endpoint::bind(&name, &identity(), Options::default()).unwrap();
    let h = std::thread::spawn(move || {
        let other = ModelIdentity {
            model_family: "qwen2".into(),
            model_id: "Qwen/Qwen2.5-Coder-0.5B-Instruct".into(),
            model_hash: "cd".repeat(32),
            hidden_dim: 896,
            num_layers: 24,
            ..Default::default()
        };
        let tx = Endpoint::connect(&name, &other, Options::default()).unwrap();
        tx.session().clone()
    });
    let rx = listener.accept(T).unwrap();
    let s = h.join().unwrap();
    assert_eq!(s.mode, Mode::Json);
    assert_eq!(rx.session().mode, Mode::Json);
    assert!(
        rx.session().explain().contains("json_fallback"),
        "{}",
        rx.session().explain()
    );
    assert!(s.explain().contains("transport shm"), "{}", s.explain());
}

/// Poll `rx.try_recv()` until it yields a message or an error (bounded).
fn poll_next(rx: &avp_transport::Receiver) -> avp_transport::Result<avp_transport::RecvGuard> {
    let deadline = std::time::Instant::now() + T;
    loop {
        if let Some(g) = rx.try_recv()? {
            return Ok(g);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no message within {T:?}"
        );
        std::hint::spin_loop();
    }
}

#[test]
fn try_recv_polls_without_waiting_over_shm_and_tcp() {
    for (addr, kind) in [
        (format!("shm://{}", unique("poll")), TransportKind::Shm),
        ("tcp://127.0.0.1:0".to_string(), TransportKind::Tcp),
    ] {
        let opts =
            Options::default().tcp(TcpOptions::default().shm_upgrade(kind == TransportKind::Shm));
        let listener = Endpoint::bind(&addr, &identity(), opts.clone()).unwrap();
        let connect_to = listener.local_addr();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let sender = std::thread::spawn(move || {
            let mut tx = Endpoint::connect(&connect_to, &identity(), opts).unwrap();
            go_rx.recv().unwrap();
            let l = layout(64);
            for n in 0..3 {
                send_filled(&mut tx, &l, n);
            }
        });
        let rx = listener.accept(T).unwrap();
        assert_eq!(rx.session().transport, kind);
        for _ in 0..1000 {
            assert!(
                rx.try_recv().unwrap().is_none(),
                "{kind:?}: nothing sent yet"
            );
        }
        go_tx.send(()).unwrap();
        for n in 0..3 {
            let g = poll_next(&rx).unwrap();
            check_filled(g.message(), n, &format!("{kind:?}: "));
        }
        sender.join().unwrap();
        // The sender is gone: polling ends in an error, not in endless `None`s.
        let e = poll_next(&rx).expect_err("the sender left");
        assert!(matches!(e, TransportError::PeerGone(_)), "{kind:?}: {e}");
    }
}

#[test]
fn spin_mode_delivers_large_messages_intact() {
    // Writing 8 MiB takes long enough for the spinning receiver to rehearse its
    // receive path many times; the rehearsals must change nothing.
    let opts = Options::default().shm(
        ShmOptions::default()
            .spin(Duration::MAX)
            .slot_size(16 << 20),
    );
    let (kind, zero_copy) = round_trip(&format!("shm://{}", unique("spin")), opts, 8192, 6);
    assert_eq!(kind, TransportKind::Shm);
    assert!(zero_copy);
}

#[test]
fn unbounded_timeouts_wait_instead_of_panicking() {
    // `Duration::MAX` means "as long as it takes" everywhere: accepting,
    // loaning, spinning and receiving (a deadline of now + MAX would overflow).
    for (addr, spin, upgrade) in [
        (format!("shm://{}", unique("forever")), Duration::MAX, true),
        ("tcp://127.0.0.1:0".to_string(), Duration::ZERO, false),
    ] {
        let opts = Options::default()
            .shm(ShmOptions::default().spin(spin).loan_timeout(Duration::MAX))
            .tcp(TcpOptions::default().shm_upgrade(upgrade));
        let listener = Endpoint::bind(&addr, &identity(), opts.clone()).unwrap();
        let connect_to = listener.local_addr();
        let sender = std::thread::spawn(move || {
            let mut tx = Endpoint::connect(&connect_to, &identity(), opts).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            send_filled(&mut tx, &layout(16), 7);
        });
        let rx = listener.accept(Duration::MAX).unwrap();
        let g = rx.recv(Duration::MAX).unwrap();
        check_filled(g.message(), 7, &format!("{addr}: "));
        drop(g);
        sender.join().unwrap();
    }
}

#[test]
fn messages_validated_ahead_are_delivered_as_published() {
    validated_ahead_case(64);
}

#[test]
fn large_messages_validated_ahead_are_delivered_as_published() {
    // 9 MiB messages: above the size from which a sender streams, which the
    // receiver validates ahead too.
    const { assert!(4608 * 2048 >= avp_wire::checksum::STREAMING_MIN_BYTES) };
    validated_ahead_case(4608);
}

/// A finished message is staged before it is sent, and a polling receiver
/// validates it ahead. What it delivers must still be exactly what was
/// published: here a staged message is dropped unsent and another one of
/// the same length but another shape is written into the same slot and
/// sent; then a staged message is sent as is. Messages of `seq` × 2 KiB.
fn validated_ahead_case(seq: u64) {
    let kv = |head_dim, seq| KvCacheDesc::new(4, 2, head_dim, seq, DType::F16, KvLayout::Hnd);
    let (wide, long) = (kv(64, seq), kv(32, 2 * seq));
    let layout_of =
        |d: KvCacheDesc| MessageLayout::new(&Envelope::default(), &Payload::KvCache(d)).unwrap();
    let name = format!("shm://{}", unique("ahead"));
    let opts = Options::default().shm(ShmOptions::default().slots(1));
    let listener = Endpoint::bind(&name, &identity(), opts.clone()).unwrap();
    let connect_to = listener.local_addr();
    let (staged_tx, staged_rx) = std::sync::mpsc::channel::<()>();
    let (polled_tx, polled_rx) = std::sync::mpsc::channel::<()>();
    let sender = std::thread::spawn(move || {
        let mut tx = Endpoint::connect(&connect_to, &identity(), opts).unwrap();
        let fill_loan = |loan: &mut avp_transport::Loan<'_>, n: u32| {
            for (i, s) in loan.writer().sections_mut().into_iter().enumerate() {
                s.iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = fill(i, j, n));
            }
        };
        let (first, second) = (layout_of(wide), layout_of(long));
        assert_eq!(first.total_len(), second.total_len());
        // Staged, validated ahead by the receiver, then dropped unsent.
        let mut loan = tx.loan(&first).unwrap();
        fill_loan(&mut loan, 1);
        let ready = loan.finish().unwrap();
        staged_tx.send(()).unwrap();
        polled_rx.recv().unwrap();
        drop(ready);
        // Same slot (the pool has one), same length, another shape and data.
        let mut loan = tx.loan(&second).unwrap();
        fill_loan(&mut loan, 2);
        loan.finish().unwrap().send().unwrap();
        // Staged, validated ahead, then sent unchanged.
        let mut loan = tx.loan(&first).unwrap();
        fill_loan(&mut loan, 3);
        let ready = loan.finish().unwrap();
        staged_tx.send(()).unwrap();
        polled_rx.recv().unwrap();
        ready.send().unwrap();
    });
    let rx = listener.accept(T).unwrap();
    assert_eq!(rx.session().transport, TransportKind::Shm);
    for (n, shape) in [(2, long), (3, wide)] {
        staged_rx.recv().unwrap();
        // Polls see nothing published, and validate the staged message ahead.
        for _ in 0..100 {
            assert!(rx.try_recv().unwrap().is_none(), "staged is not sent");
        }
        polled_tx.send(()).unwrap();
        let g = rx.recv(T).unwrap();
        assert_eq!(
            g.message().payload(),
            Payload::KvCache(shape),
            "message {n}"
        );
        check_filled(g.message(), n, "");
    }
    sender.join().unwrap();
}

/// Each fast path of the shared-memory transport is counted, and runs where it
/// should: a receiver asleep is rung when writing begins (`doorbells`) and
/// waits awake (`awake_for_writing`), keeping its delivery path warm
/// (`warmups`) until the staged message is announced with one store
/// (`staged_publishes`) and read from the head's cache line
/// (`head_line_entries`); a polled message is found without a system call
/// (`spin_hits`); every header is read from a private copy (`header_copies`).
#[test]
fn shm_fast_paths_run_and_are_counted() {
    let name = format!("shm://{}", unique("stats"));
    let opts = Options::default().shm(ShmOptions::default().spin(Duration::ZERO));
    let listener = Endpoint::bind(&name, &identity(), opts.clone()).unwrap();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let sender = std::thread::spawn(move || {
        let mut tx = Endpoint::connect(&name, &identity(), opts).unwrap();
        let big = layout(4096); // 8 MiB: writing it takes milliseconds
        go_rx.recv().unwrap(); // the receiver sleeps in recv now
        std::thread::sleep(Duration::from_millis(50));
        let mut loan = tx.loan(&big).unwrap();
        std::thread::sleep(Duration::from_millis(50)); // writing, slowly
        for s in loan.writer().sections_mut() {
            s.fill(1);
        }
        loan.finish().unwrap().send().unwrap();
        go_rx.recv().unwrap();
        send_filled(&mut tx, &layout(4), 2);
        go_rx.recv().unwrap();
        tx.stats()
    });
    let rx = listener.accept(T).unwrap();
    go_tx.send(()).unwrap();
    let g = rx.recv(T).unwrap();
    assert_eq!(g.message().kv().unwrap().k(3).unwrap()[0], 1);
    drop(g);
    let s = rx.stats();
    assert!(s.awake_for_writing >= 1, "{s:?}");
    assert!(s.warmups >= 1, "{s:?}");
    go_tx.send(()).unwrap();
    let g = loop {
        if let Some(g) = rx.try_recv().unwrap() {
            break g;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    check_filled(g.message(), 2, "polled");
    drop(g);
    go_tx.send(()).unwrap();
    let t = sender.join().unwrap();
    let s = rx.stats();
    assert_eq!((t.messages, s.messages), (2, 2), "{t:?} {s:?}");
    assert_eq!(t.staged_publishes, 2, "{t:?}");
    assert!(t.doorbells >= 1, "the sleeping receiver was rung: {t:?}");
    assert_eq!(s.head_line_entries, 2, "{s:?}");
    assert!(s.spin_hits >= 1, "{s:?}");
    assert_eq!(s.header_copies, 2, "{s:?}");
    assert_eq!(s.dedicated, 0, "{s:?}");
}

/// A guard handed to a worker thread and dropped there gives its slot back:
/// with one slot, the next message can only come once the worker dropped it.
#[test]
fn a_guard_dropped_on_another_thread_returns_its_slot() {
    let name = format!("shm://{}", unique("worker"));
    let opts = Options::default().shm(ShmOptions::default().slots(1));
    let listener = Endpoint::bind(&name, &identity(), opts.clone()).unwrap();
    let sender = std::thread::spawn(move || {
        let mut tx = Endpoint::connect(&name, &identity(), opts).unwrap();
        for n in 0..3 {
            send_filled(&mut tx, &layout(8), n);
        }
    });
    let rx = listener.accept(T).unwrap();
    for n in 0..3 {
        let g = rx.recv(T).unwrap();
        let worker = std::thread::spawn(move || {
            check_filled(g.message(), n, "on the worker");
            drop(g);
        });
        worker.join().unwrap();
    }
    sender.join().unwrap();
    assert_eq!(rx.stats().messages, 3);
}
