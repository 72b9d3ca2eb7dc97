//! gRPC connections to the events service, carrying the API key.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use relance_kit::auth::BearerKey;
use relance_proto::v1::events_client::EventsClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Where the service is and which key to use.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Address of the gRPC endpoint (only 127.0.0.1 is ever benchmarked).
    #[arg(long, env = "RELANCE_ADDR", default_value = "http://127.0.0.1:50061")]
    pub addr: String,
    /// API key with the `ingest` (or `admin`) scope.
    #[arg(long = "api-key", env = "RELANCE_API_KEY", hide_env_values = true)]
    pub api_key: String,
}

pub type Client = EventsClient<InterceptedService<Channel, BearerKey>>;

/// A call that takes longer has failed: it keeps a stuck server from hanging the benchmark.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to keep retrying the first connection (the server may still be starting).
const CONNECT_PATIENCE: Duration = Duration::from_secs(15);

impl Target {
    /// `count` clients, each on its own HTTP/2 connection, so that concurrent callers do not
    /// share one TCP stream (as separate application instances would not).
    pub async fn connect(&self, count: usize) -> anyhow::Result<Vec<Client>> {
        let key = BearerKey::new(&self.api_key)
            .map_err(|_| anyhow::anyhow!("--api-key: not a valid key"))?;
        let endpoint = Endpoint::from_shared(self.addr.clone())
            .with_context(|| format!("--addr {}", self.addr))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(CALL_TIMEOUT);
        ensure_loopback("--addr", endpoint.uri().host().unwrap_or_default())?;
        let mut clients = Vec::with_capacity(count);
        for _ in 0..count.max(1) {
            let channel = connect_with_retry(&endpoint).await?;
            clients.push(
                EventsClient::with_interceptor(channel, key.clone())
                    .max_encoding_message_size(16 * 1024 * 1024),
            );
        }
        Ok(clients)
    }
}

/// Load is only ever generated against this machine: a benchmark pointed at a shared or
/// production host by mistake would be an outage, not a measurement.
pub fn ensure_loopback(what: &str, host: &str) -> anyhow::Result<()> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        anyhow::bail!(
            "{what}: {host:?} is not this machine; load tests only run against 127.0.0.1"
        );
    }
    Ok(())
}

async fn connect_with_retry(endpoint: &Endpoint) -> anyhow::Result<Channel> {
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(error) if Instant::now() < deadline => {
                eprintln!("waiting for {} ({error})", endpoint.uri());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => {
                return Err(anyhow::anyhow!(
                    "cannot reach {} ({error}); is `relance serve events` running?",
                    endpoint.uri()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets() {
        assert!(ensure_loopback("x", "127.0.0.1").is_ok());
        assert!(ensure_loopback("x", "localhost").is_ok());
        assert!(ensure_loopback("x", "[::1]").is_ok());
        assert!(ensure_loopback("x", "10.0.0.5").is_err());
        assert!(ensure_loopback("x", "db.example.com").is_err());
    }
}
