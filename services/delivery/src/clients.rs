//! Calls to the other services: profiles (who the recipient is, feedback of dead addresses
//! and unsubscribes) and recommendations (a template's products block, with a deadline and
//! a cached fallback).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use relance_kit::Settings;
use relance_kit::auth::InternalKey;
use relance_proto::v1::profiles_client::ProfilesClient;
use relance_proto::v1::recommendations_client::RecommendationsClient;
use relance_proto::v1::{
    BatchGetProfilesRequest, Channel, Consent, ConsentStatus, CustomerRef, Placement, Profile,
    RecommendRequest, RecommendedItem, SetConsentRequest, UpsertProfileRequest, customer_ref,
};
use tonic::transport::{Channel as GrpcChannel, Endpoint};

/// How long the trending fallback is trusted.
const TRENDING_TTL: Duration = Duration::from_secs(300);

/// The key a recipient is known by in maps: `c:<customer_id>` or `a:<anonymous_id>`.
pub fn recipient_key(customer: &CustomerRef) -> String {
    match &customer.id {
        Some(customer_ref::Id::CustomerId(id)) => format!("c:{id}"),
        Some(customer_ref::Id::AnonymousId(id)) => format!("a:{id}"),
        None => String::new(),
    }
}

/// Items and when they were fetched.
type CachedItems = (Instant, Vec<RecommendedItem>);

/// The other services, reached with the deployment's internal key.
#[derive(Clone)]
pub struct Clients {
    profiles: ProfilesClient<GrpcChannel>,
    recommendations: RecommendationsClient<GrpcChannel>,
    key: InternalKey,
    trending: Arc<Mutex<HashMap<String, CachedItems>>>,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients").finish()
    }
}

fn endpoint(url: &str) -> anyhow::Result<GrpcChannel> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .connect_lazy())
}

impl Clients {
    /// Clients of the services at the configured addresses (connected on first use).
    pub fn new(settings: &Settings, key: InternalKey) -> anyhow::Result<Clients> {
        Ok(Clients {
            profiles: ProfilesClient::new(endpoint(&settings.service_url("profiles"))?),
            recommendations: RecommendationsClient::new(endpoint(
                &settings.service_url("recommendations"),
            )?),
            key,
            trending: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// The profiles of `customers`, by [`recipient_key`]; customers without one are absent.
    pub async fn profiles(
        &self,
        workspace_id: &str,
        customers: &[CustomerRef],
    ) -> Result<HashMap<String, Profile>, tonic::Status> {
        let mut found = HashMap::with_capacity(customers.len());
        for chunk in customers.chunks(500) {
            let request = BatchGetProfilesRequest {
                customers: chunk.to_vec(),
            };
            let response = self
                .profiles
                .clone()
                .batch_get(self.key.request(workspace_id, request))
                .await?
                .into_inner();
            for profile in response.profiles {
                if !profile.customer_id.is_empty() {
                    found.insert(format!("c:{}", profile.customer_id), profile.clone());
                }
                for anonymous in &profile.anonymous_ids {
                    found.insert(format!("a:{anonymous}"), profile.clone());
                }
            }
        }
        Ok(found)
    }

    /// Removes a push token the provider declared dead from the customer's profile.
    pub async fn remove_push_token(
        &self,
        workspace_id: &str,
        customer: CustomerRef,
        token: &str,
    ) -> Result<(), tonic::Status> {
        let request = UpsertProfileRequest {
            customer: Some(customer),
            remove_push_tokens: vec![token.to_owned()],
            ..UpsertProfileRequest::default()
        };
        self.profiles
            .clone()
            .upsert(self.key.request(workspace_id, request))
            .await?;
        Ok(())
    }

    /// Records an opt-out (an unsubscribe link, or a provider reporting the address as
    /// unsubscribed).
    pub async fn opt_out(
        &self,
        workspace_id: &str,
        customer: CustomerRef,
        channel: Channel,
        topic: &str,
        source: &str,
    ) -> Result<(), tonic::Status> {
        let request = SetConsentRequest {
            customer: Some(customer),
            consent: Some(Consent {
                channel: channel as i32,
                topic: topic.to_owned(),
                status: ConsentStatus::OptedOut as i32,
                updated_at: None,
                source: source.to_owned(),
            }),
        };
        self.profiles
            .clone()
            .set_consent(self.key.request(workspace_id, request))
            .await?;
        Ok(())
    }

    /// Products for a template's block, within `timeout`. Whatever happens the message goes
    /// out: on timeout or error the answer is the workspace's trending items (as last
    /// cached) when `trending_fallback`, else nothing; the flag says a fallback was used.
    pub async fn products(
        &self,
        workspace_id: &str,
        request: RecommendRequest,
        timeout: Duration,
        trending_fallback: bool,
    ) -> (Vec<RecommendedItem>, bool) {
        let n = request.n;
        let mut client = self.recommendations.clone();
        let call = client.recommend(self.key.request(workspace_id, request));
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(response)) => return (response.into_inner().items, false),
            Ok(Err(status)) => {
                tracing::warn!(workspace = %workspace_id, code = ?status.code(), message = %status.message(), "recommendations failed, products fall back");
            }
            Err(_) => {
                tracing::debug!(workspace = %workspace_id, ?timeout, "recommendations timed out, products fall back");
            }
        }
        metrics::counter!("relance_delivery_products_fallbacks_total").increment(1);
        if !trending_fallback {
            return (Vec::new(), true);
        }
        let mut items = self.cached_trending(workspace_id);
        items.truncate(n.max(1) as usize);
        (items, true)
    }

    fn cached_trending(&self, workspace_id: &str) -> Vec<RecommendedItem> {
        let fresh = {
            let cache = self.trending.lock().unwrap_or_else(|p| p.into_inner());
            match cache.get(workspace_id) {
                Some((at, items)) if at.elapsed() < TRENDING_TTL => return items.clone(),
                Some((_, items)) => Some(items.clone()),
                None => None,
            }
        };
        // Refresh in the background: the message being rendered does not wait for it.
        let clients = self.clone();
        let workspace = workspace_id.to_owned();
        tokio::spawn(async move { clients.refresh_trending(&workspace).await });
        fresh.unwrap_or_default()
    }

    /// Asks recommendations for the workspace's trending items (a visitor's home page) and
    /// caches them as the products fallback.
    pub async fn refresh_trending(&self, workspace_id: &str) {
        let request = RecommendRequest {
            customer: Some(CustomerRef {
                id: Some(customer_ref::Id::AnonymousId(
                    "relance-delivery-trending".into(),
                )),
            }),
            placement: Placement::Home as i32,
            n: 12,
            include_details: true,
            seed: Some(0),
            ..RecommendRequest::default()
        };
        let mut client = self.recommendations.clone();
        let call = client.recommend(self.key.request(workspace_id, request));
        match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(Ok(response)) => {
                let items = response.into_inner().items;
                self.trending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(workspace_id.to_owned(), (Instant::now(), items));
            }
            Ok(Err(status)) => {
                tracing::debug!(workspace = %workspace_id, code = ?status.code(), "trending refresh failed");
            }
            Err(_) => tracing::debug!(workspace = %workspace_id, "trending refresh timed out"),
        }
    }
}
