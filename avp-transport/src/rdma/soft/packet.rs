//! The emulator's wire: a 40-byte little-endian header per packet (a write's
//! bytes follow it), on the stream socket of a connected queue pair.

/// What a packet is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Kind {
    /// First packet of a connection: `seq` = the queue pair dialled, `rkey` = the dialler's.
    #[default]
    Hello,
    /// A write; `len` bytes follow.
    Write,
    /// Every request up to `seq` was executed.
    Ack,
    /// Request `seq` failed with `status`.
    Nak,
}

pub(super) const HAS_IMM: u8 = 1;
pub(super) const ACK_REQ: u8 = 2;
pub(super) const NAK_RNR: u32 = 1;
pub(super) const NAK_ACCESS: u32 = 2;

/// A packet header (40 bytes, little-endian).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Packet {
    pub kind: Kind,
    pub flags: u8,
    pub status: u32,
    pub seq: u64,
    pub addr: u64,
    pub rkey: u32,
    pub imm: u32,
    pub len: u32,
}

impl Packet {
    pub const LEN: usize = 40;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.kind as u8;
        b[1] = self.flags;
        b[4..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.addr.to_le_bytes());
        b[24..28].copy_from_slice(&self.rkey.to_le_bytes());
        b[28..32].copy_from_slice(&self.imm.to_le_bytes());
        b[32..36].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; Self::LEN]) -> Packet {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Packet {
            kind: match b[0] {
                1 => Kind::Write,
                2 => Kind::Ack,
                3 => Kind::Nak,
                _ => Kind::Hello,
            },
            flags: b[1],
            status: u32_at(4),
            seq: u64_at(8),
            addr: u64_at(16),
            rkey: u32_at(24),
            imm: u32_at(28),
            len: u32_at(32),
        }
    }
}
