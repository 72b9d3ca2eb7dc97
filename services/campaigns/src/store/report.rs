//! Loads what a report is computed from: entries, step visits, messages with their
//! outcomes, and the conversion events of the campaign's customers.

use chrono::{DateTime, Duration, Utc};
use relance_kit::error::ApiResult;

use super::CampaignStore;
use crate::domain::matcher;
use crate::domain::model::{ChannelName, Conversion};
use crate::domain::report::{
    ConversionEvent, Entry, MessageRecord, MessageStatus, ReportInput, StepVisit,
};

/// customer, journey, step, variant, channel, status, at, delivered, opened, clicked.
type MessageRow = (
    String,
    String,
    String,
    String,
    String,
    Option<i16>,
    Option<DateTime<Utc>>,
    bool,
    bool,
    bool,
);

/// Which campaign, over which time.
#[derive(Debug, Clone)]
pub struct ReportScope {
    pub workspace_id: String,
    /// `flow` or `broadcast`.
    pub flow: Option<String>,
    pub broadcast: Option<String>,
    /// 0: every version.
    pub version: u32,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

impl CampaignStore {
    /// The rows of a report; `input.steps`/`variants`/`has_control` are the caller's.
    pub async fn report_input(
        &self,
        scope: &ReportScope,
        conversion: &Conversion,
    ) -> ApiResult<ReportInput> {
        let mut input = ReportInput {
            window_secs: conversion.within_secs,
            ..Default::default()
        };
        let ws = scope.workspace_id.as_str();
        if let Some(flow) = &scope.flow {
            let rows: Vec<(uuid::Uuid, String, DateTime<Utc>, bool)> = sqlx::query_as(
                "SELECT id, customer_id, entered_at, control FROM journeys WHERE workspace_id = $1 AND flow = $2 \
                 AND ($3 = 0 OR flow_version = $3) AND entered_at >= $4 AND entered_at < $5",
            )
            .bind(ws)
            .bind(flow)
            .bind(scope.version as i32)
            .bind(scope.from)
            .bind(scope.to)
            .fetch_all(&self.pool)
            .await?;
            for (id, customer, at, control) in rows {
                input.entries.push(Entry {
                    customer,
                    journey: id.to_string(),
                    at,
                    control,
                    variant: String::new(),
                });
            }
            let visits: Vec<(uuid::Uuid, String, DateTime<Utc>)> = sqlx::query_as(
                "SELECT v.journey_id, v.step, v.at FROM step_visits v JOIN journeys j ON j.id = v.journey_id \
                 WHERE v.workspace_id = $1 AND v.flow = $2 AND ($3 = 0 OR j.flow_version = $3) \
                 AND v.at >= $4 AND v.at < $5 AND NOT j.control",
            )
            .bind(ws)
            .bind(flow)
            .bind(scope.version as i32)
            .bind(scope.from)
            .bind(scope.to)
            .fetch_all(&self.pool)
            .await?;
            for (journey, step, at) in visits {
                input.visits.push(StepVisit {
                    journey: journey.to_string(),
                    step,
                    at,
                });
            }
        }
        if let Some(broadcast) = &scope.broadcast {
            let rows: Vec<(String, i32, String, DateTime<Utc>, i16, String)> = sqlx::query_as(
                "SELECT customer_id, run, broadcast, first_due_at, state, variant FROM broadcast_recipients \
                 WHERE workspace_id = $1 AND broadcast = $2 AND state IN (1, 2, 3) AND first_due_at >= $3 AND first_due_at < $4",
            )
            .bind(ws)
            .bind(broadcast)
            .bind(scope.from)
            .bind(scope.to)
            .fetch_all(&self.pool)
            .await?;
            for (customer, run, name, at, state, variant) in rows {
                input.entries.push(Entry {
                    journey: format!("{name}:{run}:{customer}"),
                    customer,
                    at,
                    control: state == 2,
                    variant,
                });
            }
        }

        // Messages: what delivery reported, plus what the caps skipped (never reached it).
        let (column, name) = match (&scope.flow, &scope.broadcast) {
            (Some(flow), _) => ("flow", flow.clone()),
            (None, Some(broadcast)) => ("broadcast", broadcast.clone()),
            (None, None) => return Ok(input),
        };
        let messages: Vec<MessageRow> =
            sqlx::query_as(&format!(
                "SELECT customer_id, journey_id, step, variant, channel, status, at, delivered, opened, clicked \
                 FROM messages WHERE workspace_id = $1 AND {column} = $2 AND ($3 = 0 OR flow_version = $3) \
                 AND at >= $4 AND at < $5"
            ))
            .bind(ws)
            .bind(&name)
            .bind(scope.version as i32)
            .bind(scope.from)
            .bind(scope.to)
            .fetch_all(&self.pool)
            .await?;
        for (customer, journey, step, variant, channel, status, at, delivered, opened, clicked) in
            messages
        {
            let status = match status {
                Some(1) => MessageStatus::Sent,
                Some(2) => MessageStatus::Skipped,
                _ => MessageStatus::Failed,
            };
            input.messages.push(MessageRecord {
                customer,
                journey,
                step,
                variant,
                channel: ChannelName::parse(&channel),
                status,
                at: at.unwrap_or(scope.from),
                delivered,
                opened,
                clicked,
                capped: false,
            });
        }
        let guard: Vec<(String, String, String, String, DateTime<Utc>, i16)> =
            sqlx::query_as(&format!(
                "SELECT customer_id, journey_id, step, channel, at, kind FROM guard_events \
             WHERE workspace_id = $1 AND {column} = $2 AND kind IN (1, 2) AND at >= $3 AND at < $4"
            ))
            .bind(ws)
            .bind(&name)
            .bind(scope.from)
            .bind(scope.to)
            .fetch_all(&self.pool)
            .await?;
        for (customer, journey, step, channel, at, kind) in guard {
            // A deferred send is counted as capped; it shows as sent once it goes. A skipped
            // one is also a skip.
            input.messages.push(MessageRecord {
                customer,
                journey,
                step,
                variant: String::new(),
                channel: ChannelName::parse(&channel),
                status: if kind == 2 {
                    MessageStatus::Skipped
                } else {
                    MessageStatus::Deferred
                },
                at,
                delivered: false,
                opened: false,
                clicked: false,
                capped: true,
            });
        }

        // Conversion events of the campaign's customers, up to a window after the range.
        let mut customers: Vec<String> = input.entries.iter().map(|e| e.customer.clone()).collect();
        customers.sort_unstable();
        customers.dedup();
        let events: Vec<(String, DateTime<Utc>, String, serde_json::Value, f64)> = sqlx::query_as(
            "SELECT customer_id, at, name, properties, revenue FROM activity WHERE workspace_id = $1 \
             AND customer_id = ANY($2) AND name = $3 AND at >= $4 AND at < $5",
        )
        .bind(ws)
        .bind(&customers)
        .bind(&conversion.goal.event)
        .bind(scope.from)
        .bind(scope.to + Duration::seconds(conversion.within_secs))
        .fetch_all(&self.pool)
        .await?;
        for (customer, at, event_name, properties, revenue) in events {
            if !matcher::matches(&conversion.goal, &event_name, &properties) {
                continue;
            }
            let currency = properties
                .get("currency")
                .and_then(|c| c.as_str())
                .unwrap_or_default()
                .to_owned();
            input.conversions.push(ConversionEvent {
                customer,
                at,
                revenue,
                currency,
            });
        }
        Ok(input)
    }
}
