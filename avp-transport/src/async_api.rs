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

use std::os::fd::{OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use avp_wire::{MessageLayout, ModelIdentity};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::Endpoint;
use crate::endpoint::Listener;
use crate::error::{Result, TransportError};
use crate::options::Options;
use crate::port::{AcquireArmed, Armed, LoanMem};
use crate::receiver::{Receiver, RecvGuard};
use crate::sender::{Loan, Ready, Sender};

fn dup(fd: RawFd) -> Result<OwnedFd> {
    // SAFETY: `fd` is open for the duration of this call (owned by the endpoint).
    let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    b.try_clone_to_owned().map_err(TransportError::io("dup"))
}

/// Register a duplicate of `fd` with the tokio reactor.
pub(crate) fn register(fd: RawFd, interest: Interest) -> Result<AsyncFd<OwnedFd>> {
    let owned = dup(fd)?;
    // SAFETY: `owned` is a valid descriptor owned by the AsyncFd for its whole
    // lifetime, and `OwnedFd::as_raw_fd` always returns that same descriptor.
    unsafe { AsyncFd::register_with_interest(owned, interest) }.map_err(|e| TransportError::Io {
        op: "register with tokio",
        source: std::io::Error::other(e.to_string()),
    })
}

/// Wait until `a` or `b` is ready for `interest`, or `timeout` passes (`Ok(false)`).
async fn ready_either([a, b]: [RawFd; 2], interest: Interest, timeout: Duration) -> Result<bool> {
    let fa = register(a, interest)?;
    let fb = if b == a {
        None
    } else {
        Some(register(b, interest)?)
    };
    let waited = tokio::time::timeout(timeout, async {
        match &fb {
            None => fa.ready(interest).await.map(|mut g| g.clear_ready()),
            Some(fb) => tokio::select! {
                g = fa.ready(interest) => g.map(|mut g| g.clear_ready()),
                g = fb.ready(interest) => g.map(|mut g| g.clear_ready()),
            },
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

/// A blocking-pool task that failed to finish (it panicked or was cancelled).
fn task_failed(what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> TransportError {
    move |e| TransportError::Io {
        op: what,
        source: std::io::Error::other(e.to_string()),
    }
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
            .map_err(task_failed("connect task"))?
    }
}

impl Listener {
    /// [`Listener::accept`] for tokio: waits and handshakes on the blocking pool.
    pub async fn accept_async(self: &Arc<Self>, timeout: Duration) -> Result<Receiver> {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || me.accept(timeout))
            .await
            .map_err(task_failed("accept task"))?
    }
}

impl Receiver {
    /// [`Receiver::recv`] for tokio: the wait for the next message is a
    /// future, and `Send` (spawn it on any runtime).
    ///
    /// Over TCP, the wait for the message's first bytes is asynchronous; the rest
    /// of that message is then read on the calling thread (bounded by the stall
    /// timeout), as it is already streaming in.
    pub async fn recv_async(&self, timeout: Duration) -> Result<RecvGuard> {
        self.session.check_alive()?;
        let deadline = crate::wait::from_now(timeout);
        loop {
            match self.port.arm()? {
                Armed::Ready(d) => return self.deliver(d),
                Armed::Busy => {
                    left(deadline, timeout, "a message")?;
                    tokio::task::yield_now().await;
                }
                Armed::Wait(fds) => {
                    let wait = left(deadline, timeout, "a message");
                    let waited = match wait {
                        Ok(w) => ready_either(fds, Interest::READABLE, w).await,
                        Err(e) => Err(e),
                    };
                    self.port.disarm();
                    waited?;
                }
            }
        }
    }
}

impl Sender {
    /// Memory for `len` bytes; waiting for it is a future.
    async fn acquire_async(&mut self, len: usize) -> Result<LoanMem> {
        self.check(len as u64)?;
        let timeout = self.port.loan_timeout();
        let deadline = crate::wait::from_now(timeout);
        loop {
            let fds = match self.port.arm_acquire(len)? {
                AcquireArmed::Ready(mem) => return Ok(mem),
                AcquireArmed::Wait(fds) => fds,
            };
            let waited = match left(deadline, timeout, "a free shared-memory slot") {
                Ok(w) => ready_either(fds, Interest::READABLE, w).await,
                Err(e) => Err(e),
            };
            self.port.disarm_acquire();
            waited?;
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
        let mem = self.acquire_async(bytes.len()).await?;
        let mem = self.copy_in(mem, bytes)?;
        self.port.publish_async(mem, bytes.len()).await
    }
}

impl Ready<'_> {
    /// [`Ready::send`] for tokio: on TCP, waiting for socket space is a future.
    pub async fn send_async(mut self) -> Result<()> {
        let mem = self.mem.take().expect("memory present until sent");
        self.port.publish_async(mem, self.len).await
    }
}
