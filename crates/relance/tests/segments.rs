//! The built-in segments on the full Online Retail data set, checked against SQL written
//! independently over the raw events.
//!
//! Reference date: the platform's clock stands at 2011-12-10 00:00 UTC, the day after the
//! last invoice (2011-12-09). RFM scores are computed by profiles as of that instant, and
//! the windows of the inactive segments count UTC days back from it.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{TimeZone as _, Utc};
use relance_kit::testing::{TestApp, TestEnv, authed};
use relance_kit::{ManualClock, SharedClock};
use relance_proto::v1 as pb;
use relance_proto::v1::segments_client::SegmentsClient;
use sqlx::Connection as _;

/// Independent reference: scores each buyer from the raw events (the quintile rule of
/// profiles, spelled out in SQL with percentile_cont) and files them in the grid's cells;
/// files each buyer by the UTC day of their last order for the inactive segments.
const REFERENCE_SQL: &str = "
WITH person_events AS (
    SELECT COALESCE(customer_id, anonymous_id) AS person, name, ts,
           (properties->>'revenue')::float8 AS revenue
    FROM events.events WHERE workspace_id = $1 AND name IN ('order_completed', 'order_refunded')
), buyers AS (
    SELECT person,
           count(*) FILTER (WHERE name = 'order_completed')::float8 AS orders,
           coalesce(sum(revenue) FILTER (WHERE name = 'order_completed'), 0)
             - coalesce(sum(abs(revenue)) FILTER (WHERE name = 'order_refunded'), 0) AS revenue,
           max(ts) FILTER (WHERE name = 'order_completed') AS last_order
    FROM person_events GROUP BY person
    HAVING count(*) FILTER (WHERE name = 'order_completed') > 0
), measures AS (
    SELECT person, orders, revenue, last_order,
           EXTRACT(EPOCH FROM ($2::timestamptz - last_order))::float8 / 86400.0 AS days
    FROM buyers
), quintiles AS (
    SELECT percentile_cont(ARRAY[0.2, 0.4, 0.6, 0.8]) WITHIN GROUP (ORDER BY days) AS r,
           percentile_cont(ARRAY[0.2, 0.4, 0.6, 0.8]) WITHIN GROUP (ORDER BY orders) AS f
    FROM measures
), scored AS (
    SELECT m.person, m.last_order,
           5 - (SELECT count(*) FROM unnest(q.r) AS t(v) WHERE m.days > t.v) AS r,
           1 + (SELECT count(*) FROM unnest(q.f) AS t(v) WHERE m.orders > t.v) AS f
    FROM measures m, quintiles q
), today AS (
    SELECT (EXTRACT(EPOCH FROM $2::timestamptz)::bigint / 86400) AS day
), filed AS (
    SELECT CASE
             WHEN r >= 4 AND f >= 4 THEN 'champions'
             WHEN r >= 4 AND f BETWEEN 2 AND 3 THEN 'potential-loyalists'
             WHEN r >= 4 AND f = 1 THEN 'new-customers'
             WHEN r = 3 AND f >= 3 THEN 'loyal'
             WHEN r = 3 THEN 'hibernating'
             WHEN f >= 4 THEN 'cant-lose'
             WHEN f BETWEEN 2 AND 3 THEN 'at-risk'
             ELSE 'lost'
           END AS segment
    FROM scored
    UNION ALL
    SELECT CASE
             WHEN d BETWEEN t.day - 60 AND t.day - 31 THEN 'inactive-30d'
             WHEN d BETWEEN t.day - 90 AND t.day - 61 THEN 'inactive-60d'
             WHEN d <= t.day - 91 THEN 'inactive-90d'
           END
    FROM (SELECT EXTRACT(EPOCH FROM last_order)::bigint / 86400 AS d FROM scored) s, today t
)
SELECT segment, count(*) AS members FROM filed WHERE segment IS NOT NULL GROUP BY segment";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfm_grid_and_inactive_segments_match_sql_over_the_raw_events() {
    let env = Arc::new(TestEnv::new().await);
    let settings = env
        .settings
        .with(&[
            ("profiles.rescore_after_purchases_secs", "5"),
            ("segmentation.build_poll_ms", "200"),
        ])
        .expect("settings");
    let reference = Utc
        .with_ymd_and_hms(2011, 12, 10, 0, 0, 0)
        .single()
        .expect("date");
    let clock: SharedClock = ManualClock::new(reference);
    let app = TestApp::start(
        env,
        settings,
        clock,
        Box::new(|platform, server| {
            Box::pin(async move {
                relance_profiles::serve(platform, server).await?;
                relance_events::serve(platform, server).await?;
                relance_segmentation::serve(platform, server).await
            })
        }),
    )
    .await;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let relance = |args: &[&str]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_relance"));
        command
            .args(args)
            .current_dir(root)
            .env("RELANCE_ADDR", format!("http://{}", app.addr))
            .env("RELANCE_API_KEY", &app.admin_key);
        command
    };
    let imported = relance(&[
        "import",
        "online-retail",
        "examples/data/online-retail.csv.gz",
        "--quiet",
    ])
    .output()
    .await
    .expect("run relance import");
    assert!(
        imported.status.success(),
        "import: {}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let applied = relance(&["apply", "-f", "examples/segments/", "--wait"])
        .output()
        .await
        .expect("run relance apply");
    let stdout = String::from_utf8_lossy(&applied.stdout);
    assert!(
        applied.status.success(),
        "apply: {stdout}{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    // 14 RFM, lifecycle and inactivity segments, and the 5 the example flows use.
    assert_eq!(
        stdout.matches(" applied (version 1)").count(),
        19,
        "{stdout}"
    );
    assert_eq!(stdout.matches(" members").count(), 19, "{stdout}");

    let mut db = sqlx::PgConnection::connect(&app.env.database_url())
        .await
        .expect("db");
    let rows: Vec<(String, i64)> = sqlx::query_as(REFERENCE_SQL)
        .bind(&app.workspace)
        .bind(reference)
        .fetch_all(&mut db)
        .await
        .expect("reference query");
    let expected: BTreeMap<String, i64> = rows.into_iter().collect();
    let grid = [
        "champions",
        "loyal",
        "potential-loyalists",
        "new-customers",
        "at-risk",
        "cant-lose",
        "hibernating",
        "lost",
    ];
    let buyers: i64 = grid
        .iter()
        .map(|s| expected.get(*s).copied().unwrap_or(0))
        .sum();
    assert!(buyers > 4_000, "the import made buyers: {expected:?}");

    let segments = SegmentsClient::new(app.channel().await);
    let key = app.admin_key.clone();
    let names: Vec<&str> = grid
        .iter()
        .copied()
        .chain(["inactive-30d", "inactive-60d", "inactive-90d"])
        .collect();
    // Traits keep arriving for a while after the import (RFM rescoring); wait until the
    // counts settle on the reference, and show both sides if they never do.
    let wanted: BTreeMap<String, i64> = names
        .iter()
        .map(|n| ((*n).to_owned(), expected.get(*n).copied().unwrap_or(0)))
        .collect();
    let started = std::time::Instant::now();
    // Generous: the profiles consumer rescoring 4,000 customers from 23,000 events takes
    // minutes on a 2-core host that is also building and running the other tests (and
    // loses CPU to its hypervisor); the check is about the counts, not the speed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(900);
    loop {
        let mut actual = BTreeMap::new();
        for name in &names {
            let count = segments
                .clone()
                .count(authed(
                    &key,
                    pb::CountSegmentRequest {
                        name: (*name).into(),
                    },
                ))
                .await
                .expect("count")
                .into_inner();
            actual.insert((*name).to_owned(), count.count as i64);
        }
        if actual == wanted {
            println!(
                "reference date 2011-12-10, counts: {actual:?} (settled {:?} after apply)",
                started.elapsed()
            );
            break;
        }
        if std::time::Instant::now() >= deadline {
            let profiles: Vec<(i16, i16, i64)> = sqlx::query_as("SELECT rfm_recency, rfm_frequency, count(*) FROM profiles.profiles WHERE orders_count > 0 GROUP BY 1, 2 ORDER BY 1, 2").fetch_all(&mut db).await.expect("diag");
            let people: Vec<(Option<String>, Option<String>, i64)> = sqlx::query_as("SELECT traits->'rfm'->>'recency', traits->'rfm'->>'frequency', count(*) FROM segments.people GROUP BY 1, 2 ORDER BY 1, 2").fetch_all(&mut db).await.expect("diag");
            eprintln!("profiles: {profiles:?}\npeople: {people:?}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "segment counts never matched the SQL reference\n  relance: {actual:?}\n  sql:     {wanted:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    app.stop().await;
}
