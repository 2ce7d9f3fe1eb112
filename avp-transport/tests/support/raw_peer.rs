//! A hand-made peer that speaks the control protocol of spec/transport.md
//! byte by byte (u32 little-endian length, then a JSON frame), for tests that
//! need a peer the library would never be: one that lies, stalls or breaks
//! the protocol. Shared by the transport crate's tests and the workspace's.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use avp_wire::ModelIdentity;
use serde_json::{Value, json};

/// The transport protocol version the library speaks.
pub const PROTOCOL: u32 = 3;

/// A TCP connection speaking raw control frames.
pub struct RawPeer {
    /// The connection (write message bytes to it after the handshake).
    pub stream: TcpStream,
}

impl RawPeer {
    /// Connect to `tcp://HOST:PORT`.
    pub fn connect(addr: &str) -> RawPeer {
        let stream = TcpStream::connect(addr.strip_prefix("tcp://").expect("a tcp address"))
            .expect("connect");
        RawPeer { stream }
    }

    /// Send one frame.
    pub fn send(&mut self, frame: &Value) -> std::io::Result<()> {
        let body = serde_json::to_vec(frame).expect("json");
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&body);
        self.stream.write_all(&out)
    }

    /// Receive one frame within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> std::io::Result<Value> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        self.stream.read_exact(&mut body)?;
        serde_json::from_slice(&body).map_err(std::io::Error::other)
    }

    /// Handshake as a token-less peer running `identity`; the listener's
    /// Accept frame.
    pub fn handshake(addr: &str, identity: &ModelIdentity, timeout: Duration) -> (RawPeer, Value) {
        let mut p = RawPeer::connect(addr);
        p.send(&hello(identity, 0, 1 << 40)).unwrap();
        let theirs = p.recv(timeout).unwrap();
        assert_eq!(theirs["type"], "hello", "{theirs}");
        p.send(&auth(Some("raw test peer"))).unwrap();
        let accept = p.recv(timeout).unwrap();
        assert_eq!(accept["type"], "accept", "{accept}");
        (p, accept)
    }
}

/// A `Hello` frame of a token-less TCP peer.
pub fn hello(identity: &ModelIdentity, vocab_tokens: u32, max_message: u64) -> Value {
    json!({
        "type": "hello",
        "protocol": PROTOCOL,
        "agent_id": "raw",
        "identity": identity,
        "max_message": max_message,
        "transports": ["tcp"],
        "boot_id": "",
        "shm_socket": null,
        "nonce": "00".repeat(32),
        "auth_required": false,
        "transport_reason": null,
        "vocab_tokens": vocab_tokens,
        "want_vocabulary": false,
    })
}

/// An `Auth` frame without a MAC.
pub fn auth(reason: Option<&str>) -> Value {
    json!({ "type": "auth", "mac": null, "reason": reason })
}
