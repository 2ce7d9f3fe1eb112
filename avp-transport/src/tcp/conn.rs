//! A TCP connection, plain or wrapped in TLS, and vectored writes over it.

use std::io::{IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::Duration;

use crate::error::{Result, TransportError};
use crate::frame::{peer_or_io, wait_readable};

/// A TCP connection, plain or wrapped in TLS.
pub(crate) enum Conn {
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
    pub(crate) fn tcp(&self) -> &TcpStream {
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
    pub(crate) fn pending(&mut self) -> bool {
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
    pub(crate) fn is_plain(&self) -> bool {
        matches!(self, Conn::Plain(_))
    }

    /// Wait up to `timeout` until something is readable.
    pub(crate) fn wait_readable(&mut self, timeout: Duration, what: &'static str) -> Result<()> {
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

/// A byte stream both ways.
trait Duplex: Read + Write {}
impl<T: Read + Write> Duplex for T {}

impl Conn {
    /// The stream to read and write, plain or through TLS.
    fn io(&mut self) -> &mut dyn Duplex {
        match self {
            Conn::Plain(s) => s,
            #[cfg(feature = "tls")]
            Conn::Client(s) => s.as_mut(),
            #[cfg(feature = "tls")]
            Conn::Server(s) => s.as_mut(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.io().read(buf)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.io().write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        self.io().write_vectored(bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.io().flush()
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

/// Write every part, in order, with as few system calls as the kernel allows.
pub(crate) fn write_all_vectored(conn: &mut impl Write, parts: &[&[u8]]) -> Result<()> {
    let mut slices = io_slices(parts);
    let mut bufs: &mut [IoSlice<'_>] = &mut slices;
    while !bufs.is_empty() {
        let r = conn.write_vectored(bufs);
        advance(&mut bufs, r)?;
    }
    conn.flush().map_err(peer_or_io("send"))
}
