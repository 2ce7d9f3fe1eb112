//! Moving avp messages between agents: zero-copy shared memory on one host, TCP
//! across hosts, one API. Also `cuda://` (sections in GPU memory), `rdma://`,
//! and `http://`, the Python reference's HTTP binding, spoken with its agents.
//!
//! ```no_run
//! use std::time::Duration;
//! use avp_transport::{Endpoint, Options};
//! use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, MessageLayout, ModelIdentity, Payload};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let id = ModelIdentity::default();
//! // Agent B (receiver)
//! let listener = Endpoint::bind("shm://demo", &id, Options::default())?;
//! # std::thread::spawn(move || -> Result<(), avp_transport::TransportError> {
//! // Agent A (sender), in another process
//! let mut tx = Endpoint::connect("shm://demo", &id, Options::default())?;
//! let layout = MessageLayout::new(&Envelope::default(),
//!     &Payload::KvCache(KvCacheDesc::new(30, 3, 64, 128, DType::F16, KvLayout::Hnd)))?;
//! let mut loan = tx.loan(&layout)?;                 // a shared-memory slot
//! for s in loan.writer().sections_mut() { s.fill(0) } // write K/V in place
//! loan.finish()?.send()?;                           // CRCs, header, publish
//! # Ok(()) });
//! let rx = listener.accept(Duration::from_secs(10))?;
//! println!("{}", rx.session().explain());
//! let guard = rx.recv(Duration::from_secs(10))?;    // points into the sender's slot
//! let kv = guard.message().kv()?;
//! kv.verify_layer(0)?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod address;
mod assembly;
mod async_api;
mod device;
mod endpoint;
mod error;
mod frame;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod http;
mod options;
mod port;
mod rdma;
mod receiver;
mod scheme;
mod sender;
mod session;
#[cfg(target_os = "linux")]
mod shm;
mod tcp;
mod wait;

pub use address::Address;
pub use assembly::{KvAssembly, Layer};
#[cfg(target_os = "linux")]
pub use device::buffer::DeviceBuffer;
pub use device::loan::DeviceLoan;
pub use device::{Device, DeviceSpan};
pub use endpoint::{Endpoint, Listener};
pub use error::{AuthFailure, Result, TransportError};
pub use handshake::boot_id;
#[cfg(feature = "tls")]
pub use options::Tls;
pub use options::{DeviceOptions, HttpOptions, Options, RdmaOptions, ShmOptions, TcpOptions};
pub use port::Stats;
pub use rdma::RdmaDevice;
pub use receiver::{Receiver, RecvGuard};
pub use sender::{Loan, Ready, Sender};
pub use session::{Session, TransportKind};
