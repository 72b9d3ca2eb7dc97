//! Sending claimed messages: who the recipient is, which channel, what content (rendered
//! with their profile, the request's data and recommended products), tracking links, the
//! provider call, and the outcome to write to the ledger.
//!
//! The caller (the bus consumer) has claimed the messages in the ledger first, so a message
//! is in the hands of one worker at a time, and writes every outcome before it acks.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument as _;

use futures::StreamExt as _;
use prost::Message as _;
use rand::Rng as _;
use relance_kit::SharedClock;
use relance_kit::messages::{IngestEvent, IngestEvents};
use relance_proto::convert::struct_to_json;
use relance_proto::v1::{
    Channel, CustomerRef, MessageContent, MessageKind, MessageReason, MessageStatus, Placement,
    ProductsFallback, Profile, PushPlatform, RecommendRequest, RecommendedItem, SendRequest,
    TemplateProducts, TextDirection, customer_ref, send_request,
};

use crate::DeliveryConfig;
use crate::channels::set::Providers;
use crate::channels::{Address, Content, Outbound, Permanent, SendError};
use crate::clients::{Clients, recipient_key};
use crate::domain::choose::{self, Choice, Recipient};
use crate::domain::html;
use crate::domain::links::LinkSigner;
use crate::domain::request;
use crate::domain::template::{self, CompiledTemplate, RenderInput};
use crate::store::{Claimed, DeliveryStore, InboxRow, Outcome};

/// Why a batch stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Nothing was handed to a provider: the claims can be given back at once.
    #[error("before sending: {0:#}")]
    BeforeSending(anyhow::Error),
    /// Some messages may have reached a provider without their outcome written: their
    /// claims must run out (and the messages be resent as in doubt), never be given back.
    #[error("while sending: {0:#}")]
    WhileSending(anyhow::Error),
}

/// A message that must be tried again later.
#[derive(Debug, Clone)]
pub struct Retry {
    pub workspace_id: String,
    /// The request, protobuf-encoded.
    pub request: Vec<u8>,
    /// The attempt that failed (1-based).
    pub attempt: u32,
    /// How long to wait.
    pub delay: Duration,
}

/// Something to tell profiles after the outcome is written.
#[derive(Debug, Clone)]
enum Feedback {
    /// The provider declared the push token dead.
    DeadToken(String, CustomerRef, String),
    /// The provider reports the address unsubscribed from the channel.
    Unsubscribed(String, CustomerRef, Channel),
}

/// What sending one message came to.
struct Done {
    workspace: String,
    outcome: Outcome,
    inbox: Option<InboxRow>,
    event: Option<IngestEvent>,
    feedback: Option<Feedback>,
    retry: Option<Retry>,
}

/// Compiled templates by workspace and name, checked against the stored version at most
/// every `TEMPLATE_CHECK` so that a saved change is used within that time.
#[derive(Default)]
struct TemplateCache {
    entries: Mutex<HashMap<(String, String), CachedTemplate>>,
}

/// When the version was last checked, the version, the compiled template.
type CachedTemplate = (Instant, u32, Arc<CompiledTemplate>);

const TEMPLATE_CHECK: Duration = Duration::from_secs(2);

/// The sender of claimed messages.
#[derive(Clone)]
pub struct Sender {
    pub store: DeliveryStore,
    pub clients: Clients,
    pub providers: Arc<Providers>,
    pub links: Arc<LinkSigner>,
    pub clock: SharedClock,
    pub config: DeliveryConfig,
    templates: Arc<TemplateCache>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").finish()
    }
}

/// One claimed message with its decoded request.
struct Job {
    claimed: Claimed,
    request: SendRequest,
}

impl Sender {
    /// A sender.
    pub fn new(
        store: DeliveryStore,
        clients: Clients,
        providers: Arc<Providers>,
        links: Arc<LinkSigner>,
        clock: SharedClock,
        config: DeliveryConfig,
    ) -> Sender {
        Sender {
            store,
            clients,
            providers,
            links,
            clock,
            config,
            templates: Arc::new(TemplateCache::default()),
        }
    }

    /// A stored template, compiled (cached).
    pub async fn template(
        &self,
        workspace_id: &str,
        name: &str,
    ) -> relance_kit::ApiResult<Option<Arc<CompiledTemplate>>> {
        let key = (workspace_id.to_owned(), name.to_owned());
        let cached = {
            let entries = self
                .templates
                .entries
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            entries.get(&key).cloned()
        };
        if let Some((checked, _, compiled)) = &cached
            && checked.elapsed() < TEMPLATE_CHECK
        {
            return Ok(Some(compiled.clone()));
        }
        let current = self.store.template_version(workspace_id, name).await?;
        let Some(version) = current else {
            return Ok(None);
        };
        if let Some((_, cached_version, compiled)) = cached
            && cached_version == version
        {
            self.templates
                .entries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, (Instant::now(), version, compiled.clone()));
            return Ok(Some(compiled));
        }
        let Some(stored) = self
            .store
            .template(workspace_id, name, Some(version))
            .await?
        else {
            return Ok(None);
        };
        // Saved templates compiled when they were saved; failing now would be a bug.
        let compiled = match template::compile(&stored) {
            Ok(compiled) => Arc::new(compiled),
            Err(errors) => {
                return Err(relance_kit::ApiError::Internal(anyhow::anyhow!(
                    "stored template {name} v{version} does not compile: {:?}",
                    errors.first()
                )));
            }
        };
        self.templates
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (Instant::now(), version, compiled.clone()));
        Ok(Some(compiled))
    }

    /// Sends claimed messages and writes their outcomes; returns those to retry later.
    pub async fn process(&self, claimed: Vec<Claimed>) -> Result<Vec<Retry>, ProcessError> {
        let mut jobs = Vec::with_capacity(claimed.len());
        let mut broken = Vec::new();
        for claimed in claimed {
            match SendRequest::decode(claimed.request.as_slice()) {
                Ok(request) => jobs.push(Job { claimed, request }),
                Err(error) => broken.push((claimed, error.to_string())),
            }
        }
        let mut by_workspace: BTreeMap<String, Vec<CustomerRef>> = BTreeMap::new();
        for job in &jobs {
            if let Some(customer) = &job.request.customer {
                by_workspace
                    .entry(job.claimed.workspace_id.clone())
                    .or_default()
                    .push(customer.clone());
            }
        }
        let mut profiles: HashMap<(String, String), Profile> = HashMap::new();
        for (workspace, customers) in by_workspace {
            let found = self
                .clients
                .profiles(&workspace, &customers)
                .await
                .map_err(|status| {
                    ProcessError::BeforeSending(anyhow::anyhow!("profiles unavailable: {status}"))
                })?;
            for (key, profile) in found {
                profiles.insert((workspace.clone(), key), profile);
            }
        }

        let now = self.clock.now();
        let mut retries = Vec::new();
        if !broken.is_empty() {
            let mut outcomes = Vec::with_capacity(broken.len());
            for (claimed, error) in broken {
                outcomes.push(Outcome {
                    id: claimed.id,
                    status: MessageStatus::Failed as i16,
                    reason: MessageReason::TemplateError as i16,
                    detail: format!("the stored request does not decode: {error}"),
                    at: now,
                    ..Outcome::default()
                });
            }
            self.store
                .record(&outcomes, &[], &[])
                .await
                .map_err(|e| ProcessError::BeforeSending(e.into()))?;
        }

        // Templates are looked up once per batch, before anything goes out: the send path
        // itself touches no database.
        let mut templates: HashMap<(String, String), Option<Arc<CompiledTemplate>>> =
            HashMap::new();
        for job in &jobs {
            if let Some(send_request::Content::Template(name)) = &job.request.content {
                let key = (job.claimed.workspace_id.clone(), name.clone());
                if templates.contains_key(&key) {
                    continue;
                }
                let compiled = self
                    .template(&key.0, name)
                    .await
                    .map_err(|e| ProcessError::BeforeSending(anyhow::anyhow!("{e}")))?;
                templates.insert(key, compiled);
            }
        }

        // Outcomes are written as sends finish, a few at a time, not once per batch: a
        // crash then leaves in doubt only the calls in flight and the last few finished,
        // not the whole batch.
        let concurrency = self.config.concurrency.max(1);
        let profiles = &profiles;
        let templates = &templates;
        let mut finished = futures::stream::iter(jobs)
            .map(|job| async move {
                let key = job
                    .request
                    .customer
                    .as_ref()
                    .map(recipient_key)
                    .unwrap_or_default();
                let profile = profiles.get(&(job.claimed.workspace_id.clone(), key));
                let template = match &job.request.content {
                    Some(send_request::Content::Template(name)) => templates
                        .get(&(job.claimed.workspace_id.clone(), name.clone()))
                        .cloned()
                        .flatten(),
                    _ => None,
                };
                // Each message in the trace it arrived in (a journey step, a Send call).
                let span = tracing::info_span!("deliver", message = %job.claimed.id);
                relance_kit::trace::set_parent(&span, job.claimed.trace.as_deref());
                self.deliver(job, profile, template).instrument(span).await
            })
            .buffer_unordered(concurrency)
            .ready_chunks(self.config.record_every.max(1));
        while let Some(chunk) = finished.next().await {
            let mut done = Vec::with_capacity(chunk.len());
            let mut failure = None;
            for result in chunk {
                match result {
                    Ok(one) => done.push(one),
                    Err(error) => failure = Some(error),
                }
            }
            // What finished is written even when a neighbour failed.
            retries.extend(
                self.record(done)
                    .await
                    .map_err(ProcessError::WhileSending)?,
            );
            if let Some(error) = failure {
                return Err(ProcessError::WhileSending(error));
            }
        }
        Ok(retries)
    }

    /// Writes finished sends to the ledger (with their inbox rows and events) and passes
    /// feedback to profiles; returns the retries to schedule.
    async fn record(&self, finished: Vec<Done>) -> anyhow::Result<Vec<Retry>> {
        let mut outcomes = Vec::with_capacity(finished.len());
        let mut inbox = Vec::new();
        let mut events: BTreeMap<(String, String), Vec<IngestEvent>> = BTreeMap::new();
        let mut feedback = Vec::new();
        let mut retries = Vec::new();
        for done in finished {
            if let Some(event) = done.event {
                events
                    .entry((done.workspace.clone(), event.name.clone()))
                    .or_default()
                    .push(event);
            }
            if let Some(row) = done.inbox {
                inbox.push(row);
            }
            if let Some(f) = done.feedback {
                feedback.push(f);
            }
            if let Some(r) = done.retry {
                retries.push(r);
            }
            outcomes.push(done.outcome);
        }
        let mut batches = Vec::with_capacity(events.len());
        for ((workspace_id, _), events) in events {
            batches.push(IngestEvents {
                workspace_id,
                events,
            });
        }
        // These messages went out: losing their outcomes to a passing database error would
        // send them again, so the write is retried for a while before giving up.
        let mut pause = Duration::from_millis(50);
        let mut tries = 0;
        loop {
            match self.store.record(&outcomes, &inbox, &batches).await {
                Ok(()) => break,
                Err(error) if tries < 8 => {
                    tries += 1;
                    tracing::warn!(%error, tries, "outcomes not written, retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(error) => return Err(anyhow::anyhow!("{error}")),
            }
        }
        record_metrics(&outcomes);
        if !feedback.is_empty() {
            let clients = self.clients.clone();
            tokio::spawn(async move { send_feedback(clients, feedback).await });
        }
        Ok(retries)
    }

    /// Sends one message; never fails for reasons of the message itself (those are
    /// outcomes), only for a dependency that is down.
    async fn deliver(
        &self,
        job: Job,
        profile: Option<&Profile>,
        stored: Option<Arc<CompiledTemplate>>,
    ) -> anyhow::Result<Done> {
        let Job { claimed, request } = job;
        let now = self.clock.now();
        let workspace = claimed.workspace_id.clone();
        let mut done = Done {
            workspace: workspace.clone(),
            outcome: Outcome {
                id: claimed.id,
                at: now,
                ..Outcome::default()
            },
            inbox: None,
            event: None,
            feedback: None,
            retry: None,
        };
        let customer = request.customer.clone().unwrap_or_default();
        let base_properties = crate::store::event_properties(
            claimed.id,
            None,
            &request.origin.clone().unwrap_or_default(),
            &template_name(&request),
            &request.topic,
        );

        if now >= claimed.expires_at {
            return Ok(finish(
                done,
                &customer,
                base_properties,
                Ended::Skip(
                    MessageReason::Expired,
                    "not sent before its ttl ran out".into(),
                ),
            ));
        }
        let Some(profile) = profile else {
            return Ok(finish(
                done,
                &customer,
                base_properties,
                Ended::Skip(
                    MessageReason::UnknownCustomer,
                    "no profile for this customer".into(),
                ),
            ));
        };

        let compiled = match &request.content {
            Some(send_request::Content::Template(name)) => match stored {
                Some(compiled) => compiled,
                None => {
                    return Ok(finish(
                        done,
                        &customer,
                        base_properties,
                        Ended::Fail(
                            MessageReason::TemplateError,
                            format!("template {name:?} does not exist"),
                        ),
                    ));
                }
            },
            Some(send_request::Content::Inline(content)) => match template::compile_inline(content)
            {
                Ok(compiled) => Arc::new(compiled),
                Err(errors) => {
                    return Ok(finish(
                        done,
                        &customer,
                        base_properties,
                        Ended::Fail(MessageReason::TemplateError, describe(&errors)),
                    ));
                }
            },
            None => {
                return Ok(finish(
                    done,
                    &customer,
                    base_properties,
                    Ended::Fail(MessageReason::TemplateError, "no content".into()),
                ));
            }
        };
        done.outcome.template_version = compiled.template().version as i32;

        let locale = if !request.locale.is_empty() {
            request.locale.clone()
        } else {
            profile.locale.clone()
        };
        let variant = compiled.pick_variant(&locale);
        let variant_locale = compiled
            .template()
            .variants
            .get(variant)
            .map(|v| v.locale.clone())
            .unwrap_or_default();
        done.outcome.locale = variant_locale.clone();
        let channels_with_content = compiled.channels(variant);
        let recipient = recipient_of(profile);
        let kind = request::kind_of(&request);
        let choice = choose::choose(
            &recipient,
            &request::channels_of(&request),
            kind,
            &request.topic,
            |channel| channels_with_content.contains(&channel),
            |channel| channel == Channel::InApp || self.providers.has_channel(channel),
            |address| self.reachable(address),
        );
        let (channel, address) = match choice {
            Choice::Send(channel, address) => (channel, address),
            Choice::Skip(reason) => {
                let detail = match reason {
                    MessageReason::NoConsent => {
                        "no consent for any requested channel and this topic"
                    }
                    MessageReason::NoAddress => "no address for any requested channel",
                    MessageReason::ChannelNotConfigured => {
                        "no provider configured for the requested channels"
                    }
                    _ => "the template has no content for the requested channels",
                };
                let ended = if reason == MessageReason::TemplateError {
                    Ended::Fail(reason, detail.into())
                } else {
                    Ended::Skip(reason, detail.into())
                };
                return Ok(finish(done, &customer, base_properties, ended));
            }
        };
        done.outcome.channel = channel as i16;
        done.outcome.address = choose::mask(&address);

        let data_json = request
            .data
            .as_ref()
            .map(struct_to_json)
            .unwrap_or_else(|| serde_json::json!({}));
        let products = match &compiled.template().products {
            Some(block) => {
                let (items, _) = self
                    .products_for(&workspace, block, &customer, &data_json, channel)
                    .await;
                products_json(&items)
            }
            None => serde_json::Value::Array(Vec::new()),
        };
        let customer_json = customer_json(profile);
        let input = RenderInput {
            customer: &customer_json,
            data: &data_json,
            products: &products,
        };
        let rendered = match compiled.render(variant, channel, &input) {
            Ok(rendered) => rendered,
            Err(errors) => {
                return Ok(finish(
                    done,
                    &customer,
                    base_properties,
                    Ended::Fail(MessageReason::TemplateError, describe(&errors)),
                ));
            }
        };
        let direction = compiled.direction(variant);
        let right_to_left = direction == TextDirection::Rtl;
        let marketing = kind == MessageKind::Marketing;
        let tracked = self.track(
            &workspace,
            claimed.id,
            rendered,
            &customer,
            channel,
            &request.topic,
            marketing,
        );
        done.outcome.rendered = Some(tracked.content.encode_to_vec());

        let mut properties = base_properties;
        set(&mut properties, "channel", choose::channel_name(channel));

        if channel == Channel::InApp {
            let Some(in_app) = tracked.content.in_app.clone() else {
                return Ok(finish(
                    done,
                    &customer,
                    properties,
                    Ended::Fail(MessageReason::TemplateError, "no in-app content".into()),
                ));
            };
            let expires_after = in_app
                .expires_after
                .as_ref()
                .map(|d| chrono::Duration::seconds(d.seconds.clamp(1, 365 * 86400)))
                .unwrap_or_else(|| chrono::Duration::days(30));
            done.inbox = Some(InboxRow {
                message_id: claimed.id,
                workspace_id: workspace.clone(),
                recipient: recipient_key(&customer),
                title: in_app.title,
                body: in_app.body,
                image_url: in_app.image_url,
                url: in_app.url,
                data: serde_json::to_value(&in_app.data).unwrap_or_default(),
                direction: if right_to_left {
                    TextDirection::Rtl as i16
                } else {
                    TextDirection::Ltr as i16
                },
                locale: variant_locale,
                origin: serde_json::to_value(origin_json(&request)).unwrap_or_default(),
                created_at: now,
                expires_at: now + expires_after,
                read_at: None,
            });
            done.outcome.provider = "inbox".into();
            return Ok(finish(
                done,
                &customer,
                properties,
                Ended::Sent("inbox".into(), String::new()),
            ));
        }

        let content = match content_of(channel, &tracked.content) {
            Some(content) => content,
            None => {
                return Ok(finish(
                    done,
                    &customer,
                    properties,
                    Ended::Fail(
                        MessageReason::TemplateError,
                        "no content for the channel".into(),
                    ),
                ));
            }
        };
        let ttl_left = (claimed.expires_at - now)
            .to_std()
            .unwrap_or(Duration::from_secs(1));
        let outbound = Outbound {
            message_id: claimed.id,
            workspace_id: workspace.clone(),
            customer: customer_label(&customer),
            address: address.clone(),
            content,
            ttl: ttl_left.max(Duration::from_secs(1)),
            unsubscribe_url: tracked.unsubscribe_url,
            webhook_body: (channel == Channel::Webhook)
                .then(|| webhook_body(&tracked.content, claimed.id, &customer_json, &data_json)),
            right_to_left,
            tags: tags(&request),
        };
        let provider_span =
            tracing::info_span!("provider_send", channel = ?channel, otel.kind = "client");
        match self
            .providers
            .send(channel, &outbound)
            .instrument(provider_span)
            .await
        {
            Ok((provider, accepted)) => {
                set(&mut properties, "provider", &provider);
                let id = accepted.provider_message_id.unwrap_or_default();
                Ok(finish(
                    done,
                    &customer,
                    properties,
                    Ended::Sent(provider, id),
                ))
            }
            Err(SendError::Permanent { kind, detail }) => {
                let reason = match kind {
                    Permanent::InvalidAddress => MessageReason::InvalidAddress,
                    Permanent::Unsubscribed => MessageReason::Unsubscribed,
                    Permanent::Rejected => MessageReason::ProviderRejected,
                };
                done.feedback = match (kind, &address) {
                    (Permanent::InvalidAddress, Address::Push { token, .. }) => Some(
                        Feedback::DeadToken(workspace.clone(), customer.clone(), token.clone()),
                    ),
                    (Permanent::Unsubscribed, _) => Some(Feedback::Unsubscribed(
                        workspace.clone(),
                        customer.clone(),
                        channel,
                    )),
                    _ => None,
                };
                Ok(finish(
                    done,
                    &customer,
                    properties,
                    Ended::Fail(reason, detail),
                ))
            }
            Err(SendError::Temporary {
                detail,
                retry_after,
            }) => {
                let attempt = claimed.attempts.max(1) as u32;
                let jitter: f64 = rand::rng().random();
                let mut delay = request::retry_delay(
                    attempt,
                    self.config.retry_base(),
                    self.config.retry_cap(),
                    jitter,
                );
                if let Some(after) = retry_after {
                    delay = delay.max(after);
                }
                let next = now
                    + chrono::Duration::from_std(delay)
                        .unwrap_or_else(|_| chrono::Duration::seconds(60));
                if attempt >= self.config.max_attempts || next >= claimed.expires_at {
                    let reason = if next >= claimed.expires_at && attempt < self.config.max_attempts
                    {
                        MessageReason::Expired
                    } else {
                        MessageReason::ProviderUnavailable
                    };
                    return Ok(finish(
                        done,
                        &customer,
                        properties,
                        Ended::Fail(reason, format!("after {attempt} attempts: {detail}")),
                    ));
                }
                done.outcome.status = MessageStatus::Retrying as i16;
                done.outcome.reason = MessageReason::ProviderUnavailable as i16;
                done.outcome.detail = detail;
                done.outcome.next_attempt_at = Some(next);
                done.retry = Some(Retry {
                    workspace_id: workspace.clone(),
                    request: request.encode_to_vec(),
                    attempt,
                    delay,
                });
                Ok(done)
            }
        }
    }

    fn reachable(&self, address: &Address) -> bool {
        match address {
            Address::Push { .. } => self.providers.accepts(Channel::Push, address),
            _ => true,
        }
    }

    /// Asks recommendations for a products block: the block's placement (else the
    /// channel's), the context items found at the block's path in the send's data, within
    /// the block's deadline; the fallback is the block's. True when it fell back.
    pub async fn products_for(
        &self,
        workspace: &str,
        block: &TemplateProducts,
        customer: &CustomerRef,
        data: &serde_json::Value,
        channel: Channel,
    ) -> (Vec<RecommendedItem>, bool) {
        let placement = match Placement::try_from(block.placement) {
            Ok(Placement::Unspecified) | Err(_) => placement_of(channel),
            Ok(placement) => placement,
        };
        let timeout = block
            .timeout
            .as_ref()
            .map(|d| {
                Duration::from_millis(
                    (d.seconds.max(0) as u64) * 1000 + (d.nanos.max(0) as u64) / 1_000_000,
                )
            })
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_millis(self.config.products_timeout_ms))
            .min(Duration::from_secs(1));
        let recommend = RecommendRequest {
            customer: Some(customer.clone()),
            placement: placement as i32,
            context_item_ids: values_at(data, &block.context_path),
            n: if block.n == 0 { 3 } else { block.n.min(12) },
            filter: block.filter.clone(),
            seed: None,
            include_details: true,
        };
        let trending = ProductsFallback::try_from(block.fallback)
            .unwrap_or(ProductsFallback::Trending)
            != ProductsFallback::Omit;
        self.clients
            .products(workspace, recommend, timeout, trending)
            .await
    }

    /// Wraps links for tracking and adds the open pixel and unsubscribe link.
    #[allow(clippy::too_many_arguments)]
    fn track(
        &self,
        workspace: &str,
        message_id: uuid::Uuid,
        mut content: MessageContent,
        customer: &CustomerRef,
        channel: Channel,
        topic: &str,
        marketing: bool,
    ) -> Tracked {
        let links = &self.links;
        let wrap = |url: &str| links.click_url(workspace, message_id, url).ok();
        let mut unsubscribe_url = None;
        if let Some(email) = content.email.as_mut() {
            let mut body = html::rewrite_links(&email.html, wrap);
            body = html::add_open_pixel(&body, &links.open_url(workspace, message_id));
            email.html = body;
            if marketing && let Some(customer_ref::Id::CustomerId(id)) = &customer.id {
                unsubscribe_url =
                    Some(links.unsubscribe_url(workspace, message_id, id, channel, topic));
            }
        }
        if let Some(push) = content.push.as_mut()
            && let Some(url) = wrap(&push.url)
        {
            push.url = url;
        }
        if let Some(in_app) = content.in_app.as_mut()
            && let Some(url) = wrap(&in_app.url)
        {
            in_app.url = url;
        }
        Tracked {
            content,
            unsubscribe_url,
        }
    }
}

struct Tracked {
    content: MessageContent,
    unsubscribe_url: Option<String>,
}

/// How a message ended in this attempt.
enum Ended {
    Sent(String, String),
    Skip(MessageReason, String),
    Fail(MessageReason, String),
}

fn finish(
    mut done: Done,
    customer: &CustomerRef,
    mut properties: serde_json::Value,
    ended: Ended,
) -> Done {
    let (name, status) = match &ended {
        Ended::Sent(..) => ("message_sent", MessageStatus::Sent),
        Ended::Skip(..) => ("message_failed", MessageStatus::Skipped),
        Ended::Fail(..) => ("message_failed", MessageStatus::Failed),
    };
    done.outcome.status = status as i16;
    match ended {
        Ended::Sent(provider, provider_message_id) => {
            done.outcome.provider = provider;
            done.outcome.provider_message_id = provider_message_id;
        }
        Ended::Skip(reason, detail) | Ended::Fail(reason, detail) => {
            done.outcome.reason = reason as i16;
            set(&mut properties, "reason", reason.as_str_name());
            set(
                &mut properties,
                "status",
                if status == MessageStatus::Skipped {
                    "skipped"
                } else {
                    "failed"
                },
            );
            done.outcome.detail = detail;
        }
    }
    if done.outcome.channel != 0 && properties.get("channel").is_none() {
        let channel =
            Channel::try_from(i32::from(done.outcome.channel)).unwrap_or(Channel::Unspecified);
        set(&mut properties, "channel", choose::channel_name(channel));
    }
    let (customer_id, anonymous_id) = match &customer.id {
        Some(customer_ref::Id::CustomerId(id)) => (Some(id.clone()), None),
        Some(customer_ref::Id::AnonymousId(id)) => (None, Some(id.clone())),
        None => (None, None),
    };
    done.event = Some(IngestEvent {
        message_id: format!("{}:{name}", done.outcome.id),
        name: name.to_owned(),
        customer_id,
        anonymous_id,
        timestamp: done.outcome.at,
        properties,
    });
    done
}

fn set(properties: &mut serde_json::Value, key: &str, value: &str) {
    if let Some(object) = properties.as_object_mut() {
        object.insert(key.to_owned(), serde_json::Value::String(value.to_owned()));
    }
}

fn describe(errors: &[relance_proto::v1::TemplateError]) -> String {
    let mut lines = Vec::with_capacity(errors.len());
    for error in errors {
        lines.push(format!("{}: {}", error.field, error.reason));
    }
    lines.join("\n")
}

fn template_name(request: &SendRequest) -> String {
    match &request.content {
        Some(send_request::Content::Template(name)) => name.clone(),
        _ => String::new(),
    }
}

fn customer_label(customer: &CustomerRef) -> String {
    match &customer.id {
        Some(customer_ref::Id::CustomerId(id)) | Some(customer_ref::Id::AnonymousId(id)) => {
            id.clone()
        }
        None => String::new(),
    }
}

/// What the choice of channel needs from a profile.
pub fn recipient_of(profile: &Profile) -> Recipient {
    let mut tokens: Vec<(&relance_proto::v1::PushToken, i64)> = profile
        .push_tokens
        .iter()
        .map(|t| (t, t.updated_at.as_ref().map(|u| u.seconds).unwrap_or(0)))
        .collect();
    tokens.sort_by_key(|t| std::cmp::Reverse(t.1));
    let preferred = profile
        .attributes
        .as_ref()
        .and_then(|a| a.fields.get("preferred_channel"))
        .and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => choose::parse_channel(s),
            _ => None,
        });
    Recipient {
        email: profile.email.clone(),
        phone: profile.phone.clone(),
        push_tokens: tokens
            .into_iter()
            .map(|(t, _)| {
                (
                    t.token.clone(),
                    PushPlatform::try_from(t.platform).unwrap_or(PushPlatform::Unspecified),
                    t.app_id.clone(),
                )
            })
            .collect(),
        consents: profile
            .consents
            .iter()
            .map(|c| {
                (
                    Channel::try_from(c.channel).unwrap_or(Channel::Unspecified),
                    c.topic.clone(),
                    relance_proto::v1::ConsentStatus::try_from(c.status)
                        .unwrap_or(relance_proto::v1::ConsentStatus::Unspecified),
                )
            })
            .collect(),
        preferred,
        has_id: true,
    }
}

/// The profile as templates see it: attributes at the top (`customer.first_name`), plus
/// `customer_id`, `email`, `phone`, `locale`, `timezone` and `traits`.
pub fn customer_json(profile: &Profile) -> serde_json::Value {
    let mut object = match profile.attributes.as_ref().map(struct_to_json) {
        Some(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    object.insert("customer_id".into(), profile.customer_id.clone().into());
    object.insert("email".into(), profile.email.clone().into());
    object.insert("phone".into(), profile.phone.clone().into());
    object.insert("locale".into(), profile.locale.clone().into());
    object.insert("timezone".into(), profile.timezone.clone().into());
    if let Some(traits) = &profile.traits {
        object.insert(
            "traits".into(),
            serde_json::json!({
                "orders_count": traits.orders_count,
                "revenue": traits.revenue,
                "average_basket": traits.average_basket,
            }),
        );
    }
    serde_json::Value::Object(object)
}

/// Products as templates see them.
pub fn products_json(items: &[RecommendedItem]) -> serde_json::Value {
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let details = item.item.clone().unwrap_or_default();
        out.push(serde_json::json!({
            "id": item.item_id,
            "title": details.title,
            "price": details.price,
            "currency": details.currency,
            "url": details.url,
            "image_url": details.image_url,
            "brand": details.brand,
            "category": details.category_path.last().cloned().unwrap_or_default(),
            "attributes": details.attributes.as_ref().map(struct_to_json).unwrap_or(serde_json::json!({})),
        }));
    }
    serde_json::Value::Array(out)
}

/// The values at a path such as `items[].product_id` in the send's data.
pub fn values_at(data: &serde_json::Value, path: &str) -> Vec<String> {
    if path.is_empty() {
        return Vec::new();
    }
    let mut current: Vec<&serde_json::Value> = vec![data];
    for part in path.split('.') {
        let (name, every) = match part.strip_suffix("[]") {
            Some(name) => (name, true),
            None => (part, false),
        };
        let mut next = Vec::new();
        for value in current {
            let Some(child) = value.get(name) else {
                continue;
            };
            if every {
                if let Some(array) = child.as_array() {
                    next.extend(array.iter());
                }
            } else {
                next.push(child);
            }
        }
        current = next;
    }
    let mut out = Vec::new();
    for value in current {
        match value {
            serde_json::Value::String(s) if !s.is_empty() => out.push(s.clone()),
            serde_json::Value::Number(n) => out.push(n.to_string()),
            _ => {}
        }
        if out.len() >= 50 {
            break;
        }
    }
    out
}

fn placement_of(channel: Channel) -> Placement {
    match channel {
        Channel::Push => Placement::Push,
        Channel::InApp => Placement::InApp,
        Channel::Whatsapp => Placement::Whatsapp,
        _ => Placement::Email,
    }
}

fn content_of(channel: Channel, content: &MessageContent) -> Option<Content> {
    match channel {
        Channel::Push => content.push.clone().map(Content::Push),
        Channel::Email => content.email.clone().map(Content::Email),
        Channel::Sms => content.sms.clone().map(Content::Sms),
        Channel::Whatsapp => content.whatsapp.clone().map(Content::WhatsApp),
        Channel::InApp => content.in_app.clone().map(Content::InApp),
        Channel::Webhook => content.webhook.clone().map(Content::Webhook),
        Channel::Unspecified => None,
    }
}

fn origin_json(request: &SendRequest) -> serde_json::Value {
    let origin = request.origin.clone().unwrap_or_default();
    serde_json::json!({
        "flow": origin.flow,
        "flow_version": origin.flow_version,
        "step": origin.step,
        "variant": origin.variant,
        "broadcast": origin.broadcast,
        "journey_id": origin.journey_id,
    })
}

fn tags(request: &SendRequest) -> BTreeMap<String, String> {
    let mut tags = BTreeMap::new();
    if let Some(origin) = &request.origin {
        for (key, value) in [
            ("flow", &origin.flow),
            ("step", &origin.step),
            ("variant", &origin.variant),
            ("broadcast", &origin.broadcast),
        ] {
            if !value.is_empty() {
                tags.insert(key.to_owned(), value.clone());
            }
        }
    }
    tags
}

/// The webhook's JSON: the rendered body, or the default document.
fn webhook_body(
    content: &MessageContent,
    message_id: uuid::Uuid,
    customer: &serde_json::Value,
    data: &serde_json::Value,
) -> serde_json::Value {
    if let Some(webhook) = &content.webhook
        && !webhook.body.trim().is_empty()
        && let Ok(value) = serde_json::from_str(&webhook.body)
    {
        return value;
    }
    serde_json::json!({
        "message_id": message_id.to_string(),
        "customer": customer,
        "data": data,
    })
}

fn record_metrics(outcomes: &[Outcome]) {
    for outcome in outcomes {
        let status = MessageStatus::try_from(i32::from(outcome.status))
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("MESSAGE_STATUS_")
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        let channel = Channel::try_from(i32::from(outcome.channel))
            .map(choose::channel_name)
            .unwrap_or("unspecified");
        metrics::counter!("relance_delivery_messages_total", "channel" => channel, "status" => status)
            .increment(1);
    }
}

async fn send_feedback(clients: Clients, feedback: Vec<Feedback>) {
    for item in feedback {
        let result = match &item {
            Feedback::DeadToken(workspace, customer, token) => {
                clients
                    .remove_push_token(workspace, customer.clone(), token)
                    .await
            }
            Feedback::Unsubscribed(workspace, customer, channel) => {
                clients
                    .opt_out(workspace, customer.clone(), *channel, "", "provider")
                    .await
            }
        };
        if let Err(status) = result {
            tracing::warn!(code = ?status.code(), message = %status.message(), "feedback to profiles failed");
        }
    }
}
