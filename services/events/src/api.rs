//! The `Events` gRPC service: translates between the proto and the ingestor and store.

use futures::StreamExt as _;
use relance_kit::auth;
use relance_kit::{ApiError, ApiResult};
use relance_proto::convert::{
    chrono_to_timestamp, json_to_struct, struct_to_json, timestamp_to_chrono,
};
use relance_proto::v1::events_server::Events;
use relance_proto::v1::{self as pb, customer_ref};
use tonic::{Request, Response, Status};

use crate::domain::RawEvent;
use crate::ingest::Ingestor;
use crate::store::EventQuery;

/// At most this many refusals are listed in an Import summary.
const MAX_IMPORT_ERRORS: usize = 100;

/// The gRPC face of the events service.
#[derive(Debug, Clone)]
pub struct EventsApi {
    pub ingestor: Ingestor,
}

/// An event as received on the wire, before validation (pure: what Track, TrackBatch and
/// Import hand to [`crate::domain::validate`]).
pub fn raw_event(event: pb::Event) -> RawEvent {
    RawEvent {
        message_id: event.message_id,
        name: event.name,
        customer_id: event.customer_id,
        anonymous_id: event.anonymous_id,
        timestamp: event.timestamp.as_ref().map(timestamp_to_chrono),
        properties: event
            .properties
            .as_ref()
            .map(struct_to_json)
            .unwrap_or(serde_json::Value::Null),
        context: event.context.into_iter().collect(),
    }
}

fn item_error(offset: usize, index: usize, field: &str, reason: &str) -> pb::ItemError {
    pb::ItemError {
        index: (offset + index) as u32,
        field: field.to_owned(),
        reason: reason.to_owned(),
    }
}

fn check_batch_size(len: usize, max: usize, field: &str) -> ApiResult<()> {
    if len == 0 {
        return Err(ApiError::invalid(field, "at least one event is required"));
    }
    if len > max {
        return Err(ApiError::invalid(
            field,
            format!("{len} events, more than {max} in one call"),
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl Events for EventsApi {
    #[tracing::instrument(skip_all, fields(workspace))]
    async fn track(
        &self,
        request: Request<pb::TrackRequest>,
    ) -> Result<Response<pb::TrackResponse>, Status> {
        let caller = auth::caller(&request)?;
        tracing::Span::current().record("workspace", caller.workspace_id.as_str());
        let Some(event) = request.into_inner().event else {
            return Err(ApiError::invalid("event", "required").into());
        };
        let mut raw = raw_event(event);
        // Fix the id here so that the response can name a generated one.
        if raw.message_id.is_empty() {
            raw.message_id = uuid::Uuid::now_v7().to_string();
        }
        let message_id = raw.message_id.clone();
        let outcome = self
            .ingestor
            .ingest(&caller.workspace_id, vec![raw])
            .await
            .map_err(ApiError::from)?;
        if let Some((_, error)) = outcome.rejected.first() {
            return Err(
                ApiError::invalid(format!("event.{}", error.field), error.reason.clone()).into(),
            );
        }
        Ok(Response::new(pb::TrackResponse {
            message_id,
            duplicate: outcome.accepted == 0,
        }))
    }

    #[tracing::instrument(skip_all, fields(workspace, events))]
    async fn track_batch(
        &self,
        request: Request<pb::TrackBatchRequest>,
    ) -> Result<Response<pb::TrackBatchResponse>, Status> {
        let caller = auth::caller(&request)?;
        let events = request.into_inner().events;
        let span = tracing::Span::current();
        span.record("workspace", caller.workspace_id.as_str());
        span.record("events", events.len());
        check_batch_size(events.len(), self.ingestor.limits.max_batch, "events")?;
        let batch = events.into_iter().map(raw_event).collect();
        let outcome = self
            .ingestor
            .ingest(&caller.workspace_id, batch)
            .await
            .map_err(ApiError::from)?;
        let rejected = outcome
            .rejected
            .iter()
            .map(|(index, error)| {
                item_error(
                    0,
                    *index,
                    &format!("events[{index}].{}", error.field),
                    &error.reason,
                )
            })
            .collect();
        Ok(Response::new(pb::TrackBatchResponse {
            accepted: outcome.accepted as u32,
            duplicates: outcome.duplicates as u32,
            rejected,
        }))
    }

    #[tracing::instrument(skip_all, fields(workspace))]
    async fn import(
        &self,
        request: Request<tonic::Streaming<pb::ImportRequest>>,
    ) -> Result<Response<pb::ImportResponse>, Status> {
        let caller = auth::caller(&request)?;
        tracing::Span::current().record("workspace", caller.workspace_id.as_str());
        let mut stream = request.into_inner();
        let mut summary = pb::ImportResponse::default();
        let mut offset = 0usize;
        while let Some(chunk) = stream.next().await {
            let events = chunk?.events;
            check_batch_size(
                events.len(),
                self.ingestor.limits.max_batch,
                &format!("chunk at event {offset}"),
            )?;
            let count = events.len();
            let batch = events.into_iter().map(raw_event).collect();
            let outcome = self
                .ingestor
                .ingest(&caller.workspace_id, batch)
                .await
                .map_err(ApiError::from)?;
            summary.received += count as u64;
            summary.accepted += outcome.accepted;
            summary.duplicates += outcome.duplicates;
            summary.rejected += outcome.rejected.len() as u64;
            for (index, error) in outcome.rejected {
                if summary.errors.len() < MAX_IMPORT_ERRORS {
                    summary
                        .errors
                        .push(item_error(offset, index, &error.field, &error.reason));
                }
            }
            offset += count;
        }
        tracing::info!(
            received = summary.received,
            accepted = summary.accepted,
            duplicates = summary.duplicates,
            rejected = summary.rejected,
            "import finished"
        );
        Ok(Response::new(summary))
    }

    #[tracing::instrument(skip_all, fields(workspace))]
    async fn query(
        &self,
        request: Request<pb::QueryEventsRequest>,
    ) -> Result<Response<pb::QueryEventsResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let mut query = EventQuery {
            names: request.names,
            ..EventQuery::default()
        };
        match request.customer.and_then(|c| c.id) {
            Some(customer_ref::Id::CustomerId(id)) if !id.is_empty() => {
                query.customer_id = Some(id)
            }
            Some(customer_ref::Id::AnonymousId(id)) if !id.is_empty() => {
                query.anonymous_id = Some(id)
            }
            _ => {
                return Err(ApiError::invalid(
                    "customer",
                    "a customer_id or anonymous_id is required",
                )
                .into());
            }
        }
        if let Some(range) = request.range {
            query.from = range.from.as_ref().and_then(timestamp_to_chrono);
            query.to = range.to.as_ref().and_then(timestamp_to_chrono);
        }
        query.limit = match request.page_size {
            0 => 100,
            n if n > 1000 => return Err(ApiError::invalid("page_size", "at most 1000").into()),
            n => i64::from(n),
        };
        if !request.page_token.is_empty() {
            query.before = Some(parse_page_token(&request.page_token)?);
        }
        let rows = self
            .ingestor
            .store
            .query(&caller.workspace_id, &query)
            .await
            .map_err(ApiError::from)?;
        let next_page_token = match rows.last() {
            Some(last) if rows.len() as i64 == query.limit => {
                format!("{}:{}", last.timestamp.timestamp_micros(), last.seq)
            }
            _ => String::new(),
        };
        let events = rows
            .into_iter()
            .map(|row| pb::StoredEvent {
                seq: row.seq as u64,
                received_at: Some(chrono_to_timestamp(row.received_at)),
                event: Some(pb::Event {
                    message_id: row.message_id,
                    name: row.name,
                    customer_id: row.customer_id.unwrap_or_default(),
                    anonymous_id: row.anonymous_id.unwrap_or_default(),
                    timestamp: Some(chrono_to_timestamp(row.timestamp)),
                    properties: Some(json_to_struct(&row.properties)),
                    context: match row.context {
                        serde_json::Value::Object(map) => map
                            .into_iter()
                            .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_owned()))
                            .collect(),
                        _ => Default::default(),
                    },
                }),
            })
            .collect();
        Ok(Response::new(pb::QueryEventsResponse {
            events,
            next_page_token,
        }))
    }
}

fn parse_page_token(token: &str) -> ApiResult<(chrono::DateTime<chrono::Utc>, i64)> {
    let bad = || ApiError::invalid("page_token", "not a token returned by Query");
    let (micros, seq) = token.split_once(':').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let seq: i64 = seq.parse().map_err(|_| bad())?;
    let time = chrono::DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
    Ok((time, seq))
}
