//! `relance demo`: starts every service in this process, imports the Online Retail sample
//! into a new workspace, waits for the profiles service to compute traits and RFM scores
//! from the events it consumed, applies the built-in segments of `examples/segments/`, and
//! prints what came out; then runs the example flows of `examples/flows/` for three
//! simulated weeks and prints their reports (see [`crate::demo_campaigns`]).
//!
//! The platform runs on a manual clock that starts at midnight after the file's last
//! order: "as of today" is the day after this 2011 shop's data ends, and the simulation
//! moves the clock forward hour by hour.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use relance_kit::auth::Scope;
use relance_kit::clock::ManualClock;
use relance_kit::{Clock as _, Settings, SharedClock, SystemClock};
use relance_proto::v1 as pb;

use crate::client::Target;
use crate::demo_campaigns::{self, Population, SimOptions};
use crate::{import, segment, serve};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The Online Retail file to import.
    #[arg(long, default_value = "examples/data/online-retail-sample.csv.gz")]
    file: PathBuf,
    /// The workspace to import into; unset, a new one per run (`demo-20260601-093000`), so
    /// that the campaigns simulation starts from the imported data alone.
    #[arg(long)]
    workspace: Option<String>,
    /// Stop once the summary is printed, instead of serving until Ctrl-C.
    #[arg(long)]
    exit: bool,
    /// Days of customer behaviour to simulate for the example flows (0: none).
    #[arg(long, default_value_t = 21)]
    days: u32,
    /// Minutes the clock moves per simulation step.
    #[arg(long, default_value_t = 60)]
    step_minutes: u32,
    /// Seed of the simulated behaviour.
    #[arg(long, default_value_t = 2025)]
    seed: u64,
}

/// The simulated day on which the Ramadan broadcast goes out (at its document's local time).
const BROADCAST_DAY: u32 = 8;

pub async fn run(settings: Settings, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let mut overrides: Vec<(&str, &str)> = Vec::new();
    if std::env::var_os("RELANCE_LOG_LEVEL").is_none() {
        // The demo's own lines are the output; slow statements on a busy laptop are not news.
        overrides.push(("log_level", "warn,sqlx=error"));
    }
    if std::env::var_os("RELANCE_LOG_FORMAT").is_none() {
        overrides.push(("log_format", "pretty"));
    }
    if std::env::var_os("RELANCE_DELIVERY__LINK_SECRET").is_none() {
        // The demo's tracking links need not outlive it; production sets a real secret.
        overrides.push(("delivery.link_secret", "relance-demo-links"));
    }
    let mut settings = settings.with(&overrides)?;
    let _telemetry = relance_kit::telemetry::init(&settings, "relance-demo")?;

    // Delivery sends to local fakes of FCM and Meta's WhatsApp API, and to a local SMTP
    // server, so that the campaigns' messages are really sent (and counted).
    let fakes = relance_delivery::fake::FakeProviders::start().await?;
    fakes.record_bodies(false);
    let smtp = match relance_delivery::fake::start_smtp_server().await {
        Ok(smtp) => Some(smtp),
        Err(error) => {
            eprintln!("warning: no local SMTP server ({error:#}); e-mails will fail");
            None
        }
    };
    settings = settings.with_toml(&demo_toml(
        &fakes.base_url(),
        smtp.as_ref().map(|s| s.port()),
    ))?;

    // The clock starts at midnight after the file's last order.
    let population = Population::read(&args.file)?;
    let start = population.start();
    let manual = ManualClock::new(start);
    let clock: SharedClock = manual.clone();
    let workspace = match &args.workspace {
        Some(workspace) => workspace.clone(),
        None => format!("demo-{}", SystemClock.now().format("%Y%m%d-%H%M%S")),
    };

    let services: Vec<String> = serve::SERVICES.iter().map(|s| s.to_string()).collect();
    let (platform, server, listener) =
        serve::start(settings.clone(), clock.clone(), &services).await?;
    let mut addr = listener.local_addr()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let serving = platform.clone();
    let server = tokio::spawn(async move { server.serve(&serving, listener).await });
    platform.cancel_on_signal();

    let key = platform
        .keys
        .create_key(&workspace, &[Scope::Admin], "demo")
        .await?;
    let target = Target {
        addr: format!("http://{addr}"),
        api_key: key.clone(),
    };
    let clients = target.connect().await?;

    let mut admin = settings.admin_addr;
    if admin.ip().is_unspecified() {
        admin.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    println!("Relance is running: gRPC on {addr}, metrics on http://{admin}/metrics");
    println!(
        "Its clock is set to {} (midnight after the file's last order, {}): \"today\" below.",
        start.format("%Y-%m-%d %H:%M UTC"),
        population.latest_order.format("%Y-%m-%d %H:%M")
    );
    println!(
        "Importing {} into workspace {:?} …",
        args.file.display(),
        workspace
    );
    let started = Instant::now();
    let summary = import::import_online_retail(&clients, &args.file, 500, true).await?;
    import::print_summary(&args.file, &summary);
    println!("  took {:.1}s", started.elapsed().as_secs_f64());

    println!("\nWaiting for the profiles service to consume the events …");
    wait_until_relayed(&settings).await?;
    let pool = relance_kit::db::connect(&settings, relance_profiles::SCHEMA).await?;
    wait_until_consumed(
        &platform.bus,
        relance_profiles::store::TRAITS_CONSUMER,
        &pool,
    )
    .await?;
    let store =
        relance_profiles::store::ProfileStore::new(pool, Arc::new(tokio::sync::Notify::new()));
    relance_profiles::rescore_all(&store, &clock).await?;

    let mut profiles = clients.profiles.clone();
    let top = profiles
        .list(pb::ListProfilesRequest {
            page_size: 10,
            order: pb::ProfileOrder::Unspecified as i32,
            ..Default::default()
        })
        .await?
        .into_inner()
        .profiles;
    println!(
        "\nTop customers by RFM (scores 1-5 by quintile of the workspace's buyers, as of {}):",
        start.format("%Y-%m-%d")
    );
    println!(
        "  {:<10} {:<16} {:>6} {:>11} {:>12}  R F M",
        "customer", "country", "orders", "revenue £", "last order"
    );
    for profile in &top {
        let traits = profile.traits.unwrap_or_default();
        let country = profile
            .attributes
            .as_ref()
            .and_then(|a| a.fields.get("country"))
            .map(relance_proto::convert::value_to_json)
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let last = traits
            .last_purchase_at
            .as_ref()
            .and_then(relance_proto::convert::timestamp_to_chrono)
            .map(|t| t.format("%Y-%m-%d").to_string())
            .unwrap_or_default();
        println!(
            "  {:<10} {:<16} {:>6} {:>11.2} {:>12}  {} {} {}",
            profile.customer_id,
            country,
            traits.orders_count,
            traits.revenue,
            last,
            traits.rfm_recency,
            traits.rfm_frequency,
            traits.rfm_monetary
        );
    }
    if args.days > 0 {
        demo_campaigns::prepare_audience(&clients, &population, args.seed).await?;
    }

    println!("\nApplying the built-in segments (examples/segments/) …");
    segment::apply(segment::ApplyArgs {
        files: vec![PathBuf::from("examples/segments")],
        dry_run: false,
        wait: false,
        target: target.clone(),
    })
    .await?;
    segment::wait_until_built(&mut clients.clone(), &[]).await?;
    // Traits (RFM scores) still travel profiles → RabbitMQ → segmentation for a while:
    // show the sizes once they have stopped moving.
    wait_until_settled(&mut clients.clone()).await?;
    println!(
        "\nSegments (as of {}: recency and inactivity count from the day after the last order;",
        start.format("%Y-%m-%d")
    );
    println!("the RFM grid is relative to the workspace's buyers and spreads them out):");
    segment::run(segment::SegmentCommand::List {
        target: target.clone(),
    })
    .await?;

    if let Some(first) = top.first() {
        show_recommendations(
            &mut clients.clone(),
            &first.customer_id,
            summary.latest_order,
        )
        .await?;
    }

    if let Some(first) = top.first() {
        show_delivery(&mut clients.clone(), &first.customer_id).await?;
    }

    let mut flows = Vec::new();
    if args.days > 0 {
        let pool = relance_kit::db::connect(&settings, relance_campaigns::SCHEMA).await?;
        flows = demo_campaigns::apply_documents(&clients, start, BROADCAST_DAY).await?;
        let simulated = Instant::now();
        let mut simulation = demo_campaigns::Simulation::new(
            clients.clone(),
            pool,
            &workspace,
            manual.clone(),
            &population,
            SimOptions {
                days: args.days,
                step_minutes: args.step_minutes,
                seed: args.seed,
            },
        );
        simulation.run().await?;
        let pushes = fakes.requests_for("/v1/projects/").len();
        let whatsapps = fakes.count() as usize - pushes;
        let emails = smtp.as_ref().map(|s| s.messages().len()).unwrap_or(0);
        println!(
            "  the fake providers received {pushes} pushes (FCM) and {whatsapps} WhatsApp messages (Meta), the SMTP server {emails} e-mails ({:.0}s in all)",
            simulated.elapsed().as_secs_f64()
        );
        demo_campaigns::print_reports(&clients, &flows).await?;
        demo_campaigns::archive(&clients, &flows).await?;
        println!(
            "\nThe simulation is over: its flows are archived (journeys ended, reports kept), and the clock stays at {}.",
            manual.now().format("%Y-%m-%d %H:%M UTC")
        );
    }

    if let Some(first) = top.first() {
        println!("\nTry:");
        println!("  export RELANCE_ADDR=http://{addr} RELANCE_API_KEY={key}");
        println!("  target/debug/relance profile get {}", first.customer_id);
        println!(
            "  target/debug/relance profile export {} | head -40",
            first.customer_id
        );
        println!("  target/debug/relance segment members champions | head");
        println!("  target/debug/relance segment preview -f examples/segments/inactive.yaml");
        println!("  target/debug/relance reco info");
        if !flows.is_empty() {
            println!("  target/debug/relance report flow onboarding");
            println!("  target/debug/relance report flow reactivation --format csv");
            println!(
                "  target/debug/relance report broadcast {}",
                demo_campaigns::BROADCAST
            );
            println!("  target/debug/relance flow list --all");
        }
    }

    if args.exit {
        platform.shutdown.cancel();
    } else {
        println!("\nServing until Ctrl-C.");
    }
    server.await??;
    platform.drain().await;
    drop(smtp);
    drop(fakes);
    Ok(ExitCode::SUCCESS)
}

/// The demo's settings: fast polling for the simulation's steps, and delivery's providers
/// pointed at the local fakes.
fn demo_toml(fakes: &str, smtp_port: Option<u16>) -> String {
    let mut toml = format!(
        r#"
[campaigns]
poll_ms = 20
schedule_poll_ms = 50

[segmentation]
sweep_every_ms = 100
build_poll_ms = 200

[[delivery.providers]]
name = "fcm"
kind = "fcm"
base_url = "{fakes}"
project_id = "relance-demo"
access_token = "demo-token"

[[delivery.providers]]
name = "meta"
kind = "meta"
base_url = "{fakes}"
phone_number_id = "1055"
access_token = "demo-token"
"#
    );
    if let Some(port) = smtp_port {
        toml.push_str(&format!(
            r#"
[[delivery.providers]]
name = "smtp"
kind = "smtp"
host = "127.0.0.1"
port = {port}
tls = "none"
from_address = "news@shop.example"
from_name = "The shop"
"#
        ));
    }
    toml
}

/// Saves a three-language template with a products block, sends the best customer an
/// in-app message with it (no provider needed: the inbox is Relance's own), and previews
/// the Arabic e-mail, right to left.
async fn show_delivery(
    clients: &mut crate::client::Clients,
    customer_id: &str,
) -> anyhow::Result<()> {
    println!(
        "\nDelivery: a post-purchase template in French, Arabic and English, with 3 recommended products …"
    );
    let variant = |locale: &str, title: &str, body: &str, intro: &str| pb::TemplateVariant {
        locale: locale.into(),
        direction: 0,
        content: Some(pb::MessageContent {
            in_app: Some(pb::InAppContent {
                title: title.into(),
                body: format!(
                    "{body}{{% for p in products %}}\n- {{{{ p.title }}}} ({{{{ p.price }}}}){{% endfor %}}"
                ),
                url: "https://shop.example/orders".into(),
                ..Default::default()
            }),
            email: Some(pb::EmailContent {
                subject: title.into(),
                html: format!(
                    "<html><body><p>{intro}</p><ul>{{% for p in products %}}<li>{{{{ p.title }}}}</li>{{% endfor %}}</ul></body></html>"
                ),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let template = pb::Template {
        name: "post-purchase".into(),
        description: "Thanks for the order, with three products bought with it".into(),
        default_locale: "en".into(),
        variants: vec![
            variant(
                "en",
                "Thank you for your order",
                "You may also like:",
                "You may also like",
            ),
            variant(
                "fr",
                "Merci pour votre commande",
                "Vous aimerez aussi :",
                "Vous aimerez aussi",
            ),
            variant("ar", "شكرا على طلبك", "قد يعجبك أيضا:", "قد يعجبك أيضا"),
        ],
        products: Some(pb::TemplateProducts {
            placement: pb::Placement::Email as i32,
            n: 3,
            ..Default::default()
        }),
        sample_data: Some(relance_proto::convert::json_to_struct(&serde_json::json!({
            "customer": {"first_name": "Amina"},
            "products": [{"title": "White hanging heart t-light holder", "price": 2.95}],
        }))),
        ..Default::default()
    };
    let saved = clients
        .delivery
        .upsert_template(pb::UpsertTemplateRequest {
            template: Some(template),
            dry_run: false,
        })
        .await?
        .into_inner();
    println!("  template post-purchase saved, version {}", saved.version);
    let customer = Some(pb::CustomerRef {
        id: Some(pb::customer_ref::Id::CustomerId(customer_id.into())),
    });
    let sent = clients
        .delivery
        .send(pb::SendRequest {
            idempotency_key: format!("demo-post-purchase-{customer_id}"),
            customer: customer.clone(),
            channels: vec![pb::Channel::InApp as i32],
            content: Some(pb::send_request::Content::Template("post-purchase".into())),
            topic: "order_updates".into(),
            kind: pb::MessageKind::Transactional as i32,
            wait_for_outcome: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let status = pb::MessageStatus::try_from(sent.status)
        .map(|s| s.as_str_name().trim_start_matches("MESSAGE_STATUS_"))
        .unwrap_or("?");
    println!(
        "  in-app message to customer {customer_id}: {status} (message {})",
        sent.message_id
    );
    let inbox = clients
        .delivery
        .list_inbox(pb::ListInboxRequest {
            customer: customer.clone(),
            page_size: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    if let Some(message) = inbox.messages.first() {
        println!(
            "  their inbox ({} unread): {}",
            inbox.unread_count, message.title
        );
        for line in message.body.lines() {
            println!("    {line}");
        }
    }
    let preview = clients
        .delivery
        .preview_template(pb::PreviewTemplateRequest {
            source: Some(pb::preview_template_request::Source::Name(
                "post-purchase".into(),
            )),
            customer,
            channel: pb::Channel::Email as i32,
            locale: "ar".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let html = preview
        .rendered
        .and_then(|r| r.email)
        .map(|e| e.html)
        .unwrap_or_default();
    println!("  the Arabic e-mail, as it would be sent (right to left):");
    println!("    {}", html.chars().take(160).collect::<String>());
    Ok(())
}

/// Trains the recommendation models on the imported orders and shows what they answer
/// for the best customer's e-mail and for a cart holding the shop's best seller.
async fn show_recommendations(
    clients: &mut crate::client::Clients,
    customer_id: &str,
    latest_order: Option<chrono::DateTime<chrono::Utc>>,
) -> anyhow::Result<()> {
    println!("\nTraining the recommendation models on the imported orders …");
    // The shop's data ends years ago: train as of the day after its last order (trending
    // then means "trending in its last weeks"), over its whole history.
    let Some(latest_order) = latest_order else {
        return Ok(());
    };
    let cutoff = latest_order + chrono::Duration::days(1);
    let trained = clients
        .recommendations
        .train(pb::TrainRequest {
            cutoff: Some(relance_proto::convert::chrono_to_timestamp(cutoff)),
            lookback: Some(prost_types::Duration {
                seconds: 400 * 86_400,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    if let Some(model) = &trained.model {
        let seconds = model
            .training_time
            .as_ref()
            .map(|d| d.seconds as f64 + d.nanos as f64 / 1e9)
            .unwrap_or_default();
        println!(
            "  model v{}: {} items, {} customers, {} interactions, {} ({seconds:.1}s)",
            model.version,
            model.item_count,
            model.customer_count,
            model.interaction_count,
            model.algorithm
        );
    }
    let customer = Some(pb::CustomerRef {
        id: Some(pb::customer_ref::Id::CustomerId(customer_id.to_owned())),
    });
    let email = clients
        .recommendations
        .recommend(pb::RecommendRequest {
            customer: customer.clone(),
            placement: pb::Placement::Email as i32,
            n: 5,
            seed: Some(1),
            include_details: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    println!(
        "\nRecommended for customer {customer_id}'s next e-mail (70% predicted, 20% trending, 10% exploration):"
    );
    print_items(&email.items);
    let best_seller = clients
        .recommendations
        .similar_items(pb::SimilarItemsRequest {
            item_id: "85123A".into(),
            kind: pb::SimilarityKind::BoughtTogether as i32,
            n: 3,
            include_details: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    println!(
        "\nBought together with 85123A (White Hanging Heart T-Light Holder, the best seller):"
    );
    print_items(&best_seller.items);
    Ok(())
}

fn print_items(items: &[pb::RecommendedItem]) {
    for item in items {
        let (title, price) = item
            .item
            .as_ref()
            .map(|i| (i.title.clone(), i.price))
            .unwrap_or_default();
        let reason = pb::RecommendationReason::try_from(item.reason)
            .map(|r| {
                r.as_str_name()
                    .trim_start_matches("RECOMMENDATION_REASON_")
                    .to_lowercase()
            })
            .unwrap_or_default();
        let because = if item.because_item_id.is_empty() {
            String::new()
        } else {
            format!(" (because of {})", item.because_item_id)
        };
        println!(
            "  {:<8} {:<40} £{:>6.2}  {reason}{because}",
            item.item_id, title, price
        );
    }
}

/// Waits until the segments' sizes have not changed for three seconds (at most 3 min).
async fn wait_until_settled(clients: &mut crate::client::Clients) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut last: Vec<(String, u64)> = Vec::new();
    let mut stable = 0;
    while stable < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let sizes: Vec<(String, u64)> = segment::list_all(clients)
            .await?
            .into_iter()
            .map(|s| (s.name, s.member_count))
            .collect();
        if sizes == last {
            stable += 1;
        } else {
            stable = 0;
            last = sizes;
        }
    }
    Ok(())
}

/// Waits until the events relay has published every stored event (an empty queue means
/// nothing while the relay is still behind, as it is on a busy machine).
async fn wait_until_relayed(settings: &Settings) -> anyhow::Result<()> {
    let pool = relance_kit::db::connect(settings, relance_events::SCHEMA).await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let behind: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events e, relay_cursor c WHERE (e.xid, e.seq) > (c.xid, c.seq)",
        )
        .fetch_one(&pool)
        .await?;
        if behind == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the events relay did not catch up within 5 minutes ({behind} events behind)"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until a consumer's queue has stayed empty and the messages it processed have
/// stopped growing for a moment (at most 5 min): the queue's depth does not count the
/// messages the consumer holds unacknowledged, which a busy machine makes many.
async fn wait_until_consumed(
    bus: &relance_kit::bus::Bus,
    queue: &str,
    pool: &sqlx::PgPool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut quiet_polls = 0;
    let mut last_processed = -1i64;
    while quiet_polls < 4 {
        if Instant::now() > deadline {
            anyhow::bail!("{queue} did not catch up within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let depth = bus.queue_depth(queue).await?;
        let processed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM processed_messages WHERE consumer = $1")
                .bind(queue)
                .fetch_one(pool)
                .await?;
        if depth == 0 && processed == last_processed {
            quiet_polls += 1
        } else {
            quiet_polls = 0
        }
        last_processed = processed;
    }
    Ok(())
}
