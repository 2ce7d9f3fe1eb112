//! A hostile shared-memory sender: it keeps its pool mapped writable and
//! rewrites a message's header (lengths, offsets, strings) after publishing it.
//! The receiver validates and reads headers from a private copy, so it returns
//! the validated values or a typed error: never a panic, never a read out of
//! bounds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use avp_transport::{Endpoint, Options, Receiver, ShmOptions, TransportError};
use avp_wire::{
    DType, Envelope, KvCacheDesc, KvLayout, MessageLayout, ModelIdentity, PREAMBLE_LEN, Payload,
};

const T: Duration = Duration::from_secs(10);

fn layout() -> MessageLayout {
    let envelope = Envelope {
        model_id: "hostile-test-model".into(),
        source_agent_id: "agent-a".into(),
        extra: [("k".to_owned(), "v".repeat(40))].into(),
        ..Envelope::default()
    };
    let desc = KvCacheDesc::new(4, 2, 16, 8, DType::F16, KvLayout::Hnd);
    MessageLayout::new(&envelope, &Payload::KvCache(desc)).unwrap()
}

/// Where the sender's pool and the receiver's mapping of its slots start: the
/// same memory at two addresses (the sender's range also covers the control block).
struct Pool {
    sender_base: usize,
    sender_len: usize,
    receiver_base: usize,
    receiver_len: usize,
}

impl Pool {
    /// The sender's address of the receiver's `addr`.
    fn sender_addr(&self, addr: usize) -> *mut u8 {
        let control = self.sender_len - self.receiver_len;
        (self.sender_base + control + (addr - self.receiver_base)) as *mut u8
    }
}

/// Everything a caller reads from a message; a panic here is the failure.
fn read_everything(rx: &Receiver) -> Result<(), TransportError> {
    let g = rx.recv(T)?;
    let m = g.message();
    let env = m.envelope();
    let _ = (env.model_id().len(), env.session_id().len(), env.to_owned());
    let _ = (m.payload(), m.alignment(), m.total_len(), m.section_count());
    for s in m.sections() {
        let _ = s.bytes.iter().map(|&b| b as u64).sum::<u64>();
    }
    if let Ok(kv) = m.kv() {
        for l in 0..kv.desc().num_layers {
            let _ = (kv.k(l)?.len(), kv.v(l)?.len());
        }
    }
    let _ = m.verify();
    Ok(())
}

#[test]
fn a_header_rewritten_after_publishing_changes_nothing_the_receiver_reports() {
    let name = format!("shm://hostile-{}", std::process::id());
    let id = ModelIdentity::default();
    let listener = Endpoint::bind(&name, &id, Options::default()).unwrap();
    let (tx_pool, done) = (std::sync::mpsc::channel(), Arc::new(Barrier::new(2)));
    let (pool_tx, done2) = (tx_pool.0, Arc::clone(&done));
    let sender = std::thread::spawn(move || {
        let mut tx =
            Endpoint::connect(&name, &ModelIdentity::default(), Options::default()).unwrap();
        let l = layout();
        let mut loan = tx.loan(&l).unwrap();
        for (i, s) in loan.writer().sections_mut().into_iter().enumerate() {
            s.fill(i as u8 + 1);
        }
        loan.finish().unwrap().send().unwrap();
        pool_tx.send(tx.pool_range().unwrap()).unwrap();
        done2.wait(); // keep the session (and the pool) until the receiver is done
    });
    let rx = listener.accept(T).unwrap();
    let g = rx.recv(T).unwrap();
    let sender_range = tx_pool.1.recv().unwrap();
    let receiver_range = rx.pool_range().unwrap();
    let pool = Pool {
        sender_base: sender_range.start,
        sender_len: sender_range.len(),
        receiver_base: receiver_range.start,
        receiver_len: receiver_range.len(),
    };
    let start = g.as_bytes().as_ptr() as usize;
    let before = (g.message().envelope().to_owned(), g.message().payload());
    let header_end = PREAMBLE_LEN + g.message().header_len() as usize;
    // The sender rewrites preamble and header in place: every byte 0xFF (huge
    // lengths and offsets, invalid strings and relative pointers).
    // SAFETY: the sender's pool mapping is live (its thread waits on `done`)
    // and the range lies inside the slot of this message.
    unsafe { std::ptr::write_bytes(pool.sender_addr(start), 0xFF, header_end) };
    assert!(g.as_bytes()[..header_end].iter().all(|&b| b == 0xFF));
    let m = g.message();
    assert_eq!((m.envelope().to_owned(), m.payload()), before);
    assert_eq!(m.envelope().model_id(), "hostile-test-model");
    let kv = m.kv().unwrap();
    assert_eq!(kv.v(3).unwrap()[0], 8, "sections in place, as written");
    m.verify().unwrap();
    assert_eq!(rx.stats().header_copies, 1);
    drop(g);
    done.wait();
    sender.join().unwrap();
}

#[test]
fn a_sender_scribbling_on_headers_while_sending_gets_typed_errors_only() {
    let name = format!("shm://scribble-{}", std::process::id());
    let id = ModelIdentity::default();
    let opts = Options::default().shm(ShmOptions::default().slots(2).slot_size(64 << 10));
    let listener = Endpoint::bind(&name, &id, opts.clone()).unwrap();
    let l = layout();
    let header_end = PREAMBLE_LEN + 2048.min(l.total_len() - PREAMBLE_LEN);
    const MESSAGES: u32 = 300;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let sender = std::thread::spawn(move || {
        let mut tx = Endpoint::connect(&name, &ModelIdentity::default(), opts).unwrap();
        let range = tx.pool_range().unwrap();
        let l = layout();
        // The scribbler: rewrites random header bytes of every slot, all the
        // time, yielding now and then so that the sender (which may share
        // its core) finishes messages too.
        let scribbler = std::thread::spawn(move || {
            let slot_size = 64 << 10;
            let control = range.len() - 2 * slot_size;
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            while !stop2.load(Ordering::Relaxed) {
                for slot in 0..2 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let at = range.start + control + slot * slot_size + (x as usize % header_end);
                    // SAFETY: the pool stays mapped while the sender lives,
                    // which outlives this thread (joined below); `at` lies in
                    // the first `header_end` bytes of a slot.
                    unsafe { (at as *mut u8).write_volatile((x >> 32) as u8) };
                }
                if x.is_multiple_of(64) {
                    std::thread::yield_now();
                }
                std::hint::spin_loop();
            }
        });
        // Until MESSAGES were sent: the scribbler breaks some before `finish`
        // checks them (how many depends on the scheduler).
        let mut sent = 0;
        for n in 0..100 * MESSAGES {
            if sent == MESSAGES {
                break;
            }
            let Ok(mut loan) = tx.loan(&l) else { break };
            for s in loan.writer().sections_mut() {
                s.fill(n as u8);
            }
            // The scribbler may break the message before `finish` checks it.
            if let Ok(ready) = loan.finish()
                && ready.send().is_ok()
            {
                sent += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        scribbler.join().unwrap();
        sent
    });
    let rx = listener.accept(T).unwrap();
    let (mut ok, mut refused) = (0, 0);
    loop {
        match read_everything(&rx) {
            Ok(()) => ok += 1,
            Err(TransportError::PeerGone(_)) => break,
            Err(TransportError::Wire(_) | TransportError::WrongSession { .. }) => refused += 1,
            Err(e) => panic!("an unexpected error: {e}"),
        }
    }
    let sent = sender.join().unwrap();
    assert_eq!(
        ok + refused,
        sent,
        "every message sent was delivered or refused"
    );
    assert_eq!(sent, MESSAGES, "the sender got its messages through");
    eprintln!("{sent} sent: {ok} delivered, {refused} refused");
    assert_eq!(rx.stats().header_copies, sent as u64);
}
