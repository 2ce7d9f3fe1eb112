//! A hostile sender against the receiving port: it writes whatever it likes
//! into the slots it was granted and sends immediates of its choosing. The
//! receiver refuses each lie with a typed error, gives bad slots back, and
//! never reads outside what it registered.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, MessageLayout, Payload};

use super::imm::{self, Imm};
use super::receiver::{Parts, RdmaReceiver};
use super::soft::SoftVerbs;
use super::verbs::{
    CompletionQueue, MemoryRegion, QpCaps, QueuePair, RdmaGrant, RdmaOffer, Verbs, WriteWr,
};
use crate::error::TransportError;
use crate::options::{Options, RdmaOptions};
use crate::port::RecvPort;
use crate::tcp::Conn;

struct Hostile {
    rx: RdmaReceiver,
    _verbs: SoftVerbs,
    _cq: Arc<dyn CompletionQueue>,
    qp: Arc<dyn QueuePair>,
    mr: Arc<dyn MemoryRegion>,
    grant: RdmaGrant,
    /// The control connection's other end.
    ctl: TcpStream,
}

fn session() -> Hostile {
    let verbs = SoftVerbs::open().unwrap();
    let cq = verbs.create_cq(64).unwrap();
    let qp = verbs.create_qp(&cq, &cq, QpCaps::default()).unwrap();
    let mr = verbs.alloc(1 << 20, false).unwrap();
    let offer = RdmaOffer {
        qps: vec![qp.endpoint()],
        device: None,
    };
    let o = Options::default().rdma(RdmaOptions::default().slots(2).slot_size(64 << 10));
    let (parts, grant) = Parts::build(Arc::new(SoftVerbs::open().unwrap()), &o, &offer).unwrap();
    qp.connect(&grant.qps[0]).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let ctl = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let conn = Conn::Plain(l.accept().unwrap().0);
    Hostile {
        rx: RdmaReceiver::new(parts, conn, 1 << 30),
        _verbs: verbs,
        _cq: cq,
        qp,
        mr,
        grant,
        ctl,
    }
}

impl Hostile {
    /// Write `bytes` at the start of slot `slot` and announce `imm`.
    fn write(&self, slot: u32, bytes: &[u8], imm: u32) {
        // SAFETY: our own registered region, large enough.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.mr.ptr(), bytes.len()) };
        let dst = self.grant.pool.addr + u64::from(slot) * self.grant.slot_size;
        let wr = WriteWr {
            wr_id: 1,
            local_addr: self.mr.ptr() as u64,
            len: bytes.len().max(1) as u32,
            lkey: self.mr.lkey(),
            remote_addr: dst,
            rkey: self.grant.pool.rkey,
            imm: Some(imm),
            signaled: true,
        };
        self.qp.post_writes(&[wr]).unwrap();
    }

    fn recv(&self) -> Result<(), TransportError> {
        self.rx
            .recv(Duration::from_secs(10), &|| {})
            .map(|d| self.rx.release(d.held))
    }

    /// The control frames the receiver sent (credits), as raw bytes.
    fn credits(&mut self) -> usize {
        self.ctl
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = self.ctl.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n])
            .matches("rdma_credit")
            .count()
    }
}

fn tag(id: u32, shares: usize) -> u32 {
    imm::encode(Imm {
        dedicated: false,
        device: false,
        shares,
        id,
    })
}

fn message(seq: u64) -> Vec<u8> {
    let l = MessageLayout::new(
        &Envelope::default(),
        &Payload::KvCache(KvCacheDesc::new(1, 1, 8, seq, DType::F32, KvLayout::Hnd)),
    )
    .unwrap();
    let sections = vec![vec![7u8; l.section(0).len as usize]; 2];
    let refs: Vec<&[u8]> = sections.iter().map(Vec::as_slice).collect();
    l.encode_to_vec(&refs).unwrap()
}

#[test]
fn a_valid_message_goes_through() {
    let h = session();
    h.write(1, &message(4), tag(1, 1));
    h.recv().unwrap();
}

#[test]
fn garbage_or_an_oversized_length_is_refused_and_the_slot_given_back() {
    let mut h = session();
    h.write(0, &[0xab; 64], tag(0, 1));
    let e = h.recv().unwrap_err();
    assert!(matches!(e, TransportError::Wire(_)), "{e}");
    // A message longer than the 64 KiB slot: its preamble says so.
    let big = message(4096);
    h.write(1, &big[..4096], tag(1, 1));
    let e = h.recv().unwrap_err();
    assert!(matches!(e, TransportError::Segment(_)), "{e}");
    assert_eq!(h.credits(), 2, "both slots come back to the sender");
    // The session goes on.
    h.write(0, &message(4), tag(0, 1));
    h.recv().unwrap();
}

#[test]
fn lies_in_the_immediate_fail_the_session() {
    for (imm, words) in [
        (tag(9, 1), "slot out of range"),
        (
            imm::encode(Imm {
                dedicated: true,
                device: false,
                shares: 1,
                id: 3,
            }),
            "never granted",
        ),
        (
            imm::encode(Imm {
                dedicated: false,
                device: true,
                shares: 1,
                id: 0,
            }),
            "without device slots",
        ),
    ] {
        let h = session();
        h.write(0, &message(4), imm);
        let e = h.recv().unwrap_err().to_string();
        assert!(e.contains(words), "{e}");
        // Later calls report the failure too.
        assert!(h.recv().is_err());
    }
}
