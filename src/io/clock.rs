//! Wall-clock time for the HLC. The runtime's timers and timeouts use
//! `tokio::time` (madsim's virtual time in the simulator); this is only the
//! physical component of hybrid logical timestamps, which the simulator
//! skews and drifts per node.

use std::time::{SystemTime, UNIX_EPOCH};

/// The physical clock a node's HLC reads.
pub trait WallClock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The operating system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_ms(&self) -> u64 {
        // A clock before 1970 reads as 0; the HLC still never goes backwards.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}
