//! The emulator's verbs semantics, between two devices in this process (the
//! multi-process tests run the same code across processes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::SoftVerbs;
use crate::rdma::verbs::{
    CompletionQueue, MemoryRegion, QpCaps, QueuePair, Verbs, Wc, WcOpcode, WcStatus, WriteWr,
};

struct End {
    dev: SoftVerbs,
    scq: Arc<dyn CompletionQueue>,
    rcq: Arc<dyn CompletionQueue>,
    qp: Arc<dyn QueuePair>,
    mr: Arc<dyn MemoryRegion>,
}

fn end(caps: QpCaps) -> End {
    let dev = SoftVerbs::open().unwrap();
    let scq = dev.create_cq(64).unwrap();
    let rcq = dev.create_cq(64).unwrap();
    let qp = dev.create_qp(&scq, &rcq, caps).unwrap();
    let mr = dev.alloc(1 << 20, true).unwrap();
    End {
        dev,
        scq,
        rcq,
        qp,
        mr,
    }
}

/// Two connected ends.
fn pair(caps: QpCaps) -> (End, End) {
    let (a, b) = (end(caps), end(caps));
    a.qp.connect(&b.qp.endpoint()).unwrap();
    b.qp.connect(&a.qp.endpoint()).unwrap();
    (a, b)
}

/// Wait for `n` completions on `cq`.
fn wait(cq: &Arc<dyn CompletionQueue>, n: usize) -> Vec<Wc> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    while out.len() < n {
        let want = n - out.len();
        cq.poll(&mut out, want);
        assert!(Instant::now() < deadline, "got {out:?}, wanted {n}");
        std::thread::sleep(Duration::from_millis(1));
    }
    out
}

fn write(from: &End, to: &End, off: u64, len: u32, imm: Option<u32>, id: u64) -> WriteWr {
    WriteWr {
        wr_id: id,
        local_addr: from.mr.ptr() as u64 + off,
        len,
        lkey: from.mr.lkey(),
        remote_addr: to.mr.ptr() as u64 + off,
        rkey: to.mr.rkey(),
        imm,
        signaled: imm.is_some(),
    }
}

fn fill(e: &End, byte: u8) {
    // SAFETY: the region is ours and no write into it is in flight.
    unsafe { std::ptr::write_bytes(e.mr.ptr(), byte, e.mr.len()) };
}

fn bytes(e: &End, off: usize, len: usize) -> Vec<u8> {
    // SAFETY: inside the region; the writes into it have completed.
    unsafe { std::slice::from_raw_parts(e.mr.ptr().add(off), len) }.to_vec()
}

#[test]
fn writes_land_in_order_before_the_immediate() {
    let (a, b) = pair(QpCaps::default());
    fill(&a, 7);
    b.qp.post_recvs(&[42]).unwrap();
    let wrs: Vec<_> = (0..16)
        .map(|i| write(&a, &b, i * 65536, 65536, (i == 15).then_some(0xabc), i))
        .collect();
    a.qp.post_writes(&wrs).unwrap();
    let r = wait(&b.rcq, 1);
    assert_eq!(r[0].status, WcStatus::Success);
    assert_eq!(r[0].opcode, WcOpcode::RecvWithImm);
    assert_eq!(
        (r[0].wr_id, r[0].imm, r[0].byte_len),
        (42, Some(0xabc), 65536)
    );
    // Every earlier write's bytes are visible once the immediate is.
    assert!(bytes(&b, 0, 1 << 20).iter().all(|&x| x == 7));
    let s = wait(&a.scq, 1);
    assert_eq!((s[0].wr_id, s[0].status), (15, WcStatus::Success));
}

#[test]
fn a_wrong_key_or_bound_fails_the_queue_pair_and_flushes() {
    for bad in ["rkey", "bound", "read-only"] {
        let (a, b) = pair(QpCaps::default());
        let ro = b.dev.alloc(4096, false).unwrap();
        b.qp.post_recvs(&[1, 2]).unwrap();
        let mut w = write(&a, &b, 0, 4096, None, 1);
        match bad {
            "rkey" => w.rkey ^= 0x5a5a,
            "bound" => w.remote_addr = b.mr.ptr() as u64 + b.mr.len() as u64 - 100,
            _ => {
                w.remote_addr = ro.ptr() as u64;
                w.rkey = ro.rkey();
            }
        }
        let later = write(&a, &b, 8192, 4096, Some(9), 2);
        a.qp.post_writes(&[w, later]).unwrap();
        let s = wait(&a.scq, 2);
        assert_eq!(s[0].status, WcStatus::RemAccessErr, "{bad}");
        assert_eq!(s[1].status, WcStatus::WrFlushErr, "{bad}");
        // The responder's queue pair is in error too: its receives flush.
        let r = wait(&b.rcq, 2);
        assert!(r.iter().all(|w| w.status == WcStatus::WrFlushErr), "{r:?}");
        // Posting after the error completes with a flush.
        a.qp.post_writes(&[write(&a, &b, 0, 8, None, 3)]).unwrap();
        assert_eq!(wait(&a.scq, 1)[0].status, WcStatus::WrFlushErr);
    }
}

#[test]
fn a_local_key_outside_its_region_fails_locally() {
    let (a, b) = pair(QpCaps::default());
    let mut w = write(&a, &b, 0, 4096, None, 1);
    w.local_addr += a.mr.len() as u64;
    a.qp.post_writes(&[w]).unwrap();
    assert_eq!(wait(&a.scq, 1)[0].status, WcStatus::LocProtErr);
}

#[test]
fn receiver_not_ready_is_retried_then_fails() {
    let caps = QpCaps {
        rnr_retry: 3,
        ..QpCaps::default()
    };
    // A receive posted while the sender retries (1 ms apart): the write goes through.
    let (a, b) = pair(QpCaps {
        rnr_retry: 2000,
        ..caps
    });
    a.qp.post_writes(&[write(&a, &b, 0, 64, Some(5), 1)])
        .unwrap();
    std::thread::sleep(Duration::from_millis(1));
    b.qp.post_recvs(&[77]).unwrap();
    assert_eq!(wait(&b.rcq, 1)[0].wr_id, 77);
    assert_eq!(wait(&a.scq, 1)[0].status, WcStatus::Success);
    // None posted: the retries run out.
    let (a, b) = pair(caps);
    let w = [
        write(&a, &b, 0, 64, Some(5), 1),
        write(&a, &b, 64, 64, Some(6), 2),
    ];
    a.qp.post_writes(&w).unwrap();
    let s = wait(&a.scq, 2);
    assert_eq!(s[0].status, WcStatus::RnrRetryExcErr);
    assert_eq!(s[1].status, WcStatus::WrFlushErr);
    drop(b);
}

#[test]
fn the_send_queue_is_bounded_and_needs_a_connection() {
    let caps = QpCaps {
        max_send_wr: 4,
        ..QpCaps::default()
    };
    let lone = end(caps);
    let e = lone.qp.post_writes(&[write(&lone, &lone, 0, 8, None, 1)]);
    assert!(e.unwrap_err().to_string().contains("not connected"));
    let (a, b) = pair(caps);
    let five: Vec<_> = (0..5).map(|i| write(&a, &b, i * 8, 8, None, i)).collect();
    let e = a.qp.post_writes(&five).unwrap_err().to_string();
    assert!(e.contains("ENOMEM") && e.contains("max_send_wr 4"), "{e}");
}

#[test]
fn a_dead_peer_fails_outstanding_writes() {
    let (a, b) = pair(QpCaps::default());
    drop(b);
    std::thread::sleep(Duration::from_millis(20));
    let w = [
        write(&a, &a, 0, 4096, Some(1), 1),
        write(&a, &a, 0, 8, Some(2), 2),
    ];
    a.qp.post_writes(&w).unwrap();
    let s = wait(&a.scq, 2);
    assert_eq!(s[0].status, WcStatus::RetryExcErr);
    assert_eq!(s[1].status, WcStatus::WrFlushErr);
}

#[test]
fn completion_channel_signals_once_armed() {
    let (a, b) = pair(QpCaps::default());
    b.qp.post_recvs(&[1]).unwrap();
    b.rcq.arm().unwrap();
    a.qp.post_writes(&[write(&a, &b, 0, 8, Some(3), 1)])
        .unwrap();
    // SAFETY: the queue's descriptor is open while `b` lives.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(b.rcq.fd()) };
    assert!(crate::wait::readable(&[fd], Duration::from_secs(10)).unwrap());
    b.rcq.ack();
    assert_eq!(wait(&b.rcq, 1)[0].imm, Some(3));
}
