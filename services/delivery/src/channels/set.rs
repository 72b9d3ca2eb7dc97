//! The providers of a deployment, per channel, with a rate limit and a circuit breaker each
//! and failover between the providers of one channel.
//!
//! A channel's providers are tried in their configured order: the first that accepts the
//! address, has a closed (or half-open) circuit and a token in its bucket gets the message. A
//! temporary failure moves on to the next one (the secondary takes over while the primary is
//! down); a permanent refusal is final, as another provider would refuse it too (and must not
//! send a message the first one may have half-accepted).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use relance_proto::v1::Channel;

use super::config::{self, ProviderConfig};
use super::{Accepted, Address, Outbound, Permanent, Provider, SendError, channel_name};

/// The longest a send waits for a rate-limit token, and only on the last provider it can try.
const MAX_TOKEN_WAIT: Duration = Duration::from_millis(50);

/// Refills add up fractions of a token: without some slack, 0.99999… tokens after exactly one
/// token's worth of time would refuse a call that is due.
const TOKEN_EPSILON: f64 = 1e-9;

/// A token bucket: `rate_per_sec` tokens a second, at most `burst` saved up. A rate of 0 means
/// unlimited. Time is passed in, so the arithmetic is tested without sleeping.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. A `burst` of 0 means one second's worth of tokens (at least 1).
    pub fn new(rate_per_sec: f64, burst: u32, now: Instant) -> TokenBucket {
        let capacity = if burst == 0 {
            rate_per_sec.ceil().max(1.0)
        } else {
            f64::from(burst)
        };
        TokenBucket {
            rate: rate_per_sec,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    /// Whether there is no limit.
    pub fn unlimited(&self) -> bool {
        self.rate <= 0.0
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        if now > self.last {
            self.last = now;
        }
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        if self.unlimited() {
            return true;
        }
        self.refill(now);
        if self.tokens >= 1.0 - TOKEN_EPSILON {
            self.tokens = (self.tokens - 1.0).max(0.0);
            return true;
        }
        false
    }

    /// How long until a token is available (zero when one is).
    pub fn wait_time(&mut self, now: Instant) -> Duration {
        if self.unlimited() {
            return Duration::ZERO;
        }
        self.refill(now);
        if self.tokens >= 1.0 - TOKEN_EPSILON {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
    }
}

/// Where a circuit breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are skipped until the instant.
    Open { until: Instant },
    /// One trial call is allowed (`trial` is true while it is in flight); its success closes
    /// the circuit, its failure opens it again.
    HalfOpen { trial: bool },
}

/// A circuit breaker: opens after `threshold` consecutive temporary failures, stays open
/// `open_for`, then lets one trial call through. Time is passed in.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    failures: u32,
    state: BreakerState,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(threshold: u32, open_for: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            open_for,
            failures: 0,
            state: BreakerState::Closed,
        }
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether calls are being skipped (open, or half-open with the trial in flight).
    pub fn is_open(&self) -> bool {
        !matches!(self.state, BreakerState::Closed)
    }

    /// Asks to make a call: true when it may go (and, half-open, it is the trial).
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen { trial: true };
                true
            }
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen { trial: true } => false,
            BreakerState::HalfOpen { trial: false } => {
                self.state = BreakerState::HalfOpen { trial: true };
                true
            }
        }
    }

    /// An acquired call was not made after all (no rate-limit token): frees the trial.
    pub fn release(&mut self) {
        if self.state == (BreakerState::HalfOpen { trial: true }) {
            self.state = BreakerState::HalfOpen { trial: false };
        }
    }

    /// The provider answered (accepted, or refused for good: it is up).
    pub fn on_success(&mut self) {
        self.failures = 0;
        self.state = BreakerState::Closed;
    }

    /// A temporary failure.
    pub fn on_failure(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let trial_failed = matches!(self.state, BreakerState::HalfOpen { .. });
        if trial_failed || self.failures >= self.threshold {
            self.state = BreakerState::Open {
                until: now + self.open_for,
            };
        }
    }

    /// When an open circuit lets a trial through.
    pub fn opens_again_at(&self) -> Option<Instant> {
        match self.state {
            BreakerState::Open { until } => Some(until),
            _ => None,
        }
    }
}

/// The limits of one provider in the set.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Calls per second; 0 means unlimited.
    pub rate_per_sec: f64,
    /// Tokens saved up; 0 means one second's worth.
    pub burst: u32,
    /// Consecutive temporary failures that open the circuit.
    pub breaker_failures: u32,
    /// How long the circuit stays open.
    pub breaker_open: Duration,
    /// The longest a call may take, whatever the adapter's own timeouts: a call that never
    /// returns would hold its batch, and every message the broker gave its consumer.
    pub call_timeout: Duration,
    /// Calls in flight at once (an SMTP server takes a few connections, an HTTP API many).
    pub max_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            rate_per_sec: 0.0,
            burst: 0,
            breaker_failures: 5,
            breaker_open: Duration::from_secs(30),
            call_timeout: Duration::from_secs(30),
            max_in_flight: 256,
        }
    }
}

impl Limits {
    /// The limits a configuration sets.
    pub fn of(config: &ProviderConfig) -> Limits {
        Limits {
            rate_per_sec: config.rate_per_sec,
            burst: config.burst,
            breaker_failures: config.breaker_failures,
            breaker_open: Duration::from_millis(config.breaker_open_ms),
            call_timeout: config.timeout() + Duration::from_secs(5),
            max_in_flight: config.max_in_flight(),
        }
    }
}

struct Slot {
    provider: Arc<dyn Provider>,
    call_timeout: Duration,
    in_flight: Arc<tokio::sync::Semaphore>,
    bucket: Mutex<TokenBucket>,
    breaker: Mutex<Breaker>,
}

/// Why a provider was not used, or how its call failed.
enum Skip {
    CircuitOpen(Option<Instant>),
    RateLimited,
}

/// Every configured provider, by channel.
pub struct Providers {
    channels: Vec<(Channel, Vec<Slot>)>,
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_map();
        for (channel, slots) in &self.channels {
            let names: Vec<&str> = slots.iter().map(|slot| slot.provider.name()).collect();
            list.entry(&channel_name(*channel), &names);
        }
        list.finish()
    }
}

impl Providers {
    /// Builds every configured provider (see [`config::build`]); names must be unique. The
    /// order of the list is the failover order within each channel.
    pub fn build(configs: &[ProviderConfig], http: &reqwest::Client) -> anyhow::Result<Providers> {
        config::check_unique_names(configs)?;
        let mut parts = Vec::with_capacity(configs.len());
        for (index, config) in configs.iter().enumerate() {
            let provider = config::build(config, index, http)?;
            parts.push((provider, Limits::of(config)));
        }
        Ok(Providers::from_parts(parts))
    }

    /// A set of already built providers, in failover order within each channel (tests use it
    /// with providers of their own).
    pub fn from_parts(parts: Vec<(Arc<dyn Provider>, Limits)>) -> Providers {
        let now = Instant::now();
        let mut channels: Vec<(Channel, Vec<Slot>)> = Vec::new();
        for (provider, limits) in parts {
            let slot = Slot {
                call_timeout: limits.call_timeout,
                in_flight: Arc::new(tokio::sync::Semaphore::new(limits.max_in_flight.max(1))),
                bucket: Mutex::new(TokenBucket::new(limits.rate_per_sec, limits.burst, now)),
                breaker: Mutex::new(Breaker::new(limits.breaker_failures, limits.breaker_open)),
                provider,
            };
            metrics::gauge!("relance_delivery_circuit_open", "provider" => slot.provider.name().to_owned())
                .set(0.0);
            let channel = slot.provider.channel();
            match channels.iter_mut().find(|(known, _)| *known == channel) {
                Some((_, slots)) => slots.push(slot),
                None => channels.push((channel, vec![slot])),
            }
        }
        Providers { channels }
    }

    /// Whether at least one provider serves the channel.
    pub fn has_channel(&self, channel: Channel) -> bool {
        self.channels
            .iter()
            .any(|(known, slots)| *known == channel && !slots.is_empty())
    }

    /// Whether some provider of the channel can send to this address (a push token of a
    /// platform no provider serves is no address).
    pub fn accepts(&self, channel: Channel, address: &Address) -> bool {
        for (known, slots) in &self.channels {
            if *known != channel {
                continue;
            }
            for slot in slots {
                if slot.provider.accepts(address) {
                    return true;
                }
            }
        }
        false
    }

    /// The names of a channel's providers, in failover order.
    pub fn names(&self, channel: Channel) -> Vec<String> {
        let mut names = Vec::new();
        for (known, slots) in &self.channels {
            if *known != channel {
                continue;
            }
            for slot in slots {
                names.push(slot.provider.name().to_owned());
            }
        }
        names
    }

    /// Sends through the first available provider of the channel that accepts the address,
    /// failing over to the next on a temporary failure. Returns the name of the provider that
    /// took the message with its answer; a permanent refusal at once; a temporary error naming
    /// every provider's fate when none took it.
    pub async fn send(
        &self,
        channel: Channel,
        message: &Outbound,
    ) -> Result<(String, Accepted), SendError> {
        let name = channel_name(channel);
        let Some((_, slots)) = self.channels.iter().find(|(known, _)| *known == channel) else {
            return Err(SendError::temporary(format!(
                "no provider configured for {name}"
            )));
        };
        let mut candidates = Vec::with_capacity(slots.len());
        for slot in slots {
            if slot.provider.accepts(&message.address) {
                candidates.push(slot);
            }
        }
        if candidates.is_empty() {
            return Err(SendError::permanent(
                Permanent::Rejected,
                format!("no provider of {name} accepts this address"),
            ));
        }
        let mut notes: Vec<String> = Vec::new();
        let mut retry_after: Option<Duration> = None;
        let count = candidates.len();
        for (position, slot) in candidates.into_iter().enumerate() {
            let last = position + 1 == count;
            let provider = slot.provider.name();
            if let Err(skip) = self.admit(slot, last).await {
                let (note, wait) = match skip {
                    Skip::CircuitOpen(until) => (
                        "circuit open",
                        until.map(|until| until.saturating_duration_since(Instant::now())),
                    ),
                    Skip::RateLimited => ("rate limited", Some(MAX_TOKEN_WAIT)),
                };
                metrics::counter!("relance_delivery_provider_calls_total", "provider" => provider.to_owned(), "outcome" => note.replace(' ', "_"))
                    .increment(1);
                notes.push(format!("{provider}: {note}"));
                retry_after = shortest(retry_after, wait);
                continue;
            }
            let started = Instant::now();
            let call = async {
                // Waiting for a free connection counts against the same deadline.
                let Ok(_permit) = slot.in_flight.acquire().await else {
                    return Err(SendError::temporary("provider closed"));
                };
                slot.provider.send(message).await
            };
            let result = match tokio::time::timeout(slot.call_timeout, call).await {
                Ok(result) => result,
                Err(_) => Err(SendError::temporary(format!(
                    "no answer within {:?}",
                    slot.call_timeout
                ))),
            };
            metrics::histogram!("relance_delivery_provider_duration_seconds", "provider" => provider.to_owned())
                .record(started.elapsed().as_secs_f64());
            let outcome = match &result {
                Ok(_) => "accepted",
                Err(SendError::Permanent {
                    kind: Permanent::InvalidAddress,
                    ..
                }) => "invalid_address",
                Err(SendError::Permanent {
                    kind: Permanent::Unsubscribed,
                    ..
                }) => "unsubscribed",
                Err(SendError::Permanent {
                    kind: Permanent::Rejected,
                    ..
                }) => "rejected",
                Err(SendError::Temporary { .. }) => "temporary",
            };
            metrics::counter!("relance_delivery_provider_calls_total", "provider" => provider.to_owned(), "outcome" => outcome)
                .increment(1);
            match result {
                Ok(accepted) => {
                    self.record(slot, true);
                    return Ok((provider.to_owned(), accepted));
                }
                Err(error @ SendError::Permanent { .. }) => {
                    // The provider is up: it answered.
                    self.record(slot, true);
                    return Err(error);
                }
                Err(SendError::Temporary {
                    detail,
                    retry_after: wait,
                }) => {
                    self.record(slot, false);
                    tracing::info!(provider, channel = name, detail = %detail, "provider failed; trying the next one");
                    notes.push(format!("{provider}: {detail}"));
                    retry_after = shortest(retry_after, wait);
                }
            }
        }
        Err(SendError::Temporary {
            detail: super::truncate(format!(
                "all providers of {name} unavailable: {}",
                notes.join("; ")
            )),
            retry_after,
        })
    }

    /// Lets a call go to a provider: its circuit allows it and it has a rate-limit token (on
    /// the last provider, waiting briefly for one).
    async fn admit(&self, slot: &Slot, last: bool) -> Result<(), Skip> {
        {
            let mut breaker = lock(&slot.breaker);
            if !breaker.try_acquire(Instant::now()) {
                return Err(Skip::CircuitOpen(breaker.opens_again_at()));
            }
        }
        let wait = {
            let mut bucket = lock(&slot.bucket);
            let now = Instant::now();
            if bucket.try_take(now) {
                return Ok(());
            }
            bucket.wait_time(now)
        };
        if last && wait <= MAX_TOKEN_WAIT {
            tokio::time::sleep(wait).await;
            if lock(&slot.bucket).try_take(Instant::now()) {
                return Ok(());
            }
        }
        lock(&slot.breaker).release();
        Err(Skip::RateLimited)
    }

    fn record(&self, slot: &Slot, up: bool) {
        let mut breaker = lock(&slot.breaker);
        let was_open = breaker.is_open();
        if up {
            breaker.on_success();
        } else {
            breaker.on_failure(Instant::now());
        }
        let open = breaker.is_open();
        if open != was_open || !up {
            let provider = slot.provider.name().to_owned();
            if open && !was_open {
                tracing::warn!(provider = %provider, "circuit opened after consecutive failures");
            }
            if !open && was_open {
                tracing::info!(provider = %provider, "circuit closed");
            }
            metrics::gauge!("relance_delivery_circuit_open", "provider" => provider).set(if open {
                1.0
            } else {
                0.0
            });
        }
    }
}

/// A poisoned lock only means another send panicked mid-update of plain numbers: keep going.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn shortest(current: Option<Duration>, new: Option<Duration>) -> Option<Duration> {
    match (current, new) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3, start);
        assert!(bucket.try_take(start));
        assert!(bucket.try_take(start));
        assert!(bucket.try_take(start));
        assert!(!bucket.try_take(start), "burst of 3 spent");
        assert_eq!(bucket.wait_time(start), Duration::from_millis(100));
        // 50 ms later: half a token.
        assert!(!bucket.try_take(start + Duration::from_millis(50)));
        assert!(bucket.try_take(start + Duration::from_millis(100)));
        assert!(!bucket.try_take(start + Duration::from_millis(100)));
        // A long pause refills to the burst, not more.
        let later = start + Duration::from_secs(60);
        let mut taken = 0;
        while bucket.try_take(later) {
            taken += 1;
        }
        assert_eq!(taken, 3);
    }

    #[test]
    fn bucket_rate_over_a_second() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(100.0, 1, start);
        let mut taken = 0;
        for ms in 0..1000 {
            if bucket.try_take(start + Duration::from_millis(ms)) {
                taken += 1;
            }
        }
        assert!((99..=101).contains(&taken), "took {taken}");
    }

    #[test]
    fn zero_rate_is_unlimited_and_zero_burst_is_a_second() {
        let now = Instant::now();
        let mut bucket = TokenBucket::new(0.0, 0, now);
        for _ in 0..10_000 {
            assert!(bucket.try_take(now));
        }
        let mut bucket = TokenBucket::new(5.0, 0, now);
        let mut taken = 0;
        while bucket.try_take(now) {
            taken += 1;
        }
        assert_eq!(taken, 5);
    }

    #[test]
    fn breaker_opens_after_threshold_and_half_opens() {
        let start = Instant::now();
        let mut breaker = Breaker::new(5, Duration::from_secs(30));
        for _ in 0..4 {
            assert!(breaker.try_acquire(start));
            breaker.on_failure(start);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.try_acquire(start));
        breaker.on_failure(start);
        assert!(breaker.is_open());
        assert!(!breaker.try_acquire(start + Duration::from_secs(29)));
        // After 30 s: one trial only.
        let later = start + Duration::from_secs(30);
        assert!(breaker.try_acquire(later));
        assert!(
            !breaker.try_acquire(later),
            "a second call while the trial is in flight"
        );
        // The trial fails: open again for 30 s.
        breaker.on_failure(later);
        assert_eq!(
            breaker.state(),
            BreakerState::Open {
                until: later + Duration::from_secs(30)
            }
        );
        let again = later + Duration::from_secs(30);
        assert!(breaker.try_acquire(again));
        breaker.on_success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.try_acquire(again));
    }

    #[test]
    fn success_resets_the_count() {
        let now = Instant::now();
        let mut breaker = Breaker::new(3, Duration::from_secs(1));
        breaker.on_failure(now);
        breaker.on_failure(now);
        breaker.on_success();
        breaker.on_failure(now);
        breaker.on_failure(now);
        assert!(!breaker.is_open());
        breaker.on_failure(now);
        assert!(breaker.is_open());
    }

    #[test]
    fn released_trial_can_be_taken_again() {
        let now = Instant::now();
        let mut breaker = Breaker::new(1, Duration::ZERO);
        breaker.on_failure(now);
        assert!(breaker.try_acquire(now));
        breaker.release();
        assert!(breaker.try_acquire(now));
    }
}
