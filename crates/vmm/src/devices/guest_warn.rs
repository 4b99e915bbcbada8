//! A limit on the warnings a guest can cause. A guest that programs a device wrongly in a loop
//! must not flood the VMM's log: each device logs at most [`PER_WINDOW`] such warnings per
//! [`WINDOW`], then one line counting the ones it left out.

use std::time::{Duration, Instant};

use tracing::warn;

/// Warnings logged per window; the rest of the window's are counted only.
pub(crate) const PER_WINDOW: u32 = 10;
/// The length of a window.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);

/// Counts one source's guest-caused warnings in fixed windows.
#[derive(Debug)]
pub(crate) struct GuestWarnings {
    /// Who the warnings are about, for the summary line.
    source: &'static str,
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl GuestWarnings {
    pub(crate) fn new(source: &'static str) -> GuestWarnings {
        GuestWarnings {
            source,
            window_start: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    /// Whether one more warning may be logged now. A new window first reports how many the
    /// last one left out.
    pub(crate) fn admit(&mut self) -> bool {
        self.admit_at(Instant::now())
    }

    fn admit_at(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window_start) >= WINDOW {
            if self.suppressed > 0 {
                warn!(
                    source = self.source,
                    suppressed = self.suppressed,
                    "guest-caused warnings left out of the log in the last window"
                );
            }
            self.window_start = now;
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < PER_WINDOW {
            self.logged += 1;
            if self.logged == PER_WINDOW {
                warn!(
                    source = self.source,
                    "more guest-caused warnings in this window are counted, not logged"
                );
            }
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// `warn!` for a warning the guest causes, within `limit` (a [`GuestWarnings`]).
macro_rules! guest_warn {
    ($limit:expr, $($arg:tt)+) => {
        if $limit.admit() {
            ::tracing::warn!($($arg)+);
        }
    };
}
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_logs_its_share_then_counts_the_rest() {
        let mut limit = GuestWarnings::new("test");
        let start = limit.window_start;
        let admitted = (0..1000).filter(|_| limit.admit_at(start)).count();
        assert_eq!(admitted, PER_WINDOW as usize);
        assert_eq!(limit.suppressed, 1000 - u64::from(PER_WINDOW));
        // The next window starts afresh.
        let later = start + WINDOW;
        assert!(limit.admit_at(later));
        assert_eq!(limit.suppressed, 0);
        assert_eq!(limit.logged, 1);
    }
}
