//! RabbitMQ: one reconnecting connection per process, publishing with publisher confirms,
//! and consumers with manual acks, delayed retries and a dead-letter queue.
//!
//! Topology of a consumer named `q` (all names carry the deployment's prefix):
//! - `q`, a durable quorum queue bound to the exchanges and routing keys it needs;
//! - `q.retry.1` … `q.retry.N`, one queue per retry delay, whose messages expire after that
//!   delay and are dead-lettered back into `q` (one queue per delay, so a long delay never
//!   holds up a short one);
//! - `q.dlq`, where a message lands after its last attempt or a permanent failure, to be
//!   inspected and replayed.
//!
//! A message is acked only after its handler has committed its work, so a crash redelivers
//! it; every handler is idempotent, so a redelivery changes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use secrecy::{ExposeSecret as _, SecretString};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::config::Settings;

/// The topic exchange every accepted event is published to (`event.<name>`), and the
/// platform's own announcements (`profile.*`, `segment.*`).
pub const EVENTS_EXCHANGE: &str = "relance.events";
/// The topic exchange of send requests (`<channel>`).
pub const DELIVERY_EXCHANGE: &str = "relance.delivery";

const ATTEMPT_HEADER: &str = "x-relance-attempt";

/// The broker could not be reached or refused a message.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Connection or channel failure.
    #[error("rabbitmq: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker cancelled the consumer (queue deleted, channel closed).
    #[error("rabbitmq ended the consumer")]
    ConsumerEnded,
    /// The broker did not take responsibility for a message.
    #[error("rabbitmq refused message {0} (nack)")]
    Nacked(String),
}

/// The process's connection to RabbitMQ.
pub struct Bus {
    url: SecretString,
    prefix: String,
    ephemeral: bool,
    connection: Mutex<Option<Arc<Connection>>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("prefix", &self.prefix).finish()
    }
}

impl Bus {
    /// Connects (and so checks the broker is reachable).
    pub async fn connect(settings: &Settings) -> Result<Arc<Bus>, BusError> {
        let bus = Arc::new(Bus {
            url: settings.amqp_url.clone(),
            prefix: settings.amqp_prefix.clone(),
            ephemeral: settings.amqp_ephemeral,
            connection: Mutex::new(None),
        });
        bus.connection().await?;
        Ok(bus)
    }

    /// The deployment's name for exchange or queue `base`.
    pub fn name(&self, base: &str) -> String {
        format!("{}{}", self.prefix, base)
    }

    async fn connection(&self) -> Result<Arc<Connection>, BusError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            if connection.status().connected() {
                return Ok(connection.clone());
            }
            tracing::warn!("rabbitmq connection lost, reconnecting");
        }
        // Named after the deployment, so an operator (or a test) can find it in the broker.
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("{}relance", self.prefix).into());
        let connection = Arc::new(Connection::connect(self.url.expose_secret(), properties).await?);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// A new channel on the (re)connected connection.
    pub async fn channel(&self) -> Result<Channel, BusError> {
        Ok(self.connection().await?.create_channel().await?)
    }

    /// Declares the topic exchange `base` (idempotent).
    pub async fn declare_exchange(&self, channel: &Channel, base: &str) -> Result<(), BusError> {
        let options = ExchangeDeclareOptions {
            durable: true,
            auto_delete: self.ephemeral,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                &self.name(base),
                ExchangeKind::Topic,
                options,
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    async fn declare_queue(
        &self,
        channel: &Channel,
        name: &str,
        mut arguments: FieldTable,
        quorum: bool,
    ) -> Result<(), BusError> {
        if quorum {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        if self.ephemeral {
            // Test queues disappear a minute after their last consumer goes.
            arguments.insert("x-expires".into(), AMQPValue::LongInt(60_000));
        }
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel.queue_declare(name, options, arguments).await?;
        Ok(())
    }

    /// Messages ready in queue `base` (not counting those delivered and not yet acked).
    pub async fn queue_depth(&self, base: &str) -> Result<u32, BusError> {
        let channel = self.channel().await?;
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let state = channel
            .queue_declare(&self.name(base), options, FieldTable::default())
            .await?;
        let _ = channel.close(200, "depth read").await;
        Ok(state.message_count())
    }

    /// Declares a consumer's queues (main, retries, dead letters) and bindings.
    pub async fn declare_consumer(
        &self,
        channel: &Channel,
        spec: &ConsumerSpec,
    ) -> Result<(), BusError> {
        let queue = self.name(&spec.queue);
        self.declare_queue(channel, &queue, FieldTable::default(), true)
            .await?;
        self.declare_queue(
            channel,
            &format!("{queue}.dlq"),
            FieldTable::default(),
            true,
        )
        .await?;
        for (index, delay) in spec.retry_delays.iter().enumerate() {
            let mut arguments = FieldTable::default();
            arguments.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(delay.as_millis() as i64),
            );
            arguments.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            arguments.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(queue.clone().into()),
            );
            self.declare_queue(
                channel,
                &format!("{queue}.retry.{}", index + 1),
                arguments,
                false,
            )
            .await?;
        }
        for (exchange, routing_key) in &spec.bindings {
            self.declare_exchange(channel, exchange).await?;
            channel
                .queue_bind(
                    &queue,
                    &self.name(exchange),
                    routing_key,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The exchange's base name (e.g. [`EVENTS_EXCHANGE`]); empty for the default exchange.
    pub exchange: String,
    /// Routing key (`event.order_completed`, `profile.deleted`, …).
    pub routing_key: String,
    /// Stable id of the message: consumers deduplicate on it.
    pub message_id: String,
    /// JSON body.
    pub payload: Vec<u8>,
    /// Extra headers (trace context is added by the publisher).
    pub headers: BTreeMap<String, String>,
}

/// Publishes with publisher confirms: `publish_all` returns only once the broker has taken
/// responsibility for every message.
pub struct Publisher {
    bus: Arc<Bus>,
    channel: Mutex<Option<Channel>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish()
    }
}

impl Publisher {
    /// A publisher on its own channel of `bus`.
    pub fn new(bus: Arc<Bus>) -> Publisher {
        Publisher {
            bus,
            channel: Mutex::new(None),
        }
    }

    async fn ready_channel(&self, slot: &mut Option<Channel>) -> Result<Channel, BusError> {
        if let Some(channel) = slot.as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let channel = self.bus.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        for exchange in [EVENTS_EXCHANGE, DELIVERY_EXCHANGE] {
            self.bus.declare_exchange(&channel, exchange).await?;
        }
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// Publishes `messages` and waits for the broker's confirmation of each. On error some
    /// may have been published: the caller retries them all, and consumers deduplicate.
    pub async fn publish_all(&self, messages: &[Outgoing]) -> Result<(), BusError> {
        self.publish_with(messages, None).await
    }

    /// Publishes `message` to be dropped — or, from a delayed queue, dead-lettered back to
    /// its consumer — after `expiration` (RabbitMQ's per-message TTL): a retry with a delay
    /// of its own inside one of a consumer's `<queue>.retry.<n>` queues.
    pub async fn publish_expiring(
        &self,
        message: &Outgoing,
        expiration: Duration,
    ) -> Result<(), BusError> {
        self.publish_with(std::slice::from_ref(message), Some(expiration))
            .await
    }

    /// The deployment's name of queue `base`, for messages sent to one queue through the
    /// default exchange (an [`Outgoing`] with an empty exchange).
    pub fn queue_name(&self, base: &str) -> String {
        self.bus.name(base)
    }

    async fn publish_with(
        &self,
        messages: &[Outgoing],
        expiration: Option<Duration>,
    ) -> Result<(), BusError> {
        let mut slot = self.channel.lock().await;
        let channel = self.ready_channel(&mut slot).await?;
        let result = publish_on(&self.bus, &channel, messages, expiration).await;
        if result.is_err() {
            *slot = None;
        }
        result
    }
}

async fn publish_on(
    bus: &Bus,
    channel: &Channel,
    messages: &[Outgoing],
    expiration: Option<Duration>,
) -> Result<(), BusError> {
    let trace_headers = current_trace_headers();
    let mut sends = Vec::with_capacity(messages.len());
    for message in messages {
        let mut headers = FieldTable::default();
        // A message that carries its own trace context (from an outbox row, a journey)
        // keeps it; the others join the publishing span's trace.
        if !message.headers.contains_key(crate::trace::TRACEPARENT) {
            for (key, value) in trace_headers.iter() {
                headers.insert(
                    key.as_str().into(),
                    AMQPValue::LongString(value.as_str().into()),
                );
            }
        }
        for (key, value) in message.headers.iter() {
            headers.insert(
                key.as_str().into(),
                AMQPValue::LongString(value.as_str().into()),
            );
        }
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(message.message_id.as_str().into())
            .with_headers(headers);
        if let Some(expiration) = expiration {
            properties =
                properties.with_expiration(expiration.as_millis().max(1).to_string().into());
        }
        let exchange = if message.exchange.is_empty() {
            String::new()
        } else {
            bus.name(&message.exchange)
        };
        sends.push(async move {
            channel
                .basic_publish(
                    &exchange,
                    &message.routing_key,
                    BasicPublishOptions::default(),
                    &message.payload,
                    properties,
                )
                .await
        });
    }
    // Hand every message to the connection at once (awaiting each in turn costs a
    // round trip to lapin's I/O thread per message), then wait for the confirms.
    let confirms = futures::future::join_all(sends).await;
    for (confirm, message) in confirms.into_iter().zip(messages) {
        match confirm?.await? {
            Confirmation::Ack(_) | Confirmation::NotRequested => {}
            Confirmation::Nack(_) => return Err(BusError::Nacked(message.message_id.clone())),
        }
    }
    Ok(())
}

/// The W3C trace context of the current span, as message headers.
fn current_trace_headers() -> BTreeMap<String, String> {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let mut headers = std::collections::HashMap::new();
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut headers);
    });
    headers.into_iter().collect()
}

/// What a consumer needs and how it retries.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Base name of the queue (e.g. `profiles.traits`).
    pub queue: String,
    /// (exchange base name, routing key pattern) pairs.
    pub bindings: Vec<(String, String)>,
    /// Unacked messages the broker may push ahead.
    pub prefetch: u16,
    /// Delay before each retry; after the last, the message goes to the dead-letter queue.
    pub retry_delays: Vec<Duration>,
}

impl ConsumerSpec {
    /// A consumer of `queue` with the default prefetch (64) and retries after 1 s, 10 s and
    /// 60 s.
    pub fn new(queue: &str) -> ConsumerSpec {
        ConsumerSpec {
            queue: queue.to_owned(),
            bindings: Vec::new(),
            prefetch: 64,
            retry_delays: vec![
                Duration::from_secs(1),
                Duration::from_secs(10),
                Duration::from_secs(60),
            ],
        }
    }

    /// Adds a binding of the queue to `exchange` for `routing_key`.
    pub fn bind(mut self, exchange: &str, routing_key: &str) -> ConsumerSpec {
        self.bindings
            .push((exchange.to_owned(), routing_key.to_owned()));
        self
    }
}

/// A message handed to a [`Handler`].
#[derive(Debug)]
pub struct Received<'a> {
    /// Its routing key.
    pub routing_key: &'a str,
    /// Its message id (empty when the publisher set none).
    pub message_id: &'a str,
    /// Its body.
    pub payload: &'a [u8],
    /// 1 on first delivery through the retry path, 2 on the first retry, …
    pub attempt: u32,
    /// The W3C `traceparent` it was published with, for work that outlives the consuming
    /// span (a journey started, a send request held in the ledger).
    pub trace: Option<&'a str>,
}

/// Why a handler did not finish a message.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// A passing failure (database down): try again after the next retry delay.
    #[error("retry: {0:#}")]
    Retry(anyhow::Error),
    /// The message can never succeed (malformed): straight to the dead-letter queue.
    #[error("reject: {0:#}")]
    Reject(anyhow::Error),
}

impl From<sqlx::Error> for HandleError {
    fn from(error: sqlx::Error) -> HandleError {
        HandleError::Retry(error.into())
    }
}

/// Handles the messages of one consumer.
pub trait Handler: Send + Sync + 'static {
    /// Does the work of one message and commits it; must be idempotent.
    fn handle<'a>(&'a self, message: &'a Received<'a>) -> BoxFuture<'a, Result<(), HandleError>>;

    /// How many waiting messages [`Handler::handle_batch`] may take at once; 1 (the
    /// default) handles each message alone.
    fn max_batch(&self) -> usize {
        1
    }

    /// Does the work of several messages, in order, all or nothing (typically one
    /// transaction: one commit instead of one per message). When it fails, each message is
    /// handled again alone with [`Handler::handle`], so that retries and the dead-letter
    /// queue still apply to the message at fault.
    fn handle_batch<'a>(
        &'a self,
        messages: &'a [Received<'a>],
    ) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move {
            for message in messages {
                let span = tracing::info_span!("consume", message_id = %message.message_id);
                crate::trace::set_parent(&span, message.trace);
                self.handle(message).instrument(span).await?;
            }
            Ok(())
        })
    }
}

/// Consumes `spec.queue` until `shutdown`, reconnecting after failures.
pub async fn run_consumer(
    bus: Arc<Bus>,
    spec: ConsumerSpec,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        match consume_once(&bus, &spec, handler.as_ref(), &shutdown).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(queue = %spec.queue, %error, ?backoff, "consumer failed, reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Declares the consumer's topology without consuming (so publishes before the consumer
/// starts are kept).
pub async fn declare(bus: &Bus, spec: &ConsumerSpec) -> Result<(), BusError> {
    let channel = bus.channel().await?;
    bus.declare_consumer(&channel, spec).await?;
    let _ = channel.close(200, "declared").await;
    Ok(())
}

async fn consume_once(
    bus: &Bus,
    spec: &ConsumerSpec,
    handler: &dyn Handler,
    shutdown: &CancellationToken,
) -> Result<(), BusError> {
    let channel = bus.channel().await?;
    bus.declare_consumer(&channel, spec).await?;
    channel
        .basic_qos(spec.prefetch, BasicQosOptions::default())
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue = bus.name(&spec.queue);
    let mut consumer = channel
        .basic_consume(
            &queue,
            &format!("{queue}-{}", uuid::Uuid::new_v4().simple()),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut depth_every = tokio::time::interval(Duration::from_secs(15));
    tracing::info!(queue = %queue, "consumer started");
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = channel.close(200, "shutting down").await;
                return Ok(());
            }
            _ = depth_every.tick() => {
                record_depth(bus, &channel, &queue, &spec.queue).await;
                continue;
            }
            next = consumer.next() => match next {
                Some(delivery) => delivery?,
                None => return Err(BusError::ConsumerEnded),
            },
        };
        // Messages already waiting join the batch (never waiting for more).
        let mut deliveries = vec![delivery];
        while deliveries.len() < handler.max_batch() {
            match consumer.next().now_or_never() {
                Some(Some(Ok(next))) => deliveries.push(next),
                Some(Some(Err(error))) => return Err(error.into()),
                Some(None) => return Err(BusError::ConsumerEnded),
                None => break,
            }
        }
        if deliveries.len() > 1 {
            let ids: Vec<String> = deliveries.iter().map(message_id_of).collect();
            let keys: Vec<String> = deliveries.iter().map(original_routing_key).collect();
            let traces: Vec<Option<String>> = deliveries
                .iter()
                .map(|d| traceparent_of(&d.properties))
                .collect();
            let batch: Vec<Received<'_>> = deliveries
                .iter()
                .zip(&ids)
                .zip(&keys)
                .zip(&traces)
                .map(|(((d, id), key), trace)| Received {
                    routing_key: key.as_str(),
                    message_id: id,
                    payload: &d.data,
                    attempt: attempt_of(&d.properties),
                    trace: trace.as_deref(),
                })
                .collect();
            let span =
                tracing::info_span!("consume_batch", queue = %spec.queue, messages = batch.len());
            let outcome = handler.handle_batch(&batch).instrument(span).await;
            drop(batch);
            if outcome.is_ok() {
                metrics::counter!("relance_messages_consumed_total", "queue" => spec.queue.clone(), "outcome" => "ok")
                    .increment(deliveries.len() as u64);
                // One ack for the whole batch: deliveries arrive in tag order on this
                // channel and everything before the batch is already acked.
                if let Some(last) = deliveries.last() {
                    last.acker.ack(BasicAckOptions { multiple: true }).await?;
                }
                continue;
            }
            tracing::debug!(queue = %spec.queue, messages = deliveries.len(), "batch failed, handling its messages one by one");
        }
        for delivery in deliveries {
            handle_one(&channel, spec, &queue, handler, delivery).await?;
        }
    }
}

fn message_id_of(delivery: &lapin::message::Delivery) -> String {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_default()
}

/// Handles one delivery alone: ack on success, a delayed retry or the dead-letter queue
/// on failure.
async fn handle_one(
    channel: &Channel,
    spec: &ConsumerSpec,
    queue: &str,
    handler: &dyn Handler,
    delivery: lapin::message::Delivery,
) -> Result<(), BusError> {
    {
        let attempt = attempt_of(&delivery.properties);
        let message_id = message_id_of(&delivery);
        let routing_key = original_routing_key(&delivery);
        let trace = traceparent_of(&delivery.properties);
        let received = Received {
            routing_key: &routing_key,
            message_id: &message_id,
            payload: &delivery.data,
            attempt,
            trace: trace.as_deref(),
        };
        let span = tracing::info_span!("consume", queue = %spec.queue, routing_key = %delivery.routing_key, message_id = %message_id);
        crate::trace::set_parent(&span, trace.as_deref());
        let outcome = handler.handle(&received).instrument(span).await;
        let outcome_label = match outcome {
            Ok(()) => "ok",
            Err(HandleError::Retry(error)) if (attempt as usize) <= spec.retry_delays.len() => {
                tracing::warn!(queue = %spec.queue, %message_id, attempt, error = %format!("{error:#}"), "handler failed, retrying later");
                let target = format!("{queue}.retry.{attempt}");
                republish(channel, &target, &delivery, attempt + 1).await?;
                "retried"
            }
            Err(error) => {
                tracing::error!(queue = %spec.queue, %message_id, attempt, %error, "message dead-lettered");
                republish(channel, &format!("{queue}.dlq"), &delivery, attempt).await?;
                "dead_lettered"
            }
        };
        metrics::counter!("relance_messages_consumed_total", "queue" => spec.queue.clone(), "outcome" => outcome_label).increment(1);
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

/// The routing key the message was first published with: a retry travels through the
/// default exchange (its routing key is then the queue's name) and keeps the original in the
/// `x-relance-routing-key` header, so handlers that dispatch on the key see the same one on
/// every attempt.
fn original_routing_key(delivery: &lapin::message::Delivery) -> String {
    if let Some(headers) = delivery.properties.headers()
        && let Some(AMQPValue::LongString(key)) = headers.inner().get("x-relance-routing-key")
    {
        return key.to_string();
    }
    delivery.routing_key.as_str().to_owned()
}

/// Copies a delivery to `queue` (through the default exchange) with its attempt number,
/// waiting for the broker's confirmation before the original is acked.
async fn republish(
    channel: &Channel,
    queue: &str,
    delivery: &lapin::message::Delivery,
    attempt: u32,
) -> Result<(), BusError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongUInt(attempt));
    headers.insert(
        "x-relance-routing-key".into(),
        AMQPValue::LongString(original_routing_key(delivery).as_str().into()),
    );
    let properties = delivery.properties.clone().with_headers(headers);
    // The consumer's channel is in confirm mode: a retry copy must not be lost.
    let confirm = channel
        .basic_publish(
            "",
            queue,
            BasicPublishOptions::default(),
            &delivery.data,
            properties,
        )
        .await?;
    match confirm.await? {
        Confirmation::Nack(_) => {
            let _ = delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
            Err(BusError::Nacked(queue.to_owned()))
        }
        _ => Ok(()),
    }
}

fn attempt_of(properties: &BasicProperties) -> u32 {
    let Some(headers) = properties.headers() else {
        return 1;
    };
    match headers.inner().get(ATTEMPT_HEADER) {
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => (*n).max(1) as u32,
        Some(AMQPValue::LongLongInt(n)) => (*n).max(1) as u32,
        _ => 1,
    }
}

fn traceparent_of(properties: &BasicProperties) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(crate::trace::TRACEPARENT) {
        Some(AMQPValue::LongString(text)) => {
            Some(String::from_utf8_lossy(text.as_bytes()).into_owned())
        }
        _ => None,
    }
}

/// Sets `relance_queue_depth{queue}` (messages ready in the queue) and
/// `relance_queue_dlq_depth{queue}` (messages parked in its dead-letter queue), labelled with
/// the queue's base name like `relance_messages_consumed_total`.
async fn record_depth(bus: &Bus, channel: &Channel, queue: &str, base: &str) {
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    if let Ok(state) = channel
        .queue_declare(queue, options, FieldTable::default())
        .await
    {
        metrics::gauge!("relance_queue_depth", "queue" => base.to_owned())
            .set(f64::from(state.message_count()));
    }
    // On a channel of its own: a passive declare of a queue that is gone (an ephemeral test
    // queue expires) closes its channel, and that must not be the consumer's.
    if let Ok(parked) = bus.queue_depth(&format!("{base}.dlq")).await {
        metrics::gauge!("relance_queue_dlq_depth", "queue" => base.to_owned())
            .set(f64::from(parked));
    }
}
