//! Runs broadcasts: when a run is due, takes its audience from the segment (each recipient
//! with the moment of its wave, its variant or the control group), then queues the due
//! recipients' send requests through the guardrails, throttled, in transactions that also
//! mark the recipients — so a crash resumes without sending anyone twice.

use std::collections::{HashMap, HashSet};
use std::time::{Duration as StdDuration, Instant};

use chrono::{DateTime, Duration, Timelike, Utc};
use chrono_tz::Tz;
use relance_kit::SharedClock;
use relance_kit::error::{ApiError, ApiResult};
use relance_proto::convert::json_to_struct;
use relance_proto::v1::{
    CustomerRef, MessageKind, MessageOrigin, SendRequest, customer_ref, send_request,
};
use tokio_util::sync::CancellationToken;

use crate::clients::Clients;
use crate::domain::experiment;
use crate::domain::guard::{self, CapCounts, CapDecision};
use crate::domain::model::{BroadcastDef, BroadcastSchedule};
use crate::domain::schedule::{self, Cron};
use crate::engine::proto_channel;
use crate::store::CampaignStore;
use crate::store::broadcasts::{
    self, BroadcastRecord, CAPPED, CONTROL, NewRecipient, PAST, PENDING, QUEUED, RecipientWrite,
};
use crate::store::sends::{self, CapIncrement, GuardEvent, GuardKind, SendRow};

/// How long a replica owns a run's audience snapshot before another may take it over.
const SNAPSHOT_LEASE_SECS: i64 = 300;
/// Recipients written per transaction while taking the audience.
const SNAPSHOT_CHUNK: usize = 5000;

/// The broadcaster's settings.
#[derive(Debug, Clone)]
pub struct BroadcasterConfig {
    /// Recipients claimed per transaction.
    pub batch: i64,
    pub poll_ms: u64,
}

/// Runs broadcasts until shutdown.
#[derive(Clone)]
pub struct Broadcaster {
    pub store: CampaignStore,
    pub clients: Clients,
    pub clock: SharedClock,
    pub config: BroadcasterConfig,
}

impl std::fmt::Debug for Broadcaster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broadcaster").finish()
    }
}

/// Per-broadcast send budgets (`max_sends_per_second`).
#[derive(Debug, Default)]
pub struct Budgets {
    buckets: HashMap<(String, String), (f64, Instant)>,
}

impl Budgets {
    /// How many sends the broadcast may queue now (unlimited: `batch`).
    fn available(&mut self, workspace_id: &str, name: &str, rate: u32, batch: i64) -> i64 {
        if rate == 0 {
            return batch;
        }
        let rate = f64::from(rate);
        let entry = self
            .buckets
            .entry((workspace_id.to_owned(), name.to_owned()))
            .or_insert((rate, Instant::now()));
        let elapsed = entry.1.elapsed().as_secs_f64();
        entry.0 = (entry.0 + elapsed * rate).min(rate);
        entry.1 = Instant::now();
        (entry.0.floor() as i64).min(batch)
    }

    fn spend(&mut self, workspace_id: &str, name: &str, used: usize) {
        if let Some(entry) = self
            .buckets
            .get_mut(&(workspace_id.to_owned(), name.to_owned()))
        {
            entry.0 -= used as f64;
        }
    }
}

impl Broadcaster {
    /// Starts due runs and sends due recipients until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let pause = StdDuration::from_millis(self.config.poll_ms.max(5));
        let mut budgets = Budgets::default();
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let mut busy = false;
            match self.start_due_run().await {
                Ok(started) => busy |= started,
                Err(error) => {
                    tracing::warn!(error = %error, "broadcast run failed to start, retrying")
                }
            }
            match self.send_due(&mut budgets).await {
                Ok(sent) => busy |= sent > 0,
                Err(error) => tracing::warn!(error = %error, "broadcast send failed, retrying"),
            }
            if busy {
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Takes the audience of one due run; true when it did.
    pub async fn start_due_run(&self) -> ApiResult<bool> {
        let now = self.clock.now();
        let mut tx = self.store.pool.begin().await?;
        let Some((workspace_id, broadcast)) = broadcasts::claim_due_broadcast(&mut tx, now).await?
        else {
            return Ok(false);
        };
        let run_at = broadcast.next_run_at.unwrap_or(now);
        let run = if broadcast.status == broadcasts::SCHEDULED {
            broadcasts::begin_run(&mut tx, &workspace_id, &broadcast.def.name, run_at, now).await?
        } else {
            // A snapshot a crashed replica left unfinished: take it over.
            broadcast.run
        };
        // Lease the snapshot, so no other replica starts it while this one works.
        sqlx::query("UPDATE broadcasts SET next_run_at = $3 WHERE workspace_id = $1 AND name = $2")
            .bind(&workspace_id)
            .bind(&broadcast.def.name)
            .bind(now + Duration::seconds(SNAPSHOT_LEASE_SECS))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let nominal = broadcast
            .run_at
            .filter(|_| broadcast.status != broadcasts::SCHEDULED)
            .unwrap_or(run_at);
        self.snapshot(&workspace_id, &broadcast, run, nominal)
            .await?;
        Ok(true)
    }

    /// Writes the run's recipients: the segment's members now, less the excluded ones.
    async fn snapshot(
        &self,
        workspace_id: &str,
        broadcast: &BroadcastRecord,
        run: i32,
        run_at: DateTime<Utc>,
    ) -> ApiResult<()> {
        let def = &broadcast.def;
        let started = Instant::now();
        let now = self.clock.now();
        let unavailable = |status: tonic::Status| {
            ApiError::Unavailable(format!("segmentation: {}", status.message()))
        };
        let mut excluded: HashSet<String> = HashSet::new();
        for segment in &def.exclude_segments {
            self.clients
                .segment_members(workspace_id, segment, |ids| excluded.extend(ids))
                .await
                .map_err(unavailable)?;
        }
        let mut members: Vec<String> = Vec::new();
        self.clients
            .segment_members(workspace_id, &def.segment, |ids| members.extend(ids))
            .await
            .map_err(unavailable)?;
        members.retain(|id| !excluded.contains(id));

        let local = local_time_of(def, run_at);
        let guardrails = self.store.guardrails(workspace_id).await?;
        let default_tz = guard::resolve_tz(
            Some(&guardrails.quiet_hours.default_timezone),
            chrono_tz::UTC,
        );
        let skip_if_past = matches!(
            def.schedule,
            BroadcastSchedule::LocalTime {
                skip_if_past: true,
                ..
            }
        );
        for chunk in members.chunks(SNAPSHOT_CHUNK) {
            let zones = match local {
                Some(_) => self.timezones(workspace_id, chunk, default_tz).await?,
                None => HashMap::new(),
            };
            let mut recipients = Vec::with_capacity(chunk.len());
            for customer in chunk {
                let mut due_at = run_at;
                let mut state = PENDING;
                if let Some((date, hour, minute)) = local {
                    let tz = zones.get(customer).copied().unwrap_or(default_tz);
                    due_at = schedule::local_instant(date, hour, minute, tz);
                    if due_at < broadcast.created_at.min(now) - Duration::minutes(1)
                        || due_at < run_at - Duration::hours(1)
                    {
                        // Already past in this timezone when it was scheduled.
                        if skip_if_past {
                            state = PAST;
                        }
                        due_at = due_at.max(now);
                    }
                }
                let mut variant = String::new();
                if experiment::in_control(customer, &def.name, def.control_group_percent) {
                    state = if state == PAST { PAST } else { CONTROL };
                } else if let Some(picked) =
                    experiment::pick_variant(&def.variants, customer, &def.name, "")
                {
                    variant = picked.name.clone();
                }
                recipients.push(NewRecipient {
                    customer_id: customer.clone(),
                    due_at,
                    state,
                    variant,
                });
            }
            let mut conn = self.store.pool.acquire().await?;
            broadcasts::insert_recipients(&mut conn, workspace_id, &def.name, run, &recipients)
                .await?;
        }
        let mut conn = self.store.pool.acquire().await?;
        broadcasts::finish_snapshot(&mut conn, workspace_id, &def.name, run).await?;
        tracing::info!(
            broadcast = %def.name,
            run,
            recipients = members.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "broadcast audience taken"
        );
        Ok(())
    }

    async fn timezones(
        &self,
        workspace_id: &str,
        customers: &[String],
        default: Tz,
    ) -> ApiResult<HashMap<String, Tz>> {
        let profiles = self
            .clients
            .profiles(workspace_id, customers)
            .await
            .map_err(|status| ApiError::Unavailable(format!("profiles: {}", status.message())))?;
        let mut zones = HashMap::with_capacity(profiles.len());
        for (customer, profile) in profiles {
            zones.insert(
                customer,
                guard::resolve_tz(profile.timezone.as_deref(), default),
            );
        }
        Ok(zones)
    }

    /// Queues the due recipients of every broadcast being sent; returns how many were
    /// handled.
    pub async fn send_due(&self, budgets: &mut Budgets) -> ApiResult<usize> {
        let mut conn = self.store.pool.acquire().await?;
        let sending = broadcasts::sending(&mut conn).await?;
        drop(conn);
        let mut handled = 0;
        for (workspace_id, broadcast) in sending {
            let limit = budgets.available(
                &workspace_id,
                &broadcast.def.name,
                broadcast.def.max_sends_per_second,
                self.config.batch,
            );
            if limit <= 0 {
                continue;
            }
            let (done, queued) = self.send_batch(&workspace_id, &broadcast, limit).await?;
            budgets.spend(&workspace_id, &broadcast.def.name, queued);
            handled += done;
        }
        Ok(handled)
    }

    /// One transaction of a broadcast's due recipients; returns (handled, queued).
    async fn send_batch(
        &self,
        workspace_id: &str,
        broadcast: &BroadcastRecord,
        limit: i64,
    ) -> ApiResult<(usize, usize)> {
        let def = &broadcast.def;
        let now = self.clock.now();
        let mut tx = self.store.pool.begin().await?;
        let due = broadcasts::claim_recipients(
            &mut tx,
            workspace_id,
            &def.name,
            broadcast.run,
            now,
            limit,
        )
        .await?;
        if due.is_empty() {
            let next =
                broadcasts::next_pending(&mut tx, workspace_id, &def.name, broadcast.run).await?;
            if next.is_none() {
                let next_run = next_run_after(def, broadcast.run_at.unwrap_or(now).max(now));
                broadcasts::end_run(&mut tx, workspace_id, &def.name, next_run, now).await?;
                tx.commit().await?;
                tracing::info!(broadcast = %def.name, run = broadcast.run, next_run = ?next_run, "broadcast run finished");
            }
            return Ok((0, 0));
        }
        let guardrails = self.store.guardrails(workspace_id).await?;
        let default_tz = guard::resolve_tz(
            Some(&guardrails.quiet_hours.default_timezone),
            chrono_tz::UTC,
        );
        let customers: Vec<String> = due.iter().map(|r| r.customer_id.clone()).collect();
        let check_quiet = !def.ignore_quiet_hours && guardrails.quiet_hours.enabled;
        let check_caps = !def.ignore_frequency_caps && !guardrails.caps.rules.is_empty();
        let zones = if check_quiet || check_caps {
            self.timezones(workspace_id, &customers, default_tz).await?
        } else {
            HashMap::new()
        };
        let mut counts: HashMap<String, CapCounts> = HashMap::new();
        if check_caps {
            lock_customers(&mut tx, workspace_id, &customers).await?;
            counts = sends::cap_counts(&mut tx, workspace_id, &customers, now).await?;
        }
        let primary = def
            .channels
            .first()
            .copied()
            .unwrap_or(crate::domain::model::ChannelName::Push);
        let mut writes = Vec::with_capacity(due.len());
        let mut send_rows = Vec::new();
        let trace = relance_kit::trace::current();
        let mut guard_events = Vec::new();
        let mut increments = Vec::new();
        for recipient in due {
            let tz = zones
                .get(&recipient.customer_id)
                .copied()
                .unwrap_or(default_tz);
            let variant = def.variants.iter().find(|v| v.name == recipient.variant);
            let channel = variant
                .and_then(|v| v.channels.first().copied())
                .unwrap_or(primary);
            let deferred_before = recipient.due_at > recipient.first_due_at;
            if check_quiet
                && let Some(until) = guard::quiet_until(&guardrails.quiet_hours, channel, now, tz)
            {
                if !deferred_before {
                    guard_events.push(self.guard_event(
                        workspace_id,
                        def,
                        &recipient.customer_id,
                        GuardKind::QuietDeferred,
                        channel,
                        now,
                    ));
                }
                writes.push(RecipientWrite {
                    row: recipient.row.clone(),
                    customer_id: recipient.customer_id,
                    state: PENDING,
                    due_at: until,
                });
                continue;
            }
            if check_caps {
                let customer_counts = counts.entry(recipient.customer_id.clone()).or_default();
                match guard::cap_decision(
                    &guardrails.caps,
                    channel,
                    now,
                    recipient.first_due_at,
                    tz,
                    customer_counts,
                ) {
                    CapDecision::Allow => {
                        for key in guard::counter_keys(&guardrails.caps, channel, now, tz) {
                            *customer_counts.entry(key.clone()).or_insert(0) += 1;
                            increments.push(CapIncrement {
                                workspace_id: workspace_id.to_owned(),
                                customer_id: recipient.customer_id.clone(),
                                key,
                            });
                        }
                    }
                    CapDecision::Defer { until } => {
                        if !deferred_before {
                            guard_events.push(self.guard_event(
                                workspace_id,
                                def,
                                &recipient.customer_id,
                                GuardKind::CapDeferred,
                                channel,
                                now,
                            ));
                        }
                        writes.push(RecipientWrite {
                            row: recipient.row.clone(),
                            customer_id: recipient.customer_id,
                            state: PENDING,
                            due_at: until,
                        });
                        continue;
                    }
                    CapDecision::Skip => {
                        guard_events.push(self.guard_event(
                            workspace_id,
                            def,
                            &recipient.customer_id,
                            GuardKind::CapSkipped,
                            channel,
                            now,
                        ));
                        writes.push(RecipientWrite {
                            row: recipient.row.clone(),
                            customer_id: recipient.customer_id,
                            state: CAPPED,
                            due_at: recipient.due_at,
                        });
                        continue;
                    }
                }
            }
            let key = format!("b:{}:{}:{}", def.name, broadcast.run, recipient.customer_id);
            let request = broadcast_request(def, &key, &recipient.customer_id, &recipient.variant);
            let envelope = relance_delivery::wire::Envelope::new(workspace_id, &request);
            send_rows.push(SendRow {
                workspace_id: workspace_id.to_owned(),
                idempotency_key: key,
                journey_id: None,
                flow: String::new(),
                flow_version: 0,
                broadcast: def.name.clone(),
                step: String::new(),
                variant: recipient.variant.clone(),
                channel: channel.as_str().to_owned(),
                customer_id: recipient.customer_id.clone(),
                at: now,
                envelope: serde_json::to_value(&envelope).map_err(anyhow::Error::from)?,
                trace: trace.clone(),
            });
            writes.push(RecipientWrite {
                row: recipient.row.clone(),
                customer_id: recipient.customer_id,
                state: QUEUED,
                due_at: recipient.due_at,
            });
        }
        let handled = writes.len();
        let queued = sends::queue_sends(&mut tx, &send_rows).await?;
        sends::insert_guard_events(&mut tx, &guard_events).await?;
        sends::add_cap_counts(&mut tx, &increments, now).await?;
        broadcasts::write_recipients(&mut tx, workspace_id, &def.name, &writes).await?;
        tx.commit().await?;
        if queued > 0 {
            self.store.outbox_wake.notify_one();
        }
        Ok((handled, send_rows.len()))
    }

    fn guard_event(
        &self,
        workspace_id: &str,
        def: &BroadcastDef,
        customer_id: &str,
        kind: GuardKind,
        channel: crate::domain::model::ChannelName,
        now: DateTime<Utc>,
    ) -> GuardEvent {
        GuardEvent {
            workspace_id: workspace_id.to_owned(),
            flow: String::new(),
            broadcast: def.name.clone(),
            step: String::new(),
            journey_id: String::new(),
            customer_id: customer_id.to_owned(),
            kind,
            channel: channel.as_str().to_owned(),
            at: now,
        }
    }
}

/// For a local-time run: the local date and time every timezone waits for.
fn local_time_of(
    def: &BroadcastDef,
    run_at: DateTime<Utc>,
) -> Option<(chrono::NaiveDate, u32, u32)> {
    match &def.schedule {
        BroadcastSchedule::LocalTime {
            date, hour, minute, ..
        } => Some((*date, *hour, *minute)),
        BroadcastSchedule::Recurring {
            local_time: true, ..
        } => {
            // Runs start at the occurrence in the earliest timezone (UTC+14).
            let local = run_at.with_timezone(&chrono_tz::Etc::GMTMinus14);
            Some((local.date_naive(), local.hour(), local.minute()))
        }
        _ => None,
    }
}

/// When a broadcast's first run starts (the first wave, for local time).
pub fn first_run_at(def: &BroadcastDef, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    match &def.schedule {
        BroadcastSchedule::Now => Some(now),
        BroadcastSchedule::At(at) => Some((*at).max(now)),
        BroadcastSchedule::LocalTime {
            date, hour, minute, ..
        } => Some(schedule::earliest_wave(*date, *hour, *minute).max(now)),
        BroadcastSchedule::Recurring { starts_at, .. } => {
            let after = starts_at.map(|s| s.max(now)).unwrap_or(now) - Duration::seconds(1);
            next_run_after(def, after)
        }
    }
}

/// The run after `after` of a recurring broadcast; `None` for the others or past `ends_at`.
pub fn next_run_after(def: &BroadcastDef, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let BroadcastSchedule::Recurring {
        cron,
        local_time,
        ends_at,
        ..
    } = &def.schedule
    else {
        return None;
    };
    let cron = Cron::parse(cron).ok()?;
    let tz: Tz = if *local_time {
        chrono_tz::Etc::GMTMinus14
    } else {
        chrono_tz::UTC
    };
    let next = cron.next_after(after, tz)?;
    match ends_at {
        Some(end) if next >= *end => None,
        _ => Some(next),
    }
}

fn broadcast_request(
    def: &BroadcastDef,
    key: &str,
    customer_id: &str,
    variant: &str,
) -> SendRequest {
    let picked = def.variants.iter().find(|v| v.name == variant);
    let template = match picked {
        Some(v) => v.template.clone(),
        None => def.template.clone().unwrap_or_default(),
    };
    let channels = match picked {
        Some(v) if !v.channels.is_empty() => v.channels.clone(),
        _ => def.channels.clone(),
    };
    SendRequest {
        idempotency_key: key.to_owned(),
        customer: Some(CustomerRef {
            id: Some(customer_ref::Id::CustomerId(customer_id.to_owned())),
        }),
        channels: channels.iter().map(|c| proto_channel(*c) as i32).collect(),
        content: Some(send_request::Content::Template(template)),
        topic: def.topic.clone(),
        kind: MessageKind::Marketing as i32,
        data: (!def.data.is_empty())
            .then(|| json_to_struct(&serde_json::Value::Object(def.data.clone()))),
        origin: Some(MessageOrigin {
            broadcast: def.name.clone(),
            variant: variant.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Takes a transaction-scoped advisory lock per customer, in a fixed order (the same keys
/// as the journey workers, so flows and broadcasts see each other's counts).
pub async fn lock_customers(
    tx: &mut sqlx::PgConnection,
    workspace_id: &str,
    customers: &[String],
) -> ApiResult<()> {
    let mut keys: Vec<String> = customers
        .iter()
        .map(|c| format!("caps:{workspace_id}:{c}"))
        .collect();
    keys.sort_unstable();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM UNNEST($1::text[]) AS k ORDER BY k")
        .bind(&keys)
        .execute(&mut *tx)
        .await?;
    Ok(())
}
