//! Entry points for the fuzz targets (feature `fuzzing`, not part of the API):
//! control frames decoded from arbitrary bytes, and both sides of the
//! handshake driven by a scripted peer whose frames come from arbitrary bytes.

use std::collections::VecDeque;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use avp_wire::ModelIdentity;

use crate::error::{Result, TransportError};
use crate::frame::{Frame, FrameIo, MAX_FRAME, decode};
use crate::handshake::{self, ClientStep};
use crate::options::Options;
use crate::session::TransportKind;

/// Split `data` as a TCP peer's byte stream would be read: u32 little-endian
/// length, then that many bytes, refused above the frame limit.
fn split(data: &[u8]) -> Vec<Result<Frame>> {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        rest = &rest[4..];
        if len > MAX_FRAME {
            out.push(Err(TransportError::Protocol("frame too large".into())));
            break;
        }
        let Some(body) = rest.get(..len) else {
            out.push(Err(TransportError::PeerGone("truncated".into())));
            break;
        };
        out.push(decode(body));
        rest = &rest[len..];
    }
    out
}

/// Decode every frame of `data` (framed as on TCP); the number that decoded.
pub fn decode_frames(data: &[u8]) -> usize {
    split(data).iter().filter(|f| f.is_ok()).count()
}

/// A peer whose frames are scripted; what the other side sends is dropped.
struct Scripted {
    frames: VecDeque<Result<Frame>>,
}

impl FrameIo for Scripted {
    fn send_frame(&mut self, _: &Frame, _: &[RawFd]) -> Result<()> {
        Ok(())
    }
    fn recv_frame(&mut self, _: Duration) -> Result<(Frame, Vec<OwnedFd>)> {
        match self.frames.pop_front() {
            Some(f) => f.map(|f| (f, Vec::new())),
            None => Err(TransportError::PeerGone("script ended".into())),
        }
    }
}

fn options(flags: u8) -> Options {
    Options {
        token: (flags & 1 != 0).then(|| "token".to_owned()),
        vocabulary: (flags & 2 != 0).then(|| Arc::new(vec!["a".into(), "b".into(), "".into()])),
        ..Options::default()
    }
}

/// Run the listener's side of the handshake against frames from `data`.
/// The first byte picks the options (bit 0: a token, bit 1: a vocabulary).
pub fn handshake_listener(data: &[u8]) -> bool {
    let Some((&flags, rest)) = data.split_first() else {
        return false;
    };
    let mut io = Scripted {
        frames: split(rest).into(),
    };
    handshake::server(
        &mut io,
        &ModelIdentity::default(),
        &options(flags),
        handshake::Offers::default(),
        TransportKind::Tcp,
        Duration::ZERO,
    )
    .is_ok()
}

/// Run the connecting side of the handshake against frames from `data`.
/// The first byte picks the options as for [`handshake_listener`].
pub fn handshake_client(data: &[u8]) -> bool {
    let Some((&flags, rest)) = data.split_first() else {
        return false;
    };
    let o = options(flags);
    let mut io = Scripted {
        frames: split(rest).into(),
    };
    let ours = handshake::hello(&ModelIdentity::default(), &o, None, None);
    let Ok((ours, theirs)) = handshake::client_hello(&mut io, ours, Duration::ZERO) else {
        return false;
    };
    handshake::client_finish(
        &mut io,
        &ours,
        &theirs,
        &o,
        ClientStep::Stay("fuzz".into()),
        TransportKind::Tcp,
        Duration::ZERO,
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(frames: &[serde_json::Value]) -> Vec<u8> {
        let mut out = vec![0u8];
        for f in frames {
            let b = serde_json::to_vec(f).unwrap();
            out.extend((b.len() as u32).to_le_bytes());
            out.extend(b);
        }
        out
    }

    #[test]
    fn scripted_peers_reach_the_handshake() {
        let hello = serde_json::to_value(Frame::Hello(handshake::hello(
            &ModelIdentity::default(),
            &Options::default(),
            None,
            None,
        )))
        .unwrap();
        let auth = serde_json::json!({"type": "auth", "mac": null, "reason": "fuzz"});
        assert!(handshake_listener(&framed(&[hello.clone(), auth])));
        assert!(!handshake_listener(&framed(std::slice::from_ref(&hello))));
        assert_eq!(decode_frames(&framed(&[hello.clone(), hello])[1..]), 2);
        assert!(!handshake_client(b"\x00garbage"));
    }
}
