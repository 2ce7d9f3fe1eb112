//! The receiving half of an `http://` session: messages the server took out of
//! requests, queued (boundedly) until the session's receiver takes them.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Result, TransportError};
use crate::port::{Armed, Counters, Delivery, Held, Idle, RecvPort};
use crate::session::Session;
use crate::tcp::buf::{BufPool, PageBuf};

/// A descriptor that is readable once rung, until drained (for event loops).
pub(super) struct Doorbell {
    rx: UnixStream,
    tx: UnixStream,
}

impl Doorbell {
    pub(super) fn new() -> Result<Doorbell> {
        let (rx, tx) = UnixStream::pair().map_err(TransportError::io("socketpair"))?;
        for s in [&rx, &tx] {
            s.set_nonblocking(true)
                .map_err(TransportError::io("socketpair nonblocking"))?;
        }
        Ok(Doorbell { rx, tx })
    }

    /// Make the descriptor readable (a full socket already is).
    pub(super) fn ring(&self) {
        let _ = (&self.tx).write(&[1]);
    }

    /// Make it unreadable again.
    pub(super) fn drain(&self) {
        let mut b = [0u8; 64];
        while matches!((&self.rx).read(&mut b), Ok(n) if n > 0) {}
    }

    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }
}

/// A message's bytes: a pooled, pre-faulted buffer a body was read into (back
/// to the pool when the receiver releases it), or a converted message.
pub(super) enum Body {
    Pooled {
        buf: Option<PageBuf>,
        len: usize,
        pool: Arc<Mutex<BufPool>>,
    },
    Owned(Vec<u8>),
}

impl Body {
    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Body::Pooled { buf, len, .. } => buf.as_ref().map_or(&[], |b| b.slice(*len)),
            Body::Owned(v) => v,
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if let Body::Pooled { buf, pool, .. } = self
            && let Some(b) = buf.take()
        {
            pool.lock().unwrap_or_else(|e| e.into_inner()).give(b);
        }
    }
}

/// Why a message could not be queued.
pub(super) enum Refused {
    /// The queue is full: wait for room.
    Full(Body),
    /// The session ended or its receiver is gone.
    Closed(Body),
}

#[derive(Default)]
struct State {
    queue: VecDeque<Body>,
    /// Why the session ended (its peer left), once it has.
    ended: Option<String>,
    /// The receiver was dropped: nothing more is queued.
    receiver_gone: bool,
    /// HTTP connections that carried this session's requests and are open.
    connections: usize,
}

/// One session's queue.
pub(super) struct Inbox {
    pub(super) session: Session,
    state: Mutex<State>,
    arrived: Condvar,
    bell: Doorbell,
    /// Woken when the receiver takes a message or goes (a request waits for room).
    pub(super) room: tokio::sync::Notify,
    capacity: usize,
    counters: Counters,
}

impl Inbox {
    pub(super) fn new(session: Session, capacity: usize) -> Result<Inbox> {
        Ok(Inbox {
            session,
            state: Mutex::new(State::default()),
            arrived: Condvar::new(),
            bell: Doorbell::new()?,
            room: tokio::sync::Notify::new(),
            capacity: capacity.max(1),
            counters: Counters::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether new requests may still join this session.
    pub(super) fn open(&self) -> bool {
        let s = self.lock();
        s.ended.is_none() && !s.receiver_gone && self.session.check_alive().is_ok()
    }

    /// Queue a message for the receiver.
    pub(super) fn push(&self, message: Body) -> std::result::Result<(), Refused> {
        let mut s = self.lock();
        if s.ended.is_some() || s.receiver_gone {
            return Err(Refused::Closed(message));
        }
        if s.queue.len() >= self.capacity {
            return Err(Refused::Full(message));
        }
        s.queue.push_back(message);
        drop(s);
        self.arrived.notify_one();
        self.bell.ring();
        Ok(())
    }

    /// A connection started carrying this session's requests.
    pub(super) fn connection_opened(&self) {
        self.lock().connections += 1;
    }

    /// A connection that carried this session's requests closed; returns
    /// whether that ended the session (it was the last one, and the peer
    /// closed it: one the server closed after refusing a body it did not read
    /// says nothing of the peer leaving).
    pub(super) fn connection_closed(&self, by_peer: bool) -> bool {
        let mut s = self.lock();
        s.connections = s.connections.saturating_sub(1);
        if s.connections > 0 || s.ended.is_some() || !by_peer {
            return false;
        }
        s.ended = Some(format!(
            "agent {:?} closed its HTTP connection",
            self.session.peer_agent
        ));
        drop(s);
        self.wake_all();
        true
    }

    /// End the session for `why` (messages already queued are still delivered).
    pub(super) fn end(&self, why: &str) {
        let mut s = self.lock();
        if s.ended.is_none() {
            s.ended = Some(why.to_owned());
        }
        drop(s);
        self.wake_all();
    }

    fn wake_all(&self) {
        self.arrived.notify_all();
        self.bell.ring();
        self.room.notify_waiters();
    }

    fn receiver_dropped(&self) {
        let mut s = self.lock();
        s.receiver_gone = true;
        s.queue.clear();
        drop(s);
        self.room.notify_waiters();
    }

    /// The next message, or why there will be none.
    fn take(&self, s: &mut State) -> Result<Option<Delivery>> {
        if let Some(m) = s.queue.pop_front() {
            self.room.notify_waiters();
            Counters::bump(&self.counters.messages);
            let (ptr, len) = (m.bytes().as_ptr(), m.bytes().len());
            return Ok(Some(Delivery {
                held: Held {
                    key: 0,
                    keep: Some(Box::new(m)),
                },
                ptr,
                len,
                peer_writable: false,
                device: None,
            }));
        }
        match &s.ended {
            Some(why) => Err(TransportError::PeerGone(why.clone())),
            None => Ok(None),
        }
    }
}

/// What a [`crate::Receiver`] holds: the inbox, and the server it is fed by
/// (kept running while the receiver lives, even after its listener is dropped).
pub(super) struct Receiving {
    pub(super) inbox: Arc<Inbox>,
    pub(super) _server: Arc<dyn Send + Sync>,
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.inbox.receiver_dropped();
    }
}

impl RecvPort for Receiving {
    fn recv(&self, timeout: Duration, _idle: Idle<'_>) -> Result<Delivery> {
        let deadline = crate::wait::from_now(timeout);
        let inbox = &self.inbox;
        let mut s = inbox.lock();
        loop {
            if let Some(d) = inbox.take(&mut s)? {
                return Ok(d);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Timeout(timeout, "a message"));
            }
            s = inbox
                .arrived
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn try_recv(&self, _now: Instant, _idle: Idle<'_>) -> Result<Option<Delivery>> {
        self.inbox.take(&mut self.inbox.lock())
    }

    fn arm(&self) -> Result<Armed> {
        Ok(match self.inbox.take(&mut self.inbox.lock())? {
            Some(d) => Armed::Ready(d),
            None => {
                let fd = self.inbox.bell.fd().as_raw_fd();
                Armed::Wait([fd, fd])
            }
        })
    }

    fn disarm(&self) {
        self.inbox.bell.drain();
    }

    fn release(&self, held: Held) {
        drop(held);
    }

    fn stats(&self) -> &Counters {
        &self.inbox.counters
    }
}
