//! relance-kit: what every Relance service stands on.
//!
//! A service crate gets from here its configuration ([`config`]), logs, traces and metrics
//! ([`telemetry`], [`metrics`]), its gRPC server with health, reflection, gRPC-Web, API-key
//! auth and graceful shutdown ([`grpc`], [`auth`]), the one mapping of errors to gRPC
//! statuses ([`error`]), Postgres ([`db`]), RabbitMQ ([`bus`], [`outbox`]), Redis
//! ([`cache`]) and time ([`clock`]).
#![forbid(unsafe_code)]

pub mod auth;
pub mod bus;
pub mod cache;
pub mod clock;
pub mod config;
pub mod db;
pub mod error;
pub mod grpc;
pub mod messages;
pub mod metrics;
pub mod outbox;
pub mod platform;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trace;
pub mod yaml;

pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use config::Settings;
pub use error::{ApiError, ApiResult};
pub use platform::Platform;
