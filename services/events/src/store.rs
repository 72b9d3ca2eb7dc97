//! Postgres for the events service: the partitioned event log (which is also the outbox),
//! dedup ids, identity links and the relay cursor.

use std::collections::HashSet;
use std::sync::Mutex;

use chrono::{DateTime, NaiveDate, Utc};
use relance_kit::messages::{EventMessage, ProfileDeleted, ProfileMerged};
use sqlx::{PgConnection, PgPool, Row as _};

use crate::domain::{self, NewEvent};

/// Lock class of the identity buckets (the first key of the two-key advisory lock).
const IDENTITY_LOCK_CLASS: i32 = 0x4944; // "ID"

/// Lock key of the single active relay.
const RELAY_LOCK: (i32, i32) = (0x5245, 1); // "RE"

/// The events service's tables.
#[derive(Debug)]
pub struct EventStore {
    pool: PgPool,
    /// Months whose partition is known to exist.
    partitions: Mutex<HashSet<NaiveDate>>,
}

/// Which events to read back.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub customer_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub names: Vec<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// Read events strictly older than this (time, seq): the page token.
    pub before: Option<(DateTime<Utc>, i64)>,
    pub limit: i64,
}

impl EventStore {
    /// The store over the `events` schema's pool.
    pub fn new(pool: PgPool) -> EventStore {
        EventStore {
            pool,
            partitions: Mutex::new(HashSet::new()),
        }
    }

    /// Stores the events that were never stored before, in a transaction left open: the
    /// caller hands the stored events to the relay before committing (so the relay, which
    /// sees rows only once committed, always finds them in memory), then commits.
    ///
    /// One statement inserts the new message ids and, for those only, the events. Batches
    /// holding anonymous-only events first take their identity buckets in shared mode (see
    /// [`domain::identity_bucket`]) and fill in the customer id from a known identity link;
    /// other batches skip that join.
    pub async fn insert(
        &self,
        workspace_id: &str,
        events: &[NewEvent],
        received_at: DateTime<Utc>,
    ) -> sqlx::Result<PendingInsert> {
        if events.is_empty() {
            return Ok(PendingInsert {
                tx: None,
                stored: Vec::new(),
            });
        }
        self.ensure_partitions(domain::months_of(events.iter().map(|e| &e.timestamp)))
            .await?;
        let mut tx = self.pool.begin().await?;

        let mut message_ids = Vec::with_capacity(events.len());
        let mut names = Vec::with_capacity(events.len());
        let mut customers = Vec::with_capacity(events.len());
        let mut anonymous = Vec::with_capacity(events.len());
        let mut times = Vec::with_capacity(events.len());
        let mut properties = Vec::with_capacity(events.len());
        let mut contexts = Vec::with_capacity(events.len());
        let mut dedup_keys = Vec::with_capacity(events.len());
        let mut buckets = Vec::new();
        for event in events {
            dedup_keys.push(domain::dedup_key(workspace_id, &event.message_id));
            message_ids.push(event.message_id.as_str());
            names.push(event.name.as_str());
            customers.push(event.customer_id.as_deref());
            anonymous.push(event.anonymous_id.as_deref());
            times.push(event.timestamp);
            properties.push(event.properties.as_str());
            contexts.push(event.context.as_str());
            if let (None, Some(anon)) = (&event.customer_id, &event.anonymous_id) {
                buckets.push(domain::identity_bucket(workspace_id, anon));
            }
        }
        buckets.sort_unstable();
        buckets.dedup();

        let (customer, link_join) = if buckets.is_empty() {
            ("i.customer_id", "")
        } else {
            (
                "COALESCE(i.customer_id, l.customer_id)",
                "LEFT JOIN identity_links l ON l.workspace_id = $1 AND l.anonymous_id = i.anonymous_id AND i.customer_id IS NULL",
            )
        };
        let sql = format!(
            "WITH input AS ( \
                 SELECT * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::text[], $8::text[], $10::uuid[]) \
                     AS t(message_id, name, customer_id, anonymous_id, ts, properties, context, dedup_key) \
             ), fresh AS ( \
                 INSERT INTO event_ids (id) SELECT dedup_key FROM input \
                 ON CONFLICT DO NOTHING \
                 RETURNING id \
             ) \
             INSERT INTO events (workspace_id, message_id, name, customer_id, anonymous_id, ts, received_at, properties, context) \
             SELECT $1, i.message_id, i.name, {customer}, i.anonymous_id, i.ts, $9, i.properties::jsonb, i.context::jsonb \
             FROM input i JOIN fresh f ON f.id = i.dedup_key {link_join} \
             RETURNING message_id, seq, xid::text, customer_id"
        );
        let insert = sqlx::query_as::<_, (String, i64, String, Option<String>)>(&sql)
            .bind(workspace_id)
            .bind(&message_ids)
            .bind(&names)
            .bind(&customers)
            .bind(&anonymous)
            .bind(&times)
            .bind(&properties)
            .bind(&contexts)
            .bind(received_at)
            .bind(&dedup_keys);

        if !buckets.is_empty() {
            sqlx::query("SELECT pg_advisory_xact_lock_shared($1, b) FROM unnest($2::int[]) AS b")
                .bind(IDENTITY_LOCK_CLASS)
                .bind(&buckets)
                .execute(&mut *tx)
                .await?;
        }
        let rows = insert.fetch_all(&mut *tx).await?;
        let mut stored = Vec::with_capacity(rows.len());
        for (message_id, seq, xid, customer_id) in rows {
            stored.push(Stored {
                message_id,
                key: RelayKey {
                    xid: parse_xid(&xid)?,
                    seq,
                },
                customer_id,
            });
        }
        Ok(PendingInsert {
            tx: Some(tx),
            stored,
        })
    }

    /// Creates the monthly partitions `months` need, once per process.
    async fn ensure_partitions(
        &self,
        months: std::collections::BTreeSet<NaiveDate>,
    ) -> sqlx::Result<()> {
        let missing: Vec<NaiveDate> = {
            let known = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
            months.into_iter().filter(|m| !known.contains(m)).collect()
        };
        for month in missing {
            let name = format!("events_{}", month.format("%Y_%m"));
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {name} PARTITION OF events FOR VALUES FROM ('{}') TO ('{}')",
                month.format("%Y-%m-%d"),
                domain::next_month(month).format("%Y-%m-%d"),
            );
            if let Err(error) = sqlx::query(&sql).execute(&self.pool).await {
                // Another replica created it at the same moment.
                let raced = error
                    .as_database_error()
                    .and_then(|e| e.code())
                    .is_some_and(|code| code == "42P07" || code == "23505");
                if !raced {
                    return Err(error);
                }
            }
            self.partitions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(month);
        }
        Ok(())
    }

    /// Records that an anonymous id belongs to a customer and re-attributes its events.
    /// Idempotent.
    pub async fn link_identity(&self, merged: &ProfileMerged) -> sqlx::Result<u64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
            .bind(IDENTITY_LOCK_CLASS)
            .bind(domain::identity_bucket(
                &merged.workspace_id,
                &merged.anonymous_id,
            ))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO identity_links (workspace_id, anonymous_id, customer_id) VALUES ($1, $2, $3) \
             ON CONFLICT (workspace_id, anonymous_id) DO UPDATE SET customer_id = excluded.customer_id",
        )
        .bind(&merged.workspace_id)
        .bind(&merged.anonymous_id)
        .bind(&merged.customer_id)
        .execute(&mut *tx)
        .await?;
        let moved = sqlx::query(
            "UPDATE events SET customer_id = $3 \
             WHERE workspace_id = $1 AND COALESCE(customer_id, anonymous_id) = $2 AND customer_id IS NULL AND anonymous_id = $2",
        )
        .bind(&merged.workspace_id)
        .bind(&merged.anonymous_id)
        .bind(&merged.customer_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(moved)
    }

    /// Erases every event, dedup id and identity link of a deleted customer. Idempotent.
    pub async fn erase(&self, deleted: &ProfileDeleted) -> sqlx::Result<u64> {
        let mut tx = self.pool.begin().await?;
        let customer = deleted.customer_id.as_deref();
        let gone: Vec<String> = sqlx::query_scalar(
            "DELETE FROM events WHERE workspace_id = $1 \
               AND COALESCE(customer_id, anonymous_id) = ANY($3::text[] || $2::text) \
               AND (customer_id = $2 OR anonymous_id = ANY($3)) \
             RETURNING message_id",
        )
        .bind(&deleted.workspace_id)
        .bind(customer)
        .bind(&deleted.anonymous_ids)
        .fetch_all(&mut *tx)
        .await?;
        let keys: Vec<String> = gone
            .iter()
            .map(|id| domain::dedup_key(&deleted.workspace_id, id))
            .collect();
        sqlx::query("DELETE FROM event_ids WHERE id = ANY($1::uuid[])")
            .bind(&keys)
            .execute(&mut *tx)
            .await?;
        let erased = gone.len();
        sqlx::query("DELETE FROM identity_links WHERE workspace_id = $1 AND (customer_id = $2 OR anonymous_id = ANY($3))")
            .bind(&deleted.workspace_id)
            .bind(customer)
            .bind(&deleted.anonymous_ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(erased as u64)
    }

    /// Reads events of one customer, newest first.
    pub async fn query(
        &self,
        workspace_id: &str,
        query: &EventQuery,
    ) -> sqlx::Result<Vec<EventMessage>> {
        let (before_ts, before_seq) = match query.before {
            Some((ts, seq)) => (Some(ts), seq),
            None => (None, i64::MAX),
        };
        // The events_person index is on COALESCE(customer_id, anonymous_id): a visitor's
        // events are under their anonymous id until merged, then under the customer's.
        let mut people: Vec<String> = query
            .customer_id
            .iter()
            .chain(query.anonymous_id.iter())
            .cloned()
            .collect();
        if let Some(anonymous_id) = &query.anonymous_id {
            let linked: Option<String> =
                sqlx::query_scalar("SELECT customer_id FROM identity_links WHERE workspace_id = $1 AND anonymous_id = $2")
                    .bind(workspace_id)
                    .bind(anonymous_id)
                    .fetch_optional(&self.pool)
                    .await?;
            people.extend(linked);
        }
        let rows = sqlx::query(
            "SELECT workspace_id, seq, message_id, name, customer_id, anonymous_id, ts, received_at, properties, context \
             FROM events \
             WHERE workspace_id = $1 \
               AND COALESCE(customer_id, anonymous_id) = ANY($10) \
               AND ($2::text IS NULL OR customer_id = $2) \
               AND ($3::text IS NULL OR anonymous_id = $3) \
               AND (cardinality($4::text[]) = 0 OR name = ANY($4)) \
               AND ($5::timestamptz IS NULL OR ts >= $5) \
               AND ($6::timestamptz IS NULL OR ts < $6) \
               AND ($7::timestamptz IS NULL OR (ts, seq) < ($7, $8)) \
             ORDER BY ts DESC, seq DESC \
             LIMIT $9",
        )
        .bind(workspace_id)
        .bind(&query.customer_id)
        .bind(&query.anonymous_id)
        .bind(&query.names)
        .bind(query.from)
        .bind(query.to)
        .bind(before_ts)
        .bind(before_seq)
        .bind(query.limit)
        .bind(&people)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(event_from_row(row)?);
        }
        Ok(out)
    }
}

/// Takes the relay's session lock on `conn`; `false` when another replica holds it.
pub async fn try_lock_relay(conn: &mut PgConnection) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(RELAY_LOCK.0)
        .bind(RELAY_LOCK.1)
        .fetch_one(conn)
        .await
}

/// The keys of the next events to publish after the cursor, only from transactions that
/// have all finished (below the oldest running transaction), in (xid, seq) order.
///
/// The cursor is read first and bound as values: compared through a join, Postgres would
/// walk the `(xid, seq)` index from its start on every round. Only keys are read: the
/// events themselves usually come from the ingesting process's memory (see
/// `relay::RelayCache`), and [`fetch_events`] reads the others.
pub async fn next_keys(conn: &mut PgConnection, limit: i64) -> sqlx::Result<Vec<RelayKey>> {
    let (cursor_xid, cursor_seq): (String, i64) =
        sqlx::query_as("SELECT xid::text, seq FROM relay_cursor WHERE id = 1")
            .fetch_one(&mut *conn)
            .await?;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT xid::text, seq FROM events \
         WHERE (xid, seq) > ($1::xid8, $2) AND xid < pg_snapshot_xmin(pg_current_snapshot()) \
         ORDER BY xid, seq LIMIT $3",
    )
    .bind(&cursor_xid)
    .bind(cursor_seq)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let mut keys = Vec::with_capacity(rows.len());
    for (xid, seq) in rows {
        keys.push(RelayKey {
            xid: parse_xid(&xid)?,
            seq,
        });
    }
    Ok(keys)
}

/// Reads whole events by relay key (those the relay did not find in memory).
pub async fn fetch_events(
    conn: &mut PgConnection,
    keys: &[RelayKey],
) -> sqlx::Result<Vec<(RelayKey, EventMessage)>> {
    let xids: Vec<String> = keys.iter().map(|k| k.xid.to_string()).collect();
    let seqs: Vec<i64> = keys.iter().map(|k| k.seq).collect();
    let rows = sqlx::query(
        "SELECT xid::text AS xid, seq, workspace_id, message_id, name, customer_id, anonymous_id, \
                ts, received_at, properties, context \
         FROM events \
         WHERE (xid, seq) IN (SELECT x::xid8, s FROM unnest($1::text[], $2::bigint[]) AS k(x, s)) \
         ORDER BY xid, seq",
    )
    .bind(&xids)
    .bind(&seqs)
    .fetch_all(&mut *conn)
    .await?;
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        let key = RelayKey {
            xid: parse_xid(&row.try_get::<String, _>("xid")?)?,
            seq: row.try_get("seq")?,
        };
        events.push((key, event_from_row(&row)?));
    }
    Ok(events)
}

/// An event row (`workspace_id, seq, message_id, name, customer_id, anonymous_id, ts,
/// received_at, properties, context`) as the message it is published as.
fn event_from_row(row: &sqlx::postgres::PgRow) -> sqlx::Result<EventMessage> {
    Ok(EventMessage {
        workspace_id: row.try_get("workspace_id")?,
        seq: row.try_get("seq")?,
        message_id: row.try_get("message_id")?,
        name: row.try_get("name")?,
        customer_id: row.try_get("customer_id")?,
        anonymous_id: row.try_get("anonymous_id")?,
        timestamp: row.try_get("ts")?,
        received_at: row.try_get("received_at")?,
        properties: row.try_get("properties")?,
        context: row.try_get("context")?,
    })
}

/// Where an event stands in publication order: the id of the transaction that wrote it,
/// then its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelayKey {
    pub xid: u64,
    pub seq: i64,
}

/// Events inserted in a transaction not yet committed.
#[derive(Debug)]
pub struct PendingInsert {
    tx: Option<sqlx::Transaction<'static, sqlx::Postgres>>,
    /// What the insert stored (empty when every event was a duplicate).
    pub stored: Vec<Stored>,
}

impl PendingInsert {
    /// Makes the events durable (and visible to the relay).
    pub async fn commit(self) -> sqlx::Result<()> {
        match self.tx {
            Some(tx) => tx.commit().await,
            None => Ok(()),
        }
    }
}

/// An event the insert stored.
#[derive(Debug, Clone)]
pub struct Stored {
    pub message_id: String,
    pub key: RelayKey,
    /// The customer id as stored (filled in from an identity link when the event had none).
    pub customer_id: Option<String>,
}

fn parse_xid(text: &str) -> sqlx::Result<u64> {
    text.parse()
        .map_err(|_| sqlx::Error::Decode(format!("not a transaction id: {text:?}").into()))
}

/// Moves the relay cursor past what was published.
pub async fn advance_cursor(conn: &mut PgConnection, last: RelayKey) -> sqlx::Result<()> {
    sqlx::query("UPDATE relay_cursor SET xid = $1::xid8, seq = $2 WHERE id = 1")
        .bind(last.xid.to_string())
        .bind(last.seq)
        .execute(conn)
        .await?;
    Ok(())
}
