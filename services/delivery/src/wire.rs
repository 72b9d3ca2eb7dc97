//! The send request as it travels on the `relance.delivery` exchange: a JSON envelope (like
//! every message of the bus) naming the workspace, around the protobuf `SendRequest` — the
//! same contract as the Send RPC, so a producer (campaigns) builds the proto it would send
//! over gRPC.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use prost::Message as _;
use relance_proto::v1::{Channel, SendRequest};
use serde::{Deserialize, Serialize};

/// Base name of the queue the delivery workers consume.
pub const REQUESTS_QUEUE: &str = "delivery.requests";

/// One send request on the bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The workspace the message belongs to.
    pub workspace_id: String,
    /// The `relance.v1.SendRequest`, protobuf-encoded then base64 (standard alphabet).
    pub request: String,
}

impl Envelope {
    /// Wraps a request.
    pub fn new(workspace_id: &str, request: &SendRequest) -> Envelope {
        Envelope {
            workspace_id: workspace_id.to_owned(),
            request: STANDARD.encode(request.encode_to_vec()),
        }
    }

    /// Wraps an already-encoded request.
    pub fn from_encoded(workspace_id: &str, encoded: &[u8]) -> Envelope {
        Envelope {
            workspace_id: workspace_id.to_owned(),
            request: STANDARD.encode(encoded),
        }
    }

    /// The request inside.
    pub fn decode(&self) -> anyhow::Result<SendRequest> {
        let bytes = STANDARD.decode(&self.request)?;
        Ok(SendRequest::decode(bytes.as_slice())?)
    }

    /// The routing key: the first channel's name.
    pub fn routing_key(request: &SendRequest) -> &'static str {
        let channel = request
            .channels
            .first()
            .and_then(|c| Channel::try_from(*c).ok())
            .unwrap_or(Channel::Unspecified);
        crate::domain::choose::channel_name(channel)
    }

    /// The AMQP message id: unique per workspace and idempotency key.
    pub fn message_id(workspace_id: &str, request: &SendRequest) -> String {
        format!("{workspace_id}:{}", request.idempotency_key)
    }
}
