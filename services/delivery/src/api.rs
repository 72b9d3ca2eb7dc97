//! The `Delivery` gRPC service: translates between the proto and the store, the pipeline
//! and the template domain.

use std::pin::Pin;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use futures::Stream;
use prost::Message as _;
use relance_kit::auth;
use relance_kit::{ApiError, ApiResult, SharedClock};
use relance_proto::convert::{chrono_to_timestamp, struct_to_json, timestamp_to_chrono};
use relance_proto::v1::delivery_server::Delivery;
use relance_proto::v1::{self as pb, customer_ref, send_request};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::clients::recipient_key;
use crate::consumer::new_message;
use crate::domain::choose;
use crate::domain::request;
use crate::domain::template::{self, RenderInput};
use crate::feed::Feed;
use crate::pipeline::{self, Sender};
use crate::store::{DeliveryStore, InboxRow, MessageFilter, MessageRow, SENDING};
use crate::wire::Envelope;

/// The gRPC face of the delivery service.
#[derive(Clone)]
pub struct DeliveryApi {
    pub store: DeliveryStore,
    pub sender: Sender,
    pub feed: Feed,
    pub clock: SharedClock,
    /// Ends live feeds at shutdown (a graceful shutdown waits for open streams).
    pub shutdown: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for DeliveryApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryApi").finish()
    }
}

fn refuse(error: request::FieldError) -> ApiError {
    ApiError::invalid(error.field, error.reason)
}

/// Every template error, one per line, each starting with its field's path.
fn template_errors(errors: &[pb::TemplateError]) -> ApiError {
    let mut lines = Vec::with_capacity(errors.len());
    for error in errors {
        let position = if error.line > 0 {
            format!(" (line {}, column {})", error.line, error.column)
        } else {
            String::new()
        };
        lines.push(format!("{}: {}{position}", error.field, error.reason));
    }
    let first = errors.first().map(|e| e.field.clone()).unwrap_or_default();
    let joined = lines.join("\n");
    // The first line carries the field in the usual `field: reason` shape.
    let reason = joined
        .strip_prefix(&format!("{first}: "))
        .unwrap_or(&joined)
        .to_owned();
    ApiError::invalid(first, reason)
}

fn customer_of(customer: Option<&pb::CustomerRef>, field: &str) -> ApiResult<pb::CustomerRef> {
    match customer.and_then(|c| c.id.as_ref()) {
        Some(customer_ref::Id::CustomerId(id)) | Some(customer_ref::Id::AnonymousId(id))
            if !id.is_empty() && id.chars().count() <= 128 =>
        {
            Ok(customer.cloned().unwrap_or_default())
        }
        Some(_) => Err(ApiError::invalid(field, "must be 1 to 128 characters")),
        None => Err(ApiError::invalid(
            field,
            "required: customer_id or anonymous_id",
        )),
    }
}

fn page_token(at: DateTime<Utc>, id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{id}", at.timestamp_micros()))
}

fn parse_page_token(token: &str) -> ApiResult<Option<(DateTime<Utc>, Uuid)>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || ApiError::invalid("page_token", "not a token this call returned");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (micros, id) = text.split_once(':').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let at = DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
    let id = Uuid::parse_str(id).map_err(|_| bad())?;
    Ok(Some((at, id)))
}

fn page_size(requested: u32, default: u32, max: u32, field: &str) -> ApiResult<i64> {
    if requested > max {
        return Err(ApiError::invalid(field, format!("must be at most {max}")));
    }
    Ok(i64::from(if requested == 0 { default } else { requested }))
}

/// The status a ledger row shows outside (a message being sent is still QUEUED).
fn public_status(status: i16) -> i32 {
    if status == SENDING {
        pb::MessageStatus::Queued as i32
    } else {
        i32::from(status)
    }
}

fn record(row: MessageRow, with_rendered: bool) -> pb::MessageRecord {
    let customer = match (&row.customer_id, &row.anonymous_id) {
        (Some(id), _) => Some(pb::CustomerRef {
            id: Some(customer_ref::Id::CustomerId(id.clone())),
        }),
        (None, Some(id)) => Some(pb::CustomerRef {
            id: Some(customer_ref::Id::AnonymousId(id.clone())),
        }),
        _ => None,
    };
    let rendered = if with_rendered {
        row.rendered
            .as_deref()
            .and_then(|bytes| pb::MessageContent::decode(bytes).ok())
    } else {
        None
    };
    pb::MessageRecord {
        message_id: row.id.to_string(),
        idempotency_key: row.idempotency_key,
        customer,
        channel: i32::from(row.channel),
        status: public_status(row.status),
        reason: i32::from(row.reason),
        reason_detail: row.reason_detail,
        kind: i32::from(row.kind),
        topic: row.topic,
        template: row.template,
        template_version: row.template_version as u32,
        locale: row.locale,
        origin: Some(pb::MessageOrigin {
            flow: row.flow,
            flow_version: row.flow_version as u32,
            step: row.step,
            variant: row.variant,
            broadcast: row.broadcast,
            journey_id: row.journey_id,
        }),
        address: row.address,
        provider: row.provider,
        provider_message_id: row.provider_message_id,
        attempts: row.attempts as u32,
        created_at: Some(chrono_to_timestamp(row.created_at)),
        sent_at: row.sent_at.map(chrono_to_timestamp),
        delivered_at: row.delivered_at.map(chrono_to_timestamp),
        opened_at: row.opened_at.map(chrono_to_timestamp),
        clicked_at: row.clicked_at.map(chrono_to_timestamp),
        ended_at: row.ended_at.map(chrono_to_timestamp),
        next_attempt_at: row.next_attempt_at.map(chrono_to_timestamp),
        rendered,
    }
}

fn inbox_message(row: &InboxRow) -> pb::InboxMessage {
    let data = match &row.data {
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string()),
                )
            })
            .collect(),
        _ => Default::default(),
    };
    let origin = &row.origin;
    let text = |key: &str| {
        origin
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    pb::InboxMessage {
        message_id: row.message_id.to_string(),
        title: row.title.clone(),
        body: row.body.clone(),
        image_url: row.image_url.clone(),
        url: row.url.clone(),
        data,
        direction: i32::from(row.direction),
        locale: row.locale.clone(),
        created_at: Some(chrono_to_timestamp(row.created_at)),
        read_at: row.read_at.map(chrono_to_timestamp),
        expires_at: Some(chrono_to_timestamp(row.expires_at)),
        origin: Some(pb::MessageOrigin {
            flow: text("flow"),
            flow_version: origin
                .get("flow_version")
                .and_then(|v| v.as_u64())
                .unwrap_or(0) as u32,
            step: text("step"),
            variant: text("variant"),
            broadcast: text("broadcast"),
            journey_id: text("journey_id"),
        }),
    }
}

fn parse_ids(ids: &[String]) -> ApiResult<Vec<Uuid>> {
    let mut parsed = Vec::with_capacity(ids.len());
    for (index, id) in ids.iter().enumerate() {
        match Uuid::parse_str(id) {
            Ok(id) => parsed.push(id),
            Err(_) => {
                return Err(ApiError::invalid(
                    format!("message_ids[{index}]"),
                    "not a message id",
                ));
            }
        }
    }
    Ok(parsed)
}

/// How long a Send with `wait_for_outcome` may wait: the call's deadline less a margin, at
/// most 30 s.
fn wait_budget<T>(request: &Request<T>) -> Duration {
    let deadline = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    match deadline {
        Some(deadline) => deadline
            .saturating_sub(Duration::from_millis(200))
            .min(Duration::from_secs(30)),
        None => Duration::from_secs(10),
    }
}

fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (number, unit) = value.split_at(value.len().checked_sub(1)?);
    let number: u64 = number.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(number * 3600),
        "M" => Duration::from_secs(number * 60),
        "S" => Duration::from_secs(number),
        "m" => Duration::from_millis(number),
        "u" => Duration::from_micros(number),
        "n" => Duration::from_nanos(number),
        _ => return None,
    })
}

type InboxStream = Pin<Box<dyn Stream<Item = Result<pb::InboxUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Delivery for DeliveryApi {
    #[tracing::instrument(skip_all, fields(workspace))]
    async fn send(
        &self,
        request: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        let caller = auth::caller(&request)?;
        tracing::Span::current().record("workspace", caller.workspace_id.as_str());
        let budget = wait_budget(&request);
        let send = request.into_inner();
        request::validate(&send, false).map_err(refuse)?;
        match &send.content {
            Some(send_request::Content::Inline(content)) => {
                if let Err(errors) = template::compile_inline(content) {
                    return Err(template_errors(&errors).into());
                }
            }
            Some(send_request::Content::Template(name))
                if self
                    .sender
                    .template(&caller.workspace_id, name)
                    .await?
                    .is_none() =>
            {
                return Err(
                    ApiError::invalid("template", format!("no template named {name:?}")).into(),
                );
            }
            Some(send_request::Content::Template(_)) => {}
            None => {}
        }
        let mut normalized = send.clone();
        normalized.kind = request::kind_of(&send) as i32;
        let now = self.clock.now();
        let row = new_message(
            &caller.workspace_id,
            &normalized,
            now,
            relance_kit::trace::current(),
        );
        let workspace = caller.workspace_id.clone();
        let publish = |message: &crate::store::NewMessage| {
            let envelope = Envelope::from_encoded(&workspace, &message.request);
            (
                Envelope::routing_key(&normalized).to_owned(),
                serde_json::to_value(envelope).unwrap_or_default(),
            )
        };
        let admitted = self
            .store
            .accept(
                &caller.workspace_id,
                std::slice::from_ref(&row),
                Some(&publish),
            )
            .await?;
        let Some(admitted) = admitted.into_iter().next() else {
            return Err(ApiError::Internal(anyhow::anyhow!("accept returned nothing")).into());
        };
        let mut current = self
            .store
            .message(&caller.workspace_id, Some(admitted.id), None)
            .await?
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("accepted message vanished")))?;
        if send.wait_for_outcome {
            let started = std::time::Instant::now();
            let mut pause = Duration::from_millis(10);
            while (current.status == pb::MessageStatus::Queued as i16 || current.status == SENDING)
                && started.elapsed() + pause < budget
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
                if let Some(row) = self
                    .store
                    .message(&caller.workspace_id, Some(admitted.id), None)
                    .await?
                {
                    current = row;
                }
            }
        }
        Ok(Response::new(pb::SendResponse {
            message_id: current.id.to_string(),
            status: public_status(current.status),
            reason: i32::from(current.reason),
            channel: i32::from(current.channel),
            duplicate: !admitted.fresh,
        }))
    }

    #[tracing::instrument(skip_all, fields(workspace))]
    async fn get_message(
        &self,
        request: Request<pb::GetMessageRequest>,
    ) -> Result<Response<pb::MessageRecord>, Status> {
        let caller = auth::caller(&request)?;
        tracing::Span::current().record("workspace", caller.workspace_id.as_str());
        let row = match request.into_inner().key {
            Some(pb::get_message_request::Key::MessageId(id)) => {
                let id = Uuid::parse_str(&id)
                    .map_err(|_| ApiError::invalid("message_id", "not a message id"))?;
                self.store
                    .message(&caller.workspace_id, Some(id), None)
                    .await?
            }
            Some(pb::get_message_request::Key::IdempotencyKey(key)) if !key.is_empty() => {
                self.store
                    .message(&caller.workspace_id, None, Some(&key))
                    .await?
            }
            _ => {
                return Err(
                    ApiError::invalid("key", "required: message_id or idempotency_key").into(),
                );
            }
        };
        match row {
            Some(row) => Ok(Response::new(record(row, true))),
            None => Err(ApiError::NotFound("no such message".into()).into()),
        }
    }

    #[tracing::instrument(skip_all, fields(workspace))]
    async fn list_messages(
        &self,
        request: Request<pb::ListMessagesRequest>,
    ) -> Result<Response<pb::ListMessagesResponse>, Status> {
        let caller = auth::caller(&request)?;
        tracing::Span::current().record("workspace", caller.workspace_id.as_str());
        let list = request.into_inner();
        let customer = customer_of(list.customer.as_ref(), "customer")?;
        let limit = page_size(list.page_size, 50, 500, "page_size")?;
        let range = list.range.unwrap_or_default();
        let filter = MessageFilter {
            channels: list.channels.iter().map(|c| *c as i16).collect(),
            statuses: list.statuses.iter().map(|s| *s as i16).collect(),
            from: range.from.as_ref().and_then(timestamp_to_chrono),
            to: range.to.as_ref().and_then(timestamp_to_chrono),
            flow: list.flow,
            broadcast: list.broadcast,
            before: parse_page_token(&list.page_token)?,
            limit,
        };
        let (customer_id, anonymous_id) = match &customer.id {
            Some(customer_ref::Id::CustomerId(id)) => (Some(id.as_str()), None),
            Some(customer_ref::Id::AnonymousId(id)) => (None, Some(id.as_str())),
            None => (None, None),
        };
        let rows = self
            .store
            .messages_of(&caller.workspace_id, customer_id, anonymous_id, &filter)
            .await?;
        let next_page_token = match rows.last() {
            Some(last) if rows.len() as i64 == limit => page_token(last.created_at, last.id),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListMessagesResponse {
            messages: rows.into_iter().map(|row| record(row, false)).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(workspace))]
    async fn list_inbox(
        &self,
        request: Request<pb::ListInboxRequest>,
    ) -> Result<Response<pb::ListInboxResponse>, Status> {
        let caller = auth::caller(&request)?;
        tracing::Span::current().record("workspace", caller.workspace_id.as_str());
        let list = request.into_inner();
        let customer = customer_of(list.customer.as_ref(), "customer")?;
        let limit = page_size(list.page_size, 20, 100, "page_size")?;
        let before = parse_page_token(&list.page_token)?;
        let recipient = recipient_key(&customer);
        let now = self.clock.now();
        let rows = self
            .store
            .inbox(
                &caller.workspace_id,
                &recipient,
                list.unread_only,
                before,
                limit,
                now,
            )
            .await?;
        let unread_count = self
            .store
            .unread_count(&caller.workspace_id, &recipient, now)
            .await?;
        let next_page_token = match rows.last() {
            Some(last) if rows.len() as i64 == limit => {
                page_token(last.created_at, last.message_id)
            }
            _ => String::new(),
        };
        Ok(Response::new(pb::ListInboxResponse {
            messages: rows.iter().map(inbox_message).collect(),
            unread_count,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(workspace))]
    async fn mark_read(
        &self,
        request: Request<pb::MarkReadRequest>,
    ) -> Result<Response<pb::MarkReadResponse>, Status> {
        let caller = auth::caller(&request)?;
        tracing::Span::current().record("workspace", caller.workspace_id.as_str());
        let mark = request.into_inner();
        let customer = customer_of(mark.customer.as_ref(), "customer")?;
        if mark.all && !mark.message_ids.is_empty() {
            return Err(ApiError::invalid("message_ids", "must be empty when `all` is set").into());
        }
        if !mark.all && (mark.message_ids.is_empty() || mark.message_ids.len() > 500) {
            return Err(ApiError::invalid("message_ids", "1 to 500 ids, or set `all`").into());
        }
        let ids = parse_ids(&mark.message_ids)?;
        let recipient = recipient_key(&customer);
        let now = self.clock.now();
        let marked = self
            .store
            .mark_read(
                &caller.workspace_id,
                &recipient,
                if mark.all { None } else { Some(&ids) },
                now,
            )
            .await?;
        let unread_count = self
            .store
            .unread_count(&caller.workspace_id, &recipient, now)
            .await?;
        Ok(Response::new(pb::MarkReadResponse {
            marked: marked.len() as u32,
            unread_count,
        }))
    }

    type WatchInboxStream = InboxStream;

    #[tracing::instrument(skip_all, fields(workspace))]
    async fn watch_inbox(
        &self,
        request: Request<pb::WatchInboxRequest>,
    ) -> Result<Response<Self::WatchInboxStream>, Status> {
        let caller = auth::caller(&request)?;
        tracing::Span::current().record("workspace", caller.workspace_id.as_str());
        let customer = customer_of(request.get_ref().customer.as_ref(), "customer")?;
        let recipient = recipient_key(&customer);
        let workspace = caller.workspace_id;
        // Subscribed before the first count is read, so no change falls in between.
        let mut changes = self.feed.subscribe();
        let store = self.store.clone();
        let clock = self.clock.clone();
        let shutdown = self.shutdown.clone();
        let unread = store
            .unread_count(&workspace, &recipient, clock.now())
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::InboxUpdate, Status>>(64);
        tokio::spawn(async move {
            let sync = pb::InboxUpdate {
                kind: pb::InboxUpdateKind::Sync as i32,
                message: None,
                unread_count: unread,
            };
            if tx.send(Ok(sync)).await.is_err() {
                return;
            }
            let mut heartbeat = tokio::time::interval(Duration::from_secs(30));
            heartbeat.tick().await;
            loop {
                let update = tokio::select! {
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => return,
                    _ = heartbeat.tick() => {
                        let unread = store.unread_count(&workspace, &recipient, clock.now()).await.unwrap_or(0);
                        pb::InboxUpdate { kind: pb::InboxUpdateKind::Heartbeat as i32, message: None, unread_count: unread }
                    }
                    change = changes.recv() => {
                        let change = match change {
                            Ok(change) => change,
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                        };
                        if change.workspace_id != workspace || change.recipient != recipient {
                            continue;
                        }
                        let kind = if change.change == "read" { pb::InboxUpdateKind::Read } else { pb::InboxUpdateKind::Added };
                        let message = match store.inbox_message(change.message_id).await {
                            Ok(Some(row)) => Some(inbox_message(&row)),
                            _ => Some(pb::InboxMessage { message_id: change.message_id.to_string(), ..Default::default() }),
                        };
                        let unread = store.unread_count(&workspace, &recipient, clock.now()).await.unwrap_or(0);
                        pb::InboxUpdate { kind: kind as i32, message, unread_count: unread }
                    }
                };
                if tx.send(Ok(update)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    #[tracing::instrument(skip_all, fields(workspace))]
    async fn preview_template(
        &self,
        request: Request<pb::PreviewTemplateRequest>,
    ) -> Result<Response<pb::PreviewTemplateResponse>, Status> {
        let caller = auth::caller(&request)?;
        tracing::Span::current().record("workspace", caller.workspace_id.as_str());
        let preview = request.into_inner();
        let compiled = match &preview.source {
            Some(pb::preview_template_request::Source::Name(name)) => {
                let version = (preview.version > 0).then_some(preview.version);
                let stored = self
                    .store
                    .template(&caller.workspace_id, name, version)
                    .await?
                    .ok_or_else(|| {
                        ApiError::NotFound(format!(
                            "no template named {name:?} (version {})",
                            preview.version
                        ))
                    })?;
                template::compile(&stored).map_err(|errors| template_errors(&errors))?
            }
            Some(pb::preview_template_request::Source::Draft(draft)) => {
                template::compile(draft).map_err(|errors| template_errors(&errors))?
            }
            None => return Err(ApiError::invalid("source", "required: name or draft").into()),
        };
        let sample = compiled
            .template()
            .sample_data
            .as_ref()
            .map(struct_to_json)
            .unwrap_or_else(|| serde_json::json!({}));
        let mut customer_json = sample
            .get("customer")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}));
        let mut locale = preview.locale.clone();
        let mut products_items: Vec<pb::RecommendedItem> = Vec::new();
        let mut products = sample
            .get("products")
            .cloned()
            .unwrap_or_else(|| serde_json::json!([]));
        let mut products_fallback = false;
        let data = match &preview.data {
            Some(data) => struct_to_json(data),
            None => sample
                .get("data")
                .cloned()
                .unwrap_or_else(|| serde_json::json!({})),
        };
        if let Some(customer) = &preview.customer {
            let customer = customer_of(Some(customer), "customer")?;
            let profiles = self
                .sender
                .clients
                .profiles(&caller.workspace_id, std::slice::from_ref(&customer))
                .await
                .map_err(|status| {
                    ApiError::Unavailable(format!("profiles: {}", status.message()))
                })?;
            let profile = profiles
                .get(&recipient_key(&customer))
                .ok_or_else(|| ApiError::NotFound("no profile for this customer".into()))?;
            customer_json = pipeline::customer_json(profile);
            if locale.is_empty() {
                locale = profile.locale.clone();
            }
            if let Some(block) = &compiled.template().products {
                let channel = match pb::Channel::try_from(preview.channel) {
                    Ok(pb::Channel::Unspecified) | Err(_) => pb::Channel::Email,
                    Ok(channel) => channel,
                };
                let (items, fallback) = self
                    .sender
                    .products_for(&caller.workspace_id, block, &customer, &data, channel)
                    .await;
                products = pipeline::products_json(&items);
                products_items = items;
                products_fallback = fallback;
            }
        }
        let variant = compiled.pick_variant(&locale);
        let input = RenderInput {
            customer: &customer_json,
            data: &data,
            products: &products,
        };
        let channels = match pb::Channel::try_from(preview.channel) {
            Ok(pb::Channel::Unspecified) | Err(_) => compiled.channels(variant),
            Ok(channel) => vec![channel],
        };
        let mut rendered = pb::MessageContent::default();
        let mut errors = Vec::new();
        for channel in channels {
            match compiled.render(variant, channel, &input) {
                Ok(part) => merge(&mut rendered, part),
                Err(mut found) => errors.append(&mut found),
            }
        }
        let variant_locale = compiled
            .template()
            .variants
            .get(variant)
            .map(|v| v.locale.clone())
            .unwrap_or_default();
        Ok(Response::new(pb::PreviewTemplateResponse {
            locale: variant_locale,
            direction: compiled.direction(variant) as i32,
            rendered: Some(rendered),
            products: products_items,
            products_fallback,
            errors,
        }))
    }

    #[tracing::instrument(skip_all, fields(workspace))]
    async fn upsert_template(
        &self,
        request: Request<pb::UpsertTemplateRequest>,
    ) -> Result<Response<pb::UpsertTemplateResponse>, Status> {
        let caller = auth::caller(&request)?;
        tracing::Span::current().record("workspace", caller.workspace_id.as_str());
        let upsert = request.into_inner();
        let Some(draft) = upsert.template else {
            return Err(ApiError::invalid("template", "required").into());
        };
        let current = self
            .store
            .template_version(&caller.workspace_id, &draft.name)
            .await
            .unwrap_or(None);
        if let Err(errors) = template::compile(&draft) {
            if upsert.dry_run {
                return Ok(Response::new(pb::UpsertTemplateResponse {
                    name: draft.name,
                    version: current.unwrap_or(0),
                    changed: false,
                    errors,
                }));
            }
            // Field paths inside the request start at `template.`.
            let mut prefixed = errors;
            for error in &mut prefixed {
                error.field = format!("template.{}", error.field);
            }
            return Err(template_errors(&prefixed).into());
        }
        let mut channels: Vec<i16> = Vec::new();
        for channel in [
            pb::Channel::Push,
            pb::Channel::Email,
            pb::Channel::Sms,
            pb::Channel::Whatsapp,
            pb::Channel::InApp,
            pb::Channel::Webhook,
        ] {
            if choose::template_has_channel(&draft, channel as i32) {
                channels.push(channel as i16);
            }
        }
        if upsert.dry_run {
            let changed = match self
                .store
                .template(&caller.workspace_id, &draft.name, None)
                .await?
            {
                Some(stored) => {
                    let mut a = stored;
                    a.version = 0;
                    a.created_at = None;
                    a.updated_at = None;
                    let mut b = draft.clone();
                    b.version = 0;
                    b.created_at = None;
                    b.updated_at = None;
                    a != b
                }
                None => true,
            };
            return Ok(Response::new(pb::UpsertTemplateResponse {
                name: draft.name,
                version: current.unwrap_or(0),
                changed,
                errors: Vec::new(),
            }));
        }
        let (version, changed) = self
            .store
            .save_template(&caller.workspace_id, &draft, &channels, self.clock.now())
            .await?;
        if changed {
            tracing::info!(workspace = %caller.workspace_id, template = %draft.name, version, "template saved");
        }
        Ok(Response::new(pb::UpsertTemplateResponse {
            name: draft.name,
            version,
            changed,
            errors: Vec::new(),
        }))
    }

    #[tracing::instrument(skip_all, fields(workspace))]
    async fn get_template(
        &self,
        request: Request<pb::GetTemplateRequest>,
    ) -> Result<Response<pb::Template>, Status> {
        let caller = auth::caller(&request)?;
        tracing::Span::current().record("workspace", caller.workspace_id.as_str());
        let get = request.into_inner();
        if let Err(reason) = template::validate_name(&get.name) {
            return Err(ApiError::invalid("name", reason).into());
        }
        let version = (get.version > 0).then_some(get.version);
        match self
            .store
            .template(&caller.workspace_id, &get.name, version)
            .await?
        {
            Some(template) => Ok(Response::new(template)),
            None => Err(ApiError::NotFound(format!("no template named {:?}", get.name)).into()),
        }
    }

    #[tracing::instrument(skip_all, fields(workspace))]
    async fn list_templates(
        &self,
        request: Request<pb::ListTemplatesRequest>,
    ) -> Result<Response<pb::ListTemplatesResponse>, Status> {
        let caller = auth::caller(&request)?;
        tracing::Span::current().record("workspace", caller.workspace_id.as_str());
        let list = request.into_inner();
        let limit = page_size(list.page_size, 100, 1000, "page_size")?;
        let after = if list.page_token.is_empty() {
            String::new()
        } else {
            let bytes = URL_SAFE_NO_PAD
                .decode(&list.page_token)
                .map_err(|_| ApiError::invalid("page_token", "not a token this call returned"))?;
            String::from_utf8(bytes)
                .map_err(|_| ApiError::invalid("page_token", "not a token this call returned"))?
        };
        let channel = match pb::Channel::try_from(list.channel) {
            Ok(pb::Channel::Unspecified) | Err(_) => None,
            Ok(channel) => Some(channel as i16),
        };
        let templates = self
            .store
            .list_templates(
                &caller.workspace_id,
                &list.name_prefix,
                channel,
                &after,
                limit,
            )
            .await?;
        let next_page_token = match templates.last() {
            Some(last) if templates.len() as i64 == limit => URL_SAFE_NO_PAD.encode(&last.name),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListTemplatesResponse {
            templates,
            next_page_token,
        }))
    }
}

/// Copies the channel part set in `part` into `into`.
fn merge(into: &mut pb::MessageContent, part: pb::MessageContent) {
    if part.push.is_some() {
        into.push = part.push;
    }
    if part.email.is_some() {
        into.email = part.email;
    }
    if part.sms.is_some() {
        into.sms = part.sms;
    }
    if part.whatsapp.is_some() {
        into.whatsapp = part.whatsapp;
    }
    if part.in_app.is_some() {
        into.in_app = part.in_app;
    }
    if part.webhook.is_some() {
        into.webhook = part.webhook;
    }
}
