//! The Redis copy of membership that answers `IsMember` without touching Postgres.
//!
//! Per segment version, one hash `<prefix><ws>:seg:<id>:<version>` maps each member's
//! person key to the second they entered, and a marker `…:ready` (with a TTL) says the
//! hash is complete. Changes are written through after each commit; a version's hash is
//! loaded whole when it starts answering and reloaded periodically, so a write lost while
//! Redis was unreachable lives at most until the next reload. Without the marker — Redis
//! flushed, restarted or unreachable — reads fall back to Postgres: Redis costs speed,
//! never correctness.

use chrono::{DateTime, Utc};
use redis::AsyncCommands as _;
use relance_kit::cache::Cache;

/// How long a loaded hash is trusted without a reload.
pub const READY_TTL_SECS: u64 = 15 * 60;

/// One membership change to mirror: `entered_at` None means the person left.
#[derive(Debug, Clone)]
pub struct MirrorChange {
    pub segment_id: i64,
    pub version: i32,
    pub person: String,
    pub entered_at: Option<DateTime<Utc>>,
}

/// The mirror; a no-op when Redis is not configured or unreachable at start.
#[derive(Debug, Clone)]
pub struct Mirror {
    cache: Option<Cache>,
}

impl Mirror {
    pub fn new(cache: Option<Cache>) -> Mirror {
        Mirror { cache }
    }

    fn hash_key(cache: &Cache, workspace_id: &str, segment_id: i64, version: i32) -> String {
        cache.key(workspace_id, &format!("seg:{segment_id}:{version}"))
    }

    /// For each target (segment id, version): `Some(entered_at or None)` when the mirror
    /// knows, `None` when Postgres must be asked.
    pub async fn lookup(
        &self,
        workspace_id: &str,
        targets: &[(i64, i32)],
        person: &str,
    ) -> Vec<Option<Option<DateTime<Utc>>>> {
        let unknown = vec![None; targets.len()];
        let Some(cache) = &self.cache else {
            return unknown;
        };
        let mut pipe = redis::pipe();
        for (segment_id, version) in targets {
            let key = Self::hash_key(cache, workspace_id, *segment_id, *version);
            pipe.exists(format!("{key}:ready")).hget(key, person);
        }
        let mut connection = cache.connection();
        let replies: Result<Vec<redis::Value>, _> = pipe.query_async(&mut connection).await;
        let Ok(replies) = replies else {
            return unknown;
        };
        let mut out = Vec::with_capacity(targets.len());
        for pair in replies.chunks(2) {
            let ready = matches!(pair.first(), Some(redis::Value::Int(1)));
            if !ready {
                out.push(None);
                continue;
            }
            let entered = match pair.get(1) {
                Some(redis::Value::BulkString(bytes)) => std::str::from_utf8(bytes)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .and_then(|secs| DateTime::from_timestamp(secs, 0)),
                _ => None,
            };
            out.push(Some(entered));
        }
        out
    }

    /// Writes committed changes through; on failure, drops the affected versions' markers
    /// so reads go to Postgres until the next reload.
    pub async fn apply(&self, workspace_id: &str, changes: &[MirrorChange]) {
        let Some(cache) = &self.cache else { return };
        if changes.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for change in changes {
            let key = Self::hash_key(cache, workspace_id, change.segment_id, change.version);
            match change.entered_at {
                Some(at) => pipe.hset(key, &change.person, at.timestamp()).ignore(),
                None => pipe.hdel(key, &change.person).ignore(),
            };
        }
        let mut connection = cache.connection();
        let written: Result<(), _> = pipe.query_async(&mut connection).await;
        if let Err(error) = written {
            tracing::warn!(%error, "membership mirror write failed, reads fall back to postgres");
            for change in changes {
                let key = Self::hash_key(cache, workspace_id, change.segment_id, change.version);
                let _: Result<(), _> = connection.del(format!("{key}:ready")).await;
            }
        }
    }

    /// Replaces a version's hash with `members` and marks it complete.
    pub async fn load(
        &self,
        workspace_id: &str,
        segment_id: i64,
        version: i32,
        members: &[(String, DateTime<Utc>)],
    ) -> Result<(), redis::RedisError> {
        let Some(cache) = &self.cache else {
            return Ok(());
        };
        let key = Self::hash_key(cache, workspace_id, segment_id, version);
        let staging = format!("{key}:loading");
        let mut connection = cache.connection();
        let _: () = connection.del(&staging).await?;
        for chunk in members.chunks(10_000) {
            let pairs: Vec<(&str, i64)> = chunk
                .iter()
                .map(|(person, at)| (person.as_str(), at.timestamp()))
                .collect();
            let _: () = connection.hset_multiple(&staging, &pairs).await?;
        }
        let mut pipe = redis::pipe();
        if members.is_empty() {
            pipe.del(&key).ignore();
        } else {
            pipe.rename(&staging, &key).ignore();
        }
        pipe.set_ex(format!("{key}:ready"), 1, READY_TTL_SECS)
            .ignore();
        let _: () = pipe.query_async(&mut connection).await?;
        Ok(())
    }

    /// Removes every version of a segment (archive, or an old version after a switch).
    pub async fn forget(&self, workspace_id: &str, segment_id: i64, version: i32) {
        let Some(cache) = &self.cache else { return };
        let key = Self::hash_key(cache, workspace_id, segment_id, version);
        let mut connection = cache.connection();
        let _: Result<(), _> = connection.del(&[format!("{key}:ready"), key]).await;
    }

    /// Removes all versions of a segment.
    pub async fn forget_segment(&self, workspace_id: &str, segment_id: i64) {
        let Some(cache) = &self.cache else { return };
        let pattern = cache.key(workspace_id, &format!("seg:{segment_id}:*"));
        let mut connection = cache.connection();
        let keys: Vec<String> = match connection.keys(&pattern).await {
            Ok(keys) => keys,
            Err(_) => return,
        };
        if !keys.is_empty() {
            let _: Result<(), _> = connection.del(keys).await;
        }
    }
}
