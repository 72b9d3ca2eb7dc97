//! `relance serve` and `relance migrate`.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use relance_kit::auth::KeyStore;
use relance_kit::grpc::GrpcServer;
use relance_kit::{Platform, Settings, SharedClock, SystemClock, db};

/// The services this binary can run, in start order.
pub const SERVICES: &[&str] = &[
    "profiles",
    "events",
    "segmentation",
    "recommendations",
    "delivery",
    "campaigns",
];

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Services to run (profiles, events, segmentation, recommendations, delivery, campaigns).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(SERVICES))]
    services: Vec<String>,
    /// Run every service.
    #[arg(long, conflicts_with = "services")]
    all: bool,
}

/// Runs the chosen services until SIGTERM/Ctrl-C, then drains.
pub async fn run(settings: Settings, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let services: Vec<String> = if args.all {
        SERVICES.iter().map(|s| s.to_string()).collect()
    } else {
        args.services
    };
    if services.is_empty() {
        anyhow::bail!("name the services to run (relance serve profiles events) or pass --all");
    }
    let _telemetry =
        relance_kit::telemetry::init(&settings, &format!("relance-{}", services.join("-")))?;
    let clock: SharedClock = Arc::new(SystemClock);
    let platform = start(settings, clock, &services).await?;
    platform.0.cancel_on_signal();
    let (platform, server, listener) = platform;
    tracing::info!(services = ?server.service_names(), addr = %listener.local_addr()?, "serving");
    server.serve(&platform, listener).await?;
    platform.drain().await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Connects the platform, starts `services`, binds the gRPC and admin listeners.
pub async fn start(
    settings: Settings,
    clock: SharedClock,
    services: &[String],
) -> anyhow::Result<(Platform, GrpcServer, tokio::net::TcpListener)> {
    let metrics = relance_kit::metrics::recorder();
    let platform = Platform::start(settings, clock).await?;
    let mut server = GrpcServer::new();
    for service in services {
        match service.as_str() {
            "profiles" => relance_profiles::serve(&platform, &mut server)
                .await
                .context("starting profiles")?,
            "events" => relance_events::serve(&platform, &mut server)
                .await
                .context("starting events")?,
            "segmentation" => relance_segmentation::serve(&platform, &mut server)
                .await
                .context("starting segmentation")?,
            "recommendations" => relance_recommendations::serve(&platform, &mut server)
                .await
                .context("starting recommendations")?,
            "delivery" => relance_delivery::serve(&platform, &mut server)
                .await
                .context("starting delivery")?,
            "campaigns" => relance_campaigns::serve(&platform, &mut server)
                .await
                .context("starting campaigns")?,
            other => anyhow::bail!("unknown service {other:?} (known: {})", SERVICES.join(", ")),
        }
    }
    let admin = relance_kit::metrics::serve_admin(
        platform.settings.admin_addr,
        metrics,
        platform.shutdown.clone(),
    )
    .await
    .with_context(|| {
        format!(
            "binding the admin listener on {}",
            platform.settings.admin_addr
        )
    })?;
    tracing::info!(%admin, "admin listener (/metrics, /livez)");
    let listener = tokio::net::TcpListener::bind(platform.settings.grpc_addr)
        .await
        .with_context(|| {
            format!(
                "binding the gRPC listener on {}",
                platform.settings.grpc_addr
            )
        })?;
    Ok((platform, server, listener))
}

/// Applies every schema's migrations.
pub async fn migrate(settings: &Settings) -> anyhow::Result<ExitCode> {
    let schemas: [(&str, &sqlx::migrate::Migrator); 7] = [
        ("auth", &relance_kit::platform::AUTH_MIGRATOR),
        (relance_profiles::SCHEMA, &relance_profiles::MIGRATOR),
        (relance_events::SCHEMA, &relance_events::MIGRATOR),
        (
            relance_segmentation::SCHEMA,
            &relance_segmentation::MIGRATOR,
        ),
        (
            relance_recommendations::SCHEMA,
            &relance_recommendations::MIGRATOR,
        ),
        (relance_delivery::SCHEMA, &relance_delivery::MIGRATOR),
        (relance_campaigns::SCHEMA, &relance_campaigns::MIGRATOR),
    ];
    for (schema, migrator) in schemas {
        let pool = db::connect(settings, schema).await?;
        db::migrate(&pool, migrator, schema).await?;
        println!("{schema}: migrated");
    }
    Ok(ExitCode::SUCCESS)
}

/// The API-key store, migrated.
pub async fn key_store(settings: &Settings) -> anyhow::Result<KeyStore> {
    let pool = db::connect(settings, "auth").await?;
    db::migrate(&pool, &relance_kit::platform::AUTH_MIGRATOR, "auth").await?;
    Ok(KeyStore::new(pool))
}
