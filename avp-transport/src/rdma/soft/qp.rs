//! A queue pair of the emulated device: its send queue, the thread that
//! executes it (the requester), and the thread that reads the peer's packets
//! (the responder's checks and placement, and acknowledgements).

use std::collections::VecDeque;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Result, TransportError};
use crate::rdma::verbs::{QpCaps, QpEndpoint, QueuePair, Wc, WcOpcode, WcStatus, WriteWr};
use crate::tcp::write_all_vectored;

use super::packet::{ACK_REQ, HAS_IMM, Kind, NAK_ACCESS, NAK_RNR, Packet};
use super::{Shared, SoftCq, dial};

/// A request sent and not yet acknowledged.
struct Sent {
    wr: WriteWr,
    seq: u64,
    at: Instant,
}

/// A queue pair's state.
#[derive(Default)]
struct State {
    remote: Option<QpEndpoint>,
    connected: bool,
    /// A connection that arrived before `connect`: the stream and the dialler's number.
    early: Option<(UnixStream, u32)>,
    /// `Some`: the queue pair is in the error state.
    error: Option<WcStatus>,
    /// Posted, not yet sent (a sequence number when it is a resend).
    sq: VecDeque<(WriteWr, Option<u64>)>,
    sent: VecDeque<Sent>,
    next_seq: u64,
    /// Receives posted for writes-with-immediate.
    recvs: VecDeque<u64>,
    /// The peer had no receive for request `seq`: resend from there.
    rnr: Option<u64>,
    rnr_tries: u32,
    /// Responder: drop requests until the resend of this one.
    discard_until: Option<u64>,
    peer_gone: bool,
    last_heard: Option<Instant>,
    closed: bool,
}

/// What the queue pair's handle and threads share.
pub(super) struct Inner {
    qpn: u32,
    shared: Arc<Shared>,
    send_cq: Arc<SoftCq>,
    recv_cq: Arc<SoftCq>,
    caps: QpCaps,
    st: Mutex<State>,
    cv: Condvar,
    writer: Mutex<Option<UnixStream>>,
}

/// A queue pair of the emulated device.
pub(super) struct SoftQp(Arc<Inner>);

impl SoftQp {
    pub(super) fn new(
        qpn: u32,
        shared: Arc<Shared>,
        send_cq: Arc<SoftCq>,
        recv_cq: Arc<SoftCq>,
        caps: QpCaps,
    ) -> Result<SoftQp> {
        let inner = Arc::new(Inner {
            qpn,
            shared,
            send_cq,
            recv_cq,
            caps,
            st: Mutex::default(),
            cv: Condvar::new(),
            writer: Mutex::new(None),
        });
        inner
            .shared
            .qps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(qpn, Arc::downgrade(&inner));
        let i = Arc::clone(&inner);
        std::thread::Builder::new()
            .name(format!("avp-soft-qp{qpn}-tx"))
            .spawn(move || i.requester())
            .map_err(TransportError::io("spawn soft verbs queue pair"))?;
        Ok(SoftQp(inner))
    }
}

impl Drop for SoftQp {
    fn drop(&mut self) {
        let q = &self.0;
        q.lock().closed = true;
        q.cv.notify_all();
        if let Some(s) = q.writer.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        q.shared
            .qps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&q.qpn);
    }
}

impl QueuePair for SoftQp {
    fn endpoint(&self) -> QpEndpoint {
        QpEndpoint {
            qpn: self.0.qpn,
            port: self.0.shared.port.clone(),
            ..QpEndpoint::default()
        }
    }

    fn connect(&self, remote: &QpEndpoint) -> Result<()> {
        let q = &self.0;
        let early = {
            let mut st = q.lock();
            if st.remote.is_some() {
                return Err(TransportError::rdma(
                    "connect",
                    "EINVAL",
                    "the queue pair is connected already",
                ));
            }
            st.remote = Some(remote.clone());
            st.early.take()
        };
        if (q.shared.port.as_str(), q.qpn) < (remote.port.as_str(), remote.qpn) {
            q.attach(dial(remote, q.qpn)?, remote.qpn);
        } else if let Some((s, from)) = early {
            q.attach(s, from);
        }
        Ok(())
    }

    fn post_writes(&self, wrs: &[WriteWr]) -> Result<()> {
        let q = &self.0;
        let mut st = q.lock();
        if st.remote.is_none() {
            return Err(TransportError::rdma(
                "post_send",
                "EINVAL",
                "the queue pair is not connected (state RESET)",
            ));
        }
        let queued = st.sq.len() + st.sent.len();
        if queued + wrs.len() > q.caps.max_send_wr {
            return Err(TransportError::rdma(
                "post_send",
                "ENOMEM",
                format!(
                    "send queue full: {queued} outstanding + {} posted > max_send_wr {}",
                    wrs.len(),
                    q.caps.max_send_wr
                ),
            ));
        }
        if st.error.is_some() {
            for wr in wrs {
                q.complete(wr, WcStatus::WrFlushErr);
            }
            return Ok(());
        }
        st.sq.extend(wrs.iter().map(|w| (*w, None)));
        drop(st);
        q.cv.notify_all();
        Ok(())
    }

    fn post_recvs(&self, wr_ids: &[u64]) -> Result<()> {
        let q = &self.0;
        let mut st = q.lock();
        if st.recvs.len() + wr_ids.len() > q.caps.max_recv_wr {
            return Err(TransportError::rdma(
                "post_recv",
                "ENOMEM",
                format!("receive queue full (max_recv_wr {})", q.caps.max_recv_wr),
            ));
        }
        if st.error.is_some() {
            for &id in wr_ids {
                q.recv_flushed(id);
            }
        } else {
            st.recvs.extend(wr_ids);
        }
        Ok(())
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take the connection to the peer's queue pair `from`.
    pub(super) fn attach(self: &Arc<Self>, stream: UnixStream, from: u32) {
        let mut st = self.lock();
        match &st.remote {
            None => {
                st.early = Some((stream, from));
                return;
            }
            Some(r) if r.qpn != from || st.connected => return,
            Some(_) => {}
        }
        let Ok(w) = stream.try_clone() else { return };
        *self.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
        st.connected = true;
        drop(st);
        let q = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name(format!("avp-soft-qp{}-rx", self.qpn))
            .spawn(move || q.reader(stream));
        if spawned.is_err() {
            self.lock().peer_gone = true;
        }
        self.cv.notify_all();
    }

    /// Report `wr`'s completion with `status` (successes only when signaled).
    fn complete(&self, wr: &WriteWr, status: WcStatus) {
        if status == WcStatus::Success && !wr.signaled {
            return;
        }
        let ok = self.send_cq.push(Wc {
            wr_id: wr.wr_id,
            status,
            opcode: WcOpcode::Write,
            imm: None,
            byte_len: 0,
            qpn: self.qpn,
        });
        if !ok {
            self.lock().error.get_or_insert(WcStatus::Other(0));
        }
    }

    fn recv_flushed(&self, wr_id: u64) {
        self.recv_cq.push(Wc {
            wr_id,
            status: WcStatus::WrFlushErr,
            opcode: WcOpcode::RecvWithImm,
            imm: None,
            byte_len: 0,
            qpn: self.qpn,
        });
    }

    /// Enter the error state: the first sent request (or `seq`'s) reports
    /// `status`, everything else outstanding is flushed.
    fn fail(&self, st: &mut State, seq: Option<u64>, status: WcStatus) {
        if st.error.is_some() {
            return;
        }
        st.error = Some(status);
        let sent = std::mem::take(&mut st.sent)
            .into_iter()
            .map(|s| (s.wr, Some(s.seq)));
        let queued = std::mem::take(&mut st.sq);
        let mut first = true;
        for (wr, at) in sent.chain(queued) {
            let hit = match seq {
                Some(q) => at == Some(q),
                None => first,
            };
            self.complete(&wr, if hit { status } else { WcStatus::WrFlushErr });
            first = false;
        }
        for id in std::mem::take(&mut st.recvs) {
            self.recv_flushed(id);
        }
        self.cv.notify_all();
    }

    /// Execute the send queue in order.
    fn requester(self: Arc<Self>) {
        loop {
            let mut st = self.lock();
            let (wr, seq) = loop {
                if st.closed {
                    return;
                }
                if let Some(seq) = st.rnr.take() {
                    st.rnr_tries += 1;
                    if st.rnr_tries > self.caps.rnr_retry {
                        self.fail(&mut st, Some(seq), WcStatus::RnrRetryExcErr);
                        continue;
                    }
                    // Go back: resend everything from the refused request on.
                    while let Some(s) = st.sent.pop_back() {
                        let at = s.seq;
                        st.sq.push_front((s.wr, Some(s.seq)));
                        if at == seq {
                            break;
                        }
                    }
                    drop(st);
                    std::thread::sleep(Duration::from_millis(1));
                    st = self.lock();
                    continue;
                }
                if st.error.is_none() {
                    let silent = st.sent.front().is_some_and(|s| {
                        let heard = st.last_heard.map_or(s.at, |h| h.max(s.at));
                        heard.elapsed() > self.caps.timeout
                    });
                    if silent || (st.peer_gone && !(st.sent.is_empty() && st.sq.is_empty())) {
                        self.fail(&mut st, None, WcStatus::RetryExcErr);
                        continue;
                    }
                    if st.connected
                        && !st.peer_gone
                        && let Some((wr, seq)) = st.sq.pop_front()
                    {
                        break (wr, seq);
                    }
                }
                st = self
                    .cv
                    .wait_timeout(st, Duration::from_millis(20))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            };
            let seq = seq.unwrap_or_else(|| {
                st.next_seq += 1;
                st.next_seq
            });
            st.sent.push_back(Sent {
                wr,
                seq,
                at: Instant::now(),
            });
            let Some(local) = self
                .shared
                .key(wr.lkey)
                .and_then(|r| r.span(wr.local_addr, u64::from(wr.len)).map(|p| (r, p)))
            else {
                self.fail(&mut st, Some(seq), WcStatus::LocProtErr);
                continue;
            };
            drop(st);
            let p = Packet {
                kind: Kind::Write,
                flags: if wr.imm.is_some() { HAS_IMM } else { 0 }
                    | if wr.signaled || wr.imm.is_some() {
                        ACK_REQ
                    } else {
                        0
                    },
                seq,
                addr: wr.remote_addr,
                rkey: wr.rkey,
                imm: wr.imm.unwrap_or(0),
                len: wr.len,
                ..Packet::default()
            };
            // SAFETY: the span lies inside a live registration, whose mapping
            // `local.0` keeps; the poster keeps the bytes unchanged until the
            // request completes (the verbs contract).
            let bytes = unsafe { std::slice::from_raw_parts(local.1, wr.len as usize) };
            if self.send(&p, bytes).is_err() {
                let mut st = self.lock();
                st.peer_gone = true;
                self.fail(&mut st, None, WcStatus::RetryExcErr);
            }
        }
    }

    /// Write one packet (and its bytes) to the peer.
    fn send(&self, p: &Packet, bytes: &[u8]) -> Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let s = w
            .as_mut()
            .ok_or_else(|| TransportError::PeerGone("queue pair not connected".into()))?;
        write_all_vectored(s, &[&p.encode(), bytes])
    }

    /// Read the peer's packets until the connection closes.
    fn reader(self: Arc<Self>, mut s: UnixStream) {
        let mut head = [0u8; Packet::LEN];
        loop {
            if s.read_exact(&mut head).is_err() {
                let mut st = self.lock();
                st.peer_gone = true;
                if !st.sent.is_empty() {
                    self.fail(&mut st, None, WcStatus::RetryExcErr);
                }
                self.cv.notify_all();
                return;
            }
            let p = Packet::decode(&head);
            self.lock().last_heard = Some(Instant::now());
            let ok = match p.kind {
                Kind::Write => self.respond(&p, &mut s),
                Kind::Ack => {
                    self.acked(p.seq);
                    true
                }
                Kind::Nak => {
                    self.refused(&p);
                    true
                }
                Kind::Hello => false,
            };
            if !ok {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Everything up to `seq` was executed by the peer.
    fn acked(&self, seq: u64) {
        let mut st = self.lock();
        while st.sent.front().is_some_and(|s| s.seq <= seq) {
            let s = st.sent.pop_front().expect("checked");
            self.complete(&s.wr, WcStatus::Success);
        }
        st.rnr_tries = 0;
        self.cv.notify_all();
    }

    fn refused(&self, p: &Packet) {
        if p.status == NAK_RNR {
            let mut st = self.lock();
            if st.sent.iter().any(|s| s.seq == p.seq) {
                st.rnr = Some(p.seq);
                self.cv.notify_all();
            }
            return;
        }
        self.acked(p.seq.saturating_sub(1));
        let status = match p.status {
            NAK_ACCESS => WcStatus::RemAccessErr,
            _ => WcStatus::RemOpErr,
        };
        let mut st = self.lock();
        self.fail(&mut st, Some(p.seq), status);
    }

    /// The responder's side of a write: check, place, consume a receive, answer.
    fn respond(&self, p: &Packet, s: &mut UnixStream) -> bool {
        let len = u64::from(p.len);
        let skip = {
            let mut st = self.lock();
            match st.discard_until {
                _ if st.error.is_some() => true,
                Some(d) if d != p.seq => true,
                Some(_) => {
                    st.discard_until = None;
                    false
                }
                None => false,
            }
        };
        if skip {
            return discard(s, len);
        }
        let target = self
            .shared
            .key(p.rkey)
            .filter(|r| r.remote_write)
            .and_then(|r| r.span(p.addr, len).map(|ptr| (r, ptr)));
        let Some((_keep, ptr)) = target else {
            if !discard(s, len) {
                return false;
            }
            self.answer(Kind::Nak, NAK_ACCESS, p.seq);
            let mut st = self.lock();
            self.fail(&mut st, None, WcStatus::RemAccessErr);
            return true;
        };
        // SAFETY: the span lies inside a live registration open to remote
        // writes, mapped as long as `_keep` lives; the owner gave the peer
        // the right to write it (the verbs contract).
        let dst = unsafe { std::slice::from_raw_parts_mut(ptr, p.len as usize) };
        if s.read_exact(dst).is_err() {
            return false;
        }
        if p.flags & HAS_IMM != 0 {
            let mut st = self.lock();
            let Some(wr_id) = st.recvs.pop_front() else {
                st.discard_until = Some(p.seq);
                drop(st);
                self.answer(Kind::Nak, NAK_RNR, p.seq);
                return true;
            };
            drop(st);
            let ok = self.recv_cq.push(Wc {
                wr_id,
                status: WcStatus::Success,
                opcode: WcOpcode::RecvWithImm,
                imm: Some(p.imm),
                byte_len: p.len,
                qpn: self.qpn,
            });
            if !ok {
                let mut st = self.lock();
                self.fail(&mut st, None, WcStatus::Other(0));
                return true;
            }
        }
        if p.flags & ACK_REQ != 0 {
            self.answer(Kind::Ack, 0, p.seq);
        }
        true
    }

    fn answer(&self, kind: Kind, status: u32, seq: u64) {
        let p = Packet {
            kind,
            status,
            seq,
            ..Packet::default()
        };
        let _ = self.send(&p, &[]);
    }
}

/// Read and drop `len` bytes.
fn discard(s: &mut UnixStream, len: u64) -> bool {
    std::io::copy(&mut s.take(len), &mut std::io::sink()).is_ok_and(|n| n == len)
}
