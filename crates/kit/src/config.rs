//! Configuration: defaults, then an optional TOML file (`--config FILE` or
//! `RELANCE_CONFIG`), then `RELANCE_*` environment variables — the later layer wins.
//!
//! Top-level keys map to `RELANCE_<KEY>` (`RELANCE_DATABASE_URL`); a service's own section
//! uses a double underscore (`RELANCE_EVENTS__MAX_BATCH`). Everything is validated at start,
//! and an error names the setting at fault.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// The settings every service shares.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// Address of the gRPC (and gRPC-Web) listener.
    pub grpc_addr: SocketAddr,
    /// Address of the admin HTTP listener (`/metrics`, `/livez`).
    pub admin_addr: SocketAddr,
    /// Postgres URL; each service uses its own schema in this database.
    pub database_url: SecretString,
    /// Connections per service pool.
    pub database_max_connections: u32,
    /// Redis URL (hot state only: losing it costs speed, never correctness).
    pub redis_url: SecretString,
    /// Prefix of every Redis key this deployment writes.
    pub redis_prefix: String,
    /// RabbitMQ URL.
    pub amqp_url: SecretString,
    /// Prefix of every exchange and queue name (tests use a unique one each).
    pub amqp_prefix: String,
    /// Queues expire when unused and exchanges auto-delete: for tests only.
    pub amqp_ephemeral: bool,
    /// The key services present to each other (a Kubernetes Secret shared by the
    /// Deployments); unset: a random one per process, enough when every service runs in one.
    pub internal_key: Option<SecretString>,
    /// Where the other services answer, for calls between them.
    #[serde(default)]
    pub services: ServiceEndpoints,
    /// OTLP gRPC endpoint for traces (e.g. `http://otel-collector:4317`); unset: no export.
    pub otlp_endpoint: Option<String>,
    /// `json` (production) or `pretty` (a terminal).
    pub log_format: LogFormat,
    /// A tracing filter such as `info` or `info,relance_events=debug`.
    pub log_level: String,
    /// Run each service's migrations when it starts (a Kubernetes Job can do it instead).
    pub migrate_on_start: bool,
    /// Seconds given to in-flight work to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
    #[serde(skip)]
    layers: Option<config::Config>,
}

/// The gRPC addresses of the services, for calls between them. Unset: this process's own
/// gRPC address (every service in one process, `relance serve --all`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ServiceEndpoints {
    /// The profiles service, e.g. `http://relance-profiles:50051`.
    pub profiles: Option<String>,
    /// The events service.
    pub events: Option<String>,
    /// The recommendations service.
    pub recommendations: Option<String>,
    /// The segmentation service.
    pub segmentation: Option<String>,
    /// The delivery service.
    pub delivery: Option<String>,
}

impl Settings {
    /// The URL of a service (`profiles`, `recommendations`, …) for calls between services.
    pub fn service_url(&self, service: &str) -> String {
        let configured = match service {
            "profiles" => &self.services.profiles,
            "events" => &self.services.events,
            "recommendations" => &self.services.recommendations,
            "segmentation" => &self.services.segmentation,
            "delivery" => &self.services.delivery,
            _ => &None,
        };
        if let Some(url) = configured {
            return url.clone();
        }
        let port = self.grpc_addr.port();
        format!("http://127.0.0.1:{port}")
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line, with trace ids.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// A setting that is missing or wrong.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

const DEFAULTS: &[(&str, &str)] = &[
    ("grpc_addr", "0.0.0.0:50051"),
    ("admin_addr", "0.0.0.0:9090"),
    ("database_url", "postgres://postgres@127.0.0.1:5432/relance"),
    ("database_max_connections", "10"),
    ("redis_url", "redis://127.0.0.1:6379"),
    ("redis_prefix", "relance:"),
    ("amqp_url", "amqp://guest:guest@127.0.0.1:5672/%2f"),
    ("amqp_prefix", ""),
    ("amqp_ephemeral", "false"),
    ("log_format", "json"),
    ("log_level", "info"),
    ("migrate_on_start", "true"),
    ("shutdown_grace_secs", "25"),
];

impl Settings {
    /// Loads defaults, then `file` (or `RELANCE_CONFIG`) if given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder();
        for (key, value) in DEFAULTS {
            builder = builder
                .set_default(*key, *value)
                .map_err(|e| ConfigError(format!("default {key}: {e}")))?;
        }
        let env_file = std::env::var("RELANCE_CONFIG").ok().map(PathBuf::from);
        if let Some(path) = file.map(Path::to_path_buf).or(env_file) {
            if !path.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("RELANCE")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true),
        );
        let layers = builder.build().map_err(|e| ConfigError(e.to_string()))?;
        let mut settings: Settings = layers
            .clone()
            .try_deserialize()
            .map_err(|e| ConfigError(env_hint(e.to_string())))?;
        settings.layers = Some(layers);
        settings.validate()?;
        Ok(settings)
    }

    /// Settings for tests and tools that build them in code.
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let pairs: Vec<(&str, &str)> = DEFAULTS.iter().chain(pairs).copied().collect();
        Settings::overridden(config::Config::builder(), &pairs)
    }

    /// A copy with some settings replaced, e.g. `("segmentation.sweep_every_ms", "50")`.
    pub fn with(&self, pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(layers) = &self.layers {
            builder = builder.add_source(layers.clone());
        }
        Settings::overridden(builder, pairs)
    }

    /// A copy with a TOML document layered on top (sections with lists, such as
    /// `[[delivery.providers]]`, that single pairs cannot express).
    pub fn with_toml(&self, toml: &str) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(layers) = &self.layers {
            builder = builder.add_source(layers.clone());
        }
        builder = builder.add_source(config::File::from_str(toml, config::FileFormat::Toml));
        Settings::overridden(builder, &[])
    }

    /// `builder` with `pairs` on top, read and validated.
    fn overridden(
        mut builder: config::ConfigBuilder<config::builder::DefaultState>,
        pairs: &[(&str, &str)],
    ) -> Result<Settings, ConfigError> {
        for (key, value) in pairs {
            builder = builder
                .set_override(*key, *value)
                .map_err(|e| ConfigError(format!("{key}: {e}")))?;
        }
        let layers = builder.build().map_err(|e| ConfigError(e.to_string()))?;
        let mut settings: Settings = layers
            .clone()
            .try_deserialize()
            .map_err(|e| ConfigError(e.to_string()))?;
        settings.layers = Some(layers);
        settings.validate()?;
        Ok(settings)
    }

    /// A service's own section (`[events]` in the file, `RELANCE_EVENTS__*` in the
    /// environment); missing keys take the section type's defaults.
    pub fn section<T: DeserializeOwned + Default>(&self, name: &str) -> Result<T, ConfigError> {
        let Some(layers) = &self.layers else {
            return Ok(T::default());
        };
        match layers.get::<T>(name) {
            Ok(section) => Ok(section),
            Err(config::ConfigError::NotFound(_)) => Ok(T::default()),
            Err(e) => Err(ConfigError(format!("[{name}] {}", env_hint(e.to_string())))),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let db = self.database_url.expose_secret();
        if !(db.starts_with("postgres://") || db.starts_with("postgresql://")) {
            return Err(ConfigError(
                "RELANCE_DATABASE_URL: must start with postgres:// or postgresql://".into(),
            ));
        }
        if !self.redis_url.expose_secret().starts_with("redis://") {
            return Err(ConfigError(
                "RELANCE_REDIS_URL: must start with redis://".into(),
            ));
        }
        let amqp = self.amqp_url.expose_secret();
        if !(amqp.starts_with("amqp://") || amqp.starts_with("amqps://")) {
            return Err(ConfigError(
                "RELANCE_AMQP_URL: must start with amqp:// or amqps://".into(),
            ));
        }
        if self.database_max_connections == 0 {
            return Err(ConfigError(
                "RELANCE_DATABASE_MAX_CONNECTIONS: must be at least 1".into(),
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return Err(ConfigError(format!(
                "RELANCE_LOG_LEVEL: {:?} is not a valid filter (try `info`)",
                self.log_level
            )));
        }
        if let Some(endpoint) = &self.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(ConfigError(
                "RELANCE_OTLP_ENDPOINT: must start with http:// or https://".into(),
            ));
        }
        Ok(())
    }
}

/// Points a deserialisation error at the environment variable a reader would set.
fn env_hint(message: String) -> String {
    match message.split_once("for key `") {
        Some((_, rest)) => {
            let key = rest.split('`').next().unwrap_or_default();
            format!(
                "RELANCE_{}: {message}",
                key.replace('.', "__").to_uppercase()
            )
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let settings = Settings::from_pairs(&[]).expect("defaults load");
        assert_eq!(settings.grpc_addr.port(), 50051);
        assert_eq!(settings.log_format, LogFormat::Json);
    }

    #[test]
    fn a_bad_database_url_names_the_variable() {
        let error = Settings::from_pairs(&[("database_url", "mysql://x")]).expect_err("refused");
        assert!(
            error.to_string().contains("RELANCE_DATABASE_URL"),
            "{error}"
        );
    }

    #[test]
    fn a_bad_address_names_the_key() {
        let error = Settings::from_pairs(&[("grpc_addr", "nowhere")]).expect_err("refused");
        assert!(error.to_string().contains("grpc_addr"), "{error}");
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default)]
    struct Section {
        max_batch: u32,
    }

    #[test]
    fn sections_default_when_absent_and_read_when_present() {
        let settings = Settings::from_pairs(&[]).expect("defaults load");
        assert_eq!(
            settings.section::<Section>("events").expect("section"),
            Section::default()
        );
        let settings = Settings::from_pairs(&[("events.max_batch", "7")]).expect("loads");
        assert_eq!(
            settings
                .section::<Section>("events")
                .expect("section")
                .max_batch,
            7
        );
    }
}
