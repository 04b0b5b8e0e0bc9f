//! Hybrid logical clock (DESIGN.md §2).
//!
//! The clock never reads time itself: every call takes the local physical
//! time (milliseconds) as an argument, so the same inputs always give the same
//! timestamps — in production the io layer's clock feeds it, in the simulator
//! madsim's skewed per-node clock does.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Default bound on how far ahead of local time a remote timestamp may be.
pub const DEFAULT_MAX_CLOCK_OFFSET_MS: u64 = 500;

/// A hybrid logical timestamp. Ordered by `wall_ms`, then `logical`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    pub wall_ms: u64,
    pub logical: u32,
}

impl Hlc {
    pub const ZERO: Hlc = Hlc {
        wall_ms: 0,
        logical: 0,
    };

    pub fn new(wall_ms: u64, logical: u32) -> Self {
        Hlc { wall_ms, logical }
    }

    /// The smallest timestamp strictly greater than `self`.
    fn successor(self) -> Hlc {
        match self.logical.checked_add(1) {
            Some(logical) => Hlc {
                wall_ms: self.wall_ms,
                logical,
            },
            // The logical counter is exhausted: borrow one millisecond.
            None => Hlc {
                wall_ms: self.wall_ms.saturating_add(1),
                logical: 0,
            },
        }
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.wall_ms, self.logical)
    }
}

/// A remote timestamp was too far ahead of local time; the clock is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "remote timestamp {remote} is {ahead_ms} ms ahead of local time {local_ms} ms, more than the \
     allowed clock offset of {max_offset_ms} ms; check the clocks of both nodes"
)]
pub struct ClockOffsetError {
    pub remote: Hlc,
    pub local_ms: u64,
    pub ahead_ms: u64,
    pub max_offset_ms: u64,
}

/// The per-node HLC state.
#[derive(Clone, Debug)]
pub struct HlcClock {
    last: Hlc,
    max_offset_ms: u64,
}

impl HlcClock {
    pub fn new(max_offset_ms: u64) -> Self {
        HlcClock {
            last: Hlc::ZERO,
            max_offset_ms,
        }
    }

    /// The last timestamp handed out or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A new timestamp for a local event at physical time `physical_ms`.
    /// Strictly greater than every earlier timestamp, even if the physical
    /// clock went backwards.
    pub fn now(&mut self, physical_ms: u64) -> Hlc {
        let next = if physical_ms > self.last.wall_ms {
            Hlc::new(physical_ms, 0)
        } else {
            self.last.successor()
        };
        self.last = next;
        next
    }

    /// Merges a timestamp received from another node and returns a new local
    /// timestamp greater than both. A remote timestamp more than the maximum
    /// offset ahead of `physical_ms` is refused and leaves the clock unchanged,
    /// so one node with a runaway clock cannot drag the cluster into the future.
    pub fn update(&mut self, remote: Hlc, physical_ms: u64) -> Result<Hlc, ClockOffsetError> {
        let ahead_ms = remote.wall_ms.saturating_sub(physical_ms);
        if ahead_ms > self.max_offset_ms {
            return Err(ClockOffsetError {
                remote,
                local_ms: physical_ms,
                ahead_ms,
                max_offset_ms: self.max_offset_ms,
            });
        }
        let floor = self.last.max(remote);
        let next = if physical_ms > floor.wall_ms {
            Hlc::new(physical_ms, 0)
        } else {
            floor.successor()
        };
        self.last = next;
        Ok(next)
    }
}

impl Default for HlcClock {
    fn default() -> Self {
        HlcClock::new(DEFAULT_MAX_CLOCK_OFFSET_MS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn remote_too_far_ahead_is_refused_without_update() {
        let mut clock = HlcClock::new(500);
        let before = clock.now(1_000);
        let err = clock.update(Hlc::new(1_501, 0), 1_000).unwrap_err();
        assert_eq!(err.ahead_ms, 501);
        assert_eq!(clock.last(), before);
        // Exactly at the bound is accepted.
        assert!(clock.update(Hlc::new(1_500, 0), 1_000).unwrap() > Hlc::new(1_500, 0));
    }

    #[test]
    fn logical_overflow_borrows_a_millisecond() {
        let mut clock = HlcClock::new(500);
        clock.update(Hlc::new(10, u32::MAX), 10).unwrap();
        assert_eq!(clock.last(), Hlc::new(11, 0));
    }

    #[derive(Debug, Clone)]
    enum Event {
        Local(u64),
        Remote(u64, u32, u64),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (0u64..10_000).prop_map(Event::Local),
            (0u64..10_000, any::<u32>(), 0u64..10_000).prop_map(|(w, l, p)| Event::Remote(w, l, p)),
        ]
    }

    proptest! {
        /// Whatever the physical clock and remote peers do, the HLC never goes
        /// backwards and every accepted event yields a strictly larger stamp.
        #[test]
        fn hlc_never_goes_backwards(events in proptest::collection::vec(event(), 1..200)) {
            let mut clock = HlcClock::new(500);
            let mut prev = clock.last();
            for e in events {
                match e {
                    Event::Local(p) => {
                        let t = clock.now(p);
                        prop_assert!(t > prev);
                        prop_assert!(t.wall_ms >= p);
                        prev = t;
                    }
                    Event::Remote(w, l, p) => {
                        let remote = Hlc::new(w, l);
                        match clock.update(remote, p) {
                            Ok(t) => {
                                prop_assert!(t > prev && t > remote);
                                prev = t;
                            }
                            Err(_) => prop_assert_eq!(clock.last(), prev),
                        }
                    }
                }
            }
        }
    }
}
