//! The outbox relay of send requests, with the global send-rate limit per channel: a
//! broadcast to a million customers is queued in minutes, but leaves for delivery no faster
//! than each channel's providers take it. Rows stay in the outbox (durable) until published.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use relance_kit::bus::Publisher;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Rows published per transaction.
const RELAY_BATCH: i64 = 1000;

/// A token bucket per channel (a second's worth of burst).
#[derive(Debug)]
pub struct ChannelLimits {
    rates: HashMap<String, f64>,
    buckets: HashMap<String, (f64, Instant)>,
}

impl ChannelLimits {
    /// `rates`: sends per second by channel name; channels not named are unlimited.
    pub fn new(rates: HashMap<String, u32>) -> ChannelLimits {
        let mut limited = HashMap::new();
        for (channel, rate) in rates {
            if rate > 0 {
                limited.insert(channel, f64::from(rate));
            }
        }
        ChannelLimits {
            rates: limited,
            buckets: HashMap::new(),
        }
    }

    /// How long to wait before `count` more messages of `channel` may leave (and takes
    /// them from the bucket).
    fn take(&mut self, channel: &str, count: usize) -> Duration {
        let Some(rate) = self.rates.get(channel).copied() else {
            return Duration::ZERO;
        };
        let bucket = self
            .buckets
            .entry(channel.to_owned())
            .or_insert((rate, Instant::now()));
        let elapsed = bucket.1.elapsed().as_secs_f64();
        bucket.0 = (bucket.0 + elapsed * rate).min(rate);
        bucket.1 = Instant::now();
        bucket.0 -= count as f64;
        if bucket.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.0 / rate)
        }
    }
}

/// Publishes the outbox until shutdown.
pub async fn run(
    pool: PgPool,
    publisher: Arc<Publisher>,
    wake: Arc<Notify>,
    mut limits: ChannelLimits,
    shutdown: CancellationToken,
) {
    loop {
        let sent = match relay_batch(&pool, &publisher, &mut limits).await {
            Ok(sent) => sent,
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "send outbox relay failed, retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                0
            }
        };
        if sent as i64 == RELAY_BATCH {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Publishes one batch, waiting for each channel's budget first; returns how many left.
pub async fn relay_batch(
    pool: &PgPool,
    publisher: &Publisher,
    limits: &mut ChannelLimits,
) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    // Each request travels in the trace of the journey step (or broadcast) that made it.
    let messages = relance_kit::outbox::take(&mut tx, RELAY_BATCH).await?;
    if messages.is_empty() {
        return Ok(0);
    }
    let mut per_channel: HashMap<&str, usize> = HashMap::new();
    for message in &messages {
        *per_channel.entry(message.routing_key.as_str()).or_insert(0) += 1;
    }
    let mut wait = Duration::ZERO;
    for (channel, count) in per_channel {
        wait = wait.max(limits.take(channel, count));
    }
    if !wait.is_zero() {
        metrics::counter!("relance_campaigns_rate_limited_seconds_total").increment(wait.as_secs());
        tokio::time::sleep(wait).await;
    }
    publisher.publish_all(&messages).await?;
    tx.commit().await?;
    metrics::counter!("relance_campaigns_sends_published_total").increment(messages.len() as u64);
    Ok(messages.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limited_channel_waits_for_its_budget_and_others_do_not() {
        let mut limits = ChannelLimits::new(HashMap::from([
            ("push".to_owned(), 1000),
            ("email".to_owned(), 0),
        ]));
        // A second's burst is free; the next 500 wait half a second.
        assert_eq!(limits.take("push", 1000), Duration::ZERO);
        let wait = limits.take("push", 500);
        assert!(
            wait >= Duration::from_millis(490) && wait <= Duration::from_millis(510),
            "{wait:?}"
        );
        assert_eq!(limits.take("email", 1_000_000), Duration::ZERO);
        assert_eq!(limits.take("sms", 1_000_000), Duration::ZERO);
    }
}
