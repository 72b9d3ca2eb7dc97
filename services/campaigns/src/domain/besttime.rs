//! Send at the best time: the hour of the week when a customer is most likely to act,
//! learned from the local hours and weekdays of their own orders, opens and clicks.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// Activity counted by local weekday (Monday = 0) and hour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub counts: Vec<[u32; 24]>,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            counts: vec![[0; 24]; 7],
        }
    }
}

impl Histogram {
    /// Counts one action at `at` (UTC) in the customer's `tz`, `weight` times.
    pub fn add(&mut self, at: DateTime<Utc>, tz: Tz, weight: u32) {
        let _ = (at, tz, weight);
        unimplemented!()
    }

    /// Adds another histogram's counts (for the segment's and the workspace's).
    pub fn merge(&mut self, other: &Histogram) {
        let _ = other;
        unimplemented!()
    }

    /// Every count together.
    pub fn total(&self) -> u64 {
        unimplemented!()
    }
}

/// The start of the local hour, in `[now, now + within_secs]`, when the customer is most
/// likely to act (`now` itself when that hour is the current one). The first histogram
/// with at least `min_samples` actions decides (the customer's own, then the fallbacks in
/// order); with none, `now`.
pub fn best_send_time(
    now: DateTime<Utc>,
    within_secs: i64,
    tz: Tz,
    histograms: &[&Histogram],
    min_samples: u64,
) -> DateTime<Utc> {
    let _ = (now, within_secs, tz, histograms, min_samples);
    unimplemented!()
}
