//! gRPC clients of the CLI, carrying the API key.

use relance_kit::auth::BearerKey;
use relance_proto::v1::campaigns_client::CampaignsClient;
use relance_proto::v1::delivery_client::DeliveryClient;
use relance_proto::v1::events_client::EventsClient;
use relance_proto::v1::profiles_client::ProfilesClient;
use relance_proto::v1::recommendations_client::RecommendationsClient;
use relance_proto::v1::segments_client::SegmentsClient;
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

type Authed = InterceptedService<Channel, BearerKey>;

/// Connected clients.
#[derive(Debug, Clone)]
pub struct Clients {
    pub profiles: ProfilesClient<Authed>,
    pub events: EventsClient<Authed>,
    pub segments: SegmentsClient<Authed>,
    pub recommendations: RecommendationsClient<Authed>,
    pub delivery: DeliveryClient<Authed>,
    pub campaigns: CampaignsClient<Authed>,
}

impl Target {
    /// Connects.
    pub async fn connect(&self) -> anyhow::Result<Clients> {
        let key = BearerKey::new(&self.api_key)
            .map_err(|_| anyhow::anyhow!("--api-key: not a valid key"))?;
        let channel = Channel::from_shared(self.addr.clone())?
            .connect()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach Relance at {} ({e}); is `relance serve` running?",
                    self.addr
                )
            })?;
        Ok(Clients {
            profiles: ProfilesClient::with_interceptor(channel.clone(), key.clone()),
            segments: SegmentsClient::with_interceptor(channel.clone(), key.clone()),
            recommendations: RecommendationsClient::with_interceptor(channel.clone(), key.clone()),
            delivery: DeliveryClient::with_interceptor(channel.clone(), key.clone()),
            campaigns: CampaignsClient::with_interceptor(channel.clone(), key.clone()),
            events: EventsClient::with_interceptor(channel, key)
                .max_encoding_message_size(16 * 1024 * 1024),
        })
    }
}
