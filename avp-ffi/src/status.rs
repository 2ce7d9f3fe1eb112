//! Status codes, the thread-local last error, and the panic barrier.

use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

use avp_transport::TransportError;
use avp_wire::WireError;

/// Result of every call. `AVP_OK` is 0; everything else is an error whose text
/// `avp_last_error_message()` returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum avp_status {
    /// Success.
    AVP_OK = 0,
    /// A required pointer argument was NULL.
    AVP_ERR_NULL = 1,
    /// An argument was out of range or malformed (bad enum value, bad UTF-8, bad shape).
    AVP_ERR_INVALID_ARGUMENT = 2,
    /// The handle was never issued, was already freed, or is of another kind.
    AVP_ERR_INVALID_HANDLE = 3,
    /// The object is in use: a loan is outstanding, or messages are still held.
    AVP_ERR_BUSY = 4,
    /// Nothing arrived within the timeout (or no slot freed up).
    AVP_ERR_TIMEOUT = 5,
    /// The peer closed the session or died.
    AVP_ERR_PEER_GONE = 6,
    /// Authentication failed (token or TLS).
    AVP_ERR_AUTH = 7,
    /// A message exceeds the agreed size limit.
    AVP_ERR_TOO_LARGE = 8,
    /// The session expired, or a message belongs to another session.
    AVP_ERR_SESSION = 9,
    /// Bytes are not a valid avp message, or a checksum failed.
    AVP_ERR_WIRE = 10,
    /// An operating-system call failed.
    AVP_ERR_IO = 11,
    /// The peer broke the protocol.
    AVP_ERR_PROTOCOL = 12,
    /// A caller buffer is too small; the needed size was reported.
    AVP_ERR_BUFFER_TOO_SMALL = 13,
    /// A bug inside avp was caught at the boundary.
    AVP_ERR_PANIC = 14,
    /// A device (GPU) could not be opened or a device operation failed.
    AVP_ERR_DEVICE = 15,
    /// The data is elsewhere than the call needs: device sections read as
    /// host bytes, or a device address asked of a host message.
    AVP_ERR_PLACEMENT = 16,
    /// The peer refused the message and said why (an `http://` server: the
    /// session id, the size, or a receiver that is behind); nothing was
    /// delivered and the session goes on.
    AVP_ERR_REFUSED = 17,
}

/// An error on its way to C.
pub(crate) struct Error {
    pub status: avp_status,
    pub message: String,
}

impl Error {
    pub fn new(status: avp_status, message: impl Into<String>) -> Error {
        Error {
            status,
            message: message.into(),
        }
    }
    pub fn null(what: &str) -> Error {
        Error::new(avp_status::AVP_ERR_NULL, format!("{what} must not be NULL"))
    }
    pub fn arg(message: impl Into<String>) -> Error {
        Error::new(avp_status::AVP_ERR_INVALID_ARGUMENT, message)
    }
}

impl From<TransportError> for Error {
    fn from(e: TransportError) -> Error {
        use avp_status::*;
        let status = match &e {
            TransportError::InvalidAddress { .. } => AVP_ERR_INVALID_ARGUMENT,
            TransportError::Io { .. } => AVP_ERR_IO,
            TransportError::Timeout(..) => AVP_ERR_TIMEOUT,
            TransportError::PeerGone(_) => AVP_ERR_PEER_GONE,
            TransportError::Protocol(_) | TransportError::Segment(_) => AVP_ERR_PROTOCOL,
            TransportError::Auth(_) => AVP_ERR_AUTH,
            TransportError::TooLarge { .. } => AVP_ERR_TOO_LARGE,
            TransportError::SessionExpired { .. } | TransportError::WrongSession { .. } => {
                AVP_ERR_SESSION
            }
            TransportError::Wire(_) => AVP_ERR_WIRE,
            TransportError::InvalidOption { .. } => AVP_ERR_INVALID_ARGUMENT,
            TransportError::Device { .. } => AVP_ERR_DEVICE,
            TransportError::Placement(_) => AVP_ERR_PLACEMENT,
            TransportError::Refused { .. } => AVP_ERR_REFUSED,
            _ => AVP_ERR_IO,
        };
        Error::new(status, e.to_string())
    }
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Error {
        let status = match &e {
            WireError::InvalidField { .. }
            | WireError::SizeOverflow(_)
            | WireError::LayerOutOfRange { .. } => avp_status::AVP_ERR_INVALID_ARGUMENT,
            WireError::BufferSize { .. } => avp_status::AVP_ERR_BUFFER_TOO_SMALL,
            _ => avp_status::AVP_ERR_WIRE,
        };
        Error::new(status, e.to_string())
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Run `f`, turning errors and panics into a status and the thread's last error.
pub(crate) fn ffi(f: impl FnOnce() -> Result<(), Error>) -> avp_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_last_error("");
            avp_status::AVP_OK
        }
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("internal error (please report): {what}"));
            avp_status::AVP_ERR_PANIC
        }
    }
}

/// The message of the last failed call on this thread ("" after a success).
///
/// The pointer stays valid until the next avp call on this thread. Never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn avp_last_error_message() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// A static name for a status code ("AVP_OK", "AVP_ERR_TIMEOUT", ...;
/// "AVP_STATUS_UNKNOWN" for other values). Never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn avp_status_name(status: i32) -> *const c_char {
    use avp_status::*;
    const ALL: [avp_status; 18] = [
        AVP_OK,
        AVP_ERR_NULL,
        AVP_ERR_INVALID_ARGUMENT,
        AVP_ERR_INVALID_HANDLE,
        AVP_ERR_BUSY,
        AVP_ERR_TIMEOUT,
        AVP_ERR_PEER_GONE,
        AVP_ERR_AUTH,
        AVP_ERR_TOO_LARGE,
        AVP_ERR_SESSION,
        AVP_ERR_WIRE,
        AVP_ERR_IO,
        AVP_ERR_PROTOCOL,
        AVP_ERR_BUFFER_TOO_SMALL,
        AVP_ERR_PANIC,
        AVP_ERR_DEVICE,
        AVP_ERR_PLACEMENT,
        AVP_ERR_REFUSED,
    ];
    let Some(&status) = ALL.iter().find(|s| **s as i32 == status) else {
        return c"AVP_STATUS_UNKNOWN".as_ptr();
    };
    let s: &'static std::ffi::CStr = match status {
        AVP_OK => c"AVP_OK",
        AVP_ERR_NULL => c"AVP_ERR_NULL",
        AVP_ERR_INVALID_ARGUMENT => c"AVP_ERR_INVALID_ARGUMENT",
        AVP_ERR_INVALID_HANDLE => c"AVP_ERR_INVALID_HANDLE",
        AVP_ERR_BUSY => c"AVP_ERR_BUSY",
        AVP_ERR_TIMEOUT => c"AVP_ERR_TIMEOUT",
        AVP_ERR_PEER_GONE => c"AVP_ERR_PEER_GONE",
        AVP_ERR_AUTH => c"AVP_ERR_AUTH",
        AVP_ERR_TOO_LARGE => c"AVP_ERR_TOO_LARGE",
        AVP_ERR_SESSION => c"AVP_ERR_SESSION",
        AVP_ERR_WIRE => c"AVP_ERR_WIRE",
        AVP_ERR_IO => c"AVP_ERR_IO",
        AVP_ERR_PROTOCOL => c"AVP_ERR_PROTOCOL",
        AVP_ERR_BUFFER_TOO_SMALL => c"AVP_ERR_BUFFER_TOO_SMALL",
        AVP_ERR_PANIC => c"AVP_ERR_PANIC",
        AVP_ERR_DEVICE => c"AVP_ERR_DEVICE",
        AVP_ERR_PLACEMENT => c"AVP_ERR_PLACEMENT",
        AVP_ERR_REFUSED => c"AVP_ERR_REFUSED",
    };
    s.as_ptr()
}
