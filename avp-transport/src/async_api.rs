//! tokio entry points. Waiting (for a peer, a message, a free slot, socket space)
//! is asynchronous: the descriptors the blocking API would sleep on are awaited
//! through the tokio reactor. Connecting and accepting run the (short, bounded)
//! handshake on tokio's blocking pool.
//!
//! ```no_run
//! # async fn demo() -> avp_transport::Result<()> {
//! use std::{sync::Arc, time::Duration};
//! use avp_transport::{Endpoint, Options};
//! let id = avp_wire::ModelIdentity::default();
//! let listener = Arc::new(Endpoint::bind("shm://async-demo", &id, Options::default())?);
//! let rx = listener.accept_async(Duration::from_secs(10)).await?;
//! let guard = rx.recv_async(Duration::from_secs(10)).await?;
//! guard.message().verify()?;
//! # Ok(()) }
//! ```

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use avp_wire::{MessageLayout, ModelIdentity};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::Endpoint;
use crate::endpoint::{Listener, Loan, LoanMem, Ready, Sender, SenderInner};
use crate::error::{Result, TransportError};
use crate::options::Options;
use crate::receiver::{HeldMem, Receiver, RecvGuard, RecvInner};

fn dup(fd: RawFd) -> Result<OwnedFd> {
    // SAFETY: `fd` is open for the duration of this call (owned by the endpoint).
    let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    b.try_clone_to_owned().map_err(TransportError::io("dup"))
}

/// Register a duplicate of `fd` with the tokio reactor.
fn register(fd: RawFd, interest: Interest) -> Result<AsyncFd<OwnedFd>> {
    let owned = dup(fd)?;
    // SAFETY: `owned` is a valid descriptor owned by the AsyncFd for its whole
    // lifetime, and `OwnedFd::as_raw_fd` always returns that same descriptor.
    unsafe { AsyncFd::register_with_interest(owned, interest) }.map_err(|e| TransportError::Io {
        op: "register with tokio",
        source: std::io::Error::other(e.to_string()),
    })
}

/// Wait until `a` or `b` is ready for `interest`, or `timeout` passes (`Ok(false)`).
async fn ready_either(a: RawFd, b: RawFd, interest: Interest, timeout: Duration) -> Result<bool> {
    let fa = register(a, interest)?;
    let fb = register(b, interest)?;
    let waited = tokio::time::timeout(timeout, async {
        tokio::select! {
            g = fa.ready(interest) => g.map(|mut g| g.clear_ready()),
            g = fb.ready(interest) => g.map(|mut g| g.clear_ready()),
        }
    })
    .await;
    match waited {
        Err(_) => Ok(false),
        Ok(r) => r
            .map(|()| true)
            .map_err(TransportError::io("await readiness")),
    }
}

fn left(deadline: Instant, timeout: Duration, what: &'static str) -> Result<Duration> {
    let l = deadline.saturating_duration_since(Instant::now());
    if l.is_zero() {
        return Err(TransportError::Timeout(timeout, what));
    }
    Ok(l)
}

impl Endpoint {
    /// [`Endpoint::connect`] for tokio: the handshake runs on the blocking pool.
    pub async fn connect_async(
        addr: &str,
        identity: &ModelIdentity,
        options: Options,
    ) -> Result<Sender> {
        let (addr, identity) = (addr.to_owned(), identity.clone());
        tokio::task::spawn_blocking(move || Endpoint::connect(&addr, &identity, options))
            .await
            .map_err(|e| TransportError::Protocol(format!("connect task failed: {e}")))?
    }
}

impl Listener {
    /// [`Listener::accept`] for tokio: waits and handshakes on the blocking pool.
    pub async fn accept_async(self: &Arc<Self>, timeout: Duration) -> Result<Receiver> {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || me.accept(timeout))
            .await
            .map_err(|e| TransportError::Protocol(format!("accept task failed: {e}")))?
    }
}

impl Receiver {
    /// [`Receiver::recv`] for tokio: the wait for the next message is a future.
    ///
    /// Over TCP, the wait for the message's first bytes is asynchronous; the rest
    /// of that message is then read on the calling thread (bounded by the stall
    /// timeout), as it is already streaming in.
    pub async fn recv_async(&self, timeout: Duration) -> Result<RecvGuard<'_>> {
        self.session.check_alive()?;
        let deadline = crate::deadline::from_now(timeout);
        match &self.inner {
            RecvInner::Shm(s) => loop {
                if let Some(guard) = s.try_recv(Instant::now(), &|m| self.deliver_shm(m))? {
                    return Ok(guard);
                }
                if s.sender_writing() {
                    left(deadline, timeout, "a message")?;
                    tokio::task::yield_now().await;
                    continue;
                }
                s.set_waiting(true);
                let again = s.try_recv_checked();
                if !matches!(again, Ok(None)) || s.sender_writing() {
                    s.set_waiting(false);
                    if let Some(m) = again? {
                        return self.deliver_shm(m);
                    }
                    continue;
                }
                let [a, b] = s.wait_raw_fds();
                let waited = ready_either(
                    a,
                    b,
                    Interest::READABLE,
                    left(deadline, timeout, "a message")?,
                )
                .await;
                s.set_waiting(false);
                waited?;
            },
            RecvInner::Tcp(t) => {
                let fd = t.raw_fd();
                if !t.pending() && !ready_either(fd, fd, Interest::READABLE, timeout).await? {
                    return Err(TransportError::Timeout(timeout, "a message"));
                }
                let (mut b, l) = t.recv(left(deadline, timeout, "a message")?)?;
                let p = b.as_mut_ptr() as *const u8;
                self.guard(HeldMem::Tcp(b), p, l)
            }
        }
    }
}

impl Sender {
    /// Memory for `len` bytes; waiting for a free slot is a future.
    async fn acquire_async(&mut self, len: usize) -> Result<LoanMem> {
        self.check(len as u64)?;
        let timeout = match &self.inner {
            SenderInner::Shm(s) => s.loan_timeout(),
            SenderInner::Tcp(_) => Duration::ZERO,
        };
        let deadline = crate::deadline::from_now(timeout);
        loop {
            match &mut self.inner {
                SenderInner::Tcp(t) => return Ok(LoanMem::Tcp(t.acquire(len))),
                SenderInner::Shm(s) => {
                    if let Some(r) = s.acquire(len, false)? {
                        return Ok(LoanMem::Shm(r));
                    }
                    s.set_waiting(true);
                    if let Some(r) = s.acquire(len, false)? {
                        s.set_waiting(false);
                        return Ok(LoanMem::Shm(r));
                    }
                    let [a, b] = s.wait_fds();
                    let (a, b) = (a.as_raw_fd(), b.as_raw_fd());
                    let wait = left(deadline, timeout, "a free shared-memory slot")?;
                    let waited = ready_either(a, b, Interest::READABLE, wait).await;
                    s.set_waiting(false);
                    waited?;
                }
            }
        }
    }

    /// [`Sender::loan`] for tokio: waiting for a free slot is a future.
    pub async fn loan_async<'a>(&'a mut self, layout: &'a MessageLayout) -> Result<Loan<'a>> {
        let mem = self.acquire_async(layout.total_len()).await?;
        self.loan_in(layout, mem)
    }

    /// [`Sender::send_bytes`] for tokio.
    pub async fn send_bytes_async(&mut self, bytes: &[u8]) -> Result<()> {
        avp_wire::Message::parse(bytes)?;
        let mut mem = self.acquire_async(bytes.len()).await?;
        match (&mut self.inner, &mut mem) {
            (SenderInner::Tcp(t), LoanMem::Tcp(_)) => {
                let r = write_all_async(t, &[bytes]).await;
                if let LoanMem::Tcp(b) = mem {
                    t.abandon(b);
                }
                r
            }
            (SenderInner::Shm(s), LoanMem::Shm(r)) => {
                // SAFETY: the region is ours and at least bytes.len() long.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), r.ptr(), bytes.len()) };
                let LoanMem::Shm(r) = mem else { unreachable!() };
                s.stage(&r, bytes.len());
                s.publish(r, bytes.len())
            }
            _ => unreachable!("loan memory matches its sender"),
        }
    }
}

impl Ready<'_> {
    /// [`Ready::send`] for tokio: on TCP, waiting for socket space is a future.
    pub async fn send_async(mut self) -> Result<()> {
        if let SenderInner::Tcp(t) = &mut *self.sender {
            let Some(LoanMem::Tcp(buf)) = self.mem.take() else {
                unreachable!("loan memory matches its sender")
            };
            let r = write_all_async(t, &[buf.slice(self.len)]).await;
            t.abandon(buf);
            return r;
        }
        self.send()
    }
}

/// Write every part without blocking the task (plain TCP). TLS connections write
/// through rustls on the calling thread, bounded by the socket's send buffer.
async fn write_all_async(t: &mut crate::tcp::TcpSender, parts: &[&[u8]]) -> Result<()> {
    if !t.conn().is_plain() {
        return t.write_all_vectored(parts);
    }
    let stream = t.conn().tcp();
    stream
        .set_nonblocking(true)
        .map_err(TransportError::io("set nonblocking"))?;
    let afd = register(stream.as_raw_fd(), Interest::WRITABLE);
    let result = async {
        let afd = afd?;
        let mut slices = crate::tcp::io_slices(parts);
        let mut bufs: &mut [IoSlice<'_>] = &mut slices;
        while !bufs.is_empty() {
            let mut guard = afd
                .writable()
                .await
                .map_err(TransportError::io("await writable"))?;
            if let Ok(r) = guard.try_io(|_| std::io::Write::write_vectored(&mut &*stream, bufs)) {
                crate::tcp::advance(&mut bufs, r)?;
            }
        }
        Ok(())
    }
    .await;
    stream
        .set_nonblocking(false)
        .map_err(TransportError::io("set blocking"))?;
    result
}
