//! Endpoint addresses: `shm://NAME` and `tcp://HOST:PORT`.

use std::fmt;
use std::path::PathBuf;

use crate::error::{Result, TransportError};

/// Where an endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// Shared memory on this host; `NAME` names the control socket.
    Shm(String),
    /// TCP, `HOST:PORT`.
    Tcp(String),
}

impl Address {
    /// Parse `shm://NAME` or `tcp://HOST:PORT`.
    pub fn parse(s: &str) -> Result<Address> {
        let bad = |reason: &str| TransportError::InvalidAddress {
            address: s.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(name) = s.strip_prefix("shm://") {
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                || name.starts_with('.')
            {
                return Err(bad(
                    "NAME must be 1-64 characters of [A-Za-z0-9._-], not starting with '.'",
                ));
            }
            Ok(Address::Shm(name.to_owned()))
        } else if let Some(hp) = s.strip_prefix("tcp://") {
            match hp.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                    Ok(Address::Tcp(hp.to_owned()))
                }
                _ => Err(bad("expected tcp://HOST:PORT")),
            }
        } else {
            Err(bad(
                "expected shm://NAME or tcp://HOST:PORT (cuda:// and rdma:// need their cargo features)",
            ))
        }
    }

    /// The control-socket path of a shared-memory name: `$AVP_RUNTIME_DIR/NAME.sock`,
    /// else `$XDG_RUNTIME_DIR/avp/NAME.sock`, else `/tmp/avp-UID/NAME.sock`.
    pub fn shm_socket_path(name: &str) -> PathBuf {
        runtime_dir().join(format!("{name}.sock"))
    }
}

/// The directory holding control sockets (created 0700 on bind).
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AVP_RUNTIME_DIR") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("avp");
    }
    PathBuf::from(format!("/tmp/avp-{}", nix::unistd::getuid()))
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Shm(n) => write!(f, "shm://{n}"),
            Address::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        assert_eq!(
            Address::parse("shm://demo-1").unwrap(),
            Address::Shm("demo-1".into())
        );
        assert_eq!(
            Address::parse("tcp://127.0.0.1:9000").unwrap(),
            Address::Tcp("127.0.0.1:9000".into())
        );
        assert_eq!(
            Address::parse("tcp://[::1]:9").unwrap(),
            Address::Tcp("[::1]:9".into())
        );
        for bad in [
            "shm://",
            "shm://../x",
            "shm://a/b",
            "tcp://host",
            "tcp://:1",
            "udp://x:1",
            "tcp://h:99999",
        ] {
            assert!(Address::parse(bad).is_err(), "{bad}");
        }
    }
}
