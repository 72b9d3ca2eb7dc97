//! The `Profiles` gRPC service: translates between the proto and the store's domain types.

use relance_kit::auth;
use relance_kit::{ApiError, ApiResult, SharedClock};
use relance_proto::convert::{
    chrono_to_timestamp, json_to_struct, struct_to_json, timestamp_to_chrono,
};
use relance_proto::v1::profiles_server::Profiles;
use relance_proto::v1::{self as pb, customer_ref};
use tonic::{Request, Response, Status};

use crate::domain::{self, Consent, CustomerKey, ProfilePatch, ProfileRecord};
use crate::store::{ListOrder, ProfileStore};

/// The gRPC face of the profiles service.
#[derive(Debug, Clone)]
pub struct ProfilesApi {
    pub store: ProfileStore,
    pub clock: SharedClock,
}

fn key_of(customer: Option<pb::CustomerRef>, field: &str) -> ApiResult<CustomerKey> {
    let key = match customer.and_then(|c| c.id) {
        Some(customer_ref::Id::CustomerId(id)) => CustomerKey::Customer(id),
        Some(customer_ref::Id::AnonymousId(id)) => CustomerKey::Anonymous(id),
        None => {
            return Err(ApiError::invalid(
                field,
                "a customer_id or anonymous_id is required",
            ));
        }
    };
    Ok(key.checked(field).map_err(domain::ProfileError::from)?)
}

fn channel_name(channel: i32) -> &'static str {
    match pb::Channel::try_from(channel) {
        Ok(pb::Channel::Push) => "push",
        Ok(pb::Channel::Email) => "email",
        Ok(pb::Channel::Sms) => "sms",
        Ok(pb::Channel::Whatsapp) => "whatsapp",
        Ok(pb::Channel::InApp) => "in_app",
        Ok(pb::Channel::Webhook) => "webhook",
        _ => "",
    }
}

fn channel_of(name: &str) -> pb::Channel {
    match name {
        "push" => pb::Channel::Push,
        "email" => pb::Channel::Email,
        "sms" => pb::Channel::Sms,
        "whatsapp" => pb::Channel::Whatsapp,
        "in_app" => pb::Channel::InApp,
        "webhook" => pb::Channel::Webhook,
        _ => pb::Channel::Unspecified,
    }
}

fn platform_name(platform: i32) -> &'static str {
    match pb::PushPlatform::try_from(platform) {
        Ok(pb::PushPlatform::Android) => "android",
        Ok(pb::PushPlatform::Ios) => "ios",
        Ok(pb::PushPlatform::Web) => "web",
        _ => "",
    }
}

fn platform_of(name: &str) -> pb::PushPlatform {
    match name {
        "android" => pb::PushPlatform::Android,
        "ios" => pb::PushPlatform::Ios,
        "web" => pb::PushPlatform::Web,
        _ => pb::PushPlatform::Unspecified,
    }
}

/// A stored profile as the proto message.
pub fn to_proto(record: ProfileRecord) -> pb::Profile {
    let traits = &record.traits;
    pb::Profile {
        customer_id: record.customer_id.clone().unwrap_or_default(),
        anonymous_ids: record.anonymous_ids.clone(),
        attributes: Some(json_to_struct(&record.attributes)),
        email: record.email.clone().unwrap_or_default(),
        phone: record.phone.clone().unwrap_or_default(),
        push_tokens: record
            .push_tokens
            .iter()
            .map(|t| pb::PushToken {
                token: t.token.clone(),
                platform: platform_of(&t.platform) as i32,
                app_id: t.app_id.clone(),
                updated_at: Some(chrono_to_timestamp(t.updated_at)),
            })
            .collect(),
        timezone: record.timezone.clone().unwrap_or_default(),
        locale: record.locale.clone().unwrap_or_default(),
        consents: record
            .consents
            .iter()
            .map(|c| pb::Consent {
                channel: channel_of(&c.channel) as i32,
                topic: c.topic.clone(),
                status: if c.status == "opted_in" {
                    pb::ConsentStatus::OptedIn
                } else {
                    pb::ConsentStatus::OptedOut
                } as i32,
                updated_at: Some(chrono_to_timestamp(c.decided_at)),
                source: c.source.clone(),
            })
            .collect(),
        traits: Some(pb::ComputedTraits {
            orders_count: traits.orders_count.max(0) as u64,
            revenue: traits.revenue,
            refunded: traits.refunded,
            average_basket: traits.average_basket(),
            first_purchase_at: traits.first_purchase_at.map(chrono_to_timestamp),
            last_purchase_at: traits.last_purchase_at.map(chrono_to_timestamp),
            rfm_recency: traits.rfm.recency.max(0) as u32,
            rfm_frequency: traits.rfm.frequency.max(0) as u32,
            rfm_monetary: traits.rfm.monetary.max(0) as u32,
            rfm_scored_at: traits.rfm_scored_at.map(chrono_to_timestamp),
        }),
        created_at: Some(chrono_to_timestamp(record.created_at)),
        updated_at: Some(chrono_to_timestamp(record.updated_at)),
    }
}

#[tonic::async_trait]
impl Profiles for ProfilesApi {
    #[tracing::instrument(skip_all)]
    async fn upsert(
        &self,
        request: Request<pb::UpsertProfileRequest>,
    ) -> Result<Response<pb::Profile>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let key = key_of(request.customer, "customer")?;
        let tokens = request
            .push_tokens
            .into_iter()
            .map(|t| (t.token, platform_name(t.platform).to_owned(), t.app_id))
            .collect();
        let patch = ProfilePatch::new(
            request
                .attributes
                .as_ref()
                .map(struct_to_json)
                .unwrap_or(serde_json::Value::Null),
            request.email,
            request.phone,
            request.timezone,
            request.locale,
            tokens,
            request.remove_push_tokens,
        )
        .map_err(domain::ProfileError::from)
        .map_err(ApiError::from)?;
        let record = self
            .store
            .upsert(&caller.workspace_id, &key, &patch, self.clock.now())
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(to_proto(record)))
    }

    #[tracing::instrument(skip_all)]
    async fn get(
        &self,
        request: Request<pb::GetProfileRequest>,
    ) -> Result<Response<pb::Profile>, Status> {
        let caller = auth::caller(&request)?;
        let key = key_of(request.into_inner().customer, "customer")?;
        let record = self
            .store
            .get(&caller.workspace_id, &key)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(to_proto(record)))
    }

    #[tracing::instrument(skip_all)]
    async fn batch_get(
        &self,
        request: Request<pb::BatchGetProfilesRequest>,
    ) -> Result<Response<pb::BatchGetProfilesResponse>, Status> {
        let caller = auth::caller(&request)?;
        let customers = request.into_inner().customers;
        if customers.len() > 500 {
            return Err(ApiError::invalid(
                "customers",
                format!("{} requested, at most 500", customers.len()),
            )
            .into());
        }
        let mut keys = Vec::with_capacity(customers.len());
        for (index, customer) in customers.iter().enumerate() {
            keys.push(key_of(
                Some(customer.clone()),
                &format!("customers[{index}]"),
            )?);
        }
        let found = self
            .store
            .batch_get(&caller.workspace_id, &keys)
            .await
            .map_err(ApiError::from)?;
        let mut response = pb::BatchGetProfilesResponse::default();
        for (customer, record) in customers.into_iter().zip(found) {
            match record {
                Some(record) => response.profiles.push(to_proto(record)),
                None => response.not_found.push(customer),
            }
        }
        Ok(Response::new(response))
    }

    #[tracing::instrument(skip_all)]
    async fn list(
        &self,
        request: Request<pb::ListProfilesRequest>,
    ) -> Result<Response<pb::ListProfilesResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let limit = match request.page_size {
            0 => 50,
            n if n > 500 => return Err(ApiError::invalid("page_size", "at most 500").into()),
            n => i64::from(n),
        };
        let offset: i64 = if request.page_token.is_empty() {
            0
        } else {
            request
                .page_token
                .parse()
                .map_err(|_| ApiError::invalid("page_token", "not a token returned by List"))?
        };
        let order = match pb::ProfileOrder::try_from(request.order) {
            Ok(pb::ProfileOrder::Revenue) => ListOrder::Revenue,
            Ok(pb::ProfileOrder::Updated) => ListOrder::Updated,
            _ => ListOrder::Rfm,
        };
        let records = self
            .store
            .list(&caller.workspace_id, order, limit, offset)
            .await
            .map_err(ApiError::from)?;
        let next_page_token = if records.len() as i64 == limit {
            (offset + limit).to_string()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListProfilesResponse {
            profiles: records.into_iter().map(to_proto).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn merge(
        &self,
        request: Request<pb::MergeProfilesRequest>,
    ) -> Result<Response<pb::MergeProfilesResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        domain::check_id("anonymous_id", &request.anonymous_id)
            .map_err(domain::ProfileError::from)
            .map_err(ApiError::from)?;
        domain::check_id("customer_id", &request.customer_id)
            .map_err(domain::ProfileError::from)
            .map_err(ApiError::from)?;
        let (record, merged) = self
            .store
            .merge(
                &caller.workspace_id,
                &request.anonymous_id,
                &request.customer_id,
                self.clock.now(),
            )
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::MergeProfilesResponse {
            profile: Some(to_proto(record)),
            merged,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn set_consent(
        &self,
        request: Request<pb::SetConsentRequest>,
    ) -> Result<Response<pb::Profile>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let key = key_of(request.customer, "customer")?;
        let Some(consent) = request.consent else {
            return Err(ApiError::invalid("consent", "required").into());
        };
        let status = match pb::ConsentStatus::try_from(consent.status) {
            Ok(pb::ConsentStatus::OptedIn) => "opted_in",
            Ok(pb::ConsentStatus::OptedOut) => "opted_out",
            _ => "",
        };
        let channel = channel_name(consent.channel);
        domain::check_consent(channel, &consent.topic, status, &consent.source)
            .map_err(domain::ProfileError::from)
            .map_err(ApiError::from)?;
        let now = self.clock.now();
        let decided_at = match &consent.updated_at {
            Some(ts) => timestamp_to_chrono(ts)
                .ok_or_else(|| ApiError::invalid("consent.updated_at", "out of range"))?,
            None => now,
        };
        let consent = Consent {
            channel: channel.to_owned(),
            topic: consent.topic,
            status: status.to_owned(),
            decided_at,
            source: consent.source,
        };
        let record = self
            .store
            .set_consent(&caller.workspace_id, &key, &consent, now)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(to_proto(record)))
    }

    #[tracing::instrument(skip_all)]
    async fn export(
        &self,
        request: Request<pb::ExportProfileRequest>,
    ) -> Result<Response<pb::ExportProfileResponse>, Status> {
        let caller = auth::caller(&request)?;
        let key = key_of(request.into_inner().customer, "customer")?;
        let document = self
            .store
            .export(&caller.workspace_id, &key, self.clock.now())
            .await
            .map_err(ApiError::from)?;
        let json =
            serde_json::to_string_pretty(&document).map_err(|e| ApiError::Internal(e.into()))?;
        Ok(Response::new(pb::ExportProfileResponse { json }))
    }

    #[tracing::instrument(skip_all)]
    async fn delete(
        &self,
        request: Request<pb::DeleteProfileRequest>,
    ) -> Result<Response<pb::DeleteProfileResponse>, Status> {
        let caller = auth::caller(&request)?;
        let key = key_of(request.into_inner().customer, "customer")?;
        let erased_ids = self
            .store
            .delete(&caller.workspace_id, &key, self.clock.now())
            .await
            .map_err(ApiError::from)?;
        tracing::info!(workspace = %caller.workspace_id, ids = erased_ids.len(), "profile erased");
        Ok(Response::new(pb::DeleteProfileResponse { erased_ids }))
    }
}
