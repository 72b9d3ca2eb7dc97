//! `relance profile get|export|delete ID`.

use std::process::ExitCode;

use relance_proto::v1 as pb;

use crate::client::Target;

#[derive(Debug, clap::Subcommand)]
pub enum ProfileCommand {
    /// Show a profile.
    Get(ProfileArgs),
    /// Print everything Relance holds on a customer as JSON: profile and events (GDPR access).
    Export(ProfileArgs),
    /// Erase a customer everywhere (GDPR erasure).
    Delete(ProfileArgs),
}

#[derive(Debug, clap::Args)]
pub struct ProfileArgs {
    /// The customer id (or anonymous id with --anonymous).
    id: String,
    /// ID is an anonymous id.
    #[arg(long)]
    anonymous: bool,
    #[command(flatten)]
    target: Target,
}

impl ProfileArgs {
    fn customer(&self) -> pb::CustomerRef {
        let id = if self.anonymous {
            pb::customer_ref::Id::AnonymousId(self.id.clone())
        } else {
            pb::customer_ref::Id::CustomerId(self.id.clone())
        };
        pb::CustomerRef { id: Some(id) }
    }
}

pub async fn run(command: ProfileCommand) -> anyhow::Result<ExitCode> {
    match command {
        ProfileCommand::Get(args) => {
            let mut clients = args.target.connect().await?;
            let profile = clients
                .profiles
                .get(pb::GetProfileRequest {
                    customer: Some(args.customer()),
                })
                .await?
                .into_inner();
            print_profile(&profile);
        }
        ProfileCommand::Export(args) => {
            let mut clients = args.target.connect().await?;
            let profile = clients
                .profiles
                .export(pb::ExportProfileRequest {
                    customer: Some(args.customer()),
                })
                .await?
                .into_inner();
            let mut document: serde_json::Value = serde_json::from_str(&profile.json)?;
            let mut events = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = clients
                    .events
                    .query(pb::QueryEventsRequest {
                        customer: Some(args.customer()),
                        page_size: 1000,
                        page_token,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                for stored in page.events {
                    let Some(event) = stored.event else { continue };
                    events.push(serde_json::json!({
                        "message_id": event.message_id,
                        "name": event.name,
                        "timestamp": event.timestamp.as_ref().and_then(relance_proto::convert::timestamp_to_chrono),
                        "properties": event.properties.as_ref().map(relance_proto::convert::struct_to_json),
                        "context": event.context,
                    }));
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            document["events"] = serde_json::Value::Array(events);
            println!("{}", serde_json::to_string_pretty(&document)?);
        }
        ProfileCommand::Delete(args) => {
            let mut clients = args.target.connect().await?;
            let erased = clients
                .profiles
                .delete(pb::DeleteProfileRequest {
                    customer: Some(args.customer()),
                })
                .await?
                .into_inner();
            println!(
                "erased {} (their events are erased by the events service as it receives profile.deleted)",
                erased.erased_ids.join(", ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_profile(profile: &pb::Profile) {
    let time = |ts: &Option<prost_types::Timestamp>| {
        ts.as_ref()
            .and_then(relance_proto::convert::timestamp_to_chrono)
            .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "customer      {}",
        if profile.customer_id.is_empty() {
            "(anonymous)"
        } else {
            &profile.customer_id
        }
    );
    if !profile.anonymous_ids.is_empty() {
        println!("anonymous ids {}", profile.anonymous_ids.join(", "));
    }
    if let Some(attributes) = &profile.attributes {
        println!(
            "attributes    {}",
            relance_proto::convert::struct_to_json(attributes)
        );
    }
    for (label, value) in [
        ("email", &profile.email),
        ("phone", &profile.phone),
        ("timezone", &profile.timezone),
        ("locale", &profile.locale),
    ] {
        if !value.is_empty() {
            println!("{label:<13} {value}");
        }
    }
    if let Some(t) = &profile.traits {
        println!("orders        {}", t.orders_count);
        println!(
            "revenue       {:.2} (refunded {:.2}, average basket {:.2})",
            t.revenue, t.refunded, t.average_basket
        );
        println!(
            "purchases     first {}, last {}",
            time(&t.first_purchase_at),
            time(&t.last_purchase_at)
        );
        println!(
            "RFM           R{} F{} M{} (scored {})",
            t.rfm_recency,
            t.rfm_frequency,
            t.rfm_monetary,
            time(&t.rfm_scored_at)
        );
    }
    for consent in &profile.consents {
        let status = if consent.status == pb::ConsentStatus::OptedIn as i32 {
            "opted in"
        } else {
            "opted out"
        };
        println!(
            "consent       {:?}/{} {status} ({}, {})",
            pb::Channel::try_from(consent.channel).unwrap_or_default(),
            consent.topic,
            consent.source,
            time(&consent.updated_at)
        );
    }
    println!("push tokens   {}", profile.push_tokens.len());
}
