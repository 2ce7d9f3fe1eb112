//! The `cuda` transport's protocol on the emulated device (host memory
//! standing in for a GPU): negotiation and fallback, device slots and
//! dedicated allocations, the header-only guard, copies and their counters.
//! The same state machines run on a GPU with `Device::Cuda`.
#![cfg(target_os = "linux")]

use std::time::Duration;

use avp_transport::{
    Device, DeviceOptions, Endpoint, Options, Receiver, Sender, ShmOptions, TransportError,
    TransportKind,
};
use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, MessageLayout, ModelIdentity, Payload};

const T: Duration = Duration::from_secs(20);

fn name(tag: &str) -> String {
    format!(
        "{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    )
    .replace(['(', ')'], "")
}

fn emulated() -> Options {
    Options::default()
        .shm(ShmOptions::default().slots(2))
        .device(DeviceOptions::new(Device::Emulated).slot_size(64 << 10))
}

fn layout(seq: u64) -> MessageLayout {
    MessageLayout::new(
        &Envelope::default(),
        &Payload::KvCache(KvCacheDesc::new(2, 2, 16, seq, DType::F32, KvLayout::Hnd)),
    )
    .unwrap()
}

/// A sender and receiver connected at `tx_addr` / bound at `rx_addr`.
fn pair(rx_addr: &str, rx_opts: Options, tx_addr: &str, tx_opts: Options) -> (Sender, Receiver) {
    let id = ModelIdentity::default();
    let listener = Endpoint::bind(rx_addr, &id, rx_opts).unwrap();
    let tx_addr = tx_addr.to_owned();
    let h = std::thread::spawn(move || Endpoint::connect(&tx_addr, &id, tx_opts).unwrap());
    let rx = listener.accept(T).unwrap();
    (h.join().unwrap(), rx)
}

/// Section `i`'s bytes in the tests: a pattern per section and message.
fn pattern(layout: &MessageLayout, i: usize, round: u8) -> Vec<u8> {
    let len = layout.section(i).len as usize;
    (0..len)
        .map(|b| (b as u8).wrapping_mul(31) ^ (i as u8) ^ round)
        .collect()
}

/// Host buffers standing in for the producer's device tensors (the
/// emulated device's addresses are host addresses).
fn device_sources(layout: &MessageLayout, round: u8) -> Vec<Vec<u8>> {
    (0..layout.section_count())
        .map(|i| pattern(layout, i, round))
        .collect()
}

/// Loan a device slot for `l`, take every section's address (as a kernel
/// writing them in place would) and send.
fn send_in_place(tx: &mut Sender, l: &MessageLayout) {
    let mut loan = tx.loan_device(l).unwrap();
    for i in 0..l.section_count() {
        loan.section(i).unwrap();
    }
    loan.finish().unwrap().send().unwrap();
}

#[test]
fn device_messages_cross_without_touching_the_host() {
    let n = name("dev");
    let (mut tx, rx) = pair(
        &format!("cuda://{n}"),
        emulated(),
        &format!("cuda://{n}"),
        emulated(),
    );
    assert_eq!(tx.session().transport, TransportKind::Cuda);
    assert_eq!(rx.session().transport, TransportKind::Cuda);
    let why = tx.session().explain();
    assert!(why.contains("emulate"), "emulation is reported: {why}");
    assert!(rx.session().explain().contains("emulate"));

    // Small (device slots) and large (a dedicated allocation) messages, and
    // more rounds than slots, so that slots are reused.
    for (round, seq) in [(1u8, 8u64), (2, 2048), (3, 8), (4, 16), (5, 4096)] {
        let l = layout(seq);
        let srcs = device_sources(&l, round);
        let mut loan = tx.loan_device(&l).unwrap();
        assert!(loan.on_device());
        for (i, s) in srcs.iter().enumerate() {
            // SAFETY: `s` is readable "device" memory (emulated) of the
            // section's length, alive until `finish` returns.
            unsafe { loan.write_from_device(i, s.as_ptr() as u64) }.unwrap();
        }
        loan.finish().unwrap().send().unwrap();

        let g = rx.recv(T).unwrap();
        assert!(g.on_device());
        assert!(g.header().device_sections());
        assert_eq!(g.header().total_len(), l.total_len() as u64);
        for (i, s) in srcs.iter().enumerate() {
            let span = g.device_section(i).unwrap();
            assert_eq!(span.len, s.len() as u64);
            let mut back = vec![0u8; s.len()];
            g.copy_section_to_host(i, &mut back).unwrap();
            assert_eq!(&back, s, "round {round} section {i}");
            // Device to device into the receiver's own buffer.
            let mut mine = vec![0u8; s.len()];
            // SAFETY: `mine` is writable emulated device memory of the length.
            unsafe { g.copy_section_to_device(i, mine.as_mut_ptr() as u64) }.unwrap();
            assert_eq!(&mine, s);
        }
        assert!(g.device_section(99).is_err());
        assert!(
            g.copy_section_to_host(0, &mut [0u8; 3]).is_err(),
            "wrong length"
        );
    }
    let (ts, rs) = (tx.stats(), rx.stats());
    assert_eq!(ts.device_messages, 5);
    assert_eq!(rs.device_messages, 5);
    assert_eq!(
        ts.dedicated, 2,
        "the two messages larger than a device slot"
    );
    assert_eq!(
        ts.host_to_device_bytes, 0,
        "the sender copied device to device only"
    );
    assert_eq!(ts.device_to_host_bytes, 0);
    assert!(ts.device_to_device_bytes > 0);
    assert!(
        rs.device_to_host_bytes > 0,
        "the test's own reads are counted"
    );
}

#[test]
fn kernels_write_sections_in_place_and_unwritten_sections_are_refused() {
    let n = name("inplace");
    let (mut tx, rx) = pair(
        &format!("cuda://{n}"),
        emulated(),
        &format!("cuda://{n}"),
        emulated(),
    );
    let l = layout(4);
    let mut loan = tx.loan_device(&l).unwrap();
    let span = loan.section(0).unwrap();
    // SAFETY: the emulated device's section address is host memory of
    // `span.len` bytes, exclusively the loan's (a kernel would write it).
    unsafe { std::ptr::write_bytes(span.addr as *mut u8, 0x5a, span.len as usize) };
    let err = loan.finish().unwrap_err();
    assert!(matches!(err, TransportError::Wire(_)), "{err}");

    let mut loan = tx.loan_device(&l).unwrap();
    for i in 0..l.section_count() {
        let s = loan.section(i).unwrap();
        // SAFETY: as above.
        unsafe { std::ptr::write_bytes(s.addr as *mut u8, i as u8 + 1, s.len as usize) };
    }
    loan.write_from_host(1, &pattern(&l, 1, 9)).unwrap();
    assert!(loan.write_from_host(2, &[1, 2, 3]).is_err(), "wrong length");
    loan.finish().unwrap().send().unwrap();
    let g = rx.recv(T).unwrap();
    let mut b = vec![0u8; l.section(3).len as usize];
    g.copy_section_to_host(3, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 4));
    g.copy_section_to_host(1, &mut b).unwrap();
    assert_eq!(b, pattern(&l, 1, 9));
    assert_eq!(tx.stats().host_to_device_bytes, b.len() as u64);
    // Host messages still travel on a device session.
    drop(g);
    let srcs = device_sources(&l, 1);
    let refs: Vec<&[u8]> = srcs.iter().map(|v| &v[..]).collect();
    tx.send_sections(&l, &refs).unwrap();
    let g = rx.recv(T).unwrap();
    assert!(!g.on_device());
    g.message().verify().unwrap();
    assert!(matches!(
        g.device_section(0),
        Err(TransportError::Placement(_))
    ));
}

#[test]
fn without_a_device_on_both_ends_the_session_is_shared_memory_and_says_why() {
    // The listener is plain shared memory: a cuda:// sender falls back.
    let n = name("fallback");
    let (mut tx, rx) = pair(
        &format!("shm://{n}"),
        Options::default(),
        &format!("cuda://{n}"),
        emulated(),
    );
    assert_eq!(tx.session().transport, TransportKind::Shm);
    let why = tx.session().explain();
    assert!(
        why.contains("device not used") && why.contains("offers none"),
        "{why}"
    );
    // A device context still reaches a CPU agent: copied to the host, counted,
    // and an ordinary checksummed message.
    let l = layout(8);
    let srcs = device_sources(&l, 7);
    let mut loan = tx.loan_device(&l).unwrap();
    assert!(!loan.on_device());
    assert!(matches!(loan.section(0), Err(TransportError::Placement(_))));
    for (i, s) in srcs.iter().enumerate() {
        // SAFETY: emulated device memory of the section's length.
        unsafe { loan.write_from_device(i, s.as_ptr() as u64) }.unwrap();
    }
    loan.finish().unwrap().send().unwrap();
    let g = rx.recv(T).unwrap();
    assert!(!g.on_device());
    g.message().verify().unwrap();
    assert_eq!(g.message().kv().unwrap().k(0).unwrap(), &srcs[0][..]);
    let total: u64 = srcs.iter().map(|s| s.len() as u64).sum();
    assert_eq!(tx.stats().device_to_host_bytes, total);
    assert_eq!(tx.stats().device_messages, 0);

    // A cuda:// listener without a device, and a sender without one, are refused up front.
    let e = Endpoint::bind(
        &format!("cuda://{}", name("nodev")),
        &ModelIdentity::default(),
        Options::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::InvalidOption {
                option: "device",
                ..
            }
        ),
        "{e}"
    );
    let e = Endpoint::connect(
        &format!("cuda://{n}"),
        &ModelIdentity::default(),
        Options::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::InvalidOption {
                option: "device",
                ..
            }
        ),
        "{e}"
    );
    drop(rx);
}

#[test]
fn a_sender_whose_device_cannot_serve_falls_back_to_shared_memory_and_says_why() {
    // An emulated listener and a cuda:0 sender: without the feature or a
    // driver the sender's device does not open; with a GPU the backends
    // differ. Either way the session is shared memory, explained.
    let n = name("gpufallback");
    let (tx, rx) = pair(
        &format!("cuda://{n}"),
        emulated(),
        &format!("cuda://{n}"),
        Options::default().device(DeviceOptions::new(Device::Cuda(0))),
    );
    assert_eq!(tx.session().transport, TransportKind::Shm);
    let why = tx.session().explain();
    assert!(why.contains("device not used"), "{why}");
    if !cfg!(feature = "cuda") {
        assert!(why.contains("`cuda` feature"), "{why}");
    }
    assert_eq!(rx.session().transport, TransportKind::Shm);
}

#[test]
fn a_cuda_device_needs_the_feature_or_says_so() {
    let r = Endpoint::bind(
        &format!("cuda://{}", name("gpu")),
        &ModelIdentity::default(),
        Options::default().device(DeviceOptions::new(Device::Cuda(0))),
    );
    #[cfg(not(feature = "cuda"))]
    {
        let e = r.expect_err("only a cuda build opens a GPU");
        assert!(matches!(e, TransportError::Device { .. }), "{e}");
        assert!(e.to_string().contains("`cuda` feature"), "{e}");
    }
    #[cfg(feature = "cuda")]
    match r {
        Ok(_) => {
            // A GPU: a round trip through its memory, device to device included.
            let data: Vec<u8> = (0..=255).collect();
            let mut a = avp_transport::DeviceBuffer::new(Device::Cuda(0), 256).unwrap();
            a.write(&data).unwrap();
            let mut b = avp_transport::DeviceBuffer::new(Device::Cuda(0), 256).unwrap();
            b.copy_from(&a).unwrap();
            let mut back = vec![0u8; 256];
            b.read(&mut back).unwrap();
            assert_eq!(back, data);
            println!("cuda:0 opened: {}", a.device_name());
        }
        Err(e) => {
            assert!(
                std::env::var("AVP_REQUIRE_GPU").as_deref() != Ok("1"),
                "AVP_REQUIRE_GPU=1 but cuda:0 cannot be used: {e}"
            );
            // No GPU or driver here: a typed error that says what the driver said.
            assert!(matches!(e, TransportError::Device { .. }), "{e}");
            println!("skipped: no usable GPU ({e})");
        }
    }
}

#[test]
fn a_sender_without_a_device_cannot_loan_device_memory() {
    let n = name("nodevtx");
    let (mut tx, _rx) = pair(
        &format!("shm://{n}"),
        Options::default(),
        &format!("shm://{n}"),
        Options::default(),
    );
    let e = tx.loan_device(&layout(4)).unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::InvalidOption {
                option: "device",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn dropped_device_loans_give_their_slots_back() {
    let n = name("drop");
    let (mut tx, rx) = pair(
        &format!("cuda://{n}"),
        emulated(),
        &format!("cuda://{n}"),
        emulated(),
    );
    let small = layout(8);
    let big = layout(4096);
    for _ in 0..5 {
        drop(tx.loan_device(&small).unwrap());
        drop(tx.loan_device(&big).unwrap());
        let mut l = tx.loan_device(&small).unwrap();
        for i in 0..small.section_count() {
            l.section(i).unwrap();
        }
        drop(l.finish().unwrap()); // finished, never sent
    }
    // Both slots are still free: two messages go out without a receive.
    for _ in 0..2 {
        send_in_place(&mut tx, &small);
    }
    assert_eq!(rx.recv(T).unwrap().header().section_count(), 4);
    assert_eq!(rx.recv(T).unwrap().header().section_count(), 4);
}

/// A device message whose host part the sender rewrites after finishing it:
/// the receiver refuses a header that lost the device flag or disagrees
/// with the ring about the length, gives the slot back, and goes on.
#[test]
fn a_device_header_that_disagrees_with_the_ring_is_refused_and_the_slot_returns() {
    let n = name("forged");
    let slot = 64 << 10;
    let opts = || emulated().shm(ShmOptions::default().slots(2).slot_size(slot));
    let (mut tx, rx) = pair(
        &format!("cuda://{n}"),
        opts(),
        &format!("cuda://{n}"),
        opts(),
    );
    let pool = tx.pool_range().expect("a shared-memory pool");
    let page = 4096; // the control block; slots follow it
    let l = layout(8);
    let other = layout(16);
    let forgeries: [Vec<u8>; 2] = [
        // The same message as a host message (no device flag).
        l.prefix(&vec![0; l.section_count()]).unwrap(),
        // A device header of another length than the ring entry's.
        other.device_prefix().unwrap(),
    ];
    for forged in &forgeries {
        let mut loan = tx.loan_device(&l).unwrap();
        for i in 0..l.section_count() {
            loan.section(i).unwrap();
        }
        let ready = loan.finish().unwrap();
        for s in 0..2 {
            let at = (pool.start + page + s * slot) as *mut u8;
            // SAFETY: the sender's own writable mapping of its pool: both
            // slots' first bytes (the test plays a sender that rewrites them).
            unsafe { std::ptr::copy_nonoverlapping(forged.as_ptr(), at, forged.len()) };
        }
        ready.send().unwrap();
        let e = rx.recv(T).unwrap_err();
        assert!(matches!(e, TransportError::Segment(_)), "{e}");
    }
    // Both slots came back: two honest messages go out without a receive.
    for _ in 0..2 {
        send_in_place(&mut tx, &l);
    }
    assert!(rx.recv(T).unwrap().on_device());
    assert!(rx.recv(T).unwrap().on_device());
}

/// A ring entry the sender rewrites after staging it (a length beyond the
/// device slot) is refused, and its slot still comes back.
#[test]
fn a_forged_device_ring_entry_is_refused_and_the_slot_returns() {
    let n = name("entry");
    let (mut tx, rx) = pair(
        &format!("cuda://{n}"),
        emulated(),
        &format!("cuda://{n}"),
        emulated(),
    );
    let pool = tx.pool_range().expect("a shared-memory pool");
    let l = layout(8);
    let mut loan = tx.loan_device(&l).unwrap();
    for i in 0..l.section_count() {
        loan.section(i).unwrap();
    }
    let ready = loan.finish().unwrap(); // the entry of message 0 is staged now
    // Ring entry 0 at control offset 512: {slot u32, flags u32, len u64}.
    let len_at = (pool.start + 512 + 8) as *mut u64;
    // SAFETY: the sender's own mapping of its control block (the test plays
    // a sender that rewrites its ring); aligned, inside the first page.
    unsafe { len_at.write_volatile((64 << 10) + 4096) };
    ready.send().unwrap();
    let e = rx.recv(T).unwrap_err();
    assert!(matches!(e, TransportError::Segment(_)), "{e}");
    assert!(e.to_string().contains("exceeds a device slot"), "{e}");
    for _ in 0..2 {
        send_in_place(&mut tx, &l);
    }
    assert!(rx.recv(T).unwrap().on_device());
    assert!(rx.recv(T).unwrap().on_device());
}

/// The device flag is refused on a message that arrives in host memory:
/// there it would only mean sections without checksums.
#[test]
fn the_device_flag_is_refused_on_host_messages() {
    let n = name("hostflag");
    let (mut tx, rx) = pair(
        &format!("shm://{n}"),
        Options::default(),
        &format!("shm://{n}"),
        Options::default(),
    );
    let l = layout(4);
    let mut bytes = vec![0u8; l.total_len()];
    let prefix = l.device_prefix().unwrap();
    bytes[..prefix.len()].copy_from_slice(&prefix);
    tx.send_bytes(&bytes).unwrap();
    let e = rx.recv(T).unwrap_err();
    assert!(e.to_string().contains("FLAG_DEVICE_SECTIONS"), "{e}");
    // The session goes on.
    let srcs = device_sources(&l, 2);
    let refs: Vec<&[u8]> = srcs.iter().map(|v| &v[..]).collect();
    tx.send_sections(&l, &refs).unwrap();
    rx.recv(T).unwrap().message().verify().unwrap();
}
