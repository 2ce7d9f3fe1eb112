//! The receiving half of a TCP session: each message is read into a pooled,
//! page-aligned buffer (the kernel's copy only) that grows as bytes arrive, so
//! a peer's declared length costs nothing until its bytes are there.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use avp_wire::{PREAMBLE_LEN, Preamble};

use crate::error::{Result, TransportError};
use crate::frame::peer_or_io;
use crate::port::{Armed, Counters, Delivery, Held, Idle, RecvPort};

use super::buf::{BufPool, PageBuf};
use super::conn::Conn;

/// The first buffer for a message of unknown trust: at most this much is
/// allocated before any of its bytes arrive; then the buffer doubles as it fills.
const FIRST_BUFFER: usize = 1 << 20;

/// What one receiving thread at a time touches.
struct RxConn {
    conn: Conn,
    /// Whether the socket's read timeout is the stall timeout already (set
    /// once: a system call per message would be pure overhead).
    stall_set: bool,
    /// Why the connection was closed after an error, if it was.
    broken: Option<String>,
}

/// The receiving half of a TCP session.
pub(crate) struct TcpReceiver {
    rx: Mutex<RxConn>,
    /// Buffers given back by guards (any thread), reused by the next messages.
    pool: Mutex<BufPool>,
    max_message: u64,
    stall: Duration,
    counters: Counters,
}

impl TcpReceiver {
    /// Wrap a connected, handshaken stream. `stall` bounds the wait for the rest of
    /// a message once its first byte has arrived.
    pub(crate) fn new(conn: Conn, max_message: u64, stall: Duration) -> TcpReceiver {
        TcpReceiver {
            rx: Mutex::new(RxConn {
                conn,
                stall_set: false,
                broken: None,
            }),
            pool: Mutex::new(BufPool::default()),
            max_message,
            stall,
            counters: Counters::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RxConn> {
        self.rx.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pool(&self) -> MutexGuard<'_, BufPool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Close the connection after an error; later calls report it.
    fn fail(&self, rx: &mut RxConn, e: TransportError) -> TransportError {
        rx.broken = Some(e.to_string());
        let _ = rx.conn.tcp().shutdown(std::net::Shutdown::Both);
        e
    }

    /// Read the next message, which has started to arrive (or will within
    /// `timeout`). A bad preamble or an oversized length is refused before any
    /// allocation, and closes the connection.
    fn read_message(&self, rx: &mut RxConn, timeout: Duration) -> Result<Delivery> {
        if let Some(why) = &rx.broken {
            return Err(TransportError::PeerGone(format!(
                "connection closed after an earlier error: {why}"
            )));
        }
        rx.conn.wait_readable(timeout, "a message")?;
        if !rx.stall_set {
            rx.conn
                .tcp()
                .set_read_timeout(Some(self.stall))
                .map_err(TransportError::io("set timeout"))?;
            rx.stall_set = true;
        }
        let mut pre = [0u8; PREAMBLE_LEN];
        if let Err(e) = rx.conn.read_exact(&mut pre) {
            let e = stall_or(e, self.stall);
            return Err(self.fail(rx, e));
        }
        let p = match Preamble::read(&pre) {
            Ok(p) => p,
            Err(e) => {
                let e = TransportError::Protocol(format!("bad frame from peer: {e}"));
                return Err(self.fail(rx, e));
            }
        };
        if p.total_len > self.max_message {
            let e = TransportError::TooLarge {
                size: p.total_len,
                limit: self.max_message,
            };
            return Err(self.fail(rx, e));
        }
        let len = p.total_len as usize;
        let mut buf = self.pool().take_to_fill(len, FIRST_BUFFER);
        buf.slice_mut(PREAMBLE_LEN).copy_from_slice(&pre);
        if let Err(e) = self.fill(&mut rx.conn, &mut buf, len) {
            self.pool().give(buf);
            return Err(self.fail(rx, e));
        }
        Counters::bump(&self.counters.messages);
        let ptr = buf.as_mut_ptr() as *const u8;
        Ok(Delivery {
            held: Held {
                key: 0,
                keep: Some(Box::new(buf)),
            },
            ptr,
            len,
            peer_writable: false,
            device: None,
        })
    }

    /// Read bytes `PREAMBLE_LEN..len` into `buf`, doubling it (keeping what
    /// arrived) whenever it is full.
    fn fill(&self, conn: &mut Conn, buf: &mut PageBuf, len: usize) -> Result<()> {
        let mut filled = PREAMBLE_LEN;
        while filled < len {
            if filled == buf.capacity() {
                *buf = buf.grown(len.min(filled.saturating_mul(2)), filled);
            }
            let end = len.min(buf.capacity());
            match conn.read(&mut buf.slice_mut(end)[filled..]) {
                Ok(0) => {
                    return Err(TransportError::PeerGone(format!(
                        "connection closed {filled} bytes into a message of {len}"
                    )));
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(stall_or(e, self.stall)),
            }
        }
        Ok(())
    }

    /// Whether a read would find bytes (or the end of the connection) now.
    fn readable_now(rx: &mut RxConn) -> Result<bool> {
        if rx.conn.pending() {
            return Ok(true);
        }
        crate::wait::readable(&[rx.conn.tcp().as_fd()], Duration::ZERO)
    }
}

impl RecvPort for TcpReceiver {
    fn recv(&self, timeout: Duration, _idle: Idle<'_>) -> Result<Delivery> {
        let mut rx = self.lock();
        self.read_message(&mut rx, timeout)
    }

    /// A message whose first bytes have arrived is read whole, waiting for the
    /// rest up to the stall timeout. A receive in progress on another thread
    /// reads as "none yet".
    fn try_recv(&self, _now: Instant, _idle: Idle<'_>) -> Result<Option<Delivery>> {
        let mut rx = match self.rx.try_lock() {
            Ok(rx) => rx,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(None),
        };
        if rx.broken.is_none() && !Self::readable_now(&mut rx)? {
            return Ok(None);
        }
        self.read_message(&mut rx, Duration::ZERO).map(Some)
    }

    /// Over TCP the rest of a message is read on the calling thread once its
    /// first bytes are there (bounded by the stall timeout): it is streaming in.
    fn arm(&self) -> Result<Armed> {
        let mut rx = self.lock();
        if rx.broken.is_some() || Self::readable_now(&mut rx)? {
            return self.read_message(&mut rx, Duration::ZERO).map(Armed::Ready);
        }
        let fd = rx.conn.tcp().as_raw_fd();
        Ok(Armed::Wait([fd, fd]))
    }

    fn disarm(&self) {}

    fn release(&self, mut held: Held) {
        if let Some(buf) = held.keep.take().and_then(|k| k.downcast::<PageBuf>().ok()) {
            self.pool().give(*buf);
        }
    }

    fn stats(&self) -> &Counters {
        &self.counters
    }
}

fn stall_or(e: std::io::Error, stall: Duration) -> TransportError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            TransportError::Timeout(stall, "the rest of a message (peer stalled mid-message)")
        }
        _ => peer_or_io("receive")(e),
    }
}
