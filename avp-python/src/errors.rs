//! One exception hierarchy, rooted at `avp_rs.AvpError`, carrying the Rust
//! error's message.

use avp_transport::TransportError;
use avp_wire::WireError;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::{PyErr, create_exception};

create_exception!(avp_rs, AvpError, PyException, "Every error avp_rs raises.");
create_exception!(
    avp_rs,
    Timeout,
    AvpError,
    "Nothing came within the timeout."
);
create_exception!(
    avp_rs,
    PeerGone,
    AvpError,
    "The peer left (or the session ended)."
);
create_exception!(
    avp_rs,
    AuthError,
    AvpError,
    "A token was refused or missing."
);
create_exception!(
    avp_rs,
    SessionError,
    AvpError,
    "A session expired, or a message named another one."
);
create_exception!(
    avp_rs,
    WireError_,
    AvpError,
    "Bytes that are not a valid avp message (or a checksum mismatch)."
);
create_exception!(
    avp_rs,
    TooLarge,
    AvpError,
    "A message over the session's size limit."
);
create_exception!(
    avp_rs,
    Refused,
    AvpError,
    "The peer refused a message and said why; nothing was delivered."
);
create_exception!(
    avp_rs,
    TransportError_,
    AvpError,
    "An I/O, protocol or device failure of a transport."
);
create_exception!(
    avp_rs,
    MessageReleased,
    AvpError,
    "The message was released: its views cannot be read any more."
);
create_exception!(
    avp_rs,
    ViewsAlive,
    AvpError,
    "Arrays or tensors still view the message: it cannot be released yet."
);

/// The Python exception for a transport error.
pub(crate) fn transport(e: TransportError) -> PyErr {
    let msg = e.to_string();
    match e {
        TransportError::Timeout(..) => Timeout::new_err(msg),
        TransportError::PeerGone(_) => PeerGone::new_err(msg),
        TransportError::Auth(_) => AuthError::new_err(msg),
        TransportError::SessionExpired { .. } | TransportError::WrongSession { .. } => {
            SessionError::new_err(msg)
        }
        TransportError::Wire(_) => WireError_::new_err(msg),
        TransportError::TooLarge { .. } => TooLarge::new_err(msg),
        TransportError::Refused { .. } => Refused::new_err(msg),
        TransportError::InvalidAddress { .. } | TransportError::InvalidOption { .. } => {
            pyo3::exceptions::PyValueError::new_err(msg)
        }
        _ => TransportError_::new_err(msg),
    }
}

/// The Python exception for a wire-format error.
pub(crate) fn wire(e: WireError) -> PyErr {
    WireError_::new_err(e.to_string())
}

/// Register the exceptions in the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("AvpError", py.get_type::<AvpError>())?;
    m.add("Timeout", py.get_type::<Timeout>())?;
    m.add("PeerGone", py.get_type::<PeerGone>())?;
    m.add("AuthError", py.get_type::<AuthError>())?;
    m.add("SessionError", py.get_type::<SessionError>())?;
    m.add("WireError", py.get_type::<WireError_>())?;
    m.add("TooLarge", py.get_type::<TooLarge>())?;
    m.add("Refused", py.get_type::<Refused>())?;
    m.add("TransportError", py.get_type::<TransportError_>())?;
    m.add("MessageReleased", py.get_type::<MessageReleased>())?;
    m.add("ViewsAlive", py.get_type::<ViewsAlive>())?;
    Ok(())
}
