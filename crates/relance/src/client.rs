//! gRPC clients of the CLI, carrying the API key.

use relance_proto::v1::events_client::EventsClient;
use relance_proto::v1::profiles_client::ProfilesClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Where the CLI finds Relance and which key it uses.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Address of Relance's gRPC endpoint.
    #[arg(long, env = "RELANCE_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// API key (`relance key create …`).
    #[arg(long = "api-key", env = "RELANCE_API_KEY", hide_env_values = true)]
    pub api_key: String,
}

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Debug, Clone)]
pub struct WithKey(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for WithKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, WithKey>;

/// Connected clients.
#[derive(Debug, Clone)]
pub struct Clients {
    pub profiles: ProfilesClient<Authed>,
    pub events: EventsClient<Authed>,
}

impl Target {
    /// Connects.
    pub async fn connect(&self) -> anyhow::Result<Clients> {
        let channel = Channel::from_shared(self.addr.clone())?
            .connect()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach Relance at {} ({e}); is `relance serve` running?",
                    self.addr
                )
            })?;
        let key: MetadataValue<_> = format!("Bearer {}", self.api_key)
            .parse()
            .map_err(|_| anyhow::anyhow!("--api-key: not a valid key"))?;
        let with_key = WithKey(key);
        Ok(Clients {
            profiles: ProfilesClient::with_interceptor(channel.clone(), with_key.clone()),
            events: EventsClient::with_interceptor(channel, with_key)
                .max_encoding_message_size(16 * 1024 * 1024),
        })
    }
}
