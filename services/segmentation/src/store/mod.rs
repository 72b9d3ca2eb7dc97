//! Postgres and Redis for segmentation.
//!
//! - this module: segment definitions and versions, reads of membership;
//! - [`realtime`]: events and profile changes → aggregates → re-evaluation, the sweeper;
//! - [`batch`]: backfilling a new selector, building a version's membership, the switch,
//!   previews;
//! - [`mirror`]: the Redis copy of membership that answers `IsMember`.

pub mod batch;
pub mod mirror;
pub mod realtime;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use relance_kit::yaml::Problem;
use sqlx::{PgConnection, PgPool, Row as _};
use tokio::sync::Notify;

use crate::domain::{Compiled, Person, SegmentError, aggregate, eval, parse};

type Result<T> = std::result::Result<T, SegmentError>;

/// A segment's row, as reads return it.
#[derive(Debug, Clone)]
pub struct SegmentRecord {
    pub id: i64,
    pub name: String,
    pub status: String,
    pub version: i32,
    pub latest_version: i32,
    pub answering_version: i32,
    pub description: String,
    pub yaml: String,
    pub event_names: Vec<String>,
    pub depends_on: Vec<String>,
    pub time_dependent: bool,
    pub member_count: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub ready_at: Option<DateTime<Utc>>,
    pub archived_at: Option<DateTime<Utc>>,
}

/// What Apply did.
#[derive(Debug, Clone)]
pub struct Applied {
    pub name: String,
    pub version: i32,
    pub changed: bool,
    pub status: String,
}

/// One member.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub person: Person,
    pub entered_at: DateTime<Utc>,
}

/// A segment version ready to evaluate.
#[derive(Debug, Clone)]
pub struct LiveVersion {
    pub segment_id: i64,
    pub version: i32,
    pub compiled: Arc<Compiled>,
}

/// Compiled definitions by (segment id, version).
type CompiledCache = HashMap<(i64, i32), Arc<Compiled>>;

/// Segmentation's tables and its Redis mirror.
#[derive(Debug, Clone)]
pub struct SegmentStore {
    pub(crate) pool: PgPool,
    pub(crate) outbox_wake: Arc<Notify>,
    /// Wakes the builder after an Apply.
    pub(crate) build_wake: Arc<Notify>,
    pub(crate) mirror: mirror::Mirror,
    /// Parsed definitions by (segment id, version): versions never change once written.
    compiled: Arc<Mutex<CompiledCache>>,
}

impl SegmentStore {
    pub fn new(pool: PgPool, mirror: mirror::Mirror, outbox_wake: Arc<Notify>) -> SegmentStore {
        SegmentStore {
            pool,
            outbox_wake,
            build_wake: Arc::new(Notify::new()),
            mirror,
            compiled: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Validates a document against the language and the workspace's other segments
    /// (in_segment targets exist, no cycle); returns the compiled definition or every problem.
    pub async fn check(&self, workspace_id: &str, yaml: &str) -> Result<Compiled> {
        let definition = parse::parse_definition(yaml).map_err(SegmentError::Invalid)?;
        let compiled = Compiled::new(definition);
        let mut conn = self.pool.acquire().await?;
        let problems = check_references(&mut conn, workspace_id, &compiled, yaml).await?;
        if !problems.is_empty() {
            return Err(SegmentError::Invalid(problems));
        }
        Ok(compiled)
    }

    /// Stores a document as a new version when it differs from the latest one; the builder
    /// then computes its membership.
    pub async fn apply(
        &self,
        workspace_id: &str,
        yaml: &str,
        dry_run: bool,
        now: DateTime<Utc>,
    ) -> Result<Applied> {
        let compiled = self.check(workspace_id, yaml).await?;
        let name = compiled.name().to_owned();
        let mut tx = self.pool.begin().await?;
        // One Apply per segment name at a time.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1 || '/' || $2))")
            .bind(workspace_id)
            .bind(&name)
            .execute(&mut *tx)
            .await?;
        let existing = sqlx::query(
            "SELECT s.id, s.status, s.latest_version, v.yaml FROM segments s \
             JOIN segment_versions v ON v.segment_id = s.id AND v.version = s.latest_version \
             WHERE s.workspace_id = $1 AND s.name = $2",
        )
        .bind(workspace_id)
        .bind(&name)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = &existing {
            let status: String = row.try_get("status")?;
            let latest: i32 = row.try_get("latest_version")?;
            let current_yaml: String = row.try_get("yaml")?;
            if current_yaml == yaml && status != "archived" {
                return Ok(Applied {
                    name,
                    version: latest,
                    changed: false,
                    status,
                });
            }
        }
        let version = existing
            .as_ref()
            .map(|row| row.try_get::<i32, _>("latest_version"))
            .transpose()?
            .unwrap_or(0)
            + 1;
        if dry_run {
            return Ok(Applied {
                name,
                version,
                changed: true,
                status: "building".to_owned(),
            });
        }
        let segment_id: i64 = match &existing {
            Some(row) => {
                let id: i64 = row.try_get("id")?;
                // An archived segment comes back as a new version built from scratch.
                sqlx::query(
                    "UPDATE segments SET latest_version = $2, building_version = $2, build_started_at = NULL, \
                     status = 'building', updated_at = $3, archived_at = NULL, \
                     answering_version = CASE WHEN status = 'archived' THEN 0 ELSE answering_version END \
                     WHERE id = $1",
                )
                .bind(id)
                .bind(version)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                id
            }
            None => {
                sqlx::query_scalar(
                    "INSERT INTO segments (workspace_id, name, status, latest_version, building_version, created_at, updated_at) \
                     VALUES ($1, $2, 'building', 1, 1, $3, $3) RETURNING id",
                )
                .bind(workspace_id)
                .bind(&name)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?
            }
        };
        sqlx::query(
            "INSERT INTO segment_versions (segment_id, version, yaml, description, event_names, depends_on, time_dependent, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(segment_id)
        .bind(version)
        .bind(yaml)
        .bind(&compiled.definition.description)
        .bind(&compiled.event_names)
        .bind(&compiled.depends_on)
        .bind(compiled.time_dependent)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        for selector in &compiled.selectors {
            sqlx::query(
                "INSERT INTO selectors (workspace_id, id, event_name, definition, status, created_at) \
                 VALUES ($1, $2, $3, $4, 'backfilling', $5) ON CONFLICT DO NOTHING",
            )
            .bind(workspace_id)
            .bind(aggregate::selector_id(selector))
            .bind(&selector.name)
            .bind(selector_json(selector))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.build_wake.notify_one();
        tracing::info!(workspace = %workspace_id, segment = %name, version, "segment version applied");
        Ok(Applied {
            name,
            version,
            changed: true,
            status: "building".to_owned(),
        })
    }

    /// One segment: the current version, or `version` when not 0.
    pub async fn get(&self, workspace_id: &str, name: &str, version: i32) -> Result<SegmentRecord> {
        let row = sqlx::query(&format!(
            "{SEGMENT_SELECT} WHERE s.workspace_id = $1 AND s.name = $2 \
             AND v.version = CASE WHEN $3 > 0 THEN $3 WHEN s.answering_version > 0 THEN s.answering_version ELSE s.latest_version END"
        ))
        .bind(workspace_id)
        .bind(name)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => segment_from_row(&row, true),
            None => Err(SegmentError::NotFound(if version > 0 {
                format!("{name} (version {version})")
            } else {
                name.to_owned()
            })),
        }
    }

    /// Segments by name, after `after`.
    pub async fn list(
        &self,
        workspace_id: &str,
        prefix: &str,
        include_archived: bool,
        after: &str,
        limit: i64,
    ) -> Result<Vec<SegmentRecord>> {
        let rows = sqlx::query(&format!(
            "{SEGMENT_SELECT} WHERE s.workspace_id = $1 AND s.name LIKE $2 || '%' AND s.name > $3 \
             AND ($4 OR s.status <> 'archived') \
             AND v.version = CASE WHEN s.answering_version > 0 THEN s.answering_version ELSE s.latest_version END \
             ORDER BY s.name LIMIT $5"
        ))
        .bind(workspace_id)
        .bind(prefix.replace('%', "\\%").replace('_', "\\_"))
        .bind(after)
        .bind(include_archived)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(segment_from_row(row, false)?);
        }
        Ok(out)
    }

    /// The segment currently answering reads: its id and answering version.
    pub async fn answering(&self, workspace_id: &str, name: &str) -> Result<(i64, i32)> {
        let row = sqlx::query(
            "SELECT id, answering_version FROM segments WHERE workspace_id = $1 AND name = $2 AND status <> 'archived'",
        )
        .bind(workspace_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok((row.try_get("id")?, row.try_get("answering_version")?)),
            None => Err(SegmentError::NotFound(name.to_owned())),
        }
    }

    /// The exact member count of the answering version.
    pub async fn count(&self, workspace_id: &str, name: &str) -> Result<(i32, i64)> {
        let (id, version) = self.answering(workspace_id, name).await?;
        let count: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM memberships WHERE segment_id = $1 AND version = $2",
        )
        .bind(id)
        .bind(version)
        .fetch_one(&self.pool)
        .await?;
        Ok((version, count))
    }

    /// Members of one version after `after` (a person key), in person order.
    pub async fn members_page(
        &self,
        segment_id: i64,
        version: i32,
        after: &str,
        limit: i64,
        entered_since: Option<DateTime<Utc>>,
    ) -> Result<Vec<Member>> {
        let rows = sqlx::query(
            "SELECT person, entered_at FROM memberships WHERE segment_id = $1 AND version = $2 AND person > $3 \
             AND ($4::timestamptz IS NULL OR entered_at >= $4) ORDER BY person LIMIT $5",
        )
        .bind(segment_id)
        .bind(version)
        .bind(after)
        .bind(entered_since)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let key: String = row.try_get("person")?;
            if let Some(person) = Person::from_key(&key) {
                out.push(Member {
                    person,
                    entered_at: row.try_get("entered_at")?,
                });
            }
        }
        Ok(out)
    }

    /// One person's membership in each named segment: (version, entered_at if member).
    /// Answered from Redis when the mirror of that version is complete, else Postgres.
    pub async fn is_member(
        &self,
        workspace_id: &str,
        person: &Person,
        names: &[String],
    ) -> Result<Vec<(i32, Option<DateTime<Utc>>)>> {
        let rows = sqlx::query(
            "SELECT name, id, answering_version FROM segments WHERE workspace_id = $1 AND name = ANY($2) AND status <> 'archived'",
        )
        .bind(workspace_id)
        .bind(names)
        .fetch_all(&self.pool)
        .await?;
        let mut found: HashMap<String, (i64, i32)> = HashMap::new();
        for row in rows {
            found.insert(
                row.try_get("name")?,
                (row.try_get("id")?, row.try_get("answering_version")?),
            );
        }
        let mut targets = Vec::with_capacity(names.len());
        for name in names {
            match found.get(name) {
                Some(target) => targets.push(*target),
                None => return Err(SegmentError::NotFound(name.clone())),
            }
        }
        let key = person.key();
        let cached = self.mirror.lookup(workspace_id, &targets, &key).await;
        let mut out = Vec::with_capacity(targets.len());
        for (i, (segment_id, version)) in targets.iter().enumerate() {
            let answer = match cached.get(i).copied().flatten() {
                Some(answer) => answer,
                None => {
                    metrics::counter!("relance_segments_is_member_fallback_total").increment(1);
                    sqlx::query_scalar(
                        "SELECT entered_at FROM memberships WHERE segment_id = $1 AND version = $2 AND person = $3",
                    )
                    .bind(segment_id)
                    .bind(version)
                    .bind(&key)
                    .fetch_optional(&self.pool)
                    .await?
                }
            };
            out.push((*version, answer));
        }
        Ok(out)
    }

    /// Archives a segment (refused while an active segment refers to it).
    pub async fn archive(
        &self,
        workspace_id: &str,
        name: &str,
        now: DateTime<Utc>,
    ) -> Result<SegmentRecord> {
        let mut tx = self.pool.begin().await?;
        let id: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM segments WHERE workspace_id = $1 AND name = $2 AND status <> 'archived' FOR UPDATE",
        )
        .bind(workspace_id)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(id) = id else {
            return Err(SegmentError::NotFound(name.to_owned()));
        };
        let used_by: Vec<String> = sqlx::query_scalar(
            "SELECT s.name FROM segments s JOIN segment_versions v ON v.segment_id = s.id AND v.version = s.latest_version \
             WHERE s.workspace_id = $1 AND s.status <> 'archived' AND $2 = ANY(v.depends_on) ORDER BY s.name",
        )
        .bind(workspace_id)
        .bind(name)
        .fetch_all(&mut *tx)
        .await?;
        if !used_by.is_empty() {
            return Err(SegmentError::InUse {
                name: name.to_owned(),
                used_by,
            });
        }
        sqlx::query(
            "UPDATE segments SET status = 'archived', archived_at = $2, updated_at = $2, building_version = NULL, member_count = 0 WHERE id = $1",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM memberships WHERE segment_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.mirror.forget_segment(workspace_id, id).await;
        self.get_archived(workspace_id, name).await
    }

    async fn get_archived(&self, workspace_id: &str, name: &str) -> Result<SegmentRecord> {
        let row = sqlx::query(&format!(
            "{SEGMENT_SELECT} WHERE s.workspace_id = $1 AND s.name = $2 AND v.version = s.latest_version"
        ))
        .bind(workspace_id)
        .bind(name)
        .fetch_one(&self.pool)
        .await?;
        segment_from_row(&row, true)
    }

    /// The versions that evaluation keeps current in a workspace (answering versions of
    /// active segments), in dependency order, locking their rows against a concurrent
    /// version switch until the caller's transaction ends.
    pub(crate) async fn live_versions(
        &self,
        conn: &mut PgConnection,
        workspace_id: &str,
    ) -> Result<Vec<LiveVersion>> {
        let rows = sqlx::query(
            "SELECT id, answering_version FROM segments WHERE workspace_id = $1 AND status <> 'archived' \
             AND answering_version > 0 ORDER BY id FOR SHARE",
        )
        .bind(workspace_id)
        .fetch_all(&mut *conn)
        .await?;
        let mut versions = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.try_get("id")?;
            let version: i32 = row.try_get("answering_version")?;
            versions.push(LiveVersion {
                segment_id: id,
                version,
                compiled: self.compiled(&mut *conn, id, version).await?,
            });
        }
        Ok(in_dependency_order(versions))
    }

    /// A version's compiled definition (cached: versions are immutable).
    pub(crate) async fn compiled(
        &self,
        conn: &mut PgConnection,
        segment_id: i64,
        version: i32,
    ) -> Result<Arc<Compiled>> {
        if let Some(found) = self.cached(segment_id, version) {
            return Ok(found);
        }
        let yaml: String = sqlx::query_scalar(
            "SELECT yaml FROM segment_versions WHERE segment_id = $1 AND version = $2",
        )
        .bind(segment_id)
        .bind(version)
        .fetch_one(conn)
        .await?;
        let definition = parse::parse_definition(&yaml).map_err(SegmentError::Invalid)?;
        let compiled = Arc::new(Compiled::new(definition));
        if let Ok(mut cache) = self.compiled.lock() {
            cache.insert((segment_id, version), compiled.clone());
        }
        Ok(compiled)
    }

    fn cached(&self, segment_id: i64, version: i32) -> Option<Arc<Compiled>> {
        self.compiled
            .lock()
            .ok()?
            .get(&(segment_id, version))
            .cloned()
    }
}

/// Orders versions so that a segment comes after those it refers to.
pub(crate) fn in_dependency_order(versions: Vec<LiveVersion>) -> Vec<LiveVersion> {
    let mut graph = HashMap::new();
    for v in &versions {
        graph.insert(v.compiled.name().to_owned(), v.compiled.depends_on.clone());
    }
    let Ok(order) = eval::dependency_order(&graph) else {
        // Cycles are refused at Apply; keep the stored order if one slipped in.
        return versions;
    };
    let mut by_name: HashMap<String, LiveVersion> = versions
        .into_iter()
        .map(|v| (v.compiled.name().to_owned(), v))
        .collect();
    let mut ordered = Vec::with_capacity(by_name.len());
    for name in order {
        if let Some(v) = by_name.remove(&name) {
            ordered.push(v);
        }
    }
    ordered
}

// The member count is counted when read (an index range per segment), so that List and
// Get are exact whatever real time changed since the last build.
const SEGMENT_SELECT: &str = "SELECT s.id, s.name, s.status, s.latest_version, s.answering_version, \
    (SELECT count(*) FROM memberships m WHERE m.segment_id = s.id AND m.version = s.answering_version) AS member_count, \
    s.created_at, s.updated_at, s.archived_at, v.version, v.yaml, v.description, v.event_names, v.depends_on, \
    v.time_dependent, v.ready_at FROM segments s JOIN segment_versions v ON v.segment_id = s.id";

fn segment_from_row(row: &sqlx::postgres::PgRow, with_yaml: bool) -> Result<SegmentRecord> {
    Ok(SegmentRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        status: row.try_get("status")?,
        version: row.try_get("version")?,
        latest_version: row.try_get("latest_version")?,
        answering_version: row.try_get("answering_version")?,
        description: row.try_get("description")?,
        yaml: if with_yaml {
            row.try_get("yaml")?
        } else {
            String::new()
        },
        event_names: row.try_get("event_names")?,
        depends_on: row.try_get("depends_on")?,
        time_dependent: row.try_get("time_dependent")?,
        member_count: row.try_get("member_count")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        ready_at: row.try_get("ready_at")?,
        archived_at: row.try_get("archived_at")?,
    })
}

/// A selector as stored, to rebuild it without its segment.
pub(crate) fn selector_json(selector: &crate::domain::EventSelector) -> serde_json::Value {
    serde_json::json!({
        "name": selector.name,
        "where": selector.filter_json,
        "value": selector.value.as_ref().map(|v| v.join(".")),
    })
}

/// `in_segment` targets must be active segments of the workspace and must not lead back
/// to the segment itself.
async fn check_references(
    conn: &mut PgConnection,
    workspace_id: &str,
    compiled: &Compiled,
    yaml: &str,
) -> Result<Vec<Problem>> {
    if compiled.depends_on.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "SELECT s.name, v.depends_on FROM segments s JOIN segment_versions v ON v.segment_id = s.id AND v.version = s.latest_version \
         WHERE s.workspace_id = $1 AND s.status <> 'archived'",
    )
    .bind(workspace_id)
    .fetch_all(conn)
    .await?;
    let mut graph: HashMap<String, Vec<String>> = HashMap::new();
    for row in rows {
        graph.insert(row.try_get("name")?, row.try_get("depends_on")?);
    }
    let name = compiled.name().to_owned();
    let mut problems = Vec::new();
    let located = locate_in_segments(yaml);
    for target in &compiled.depends_on {
        if *target != name && !graph.contains_key(target) {
            let (field, line, column) = located
                .iter()
                .find(|(n, ..)| n == target)
                .map(|(_, f, l, c)| (f.clone(), *l, *c))
                .unwrap_or_else(|| ("where".to_owned(), 0, 0));
            problems.push(Problem {
                field,
                reason: format!("no active segment named {target:?} in this workspace"),
                line,
                column,
            });
        }
    }
    graph.insert(name.clone(), compiled.depends_on.clone());
    if let Err(cycle) = eval::dependency_order(&graph) {
        let (field, line, column) = located
            .first()
            .map(|(_, f, l, c)| (f.clone(), *l, *c))
            .unwrap_or_else(|| ("where".to_owned(), 0, 0));
        problems.push(Problem {
            field,
            reason: format!("segments may not refer to each other in a cycle: {cycle}"),
            line,
            column,
        });
    }
    Ok(problems)
}

/// Every `in_segment:` of a document with its path and position.
fn locate_in_segments(yaml: &str) -> Vec<(String, String, u32, u32)> {
    let mut found = Vec::new();
    let Ok(root) = relance_kit::yaml::parse(yaml) else {
        return found;
    };
    let mut stack = vec![(String::new(), &root)];
    while let Some((path, node)) = stack.pop() {
        match &node.value {
            relance_kit::yaml::Value::Map(entries) => {
                for (key, child) in entries {
                    let child_path = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    if key == "in_segment"
                        && let Some(target) = child.as_str()
                    {
                        found.push((
                            target.to_owned(),
                            child_path.clone(),
                            child.line,
                            child.column,
                        ));
                    }
                    stack.push((child_path, child));
                }
            }
            relance_kit::yaml::Value::Seq(items) => {
                for (i, child) in items.iter().enumerate() {
                    stack.push((format!("{path}[{i}]"), child));
                }
            }
            _ => {}
        }
    }
    found.sort_by_key(|a| (a.2, a.3));
    found
}
