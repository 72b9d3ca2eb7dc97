//! The `Campaigns` gRPC API: translates between proto and the domain and store. Every call
//! needs the `admin` scope (checked by the kit's auth layer).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use relance_kit::SharedClock;
use relance_kit::auth;
use relance_kit::error::{ApiError, ApiResult};
use relance_kit::yaml::{self, Problem};
use relance_proto::convert::{
    chrono_to_timestamp, json_to_struct, struct_to_json, timestamp_to_chrono,
};
use relance_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::broadcaster;
use crate::clients::Clients;
use crate::domain::guard::{self, CapPeriod, CapPolicy, CapRule, CapSettings, QuietHoursRule};
use crate::domain::model::{
    BranchCondition, BroadcastDef, BroadcastSchedule, ChannelName, Conversion, DEFAULT_TOPIC,
    FlowDef, StepKind, Trigger, Variant,
};
use crate::domain::parse;
use crate::domain::report::{self, ReportInput, StepInfo};
use crate::domain::schedule::Cron;
use crate::engine::{domain_channel, proto_channel};
use crate::store::CampaignStore;
use crate::store::broadcasts::Scheduled;
use crate::store::flows::{FlowRecord, FlowStatus};
use crate::store::report::ReportScope;

/// The Campaigns service.
#[derive(Debug, Clone)]
pub struct CampaignsApi {
    pub store: CampaignStore,
    pub clients: Clients,
    pub clock: SharedClock,
}

fn problem_to_proto(problem: &Problem) -> pb::CampaignDefinitionError {
    pb::CampaignDefinitionError {
        field: problem.field.clone(),
        reason: problem.reason.clone(),
        line: problem.line,
        column: problem.column,
    }
}

fn unavailable(service: &str) -> impl Fn(Status) -> ApiError + '_ {
    move |status| ApiError::Unavailable(format!("{service}: {}", status.message()))
}

fn problem(field: &str, reason: String) -> Problem {
    Problem {
        field: field.to_owned(),
        reason,
        line: 0,
        column: 0,
    }
}

impl CampaignsApi {
    /// Checks that the segments and templates a flow names exist.
    async fn check_references(&self, workspace_id: &str, def: &FlowDef) -> ApiResult<Vec<Problem>> {
        let mut problems = Vec::new();
        let mut segment_fields: Vec<(String, &str)> = Vec::new();
        match &def.trigger {
            Trigger::SegmentEntered { segment } => {
                segment_fields.push(("trigger.segment_entered".into(), segment))
            }
            Trigger::Schedule { segment, .. } => {
                segment_fields.push(("trigger.segment".into(), segment))
            }
            Trigger::Event(_) => {}
        }
        if let Some(segment) = &def.audience.segment {
            segment_fields.push(("audience.segment".into(), segment));
        }
        for (i, segment) in def.audience.exclude_segments.iter().enumerate() {
            segment_fields.push((format!("audience.exclude[{i}]"), segment));
        }
        let mut template_fields: Vec<(String, &str)> = Vec::new();
        for step in &def.steps {
            match &step.kind {
                StepKind::Branch {
                    condition: BranchCondition::Segment { segment },
                    ..
                } => segment_fields.push((format!("{}.branch.if.segment", step.id), segment)),
                StepKind::Send(send) => {
                    if let Some(template) = &send.template {
                        template_fields.push((format!("{}.send.template", step.id), template));
                    }
                    for (i, variant) in send.variants.iter().enumerate() {
                        template_fields.push((
                            format!("{}.send.variants[{i}].template", step.id),
                            &variant.template,
                        ));
                    }
                }
                _ => {}
            }
        }
        let mut known: HashMap<String, bool> = HashMap::new();
        for (field, segment) in segment_fields {
            let exists = match known.get(segment) {
                Some(exists) => *exists,
                None => {
                    let exists = self
                        .clients
                        .segment_exists(workspace_id, segment)
                        .await
                        .map_err(unavailable("segmentation"))?;
                    known.insert(segment.to_owned(), exists);
                    exists
                }
            };
            if !exists {
                problems.push(problem(
                    &field,
                    format!("segment \"{segment}\" does not exist"),
                ));
            }
        }
        let mut known: HashMap<String, bool> = HashMap::new();
        for (field, template) in template_fields {
            let exists = match known.get(template) {
                Some(exists) => *exists,
                None => {
                    let exists = self
                        .clients
                        .template_exists(workspace_id, template)
                        .await
                        .map_err(unavailable("delivery"))?;
                    known.insert(template.to_owned(), exists);
                    exists
                }
            };
            if !exists {
                problems.push(problem(
                    &field,
                    format!("template \"{template}\" does not exist"),
                ));
            }
        }
        Ok(problems)
    }

    async fn check_broadcast_references(
        &self,
        workspace_id: &str,
        def: &BroadcastDef,
        prefix: &str,
    ) -> ApiResult<Vec<Problem>> {
        let mut problems = Vec::new();
        let mut segments = vec![(format!("{prefix}segment"), def.segment.clone())];
        for (i, segment) in def.exclude_segments.iter().enumerate() {
            segments.push((format!("{prefix}exclude_segments[{i}]"), segment.clone()));
        }
        for (field, segment) in segments {
            if !self
                .clients
                .segment_exists(workspace_id, &segment)
                .await
                .map_err(unavailable("segmentation"))?
            {
                problems.push(problem(
                    &field,
                    format!("segment \"{segment}\" does not exist"),
                ));
            }
        }
        let mut templates = Vec::new();
        if let Some(template) = &def.template {
            templates.push((format!("{prefix}template"), template.clone()));
        }
        for (i, variant) in def.variants.iter().enumerate() {
            templates.push((
                format!("{prefix}variants[{i}].template"),
                variant.template.clone(),
            ));
        }
        for (field, template) in templates {
            if !self
                .clients
                .template_exists(workspace_id, &template)
                .await
                .map_err(unavailable("delivery"))?
            {
                problems.push(problem(
                    &field,
                    format!("template \"{template}\" does not exist"),
                ));
            }
        }
        Ok(problems)
    }
}

/// The first run of a schedule-triggered flow.
fn schedule_next_run(def: &FlowDef, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let Trigger::Schedule {
        cron, local_time, ..
    } = &def.trigger
    else {
        return None;
    };
    let cron = Cron::parse(cron).ok()?;
    let tz = if *local_time {
        chrono_tz::Etc::GMTMinus14
    } else {
        chrono_tz::UTC
    };
    cron.next_after(now, tz)
}

#[tonic::async_trait]
impl pb::campaigns_server::Campaigns for CampaignsApi {
    async fn apply_flow(
        &self,
        request: Request<pb::ApplyFlowRequest>,
    ) -> Result<Response<pb::ApplyFlowResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let now = self.clock.now();
        let def = match parse::parse_flow(&request.yaml) {
            Ok(def) => def,
            Err(problems) => return refuse_flow(&request, &problems),
        };
        let problems = self.check_references(&caller.workspace_id, &def).await?;
        if !problems.is_empty() {
            if request.dry_run {
                return Ok(Response::new(pb::ApplyFlowResponse {
                    name: def.name.clone(),
                    errors: problems.iter().map(problem_to_proto).collect(),
                    ..Default::default()
                }));
            }
            return Err(ApiError::invalid("yaml", yaml::describe(&problems)).into());
        }
        if request.dry_run {
            let (version, changed) = self.store.would_apply(&caller.workspace_id, &def).await?;
            return Ok(Response::new(pb::ApplyFlowResponse {
                name: def.name.clone(),
                version,
                changed,
                status: pb::FlowStatus::Active as i32,
                errors: Vec::new(),
            }));
        }
        let applied = self
            .store
            .apply_flow(
                &caller.workspace_id,
                &def,
                &request.yaml,
                schedule_next_run(&def, now),
                now,
            )
            .await?;
        tracing::info!(flow = %def.name, version = applied.version, changed = applied.changed, "flow applied");
        Ok(Response::new(pb::ApplyFlowResponse {
            name: def.name,
            version: applied.version,
            changed: applied.changed,
            status: flow_status(applied.status) as i32,
            errors: Vec::new(),
        }))
    }

    async fn get_flow(
        &self,
        request: Request<pb::GetFlowRequest>,
    ) -> Result<Response<pb::Flow>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        check_name(&request.name, "name")?;
        let flow = self
            .store
            .flow(&caller.workspace_id, &request.name, request.version)
            .await?;
        Ok(Response::new(flow_to_proto(&flow, true)))
    }

    async fn list_flows(
        &self,
        request: Request<pb::ListFlowsRequest>,
    ) -> Result<Response<pb::ListFlowsResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let limit = page_size(request.page_size, 100, 1000, "page_size")?;
        let mut statuses: Vec<i16> = Vec::new();
        for (i, status) in request.statuses.iter().enumerate() {
            match pb::FlowStatus::try_from(*status) {
                Ok(pb::FlowStatus::Active) => statuses.push(1),
                Ok(pb::FlowStatus::Paused) => statuses.push(2),
                Ok(pb::FlowStatus::Archived) => statuses.push(3),
                _ => {
                    return Err(
                        ApiError::invalid(format!("statuses[{i}]"), "not a flow status").into(),
                    );
                }
            }
        }
        if statuses.is_empty() {
            statuses = vec![1, 2];
        }
        let after = decode_token(&request.page_token, "page_token")?;
        let flows = self
            .store
            .list_flows(
                &caller.workspace_id,
                &statuses,
                &request.name_prefix,
                &after,
                limit + 1,
            )
            .await?;
        let more = flows.len() as i64 > limit;
        let flows: Vec<pb::Flow> = flows
            .iter()
            .take(limit as usize)
            .map(|f| flow_to_proto(f, false))
            .collect();
        let next_page_token = match (more, flows.last()) {
            (true, Some(last)) => hex::encode(&last.name),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListFlowsResponse {
            flows,
            next_page_token,
        }))
    }

    async fn pause_flow(
        &self,
        request: Request<pb::PauseFlowRequest>,
    ) -> Result<Response<pb::Flow>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        check_name(&request.name, "name")?;
        self.store
            .pause_flow(&caller.workspace_id, &request.name, self.clock.now())
            .await?;
        let flow = self
            .store
            .flow(&caller.workspace_id, &request.name, 0)
            .await?;
        Ok(Response::new(flow_to_proto(&flow, false)))
    }

    async fn resume_flow(
        &self,
        request: Request<pb::ResumeFlowRequest>,
    ) -> Result<Response<pb::Flow>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        check_name(&request.name, "name")?;
        self.store
            .resume_flow(
                &caller.workspace_id,
                &request.name,
                request.end_held_journeys,
                self.clock.now(),
            )
            .await?;
        let flow = self
            .store
            .flow(&caller.workspace_id, &request.name, 0)
            .await?;
        Ok(Response::new(flow_to_proto(&flow, false)))
    }

    async fn archive_flow(
        &self,
        request: Request<pb::ArchiveFlowRequest>,
    ) -> Result<Response<pb::Flow>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        check_name(&request.name, "name")?;
        self.store
            .archive_flow(&caller.workspace_id, &request.name, self.clock.now())
            .await?;
        let flow = self
            .store
            .flow(&caller.workspace_id, &request.name, 0)
            .await?;
        Ok(Response::new(flow_to_proto(&flow, false)))
    }

    async fn list_journeys(
        &self,
        request: Request<pb::ListJourneysRequest>,
    ) -> Result<Response<pb::ListJourneysResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let customer_id = match request.customer.and_then(|c| c.id) {
            Some(pb::customer_ref::Id::CustomerId(id)) if !id.is_empty() => id,
            Some(pb::customer_ref::Id::AnonymousId(_)) => {
                return Err(ApiError::invalid(
                    "customer.anonymous_id",
                    "journeys belong to known customers: give customer_id",
                )
                .into());
            }
            _ => return Err(ApiError::invalid("customer", "required").into()),
        };
        if !request.flow.is_empty() {
            check_name(&request.flow, "flow")?;
        }
        let limit = page_size(request.page_size, 50, 500, "page_size")?;
        let mut statuses = Vec::new();
        for (i, status) in request.statuses.iter().enumerate() {
            match pb::JourneyStatus::try_from(*status) {
                Ok(pb::JourneyStatus::Active) => statuses.push(1i16),
                Ok(pb::JourneyStatus::Held) => statuses.push(2),
                Ok(pb::JourneyStatus::Ended) => statuses.push(3),
                _ => {
                    return Err(ApiError::invalid(
                        format!("statuses[{i}]"),
                        "not a journey status",
                    )
                    .into());
                }
            }
        }
        let before = if request.page_token.is_empty() {
            None
        } else {
            let micros: i64 = decode_token(&request.page_token, "page_token")?
                .parse()
                .map_err(|_| ApiError::invalid("page_token", "not a token this service issued"))?;
            DateTime::<Utc>::from_timestamp_micros(micros)
        };
        let journeys = self
            .store
            .list_journeys(
                &caller.workspace_id,
                &customer_id,
                &request.flow,
                &statuses,
                before,
                limit + 1,
            )
            .await?;
        let more = journeys.len() as i64 > limit;
        let mut out = Vec::new();
        for journey in journeys.iter().take(limit as usize) {
            let def = self
                .store
                .definition(&caller.workspace_id, &journey.flow, journey.flow_version)
                .await?;
            let ended = journey.status == 3;
            out.push(pb::Journey {
                journey_id: journey.id.to_string(),
                flow: journey.flow.clone(),
                flow_version: journey.flow_version,
                customer: Some(pb::CustomerRef {
                    id: Some(pb::customer_ref::Id::CustomerId(
                        journey.customer_id.clone(),
                    )),
                }),
                status: journey.status as i32,
                end_reason: journey.end_reason.unwrap_or(0) as i32,
                control: journey.control,
                current_step: if ended {
                    String::new()
                } else {
                    def.steps
                        .get(journey.state.position)
                        .map(|s| s.id.clone())
                        .unwrap_or_default()
                },
                next_wake_at: journey.next_wake_at.map(chrono_to_timestamp),
                variants: journey.state.variants.clone().into_iter().collect(),
                entered_at: Some(chrono_to_timestamp(journey.entered_at)),
                ended_at: journey.ended_at.map(chrono_to_timestamp),
            });
        }
        let next_page_token = match (more, journeys.get(limit as usize - 1)) {
            (true, Some(last)) => hex::encode(last.entered_at.timestamp_micros().to_string()),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListJourneysResponse {
            journeys: out,
            next_page_token,
        }))
    }

    async fn schedule_broadcast(
        &self,
        request: Request<pb::ScheduleBroadcastRequest>,
    ) -> Result<Response<pb::ScheduleBroadcastResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let now = self.clock.now();
        let (parsed, yaml_text, prefix) = match &request.definition {
            Some(pb::schedule_broadcast_request::Definition::Yaml(text)) => {
                (parse::parse_broadcast(text), text.clone(), "")
            }
            Some(pb::schedule_broadcast_request::Definition::Spec(spec)) => {
                let parsed = spec_to_def(spec).and_then(|def| {
                    let problems = parse::check_broadcast(&def, "spec.");
                    if problems.is_empty() {
                        Ok(def)
                    } else {
                        Err(problems)
                    }
                });
                (parsed, String::new(), "spec.")
            }
            None => return Err(ApiError::invalid("definition", "give yaml or spec").into()),
        };
        let mut problems = Vec::new();
        let def = match parsed {
            Ok(def) => Some(def),
            Err(found) => {
                problems = found;
                None
            }
        };
        if let Some(def) = &def {
            problems.extend(
                self.check_broadcast_references(&caller.workspace_id, def, prefix)
                    .await?,
            );
        }
        let Some(def) = def.filter(|_| problems.is_empty()) else {
            if request.dry_run {
                return Ok(Response::new(pb::ScheduleBroadcastResponse {
                    broadcast: None,
                    changed: false,
                    errors: problems.iter().map(problem_to_proto).collect(),
                }));
            }
            let field = if prefix.is_empty() { "yaml" } else { "spec" };
            return Err(ApiError::invalid(field, yaml::describe(&problems)).into());
        };
        let Some(first_run) = broadcaster::first_run_at(&def, now) else {
            return Err(ApiError::invalid(
                format!("{prefix}schedule"),
                "the schedule has no run ahead (ends_at passed?)",
            )
            .into());
        };
        let audience = self
            .clients
            .segment_count(&caller.workspace_id, &def.segment)
            .await
            .map_err(unavailable("segmentation"))?;
        let (record, changed) = self
            .store
            .schedule_broadcast(
                &caller.workspace_id,
                &Scheduled {
                    def: &def,
                    yaml: &yaml_text,
                    next_run_at: first_run,
                    audience_size: audience,
                    dry_run: request.dry_run,
                },
                now,
            )
            .await?;
        Ok(Response::new(pb::ScheduleBroadcastResponse {
            broadcast: Some(broadcast_to_proto(&record, true)),
            changed,
            errors: Vec::new(),
        }))
    }

    async fn get_broadcast(
        &self,
        request: Request<pb::GetBroadcastRequest>,
    ) -> Result<Response<pb::Broadcast>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        check_name(&request.name, "name")?;
        let record = self
            .store
            .broadcast(&caller.workspace_id, &request.name)
            .await?;
        Ok(Response::new(broadcast_to_proto(&record, true)))
    }

    async fn list_broadcasts(
        &self,
        request: Request<pb::ListBroadcastsRequest>,
    ) -> Result<Response<pb::ListBroadcastsResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let limit = page_size(request.page_size, 100, 1000, "page_size")?;
        let mut statuses = Vec::new();
        for (i, status) in request.statuses.iter().enumerate() {
            match pb::BroadcastStatus::try_from(*status) {
                Ok(pb::BroadcastStatus::Unspecified) | Err(_) => {
                    return Err(ApiError::invalid(
                        format!("statuses[{i}]"),
                        "not a broadcast status",
                    )
                    .into());
                }
                Ok(status) => statuses.push(status as i16),
            }
        }
        let (from, to) = range(request.range.as_ref())?;
        let offset: i64 = if request.page_token.is_empty() {
            0
        } else {
            decode_token(&request.page_token, "page_token")?
                .parse()
                .map_err(|_| ApiError::invalid("page_token", "not a token this service issued"))?
        };
        let records = self
            .store
            .list_broadcasts(&caller.workspace_id, &statuses, from, to, offset, limit + 1)
            .await?;
        let more = records.len() as i64 > limit;
        let broadcasts = records
            .iter()
            .take(limit as usize)
            .map(|r| broadcast_to_proto(r, false))
            .collect();
        let next_page_token = if more {
            hex::encode((offset + limit).to_string())
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListBroadcastsResponse {
            broadcasts,
            next_page_token,
        }))
    }

    async fn cancel_broadcast(
        &self,
        request: Request<pb::CancelBroadcastRequest>,
    ) -> Result<Response<pb::Broadcast>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        check_name(&request.name, "name")?;
        let record = self
            .store
            .cancel_broadcast(&caller.workspace_id, &request.name, self.clock.now())
            .await?;
        Ok(Response::new(broadcast_to_proto(&record, false)))
    }

    async fn get_flow_report(
        &self,
        request: Request<pb::GetFlowReportRequest>,
    ) -> Result<Response<pb::CampaignReport>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        check_name(&request.name, "name")?;
        let now = self.clock.now();
        let flow = self
            .store
            .flow(&caller.workspace_id, &request.name, request.version)
            .await?;
        let def = flow.definition.clone();
        let (from, to) = range(request.range.as_ref())?;
        let scope = ReportScope {
            workspace_id: caller.workspace_id.clone(),
            flow: Some(flow.name.clone()),
            broadcast: None,
            version: request.version,
            from: from.unwrap_or(flow.created_at),
            to: to.unwrap_or(now + chrono::Duration::seconds(1)),
        };
        let mut input: ReportInput = self.store.report_input(&scope, &def.conversion).await?;
        input.steps = def.steps.iter().map(step_info).collect();
        input.has_control = def.control_group_percent > 0.0;
        let figures = report::compute(&input);
        Ok(Response::new(report_to_proto(
            pb::CampaignKind::Flow,
            &flow.name,
            request.version,
            &scope,
            now,
            &def.conversion,
            &figures,
        )))
    }

    async fn get_broadcast_report(
        &self,
        request: Request<pb::GetBroadcastReportRequest>,
    ) -> Result<Response<pb::CampaignReport>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        check_name(&request.name, "name")?;
        let now = self.clock.now();
        let record = self
            .store
            .broadcast(&caller.workspace_id, &request.name)
            .await?;
        let def = &record.def;
        let (from, to) = range(request.range.as_ref())?;
        let scope = ReportScope {
            workspace_id: caller.workspace_id.clone(),
            flow: None,
            broadcast: Some(def.name.clone()),
            version: 0,
            from: from.unwrap_or(record.created_at - chrono::Duration::days(1)),
            to: to.unwrap_or(now + chrono::Duration::seconds(1)),
        };
        let mut input = self.store.report_input(&scope, &def.conversion).await?;
        input.variants = def
            .variants
            .iter()
            .map(|v| (v.name.clone(), v.template.clone(), v.weight))
            .collect();
        input.has_control = def.control_group_percent > 0.0;
        let figures = report::compute(&input);
        Ok(Response::new(report_to_proto(
            pb::CampaignKind::Broadcast,
            &def.name,
            0,
            &scope,
            now,
            &def.conversion,
            &figures,
        )))
    }

    async fn get_frequency_caps(
        &self,
        request: Request<pb::GetFrequencyCapsRequest>,
    ) -> Result<Response<pb::FrequencyCaps>, Status> {
        let caller = auth::caller(&request)?;
        let guardrails = self.store.guardrails(&caller.workspace_id).await?;
        Ok(Response::new(caps_to_proto(
            &guardrails.caps,
            guardrails.caps_updated_at,
        )))
    }

    async fn set_frequency_caps(
        &self,
        request: Request<pb::SetFrequencyCapsRequest>,
    ) -> Result<Response<pb::FrequencyCaps>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let caps = caps_from_proto(request.caps.unwrap_or_default())?;
        let now = self.clock.now();
        self.store
            .set_caps(&caller.workspace_id, &caps, now)
            .await?;
        Ok(Response::new(caps_to_proto(&caps, Some(now))))
    }

    async fn get_quiet_hours(
        &self,
        request: Request<pb::GetQuietHoursRequest>,
    ) -> Result<Response<pb::QuietHours>, Status> {
        let caller = auth::caller(&request)?;
        let guardrails = self.store.guardrails(&caller.workspace_id).await?;
        Ok(Response::new(quiet_to_proto(
            &guardrails.quiet_hours,
            guardrails.quiet_hours_updated_at,
        )))
    }

    async fn set_quiet_hours(
        &self,
        request: Request<pb::SetQuietHoursRequest>,
    ) -> Result<Response<pb::QuietHours>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let rule = quiet_from_proto(request.quiet_hours.unwrap_or_default())?;
        let now = self.clock.now();
        self.store
            .set_quiet_hours(&caller.workspace_id, &rule, now)
            .await?;
        Ok(Response::new(quiet_to_proto(&rule, Some(now))))
    }
}

fn refuse_flow(
    request: &pb::ApplyFlowRequest,
    problems: &[Problem],
) -> Result<Response<pb::ApplyFlowResponse>, Status> {
    if request.dry_run {
        return Ok(Response::new(pb::ApplyFlowResponse {
            name: String::new(),
            errors: problems.iter().map(problem_to_proto).collect(),
            ..Default::default()
        }));
    }
    Err(ApiError::invalid("yaml", yaml::describe(problems)).into())
}

fn check_name(name: &str, field: &str) -> ApiResult<()> {
    parse::check_name(name).map_err(|reason| ApiError::invalid(field, reason))
}

fn page_size(requested: u32, default: i64, max: i64, field: &str) -> ApiResult<i64> {
    match i64::from(requested) {
        0 => Ok(default),
        n if n <= max => Ok(n),
        _ => Err(ApiError::invalid(field, format!("at most {max}"))),
    }
}

fn decode_token(token: &str, field: &str) -> ApiResult<String> {
    if token.is_empty() {
        return Ok(String::new());
    }
    hex::decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| ApiError::invalid(field, "not a token this service issued"))
}

/// A requested range's ends, each optional.
type Ends = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

fn range(range: Option<&pb::TimeRange>) -> ApiResult<Ends> {
    let Some(range) = range else {
        return Ok((None, None));
    };
    let from = match &range.from {
        Some(ts) => Some(
            timestamp_to_chrono(ts)
                .ok_or_else(|| ApiError::invalid("range.from", "not a valid timestamp"))?,
        ),
        None => None,
    };
    let to = match &range.to {
        Some(ts) => Some(
            timestamp_to_chrono(ts)
                .ok_or_else(|| ApiError::invalid("range.to", "not a valid timestamp"))?,
        ),
        None => None,
    };
    if let (Some(from), Some(to)) = (from, to)
        && from >= to
    {
        return Err(ApiError::invalid("range.to", "must be after range.from"));
    }
    Ok((from, to))
}

fn flow_status(status: FlowStatus) -> pb::FlowStatus {
    match status {
        FlowStatus::Active => pb::FlowStatus::Active,
        FlowStatus::Paused => pb::FlowStatus::Paused,
        FlowStatus::Archived => pb::FlowStatus::Archived,
    }
}

fn duration(secs: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: secs,
        nanos: 0,
    }
}

fn conversion_to_proto(conversion: &Conversion) -> pb::ConversionGoal {
    pb::ConversionGoal {
        event: conversion.goal.event.clone(),
        conditions: (!conversion.goal.conditions.is_empty())
            .then(|| json_to_struct(&parse::conditions_json(&conversion.goal.conditions))),
        within: Some(duration(conversion.within_secs)),
    }
}

fn step_kind(kind: &StepKind) -> pb::FlowStepKind {
    match kind {
        StepKind::Wait(_) => pb::FlowStepKind::Wait,
        StepKind::Send(_) => pb::FlowStepKind::Send,
        StepKind::Branch { .. } | StepKind::Goto { .. } => pb::FlowStepKind::Branch,
        StepKind::Update { .. } => pb::FlowStepKind::Update,
        StepKind::Exit => pb::FlowStepKind::Exit,
    }
}

fn step_kind_name(kind: &StepKind) -> &'static str {
    match kind {
        StepKind::Wait(_) => "wait",
        StepKind::Send(_) => "send",
        StepKind::Branch { .. } => "branch",
        StepKind::Update { .. } => "update",
        StepKind::Exit => "exit",
        StepKind::Goto { .. } => "goto",
    }
}

fn variant_to_proto(variant: &Variant) -> pb::CampaignVariant {
    pb::CampaignVariant {
        name: variant.name.clone(),
        weight: variant.weight,
        template: variant.template.clone(),
        channels: variant
            .channels
            .iter()
            .map(|c| proto_channel(*c) as i32)
            .collect(),
    }
}

fn flow_to_proto(flow: &FlowRecord, with_yaml: bool) -> pb::Flow {
    let def = &flow.definition;
    let (trigger_kind, trigger) = match &def.trigger {
        Trigger::Event(event) => (pb::FlowTriggerKind::Event, event.event.clone()),
        Trigger::SegmentEntered { segment } => {
            (pb::FlowTriggerKind::SegmentEntered, segment.clone())
        }
        Trigger::Schedule { cron, .. } => (pb::FlowTriggerKind::Schedule, cron.clone()),
    };
    let mut steps = Vec::with_capacity(def.steps.len());
    for step in &def.steps {
        let (channels, template, variants) = match &step.kind {
            StepKind::Send(send) => (
                send.channels
                    .iter()
                    .map(|c| proto_channel(*c) as i32)
                    .collect(),
                send.template.clone().unwrap_or_default(),
                send.variants.iter().map(variant_to_proto).collect(),
            ),
            _ => (Vec::new(), String::new(), Vec::new()),
        };
        steps.push(pb::FlowStep {
            id: step.id.clone(),
            kind: step_kind(&step.kind) as i32,
            summary: step.summary.clone(),
            channels,
            template,
            variants,
        });
    }
    pb::Flow {
        name: flow.name.clone(),
        version: flow.version,
        latest_version: flow.latest_version,
        status: flow_status(flow.status) as i32,
        description: def.description.clone(),
        yaml: if with_yaml {
            flow.yaml.clone()
        } else {
            String::new()
        },
        trigger_kind: trigger_kind as i32,
        trigger,
        exit_when: def
            .exit_when
            .as_ref()
            .map(|e| e.event.clone())
            .unwrap_or_default(),
        conversion: Some(conversion_to_proto(&def.conversion)),
        control_group_percent: def.control_group_percent,
        re_entry_after: match def.re_entry {
            crate::domain::model::ReEntry::Never => None,
            crate::domain::model::ReEntry::Always => Some(duration(0)),
            crate::domain::model::ReEntry::After { secs } => Some(duration(secs)),
        },
        steps,
        active_journeys: flow.active_journeys,
        created_at: Some(chrono_to_timestamp(flow.created_at)),
        updated_at: Some(chrono_to_timestamp(flow.updated_at)),
        paused_at: flow.paused_at.map(chrono_to_timestamp),
        archived_at: flow.archived_at.map(chrono_to_timestamp),
    }
}

fn step_info(step: &crate::domain::model::Step) -> StepInfo {
    let (channels, variants) = match &step.kind {
        StepKind::Send(send) => (
            send.channels.clone(),
            send.variants
                .iter()
                .map(|v| (v.name.clone(), v.template.clone(), v.weight))
                .collect(),
        ),
        _ => (Vec::new(), Vec::new()),
    };
    StepInfo {
        id: step.id.clone(),
        kind: step_kind_name(&step.kind).to_owned(),
        summary: step.summary.clone(),
        channels,
        variants,
    }
}

/// A structured spec as the domain's definition; problems name `spec.` fields.
fn spec_to_def(spec: &pb::BroadcastSpec) -> Result<BroadcastDef, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut channels = Vec::new();
    for (i, channel) in spec.channels.iter().enumerate() {
        match domain_channel(*channel) {
            Some(channel) => channels.push(channel),
            None => problems.push(problem(
                &format!("spec.channels[{i}]"),
                "not a channel".into(),
            )),
        }
    }
    let mut variants = Vec::new();
    for (i, variant) in spec.variants.iter().enumerate() {
        let mut variant_channels = Vec::new();
        for (j, channel) in variant.channels.iter().enumerate() {
            match domain_channel(*channel) {
                Some(channel) => variant_channels.push(channel),
                None => problems.push(problem(
                    &format!("spec.variants[{i}].channels[{j}]"),
                    "not a channel".into(),
                )),
            }
        }
        variants.push(Variant {
            name: variant.name.clone(),
            weight: variant.weight,
            template: variant.template.clone(),
            channels: variant_channels,
        });
    }
    let schedule = match spec.schedule.as_ref().and_then(|s| s.when.as_ref()) {
        None => BroadcastSchedule::Now,
        Some(pb::broadcast_schedule::When::SendAt(ts)) => match timestamp_to_chrono(ts) {
            Some(at) => BroadcastSchedule::At(at),
            None => {
                problems.push(problem(
                    "spec.schedule.send_at",
                    "not a valid timestamp".into(),
                ));
                BroadcastSchedule::Now
            }
        },
        Some(pb::broadcast_schedule::When::LocalTime(local)) => {
            let date = chrono::NaiveDate::parse_from_str(&local.date, "%Y-%m-%d");
            let time = guard::parse_hhmm(&local.time);
            match (date, time) {
                (Ok(date), Ok((hour, minute))) => BroadcastSchedule::LocalTime {
                    date,
                    hour,
                    minute,
                    skip_if_past: local.skip_if_past,
                },
                (date, time) => {
                    if date.is_err() {
                        problems.push(problem(
                            "spec.schedule.local_time.date",
                            "expected YYYY-MM-DD".into(),
                        ));
                    }
                    if let Err(reason) = time {
                        problems.push(problem("spec.schedule.local_time.time", reason));
                    }
                    BroadcastSchedule::Now
                }
            }
        }
        Some(pb::broadcast_schedule::When::Recurring(recurring)) => BroadcastSchedule::Recurring {
            cron: recurring.cron.clone(),
            local_time: recurring.local_time,
            starts_at: recurring.starts_at.as_ref().and_then(timestamp_to_chrono),
            ends_at: recurring.ends_at.as_ref().and_then(timestamp_to_chrono),
        },
    };
    let conversion = match &spec.conversion {
        None => Conversion::default(),
        Some(goal) => {
            let mut conversion = Conversion::default();
            if !goal.event.is_empty() {
                conversion.goal.event = goal.event.clone();
            }
            if let Some(within) = &goal.within {
                conversion.within_secs = within.seconds;
            }
            if let Some(conditions) = &goal.conditions {
                match parse::parse_conditions(
                    &struct_to_json(conditions),
                    "spec.conversion.conditions",
                ) {
                    Ok(parsed) => conversion.goal.conditions = parsed,
                    Err(found) => problems.extend(found),
                }
            }
            conversion
        }
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(BroadcastDef {
        name: spec.name.clone(),
        description: spec.description.clone(),
        segment: spec.segment.clone(),
        exclude_segments: spec.exclude_segments.clone(),
        channels,
        template: (!spec.template.is_empty()).then(|| spec.template.clone()),
        variants,
        topic: if spec.topic.is_empty() {
            DEFAULT_TOPIC.to_owned()
        } else {
            spec.topic.clone()
        },
        schedule,
        control_group_percent: spec.control_group_percent,
        max_sends_per_second: spec.max_sends_per_second,
        conversion,
        ignore_frequency_caps: spec.ignore_frequency_caps,
        ignore_quiet_hours: spec.ignore_quiet_hours,
        data: match spec.data.as_ref().map(struct_to_json) {
            Some(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        },
    })
}

fn def_to_spec(def: &BroadcastDef) -> pb::BroadcastSpec {
    let when = match &def.schedule {
        BroadcastSchedule::Now => None,
        BroadcastSchedule::At(at) => Some(pb::broadcast_schedule::When::SendAt(
            chrono_to_timestamp(*at),
        )),
        BroadcastSchedule::LocalTime {
            date,
            hour,
            minute,
            skip_if_past,
        } => Some(pb::broadcast_schedule::When::LocalTime(
            pb::LocalTimeSchedule {
                date: date.format("%Y-%m-%d").to_string(),
                time: format!("{hour:02}:{minute:02}"),
                skip_if_past: *skip_if_past,
            },
        )),
        BroadcastSchedule::Recurring {
            cron,
            local_time,
            starts_at,
            ends_at,
        } => Some(pb::broadcast_schedule::When::Recurring(
            pb::RecurringSchedule {
                cron: cron.clone(),
                local_time: *local_time,
                starts_at: starts_at.map(chrono_to_timestamp),
                ends_at: ends_at.map(chrono_to_timestamp),
            },
        )),
    };
    pb::BroadcastSpec {
        name: def.name.clone(),
        description: def.description.clone(),
        segment: def.segment.clone(),
        exclude_segments: def.exclude_segments.clone(),
        channels: def
            .channels
            .iter()
            .map(|c| proto_channel(*c) as i32)
            .collect(),
        template: def.template.clone().unwrap_or_default(),
        variants: def.variants.iter().map(variant_to_proto).collect(),
        topic: def.topic.clone(),
        schedule: Some(pb::BroadcastSchedule { when }),
        control_group_percent: def.control_group_percent,
        max_sends_per_second: def.max_sends_per_second,
        conversion: Some(conversion_to_proto(&def.conversion)),
        ignore_frequency_caps: def.ignore_frequency_caps,
        ignore_quiet_hours: def.ignore_quiet_hours,
        data: (!def.data.is_empty())
            .then(|| json_to_struct(&serde_json::Value::Object(def.data.clone()))),
    }
}

fn broadcast_to_proto(
    record: &crate::store::broadcasts::BroadcastRecord,
    with_yaml: bool,
) -> pb::Broadcast {
    pb::Broadcast {
        spec: Some(def_to_spec(&record.def)),
        version: record.version,
        yaml: if with_yaml {
            record.yaml.clone()
        } else {
            String::new()
        },
        status: record.status as i32,
        next_run_at: record.next_run_at.map(chrono_to_timestamp),
        audience_size: record.audience_size,
        queued: record.queued,
        control: record.control,
        capped: record.capped,
        created_at: Some(chrono_to_timestamp(record.created_at)),
        started_at: record.started_at.map(chrono_to_timestamp),
        ended_at: record.ended_at.map(chrono_to_timestamp),
    }
}

fn stats_to_proto(stats: &report::Stats) -> pb::ReportStats {
    pb::ReportStats {
        entered: stats.entered,
        sends: stats.sends,
        delivered: stats.delivered,
        opens: stats.opens,
        clicks: stats.clicks,
        ctr: stats.ctr,
        conversions: stats.conversions,
        conversion_rate: stats.conversion_rate,
        revenue: stats.revenue,
        skipped: stats.skipped,
        failed: stats.failed,
        capped: stats.capped,
    }
}

fn uplift_to_proto(uplift: &report::Uplift) -> pb::Uplift {
    pb::Uplift {
        absolute: uplift.absolute,
        relative: uplift.relative,
        ci_low: uplift.ci_low,
        ci_high: uplift.ci_high,
        significant: uplift.significant,
        p_value: uplift.p_value,
    }
}

fn variant_report(variant: &report::VariantFigures) -> pb::VariantReport {
    pb::VariantReport {
        name: variant.name.clone(),
        template: variant.template.clone(),
        weight: variant.weight,
        stats: Some(stats_to_proto(&variant.stats)),
        uplift: variant.uplift.as_ref().map(uplift_to_proto),
    }
}

fn step_kind_from_name(kind: &str) -> pb::FlowStepKind {
    match kind {
        "wait" => pb::FlowStepKind::Wait,
        "send" => pb::FlowStepKind::Send,
        "branch" | "goto" => pb::FlowStepKind::Branch,
        "update" => pb::FlowStepKind::Update,
        "exit" => pb::FlowStepKind::Exit,
        _ => pb::FlowStepKind::Unspecified,
    }
}

fn report_to_proto(
    kind: pb::CampaignKind,
    name: &str,
    version: u32,
    scope: &ReportScope,
    now: DateTime<Utc>,
    conversion: &Conversion,
    figures: &report::Report,
) -> pb::CampaignReport {
    let mut steps = Vec::with_capacity(figures.steps.len());
    for step in &figures.steps {
        steps.push(pb::StepReport {
            step_id: step.info.id.clone(),
            kind: step_kind_from_name(&step.info.kind) as i32,
            summary: step.info.summary.clone(),
            channels: step
                .info
                .channels
                .iter()
                .map(|c| proto_channel(*c) as i32)
                .collect(),
            stats: Some(stats_to_proto(&step.stats)),
            variants: step.variants.iter().map(variant_report).collect(),
        });
    }
    pb::CampaignReport {
        kind: kind as i32,
        name: name.to_owned(),
        version,
        range: Some(pb::TimeRange {
            from: Some(chrono_to_timestamp(scope.from)),
            to: Some(chrono_to_timestamp(scope.to)),
        }),
        generated_at: Some(chrono_to_timestamp(now)),
        conversion: Some(conversion_to_proto(conversion)),
        currency: figures.currency.clone(),
        total: Some(stats_to_proto(&figures.total)),
        control: figures.control.as_ref().map(stats_to_proto),
        uplift: figures.uplift.as_ref().map(uplift_to_proto),
        steps,
        variants: figures.variants.iter().map(variant_report).collect(),
        channel_shares: figures
            .channel_shares
            .iter()
            .map(|share| pb::ChannelShare {
                channel: proto_channel(share.channel) as i32,
                conversions: share.conversions,
                share: share.share,
                revenue: share.revenue,
            })
            .collect(),
    }
}

fn caps_to_proto(caps: &CapSettings, updated_at: Option<DateTime<Utc>>) -> pb::FrequencyCaps {
    let (policy, max_defer) = match caps.policy {
        CapPolicy::Defer { max_defer_secs } => (
            pb::FrequencyCapPolicy::Defer,
            Some(duration(max_defer_secs)),
        ),
        CapPolicy::Skip => (pb::FrequencyCapPolicy::Skip, None),
    };
    pb::FrequencyCaps {
        caps: caps
            .rules
            .iter()
            .map(|rule| pb::FrequencyCap {
                channel: rule.channel.map(|c| proto_channel(c) as i32).unwrap_or(0),
                period: match rule.period {
                    CapPeriod::Day => pb::FrequencyCapPeriod::Day as i32,
                    CapPeriod::Week => pb::FrequencyCapPeriod::Week as i32,
                },
                max_messages: rule.max,
            })
            .collect(),
        policy: policy as i32,
        max_defer,
        updated_at: updated_at.map(chrono_to_timestamp),
    }
}

fn caps_from_proto(caps: pb::FrequencyCaps) -> ApiResult<CapSettings> {
    let mut rules: Vec<CapRule> = Vec::with_capacity(caps.caps.len());
    for (i, cap) in caps.caps.iter().enumerate() {
        let channel = if cap.channel == 0 {
            None
        } else {
            Some(domain_channel(cap.channel).ok_or_else(|| {
                ApiError::invalid(format!("caps.caps[{i}].channel"), "not a channel")
            })?)
        };
        let period = match pb::FrequencyCapPeriod::try_from(cap.period) {
            Ok(pb::FrequencyCapPeriod::Day) => CapPeriod::Day,
            Ok(pb::FrequencyCapPeriod::Week) => CapPeriod::Week,
            _ => {
                return Err(ApiError::invalid(
                    format!("caps.caps[{i}].period"),
                    "DAY or WEEK",
                ));
            }
        };
        if cap.max_messages == 0 || cap.max_messages > 1000 {
            return Err(ApiError::invalid(
                format!("caps.caps[{i}].max_messages"),
                "1 to 1,000",
            ));
        }
        if rules
            .iter()
            .any(|r| r.channel == channel && r.period == period)
        {
            return Err(ApiError::invalid(
                format!("caps.caps[{i}]"),
                "a second cap for the same channel and period",
            ));
        }
        rules.push(CapRule {
            channel,
            period,
            max: cap.max_messages,
        });
    }
    let policy = match pb::FrequencyCapPolicy::try_from(caps.policy) {
        Ok(pb::FrequencyCapPolicy::Skip) => CapPolicy::Skip,
        Ok(pb::FrequencyCapPolicy::Defer) | Ok(pb::FrequencyCapPolicy::Unspecified) => {
            let secs = caps.max_defer.as_ref().map(|d| d.seconds).unwrap_or(86_400);
            if secs <= 0 || secs > 7 * 86_400 {
                return Err(ApiError::invalid(
                    "caps.max_defer",
                    "more than 0 and at most 7 days",
                ));
            }
            CapPolicy::Defer {
                max_defer_secs: secs,
            }
        }
        Err(_) => return Err(ApiError::invalid("caps.policy", "not a policy")),
    };
    Ok(CapSettings { rules, policy })
}

fn quiet_to_proto(rule: &QuietHoursRule, updated_at: Option<DateTime<Utc>>) -> pb::QuietHours {
    pb::QuietHours {
        enabled: rule.enabled,
        start: format!("{:02}:{:02}", rule.start.0, rule.start.1),
        end: format!("{:02}:{:02}", rule.end.0, rule.end.1),
        channels: rule
            .channels
            .iter()
            .map(|c| proto_channel(*c) as i32)
            .collect(),
        default_timezone: rule.default_timezone.clone(),
        updated_at: updated_at.map(chrono_to_timestamp),
    }
}

fn quiet_from_proto(quiet: pb::QuietHours) -> ApiResult<QuietHoursRule> {
    let start = guard::parse_hhmm(&quiet.start)
        .map_err(|reason| ApiError::invalid("quiet_hours.start", reason))?;
    let end = guard::parse_hhmm(&quiet.end)
        .map_err(|reason| ApiError::invalid("quiet_hours.end", reason))?;
    let mut channels: Vec<ChannelName> = Vec::new();
    for (i, channel) in quiet.channels.iter().enumerate() {
        channels.push(domain_channel(*channel).ok_or_else(|| {
            ApiError::invalid(format!("quiet_hours.channels[{i}]"), "not a channel")
        })?);
    }
    let default_timezone = if quiet.default_timezone.is_empty() {
        "UTC".to_owned()
    } else {
        if quiet.default_timezone.parse::<chrono_tz::Tz>().is_err() {
            return Err(ApiError::invalid(
                "quiet_hours.default_timezone",
                "not an IANA timezone",
            ));
        }
        quiet.default_timezone
    };
    Ok(QuietHoursRule {
        enabled: quiet.enabled,
        start,
        end,
        channels,
        default_timezone,
    })
}
