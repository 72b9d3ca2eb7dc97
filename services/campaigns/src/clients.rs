//! Calls to the other services, with the deployment's internal key: profiles (timezone,
//! attributes and traits of the customers whose journeys are due; `update` steps),
//! segmentation (membership, audiences) and delivery (do the templates exist).

use std::collections::HashMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use relance_kit::Settings;
use relance_kit::auth::InternalKey;
use relance_proto::convert::{json_to_struct, struct_to_json};
use relance_proto::v1::delivery_client::DeliveryClient;
use relance_proto::v1::profiles_client::ProfilesClient;
use relance_proto::v1::segments_client::SegmentsClient;
use relance_proto::v1::{
    BatchGetProfilesRequest, CountSegmentRequest, CustomerRef, GetSegmentRequest,
    GetTemplateRequest, IsSegmentMemberRequest, ListSegmentMembersRequest, UpsertProfileRequest,
    customer_ref,
};
use tonic::Code;
use tonic::transport::{Channel as GrpcChannel, Endpoint};

/// How many membership checks run at once.
const MEMBERSHIP_CONCURRENCY: usize = 32;

/// What the engine needs of a profile.
#[derive(Debug, Clone, Default)]
pub struct ProfileFacts {
    pub timezone: Option<String>,
    pub attributes: serde_json::Value,
    pub traits: serde_json::Value,
}

/// The other services.
#[derive(Clone)]
pub struct Clients {
    profiles: ProfilesClient<GrpcChannel>,
    segments: SegmentsClient<GrpcChannel>,
    delivery: DeliveryClient<GrpcChannel>,
    key: InternalKey,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients").finish()
    }
}

fn endpoint(url: &str) -> anyhow::Result<GrpcChannel> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .connect_lazy())
}

fn customer(id: &str) -> CustomerRef {
    CustomerRef {
        id: Some(customer_ref::Id::CustomerId(id.to_owned())),
    }
}

impl Clients {
    /// Clients of the services at the configured addresses (connected on first use).
    pub fn new(settings: &Settings, key: InternalKey) -> anyhow::Result<Clients> {
        Ok(Clients {
            profiles: ProfilesClient::new(endpoint(&settings.service_url("profiles"))?),
            segments: SegmentsClient::new(endpoint(&settings.service_url("segmentation"))?),
            delivery: DeliveryClient::new(endpoint(&settings.service_url("delivery"))?),
            key,
        })
    }

    /// The profiles of these customers, by customer id (absent: no profile).
    pub async fn profiles(
        &self,
        workspace_id: &str,
        customers: &[String],
    ) -> Result<HashMap<String, ProfileFacts>, tonic::Status> {
        let mut found = HashMap::with_capacity(customers.len());
        for chunk in customers.chunks(500) {
            let request = BatchGetProfilesRequest {
                customers: chunk.iter().map(|id| customer(id)).collect(),
            };
            let response = self
                .profiles
                .clone()
                .batch_get(self.key.request(workspace_id, request))
                .await?
                .into_inner();
            for profile in response.profiles {
                let traits = match &profile.traits {
                    Some(traits) => serde_json::json!({
                        "orders_count": traits.orders_count,
                        "revenue": traits.revenue,
                        "refunded": traits.refunded,
                        "average_basket": traits.average_basket,
                        "rfm_recency": traits.rfm_recency,
                        "rfm_frequency": traits.rfm_frequency,
                        "rfm_monetary": traits.rfm_monetary,
                    }),
                    None => serde_json::json!({}),
                };
                let facts = ProfileFacts {
                    timezone: (!profile.timezone.is_empty()).then(|| profile.timezone.clone()),
                    attributes: profile
                        .attributes
                        .as_ref()
                        .map(struct_to_json)
                        .unwrap_or_else(|| serde_json::json!({})),
                    traits,
                };
                found.insert(profile.customer_id.clone(), facts);
            }
        }
        Ok(found)
    }

    /// Sets profile attributes (an `update` step); setting the same values twice changes
    /// nothing, so a retried step is harmless.
    pub async fn set_attributes(
        &self,
        workspace_id: &str,
        customer_id: &str,
        attributes: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), tonic::Status> {
        let request = UpsertProfileRequest {
            customer: Some(customer(customer_id)),
            attributes: Some(json_to_struct(&serde_json::Value::Object(
                attributes.clone(),
            ))),
            ..Default::default()
        };
        self.profiles
            .clone()
            .upsert(self.key.request(workspace_id, request))
            .await?;
        Ok(())
    }

    /// Each customer's membership of `names`, by customer id then segment name.
    pub async fn memberships(
        &self,
        workspace_id: &str,
        customers: &[String],
        names: &[String],
    ) -> Result<HashMap<String, HashMap<String, bool>>, tonic::Status> {
        if names.is_empty() || customers.is_empty() {
            return Ok(HashMap::new());
        }
        // Owned futures: a closure borrowing across the await would not be `Send` for
        // every lifetime the spawned task needs.
        let mut calls = Vec::with_capacity(customers.len());
        for id in customers {
            let mut client = self.segments.clone();
            let request = self.key.request(
                workspace_id,
                IsSegmentMemberRequest {
                    customer: Some(customer(id)),
                    names: names.to_vec(),
                },
            );
            let id = id.clone();
            calls.push(Box::pin(async move {
                let response = client.is_member(request).await?.into_inner();
                let mut member = HashMap::with_capacity(response.memberships.len());
                for membership in response.memberships {
                    member.insert(membership.name, membership.member);
                }
                Ok::<_, tonic::Status>((id, member))
            }));
        }
        let answers: Vec<(String, HashMap<String, bool>)> = futures::stream::iter(calls)
            .buffer_unordered(MEMBERSHIP_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(answers.into_iter().collect())
    }

    /// Whether a segment exists (and is not archived).
    pub async fn segment_exists(
        &self,
        workspace_id: &str,
        name: &str,
    ) -> Result<bool, tonic::Status> {
        let request = GetSegmentRequest {
            name: name.to_owned(),
            version: 0,
        };
        match self
            .segments
            .clone()
            .get(self.key.request(workspace_id, request))
            .await
        {
            Ok(response) => Ok(response.into_inner().archived_at.is_none()),
            Err(status) if status.code() == Code::NotFound => Ok(false),
            Err(status) => Err(status),
        }
    }

    /// A segment's member count now.
    pub async fn segment_count(
        &self,
        workspace_id: &str,
        name: &str,
    ) -> Result<u64, tonic::Status> {
        let request = CountSegmentRequest {
            name: name.to_owned(),
        };
        Ok(self
            .segments
            .clone()
            .count(self.key.request(workspace_id, request))
            .await?
            .into_inner()
            .count)
    }

    /// Every known customer in a segment now, page by page through `page`.
    pub async fn segment_members<F>(
        &self,
        workspace_id: &str,
        name: &str,
        mut page: F,
    ) -> Result<u64, tonic::Status>
    where
        F: FnMut(Vec<String>),
    {
        let request = ListSegmentMembersRequest {
            name: name.to_owned(),
            page_size: 5000,
            ..Default::default()
        };
        let mut stream = self
            .segments
            .clone()
            .list_members(self.key.request(workspace_id, request))
            .await?
            .into_inner();
        let mut total = 0u64;
        while let Some(response) = stream.message().await? {
            let mut ids = Vec::with_capacity(response.members.len());
            for member in response.members {
                if let Some(CustomerRef {
                    id: Some(customer_ref::Id::CustomerId(id)),
                }) = member.customer
                {
                    ids.push(id);
                }
            }
            total += ids.len() as u64;
            page(ids);
        }
        Ok(total)
    }

    /// Up to `limit` known customers of a segment.
    pub async fn segment_sample(
        &self,
        workspace_id: &str,
        name: &str,
        limit: u64,
    ) -> Result<Vec<String>, tonic::Status> {
        let request = ListSegmentMembersRequest {
            name: name.to_owned(),
            page_size: 5000,
            limit,
            ..Default::default()
        };
        let mut stream = self
            .segments
            .clone()
            .list_members(self.key.request(workspace_id, request))
            .await?
            .into_inner();
        let mut ids = Vec::new();
        while let Some(response) = stream.message().await? {
            for member in response.members {
                if let Some(CustomerRef {
                    id: Some(customer_ref::Id::CustomerId(id)),
                }) = member.customer
                {
                    ids.push(id);
                }
            }
        }
        Ok(ids)
    }

    /// Whether a delivery template exists.
    pub async fn template_exists(
        &self,
        workspace_id: &str,
        name: &str,
    ) -> Result<bool, tonic::Status> {
        let request = GetTemplateRequest {
            name: name.to_owned(),
            version: 0,
        };
        match self
            .delivery
            .clone()
            .get_template(self.key.request(workspace_id, request))
            .await
        {
            Ok(_) => Ok(true),
            Err(status) if status.code() == Code::NotFound => Ok(false),
            Err(status) => Err(status),
        }
    }
}
