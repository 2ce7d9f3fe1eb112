//! Deadlines that never overflow: a caller may pass `Duration::MAX` (or any
//! huge timeout) to mean "wait as long as it takes", and `Instant + Duration`
//! panics when the sum does not fit.

use std::time::{Duration, Instant};

/// Far enough to be "never" for any wait, near enough to be representable.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `start + wait`, or about a century after `start` when that does not fit.
pub(crate) fn after(start: Instant, wait: Duration) -> Instant {
    start.checked_add(wait).unwrap_or_else(|| start + FOREVER)
}

/// `Instant::now() + wait`, saturating like [`after`].
pub(crate) fn from_now(wait: Duration) -> Instant {
    after(Instant::now(), wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_waits_saturate_instead_of_panicking() {
        let start = Instant::now();
        assert_eq!(
            after(start, Duration::from_secs(1)),
            start + Duration::from_secs(1)
        );
        assert!(after(start, Duration::MAX) >= start + FOREVER);
        assert!(from_now(Duration::MAX) > Instant::now() + Duration::from_secs(3600));
    }
}
