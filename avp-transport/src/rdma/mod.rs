//! `rdma://HOST:PORT`: messages written by RDMA straight into the receiver's
//! registered memory, striped over several reliable-connected queue pairs.
//!
//! The control connection is an authenticated TCP session (the same
//! handshake, the same `Session::explain`). In it the sender offers its queue
//! pairs (`Auth`), the receiver answers with its own and its slot pool,
//! registered once for the session (`Accept`); both frames are covered by the
//! handshake's MAC. A message is written from the sender's registered loan
//! into a free receiver slot in slices (`RdmaOptions::slice`), dealt round
//! robin over the queue pairs, one doorbell per batch; each queue pair's
//! share ends with a write-with-immediate naming the slot, and the receiver
//! delivers the message once every share has landed. Slots come back to the
//! sender as credits over TCP when the receiver drops its guard; a message
//! larger than a slot gets a region registered for it alone.
//!
//! Devices: the kernel's verbs (cargo feature `rdma`), or the software
//! emulator ([`RdmaDevice::Emulated`]), which runs the same protocol between
//! processes on one host for tests and machines without an RDMA NIC, and is
//! only ever chosen explicitly. Without a usable device on both ends the
//! session runs over TCP and `Session::explain` says why.
//!
//! ```no_run
//! use std::time::Duration;
//! use avp_transport::{Endpoint, Options, RdmaDevice, RdmaOptions};
//! use avp_wire::ModelIdentity;
//! # fn main() -> avp_transport::Result<()> {
//! let o = Options::default().rdma(RdmaOptions::default().device(RdmaDevice::Emulated));
//! let listener = Endpoint::bind("rdma://127.0.0.1:7000", &ModelIdentity::default(), o.clone())?;
//! let tx = Endpoint::connect("rdma://127.0.0.1:7000", &ModelIdentity::default(), o)?;
//! let rx = listener.accept(Duration::from_secs(5))?;
//! assert!(rx.session().explain().contains("emulated"));
//! # drop(tx); Ok(()) }
//! ```

#[cfg(all(test, target_os = "linux"))]
mod hostile;
#[cfg(all(feature = "rdma", target_os = "linux"))]
mod ibverbs;
#[cfg(target_os = "linux")]
mod receiver;
#[cfg(target_os = "linux")]
pub(crate) mod scheme;
#[cfg(target_os = "linux")]
mod sender;
#[cfg(target_os = "linux")]
mod soft;
pub(crate) mod verbs;

#[cfg(target_os = "linux")]
pub(crate) use scheme::Accepting;

/// The RDMA device an endpoint uses (see `RdmaOptions::device`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RdmaDevice {
    /// A verbs device by name (`mlx5_0`); `""` takes the first one. Needs
    /// the `rdma` feature and `libibverbs` at run time.
    Verbs(String),
    /// The software emulator: the protocol between processes on this host,
    /// for tests and machines without an RDMA NIC. Both ends must choose it;
    /// sessions report it as emulated.
    Emulated,
}

impl std::str::FromStr for RdmaDevice {
    type Err = String;

    /// `emulated`, `verbs` (the first device) or `verbs:NAME`.
    fn from_str(s: &str) -> Result<RdmaDevice, String> {
        match s {
            "emulated" => Ok(RdmaDevice::Emulated),
            "verbs" => Ok(RdmaDevice::Verbs(String::new())),
            _ => s
                .strip_prefix("verbs:")
                .filter(|n| !n.is_empty())
                .map(|n| RdmaDevice::Verbs(n.to_owned()))
                .ok_or_else(|| {
                    format!("rdma device {s:?}: expected emulated, verbs or verbs:NAME")
                }),
        }
    }
}

impl std::fmt::Display for RdmaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RdmaDevice::Verbs(n) if n.is_empty() => f.write_str("verbs"),
            RdmaDevice::Verbs(n) => write!(f, "verbs:{n}"),
            RdmaDevice::Emulated => f.write_str("emulated"),
        }
    }
}

/// Open the device the options name. `Ok(Err(why))` when none is named and
/// this build or host has none (the session then runs over TCP); `Err` when a
/// named one cannot be opened.
#[cfg(target_os = "linux")]
pub(crate) fn open(
    o: &crate::Options,
) -> crate::Result<Result<std::sync::Arc<dyn verbs::Verbs>, String>> {
    match &o.rdma.device {
        Some(RdmaDevice::Emulated) => Ok(Ok(std::sync::Arc::new(soft::SoftVerbs::open()?))),
        #[cfg(feature = "rdma")]
        Some(RdmaDevice::Verbs(name)) => Ok(Ok(std::sync::Arc::new(ibverbs::IbVerbs::open(
            name,
            o.rdma.gid_index,
        )?))),
        #[cfg(feature = "rdma")]
        None => Ok(ibverbs::IbVerbs::open("", o.rdma.gid_index)
            .map(|v| std::sync::Arc::new(v) as std::sync::Arc<dyn verbs::Verbs>)
            .map_err(|e| format!("no usable RDMA device: {e}"))),
        #[cfg(not(feature = "rdma"))]
        Some(RdmaDevice::Verbs(name)) => Err(crate::TransportError::rdma(
            "open",
            "ENODEV",
            format!(
                "verbs device {name:?}: this build has no verbs backend (build with the \
                 `rdma` feature; RdmaDevice::Emulated stands in for tests)"
            ),
        )),
        #[cfg(not(feature = "rdma"))]
        None => Ok(Err(
            "no RDMA device: none configured (RdmaOptions::device) and this build has no \
             verbs backend (the `rdma` feature)"
                .into(),
        )),
    }
}

/// The immediate value of a share's last write: bit 31 marks a dedicated
/// region, bit 30 a message whose sections are in device memory, bits 24–29
/// hold the number of shares − 1, bits 0–23 the slot or region.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(crate) mod imm {
    /// Largest slot or region number.
    pub(crate) const MAX_ID: u32 = (1 << 24) - 1;

    /// What an immediate says.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) struct Imm {
        /// In a dedicated region (else a pool slot).
        pub(crate) dedicated: bool,
        /// Sections in device memory.
        pub(crate) device: bool,
        /// Queue pairs the message was dealt over.
        pub(crate) shares: usize,
        /// The slot or region.
        pub(crate) id: u32,
    }

    /// Encode.
    pub(crate) fn encode(i: Imm) -> u32 {
        debug_assert!((1..=64).contains(&i.shares) && i.id <= MAX_ID);
        (u32::from(i.dedicated) << 31)
            | (u32::from(i.device) << 30)
            | ((i.shares as u32 - 1) << 24)
            | i.id
    }

    /// Decode.
    pub(crate) fn decode(v: u32) -> Imm {
        Imm {
            dedicated: v >> 31 == 1,
            device: (v >> 30) & 1 == 1,
            shares: ((v >> 24) & 0x3f) as usize + 1,
            id: v & MAX_ID,
        }
    }

    #[cfg(test)]
    #[test]
    fn round_trips() {
        for (dedicated, device, shares, id) in [
            (false, false, 1, 0),
            (true, true, 16, MAX_ID),
            (false, true, 64, 7),
        ] {
            let i = Imm {
                dedicated,
                device,
                shares,
                id,
            };
            assert_eq!(decode(encode(i)), i);
        }
    }
}
