//! `cuda://NAME`: shared memory on this host with message sections in device
//! memory. The control socket, ring, doorbells and slot life cycle are shared
//! memory's (`shm://NAME` names the same socket); the sender adds a device
//! pool, paired slot for slot, when both ends offer devices the sender's
//! memory can reach. Otherwise (also when the sender's own device cannot be
//! opened here) the session is plain shared memory and `Session::explain`
//! says why. A listener whose device cannot be opened fails to bind.

use std::sync::Arc;

use avp_wire::ModelIdentity;

use crate::error::{Result, TransportError};
use crate::options::Options;
use crate::port::SendPort;
use crate::scheme::{Acceptor, Scheme};
use crate::session::Session;
use crate::shm::{self, ShmScheme};

use super::DeviceMem;

/// `cuda://NAME`.
pub(crate) struct CudaScheme;

/// The device `o` names, opened; an error when none is set.
fn device_of(o: &Options, scheme_use: &'static str) -> Result<Arc<dyn DeviceMem>> {
    let d = o
        .device
        .as_ref()
        .ok_or_else(|| TransportError::InvalidOption {
            option: "device",
            reason: format!(
                "{scheme_use} cuda:// needs Options::device (Device::Cuda(n), or Device::Emulated \
             for tests); use shm:// for host memory"
            ),
        })?;
    super::open(d.device)
}

impl Scheme for CudaScheme {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn form(&self) -> &'static str {
        "cuda://NAME"
    }

    fn check(&self, name: &str) -> std::result::Result<(), String> {
        ShmScheme.check(name)
    }

    fn bind(
        &self,
        name: &str,
        _identity: &ModelIdentity,
        options: &Options,
    ) -> Result<Vec<Box<dyn Acceptor>>> {
        let device = device_of(options, "binding")?;
        shm::bind_named("cuda", name, Some(device))
    }

    fn connect(
        &self,
        name: &str,
        identity: &ModelIdentity,
        options: &Options,
    ) -> Result<(Session, Box<dyn SendPort>)> {
        let mut reason = format!("address cuda://{name} is on this host");
        // A device that cannot be opened here (no driver, no `cuda` feature)
        // leaves plain shared memory, said in the session's explanation.
        let device = match device_of(options, "connecting to") {
            Ok(d) => Some(d),
            Err(e @ TransportError::InvalidOption { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!("cuda://{name}: {e}; falling back to shared memory");
                reason.push_str(&format!("; device not used: {e}"));
                None
            }
        };
        let io = shm::connect_named(name)?;
        shm::connect_over(io, identity, options, reason, device)
    }
}
