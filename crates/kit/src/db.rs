//! Postgres: one pool per service, confined to the service's own schema.
//!
//! Each service owns one schema (`profiles`, `events`, …) and reaches it through a pool whose
//! `search_path` is that schema, so its SQL names its tables unqualified and its migrations
//! (with their own `_sqlx_migrations` table) live beside them. No service reads another's
//! schema: they talk over gRPC and RabbitMQ.

use std::str::FromStr as _;
use std::time::Duration;

use anyhow::Context as _;
use secrecy::ExposeSecret as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};

use crate::config::Settings;

/// Connects a pool to `schema`, creating the schema if needed.
pub async fn connect(settings: &Settings, schema: &str) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(settings.database_url.expose_secret())
        .context("RELANCE_DATABASE_URL")?
        .application_name(&format!("relance-{schema}"))
        .options([("search_path", schema)]);
    let pool = PgPoolOptions::new()
        .max_connections(settings.database_max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .with_context(|| format!("connecting to Postgres for schema {schema}"))?;
    let created = sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
        .execute(&pool)
        .await;
    if let Err(error) = created {
        // Two services starting together may race on CREATE SCHEMA; the loser finds it made.
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(schema)
                .fetch_one(&pool)
                .await?;
        if !exists {
            return Err(error).context("creating the schema");
        }
    }
    Ok(pool)
}

/// Runs `migrator` on the pool's schema.
pub async fn migrate(
    pool: &PgPool,
    migrator: &sqlx::migrate::Migrator,
    schema: &str,
) -> anyhow::Result<()> {
    migrator
        .run(pool)
        .await
        .with_context(|| format!("migrating schema {schema}"))
}

/// Records that `consumer` handled `message_id`, inside the caller's transaction; `false`
/// when it was handled before (a redelivery), in which case the caller does nothing.
///
/// Each schema that consumes messages has a `processed_messages` table for this.
pub async fn first_delivery(
    conn: &mut PgConnection,
    consumer: &str,
    message_id: &str,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "INSERT INTO processed_messages (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .bind(message_id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}
