//! Per-node wall clocks with offset and drift (DESIGN.md §8 clock faults):
//! each node's HLC reads simulated time shifted by a seeded offset and
//! scaled by a seeded drift, within the swarm's bounds.

use keel::io::clock::WallClock;
use tokio::time::Instant;

/// The simulated Unix time at which every run starts (2026-01-01).
pub const EPOCH_MS: u64 = 1_767_225_600_000;

pub struct SkewedClock {
    start: Instant,
    offset_ms: i64,
    drift_ppm: i64,
}

impl SkewedClock {
    pub fn new(start: Instant, offset_ms: i64, drift_ppm: i64) -> Self {
        SkewedClock {
            start,
            offset_ms,
            drift_ppm,
        }
    }
}

impl WallClock for SkewedClock {
    fn now_ms(&self) -> u64 {
        let elapsed = Instant::now().duration_since(self.start).as_millis() as i64;
        let drifted = elapsed + elapsed * self.drift_ppm / 1_000_000;
        (EPOCH_MS as i64 + drifted + self.offset_ms).max(0) as u64
    }
}
