//! Endpoint addresses: `SCHEME://TARGET`, where each installed transport
//! checks its own targets (`shm://NAME`, `tcp://HOST:PORT`).

use std::fmt;

use crate::error::{Result, TransportError};
use crate::scheme::{self, Scheme};

/// Where an endpoint listens or connects, checked by its transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    scheme: &'static str,
    target: String,
}

impl Address {
    /// Parse `SCHEME://TARGET` for an installed transport: `shm://NAME` (1–64
    /// characters of `[A-Za-z0-9._-]`, not starting with `.`) or
    /// `tcp://HOST:PORT`.
    pub fn parse(s: &str) -> Result<Address> {
        let bad = |reason: String| TransportError::InvalidAddress {
            address: s.to_owned(),
            reason,
        };
        let known = || {
            scheme::SCHEMES
                .iter()
                .map(|s| s.form())
                .collect::<Vec<_>>()
                .join(" or ")
        };
        let Some((name, target)) = s.split_once("://") else {
            return Err(bad(format!("expected {}", known())));
        };
        let scheme = scheme::find(name)
            .ok_or_else(|| bad(format!("unknown scheme {name:?}; expected {}", known())))?;
        scheme.check(target).map_err(bad)?;
        Ok(Address {
            scheme: scheme.name(),
            target: target.to_owned(),
        })
    }

    /// The scheme (`"shm"`, `"tcp"`).
    pub fn scheme(&self) -> &str {
        self.scheme
    }

    /// What follows `://`.
    pub fn target(&self) -> &str {
        &self.target
    }

    pub(crate) fn transport(&self) -> &'static dyn Scheme {
        scheme::find(self.scheme).expect("parsed addresses name an installed scheme")
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        for (s, scheme, target) in [
            ("tcp://127.0.0.1:9000", "tcp", "127.0.0.1:9000"),
            ("tcp://[::1]:9", "tcp", "[::1]:9"),
        ] {
            let a = Address::parse(s).unwrap();
            assert_eq!((a.scheme(), a.target()), (scheme, target));
            assert_eq!(a.to_string(), s);
        }
        #[cfg(target_os = "linux")]
        assert_eq!(Address::parse("shm://demo-1").unwrap().target(), "demo-1");
        for bad in [
            "shm://",
            "shm://../x",
            "shm://a/b",
            "tcp://host",
            "tcp://:1",
            "udp://x:1",
            "tcp://h:99999",
            "no-scheme",
        ] {
            let e = Address::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
        let e = Address::parse("udp://x:1").unwrap_err().to_string();
        assert!(e.contains("unknown scheme \"udp\""), "{e}");
    }
}
