//! Faults between real processes: peers killed mid-message, receivers that die
//! holding slots, garbage, truncated and oversized frames, and a bounded soak.
//!
//! Child processes are this test binary re-executed with `AVP_TEST_ROLE` set
//! (see `child_role`), so each child runs exactly the misbehaviour under test.

#[path = "../../avp-transport/tests/support/children.rs"]
mod children;
use children::{kill_later, resources, spawn_role, wait_for};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use avp_transport::{Endpoint, Options, ShmOptions, TcpOptions, TransportError};

#[path = "../../avp-transport/tests/support/raw_peer.rs"]
mod raw_peer;
use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, MessageLayout, ModelIdentity, Payload};
use raw_peer::RawPeer;

const T: Duration = Duration::from_secs(30);

/// The tests of this file count the process's descriptors: run them one at a time
/// even under `cargo test`'s threads.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn layout(seq: u64) -> MessageLayout {
    MessageLayout::new(
        &Envelope::default(),
        &Payload::KvCache(KvCacheDesc::new(4, 2, 64, seq, DType::F16, KvLayout::Hnd)),
    )
    .unwrap()
}

/// A hand-made TCP session with a token-less listener (to send raw bytes after it).
fn manual_tcp_session(addr: &str) -> TcpStream {
    RawPeer::handshake(addr, &ModelIdentity::default(), T)
        .0
        .stream
}

/// Entry point of the child processes; does nothing in a normal test run.
#[test]
fn child_role() {
    let Some((role, arg)) = children::role() else {
        return;
    };
    let l = layout(64);
    match role.as_str() {
        "shm_stall_sender" => {
            let mut tx =
                Endpoint::connect(&arg, &ModelIdentity::default(), Options::default()).unwrap();
            let mut loan = tx.loan(&l).unwrap();
            let sections = loan.writer().sections_mut();
            let half = sections.len() / 2;
            for s in sections.into_iter().take(half) {
                s.fill(7);
            }
            println!("stalled");
            std::thread::sleep(Duration::from_secs(600));
        }
        "tcp_stall_sender" => {
            let mut s = manual_tcp_session(&arg);
            let refs: Vec<Vec<u8>> = l.sections().map(|sp| vec![1u8; sp.len as usize]).collect();
            let r: Vec<&[u8]> = refs.iter().map(|v| &v[..]).collect();
            let bytes = l.encode_to_vec(&r).unwrap();
            s.write_all(&bytes[..bytes.len() / 2]).unwrap();
            println!("stalled");
            std::thread::sleep(Duration::from_secs(600));
        }
        "shm_holding_receiver" => {
            let listener =
                Endpoint::bind(&arg, &ModelIdentity::default(), Options::default()).unwrap();
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
fn peers_that_die_yield_errors_and_leak_nothing() {
    let _serial = serial();
    // Warm up lazily-created process state (thread-locals, runtime dir) before counting.
    drop(
        Endpoint::bind(
            &format!("shm://warm-{}", std::process::id()),
            &ModelIdentity::default(),
            Options::default(),
        )
        .unwrap(),
    );
    let before = resources();

    // 1. A shared-memory sender is SIGKILLed with a half-written slot.
    {
        let name = format!("shm://fault-shm-{}", std::process::id());
        let listener =
            Endpoint::bind(&name, &ModelIdentity::default(), Options::default()).unwrap();
        let mut child = spawn_role("shm_stall_sender", &name);
        let rx = listener.accept(T).unwrap();
        wait_for(&mut child, "stalled");
        let killer = kill_later(child, Duration::from_millis(300));
        let t = Instant::now();
        let e = rx.recv(T).expect_err("the sender died");
        assert!(matches!(e, TransportError::PeerGone(_)), "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        killer.join().unwrap();
    }
    // 2. A TCP sender is SIGKILLed halfway through a message.
    {
        let opts = Options::default().tcp(TcpOptions::default().shm_upgrade(false));
        let listener =
            Endpoint::bind("tcp://127.0.0.1:0", &ModelIdentity::default(), opts).unwrap();
        let mut child = spawn_role("tcp_stall_sender", &listener.local_addr());
        let rx = listener.accept(T).unwrap();
        wait_for(&mut child, "stalled");
        let killer = kill_later(child, Duration::from_millis(300));
        let t = Instant::now();
        let e = rx.recv(T).expect_err("the sender died");
        assert!(matches!(e, TransportError::PeerGone(_)), "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        killer.join().unwrap();
    }
    // 3. A receiver holding every slot dies: the sender's wait ends with an error, not the loan timeout.
    {
        let name = format!("shm://fault-rx-{}", std::process::id());
        let mut child = spawn_role("shm_holding_receiver", &name);
        wait_for(&mut child, "bound");
        let opts = Options::default().shm(ShmOptions::default().slots(2).loan_timeout(T));
        let mut tx = Endpoint::connect(&name, &ModelIdentity::default(), opts).unwrap();
        let l = layout(16);
        for _ in 0..2 {
            let mut loan = tx.loan(&l).unwrap();
            loan.writer().sections_mut();
            loan.finish().unwrap().send().unwrap();
        }
        wait_for(&mut child, "holding");
        let killer = kill_later(child, Duration::from_millis(300));
        let t = Instant::now();
        let e = tx.loan(&l).expect_err("the receiver died");
        assert!(matches!(e, TransportError::PeerGone(_)), "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        killer.join().unwrap();
    }
    let after = resources();
    assert_eq!(after, before, "(fds, avp mappings) before vs after");
}

#[test]
fn bad_tcp_frames_get_typed_errors_and_the_listener_keeps_serving() {
    let _serial = serial();
    let opts = Options::default()
        .max_message(1 << 30)
        .tcp(TcpOptions::default().shm_upgrade(false));
    let listener =
        Endpoint::bind("tcp://127.0.0.1:0", &ModelIdentity::default(), opts.clone()).unwrap();
    let addr = listener.local_addr();

    // Garbage instead of a handshake.
    let a = addr.clone();
    let h = std::thread::spawn(move || {
        let mut s = TcpStream::connect(a.strip_prefix("tcp://").unwrap()).unwrap();
        s.write_all(b"\xff\xff\xff\x7fGET / HTTP/1.1\r\n\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
    });
    let e = listener.accept(T).expect_err("garbage handshake refused");
    assert!(matches!(e, TransportError::Protocol(_)), "{e}");
    h.join().unwrap();

    // After a good handshake: garbage, a truncated message, an oversized length.
    let good = layout(8);
    let data: Vec<Vec<u8>> = good.sections().map(|s| vec![3u8; s.len as usize]).collect();
    let refs: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
    let valid = good.encode_to_vec(&refs).unwrap();
    let mut huge = valid[..32].to_vec();
    huge[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let crc = crc32fast::hash(&huge[..20]);
    huge[20..24].copy_from_slice(&crc.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage",
            b"this is not an avp frame at all, not at all".to_vec(),
        ),
        ("truncated", valid[..valid.len() - 100].to_vec()),
        ("oversized", huge),
    ];
    for (what, bytes) in cases {
        let a = addr.clone();
        let h = std::thread::spawn(move || {
            let mut s = manual_tcp_session(&a);
            s.write_all(&bytes).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        let rx = listener.accept(T).unwrap();
        let e = rx
            .recv(T)
            .err()
            .unwrap_or_else(|| panic!("{what} accepted"));
        match what {
            "garbage" => assert!(matches!(e, TransportError::Protocol(_)), "{what}: {e}"),
            "truncated" => assert!(matches!(e, TransportError::PeerGone(_)), "{what}: {e}"),
            _ => assert!(
                matches!(e, TransportError::TooLarge { size, .. } if size == 1 << 40),
                "{what}: {e}"
            ),
        }
        // The connection is closed after a bad frame.
        assert!(rx.recv(Duration::from_millis(100)).is_err());
        h.join().unwrap();
    }

    // A well-behaved peer is still served.
    let h = std::thread::spawn(move || {
        let mut tx = Endpoint::connect(&addr, &ModelIdentity::default(), opts).unwrap();
        tx.send_bytes(&valid).unwrap();
    });
    let rx = listener.accept(T).unwrap();
    rx.recv(T).unwrap().message().verify().unwrap();
    h.join().unwrap();
}

/// VmRSS of this process in KiB.
fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn soak_10000_messages_over_shm_with_flat_memory() {
    let _serial = serial();
    let name = format!("shm://soak-{}", std::process::id());
    let listener = Endpoint::bind(&name, &ModelIdentity::default(), Options::default()).unwrap();
    const N: u32 = 10_000;
    let h = std::thread::spawn(move || {
        let mut tx =
            Endpoint::connect(&name, &ModelIdentity::default(), Options::default()).unwrap();
        let l = layout(32);
        for n in 0..N {
            let mut loan = tx.loan(&l).unwrap();
            for s in loan.writer().sections_mut() {
                s.fill(n as u8);
            }
            loan.finish().unwrap().send().unwrap();
        }
    });
    let rx = listener.accept(T).unwrap();
    let start = Instant::now();
    let mut warm = 0;
    for n in 0..N {
        let g = rx.recv(T).unwrap();
        let kv = g.message().kv().unwrap();
        kv.verify_layer(n % 4).unwrap();
        assert_eq!(kv.v(3).unwrap()[0], n as u8);
        if n == 1000 {
            warm = rss_kib();
        }
    }
    h.join().unwrap();
    let grown = rss_kib().saturating_sub(warm);
    assert!(grown < 4096, "RSS grew by {grown} KiB over {N} messages");
    assert!(start.elapsed() < Duration::from_secs(60));
}

/// A peer that passed the handshake and declares a 4 GiB message (the default
/// limit) but sends only its 32-byte preamble costs the receiver the bytes that
/// arrived plus one first buffer (1 MiB), not the declared size: receive
/// buffers grow as bytes arrive.
#[test]
fn a_declared_length_costs_nothing_until_its_bytes_arrive() {
    let _serial = serial();
    let opts = Options::default().tcp(
        TcpOptions::default()
            .shm_upgrade(false)
            .stall_timeout(Duration::from_millis(1500)),
    );
    assert_eq!(opts.max_message, 4 << 30);
    let listener = Endpoint::bind("tcp://127.0.0.1:0", &ModelIdentity::default(), opts).unwrap();
    let addr = listener.local_addr();
    let mut preamble = [0u8; 32];
    avp_wire::Preamble {
        flags: 0,
        header_len: 1024,
        total_len: (4 << 30) - 1,
        header_crc: 0,
    }
    .write(&mut preamble);
    let liar = std::thread::spawn(move || {
        let mut s = manual_tcp_session(&addr);
        s.write_all(&preamble).unwrap();
        std::thread::sleep(Duration::from_secs(3)); // then nothing: a stall
    });
    let rx = listener.accept(T).unwrap();
    let before = rss_kib();
    let e = rx.recv(T).expect_err("the peer stalled");
    let grown = rss_kib().saturating_sub(before);
    assert!(matches!(e, TransportError::Timeout(..)), "{e}");
    assert!(
        grown < 8 << 10,
        "RSS grew {grown} KiB for a declared 4 GiB message of which 32 bytes arrived"
    );
    liar.join().unwrap();
}

/// `avp recv` serves one sender after another: a sender killed mid-message
/// (shared memory and TCP) ends that sender only, and the next is served.
#[test]
fn the_cli_receiver_outlives_a_sender_killed_mid_message() {
    let _serial = serial();
    for addr in [
        format!("shm://cli-kill-{}", std::process::id()),
        "tcp://127.0.0.1:0".to_owned(),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut recv = Command::new(env!("CARGO_BIN_EXE_avp"))
            .args([
                "recv",
                &addr,
                "--count",
                "2",
                "--timeout",
                "60",
                "--no-shm-upgrade",
            ])
            .arg("--out")
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(recv.stderr.take().unwrap());
        let mut first = String::new();
        err.read_line(&mut first).unwrap();
        let listen = first
            .trim()
            .strip_prefix("listening on ")
            .unwrap()
            .to_owned();
        let role = if listen.starts_with("shm") {
            "shm_stall_sender"
        } else {
            "tcp_stall_sender"
        };
        let mut child = spawn_role(role, &listen);
        wait_for(&mut child, "stalled");
        kill_later(child, Duration::from_millis(200))
            .join()
            .unwrap();
        // The next sender is served.
        let l = layout(8);
        let data: Vec<Vec<u8>> = l.sections().map(|s| vec![5u8; s.len as usize]).collect();
        let refs: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
        let opts = Options::default().tcp(TcpOptions::default().shm_upgrade(false));
        let mut tx = Endpoint::connect(&listen, &ModelIdentity::default(), opts).unwrap();
        for _ in 0..2 {
            tx.send_sections(&l, &refs).unwrap();
        }
        let status = recv.wait().unwrap();
        let mut log = String::new();
        std::io::Read::read_to_string(&mut err, &mut log).unwrap();
        assert!(status.success(), "{addr}: {log}");
        assert!(
            log.contains("dropped after 0 messages") || log.contains("done after 0 messages"),
            "{log}"
        );
        assert!(log.contains("done after 2 messages"), "{log}");
        assert!(dir.path().join("msg-000002.avp").exists());
    }
}
