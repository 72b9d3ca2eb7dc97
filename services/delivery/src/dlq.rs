//! The dead-letter queue of send requests (`delivery.requests.dlq`): requests that could
//! never be handled (malformed, invalid) or whose retries through the broker ran out. An
//! operator lists them, fixes the cause, and replays them into the main queue; replayed
//! requests keep their idempotency keys, so one that did go out is not sent twice.

use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::AMQPValue;
use relance_kit::bus::Bus;

use crate::wire::REQUESTS_QUEUE;

/// One dead-lettered request.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its AMQP message id (`<workspace>:<idempotency key>` when set).
    pub message_id: String,
    /// The routing key it was first published with.
    pub routing_key: String,
    /// The delivery attempt it died on.
    pub attempt: u32,
    /// The envelope's workspace and idempotency key, when it decodes.
    pub summary: String,
    /// The raw body.
    pub body: Vec<u8>,
}

fn dlq_name(bus: &Bus) -> String {
    bus.name(&format!("{REQUESTS_QUEUE}.dlq"))
}

fn describe(body: &[u8]) -> String {
    match crate::consumer::decode(body) {
        Ok((workspace, request)) => format!(
            "workspace {workspace}, key {:?}, topic {:?}",
            request.idempotency_key, request.topic
        ),
        Err(error) => format!("undecodable: {error}"),
    }
}

fn header_text(properties: &BasicProperties, name: &str) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads up to `limit` dead letters without removing them (they return to the queue when the
/// channel closes, unacked).
pub async fn list(bus: &Bus, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let channel = bus.channel().await?;
    let queue = dlq_name(bus);
    let mut letters = Vec::new();
    while letters.len() < limit {
        let Some(message) = channel
            .basic_get(&queue, BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let delivery = message.delivery;
        letters.push(DeadLetter {
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
                .unwrap_or_default(),
            routing_key: header_text(&delivery.properties, "x-relance-routing-key")
                .unwrap_or_default(),
            attempt: header_text(&delivery.properties, "x-relance-attempt")
                .and_then(|a| a.parse().ok())
                .unwrap_or(1),
            summary: describe(&delivery.data),
            body: delivery.data.clone(),
        });
    }
    let _ = channel.close(200, "listed").await;
    Ok(letters)
}

/// Moves up to `limit` dead letters back to the main queue (attempt counter reset); each is
/// removed from the dead-letter queue only once the broker confirmed the copy.
pub async fn replay(bus: &Bus, limit: usize) -> anyhow::Result<usize> {
    let channel = bus.channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue = dlq_name(bus);
    let target = bus.name(REQUESTS_QUEUE);
    // Only what is there now: every request is taken (and held, unacked) before any is
    // published, so one refused again and dead-lettered back is not replayed twice.
    let mut taken = Vec::new();
    while taken.len() < limit {
        let Some(message) = channel
            .basic_get(&queue, BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        taken.push(message.delivery);
    }
    let mut replayed = 0;
    for delivery in taken {
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        if let Some(id) = delivery.properties.message_id() {
            properties = properties.with_message_id(id.clone());
        }
        let confirm = channel
            .basic_publish(
                "",
                &target,
                BasicPublishOptions::default(),
                &delivery.data,
                properties,
            )
            .await?
            .await?;
        if let Confirmation::Nack(_) = confirm {
            anyhow::bail!("rabbitmq refused a replayed request; it stays in the dead-letter queue");
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        replayed += 1;
    }
    let _ = channel.close(200, "replayed").await;
    Ok(replayed)
}
