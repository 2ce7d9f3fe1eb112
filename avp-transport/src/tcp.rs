//! The TCP transport: frames are v2 messages as they are (the preamble carries the
//! length), written with vectored writes straight from the caller's sections and
//! read into pooled, page-aligned, pre-faulted buffers (the kernel's copy only).

use std::cell::RefCell;
use std::io::{IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use avp_wire::{PREAMBLE_LEN, Preamble};

use crate::buf::{BufPool, PageBuf};
use crate::error::{Result, TransportError};
use crate::frame::{peer_or_io, wait_readable};

/// A TCP connection, plain or wrapped in TLS.
pub enum Conn {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS, connecting side.
    #[cfg(feature = "tls")]
    Client(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    /// TLS, listening side.
    #[cfg(feature = "tls")]
    Server(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl Conn {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            #[cfg(feature = "tls")]
            Conn::Client(s) => &s.sock,
            #[cfg(feature = "tls")]
            Conn::Server(s) => &s.sock,
        }
    }

    /// Whether bytes are readable without waiting on the socket (TLS may hold
    /// decrypted bytes that the socket no longer signals).
    pub fn pending(&mut self) -> bool {
        match self {
            Conn::Plain(_) => false,
            #[cfg(feature = "tls")]
            Conn::Client(s) => s
                .conn
                .process_new_packets()
                .is_ok_and(|st| st.plaintext_bytes_to_read() > 0),
            #[cfg(feature = "tls")]
            Conn::Server(s) => s
                .conn
                .process_new_packets()
                .is_ok_and(|st| st.plaintext_bytes_to_read() > 0),
        }
    }

    /// Whether this is a plain (not TLS) connection.
    pub fn is_plain(&self) -> bool {
        matches!(self, Conn::Plain(_))
    }

    /// Wait up to `timeout` until something is readable.
    pub fn wait_readable(&mut self, timeout: Duration, what: &'static str) -> Result<()> {
        if self.pending() {
            return Ok(());
        }
        wait_readable(self.tcp().as_fd(), timeout, what)
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.tcp().as_fd()
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Conn::Client(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Conn::Server(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            #[cfg(feature = "tls")]
            Conn::Client(s) => s.write(buf),
            #[cfg(feature = "tls")]
            Conn::Server(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write_vectored(bufs),
            #[cfg(feature = "tls")]
            Conn::Client(s) => s.write_vectored(bufs),
            #[cfg(feature = "tls")]
            Conn::Server(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            #[cfg(feature = "tls")]
            Conn::Client(s) => s.flush(),
            #[cfg(feature = "tls")]
            Conn::Server(s) => s.flush(),
        }
    }
}

/// The non-empty parts as I/O slices.
pub(crate) fn io_slices<'a>(parts: &[&'a [u8]]) -> Vec<IoSlice<'a>> {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect()
}

/// Account for one vectored write's result: drop what was written, retry on EINTR.
pub(crate) fn advance(
    bufs: &mut &mut [IoSlice<'_>],
    written: std::io::Result<usize>,
) -> Result<()> {
    match written {
        Ok(0) => Err(TransportError::PeerGone("receiver stopped reading".into())),
        Ok(n) => {
            IoSlice::advance_slices(bufs, n);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
        Err(e) => Err(peer_or_io("send")(e)),
    }
}

/// Zeros for padding between sections (alignment is at most 64 KiB).
static ZEROS: [u8; 65536] = [0; 65536];

/// The sending half of a TCP session.
pub struct TcpSender {
    stream: Conn,
    pool: BufPool,
}

impl TcpSender {
    /// Wrap a connected, handshaken stream.
    pub fn new(stream: Conn) -> TcpSender {
        TcpSender {
            stream,
            pool: BufPool::default(),
        }
    }

    /// A buffer to encode one message into.
    pub fn acquire(&mut self, len: usize) -> PageBuf {
        self.pool.take(len)
    }

    /// Send `len` bytes of `buf` and keep the buffer for the next loan.
    pub fn publish(&mut self, buf: PageBuf, len: usize) -> Result<()> {
        let r = self.write_all_vectored(&[buf.slice(len)]);
        self.pool.give(buf);
        r
    }

    /// Give back a buffer that will not be sent.
    pub fn abandon(&mut self, buf: PageBuf) {
        self.pool.give(buf);
    }

    /// Write every part, in order, with as few system calls as the kernel allows.
    pub fn write_all_vectored(&mut self, parts: &[&[u8]]) -> Result<()> {
        let mut slices = io_slices(parts);
        let mut bufs: &mut [IoSlice<'_>] = &mut slices;
        while !bufs.is_empty() {
            let r = self.stream.write_vectored(bufs);
            advance(&mut bufs, r)?;
        }
        self.stream.flush().map_err(peer_or_io("send"))
    }

    /// The connection (for the async entry points).
    pub fn conn(&mut self) -> &mut Conn {
        &mut self.stream
    }

    /// Send a message whose header prefix and sections are separate buffers,
    /// inserting zero padding so each section lands at its offset.
    pub fn send_parts(&mut self, prefix: &[u8], offsets: &[(u64, &[u8])]) -> Result<()> {
        let mut parts: Vec<&[u8]> = Vec::with_capacity(offsets.len() * 2 + 1);
        parts.push(prefix);
        let mut cursor = prefix.len() as u64;
        for &(off, bytes) in offsets {
            let pad = (off - cursor) as usize;
            parts.push(&ZEROS[..pad]);
            parts.push(bytes);
            cursor = off + bytes.len() as u64;
        }
        self.write_all_vectored(&parts)
    }
}

/// The receiving half of a TCP session.
pub struct TcpReceiver {
    stream: RefCell<Conn>,
    pool: RefCell<BufPool>,
    max_message: u64,
    stall: Duration,
    /// Whether the socket's read timeout is `stall` already (set once: a system
    /// call per message would be pure overhead).
    stall_set: std::cell::Cell<bool>,
    broken: RefCell<Option<String>>,
}

impl TcpReceiver {
    /// Wrap a connected, handshaken stream. `stall` bounds the wait for the rest of
    /// a message once its first byte has arrived.
    pub fn new(stream: Conn, max_message: u64, stall: Duration) -> TcpReceiver {
        TcpReceiver {
            stream: RefCell::new(stream),
            pool: RefCell::new(BufPool::default()),
            max_message,
            stall,
            stall_set: std::cell::Cell::new(false),
            broken: RefCell::new(None),
        }
    }

    fn fail(&self, e: TransportError) -> TransportError {
        *self.broken.borrow_mut() = Some(e.to_string());
        let _ = self
            .stream
            .borrow()
            .tcp()
            .shutdown(std::net::Shutdown::Both);
        e
    }

    /// Read the next message into a pooled buffer. A bad preamble or an oversized
    /// length is refused before any allocation, and closes the connection.
    pub fn recv(&self, timeout: Duration) -> Result<(PageBuf, usize)> {
        if let Some(why) = self.broken.borrow().as_ref() {
            return Err(TransportError::PeerGone(format!(
                "connection closed after an earlier error: {why}"
            )));
        }
        let mut stream = self.stream.borrow_mut();
        stream.wait_readable(timeout, "a message")?;
        if !self.stall_set.get() {
            stream
                .tcp()
                .set_read_timeout(Some(self.stall))
                .map_err(TransportError::io("set timeout"))?;
            self.stall_set.set(true);
        }
        let mut pre = [0u8; PREAMBLE_LEN];
        if let Err(e) = stream.read_exact(&mut pre) {
            drop(stream);
            return Err(self.fail(stall_or(e, self.stall)));
        }
        let p = match Preamble::read(&pre) {
            Ok(p) => p,
            Err(e) => {
                drop(stream);
                return Err(self.fail(TransportError::Protocol(format!(
                    "bad frame from peer: {e}"
                ))));
            }
        };
        if p.total_len > self.max_message {
            drop(stream);
            return Err(self.fail(TransportError::TooLarge {
                size: p.total_len,
                limit: self.max_message,
            }));
        }
        let len = p.total_len as usize;
        let mut buf = self.pool.borrow_mut().take(len);
        buf.slice_mut(PREAMBLE_LEN).copy_from_slice(&pre);
        if let Err(e) = stream.read_exact(&mut buf.slice_mut(len)[PREAMBLE_LEN..]) {
            drop(stream);
            self.pool.borrow_mut().give(buf);
            return Err(self.fail(stall_or(e, self.stall)));
        }
        Ok((buf, len))
    }

    /// The socket (for the async entry points).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self.stream.borrow().tcp())
    }

    /// Whether bytes are readable without waiting on the socket.
    pub fn pending(&self) -> bool {
        self.stream.borrow_mut().pending()
    }

    /// Whether [`recv`](Self::recv) would find bytes (or the end of the
    /// connection) without waiting.
    pub fn readable_now(&self) -> Result<bool> {
        let mut stream = self.stream.borrow_mut();
        if stream.pending() {
            return Ok(true);
        }
        let mut fds = [PollFd::new(stream.tcp().as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) => Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(TransportError::errno("poll")(e)),
        }
    }

    /// Return a buffer for reuse.
    pub fn give_back(&self, buf: PageBuf) {
        self.pool.borrow_mut().give(buf);
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
