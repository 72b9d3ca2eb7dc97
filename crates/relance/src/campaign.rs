//! `relance flow …`, `relance broadcast …`, `relance report …`, and applying `kind: Flow`
//! and `kind: Broadcast` documents.

use std::process::ExitCode;

use chrono::{DateTime, NaiveDate, Utc};
use relance_proto::convert::{chrono_to_timestamp, timestamp_to_chrono};
use relance_proto::v1 as pb;

use crate::client::{Clients, Target};
use crate::report;

#[derive(Debug, clap::Subcommand)]
pub enum FlowCommand {
    /// List flows with their status and running journeys.
    List {
        /// Include archived flows.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Print a flow's document (the current version, or `--version N`).
    Get {
        name: String,
        #[arg(long, default_value_t = 0)]
        version: u32,
        #[command(flatten)]
        target: Target,
    },
    /// Pause: no new journeys; running ones hold before their next send.
    Pause {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Resume a paused flow (`--end-held` ends the journeys held during the pause).
    Resume {
        name: String,
        #[arg(long)]
        end_held: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Archive: every running journey ends; the reports stay.
    Archive {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// A customer's journeys: where they are, and why they ended.
    Journeys {
        customer_id: String,
        #[arg(long, default_value = "")]
        flow: String,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum BroadcastCommand {
    /// List broadcasts, next send first.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Show a broadcast: status, audience, queued, control, capped.
    Get {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Cancel: nothing more is queued.
    Cancel {
        name: String,
        #[command(flatten)]
        target: Target,
    },
}

/// Output formats of a report.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Debug, clap::Subcommand)]
pub enum ReportCommand {
    /// What a flow earned, per step and variant, with the uplift over its control group.
    Flow {
        name: String,
        /// Only journeys on this version (0: all).
        #[arg(long, default_value_t = 0)]
        version: u32,
        #[command(flatten)]
        range: RangeArgs,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        #[command(flatten)]
        target: Target,
    },
    /// What a broadcast earned, per variant, with the uplift over its control group.
    Broadcast {
        name: String,
        #[command(flatten)]
        range: RangeArgs,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        #[command(flatten)]
        target: Target,
    },
}

/// `--from` / `--to`: a date (`2025-05-01`) or an RFC 3339 time.
#[derive(Debug, Clone, clap::Args)]
pub struct RangeArgs {
    /// Messages sent from this date or time (inclusive).
    #[arg(long)]
    from: Option<String>,
    /// Messages sent before this date or time (exclusive).
    #[arg(long)]
    to: Option<String>,
}

fn parse_time(text: &str, flag: &str) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    match NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        Ok(date) => Ok(date.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc()),
        Err(_) => {
            anyhow::bail!("{flag}: {text:?} is neither a date (2025-05-01) nor an RFC 3339 time")
        }
    }
}

impl RangeArgs {
    fn to_proto(&self) -> anyhow::Result<Option<pb::TimeRange>> {
        if self.from.is_none() && self.to.is_none() {
            return Ok(None);
        }
        let from = self
            .from
            .as_deref()
            .map(|t| parse_time(t, "--from"))
            .transpose()?;
        let to = self
            .to
            .as_deref()
            .map(|t| parse_time(t, "--to"))
            .transpose()?;
        Ok(Some(pb::TimeRange {
            from: from.map(chrono_to_timestamp),
            to: to.map(chrono_to_timestamp),
        }))
    }
}

fn print_report(report: &pb::CampaignReport, format: Format) {
    let text = match format {
        Format::Table => report::render_table(report),
        Format::Csv => report::render_csv(report),
        Format::Json => report::render_json(report),
    };
    print!("{text}");
    if !text.ends_with('\n') {
        println!();
    }
}

fn time(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(timestamp_to_chrono)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| "-".into())
}

pub async fn run_flow(command: FlowCommand) -> anyhow::Result<ExitCode> {
    match command {
        FlowCommand::List { all, target } => {
            let mut clients = target.connect().await?;
            let statuses = if all {
                vec![
                    pb::FlowStatus::Active as i32,
                    pb::FlowStatus::Paused as i32,
                    pb::FlowStatus::Archived as i32,
                ]
            } else {
                Vec::new()
            };
            let flows = clients
                .campaigns
                .list_flows(pb::ListFlowsRequest {
                    statuses,
                    page_size: 1000,
                    ..Default::default()
                })
                .await?
                .into_inner();
            println!(
                "{:<32} {:>7} {:<9} {:>9}  trigger",
                "flow", "version", "status", "journeys"
            );
            for flow in flows.flows {
                let status = pb::FlowStatus::try_from(flow.status)
                    .map(|s| s.as_str_name())
                    .unwrap_or("?");
                println!(
                    "{:<32} {:>7} {:<9} {:>9}  {}",
                    flow.name,
                    flow.version,
                    status.trim_start_matches("FLOW_STATUS_").to_lowercase(),
                    flow.active_journeys,
                    flow.trigger
                );
            }
        }
        FlowCommand::Get {
            name,
            version,
            target,
        } => {
            let mut clients = target.connect().await?;
            let flow = clients
                .campaigns
                .get_flow(pb::GetFlowRequest { name, version })
                .await?
                .into_inner();
            print!("{}", flow.yaml);
        }
        FlowCommand::Pause { name, target } => {
            let mut clients = target.connect().await?;
            clients
                .campaigns
                .pause_flow(pb::PauseFlowRequest { name: name.clone() })
                .await?;
            println!("flow/{name} paused");
        }
        FlowCommand::Resume {
            name,
            end_held,
            target,
        } => {
            let mut clients = target.connect().await?;
            clients
                .campaigns
                .resume_flow(pb::ResumeFlowRequest {
                    name: name.clone(),
                    end_held_journeys: end_held,
                })
                .await?;
            println!("flow/{name} resumed");
        }
        FlowCommand::Archive { name, target } => {
            let mut clients = target.connect().await?;
            clients
                .campaigns
                .archive_flow(pb::ArchiveFlowRequest { name: name.clone() })
                .await?;
            println!("flow/{name} archived");
        }
        FlowCommand::Journeys {
            customer_id,
            flow,
            target,
        } => {
            let mut clients = target.connect().await?;
            let journeys = clients
                .campaigns
                .list_journeys(pb::ListJourneysRequest {
                    customer: Some(pb::CustomerRef {
                        id: Some(pb::customer_ref::Id::CustomerId(customer_id)),
                    }),
                    flow,
                    page_size: 500,
                    ..Default::default()
                })
                .await?
                .into_inner();
            for journey in journeys.journeys {
                let status = pb::JourneyStatus::try_from(journey.status)
                    .map(|s| s.as_str_name())
                    .unwrap_or("?");
                let reason = pb::JourneyEndReason::try_from(journey.end_reason)
                    .map(|s| s.as_str_name())
                    .unwrap_or("?");
                println!(
                    "{} {} v{} {} step={} next={} entered={} {}{}",
                    journey.journey_id,
                    journey.flow,
                    journey.flow_version,
                    status.trim_start_matches("JOURNEY_STATUS_").to_lowercase(),
                    if journey.current_step.is_empty() {
                        "-"
                    } else {
                        &journey.current_step
                    },
                    time(journey.next_wake_at.as_ref()),
                    time(journey.entered_at.as_ref()),
                    if journey.end_reason == 0 {
                        String::new()
                    } else {
                        reason
                            .trim_start_matches("JOURNEY_END_REASON_")
                            .to_lowercase()
                    },
                    if journey.control { " (control)" } else { "" },
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run_broadcast(command: BroadcastCommand) -> anyhow::Result<ExitCode> {
    match command {
        BroadcastCommand::List { target } => {
            let mut clients = target.connect().await?;
            let list = clients
                .campaigns
                .list_broadcasts(pb::ListBroadcastsRequest {
                    page_size: 1000,
                    ..Default::default()
                })
                .await?
                .into_inner();
            println!(
                "{:<32} {:<10} {:>9} {:>9} {:>8} {:>7}  next run",
                "broadcast", "status", "audience", "queued", "control", "capped"
            );
            for b in list.broadcasts {
                print_broadcast_row(&b);
            }
        }
        BroadcastCommand::Get { name, target } => {
            let mut clients = target.connect().await?;
            let b = clients
                .campaigns
                .get_broadcast(pb::GetBroadcastRequest { name })
                .await?
                .into_inner();
            println!(
                "{:<32} {:<10} {:>9} {:>9} {:>8} {:>7}  next run",
                "broadcast", "status", "audience", "queued", "control", "capped"
            );
            print_broadcast_row(&b);
        }
        BroadcastCommand::Cancel { name, target } => {
            let mut clients = target.connect().await?;
            clients
                .campaigns
                .cancel_broadcast(pb::CancelBroadcastRequest { name: name.clone() })
                .await?;
            println!("broadcast/{name} cancelled");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_broadcast_row(b: &pb::Broadcast) {
    let status = pb::BroadcastStatus::try_from(b.status)
        .map(|s| s.as_str_name())
        .unwrap_or("?");
    println!(
        "{:<32} {:<10} {:>9} {:>9} {:>8} {:>7}  {}",
        b.spec.as_ref().map(|s| s.name.as_str()).unwrap_or(""),
        status
            .trim_start_matches("BROADCAST_STATUS_")
            .to_lowercase(),
        b.audience_size,
        b.queued,
        b.control,
        b.capped,
        time(b.next_run_at.as_ref())
    );
}

pub async fn run_report(command: ReportCommand) -> anyhow::Result<ExitCode> {
    match command {
        ReportCommand::Flow {
            name,
            version,
            range,
            format,
            target,
        } => {
            let mut clients = target.connect().await?;
            let report = clients
                .campaigns
                .get_flow_report(pb::GetFlowReportRequest {
                    name,
                    version,
                    range: range.to_proto()?,
                })
                .await?
                .into_inner();
            print_report(&report, format);
        }
        ReportCommand::Broadcast {
            name,
            range,
            format,
            target,
        } => {
            let mut clients = target.connect().await?;
            let report = clients
                .campaigns
                .get_broadcast_report(pb::GetBroadcastReportRequest {
                    name,
                    range: range.to_proto()?,
                })
                .await?
                .into_inner();
            print_report(&report, format);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Applies one `kind: Flow` document; returns false when it was refused.
pub async fn apply_flow(clients: &mut Clients, origin: &str, yaml: &str, dry_run: bool) -> bool {
    let outcome = clients
        .campaigns
        .apply_flow(pb::ApplyFlowRequest {
            yaml: yaml.to_owned(),
            dry_run: true,
        })
        .await;
    match outcome {
        Ok(response) => {
            let response = response.into_inner();
            if !response.errors.is_empty() {
                for error in &response.errors {
                    eprintln!(
                        "{origin}:{}:{}: {}: {}",
                        error.line, error.column, error.field, error.reason
                    );
                }
                return false;
            }
        }
        Err(status) => {
            for line in status.message().lines() {
                eprintln!("{origin}: {line}");
            }
            return false;
        }
    }
    if dry_run {
        println!("flow document {origin} is valid");
        return true;
    }
    match clients
        .campaigns
        .apply_flow(pb::ApplyFlowRequest {
            yaml: yaml.to_owned(),
            dry_run: false,
        })
        .await
    {
        Ok(response) => {
            let response = response.into_inner();
            let what = if response.changed {
                "applied"
            } else {
                "unchanged"
            };
            println!(
                "flow/{} {what} (version {})",
                response.name, response.version
            );
            true
        }
        Err(status) => {
            for line in status.message().lines() {
                eprintln!("{origin}: {line}");
            }
            false
        }
    }
}

/// Schedules one `kind: Broadcast` document; returns false when it was refused.
pub async fn apply_broadcast(
    clients: &mut Clients,
    origin: &str,
    yaml: &str,
    dry_run: bool,
) -> bool {
    let request = pb::ScheduleBroadcastRequest {
        definition: Some(pb::schedule_broadcast_request::Definition::Yaml(
            yaml.to_owned(),
        )),
        dry_run,
    };
    match clients.campaigns.schedule_broadcast(request).await {
        Ok(response) => {
            let response = response.into_inner();
            if !response.errors.is_empty() {
                for error in &response.errors {
                    eprintln!(
                        "{origin}:{}:{}: {}: {}",
                        error.line, error.column, error.field, error.reason
                    );
                }
                return false;
            }
            let Some(broadcast) = response.broadcast else {
                return false;
            };
            let name = broadcast
                .spec
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default();
            let what = match (dry_run, response.changed) {
                (true, _) => "is valid",
                (false, true) => "scheduled",
                (false, false) => "unchanged",
            };
            println!(
                "broadcast/{name} {what} (version {}, audience {}, first run {})",
                broadcast.version,
                broadcast.audience_size,
                time(broadcast.next_run_at.as_ref())
            );
            true
        }
        Err(status) => {
            for line in status.message().lines() {
                eprintln!("{origin}: {line}");
            }
            false
        }
    }
}
