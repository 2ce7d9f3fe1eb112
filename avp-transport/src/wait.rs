//! Waiting: deadlines that never overflow (a caller may pass `Duration::MAX`,
//! or any huge timeout, to mean "wait as long as it takes", and `Instant +
//! Duration` panics when the sum does not fit), and the one `poll(2)` wrapper.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::error::{Result, TransportError};

/// Wait until one of `fds` is readable (or hung up) or `timeout` passes; a
/// timeout below a millisecond but above zero waits one. Returns whether one
/// was; a signal counts as "not yet".
pub(crate) fn readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> Result<bool> {
    Ok(which_readable(fds, timeout)?.contains(&true))
}

/// Which of `fds` are readable (or hung up) now or within `timeout`, as
/// [`readable`] waits.
pub(crate) fn which_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> Result<Vec<bool>> {
    let mut p: Vec<PollFd<'_>> = fds
        .iter()
        .map(|f| PollFd::new(*f, PollFlags::POLLIN))
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let ms = if ms == 0 && !timeout.is_zero() { 1 } else { ms };
    match poll(
        &mut p,
        PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
    ) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(p
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect()),
        Err(e) => Err(TransportError::errno("poll")(e)),
    }
}

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
