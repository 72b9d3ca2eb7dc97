//! Batch work: backfilling a new selector from the event log, computing a new version's
//! membership for everyone, the atomic switch from the old version to the new one, and
//! previews of definitions that are not applied.
//!
//! Batch evaluation runs the same Rust evaluator as real time over pages of customers
//! (their attributes, traits and daily aggregates read in person order), so a segment
//! means exactly one thing whichever path computed it. BENCHMARKS.md has its speed.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use futures::TryStreamExt as _;
use rand::{Rng as _, SeedableRng as _};
use relance_kit::bus::EVENTS_EXCHANGE;
use relance_kit::messages::{SEGMENT_ENTERED, SEGMENT_EXITED};
use sqlx::{PgConnection, Row as _};

use super::realtime::{SELECTOR_LOCK_CLASS, series_from_row, upsert_series};
use super::{Member, Result, SegmentStore};
use crate::domain::eval::{self, Facts, Series};
use crate::domain::{Compiled, Condition, EventSelector, Person, aggregate, parse};

/// Customers evaluated per page.
const PAGE: i64 = 5_000;
/// Advisory lock class of a segment's build (one builder per segment across replicas).
const BUILD_LOCK_CLASS: i32 = 0x5342; // "SB"

/// The outcome of evaluating a whole population.
#[derive(Debug, Default)]
pub struct PopulationResult {
    pub population: u64,
    pub members: u64,
    pub sample: Vec<Member>,
}

/// What a finished build did.
#[derive(Debug, Clone)]
pub struct Built {
    pub workspace_id: String,
    pub segment_id: i64,
    pub version: i32,
    pub members: i64,
    pub population: u64,
    pub seconds: f64,
    /// Of which: evaluating everyone and writing the members.
    pub evaluate_secs: f64,
    /// Of which: the switch (re-checking who changed meanwhile, announcing, switching).
    pub switch_secs: f64,
}

impl SegmentStore {
    /// Computes a new selector's aggregates from the events the consumer has already
    /// applied, then hands it to the consumer, all under the exclusive lock of its event
    /// name: no event is counted twice or missed.
    pub async fn backfill_selector(
        &self,
        workspace_id: &str,
        id: i64,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT event_name, definition FROM selectors WHERE workspace_id = $1 AND id = $2 AND status = 'backfilling' FOR UPDATE",
        )
        .bind(workspace_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(false) };
        let event_name: String = row.try_get("event_name")?;
        let definition: serde_json::Value = row.try_get("definition")?;
        let selector = parse::parse_selector_json(&definition).map_err(|reason| {
            crate::domain::SegmentError::InvalidField {
                field: "selector".into(),
                reason,
            }
        })?;
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2 || '/' || $3))")
            .bind(SELECTOR_LOCK_CLASS)
            .bind(workspace_id)
            .bind(&event_name)
            .execute(&mut *tx)
            .await?;
        let series = history_series(&mut tx, workspace_id, &selector, now, true).await?;
        let persons = series.len();
        write_many(&mut tx, workspace_id, id, series, now).await?;
        sqlx::query("UPDATE selectors SET status = 'ready' WHERE workspace_id = $1 AND id = $2")
            .bind(workspace_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(workspace = %workspace_id, selector = id, event = %event_name, persons, seconds = started.elapsed().as_secs_f64(), "selector backfilled");
        Ok(true)
    }

    /// Builds every version waiting for its membership that no other replica is building.
    pub async fn build_pending(&self, now: impl Fn() -> DateTime<Utc>) -> Result<Vec<Built>> {
        let rows = sqlx::query(
            "SELECT id, workspace_id, building_version FROM segments WHERE building_version IS NOT NULL ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut built = Vec::new();
        for row in rows {
            let segment_id: i64 = row.try_get("id")?;
            let workspace_id: String = row.try_get("workspace_id")?;
            let version: i32 = row.try_get("building_version")?;
            let mut lock = self.pool.acquire().await?;
            let mine: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(BUILD_LOCK_CLASS)
                .bind(segment_id as i32)
                .fetch_one(&mut *lock)
                .await?;
            if !mine {
                continue;
            }
            let outcome = self.build(&workspace_id, segment_id, version, &now).await;
            let _ = sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                .bind(BUILD_LOCK_CLASS)
                .bind(segment_id as i32)
                .execute(&mut *lock)
                .await;
            if let Some(done) = outcome? {
                built.push(done);
            }
        }
        Ok(built)
    }

    /// Computes `version`'s membership beside the answering one, then switches.
    /// `None` when the build had to wait (a dependency not built yet, or superseded).
    async fn build(
        &self,
        workspace_id: &str,
        segment_id: i64,
        version: i32,
        now: &impl Fn() -> DateTime<Utc>,
    ) -> Result<Option<Built>> {
        let started = std::time::Instant::now();
        let mut conn = self.pool.acquire().await?;
        let compiled = self.compiled(&mut conn, segment_id, version).await?;
        for selector in &compiled.selectors {
            self.backfill_selector(workspace_id, aggregate::selector_id(selector), now())
                .await?;
        }
        let Some(dependencies) = self
            .dependency_members(&mut conn, workspace_id, &compiled)
            .await?
        else {
            tracing::debug!(segment = %compiled.name(), "waiting for the segments it refers to");
            return Ok(None);
        };
        let build_started_at = now();
        let old_version: i32 = sqlx::query_scalar(
            "UPDATE segments SET build_started_at = $2 WHERE id = $1 AND building_version = $3 RETURNING answering_version",
        )
        .bind(segment_id)
        .bind(build_started_at)
        .bind(version)
        .fetch_optional(&mut *conn)
        .await?
        .unwrap_or(-1);
        if old_version < 0 {
            return Ok(None);
        }
        // Leftovers of a build that crashed half-way.
        sqlx::query("DELETE FROM memberships WHERE segment_id = $1 AND version = $2")
            .bind(segment_id)
            .bind(version)
            .execute(&mut *conn)
            .await?;
        drop(conn);
        // Members and next boundaries are written page by page, beside the reads. A customer
        // the sweeper wakes before the switch (with only the old versions live) has been
        // touched, so the switch re-decides them and writes their boundary again.
        let population = self
            .evaluate_all(
                workspace_id,
                &compiled,
                &dependencies,
                &HashMap::new(),
                build_started_at,
                |conn, verdicts| {
                    let mut members = Vec::new();
                    let mut wakes = Vec::new();
                    for verdict in verdicts {
                        if let Some(at) = verdict.wake {
                            wakes.push((verdict.person.clone(), at));
                        }
                        if verdict.member {
                            members.push(verdict.person);
                        }
                    }
                    let workspace = workspace_id.to_owned();
                    Box::pin(async move {
                        insert_members(
                            &mut *conn,
                            segment_id,
                            version,
                            old_version,
                            &members,
                            build_started_at,
                        )
                        .await?;
                        write_wakes(conn, &workspace, &wakes).await
                    })
                },
            )
            .await?;
        let evaluate_secs = started.elapsed().as_secs_f64();
        let switch_started = std::time::Instant::now();
        let switched = self
            .switch(
                workspace_id,
                segment_id,
                version,
                old_version,
                &compiled,
                &dependencies,
                build_started_at,
                now(),
            )
            .await?;
        let Some(members) = switched else {
            return Ok(None);
        };
        let switch_secs = switch_started.elapsed().as_secs_f64();
        self.after_switch(workspace_id, segment_id, version, old_version)
            .await?;
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(workspace = %workspace_id, segment = %compiled.name(), version, members, population, seconds, "segment version built and switched");
        metrics::histogram!("relance_segments_build_seconds").record(seconds);
        Ok(Some(Built {
            workspace_id: workspace_id.to_owned(),
            segment_id,
            version,
            members,
            population,
            seconds,
            evaluate_secs,
            switch_secs,
        }))
    }

    /// Members of the segments a definition refers to (their answering versions); `None`
    /// while one of them has no answering version yet.
    async fn dependency_members(
        &self,
        conn: &mut PgConnection,
        workspace_id: &str,
        compiled: &Compiled,
    ) -> Result<Option<HashMap<String, HashSet<String>>>> {
        let mut out = HashMap::new();
        for name in &compiled.depends_on {
            let row = sqlx::query(
                "SELECT id, answering_version FROM segments WHERE workspace_id = $1 AND name = $2 AND status <> 'archived'",
            )
            .bind(workspace_id)
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?;
            let Some(row) = row else { return Ok(None) };
            let version: i32 = row.try_get("answering_version")?;
            if version == 0 {
                return Ok(None);
            }
            let members: Vec<String> = sqlx::query_scalar(
                "SELECT person FROM memberships WHERE segment_id = $1 AND version = $2",
            )
            .bind(row.try_get::<i64, _>("id")?)
            .bind(version)
            .fetch_all(&mut *conn)
            .await?;
            out.insert(name.clone(), members.into_iter().collect());
        }
        Ok(Some(out))
    }

    /// Evaluates a definition for one page of customers; `None` when it is empty.
    /// `overrides` replaces stored aggregates for selectors that have none yet (previews).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn evaluate_page(
        &self,
        conn: &mut PgConnection,
        workspace_id: &str,
        compiled: &Compiled,
        dependencies: &HashMap<String, HashSet<String>>,
        overrides: &HashMap<i64, HashMap<String, Series>>,
        now: DateTime<Utc>,
        selection: Selection<'_>,
    ) -> Result<Option<Vec<Verdict>>> {
        let page = fetch_page(conn, workspace_id, compiled, overrides, &selection).await?;
        let Some(page) = page else { return Ok(None) };
        Ok(Some(judge_page(compiled, dependencies, page, now)))
    }

    /// Evaluates everyone, in two lanes over halves of the person key space (so Postgres
    /// serves two reads at once), each lane reading its next page while this page is judged
    /// and written. `on_page` gets each page's verdicts and may write with the connection
    /// it is given; it is called from both lanes.
    pub(crate) async fn evaluate_all<F>(
        &self,
        workspace_id: &str,
        compiled: &Compiled,
        dependencies: &HashMap<String, HashSet<String>>,
        overrides: &HashMap<i64, HashMap<String, Series>>,
        now: DateTime<Utc>,
        on_page: F,
    ) -> Result<u64>
    where
        F: for<'c> Fn(
                &'c mut PgConnection,
                Vec<Verdict>,
            ) -> futures::future::BoxFuture<'c, Result<()>>
            + Sync,
    {
        let population: i64 =
            sqlx::query_scalar("SELECT count(*) FROM people WHERE workspace_id = $1")
                .bind(workspace_id)
                .fetch_one(&self.pool)
                .await?;
        let middle: Option<String> = if population >= PAGE {
            sqlx::query_scalar("SELECT person FROM people WHERE workspace_id = $1 ORDER BY person OFFSET $2 LIMIT 1")
                .bind(workspace_id)
                .bind(population / 2)
                .fetch_optional(&self.pool)
                .await?
        } else {
            None
        };
        let lane = |from: String, until: Option<String>| {
            let on_page = &on_page;
            async move {
                let mut reader = self.pool.acquire().await?;
                let mut writer = self.pool.acquire().await?;
                let mut evaluated = 0u64;
                let mut after = from;
                let mut next = fetch_page(
                    &mut reader,
                    workspace_id,
                    compiled,
                    overrides,
                    &Selection::Range(&after, until.as_deref()),
                )
                .await?;
                while let Some(page) = next.take() {
                    after.clone_from(&page.last);
                    evaluated += page.people.len() as u64;
                    let verdicts = judge_page(compiled, dependencies, page, now);
                    let selection = Selection::Range(&after, until.as_deref());
                    let (fetched, written) = futures::join!(
                        fetch_page(&mut reader, workspace_id, compiled, overrides, &selection),
                        on_page(&mut writer, verdicts)
                    );
                    written?;
                    next = fetched?;
                }
                Ok::<u64, crate::domain::SegmentError>(evaluated)
            }
        };
        match middle {
            Some(middle) => {
                let (first, second) = futures::join!(
                    lane(String::new(), Some(middle.clone())),
                    lane(middle, None)
                );
                Ok(first? + second?)
            }
            None => lane(String::new(), None).await,
        }
    }

    /// The switch: re-evaluates the customers touched while the build ran, announces the
    /// difference from the previous version, and makes the new version answer — one
    /// transaction, so no read ever sees a half-built membership. `None` when a newer
    /// version superseded this one meanwhile.
    #[allow(clippy::too_many_arguments)]
    async fn switch(
        &self,
        workspace_id: &str,
        segment_id: i64,
        version: i32,
        old_version: i32,
        compiled: &Compiled,
        dependencies: &HashMap<String, HashSet<String>>,
        build_started_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Option<i64>> {
        let mut tx = self.pool.begin().await?;
        // Exclusive: waits for real-time transactions evaluating the old version, and holds
        // new ones until the switch is done.
        let building: Option<Option<i32>> =
            sqlx::query_scalar("SELECT building_version FROM segments WHERE id = $1 FOR UPDATE")
                .bind(segment_id)
                .fetch_optional(&mut *tx)
                .await?;
        if building.flatten() != Some(version) {
            return Ok(None);
        }
        let touched: Vec<String> = sqlx::query_scalar(
            "SELECT person FROM people WHERE workspace_id = $1 AND touched_at >= $2 ORDER BY person",
        )
        .bind(workspace_id)
        .bind(build_started_at)
        .fetch_all(&mut *tx)
        .await?;
        let mut late_wakes: Vec<(String, DateTime<Utc>)> = Vec::new();
        for chunk in touched.chunks(PAGE as usize) {
            let page = self
                .evaluate_page(
                    &mut tx,
                    workspace_id,
                    compiled,
                    dependencies,
                    &HashMap::new(),
                    now,
                    Selection::Persons(chunk),
                )
                .await?
                .unwrap_or_default();
            let mut members = Vec::new();
            let mut others = Vec::new();
            for verdict in page {
                if let Some(at) = verdict.wake {
                    late_wakes.push((verdict.person.clone(), at));
                }
                if verdict.member {
                    members.push(verdict.person);
                } else {
                    others.push(verdict.person);
                }
            }
            insert_members(&mut tx, segment_id, version, old_version, &members, now).await?;
            sqlx::query("DELETE FROM memberships WHERE segment_id = $1 AND version = $2 AND person = ANY($3)")
                .bind(segment_id)
                .bind(version)
                .bind(&others)
                .execute(&mut *tx)
                .await?;
        }
        // Customers' next boundaries now include this version's windows.
        write_wakes(&mut tx, workspace_id, &late_wakes).await?;
        if old_version > 0 {
            announce_difference(
                &mut tx,
                workspace_id,
                compiled.name(),
                segment_id,
                old_version,
                version,
                now,
            )
            .await?;
        }
        let members: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM memberships WHERE segment_id = $1 AND version = $2",
        )
        .bind(segment_id)
        .bind(version)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE segments SET answering_version = $2, building_version = NULL, build_started_at = NULL, \
             status = 'active', ready_at = $3, member_count = $4 WHERE id = $1",
        )
        .bind(segment_id)
        .bind(version)
        .bind(now)
        .bind(members)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE segment_versions SET ready_at = $3 WHERE segment_id = $1 AND version = $2",
        )
        .bind(segment_id)
        .bind(version)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.outbox_wake.notify_one();
        Ok(Some(members))
    }

    /// After a switch: the mirror gets the new version, the old version's rows go.
    async fn after_switch(
        &self,
        workspace_id: &str,
        segment_id: i64,
        version: i32,
        old_version: i32,
    ) -> Result<()> {
        self.reload_mirror(workspace_id, segment_id, version)
            .await?;
        if old_version > 0 {
            self.mirror
                .forget(workspace_id, segment_id, old_version)
                .await;
            sqlx::query("DELETE FROM memberships WHERE segment_id = $1 AND version = $2")
                .bind(segment_id)
                .bind(old_version)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Loads a version's members into Redis.
    pub async fn reload_mirror(
        &self,
        workspace_id: &str,
        segment_id: i64,
        version: i32,
    ) -> Result<()> {
        let rows = sqlx::query(
            "SELECT person, entered_at FROM memberships WHERE segment_id = $1 AND version = $2",
        )
        .bind(segment_id)
        .bind(version)
        .fetch_all(&self.pool)
        .await?;
        let mut members = Vec::with_capacity(rows.len());
        for row in rows {
            members.push((
                row.try_get::<String, _>("person")?,
                row.try_get::<DateTime<Utc>, _>("entered_at")?,
            ));
        }
        if let Err(error) = self
            .mirror
            .load(workspace_id, segment_id, version, &members)
            .await
        {
            tracing::warn!(%error, segment = segment_id, "membership mirror not loaded, reads fall back to postgres");
        }
        Ok(())
    }

    /// Reloads the mirror of every answering version (after a start, and periodically).
    pub async fn reload_all_mirrors(&self) -> Result<usize> {
        let rows = sqlx::query(
            "SELECT workspace_id, id, answering_version FROM segments WHERE status <> 'archived' AND answering_version > 0",
        )
        .fetch_all(&self.pool)
        .await?;
        for row in &rows {
            self.reload_mirror(
                &row.try_get::<String, _>("workspace_id")?,
                row.try_get("id")?,
                row.try_get("answering_version")?,
            )
            .await?;
        }
        Ok(rows.len())
    }

    /// Size and a random sample of a definition that is not applied. Selectors without
    /// stored aggregates are computed from the event log in memory; nothing is written.
    pub async fn preview(
        &self,
        workspace_id: &str,
        compiled: &Compiled,
        sample_size: usize,
        now: DateTime<Utc>,
    ) -> Result<PopulationResult> {
        let mut conn = self.pool.acquire().await?;
        let mut overrides = HashMap::new();
        for selector in &compiled.selectors {
            let id = aggregate::selector_id(selector);
            let ready: Option<String> = sqlx::query_scalar(
                "SELECT status FROM selectors WHERE workspace_id = $1 AND id = $2",
            )
            .bind(workspace_id)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
            if ready.as_deref() != Some("ready") {
                overrides.insert(
                    id,
                    history_series(&mut conn, workspace_id, selector, now, false).await?,
                );
            }
        }
        let Some(dependencies) = self
            .dependency_members(&mut conn, workspace_id, compiled)
            .await?
        else {
            return Err(crate::domain::SegmentError::InvalidField {
                field: "yaml".into(),
                reason: "a segment it refers to is still being built; try again in a moment".into(),
            });
        };
        drop(conn);
        let mut result = PopulationResult::default();
        // Reservoir sampling (every member has the same chance to be shown), shared by
        // both evaluation lanes.
        struct Reservoir {
            seen: u64,
            rng: rand::rngs::StdRng,
            sample: Vec<String>,
        }
        let reservoir = std::sync::Mutex::new(Reservoir {
            seen: 0,
            rng: rand::rngs::StdRng::from_os_rng(),
            sample: Vec::with_capacity(sample_size),
        });
        result.population = self
            .evaluate_all(
                workspace_id,
                compiled,
                &dependencies,
                &overrides,
                now,
                |_conn, verdicts| {
                    if let Ok(mut reservoir) = reservoir.lock() {
                        for verdict in verdicts {
                            if !verdict.member {
                                continue;
                            }
                            reservoir.seen += 1;
                            if reservoir.sample.len() < sample_size {
                                reservoir.sample.push(verdict.person);
                            } else {
                                let seen = reservoir.seen;
                                let slot = reservoir.rng.random_range(0..seen) as usize;
                                if slot < sample_size {
                                    reservoir.sample[slot] = verdict.person;
                                }
                            }
                        }
                    }
                    Box::pin(async { Ok(()) })
                },
            )
            .await?;
        let Reservoir {
            seen: seen_members,
            mut sample,
            ..
        } = reservoir
            .into_inner()
            .map_err(|_| crate::domain::SegmentError::InvalidField {
                field: "sample".into(),
                reason: "sampling failed".into(),
            })?;
        result.members = seen_members;
        sample.sort();
        for key in sample {
            if let Some(person) = Person::from_key(&key) {
                result.sample.push(Member {
                    person,
                    entered_at: now,
                });
            }
        }
        Ok(result)
    }
}

/// One page of customers as read from Postgres: their profile (only the top-level keys
/// the condition reads) and their series.
pub(crate) struct PageData {
    people: Vec<(String, serde_json::Value, serde_json::Value)>,
    /// Aligned with `people`.
    series: Vec<HashMap<i64, Series>>,
    last: String,
}

/// The SQL expression of the parts of a profile column a condition reads: only those
/// top-level keys travel and are decoded.
fn projection(column: &str, keys: &[String]) -> String {
    if keys.is_empty() {
        return "'{}'::jsonb".to_owned();
    }
    let mut parts = Vec::with_capacity(keys.len());
    for key in keys {
        let quoted = key.replace('\'', "''");
        parts.push(format!("'{quoted}', {column}->'{quoted}'"));
    }
    format!(
        "jsonb_strip_nulls(jsonb_build_object({}))",
        parts.join(", ")
    )
}

/// Top-level keys of attributes and of traits a condition reads.
fn profile_keys(condition: &Condition) -> (Vec<String>, Vec<String>) {
    let mut attributes = Vec::new();
    let mut traits = Vec::new();
    let mut stack = vec![condition];
    while let Some(node) = stack.pop() {
        match node {
            Condition::All(children) | Condition::Any(children) => stack.extend(children.iter()),
            Condition::Not(child) => stack.push(child),
            Condition::Attribute(a) => {
                let target = match a.source {
                    crate::domain::model::Source::Attribute => &mut attributes,
                    crate::domain::model::Source::Trait => &mut traits,
                };
                if let Some(first) = a.path.first()
                    && !target.contains(first)
                {
                    target.push(first.clone());
                }
            }
            Condition::Event(_) | Condition::InSegment(_) => {}
        }
    }
    (attributes, traits)
}

async fn fetch_page(
    conn: &mut PgConnection,
    workspace_id: &str,
    compiled: &Compiled,
    overrides: &HashMap<i64, HashMap<String, Series>>,
    selection: &Selection<'_>,
) -> Result<Option<PageData>> {
    let (attribute_keys, trait_keys) = profile_keys(&compiled.definition.condition);
    let columns = format!(
        "person, {} AS attributes, {} AS traits",
        projection("attributes", &attribute_keys),
        projection("traits", &trait_keys)
    );
    let rows = match selection {
        Selection::Range(after, until) => {
            sqlx::query(&format!(
                "SELECT {columns} FROM people WHERE workspace_id = $1 AND person > $2 \
                 AND ($4::text IS NULL OR person <= $4) ORDER BY person LIMIT $3"
            ))
            .bind(workspace_id)
            .bind(*after)
            .bind(PAGE)
            .bind(*until)
            .fetch_all(&mut *conn)
            .await?
        }
        Selection::Persons(persons) => {
            sqlx::query(&format!(
                "SELECT {columns} FROM people WHERE workspace_id = $1 AND person = ANY($2) ORDER BY person"
            ))
            .bind(workspace_id)
            .bind(*persons)
            .fetch_all(&mut *conn)
            .await?
        }
    };
    let mut people: Vec<(String, serde_json::Value, serde_json::Value)> =
        Vec::with_capacity(rows.len());
    for row in &rows {
        people.push((
            row.try_get("person")?,
            row.try_get("attributes")?,
            row.try_get("traits")?,
        ));
    }
    drop(rows);
    let (Some(first), Some(last)) = (people.first(), people.last()) else {
        return Ok(None);
    };
    let first = first.0.clone();
    let last = last.0.clone();
    let stored_ids: Vec<i64> = compiled
        .selectors
        .iter()
        .map(aggregate::selector_id)
        .filter(|id| !overrides.contains_key(id))
        .collect();
    let mut series: Vec<HashMap<i64, Series>> = Vec::with_capacity(people.len());
    series.resize_with(people.len(), HashMap::new);
    if !stored_ids.is_empty() {
        // A page is a key range (one index range scan); an explicit list is looked up.
        // Rows come in person order, so they are matched to the page by a merge.
        let query = match selection {
            Selection::Range(..) => sqlx::query(
                "SELECT person, selector_id, days, counts, sums, last_at FROM aggregates \
                 WHERE workspace_id = $1 AND person >= $2 AND person <= $3 AND selector_id = ANY($4) \
                 ORDER BY person",
            )
            .bind(workspace_id)
            .bind(&first)
            .bind(&last)
            .bind(&stored_ids),
            Selection::Persons(persons) => sqlx::query(
                "SELECT person, selector_id, days, counts, sums, last_at FROM aggregates \
                 WHERE workspace_id = $1 AND person = ANY($2) AND selector_id = ANY($3) ORDER BY person",
            )
            .bind(workspace_id)
            .bind(*persons)
            .bind(&stored_ids),
        };
        let mut index = 0;
        for row in query.fetch_all(&mut *conn).await? {
            let person: &str = row.try_get("person")?;
            while index < people.len() && people[index].0.as_str() < person {
                index += 1;
            }
            if index < people.len() && people[index].0 == person {
                series[index].insert(row.try_get("selector_id")?, series_from_row(&row)?);
            }
        }
    }
    for (id, by_person) in overrides {
        for (index, (person, _, _)) in people.iter().enumerate() {
            if let Some(found) = by_person.get(person) {
                series[index].insert(*id, found.clone());
            }
        }
    }
    Ok(Some(PageData {
        people,
        series,
        last,
    }))
}

/// Evaluates a page (CPU only).
fn judge_page(
    compiled: &Compiled,
    dependencies: &HashMap<String, HashSet<String>>,
    page: PageData,
    now: DateTime<Utc>,
) -> Vec<Verdict> {
    let mut verdicts = Vec::with_capacity(page.people.len());
    let mut memberships: HashMap<String, bool> = HashMap::new();
    let condition = &compiled.definition.condition;
    for ((person, attributes, traits), series) in page.people.into_iter().zip(page.series) {
        memberships.clear();
        for (name, members) in dependencies {
            memberships.insert(name.clone(), members.contains(&person));
        }
        let facts = Facts {
            attributes: &attributes,
            traits: &traits,
            series: &series,
            memberships: &memberships,
        };
        let member = eval::holds(condition, &facts, now);
        let wake = if compiled.time_dependent {
            eval::next_change(condition, &facts, now)
        } else {
            None
        };
        verdicts.push(Verdict {
            person,
            member,
            wake,
        });
    }
    verdicts
}

/// Which customers a batch page evaluates.
#[derive(Debug)]
pub(crate) enum Selection<'a> {
    /// The next page after the first key, up to and including the second.
    Range(&'a str, Option<&'a str>),
    /// Exactly these (at most a page).
    Persons(&'a [String]),
}

/// One customer's answer in a batch evaluation.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub person: String,
    pub member: bool,
    pub wake: Option<DateTime<Utc>>,
}

async fn insert_members(
    conn: &mut PgConnection,
    segment_id: i64,
    version: i32,
    old_version: i32,
    members: &[String],
    now: DateTime<Utc>,
) -> Result<()> {
    if members.is_empty() {
        return Ok(());
    }
    // A customer who was a member of the previous version keeps their entry time. A
    // correlated lookup, not a join: with the statistics of a table being rewritten the
    // planner would hash the whole previous version for every page.
    sqlx::query(
        "INSERT INTO memberships (segment_id, version, person, entered_at) \
         SELECT $1, $2, p, COALESCE((SELECT o.entered_at FROM memberships o \
                                     WHERE o.segment_id = $1 AND o.version = $4 AND o.person = t.p), $5) \
         FROM unnest($3::text[]) AS t(p) \
         ON CONFLICT DO NOTHING",
    )
    .bind(segment_id)
    .bind(version)
    .bind(members)
    .bind(old_version)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Brings customers' next boundaries forward to include a version's windows.
async fn write_wakes(
    conn: &mut PgConnection,
    workspace_id: &str,
    wakes: &[(String, DateTime<Utc>)],
) -> Result<()> {
    for chunk in wakes.chunks(10_000) {
        let persons: Vec<&str> = chunk.iter().map(|(p, _)| p.as_str()).collect();
        let times: Vec<DateTime<Utc>> = chunk.iter().map(|(_, t)| *t).collect();
        sqlx::query(
            "UPDATE people SET wake_at = t.w \
             FROM unnest($2::text[], $3::timestamptz[]) AS t(p, w) WHERE people.workspace_id = $1 AND people.person = t.p \
             AND (people.wake_at IS NULL OR people.wake_at > t.w)",
        )
        .bind(workspace_id)
        .bind(&persons)
        .bind(&times)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Announces who entered and who left because the definition changed.
async fn announce_difference(
    conn: &mut PgConnection,
    workspace_id: &str,
    name: &str,
    segment_id: i64,
    old_version: i32,
    version: i32,
    now: DateTime<Utc>,
) -> Result<()> {
    // Members of `have` missing from `lack`: entries (new vs old), then exits (old vs new).
    // EXCEPT (a hash set operation) rather than NOT EXISTS: the new version's rows were
    // written moments ago, and with stale statistics the planner picks a quadratic plan.
    for (entered, have, lack) in [(true, version, old_version), (false, old_version, version)] {
        sqlx::query(
            "INSERT INTO outbox (exchange, routing_key, message_id, payload) \
             SELECT $1, $2, id, jsonb_build_object('id', id, 'workspace_id', $3::text, 'segment', $4::text, 'version', $5::int, \
               'entered', $6::boolean, \
               'customer_id', CASE WHEN left(person, 2) = 'c:' THEN substr(person, 3) END, \
               'anonymous_id', CASE WHEN left(person, 2) = 'v:' THEN substr(person, 3) END, \
               'reason_at', $9::timestamptz, 'cause', 'definition', 'at', $9::timestamptz) \
             FROM (SELECT gen_random_uuid()::text AS id, person FROM \
                   (SELECT person FROM memberships WHERE segment_id = $7 AND version = $8 \
                    EXCEPT SELECT person FROM memberships WHERE segment_id = $7 AND version = $10) AS diff) d",
        )
        .bind(EVENTS_EXCHANGE)
        .bind(if entered { SEGMENT_ENTERED } else { SEGMENT_EXITED })
        .bind(workspace_id)
        .bind(name)
        .bind(version)
        .bind(entered)
        .bind(segment_id)
        .bind(have)
        .bind(now)
        .bind(lack)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// A selector's series for everyone, computed from the event log. With `seen_only`, only
/// events the consumer has applied count (the backfill's exactness rule).
async fn history_series(
    conn: &mut PgConnection,
    workspace_id: &str,
    selector: &EventSelector,
    now: DateTime<Utc>,
    seen_only: bool,
) -> Result<HashMap<String, Series>> {
    let mut out: HashMap<String, Series> = HashMap::new();
    let log_exists: bool = sqlx::query_scalar("SELECT to_regclass('events.events') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if !log_exists {
        tracing::warn!(
            "no event log in this database (events schema missing): selectors start empty"
        );
        return Ok(out);
    }
    let sql = if seen_only {
        "SELECT e.customer_id, e.anonymous_id, e.ts, e.properties FROM events.events e          JOIN seen_events s ON s.workspace_id = e.workspace_id AND s.message_id = e.message_id          WHERE e.workspace_id = $1 AND e.name = $2"
    } else {
        "SELECT e.customer_id, e.anonymous_id, e.ts, e.properties FROM events.events e          WHERE e.workspace_id = $1 AND e.name = $2"
    };
    let mut rows = sqlx::query(sql)
        .bind(workspace_id)
        .bind(&selector.name)
        .fetch(&mut *conn);
    while let Some(row) = rows.try_next().await? {
        let customer: Option<String> = row.try_get("customer_id")?;
        let anonymous: Option<String> = row.try_get("anonymous_id")?;
        let Some(person) = Person::of(customer.as_deref(), anonymous.as_deref()) else {
            continue;
        };
        let properties: serde_json::Value = row.try_get("properties")?;
        if let Some(value) = aggregate::contribution(selector, &selector.name, &properties, now) {
            out.entry(person.key())
                .or_default()
                .add(row.try_get("ts")?, value);
        }
    }
    Ok(out)
}

/// Writes many series of one selector at once, and makes sure their people exist.
async fn write_many(
    conn: &mut PgConnection,
    workspace_id: &str,
    selector_id: i64,
    series: HashMap<String, Series>,
    now: DateTime<Utc>,
) -> Result<()> {
    let mut ordered: Vec<(String, Series)> = series.into_iter().collect();
    ordered.sort_by(|a, b| a.0.cmp(&b.0));
    for chunk in ordered.chunks(5_000) {
        let rows: Vec<(&str, i64, Series)> = chunk
            .iter()
            .map(|(person, s)| (person.as_str(), selector_id, s.clone()))
            .collect();
        upsert_series(&mut *conn, workspace_id, &rows).await?;
        let persons: Vec<&str> = chunk.iter().map(|(p, _)| p.as_str()).collect();
        sqlx::query(
            "INSERT INTO people (workspace_id, person, touched_at) SELECT $1, p, $3 FROM unnest($2::text[]) AS t(p) ON CONFLICT DO NOTHING",
        )
        .bind(workspace_id)
        .bind(&persons)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
