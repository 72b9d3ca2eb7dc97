//! The `Segments` gRPC service: translates between the proto and the store.

use std::pin::Pin;

use futures::Stream;
use relance_kit::yaml::Problem;
use relance_kit::{ApiError, ApiResult, SharedClock, auth};
use relance_proto::convert::{chrono_to_timestamp, timestamp_to_chrono};
use relance_proto::v1::segments_server::Segments;
use relance_proto::v1::{self as pb, customer_ref};
use tonic::{Request, Response, Status};

use crate::domain::{Person, SegmentError, parse};
use crate::store::{Member, SegmentRecord, SegmentStore};

/// The gRPC face of the segmentation service.
#[derive(Debug, Clone)]
pub struct SegmentsApi {
    pub store: SegmentStore,
    pub clock: SharedClock,
}

fn person_of(customer: Option<pb::CustomerRef>, field: &str) -> ApiResult<Person> {
    let person = match customer.and_then(|c| c.id) {
        Some(customer_ref::Id::CustomerId(id)) if !id.is_empty() && id.len() <= 128 => {
            Person::Customer(id)
        }
        Some(customer_ref::Id::AnonymousId(id)) if !id.is_empty() && id.len() <= 128 => {
            Person::Visitor(id)
        }
        Some(_) => return Err(ApiError::invalid(field, "ids are 1 to 128 characters")),
        None => {
            return Err(ApiError::invalid(
                field,
                "a customer_id or anonymous_id is required",
            ));
        }
    };
    Ok(person)
}

fn customer_ref(person: &Person) -> pb::CustomerRef {
    pb::CustomerRef {
        id: Some(match person {
            Person::Customer(id) => customer_ref::Id::CustomerId(id.clone()),
            Person::Visitor(id) => customer_ref::Id::AnonymousId(id.clone()),
        }),
    }
}

fn status_of(status: &str) -> pb::SegmentStatus {
    match status {
        "building" => pb::SegmentStatus::Building,
        "active" => pb::SegmentStatus::Active,
        "archived" => pb::SegmentStatus::Archived,
        _ => pb::SegmentStatus::Unspecified,
    }
}

fn to_proto(record: SegmentRecord) -> pb::Segment {
    pb::Segment {
        name: record.name,
        version: record.version as u32,
        latest_version: record.latest_version as u32,
        status: status_of(&record.status) as i32,
        description: record.description,
        yaml: record.yaml,
        event_names: record.event_names,
        depends_on: record.depends_on,
        time_dependent: record.time_dependent,
        member_count: record.member_count as u64,
        created_at: Some(chrono_to_timestamp(record.created_at)),
        updated_at: Some(chrono_to_timestamp(record.updated_at)),
        ready_at: record.ready_at.map(chrono_to_timestamp),
        archived_at: record.archived_at.map(chrono_to_timestamp),
    }
}

fn problems_to_proto(problems: Vec<Problem>) -> Vec<pb::SegmentDefinitionError> {
    problems
        .into_iter()
        .map(|p| pb::SegmentDefinitionError {
            field: p.field,
            reason: p.reason,
            line: p.line,
            column: p.column,
        })
        .collect()
}

fn member_to_proto(member: &Member) -> pb::SegmentMember {
    pb::SegmentMember {
        customer: Some(customer_ref(&member.person)),
        entered_at: Some(chrono_to_timestamp(member.entered_at)),
    }
}

fn check_name(name: &str, field: &str) -> ApiResult<()> {
    if parse::valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            "a segment name is 1 to 64 lowercase letters, digits or `-`, starting with a letter",
        ))
    }
}

/// Page tokens are the last person key (or segment name) of the previous page, in hex so
/// that they are opaque and URL-safe.
fn decode_token(token: &str, field: &str) -> ApiResult<String> {
    if token.is_empty() {
        return Ok(String::new());
    }
    hex::decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| ApiError::invalid(field, "not a token this service issued"))
}

type MemberStream =
    Pin<Box<dyn Stream<Item = Result<pb::ListSegmentMembersResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Segments for SegmentsApi {
    async fn apply(
        &self,
        request: Request<pb::ApplySegmentRequest>,
    ) -> Result<Response<pb::ApplySegmentResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let outcome = self
            .store
            .apply(
                &caller.workspace_id,
                &request.yaml,
                request.dry_run,
                self.clock.now(),
            )
            .await;
        match outcome {
            Ok(applied) => Ok(Response::new(pb::ApplySegmentResponse {
                name: applied.name,
                version: applied.version as u32,
                changed: applied.changed,
                status: status_of(&applied.status) as i32,
                errors: Vec::new(),
            })),
            Err(SegmentError::Invalid(problems)) if request.dry_run => {
                Ok(Response::new(pb::ApplySegmentResponse {
                    name: parse::document_name(&request.yaml),
                    version: 0,
                    changed: false,
                    status: pb::SegmentStatus::Unspecified as i32,
                    errors: problems_to_proto(problems),
                }))
            }
            Err(error) => Err(ApiError::from(error).into()),
        }
    }

    async fn get(
        &self,
        request: Request<pb::GetSegmentRequest>,
    ) -> Result<Response<pb::Segment>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        check_name(&request.name, "name")?;
        let record = self
            .store
            .get(&caller.workspace_id, &request.name, request.version as i32)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(to_proto(record)))
    }

    async fn list(
        &self,
        request: Request<pb::ListSegmentsRequest>,
    ) -> Result<Response<pb::ListSegmentsResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let size = match request.page_size {
            0 => 100,
            n if n <= 1000 => i64::from(n),
            _ => return Err(ApiError::invalid("page_size", "at most 1,000").into()),
        };
        let after = decode_token(&request.page_token, "page_token")?;
        let records = self
            .store
            .list(
                &caller.workspace_id,
                &request.name_prefix,
                request.include_archived,
                &after,
                size + 1,
            )
            .await
            .map_err(ApiError::from)?;
        let more = records.len() as i64 > size;
        let mut segments: Vec<pb::Segment> = records
            .into_iter()
            .take(size as usize)
            .map(to_proto)
            .collect();
        let next_page_token = match (more, segments.last()) {
            (true, Some(last)) => hex::encode(&last.name),
            _ => String::new(),
        };
        for segment in &mut segments {
            segment.yaml.clear();
        }
        Ok(Response::new(pb::ListSegmentsResponse {
            segments,
            next_page_token,
        }))
    }

    async fn count(
        &self,
        request: Request<pb::CountSegmentRequest>,
    ) -> Result<Response<pb::CountSegmentResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        check_name(&request.name, "name")?;
        let as_of = self.clock.now();
        let (version, count) = self
            .store
            .count(&caller.workspace_id, &request.name)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::CountSegmentResponse {
            name: request.name,
            version: version as u32,
            count: count as u64,
            as_of: Some(chrono_to_timestamp(as_of)),
        }))
    }

    type ListMembersStream = MemberStream;

    async fn list_members(
        &self,
        request: Request<pb::ListSegmentMembersRequest>,
    ) -> Result<Response<Self::ListMembersStream>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        check_name(&request.name, "name")?;
        let page_size = match request.page_size {
            0 => 1000,
            n if n <= 10_000 => i64::from(n),
            _ => return Err(ApiError::invalid("page_size", "at most 10,000").into()),
        };
        let mut after = decode_token(&request.page_token, "page_token")?;
        let entered_since = request
            .entered_since
            .map(|t| {
                timestamp_to_chrono(&t)
                    .ok_or_else(|| ApiError::invalid("entered_since", "not a valid timestamp"))
            })
            .transpose()?;
        let (segment_id, version) = self
            .store
            .answering(&caller.workspace_id, &request.name)
            .await
            .map_err(ApiError::from)?;
        let store = self.store.clone();
        let limit = request.limit;
        let stream = async_stream(move |tx| async move {
            let mut sent = 0u64;
            loop {
                let mut want = page_size;
                if limit > 0 {
                    want = want.min((limit - sent) as i64);
                }
                if want == 0 {
                    return;
                }
                let page = match store
                    .members_page(segment_id, version, &after, want, entered_since)
                    .await
                {
                    Ok(page) => page,
                    Err(error) => {
                        let _ = tx.send(Err(Status::from(ApiError::from(error)))).await;
                        return;
                    }
                };
                sent += page.len() as u64;
                let last = page.len() < want as usize || (limit > 0 && sent >= limit);
                if let Some(member) = page.last() {
                    after = member.person.key();
                }
                let response = pb::ListSegmentMembersResponse {
                    members: page.iter().map(member_to_proto).collect(),
                    version: version as u32,
                    next_page_token: if last {
                        String::new()
                    } else {
                        hex::encode(&after)
                    },
                };
                if tx.send(Ok(response)).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn is_member(
        &self,
        request: Request<pb::IsSegmentMemberRequest>,
    ) -> Result<Response<pb::IsSegmentMemberResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let person = person_of(request.customer, "customer")?;
        if request.names.is_empty() || request.names.len() > 100 {
            return Err(ApiError::invalid("names", "1 to 100 segment names").into());
        }
        for (i, name) in request.names.iter().enumerate() {
            check_name(name, &format!("names[{i}]"))?;
        }
        let answers = self
            .store
            .is_member(&caller.workspace_id, &person, &request.names)
            .await
            .map_err(ApiError::from)?;
        let memberships = request
            .names
            .into_iter()
            .zip(answers)
            .map(|(name, (version, entered_at))| pb::SegmentMembership {
                name,
                version: version as u32,
                member: entered_at.is_some(),
                entered_at: entered_at.map(chrono_to_timestamp),
            })
            .collect();
        Ok(Response::new(pb::IsSegmentMemberResponse { memberships }))
    }

    async fn preview(
        &self,
        request: Request<pb::PreviewSegmentRequest>,
    ) -> Result<Response<pb::PreviewSegmentResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let sample_size = match request.sample_size {
            0 => 10,
            n if n <= 100 => n as usize,
            _ => return Err(ApiError::invalid("sample_size", "at most 100").into()),
        };
        let now = self.clock.now();
        let compiled = match self.store.check(&caller.workspace_id, &request.yaml).await {
            Ok(compiled) => compiled,
            Err(SegmentError::Invalid(problems)) => {
                return Ok(Response::new(pb::PreviewSegmentResponse {
                    as_of: Some(chrono_to_timestamp(now)),
                    errors: problems_to_proto(problems),
                    ..Default::default()
                }));
            }
            Err(error) => return Err(ApiError::from(error).into()),
        };
        let result = self
            .store
            .preview(&caller.workspace_id, &compiled, sample_size, now)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::PreviewSegmentResponse {
            count: result.members,
            population: result.population,
            sample: result.sample.iter().map(member_to_proto).collect(),
            as_of: Some(chrono_to_timestamp(now)),
            errors: Vec::new(),
        }))
    }

    async fn archive(
        &self,
        request: Request<pb::ArchiveSegmentRequest>,
    ) -> Result<Response<pb::Segment>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        check_name(&request.name, "name")?;
        let record = self
            .store
            .archive(&caller.workspace_id, &request.name, self.clock.now())
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(to_proto(record)))
    }
}

/// A stream fed by a task through a small channel (backpressure: the task waits while
/// the client reads).
fn async_stream<F, Fut>(
    produce: F,
) -> impl Stream<Item = Result<pb::ListSegmentMembersResponse, Status>> + Send
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::ListSegmentMembersResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(produce(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
