//! The sending half of a TCP session: messages are written with vectored
//! writes, from a pooled buffer (a loan) or straight from the caller's sections.

use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::time::Duration;

use tokio::io::Interest;

use crate::error::{Result, TransportError};
use crate::port::{Counters, LoanMem, PortFuture, SendPort};

use super::buf::{BufPool, PageBuf};
use super::conn::{Conn, advance, io_slices, write_all_vectored};

/// Zeros for padding between sections (alignment is at most 64 KiB).
static ZEROS: [u8; 65536] = [0; 65536];

/// The sending half of a TCP session.
pub(crate) struct TcpSender {
    conn: Conn,
    pool: BufPool,
    counters: Counters,
}

impl TcpSender {
    /// Wrap a connected, handshaken stream.
    pub(crate) fn new(conn: Conn) -> TcpSender {
        TcpSender {
            conn,
            pool: BufPool::default(),
            counters: Counters::default(),
        }
    }

    fn buffer(mem: &mut LoanMem) -> PageBuf {
        mem.take_keep::<PageBuf>()
            .expect("a TCP loan keeps its buffer")
    }
}

impl SendPort for TcpSender {
    fn acquire(&mut self, len: usize, _wait: bool) -> Result<Option<LoanMem>> {
        let mut buf = self.pool.take(len);
        let ptr = NonNull::new(buf.as_mut_ptr()).expect("a heap buffer is never at address 0");
        Ok(Some(LoanMem::new(
            ptr,
            buf.capacity(),
            0,
            Some(Box::new(buf)),
        )))
    }

    fn publish(&mut self, mut mem: LoanMem, len: usize) -> Result<()> {
        let buf = Self::buffer(&mut mem);
        Counters::bump(&self.counters.messages);
        let r = write_all_vectored(&mut self.conn, &[buf.slice(len)]);
        self.pool.give(buf);
        r
    }

    fn abandon(&mut self, mut mem: LoanMem) {
        let buf = Self::buffer(&mut mem);
        self.pool.give(buf);
    }

    fn loan_timeout(&self) -> Duration {
        Duration::ZERO
    }

    fn publish_async(&mut self, mut mem: LoanMem, len: usize) -> PortFuture<'_, ()> {
        let buf = Self::buffer(&mut mem);
        Counters::bump(&self.counters.messages);
        Box::pin(async move {
            let r = write_all_async(&mut self.conn, &[buf.slice(len)]).await;
            self.pool.give(buf);
            r
        })
    }

    fn vectored(&self) -> bool {
        true
    }

    /// Each section lands at its offset: zero padding is inserted between parts.
    fn send_parts(&mut self, prefix: &[u8], sections: &[(u64, &[u8])]) -> Option<Result<()>> {
        let mut parts: Vec<&[u8]> = Vec::with_capacity(sections.len() * 2 + 1);
        parts.push(prefix);
        let mut cursor = prefix.len() as u64;
        for &(off, bytes) in sections {
            let pad = (off - cursor) as usize;
            parts.push(&ZEROS[..pad]);
            parts.push(bytes);
            cursor = off + bytes.len() as u64;
        }
        Counters::bump(&self.counters.messages);
        Some(write_all_vectored(&mut self.conn, &parts))
    }

    fn stats(&self) -> &Counters {
        &self.counters
    }
}

/// Write every part without blocking the task (plain TCP). TLS connections
/// write through rustls on the calling thread, bounded by the socket's send
/// buffer.
async fn write_all_async(conn: &mut Conn, parts: &[&[u8]]) -> Result<()> {
    if !conn.is_plain() {
        return write_all_vectored(conn, parts);
    }
    let stream = conn.tcp();
    stream
        .set_nonblocking(true)
        .map_err(TransportError::io("set nonblocking"))?;
    let afd = crate::async_api::register(stream.as_raw_fd(), Interest::WRITABLE);
    let result = async {
        let afd = afd?;
        let mut slices = io_slices(parts);
        let mut bufs: &mut [IoSlice<'_>] = &mut slices;
        while !bufs.is_empty() {
            let mut guard = afd
                .writable()
                .await
                .map_err(TransportError::io("await writable"))?;
            if let Ok(r) = guard.try_io(|_| std::io::Write::write_vectored(&mut &*stream, bufs)) {
                advance(&mut bufs, r)?;
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
