//! Real-time evaluation: events update the per-customer daily aggregates of the selectors
//! segments read, profile changes update attributes and traits, and each change
//! re-evaluates only the customers it concerns, in the same transaction that records it.
//! The sweeper wakes customers whose membership time alone changes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use relance_kit::bus::EVENTS_EXCHANGE;
use relance_kit::messages::{
    EventMessage, ProfileDeleted, ProfileMerged, ProfileUpdated, SEGMENT_ENTERED, SEGMENT_EXITED,
    SegmentChanged,
};
use sqlx::{PgConnection, Row as _};

use super::mirror::MirrorChange;
use super::{LiveVersion, Result, SegmentStore};
use crate::domain::eval::{self, Facts, Series};
use crate::domain::{EventSelector, Person, aggregate, parse};

/// Why a customer is being evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Event,
    Profile,
    Time,
    Merge,
    Definition,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Event => "event",
            Cause::Profile => "profile",
            Cause::Time => "time",
            Cause::Merge => "merge",
            Cause::Definition => "definition",
        }
    }
}

/// What changed, so that only the segments it can move are re-decided.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scope<'a> {
    /// Events of these names arrived.
    Events(&'a [&'a str]),
    /// Profile attributes or traits changed.
    Profile,
    /// Time passed, identities merged, or the customer is new: every segment.
    Everything,
}

/// What transactions leave to do once committed: wake the outbox relay, write the Redis
/// mirror.
#[derive(Debug, Default)]
pub struct AfterCommit {
    items: Vec<(String, Evaluated)>,
}

impl AfterCommit {
    pub(crate) fn push(&mut self, workspace_id: String, evaluated: Evaluated) {
        self.items.push((workspace_id, evaluated));
    }
}

/// What an evaluation changed, to mirror after commit.
#[derive(Debug, Default)]
pub struct Evaluated {
    pub entered: usize,
    pub exited: usize,
    pub mirror: Vec<MirrorChange>,
}

/// A stored selector that the consumer keeps current.
#[derive(Debug, Clone)]
struct StoredSelector {
    /// The id the selector's aggregates are stored under.
    id: i64,
    ready: bool,
    selector: EventSelector,
}

impl SegmentStore {
    /// Applies a batch of events of one workspace inside the caller's transaction: skips
    /// those seen before, adds the rest to the aggregates, and re-evaluates their customers.
    /// Returns how many were new.
    ///
    /// `traces` maps an event's message id to the trace context it arrived in: a change it
    /// causes is announced in that trace.
    pub(crate) async fn apply_events(
        &self,
        tx: &mut PgConnection,
        events: &[EventMessage],
        traces: &HashMap<String, String>,
        now: DateTime<Utc>,
        after: &mut AfterCommit,
    ) -> Result<usize> {
        let Some(first) = events.first() else {
            return Ok(0);
        };
        let workspace_id = first.workspace_id.clone();
        let mut names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();

        let selectors = lock_selectors(&mut *tx, &workspace_id, &names).await?;
        let message_ids: Vec<&str> = events.iter().map(|e| e.message_id.as_str()).collect();
        let received: Vec<DateTime<Utc>> = events.iter().map(|e| e.received_at).collect();
        let fresh: Vec<String> = sqlx::query_scalar(
            "INSERT INTO seen_events (workspace_id, message_id, received_at) \
             SELECT $1, m, r FROM unnest($2::text[], $3::timestamptz[]) AS t(m, r) \
             ON CONFLICT DO NOTHING RETURNING message_id",
        )
        .bind(&workspace_id)
        .bind(&message_ids)
        .bind(&received)
        .fetch_all(&mut *tx)
        .await?;
        if fresh.is_empty() {
            return Ok(0);
        }
        let applied = fresh.len();
        let mut fresh: BTreeSet<String> = fresh.into_iter().collect();

        // (person, selector) → matching events' (time, value).
        let mut additions: Additions = BTreeMap::new();
        let mut reasons: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
        let mut person_traces: HashMap<String, String> = HashMap::new();
        for event in events {
            // Taken out once applied: a redelivered copy in the same call counts once.
            if !fresh.remove(&event.message_id) {
                continue;
            }
            let Some(person) =
                Person::of(event.customer_id.as_deref(), event.anonymous_id.as_deref())
            else {
                continue;
            };
            let key = person.key();
            if let Some(trace) = traces.get(&event.message_id) {
                person_traces.insert(key.clone(), trace.clone());
            }
            let reason = reasons.entry(key.clone()).or_insert(event.timestamp);
            if event.timestamp > *reason {
                *reason = event.timestamp;
            }
            for stored in &selectors {
                if !stored.ready {
                    continue;
                }
                if let Some(value) =
                    aggregate::contribution(&stored.selector, &event.name, &event.properties, now)
                {
                    additions
                        .entry((key.clone(), stored.id))
                        .or_default()
                        .push((event.timestamp, value));
                }
            }
        }
        add_to_aggregates(&mut *tx, &workspace_id, &additions).await?;
        let reasons: Vec<(String, DateTime<Utc>)> = reasons.into_iter().collect();
        let evaluated = self
            .evaluate(
                &mut *tx,
                &workspace_id,
                &reasons,
                &person_traces,
                Cause::Event,
                Scope::Events(&names),
                now,
            )
            .await?;
        after.push(workspace_id, evaluated);
        Ok(applied)
    }

    /// Records profiles' new attributes and traits and re-evaluates those customers, inside
    /// the caller's transaction. An announcement older than the one recorded is ignored
    /// (redeliveries can reorder); applying one twice changes nothing (it is a state, not an
    /// increment).
    pub(crate) async fn profiles_updated(
        &self,
        tx: &mut PgConnection,
        updates: &[ProfileUpdated],
        now: DateTime<Utc>,
        after: &mut AfterCommit,
    ) -> Result<()> {
        let mut by_workspace: BTreeMap<&str, BTreeMap<String, &ProfileUpdated>> = BTreeMap::new();
        for updated in updates {
            let person = Person::of(
                updated.customer_id.as_deref(),
                updated.anonymous_ids.first().map(String::as_str),
            );
            if let Some(person) = person {
                // The latest announcement per person wins within a batch too.
                let slot = by_workspace
                    .entry(&updated.workspace_id)
                    .or_default()
                    .entry(person.key())
                    .or_insert(updated);
                if updated.at >= slot.at {
                    *slot = updated;
                }
            }
        }
        for (workspace_id, people) in by_workspace {
            let mut keys = Vec::with_capacity(people.len());
            let mut attributes = Vec::with_capacity(people.len());
            let mut traits = Vec::with_capacity(people.len());
            let mut ats = Vec::with_capacity(people.len());
            for (key, updated) in &people {
                keys.push(key.as_str());
                attributes.push(&updated.attributes);
                traits.push(&updated.traits);
                ats.push(updated.at);
            }
            let recorded: Vec<(String, DateTime<Utc>, bool)> = sqlx::query_as(
                "INSERT INTO people (workspace_id, person, attributes, traits, profile_at, touched_at) \
                 SELECT $1, p, a, t, at, $6 FROM unnest($2::text[], $3::jsonb[], $4::jsonb[], $5::timestamptz[]) AS u(p, a, t, at) \
                 ORDER BY p \
                 ON CONFLICT (workspace_id, person) DO UPDATE SET attributes = excluded.attributes, \
                 traits = excluded.traits, profile_at = excluded.profile_at, touched_at = excluded.touched_at \
                 WHERE people.profile_at IS NULL OR people.profile_at <= excluded.profile_at \
                 RETURNING person, profile_at, (xmax = 0) AS inserted",
            )
            .bind(workspace_id)
            .bind(&keys)
            .bind(&attributes)
            .bind(&traits)
            .bind(&ats)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
            if recorded.is_empty() {
                continue;
            }
            // A profile seen for the first time is decided for every segment.
            let mut changed = Vec::new();
            let mut newcomers = Vec::new();
            for (person, at, inserted) in recorded {
                if inserted {
                    newcomers.push((person, at));
                } else {
                    changed.push((person, at));
                }
            }
            for (persons, scope) in [(changed, Scope::Profile), (newcomers, Scope::Everything)] {
                if persons.is_empty() {
                    continue;
                }
                let evaluated = self
                    .evaluate(
                        &mut *tx,
                        workspace_id,
                        &persons,
                        &HashMap::new(),
                        Cause::Profile,
                        scope,
                        now,
                    )
                    .await?;
                after.push(workspace_id.to_owned(), evaluated);
            }
        }
        Ok(())
    }

    /// Folds a visitor into the customer they turned out to be, inside the caller's
    /// transaction: aggregates add up, the visitor's memberships end, the customer is
    /// re-evaluated. A redelivery finds nothing left to fold.
    pub(crate) async fn profile_merged(
        &self,
        tx: &mut PgConnection,
        merged: &ProfileMerged,
        now: DateTime<Utc>,
        after: &mut AfterCommit,
    ) -> Result<()> {
        let visitor = Person::Visitor(merged.anonymous_id.clone()).key();
        let customer = Person::Customer(merged.customer_id.clone()).key();
        let workspace_id = &merged.workspace_id;
        let mut persons = vec![visitor.clone(), customer.clone()];
        persons.sort();
        let rows = sqlx::query(
            "SELECT person, selector_id, days, counts, sums, last_at FROM aggregates \
             WHERE workspace_id = $1 AND person = ANY($2) ORDER BY person, selector_id FOR UPDATE",
        )
        .bind(workspace_id)
        .bind(&persons)
        .fetch_all(&mut *tx)
        .await?;
        let mut customer_series: HashMap<i64, Series> = HashMap::new();
        let mut visitor_series: Vec<(i64, Series)> = Vec::new();
        for row in &rows {
            let person: String = row.try_get("person")?;
            let selector_id: i64 = row.try_get("selector_id")?;
            let series = series_from_row(row)?;
            if person == customer {
                customer_series.insert(selector_id, series);
            } else {
                visitor_series.push((selector_id, series));
            }
        }
        for (selector_id, series) in &visitor_series {
            let merged_series = customer_series.entry(*selector_id).or_default();
            merged_series.merge(series);
            write_series(
                &mut *tx,
                workspace_id,
                &customer,
                *selector_id,
                merged_series,
            )
            .await?;
        }
        sqlx::query("DELETE FROM aggregates WHERE workspace_id = $1 AND person = $2")
            .bind(workspace_id)
            .bind(&visitor)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO people (workspace_id, person, touched_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(workspace_id)
        .bind(&customer)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM people WHERE workspace_id = $1 AND person = $2")
            .bind(workspace_id)
            .bind(&visitor)
            .execute(&mut *tx)
            .await?;
        // The visitor's memberships end: announce each exit so flows can follow the customer.
        let live = self.live_versions(&mut *tx, workspace_id).await?;
        let mut evaluated = Evaluated::default();
        let ended = sqlx::query(
            "DELETE FROM memberships WHERE segment_id = ANY($1) AND person = $2 RETURNING segment_id, version",
        )
        .bind(live.iter().map(|v| v.segment_id).collect::<Vec<_>>())
        .bind(&visitor)
        .fetch_all(&mut *tx)
        .await?;
        let mut messages = Vec::new();
        for row in ended {
            let segment_id: i64 = row.try_get("segment_id")?;
            let version: i32 = row.try_get("version")?;
            let Some(live_version) = live
                .iter()
                .find(|v| v.segment_id == segment_id && v.version == version)
            else {
                continue;
            };
            messages.push(change_message(
                workspace_id,
                live_version,
                &visitor,
                false,
                now,
                Cause::Merge,
                now,
            ));
            evaluated.exited += 1;
            evaluated.mirror.push(MirrorChange {
                segment_id,
                version,
                person: visitor.clone(),
                entered_at: None,
            });
        }
        let traces = vec![relance_kit::trace::current(); messages.len()];
        enqueue_changes(&mut *tx, &messages, &traces).await?;
        let more = self
            .evaluate(
                &mut *tx,
                workspace_id,
                &[(customer, now)],
                &HashMap::new(),
                Cause::Merge,
                Scope::Everything,
                now,
            )
            .await?;
        after.push(workspace_id.clone(), evaluated);
        after.push(workspace_id.clone(), more);
        Ok(())
    }

    /// Erases everything segmentation holds on a deleted customer, inside the caller's
    /// transaction (no exit is announced: the deletion itself is).
    pub(crate) async fn profile_deleted(
        &self,
        tx: &mut PgConnection,
        deleted: &ProfileDeleted,
        after: &mut AfterCommit,
    ) -> Result<()> {
        let mut persons: Vec<String> = deleted
            .anonymous_ids
            .iter()
            .map(|a| Person::Visitor(a.clone()).key())
            .collect();
        if let Some(customer) = &deleted.customer_id {
            persons.push(Person::Customer(customer.clone()).key());
        }
        let workspace_id = &deleted.workspace_id;
        let removed = sqlx::query(
            "DELETE FROM memberships m USING segments s WHERE s.id = m.segment_id AND s.workspace_id = $1 \
             AND m.person = ANY($2) RETURNING m.segment_id, m.version, m.person",
        )
        .bind(workspace_id)
        .bind(&persons)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM aggregates WHERE workspace_id = $1 AND person = ANY($2)")
            .bind(workspace_id)
            .bind(&persons)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM people WHERE workspace_id = $1 AND person = ANY($2)")
            .bind(workspace_id)
            .bind(&persons)
            .execute(&mut *tx)
            .await?;
        let mut mirror = Vec::with_capacity(removed.len());
        for row in &removed {
            mirror.push(MirrorChange {
                segment_id: row.try_get("segment_id")?,
                version: row.try_get("version")?,
                person: row.try_get("person")?,
                entered_at: None,
            });
        }
        after.push(
            workspace_id.clone(),
            Evaluated {
                mirror,
                ..Evaluated::default()
            },
        );
        Ok(())
    }

    /// Re-evaluates up to `limit` customers whose next window boundary has passed; returns
    /// how many. Several replicas can sweep at once (SKIP LOCKED).
    pub async fn sweep(&self, now: DateTime<Utc>, limit: i64) -> Result<usize> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT workspace_id, person, wake_at FROM people WHERE wake_at <= $1 \
             ORDER BY workspace_id, person LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut by_workspace: BTreeMap<String, Vec<(String, DateTime<Utc>)>> = BTreeMap::new();
        for row in &rows {
            by_workspace
                .entry(row.try_get("workspace_id")?)
                .or_default()
                .push((row.try_get("person")?, row.try_get("wake_at")?));
        }
        let mut after = AfterCommit::default();
        for (workspace_id, persons) in &by_workspace {
            let evaluated = self
                .evaluate(
                    &mut tx,
                    workspace_id,
                    persons,
                    &HashMap::new(),
                    Cause::Time,
                    Scope::Everything,
                    now,
                )
                .await?;
            after.push(workspace_id.clone(), evaluated);
        }
        tx.commit().await?;
        self.finish(after).await;
        Ok(rows.len())
    }

    /// Re-evaluates `persons` (person key, the time that caused it) inside the caller's
    /// transaction: records entries and exits with their announcements, and the next
    /// time-only boundary of each customer. Only the answering versions that can depend on
    /// what changed are re-decided — those reading `event_names` for an event, those
    /// reading the profile for a profile change, everything for time and merges — and the
    /// segments that refer to them; the others keep their recorded membership.
    // The connection, the people and why, and the moment: grouping them would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn evaluate(
        &self,
        tx: &mut PgConnection,
        workspace_id: &str,
        persons: &[(String, DateTime<Utc>)],
        traces: &HashMap<String, String>,
        cause: Cause,
        scope: Scope<'_>,
        now: DateTime<Utc>,
    ) -> Result<Evaluated> {
        let mut keys: Vec<String> = persons.iter().map(|(p, _)| p.clone()).collect();
        keys.sort();
        keys.dedup();
        let reason_of: HashMap<&str, DateTime<Utc>> =
            persons.iter().map(|(p, at)| (p.as_str(), *at)).collect();
        // Lock order of every writer: segment rows (shared, against a version switch), then
        // people rows in key order.
        let live = self.live_versions(&mut *tx, workspace_id).await?;
        let people = sqlx::query(
            "INSERT INTO people (workspace_id, person, touched_at) SELECT $1, p, $3 FROM unnest($2::text[]) AS t(p) \
             ON CONFLICT (workspace_id, person) DO UPDATE SET touched_at = excluded.touched_at \
             RETURNING person, attributes, traits, (xmax = 0) AS inserted",
        )
        .bind(workspace_id)
        .bind(&keys)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        if live.is_empty() {
            return Ok(Evaluated::default());
        }
        let mut selector_ids: Vec<i64> = Vec::new();
        for version in &live {
            for selector in &version.compiled.selectors {
                selector_ids.push(aggregate::selector_id(selector));
            }
        }
        selector_ids.sort_unstable();
        selector_ids.dedup();
        let mut series: HashMap<String, HashMap<i64, Series>> = HashMap::new();
        if !selector_ids.is_empty() {
            let rows = sqlx::query(
                "SELECT person, selector_id, days, counts, sums, last_at FROM aggregates \
                 WHERE workspace_id = $1 AND person = ANY($2) AND selector_id = ANY($3)",
            )
            .bind(workspace_id)
            .bind(&keys)
            .bind(&selector_ids)
            .fetch_all(&mut *tx)
            .await?;
            for row in &rows {
                series
                    .entry(row.try_get("person")?)
                    .or_default()
                    .insert(row.try_get("selector_id")?, series_from_row(row)?);
            }
        }
        // Which versions this change can move (dependencies come first in `live`).
        let mut affected: HashSet<&str> = HashSet::new();
        for version in &live {
            let compiled = &version.compiled;
            let direct = match scope {
                Scope::Events(names) => compiled
                    .event_names
                    .iter()
                    .any(|name| names.contains(&name.as_str())),
                Scope::Profile => compiled.reads_profile,
                Scope::Everything => true,
            };
            if direct
                || compiled
                    .depends_on
                    .iter()
                    .any(|d| affected.contains(d.as_str()))
            {
                affected.insert(compiled.name());
            }
        }
        let segment_ids: Vec<i64> = live.iter().map(|v| v.segment_id).collect();
        let current: HashSet<(i64, i32, String)> = sqlx::query_as(
            "SELECT segment_id, version, person FROM memberships \
             WHERE segment_id = ANY($1) AND person = ANY($2)",
        )
        .bind(&segment_ids)
        .bind(&keys)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();

        let empty_series = HashMap::new();
        let mut evaluated = Evaluated::default();
        let mut messages = Vec::new();
        let current_trace = relance_kit::trace::current();
        let mut message_traces: Vec<Option<String>> = Vec::new();
        let mut enter = (Vec::new(), Vec::new(), Vec::new());
        let mut exit = (Vec::new(), Vec::new(), Vec::new());
        let mut wakes: (Vec<String>, Vec<Option<DateTime<Utc>>>) = (Vec::new(), Vec::new());
        for row in &people {
            let person: String = row.try_get("person")?;
            let attributes: serde_json::Value = row.try_get("attributes")?;
            let traits: serde_json::Value = row.try_get("traits")?;
            // Someone seen for the first time is decided for every segment (they may meet a
            // condition such as "never ordered" that the event itself does not touch).
            let newcomer: bool = row.try_get("inserted")?;
            let person_series = series.get(&person).unwrap_or(&empty_series);
            let reason_at = reason_of.get(person.as_str()).copied().unwrap_or(now);
            let mut memberships: HashMap<String, bool> = HashMap::new();
            let mut wake: Option<DateTime<Utc>> = None;
            for version in &live {
                let facts = Facts {
                    attributes: &attributes,
                    traits: &traits,
                    series: person_series,
                    memberships: &memberships,
                };
                let key = (version.segment_id, version.version, person.clone());
                let was = current.contains(&key);
                let member = if newcomer || affected.contains(version.compiled.name()) {
                    eval::holds(&version.compiled.definition.condition, &facts, now)
                } else {
                    was
                };
                if version.compiled.time_dependent
                    && let Some(at) =
                        eval::next_change(&version.compiled.definition.condition, &facts, now)
                    && wake.is_none_or(|w| at < w)
                {
                    wake = Some(at);
                }
                memberships.insert(version.compiled.name().to_owned(), member);
                if member == was {
                    continue;
                }
                let target = if member { &mut enter } else { &mut exit };
                target.0.push(version.segment_id);
                target.1.push(version.version);
                target.2.push(person.clone());
                messages.push(change_message(
                    workspace_id,
                    version,
                    &person,
                    member,
                    reason_at,
                    cause,
                    now,
                ));
                message_traces.push(
                    traces
                        .get(&person)
                        .cloned()
                        .or_else(|| current_trace.clone()),
                );
                evaluated.mirror.push(MirrorChange {
                    segment_id: version.segment_id,
                    version: version.version,
                    person: person.clone(),
                    entered_at: member.then_some(now),
                });
                if member {
                    evaluated.entered += 1;
                } else {
                    evaluated.exited += 1;
                }
            }
            wakes.0.push(person);
            wakes.1.push(wake);
        }
        if !enter.0.is_empty() {
            sqlx::query(
                "INSERT INTO memberships (segment_id, version, person, entered_at) \
                 SELECT s, v, p, $4 FROM unnest($1::bigint[], $2::int[], $3::text[]) AS t(s, v, p) ON CONFLICT DO NOTHING",
            )
            .bind(&enter.0)
            .bind(&enter.1)
            .bind(&enter.2)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        if !exit.0.is_empty() {
            sqlx::query(
                "DELETE FROM memberships m USING unnest($1::bigint[], $2::int[], $3::text[]) AS t(s, v, p) \
                 WHERE m.segment_id = t.s AND m.version = t.v AND m.person = t.p",
            )
            .bind(&exit.0)
            .bind(&exit.1)
            .bind(&exit.2)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE people SET wake_at = t.w FROM unnest($2::text[], $3::timestamptz[]) AS t(p, w) \
             WHERE people.workspace_id = $1 AND people.person = t.p AND people.wake_at IS DISTINCT FROM t.w",
        )
        .bind(workspace_id)
        .bind(&wakes.0)
        .bind(&wakes.1)
        .execute(&mut *tx)
        .await?;
        enqueue_changes(&mut *tx, &messages, &message_traces).await?;
        if evaluated.entered + evaluated.exited > 0 {
            let counter = |change: &'static str, n: usize| {
                metrics::counter!("relance_segments_changes_total", "change" => change, "cause" => cause.as_str())
                    .increment(n as u64);
            };
            counter("entered", evaluated.entered);
            counter("exited", evaluated.exited);
        }
        Ok(evaluated)
    }

    /// After the commit of the transaction `after` was filled in: wake the outbox relay,
    /// write the mirror.
    pub async fn finish(&self, after: AfterCommit) {
        for (workspace_id, evaluated) in after.items {
            if evaluated.entered + evaluated.exited > 0 {
                self.outbox_wake.notify_one();
            }
            self.mirror.apply(&workspace_id, &evaluated.mirror).await;
        }
    }
}

/// Advisory lock class of (workspace, event name): shared while events are applied,
/// exclusive while a selector on that name is backfilled, so that every event is counted
/// exactly once — by the backfill if it was applied before, by the consumer otherwise.
pub(crate) const SELECTOR_LOCK_CLASS: i32 = 0x5347; // "SG"

/// The workspace's selectors on these event names, with the names locked in shared mode.
async fn lock_selectors(
    conn: &mut PgConnection,
    workspace_id: &str,
    names: &[&str],
) -> Result<Vec<StoredSelector>> {
    for name in names {
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1, hashtext($2 || '/' || $3))")
            .bind(SELECTOR_LOCK_CLASS)
            .bind(workspace_id)
            .bind(name)
            .execute(&mut *conn)
            .await?;
    }
    let rows = sqlx::query(
        "SELECT id, status, definition FROM selectors WHERE workspace_id = $1 AND event_name = ANY($2) ORDER BY id",
    )
    .bind(workspace_id)
    .bind(names)
    .fetch_all(conn)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let id: i64 = row.try_get("id")?;
        let definition: serde_json::Value = row.try_get("definition")?;
        match parse::parse_selector_json(&definition) {
            Ok(selector) => out.push(StoredSelector {
                id,
                ready: row.try_get::<String, _>("status")? == "ready",
                selector,
            }),
            Err(error) => {
                tracing::error!(selector = id, %error, "stored selector unreadable, skipped")
            }
        }
    }
    Ok(out)
}

/// Matching events (time, summed value) per (person key, selector id).
pub(crate) type Additions = BTreeMap<(String, i64), Vec<(DateTime<Utc>, f64)>>;

/// Adds matching events to their (person, selector) series, in key order (the lock order).
pub(crate) async fn add_to_aggregates(
    conn: &mut PgConnection,
    workspace_id: &str,
    additions: &Additions,
) -> Result<()> {
    if additions.is_empty() {
        return Ok(());
    }
    let persons: Vec<&str> = additions.keys().map(|(p, _)| p.as_str()).collect();
    let selector_ids: Vec<i64> = additions.keys().map(|(_, s)| *s).collect();
    let rows = sqlx::query(
        "SELECT person, selector_id, days, counts, sums, last_at FROM aggregates \
         WHERE workspace_id = $1 AND person = ANY($2) AND selector_id = ANY($3) \
         ORDER BY person, selector_id FOR UPDATE",
    )
    .bind(workspace_id)
    .bind(&persons)
    .bind(&selector_ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut existing: HashMap<(String, i64), Series> = HashMap::new();
    for row in &rows {
        existing.insert(
            (row.try_get("person")?, row.try_get("selector_id")?),
            series_from_row(row)?,
        );
    }
    let mut updated = Vec::with_capacity(additions.len());
    for (key, events) in additions {
        let mut series = existing.remove(key).unwrap_or_default();
        for (at, value) in events {
            series.add(*at, *value);
        }
        updated.push((key.0.as_str(), key.1, series));
    }
    upsert_series(conn, workspace_id, &updated).await
}

/// Writes many (person, selector, series) rows in one statement. Arrays travel as text
/// literals, since `unnest` would flatten an array of arrays.
pub(crate) async fn upsert_series(
    conn: &mut PgConnection,
    workspace_id: &str,
    rows: &[(&str, i64, Series)],
) -> Result<()> {
    for chunk in rows.chunks(5_000) {
        let mut persons = Vec::with_capacity(chunk.len());
        let mut selectors = Vec::with_capacity(chunk.len());
        let mut days = Vec::with_capacity(chunk.len());
        let mut counts = Vec::with_capacity(chunk.len());
        let mut sums = Vec::with_capacity(chunk.len());
        let mut lasts = Vec::with_capacity(chunk.len());
        for (person, selector, series) in chunk {
            persons.push(*person);
            selectors.push(*selector);
            days.push(array_literal(&series.days));
            counts.push(array_literal(&series.counts));
            sums.push(array_literal(&series.sums));
            lasts.push(series.last_at);
        }
        sqlx::query(
            "INSERT INTO aggregates (workspace_id, selector_id, person, days, counts, sums, last_at) \
             SELECT $1, s, p, d::integer[], c::integer[], m::double precision[], l \
             FROM unnest($2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::timestamptz[]) AS t(p, s, d, c, m, l) \
             ON CONFLICT (workspace_id, person, selector_id) DO UPDATE \
             SET days = excluded.days, counts = excluded.counts, sums = excluded.sums, last_at = excluded.last_at",
        )
        .bind(workspace_id)
        .bind(&persons)
        .bind(&selectors)
        .bind(&days)
        .bind(&counts)
        .bind(&sums)
        .bind(&lasts)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// `{1,2,3}`: a Postgres array literal.
fn array_literal<T: std::fmt::Display>(values: &[T]) -> String {
    let mut text = String::with_capacity(values.len() * 6 + 2);
    text.push('{');
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(&value.to_string());
    }
    text.push('}');
    text
}

pub(crate) async fn write_series(
    conn: &mut PgConnection,
    workspace_id: &str,
    person: &str,
    selector_id: i64,
    series: &Series,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO aggregates (workspace_id, selector_id, person, days, counts, sums, last_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (workspace_id, person, selector_id) DO UPDATE \
         SET days = excluded.days, counts = excluded.counts, sums = excluded.sums, last_at = excluded.last_at",
    )
    .bind(workspace_id)
    .bind(selector_id)
    .bind(person)
    .bind(&series.days)
    .bind(&series.counts)
    .bind(&series.sums)
    .bind(series.last_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// A series from a row with `days, counts, sums, last_at` columns.
pub(crate) fn series_from_row(row: &sqlx::postgres::PgRow) -> sqlx::Result<Series> {
    Ok(Series {
        days: int_array(row, "days")?,
        counts: int_array(row, "counts")?,
        sums: float_array(row, "sums")?,
        last_at: row.try_get("last_at")?,
    })
}

// Batch evaluation reads millions of these arrays: sqlx's generic array decoding (one
// type-checked value per element) was the largest cost in a profile, so the binary wire
// format (header, then length-prefixed big-endian elements) is read directly.

fn int_array(row: &sqlx::postgres::PgRow, column: &str) -> sqlx::Result<Vec<i32>> {
    let decoded = binary_array(row, column, 4, |b| {
        i32::from_be_bytes([b[0], b[1], b[2], b[3]])
    })?;
    match decoded {
        Some(values) => Ok(values),
        None => row.try_get(column),
    }
}

fn float_array(row: &sqlx::postgres::PgRow, column: &str) -> sqlx::Result<Vec<f64>> {
    let decoded = binary_array(row, column, 8, |b| {
        f64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    })?;
    match decoded {
        Some(values) => Ok(values),
        None => row.try_get(column),
    }
}

/// The elements of a one-dimensional binary array without NULLs, each `width` bytes;
/// `None` when the value is in another shape (text format, NULLs), for the generic path.
fn binary_array<T>(
    row: &sqlx::postgres::PgRow,
    column: &str,
    width: usize,
    element: fn(&[u8]) -> T,
) -> sqlx::Result<Option<Vec<T>>> {
    use sqlx::ValueRef as _;
    let value = row.try_get_raw(column)?;
    if value.is_null() || value.format() != sqlx::postgres::PgValueFormat::Binary {
        return Ok(None);
    }
    let Ok(bytes) = value.as_bytes() else {
        return Ok(None);
    };
    let word = |at: usize| -> Option<i32> {
        bytes
            .get(at..at + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let (Some(dimensions), Some(has_nulls)) = (word(0), word(4)) else {
        return Ok(None);
    };
    if dimensions == 0 {
        return Ok(Some(Vec::new()));
    }
    if dimensions != 1 || has_nulls != 0 {
        return Ok(None);
    }
    let Some(length) = word(12).and_then(|n| usize::try_from(n).ok()) else {
        return Ok(None);
    };
    let Some(body) = bytes.get(20..) else {
        return Ok(None);
    };
    if body.len() != length * (4 + width) {
        return Ok(None);
    }
    let mut values = Vec::with_capacity(length);
    for chunk in body.chunks_exact(4 + width) {
        values.push(element(&chunk[4..]));
    }
    Ok(Some(values))
}

pub(crate) fn change_message(
    workspace_id: &str,
    version: &LiveVersion,
    person: &str,
    entered: bool,
    reason_at: DateTime<Utc>,
    cause: Cause,
    now: DateTime<Utc>,
) -> SegmentChanged {
    let (customer_id, anonymous_id) = match Person::from_key(person) {
        Some(Person::Customer(id)) => (Some(id), None),
        Some(Person::Visitor(id)) => (None, Some(id)),
        None => (None, None),
    };
    SegmentChanged {
        id: uuid::Uuid::now_v7().to_string(),
        workspace_id: workspace_id.to_owned(),
        segment: version.compiled.name().to_owned(),
        version: version.version as u32,
        entered,
        customer_id,
        anonymous_id,
        reason_at,
        cause: cause.as_str().to_owned(),
        at: now,
    }
}

/// Writes the announcements to the outbox in one statement.
/// `traces` holds each message's trace context (its `traceparent`), index for index.
pub(crate) async fn enqueue_changes(
    conn: &mut PgConnection,
    messages: &[SegmentChanged],
    traces: &[Option<String>],
) -> Result<()> {
    if messages.is_empty() {
        return Ok(());
    }
    let mut keys = Vec::with_capacity(messages.len());
    let mut ids = Vec::with_capacity(messages.len());
    let mut payloads = Vec::with_capacity(messages.len());
    for message in messages {
        keys.push(if message.entered {
            SEGMENT_ENTERED
        } else {
            SEGMENT_EXITED
        });
        ids.push(message.id.clone());
        payloads.push(serde_json::to_value(message).unwrap_or(serde_json::Value::Null));
    }
    sqlx::query(
        "INSERT INTO outbox (exchange, routing_key, message_id, payload, traceparent) \
         SELECT $1, k, i, p, tp FROM unnest($2::text[], $3::text[], $4::jsonb[], $5::text[]) AS t(k, i, p, tp)",
    )
    .bind(EVENTS_EXCHANGE)
    .bind(&keys)
    .bind(&ids)
    .bind(&payloads)
    .bind(traces)
    .execute(conn)
    .await?;
    Ok(())
}
