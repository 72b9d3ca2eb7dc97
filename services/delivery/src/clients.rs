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
    BatchGetProfilesRequest, CatalogItem, Channel, Consent, ConsentStatus, CustomerRef,
    GetItemsRequest, Placement, Profile, RecommendRequest, RecommendedItem, SetConsentRequest,
    UpsertProfileRequest, customer_ref,
};
use tonic::transport::{Channel as GrpcChannel, Endpoint};

/// How long the trending fallback is trusted.
const TRENDING_TTL: Duration = Duration::from_secs(300);
/// How long an item's details (title, price, URL) are trusted: a price change shows in
/// messages within this time.
const CATALOG_TTL: Duration = Duration::from_secs(60);
/// Items whose details are kept (all workspaces); the cache starts over beyond that.
const CATALOG_CACHE_ITEMS: usize = 200_000;
/// Recommendation calls in flight at once; beyond that, products blocks fall back.
const MAX_CALLS_IN_FLIGHT: usize = 256;

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
/// One item's details and when they were fetched.
type CachedItem = (Instant, CatalogItem);

/// The other services, reached with the deployment's internal key.
#[derive(Clone)]
pub struct Clients {
    profiles: ProfilesClient<GrpcChannel>,
    recommendations: RecommendationsClient<GrpcChannel>,
    key: InternalKey,
    trending: Arc<Mutex<HashMap<String, CachedItems>>>,
    catalog: Arc<Mutex<HashMap<(String, String), CachedItem>>>,
    in_flight: Arc<tokio::sync::Semaphore>,
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
            catalog: Arc::new(Mutex::new(HashMap::new())),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_CALLS_IN_FLIGHT)),
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
    ///
    /// A call that misses the deadline is not cancelled: it finishes in the background
    /// (a cancelled HTTP/2 stream is a reset, and a server that sees many resets closes the
    /// connection, failing every call on it). At most `MAX_CALLS_IN_FLIGHT` run at once;
    /// beyond that the block falls back at once, so a slow recommendations service sheds
    /// the load instead of queueing it. Item details (title, price, URL…) come from a
    /// local cache of the catalog, filled by GetItems for the ids it lacks.
    pub async fn products(
        &self,
        workspace_id: &str,
        mut request: RecommendRequest,
        timeout: Duration,
        trending_fallback: bool,
    ) -> (Vec<RecommendedItem>, bool) {
        let n = request.n;
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            metrics::counter!("relance_delivery_products_fallbacks_total", "cause" => "busy")
                .increment(1);
            return self.fallback(workspace_id, n, trending_fallback);
        };
        request.include_details = false;
        let clients = self.clone();
        let workspace = workspace_id.to_owned();
        let call = tokio::spawn(async move {
            let _permit = permit;
            clients.recommend_with_details(&workspace, request).await
        });
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(Ok(items))) => return (items, false),
            Ok(Ok(Err(status))) => {
                tracing::debug!(workspace = %workspace_id, code = ?status.code(), message = %status.message(), "recommendations failed, products fall back");
                metrics::counter!("relance_delivery_products_fallbacks_total", "cause" => "error")
                    .increment(1);
            }
            Ok(Err(_)) => {
                metrics::counter!("relance_delivery_products_fallbacks_total", "cause" => "error")
                    .increment(1);
            }
            Err(_) => {
                metrics::counter!("relance_delivery_products_fallbacks_total", "cause" => "timeout").increment(1);
            }
        }
        self.fallback(workspace_id, n, trending_fallback)
    }

    fn fallback(&self, workspace_id: &str, n: u32, trending: bool) -> (Vec<RecommendedItem>, bool) {
        if !trending {
            return (Vec::new(), true);
        }
        let mut items = self.cached_trending(workspace_id);
        items.truncate(n.max(1) as usize);
        (items, true)
    }

    /// Recommend (without details), then the items' details from the cache or GetItems.
    async fn recommend_with_details(
        &self,
        workspace_id: &str,
        request: RecommendRequest,
    ) -> Result<Vec<RecommendedItem>, tonic::Status> {
        let mut items = self
            .recommendations
            .clone()
            .recommend(self.key.request(workspace_id, request))
            .await?
            .into_inner()
            .items;
        let mut missing = Vec::new();
        {
            let cache = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
            for item in &mut items {
                match cache.get(&(workspace_id.to_owned(), item.item_id.clone())) {
                    Some((at, details)) if at.elapsed() < CATALOG_TTL => {
                        item.item = Some(details.clone())
                    }
                    _ => missing.push(item.item_id.clone()),
                }
            }
        }
        if missing.is_empty() {
            return Ok(items);
        }
        let found = self
            .recommendations
            .clone()
            .get_items(
                self.key
                    .request(workspace_id, GetItemsRequest { ids: missing }),
            )
            .await?
            .into_inner()
            .items;
        let mut cache = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > CATALOG_CACHE_ITEMS {
            cache.clear();
        }
        let now = Instant::now();
        for details in found {
            cache.insert(
                (workspace_id.to_owned(), details.id.clone()),
                (now, details),
            );
        }
        for item in &mut items {
            if item.item.is_none()
                && let Some((_, details)) =
                    cache.get(&(workspace_id.to_owned(), item.item_id.clone()))
            {
                item.item = Some(details.clone());
            }
        }
        Ok(items)
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
