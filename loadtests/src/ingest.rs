//! Batched ingestion throughput: `TrackBatch` against the service, and the raw baseline —
//! the same rows written straight into a plain Postgres table.
//!
//! Both scenarios generate every event before the clock starts, deal the batches
//! round-robin to `concurrency` workers (one connection each), release the workers together
//! and stop the clock when the last batch is acknowledged. A few untimed warm-up batches go
//! first (connection set-up, prepared statements, the service's partition creation).

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use relance_proto::v1 as pb;
use sqlx::{Connection as _, PgConnection};
use tokio::sync::Barrier;

use crate::client::{Client, Target};
use crate::generate::{self, GenEvent, Generator, Shape};
use crate::stats::{self, IngestResult, Percentiles};

/// What to send, shared by both scenarios so that they insert the same rows.
#[derive(Debug, Clone, clap::Args)]
pub struct Load {
    /// Events timed (warm-up excluded).
    #[arg(long, default_value_t = 200_000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=5_000_000))]
    pub events: usize,
    /// Events per batch (the service takes at most 1,000).
    #[arg(long, default_value_t = 500, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000))]
    pub batch: usize,
    /// Concurrent callers, each on its own connection.
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub concurrency: usize,
    /// Untimed batches sent first.
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=100))]
    pub warmup_batches: usize,
    /// Seed of the generated events: the same seed gives the same rows (use a new one per
    /// repetition, or the service will count them as duplicates).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub shape: Shape,
}

impl Load {
    /// The warm-up events and the timed events.
    fn generate(&self) -> anyhow::Result<(Vec<GenEvent>, Vec<GenEvent>)> {
        if self.batch == 0 || self.concurrency == 0 || self.events == 0 {
            anyhow::bail!("--events, --batch and --concurrency must be at least 1");
        }
        let mut generator = Generator::new(self.seed, self.shape.clone(), generate::now());
        let warmup = generator.take(self.warmup_batches * self.batch);
        let timed = generator.take(self.events);
        Ok((warmup, timed))
    }

    /// Deals `items` round-robin into one list per worker.
    fn deal<T>(&self, items: impl IntoIterator<Item = T>) -> Vec<Vec<T>> {
        let mut lists: Vec<Vec<T>> = (0..self.concurrency).map(|_| Vec::new()).collect();
        for (index, item) in items.into_iter().enumerate() {
            lists[index % self.concurrency].push(item);
        }
        lists
    }
}

/// What one worker measured.
struct WorkerTally {
    latencies: Histogram<u64>,
    accepted: u64,
}

/// Releases the workers together and times them until the last one is done.
async fn timed_run(
    load: &Load,
    method: &str,
    workers: Vec<tokio::task::JoinHandle<anyhow::Result<WorkerTally>>>,
    start: Arc<Barrier>,
) -> anyhow::Result<IngestResult> {
    start.wait().await;
    let started = Instant::now();
    let mut latencies = stats::new_histogram()?;
    let mut accepted = 0;
    for worker in workers {
        let tally = worker.await.context("a worker panicked")??;
        latencies.add(&tally.latencies)?;
        accepted += tally.accepted;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(IngestResult {
        method: method.to_owned(),
        seed: load.seed,
        events: load.events as u64,
        batch_size: load.batch,
        concurrency: load.concurrency,
        elapsed_secs: elapsed,
        events_per_sec: load.events as f64 / elapsed,
        accepted,
        batch_latency: Percentiles::of(&latencies),
    })
}

// --- TrackBatch ---------------------------------------------------------------------------

/// Sends every event with `TrackBatch` and fails unless all of them are stored.
pub async fn track_batch(target: &Target, load: &Load) -> anyhow::Result<IngestResult> {
    let (warmup, timed) = load.generate()?;
    let clients = target.connect(load.concurrency).await?;
    let mut first = clients[0].clone();
    for chunk in warmup.chunks(load.batch) {
        send_batch(&mut first, batch_request(chunk))
            .await
            .context("warm-up batch")?;
    }

    // Encoding the generated events into proto messages is the client's work, done before
    // the clock starts; encoding those to bytes happens in the timed calls, as it would.
    let requests = load.deal(timed.chunks(load.batch).map(batch_request));
    let start = Arc::new(Barrier::new(load.concurrency + 1));
    let mut workers = Vec::with_capacity(load.concurrency);
    for (mut client, requests) in clients.into_iter().zip(requests) {
        let start = start.clone();
        // Made before the spawn: a worker must not fail before it reaches the barrier.
        let mut tally = WorkerTally {
            latencies: stats::new_histogram()?,
            accepted: 0,
        };
        workers.push(tokio::spawn(async move {
            start.wait().await;
            for request in requests {
                let sent = Instant::now();
                tally.accepted += send_batch(&mut client, request).await?;
                stats::record(&mut tally.latencies, sent.elapsed());
            }
            Ok(tally)
        }));
    }
    let result = timed_run(load, "TrackBatch", workers, start).await?;
    if result.accepted != result.events {
        anyhow::bail!(
            "the service stored {} of {} events (duplicates from an earlier run with --seed {}?)",
            result.accepted,
            result.events,
            load.seed
        );
    }
    Ok(result)
}

fn batch_request(events: &[GenEvent]) -> pb::TrackBatchRequest {
    pb::TrackBatchRequest {
        events: events.iter().map(GenEvent::to_proto).collect(),
    }
}

/// One call; returns how many events were stored. A refused event is a generator bug.
async fn send_batch(client: &mut Client, request: pb::TrackBatchRequest) -> anyhow::Result<u64> {
    let response = client
        .track_batch(request)
        .await
        .context("TrackBatch")?
        .into_inner();
    if let Some(refused) = response.rejected.first() {
        anyhow::bail!(
            "TrackBatch refused {} events, e.g. {}: {}",
            response.rejected.len(),
            refused.field,
            refused.reason
        );
    }
    Ok(u64::from(response.accepted))
}

// --- Raw Postgres baseline ----------------------------------------------------------------

/// How the baseline writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RawMethod {
    /// `INSERT … SELECT FROM unnest($arrays)`: one statement per batch, like the service.
    Unnest,
    /// `COPY … FROM STDIN` in text format: Postgres's fastest load path.
    Copy,
}

/// Where the baseline writes.
#[derive(Debug, Clone, clap::Args)]
pub struct RawTarget {
    /// Postgres URL (only 127.0.0.1 is ever benchmarked).
    #[arg(
        long,
        env = "BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/relance_bench"
    )]
    pub database_url: String,
    #[arg(long, value_enum, default_value_t = RawMethod::Unnest)]
    pub method: RawMethod,
    /// Table to write, created if missing (default: `bench_raw.events_<method>`).
    #[arg(long)]
    pub table: Option<String>,
    /// The workspace id written in every row (the service takes it from the API key).
    #[arg(long, default_value = "bench")]
    pub workspace: String,
}

/// One batch as column arrays.
struct Columns {
    message_ids: Vec<String>,
    names: Vec<String>,
    customers: Vec<Option<String>>,
    anonymous: Vec<Option<String>>,
    times: Vec<DateTime<Utc>>,
    properties: Vec<String>,
    contexts: Vec<String>,
}

impl Columns {
    /// The columns of `events`, JSON already encoded as text (the service also receives
    /// properties decoded and encodes them to text before casting to jsonb).
    fn of(events: &[GenEvent]) -> Columns {
        let mut columns = Columns {
            message_ids: Vec::with_capacity(events.len()),
            names: Vec::with_capacity(events.len()),
            customers: Vec::with_capacity(events.len()),
            anonymous: Vec::with_capacity(events.len()),
            times: Vec::with_capacity(events.len()),
            properties: Vec::with_capacity(events.len()),
            contexts: Vec::with_capacity(events.len()),
        };
        for event in events {
            columns.message_ids.push(event.message_id.clone());
            columns.names.push(event.name.to_owned());
            columns.customers.push(event.customer_id.clone());
            columns.anonymous.push(event.anonymous_id.clone());
            columns.times.push(event.timestamp);
            columns.properties.push(event.properties.to_string());
            columns.contexts.push(event.context_json());
        }
        columns
    }
}

/// Writes every event straight into a plain table with a primary key of
/// (workspace_id, message_id): the cost floor of storing these rows on this machine.
pub async fn raw(target: &RawTarget, load: &Load) -> anyhow::Result<IngestResult> {
    let method_name = match target.method {
        RawMethod::Unnest => "unnest",
        RawMethod::Copy => "copy",
    };
    let table = target
        .table
        .clone()
        .unwrap_or_else(|| format!("bench_raw.events_{method_name}"));
    if !table
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
    {
        anyhow::bail!("--table {table:?}: use lowercase letters, digits, `_` and at most one `.`");
    }
    let options: sqlx::postgres::PgConnectOptions = target
        .database_url
        .parse()
        .with_context(|| format!("--database-url {}", target.database_url))?;
    crate::client::ensure_loopback("--database-url", options.get_host())?;
    let (warmup, timed) = load.generate()?;

    let mut connections = Vec::with_capacity(load.concurrency);
    for _ in 0..load.concurrency {
        let conn = PgConnection::connect_with(&options)
            .await
            .with_context(|| format!("connecting to {}", target.database_url))?;
        connections.push(conn);
    }
    create_table(&mut connections[0], &table).await?;
    let writer = Writer {
        method: target.method,
        table,
        workspace: target.workspace.clone(),
    };
    for chunk in warmup.chunks(load.batch) {
        writer
            .write(&mut connections[0], &Columns::of(chunk))
            .await
            .context("warm-up batch")?;
    }

    let batches = load.deal(timed.chunks(load.batch).map(Columns::of));
    let writer = Arc::new(writer);
    let start = Arc::new(Barrier::new(load.concurrency + 1));
    let mut workers = Vec::with_capacity(load.concurrency);
    for (mut conn, batches) in connections.into_iter().zip(batches) {
        let start = start.clone();
        let writer = writer.clone();
        let mut tally = WorkerTally {
            latencies: stats::new_histogram()?,
            accepted: 0,
        };
        workers.push(tokio::spawn(async move {
            start.wait().await;
            for columns in batches {
                let sent = Instant::now();
                tally.accepted += writer.write(&mut conn, &columns).await?;
                stats::record(&mut tally.latencies, sent.elapsed());
            }
            conn.close().await?;
            Ok(tally)
        }));
    }
    timed_run(load, method_name, workers, start).await
}

async fn create_table(conn: &mut PgConnection, table: &str) -> anyhow::Result<()> {
    if let Some((schema, _)) = table.split_once('.') {
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .execute(&mut *conn)
            .await?;
    }
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS {table} ( \
             workspace_id  text        NOT NULL, \
             message_id    text        NOT NULL, \
             name          text        NOT NULL, \
             customer_id   text, \
             anonymous_id  text, \
             ts            timestamptz NOT NULL, \
             received_at   timestamptz NOT NULL, \
             properties    jsonb       NOT NULL, \
             context       jsonb       NOT NULL, \
             PRIMARY KEY (workspace_id, message_id))"
    );
    sqlx::query(&ddl)
        .execute(&mut *conn)
        .await
        .with_context(|| format!("creating {table}"))?;
    Ok(())
}

/// Writes one batch with the chosen method.
struct Writer {
    method: RawMethod,
    table: String,
    workspace: String,
}

const COLUMNS: &str = "workspace_id, message_id, name, customer_id, anonymous_id, ts, received_at, properties, context";

impl Writer {
    async fn write(&self, conn: &mut PgConnection, columns: &Columns) -> anyhow::Result<u64> {
        let received_at = generate::now();
        match self.method {
            RawMethod::Unnest => {
                let sql = format!(
                    "INSERT INTO {} ({COLUMNS}) \
                     SELECT $1, m, n, c, a, t, $9, p::jsonb, x::jsonb \
                     FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::text[], $8::text[]) \
                         AS u(m, n, c, a, t, p, x)",
                    self.table
                );
                let done = sqlx::query(&sql)
                    .bind(&self.workspace)
                    .bind(&columns.message_ids)
                    .bind(&columns.names)
                    .bind(&columns.customers)
                    .bind(&columns.anonymous)
                    .bind(&columns.times)
                    .bind(&columns.properties)
                    .bind(&columns.contexts)
                    .bind(received_at)
                    .execute(&mut *conn)
                    .await
                    .context("INSERT … unnest")?;
                Ok(done.rows_affected())
            }
            RawMethod::Copy => {
                let payload = copy_text(&self.workspace, columns, received_at);
                let mut copy = conn
                    .copy_in_raw(&format!("COPY {} ({COLUMNS}) FROM STDIN", self.table))
                    .await
                    .context("COPY")?;
                copy.send(payload.into_bytes()).await?;
                Ok(copy.finish().await?)
            }
        }
    }
}

/// The batch in COPY's text format: tab-separated, `\N` for NULL.
fn copy_text(workspace: &str, columns: &Columns, received_at: DateTime<Utc>) -> String {
    let received_at = received_at.to_rfc3339();
    let mut out = String::with_capacity(columns.properties.iter().map(|p| p.len() + 200).sum());
    for i in 0..columns.message_ids.len() {
        let ts = columns.times[i].to_rfc3339();
        let fields = [
            Some(workspace),
            Some(columns.message_ids[i].as_str()),
            Some(columns.names[i].as_str()),
            columns.customers[i].as_deref(),
            columns.anonymous[i].as_deref(),
            Some(ts.as_str()),
            Some(received_at.as_str()),
            Some(columns.properties[i].as_str()),
            Some(columns.contexts[i].as_str()),
        ];
        for (index, field) in fields.iter().enumerate() {
            if index > 0 {
                out.push('\t');
            }
            match field {
                Some(value) => push_copy_escaped(&mut out, value),
                None => out.push_str("\\N"),
            }
        }
        out.push('\n');
    }
    out
}

pub fn push_copy_escaped(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_and_marks_nulls() {
        let columns = Columns {
            message_ids: vec!["m1".into()],
            names: vec!["product_viewed".into()],
            customers: vec![None],
            anonymous: vec![Some("anon-1".into())],
            times: vec![DateTime::UNIX_EPOCH],
            properties: vec![r#"{"note":"a\"b\\c"}"#.into()],
            contexts: vec!["{}".into()],
        };
        let text = copy_text("ws", &columns, DateTime::UNIX_EPOCH);
        let fields: Vec<&str> = text.trim_end_matches('\n').split('\t').collect();
        assert_eq!(fields.len(), 9);
        assert_eq!(fields[3], "\\N");
        assert_eq!(fields[7], r#"{"note":"a\\"b\\\\c"}"#);
    }
}
