//! The campaigns part of `relance demo`: the example flows of `examples/flows/` run for
//! three simulated weeks on the imported Online Retail customers, and their reports printed
//! in the shape of the Jumia Algeria study's tables (`docs`: the study's figures are quoted
//! beside ours).
//!
//! The platform runs on a [`ManualClock`] that starts at midnight after the file's last
//! order, so "no order in 30 days" means what it meant for this shop. Time moves in steps
//! (an hour by default); after each step the demo waits until the campaigns service has
//! seen the step's events and has run every journey, broadcast wave and send that fell
//! due, and until delivery has sent what was queued — what the campaigns tests' `settle()`
//! does. Customers behave at the study's rates, drawn from a seeded RNG: a share of them
//! changes a cart each day (items of one of their past orders), new customers sign up,
//! and whoever gets a message clicks it with about the study's click-through rate for that
//! message and orders (one of their past baskets) with about its conversion rate, within
//! the attribution window. Delivery sends to local fakes of FCM and Meta's WhatsApp API
//! and to a local SMTP server, so messages are really SENT and counted.

use std::cmp::Ordering;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::hash::{Hash as _, Hasher as _};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Duration, NaiveTime, Timelike as _, Utc};
use futures::StreamExt as _;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use relance_kit::clock::ManualClock;
use relance_proto::convert::{chrono_to_timestamp, json_to_struct};
use relance_proto::v1 as pb;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::client::Clients;
use crate::{campaign, demo_templates, report};

/// How long and how finely the simulation runs.
#[derive(Debug, Clone, Copy)]
pub struct SimOptions {
    /// Simulated days.
    pub days: u32,
    /// Minutes per step of the clock.
    pub step_minutes: u32,
    /// Seed of the customers' behaviour.
    pub seed: u64,
}

// --- The customers and their past orders ------------------------------------------------

/// One line of a past order, as events carry it.
#[derive(Debug, Clone)]
struct Line {
    product_id: String,
    name: String,
    quantity: i64,
    price: f64,
}

/// A past order: what a simulated cart or order of the same customer holds.
#[derive(Debug, Clone)]
struct Basket {
    revenue: f64,
    lines: Vec<Line>,
}

impl Basket {
    fn items(&self) -> Value {
        Value::Array(
            self.lines
                .iter()
                .map(|l| {
                    json!({ "product_id": l.product_id, "name": l.name, "quantity": l.quantity, "price": l.price })
                })
                .collect(),
        )
    }
}

/// One customer of the file.
#[derive(Debug, Clone)]
struct Customer {
    id: String,
    country: String,
    /// Indices into `Population::baskets`.
    baskets: Vec<usize>,
    last_order: DateTime<Utc>,
}

/// The file's customers with their orders, read before the import so the clock can start
/// the day after the last one.
#[derive(Debug)]
pub struct Population {
    pub latest_order: DateTime<Utc>,
    customers: Vec<Customer>,
    baskets: Vec<Basket>,
}

/// Lines kept per basket (the file has invoices of hundreds of lines).
const MAX_LINES: usize = 20;

impl Population {
    /// Reads the Online Retail file: every known customer's orders.
    pub fn read(file: &Path) -> anyhow::Result<Population> {
        let reader = relance_retail_data::Reader::open(file)
            .with_context(|| format!("reading {}", file.display()))?;
        let mut customers: BTreeMap<String, Customer> = BTreeMap::new();
        let mut baskets = Vec::new();
        let mut latest: Option<DateTime<Utc>> = None;
        for invoice in reader {
            let invoice = invoice?;
            if invoice.is_cancellation || invoice.lines.is_empty() {
                continue;
            }
            let at = crate::import::to_utc(invoice.invoiced_at);
            latest = latest.max(Some(at));
            let Some(id) = &invoice.customer_id else {
                continue;
            };
            let lines = invoice
                .lines
                .iter()
                .take(MAX_LINES)
                .map(|l| Line {
                    product_id: l.stock_code.clone(),
                    name: l.description.clone(),
                    quantity: l.quantity,
                    price: l.unit_price,
                })
                .collect();
            baskets.push(Basket {
                revenue: (invoice.revenue() * 100.0).round() / 100.0,
                lines,
            });
            let customer = customers.entry(id.clone()).or_insert_with(|| Customer {
                id: id.clone(),
                country: invoice.country.clone(),
                baskets: Vec::new(),
                last_order: at,
            });
            customer.baskets.push(baskets.len() - 1);
            customer.last_order = customer.last_order.max(at);
        }
        let latest_order = latest.context("the file has no orders")?;
        Ok(Population {
            latest_order,
            customers: customers.into_values().collect(),
            baskets,
        })
    }

    /// Midnight (UTC) after the last order: where the demo's clock starts.
    pub fn start(&self) -> DateTime<Utc> {
        (self.latest_order.date_naive() + Duration::days(1))
            .and_time(NaiveTime::MIN)
            .and_utc()
    }
}

// --- What a shop's CRM knows of each customer ------------------------------------------

/// A number in [0, 1) that depends only on the seed, the customer and what it is for.
fn unit(seed: u64, id: &str, salt: &str) -> f64 {
    let mut hasher = DefaultHasher::new();
    seed.hash(&mut hasher);
    id.hash(&mut hasher);
    salt.hash(&mut hasher);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

const FIRST_NAMES: &[&str] = &[
    "Amina",
    "Oliver",
    "Sarah",
    "Yacine",
    "Emma",
    "James",
    "Lina",
    "Mehdi",
    "Sophie",
    "Harry",
    "Nadia",
    "Thomas",
    "Leila",
    "Samir",
    "Chloé",
    "George",
    "Inès",
    "Youssef",
    "Camille",
    "Jack",
    "Meriem",
    "Charlotte",
    "Karim",
    "Lucy",
    "Rayan",
    "Hannah",
    "Sofia",
    "William",
    "Yasmine",
    "Noah",
];

fn timezone_of(country: &str) -> &'static str {
    match country {
        "Germany" => "Europe/Berlin",
        "France" => "Europe/Paris",
        "Spain" => "Europe/Madrid",
        "Belgium" => "Europe/Brussels",
        "Switzerland" => "Europe/Zurich",
        "Portugal" => "Europe/Lisbon",
        "Italy" => "Europe/Rome",
        "Norway" => "Europe/Oslo",
        "Finland" => "Europe/Helsinki",
        "Denmark" => "Europe/Copenhagen",
        "Australia" => "Australia/Sydney",
        "Netherlands" => "Europe/Amsterdam",
        "Sweden" => "Europe/Stockholm",
        "Japan" => "Asia/Tokyo",
        "Channel Islands" => "Europe/Jersey",
        "Cyprus" => "Asia/Nicosia",
        "Poland" => "Europe/Warsaw",
        "Austria" => "Europe/Vienna",
        "EIRE" => "Europe/Dublin",
        "USA" => "America/New_York",
        "Canada" => "America/Toronto",
        "Brazil" => "America/Sao_Paulo",
        "United Arab Emirates" => "Asia/Dubai",
        "Saudi Arabia" => "Asia/Riyadh",
        "Bahrain" => "Asia/Bahrain",
        "Israel" => "Asia/Jerusalem",
        "Lebanon" => "Asia/Beirut",
        "Czech Republic" => "Europe/Prague",
        "Lithuania" => "Europe/Vilnius",
        "Greece" => "Europe/Athens",
        "Malta" => "Europe/Malta",
        "Iceland" => "Atlantic/Reykjavik",
        "RSA" => "Africa/Johannesburg",
        "Singapore" => "Asia/Singapore",
        "Hong Kong" => "Asia/Hong_Kong",
        _ => "Europe/London",
    }
}

/// Shares of customers with each kind of contact (the demo's assumptions: most of this
/// shop's buyers have the app, fewer gave a WhatsApp number).
const PUSH_SHARE: f64 = 0.85;
const EMAIL_OPT_IN_SHARE: f64 = 0.90;
const WHATSAPP_SHARE: f64 = 0.35;

/// What the profile gets: a first name, where they are, and how they can be reached.
struct Contact {
    first_name: &'static str,
    timezone: &'static str,
    locale: &'static str,
    push: bool,
    email_opt_in: bool,
    whatsapp: bool,
}

fn contact_of(seed: u64, id: &str, country: &str) -> Contact {
    let name = (unit(seed, id, "name") * FIRST_NAMES.len() as f64) as usize;
    Contact {
        first_name: FIRST_NAMES[name.min(FIRST_NAMES.len() - 1)],
        timezone: timezone_of(country),
        locale: if matches!(country, "France" | "Belgium") {
            "fr"
        } else {
            "en-GB"
        },
        push: unit(seed, id, "push") < PUSH_SHARE,
        email_opt_in: unit(seed, id, "email") < EMAIL_OPT_IN_SHARE,
        whatsapp: unit(seed, id, "whatsapp") < WHATSAPP_SHARE,
    }
}

fn known(id: &str) -> Option<pb::CustomerRef> {
    Some(pb::CustomerRef {
        id: Some(pb::customer_ref::Id::CustomerId(id.to_owned())),
    })
}

/// Gives a profile its name, timezone, locale, addresses and marketing opt-ins.
async fn register(clients: &Clients, seed: u64, id: &str, country: &str) -> anyhow::Result<()> {
    let contact = contact_of(seed, id, country);
    let digits: String = format!("{:03}", (unit(seed, id, "phone") * 1000.0) as u32);
    let mut profiles = clients.profiles.clone();
    profiles
        .upsert(pb::UpsertProfileRequest {
            customer: known(id),
            attributes: Some(json_to_struct(&json!({
                "first_name": contact.first_name,
                "country": country,
            }))),
            email: Some(format!("customer-{id}@mail.example")),
            phone: contact.whatsapp.then(|| format!("+447700900{digits}")),
            push_tokens: if contact.push {
                vec![pb::PushToken {
                    token: format!("demo-fcm-token-{id}"),
                    platform: pb::PushPlatform::Android as i32,
                    app_id: "example.shop.app".into(),
                    updated_at: None,
                }]
            } else {
                Vec::new()
            },
            timezone: Some(contact.timezone.into()),
            locale: Some(contact.locale.into()),
            ..Default::default()
        })
        .await
        .context("Profiles.Upsert")?;
    let mut channels = Vec::new();
    if contact.push {
        channels.push(pb::Channel::Push);
    }
    if contact.email_opt_in {
        channels.push(pb::Channel::Email);
    }
    if contact.whatsapp {
        channels.push(pb::Channel::Whatsapp);
    }
    for channel in channels {
        profiles
            .set_consent(pb::SetConsentRequest {
                customer: known(id),
                consent: Some(pb::Consent {
                    channel: channel as i32,
                    topic: String::new(),
                    status: pb::ConsentStatus::OptedIn as i32,
                    updated_at: None,
                    source: "signup_form".into(),
                }),
            })
            .await
            .context("Profiles.SetConsent")?;
    }
    Ok(())
}

/// Gives every customer of the file their contacts and opt-ins.
pub async fn prepare_audience(
    clients: &Clients,
    population: &Population,
    seed: u64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let total = population.customers.len();
    let mut push = 0;
    let mut email = 0;
    let mut whatsapp = 0;
    for customer in &population.customers {
        let contact = contact_of(seed, &customer.id, &customer.country);
        push += usize::from(contact.push);
        email += usize::from(contact.email_opt_in);
        whatsapp += usize::from(contact.whatsapp);
    }
    println!(
        "\nGiving the {total} customers what a shop's CRM holds: a first name, the timezone and locale of their\n\
         country, an e-mail address, and marketing opt-ins — push {push} (app installed), e-mail {email}, WhatsApp {whatsapp} …"
    );
    let mut tasks = futures::stream::iter(
        population
            .customers
            .iter()
            .map(|customer| register(clients, seed, &customer.id, &customer.country)),
    )
    .buffer_unordered(16);
    let mut done = 0usize;
    while let Some(result) = tasks.next().await {
        result?;
        done += 1;
        if done.is_multiple_of(1000) {
            println!("  {done} of {total} profiles …");
        }
    }
    println!(
        "  {total} profiles ready ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

// --- Templates, flows, the broadcast ---------------------------------------------------

/// The broadcast the demo schedules: examples/flows/ramadan-broadcast.yaml, renamed and
/// moved to this local date and time inside the simulated weeks.
pub const BROADCAST: &str = "ramadan-iftar-demo";

/// Saves the templates of examples/templates, applies the flows of examples/flows and
/// schedules the broadcast on the `broadcast_day`-th simulated day at the document's local
/// time. Returns the flows' names.
pub async fn apply_documents(
    clients: &Clients,
    start: DateTime<Utc>,
    broadcast_day: u32,
) -> anyhow::Result<Vec<String>> {
    println!("\nSaving the flows' templates (examples/templates/) …");
    let templates = demo_templates::load_dir(Path::new("examples/templates"))?;
    let mut delivery = clients.delivery.clone();
    let mut saved = Vec::new();
    for document in &templates {
        let response = delivery
            .upsert_template(pb::UpsertTemplateRequest {
                template: Some(document.template.clone()),
                dry_run: false,
            })
            .await
            .with_context(|| format!("{}: Delivery.UpsertTemplate", document.origin))?
            .into_inner();
        if !response.errors.is_empty() {
            let problems: Vec<String> = response
                .errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.reason))
                .collect();
            anyhow::bail!("{}: {}", document.origin, problems.join("; "));
        }
        saved.push(response.name);
    }
    println!("  {} templates saved: {}", saved.len(), saved.join(", "));

    println!("\nApplying the flows (examples/flows/) …");
    let mut files: Vec<_> = std::fs::read_dir("examples/flows")
        .context("reading examples/flows")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("yaml"))
        .collect();
    files.sort();
    let mut flows = Vec::new();
    let mut broadcast_yaml = None;
    let mut c = clients.clone();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        for yaml in relance_kit::yaml::split_documents(&text) {
            let origin = file.display().to_string();
            if yaml.lines().any(|l| l.trim() == "kind: Broadcast") {
                broadcast_yaml = Some((origin, yaml));
                continue;
            }
            if !campaign::apply_flow(&mut c, &origin, &yaml, false).await {
                anyhow::bail!("{origin} was refused");
            }
            if let Ok(def) = relance_campaigns::domain::parse::parse_flow(&yaml) {
                flows.push(def.name);
            }
        }
    }
    if let Some((origin, yaml)) = broadcast_yaml {
        let date = (start + Duration::days(i64::from(broadcast_day) - 1)).date_naive();
        let moved = move_broadcast(&yaml, date);
        println!(
            "  {origin}, renamed {BROADCAST} and moved to {date} (local time) so it goes out inside the simulation:"
        );
        print!("  ");
        if !campaign::apply_broadcast(&mut c, &origin, &moved, false).await {
            anyhow::bail!("{origin} was refused");
        }
    }
    Ok(flows)
}

/// The broadcast document with the demo's name and `date` instead of its own (the time of
/// day is kept).
fn move_broadcast(yaml: &str, date: chrono::NaiveDate) -> String {
    let mut out = String::with_capacity(yaml.len());
    for line in yaml.lines() {
        if line.starts_with("name:") {
            out.push_str(&format!("name: {BROADCAST}"));
        } else if line.starts_with("schedule:") && line.contains("local_time") {
            // `schedule: { local_time: "2026-02-19 21:00" }`: keep the time, change the date.
            let time = line
                .split('"')
                .nth(1)
                .and_then(|t| t.split_whitespace().nth(1))
                .unwrap_or("21:00");
            out.push_str(&format!("schedule: {{ local_time: \"{date} {time}\" }}"));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

// --- Behaviour -------------------------------------------------------------------------

/// How customers answer one message: the chance they click it (opens for e-mail), and
/// the chance they order after it, clicked or not.
#[derive(Debug, Clone, Copy)]
struct Reaction {
    /// E-mail only: opened (clicks are opened too).
    open: f64,
    click: f64,
    order_if_clicked: f64,
    order_otherwise: f64,
    /// Post-purchase: a product viewed afterwards (what the flow's second step waits for).
    view: f64,
}

const fn r(click: f64, order_if_clicked: f64, order_otherwise: f64) -> Reaction {
    Reaction {
        open: 0.0,
        click,
        order_if_clicked,
        order_otherwise,
        view: 0.0,
    }
}

const fn mail(open: f64, click: f64, order_if_clicked: f64, order_otherwise: f64) -> Reaction {
    Reaction {
        open,
        click,
        order_if_clicked,
        order_otherwise,
        view: 0.0,
    }
}

/// The rates behind the simulation, per template and channel. Push click-through rates
/// are the study's (PN1 and PN2 about 6–7.6 %, PN3 3–6 %; reactivation below 1 %); the
/// conversion chances are set so that conversions per impression land near its tables
/// (abandoned cart 13 % / 12.7 % / 7.9 %, onboarding 4.1 % / 2.9 % / 0.9 %, reactivation
/// about 1 %). E-mail and WhatsApp convert less than push, as the study's channel shares
/// say (push 95–97 % of the conversions).
fn reaction(template: &str, channel: &str) -> Reaction {
    let email = channel == "email";
    match (template, email) {
        ("cart-1", _) => r(0.060, 0.40, 0.075),
        ("cart-2a", _) => r(0.064, 0.40, 0.070),
        ("cart-2b", _) => r(0.056, 0.40, 0.068),
        ("cart-3", false) => r(0.060, 0.35, 0.055),
        ("cart-3", true) => mail(0.20, 0.025, 0.25, 0.012),
        ("cart-3-whatsapp", _) => r(0.12, 0.35, 0.05),
        ("onboarding-welcome", false) => r(0.076, 0.30, 0.020),
        ("onboarding-welcome", true) => mail(0.25, 0.035, 0.20, 0.006),
        ("onboarding-tutorial", false) => r(0.068, 0.25, 0.012),
        ("onboarding-tutorial", true) => mail(0.20, 0.025, 0.15, 0.004),
        ("onboarding-offers", _) => r(0.032, 0.15, 0.004),
        ("onboarding-picks", _) => mail(0.20, 0.025, 0.15, 0.003),
        (t, false) if t.starts_with("reactivation-") && t.ends_with("-a") => r(0.006, 0.30, 0.008),
        (t, false) if t.starts_with("reactivation-") && t.ends_with("-b") => r(0.008, 0.30, 0.010),
        ("reactivation-reminder", _) => r(0.005, 0.25, 0.006),
        (t, true) if t.starts_with("reactivation-") => mail(0.05, 0.004, 0.20, 0.002),
        ("cross-sell", _) => Reaction {
            view: 0.20,
            ..mail(0.25, 0.03, 0.15, 0.003)
        },
        ("cross-sell-viewed", _) => r(0.09, 0.30, 0.05),
        ("vip-recap", _) => mail(0.35, 0.06, 0.25, 0.012),
        ("ramadan-iftar-a", false) => r(0.045, 0.30, 0.018),
        ("ramadan-iftar-b", false) => r(0.052, 0.30, 0.020),
        (t, true) if t.starts_with("ramadan-") => mail(0.20, 0.025, 0.15, 0.004),
        (_, true) => mail(0.15, 0.02, 0.15, 0.003),
        (_, false) => r(0.02, 0.20, 0.005),
    }
}

/// Chance per day that a customer changes their cart, by how recently they last ordered.
fn cart_rate(days_since_last_order: i64) -> f64 {
    match days_since_last_order {
        ..=30 => 0.030,
        31..=60 => 0.015,
        _ => 0.008,
    }
}
/// Chance a cart is checked out without any message (the control group's rate).
const NATURAL_CHECKOUT: f64 = 0.08;
/// New customers per day.
const SIGNUPS_PER_DAY: f64 = 20.0;
/// Chance per day that a new customer (first two weeks) fills a cart.
const NEW_CUSTOMER_CART_RATE: f64 = 0.05;

/// Relative activity by local hour (the shop's customers are mostly in the UK): quiet at
/// night, busiest in the evening. Averages 1 over the day.
fn hour_weight(hour: u32) -> f64 {
    const W: [f64; 24] = [
        0.25, 0.12, 0.08, 0.06, 0.06, 0.10, 0.30, 0.60, 0.90, 1.10, 1.20, 1.25, 1.35, 1.30, 1.25,
        1.20, 1.25, 1.40, 1.60, 1.80, 1.85, 1.60, 1.10, 0.55,
    ];
    let sum: f64 = W.iter().sum();
    W[hour as usize % 24] * 24.0 / sum
}

/// A message delivery sent, as its ledger has it.
#[derive(Debug, Clone, sqlx::FromRow)]
struct SentMessage {
    id: String,
    customer_id: Option<String>,
    channel: i16,
    flow: String,
    flow_version: i32,
    step: String,
    variant: String,
    broadcast: String,
    journey_id: String,
    template: String,
    topic: String,
    sent_at: Option<DateTime<Utc>>,
}

impl SentMessage {
    fn channel_name(&self) -> &'static str {
        relance_delivery::channels::channel_name(
            pb::Channel::try_from(i32::from(self.channel)).unwrap_or(pb::Channel::Unspecified),
        )
    }

    /// The properties delivery gives its own `message_*` events.
    fn properties(&self) -> Value {
        json!({
            "message_id": self.id,
            "flow": self.flow,
            "flow_version": self.flow_version,
            "step": self.step,
            "variant": self.variant,
            "broadcast": self.broadcast,
            "journey_id": self.journey_id,
            "template": self.template,
            "topic": self.topic,
            "channel": self.channel_name(),
        })
    }
}

/// Something a customer will do.
#[derive(Debug, Clone)]
enum Action {
    Open(SentMessage),
    Click(SentMessage),
    View { customer: String, basket: usize },
    Order { customer: String, basket: usize },
}

#[derive(Debug)]
struct Due {
    at: DateTime<Utc>,
    seq: u64,
    action: Action,
}

impl PartialEq for Due {
    fn eq(&self, other: &Due) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Due) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    // Reversed: the heap pops the earliest first.
    fn cmp(&self, other: &Due) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// A customer the simulation moves.
#[derive(Debug)]
struct Agent {
    id: String,
    baskets: Vec<usize>,
    /// Chance per day of a new cart.
    cart_rate: f64,
    signed_up: Option<DateTime<Utc>>,
}

/// What happened in one simulated day (or the whole run).
#[derive(Debug, Default, Clone)]
struct Tally {
    carts: u64,
    signups: u64,
    sent: BTreeMap<&'static str, u64>,
    opens: u64,
    clicks: u64,
    views: u64,
    orders: u64,
    revenue: f64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.carts += other.carts;
        self.signups += other.signups;
        for (channel, n) in &other.sent {
            *self.sent.entry(channel).or_default() += n;
        }
        self.opens += other.opens;
        self.clicks += other.clicks;
        self.views += other.views;
        self.orders += other.orders;
        self.revenue += other.revenue;
    }

    fn sent_line(&self) -> String {
        let total: u64 = self.sent.values().sum();
        if total == 0 {
            return "0".into();
        }
        let parts: Vec<String> = self.sent.iter().map(|(c, n)| format!("{c} {n}")).collect();
        format!("{total} ({})", parts.join(", "))
    }
}

/// The simulation.
pub struct Simulation<'a> {
    clients: Clients,
    pool: PgPool,
    workspace: String,
    clock: Arc<ManualClock>,
    population: &'a Population,
    options: SimOptions,
    rng: StdRng,
    agents: Vec<Agent>,
    agenda: BinaryHeap<Due>,
    seq: u64,
    /// Customers with an order coming (one at a time).
    ordering: HashSet<String>,
    /// The basket of each customer's open cart.
    carts: HashMap<String, usize>,
    last_cart: HashMap<String, DateTime<Utc>>,
    seen: HashSet<String>,
    events: u64,
    day: Tally,
    total: Tally,
}

impl<'a> Simulation<'a> {
    pub fn new(
        clients: Clients,
        pool: PgPool,
        workspace: &str,
        clock: Arc<ManualClock>,
        population: &'a Population,
        options: SimOptions,
    ) -> Simulation<'a> {
        let start = population.start();
        let agents = population
            .customers
            .iter()
            .map(|c| Agent {
                id: c.id.clone(),
                baskets: c.baskets.clone(),
                cart_rate: cart_rate((start - c.last_order).num_days()),
                signed_up: None,
            })
            .collect();
        Simulation {
            clients,
            pool,
            workspace: workspace.to_owned(),
            clock,
            population,
            rng: StdRng::seed_from_u64(options.seed),
            options,
            agents,
            agenda: BinaryHeap::new(),
            seq: 0,
            ordering: HashSet::new(),
            carts: HashMap::new(),
            last_cart: HashMap::new(),
            seen: HashSet::new(),
            events: 0,
            day: Tally::default(),
            total: Tally::default(),
        }
    }

    fn now(&self) -> DateTime<Utc> {
        relance_kit::Clock::now(self.clock.as_ref())
    }

    fn schedule(&mut self, at: DateTime<Utc>, action: Action) {
        self.seq += 1;
        self.agenda.push(Due {
            at,
            seq: self.seq,
            action,
        });
    }

    /// A random instant in `[from, from + span)`.
    fn within(&mut self, from: DateTime<Utc>, span: Duration) -> DateTime<Utc> {
        let secs = span.num_seconds().max(1);
        from + Duration::seconds(self.rng.random_range(0..secs))
    }

    fn event(
        &mut self,
        name: &str,
        customer: &str,
        at: DateTime<Utc>,
        properties: Value,
    ) -> pb::Event {
        self.events += 1;
        pb::Event {
            message_id: format!("demo-sim-{}", self.events),
            name: name.into(),
            customer_id: customer.into(),
            timestamp: Some(chrono_to_timestamp(at)),
            properties: Some(json_to_struct(&properties)),
            context: [("source".to_owned(), "demo-simulation".to_owned())].into(),
            ..Default::default()
        }
    }

    /// Orders `basket` at `at`, unless an order is already coming.
    fn order_at(&mut self, customer: &str, basket: usize, at: DateTime<Utc>) {
        if self.ordering.insert(customer.to_owned()) {
            self.schedule(
                at,
                Action::Order {
                    customer: customer.to_owned(),
                    basket,
                },
            );
        }
    }

    fn basket_of(&mut self, agent: usize) -> usize {
        let baskets = &self.agents[agent].baskets;
        baskets[self.rng.random_range(0..baskets.len())]
    }

    /// Carts changed and customers signed up in `(from, to]`.
    async fn spontaneous(
        &mut self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        events: &mut Vec<pb::Event>,
    ) -> anyhow::Result<()> {
        let hours = (to - from).num_seconds() as f64 / 3600.0;
        let weight = hour_weight(to.hour()) * hours / 24.0;
        let span = to - from;
        // New customers: profile first (with contacts and opt-ins), then `signed_up`.
        let expected = SIGNUPS_PER_DAY * weight;
        let mut signups = expected.floor() as u64;
        if self.rng.random::<f64>() < expected.fract() {
            signups += 1;
        }
        for _ in 0..signups {
            let n = self.agents.len() - self.population.customers.len() + 1;
            let id = format!("new-{n:04}");
            let like = self.rng.random_range(0..self.population.customers.len());
            let country = if self.rng.random::<f64>() < 0.9 {
                "United Kingdom"
            } else {
                "France"
            };
            register(&self.clients, self.options.seed, &id, country).await?;
            let at = self.within(from, span);
            let event = self.event(
                "signed_up",
                &id,
                at,
                json!({ "method": "email", "source": "ads" }),
            );
            events.push(event);
            self.agents.push(Agent {
                id,
                baskets: self.population.customers[like].baskets.clone(),
                cart_rate: NEW_CUSTOMER_CART_RATE,
                signed_up: Some(at),
            });
            self.day.signups += 1;
        }
        // Carts: at most one a week per customer.
        for index in 0..self.agents.len() {
            let agent = &self.agents[index];
            let rate = match agent.signed_up {
                Some(at) if to - at > Duration::days(14) => 0.0,
                Some(at) if to - at < Duration::hours(2) => 0.0,
                _ => agent.cart_rate,
            };
            if rate == 0.0 || self.rng.random::<f64>() >= rate * weight {
                continue;
            }
            let id = agent.id.clone();
            if self
                .last_cart
                .get(&id)
                .is_some_and(|last| to - *last < Duration::days(7))
                || self.ordering.contains(&id)
            {
                continue;
            }
            let basket = self.basket_of(index);
            let at = self.within(from, span);
            let population = self.population;
            let b = &population.baskets[basket];
            let properties = json!({
                "cart_id": format!("cart-{}-{}", id, at.timestamp()),
                "items": b.items(),
                "value": b.revenue,
                "currency": "GBP",
            });
            let event = self.event("cart_updated", &id, at, properties);
            events.push(event);
            self.last_cart.insert(id.clone(), at);
            self.carts.insert(id.clone(), basket);
            self.day.carts += 1;
            if self.rng.random::<f64>() < NATURAL_CHECKOUT {
                let when = self.within(at + Duration::hours(2), Duration::hours(46));
                self.order_at(&id, basket, when);
            }
        }
        Ok(())
    }

    /// The actions due by `to`, as events.
    fn due(&mut self, to: DateTime<Utc>, events: &mut Vec<pb::Event>) {
        while self.agenda.peek().is_some_and(|d| d.at <= to) {
            let Some(due) = self.agenda.pop() else {
                break;
            };
            match due.action {
                Action::Open(message) => {
                    let customer = message.customer_id.clone().unwrap_or_default();
                    let event =
                        self.event("message_opened", &customer, due.at, message.properties());
                    events.push(event);
                    self.day.opens += 1;
                }
                Action::Click(message) => {
                    let customer = message.customer_id.clone().unwrap_or_default();
                    let mut properties = message.properties();
                    properties["url"] = json!("https://shop.example/");
                    let event = self.event("message_clicked", &customer, due.at, properties);
                    events.push(event);
                    self.day.clicks += 1;
                }
                Action::View { customer, basket } => {
                    let population = self.population;
                    let lines = &population.baskets[basket].lines;
                    let line = lines[self.rng.random_range(0..lines.len())].clone();
                    let properties = json!({ "product_id": line.product_id, "name": line.name, "price": line.price });
                    let event = self.event("product_viewed", &customer, due.at, properties);
                    events.push(event);
                    self.day.views += 1;
                }
                Action::Order { customer, basket } => {
                    self.ordering.remove(&customer);
                    self.carts.remove(&customer);
                    let population = self.population;
                    let b = &population.baskets[basket];
                    let revenue = b.revenue;
                    let properties = json!({
                        "order_id": format!("S{}", self.events + 1),
                        "revenue": revenue,
                        "currency": "GBP",
                        "items": b.items(),
                    });
                    let event = self.event("order_completed", &customer, due.at, properties);
                    events.push(event);
                    self.day.orders += 1;
                    self.day.revenue += revenue;
                }
            }
        }
    }

    /// Decides what the customer does with a message delivery just sent.
    fn react(&mut self, message: SentMessage) {
        let Some(customer) = message.customer_id.clone() else {
            return;
        };
        let channel = message.channel_name();
        *self.day.sent.entry(channel).or_default() += 1;
        let Some(agent) = self.agents.iter().position(|a| a.id == customer) else {
            return;
        };
        let sent = message.sent_at.unwrap_or_else(|| self.now());
        let reaction = reaction(&message.template, channel);
        let basket = match self.carts.get(&customer) {
            Some(basket) => *basket,
            None => self.basket_of(agent),
        };
        let clicked = self.rng.random::<f64>() < reaction.click;
        let opened = clicked || self.rng.random::<f64>() < reaction.open;
        if clicked {
            let at = self.within(sent + Duration::minutes(2), Duration::hours(4));
            self.schedule(at, Action::Click(message.clone()));
            if self.rng.random::<f64>() < reaction.order_if_clicked {
                let when = self.within(at + Duration::minutes(5), Duration::hours(3));
                self.order_at(&customer, basket, when);
            }
        } else {
            if opened {
                let at = self.within(sent + Duration::minutes(5), Duration::hours(12));
                self.schedule(at, Action::Open(message.clone()));
            }
            if self.rng.random::<f64>() < reaction.order_otherwise {
                let when = self.within(sent + Duration::minutes(30), Duration::hours(20));
                self.order_at(&customer, basket, when);
            }
        }
        if reaction.view > 0.0 && (clicked || self.rng.random::<f64>() < reaction.view) {
            let at = self.within(sent + Duration::hours(2), Duration::hours(58));
            self.schedule(at, Action::View { customer, basket });
        }
    }

    /// Runs the simulated days, printing one line per day.
    pub async fn run(&mut self) -> anyhow::Result<()> {
        let step = Duration::minutes(i64::from(self.options.step_minutes.max(1)));
        let start = self.now();
        let end = start + Duration::days(i64::from(self.options.days));
        println!(
            "\nSimulating {} days, {} to {}, in steps of {} min (seed {}) …",
            self.options.days,
            start.format("%Y-%m-%d"),
            (end - Duration::seconds(1)).format("%Y-%m-%d"),
            self.options.step_minutes,
            self.options.seed
        );
        println!(
            "  {:<10}  {:>5}  {:>8}  {:<40}  {:>6}  {:>5}  {:>6}  {:>9}  {:>6}",
            "day",
            "carts",
            "sign-ups",
            "messages sent",
            "clicks",
            "views",
            "orders",
            "journeys",
            "took"
        );
        let mut watermark = start;
        let mut day_started = Instant::now();
        let mut day = start.date_naive();
        while self.now() < end {
            let from = self.now();
            let to = (from + step).min(end);
            self.clock.set(to);
            let mut events = Vec::new();
            self.spontaneous(from, to, &mut events).await?;
            self.due(to, &mut events);
            events.sort_by_key(|e| e.timestamp.map(|t| (t.seconds, t.nanos)));
            let ids: Vec<String> = events.iter().map(|e| e.message_id.clone()).collect();
            for chunk in events.chunks(1000) {
                let response = self
                    .clients
                    .events
                    .clone()
                    .track_batch(pb::TrackBatchRequest {
                        events: chunk.to_vec(),
                    })
                    .await
                    .context("Events.TrackBatch")?
                    .into_inner();
                if let Some(error) = response.rejected.first() {
                    anyhow::bail!("an event was refused: {}: {}", error.field, error.reason);
                }
            }
            self.wait_for_activity(&ids).await?;
            self.settle(to).await?;
            self.wait_for_delivery(StdDuration::from_secs(5)).await?;
            for message in self.sent_since(watermark).await? {
                if self.seen.insert(message.id.clone()) {
                    self.react(message);
                }
            }
            watermark = to;
            if to.date_naive() != day || to >= end {
                let running = self.running_journeys().await?;
                println!(
                    "  {:<10}  {:>5}  {:>8}  {:<40}  {:>6}  {:>5}  {:>6}  {:>9}  {:>5.1}s",
                    day.format("%Y-%m-%d").to_string(),
                    self.day.carts,
                    self.day.signups,
                    self.day.sent_line(),
                    self.day.clicks,
                    self.day.views,
                    self.day.orders,
                    running,
                    day_started.elapsed().as_secs_f64()
                );
                let finished = std::mem::take(&mut self.day);
                self.total.add(&finished);
                day = to.date_naive();
                day_started = Instant::now();
            }
        }
        // What is still in flight: the last sends, their outcomes back in campaigns.
        self.wait_for_delivery(StdDuration::from_secs(30)).await?;
        for message in self.sent_since(watermark).await? {
            if self.seen.insert(message.id.clone()) {
                self.react(message);
            }
        }
        let tail = std::mem::take(&mut self.day);
        self.total.add(&tail);
        self.wait_for_outcomes().await?;
        let t = &self.total;
        println!(
            "  in all: {} carts, {} sign-ups, {} messages sent, {} opens, {} clicks, {} product views, {} orders (£{:.0})",
            t.carts,
            t.signups,
            t.sent_line(),
            t.opens,
            t.clicks,
            t.views,
            t.orders,
            t.revenue
        );
        Ok(())
    }

    /// Waits until the campaigns service has kept the step's events (its consumer records
    /// every event a flow reacts to); at most 20 s.
    async fn wait_for_activity(&self, ids: &[String]) -> anyhow::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + StdDuration::from_secs(20);
        loop {
            let seen: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM campaigns.activity WHERE workspace_id = $1 AND event_id = ANY($2)",
            )
            .bind(&self.workspace)
            .bind(ids)
            .fetch_one(&self.pool)
            .await?;
            if seen as usize >= ids.len() {
                // The consumer starts journeys right after keeping the events.
                tokio::time::sleep(StdDuration::from_millis(15)).await;
                return Ok(());
            }
            if Instant::now() > deadline {
                eprintln!(
                    "  (campaigns had kept {seen} of the step's {} events after 20 s; moving on)",
                    ids.len()
                );
                return Ok(());
            }
            tokio::time::sleep(StdDuration::from_millis(10)).await;
        }
    }

    /// Waits until nothing is due in campaigns at `now`: journeys, scheduled flows,
    /// broadcasts and their recipients, the send outbox (the tests' `settle()`); at most 60 s.
    async fn settle(&self, now: DateTime<Utc>) -> anyhow::Result<()> {
        let deadline = Instant::now() + StdDuration::from_secs(60);
        loop {
            let due: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM campaigns.journeys WHERE workspace_id = $2 AND status = 1 AND next_wake_at <= $1) \
                 + (SELECT count(*) FROM campaigns.flows WHERE workspace_id = $2 AND status = 1 AND next_run_at <= $1) \
                 + (SELECT count(*) FROM campaigns.broadcast_recipients WHERE workspace_id = $2 AND state = 0 AND due_at <= $1) \
                 + (SELECT count(*) FROM campaigns.broadcasts WHERE workspace_id = $2 AND status IN (1, 2) AND next_run_at <= $1) \
                 + (SELECT count(*) FROM campaigns.outbox)",
            )
            .bind(now)
            .bind(&self.workspace)
            .fetch_one(&self.pool)
            .await?;
            if due == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                eprintln!("  ({due} campaign items still due after 60 s; moving on)");
                return Ok(());
            }
            tokio::time::sleep(StdDuration::from_millis(10)).await;
        }
    }

    /// Waits until delivery has an outcome for every send request campaigns queued.
    async fn wait_for_delivery(&self, limit: StdDuration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let behind: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM campaigns.sends WHERE workspace_id = $1) \
                 - (SELECT count(*) FROM delivery.messages WHERE workspace_id = $1 AND status IN (2, 3, 4, 5) \
                    AND (flow <> '' OR broadcast <> ''))",
            )
            .bind(&self.workspace)
            .fetch_one(&self.pool)
            .await?;
            if behind <= 0 || Instant::now() > deadline {
                return Ok(());
            }
            tokio::time::sleep(StdDuration::from_millis(10)).await;
        }
    }

    /// Waits until campaigns knows the outcome of every message (delivery's `message_sent`
    /// and `message_failed` events travel back through the event stream); at most 60 s.
    async fn wait_for_outcomes(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + StdDuration::from_secs(60);
        loop {
            let behind: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM delivery.messages WHERE workspace_id = $1 AND status IN (2, 3, 4, 5) \
                    AND (flow <> '' OR broadcast <> '')) \
                 - (SELECT count(*) FROM campaigns.messages WHERE workspace_id = $1 AND status IS NOT NULL)",
            )
            .bind(&self.workspace)
            .fetch_one(&self.pool)
            .await?;
            if behind <= 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                eprintln!("  (campaigns still misses the outcome of {behind} messages after 60 s)");
                return Ok(());
            }
            tokio::time::sleep(StdDuration::from_millis(50)).await;
        }
    }

    async fn sent_since(&self, since: DateTime<Utc>) -> anyhow::Result<Vec<SentMessage>> {
        let rows = sqlx::query_as::<_, SentMessage>(
            "SELECT id::text AS id, customer_id, channel, flow, flow_version, step, variant, broadcast, journey_id, \
                    template, topic, sent_at \
             FROM delivery.messages WHERE workspace_id = $1 AND status IN (2, 3) \
             AND (flow <> '' OR broadcast <> '') AND sent_at >= $2 ORDER BY sent_at, id",
        )
        .bind(&self.workspace)
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    async fn running_journeys(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM campaigns.journeys WHERE workspace_id = $1 AND status IN (1, 2)",
        )
        .bind(&self.workspace)
        .fetch_one(&self.pool)
        .await?)
    }
}

// --- Reports ---------------------------------------------------------------------------

/// The study's figures a table is compared with.
struct StudyStep {
    ctr: f64,
    conversion_rate: f64,
}

/// Tables 09 and 10: abandoned-cart push steps, 1–20 May 2025 (percent).
const STUDY_ACTIVE_USERS: [StudyStep; 3] = [
    StudyStep {
        ctr: 5.94,
        conversion_rate: 13.34,
    },
    StudyStep {
        ctr: 5.97,
        conversion_rate: 12.66,
    },
    StudyStep {
        ctr: 5.98,
        conversion_rate: 7.88,
    },
];
const STUDY_ONBOARDING: [StudyStep; 3] = [
    StudyStep {
        ctr: 7.59,
        conversion_rate: 4.11,
    },
    StudyStep {
        ctr: 6.78,
        conversion_rate: 2.86,
    },
    StudyStep {
        ctr: 3.22,
        conversion_rate: 0.88,
    },
];

fn pct(num: u64, den: u64) -> String {
    if den == 0 {
        return "-".into();
    }
    format!("{:.2}%", 100.0 * num as f64 / den as f64)
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The top-level step a step id belongs to: `steps[5]` for `steps[5].branch.else[0]`; a
/// named step is its own.
fn top_level(step_id: &str) -> &str {
    if step_id.starts_with("steps[")
        && let Some(end) = step_id.find(']')
    {
        return &step_id[..=end];
    }
    step_id
}

fn channel_list(channels: &[i32]) -> String {
    channels
        .iter()
        .map(|c| {
            relance_delivery::channels::channel_name(
                pb::Channel::try_from(*c).unwrap_or(pb::Channel::Unspecified),
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The study's table of a flow's sends: one row per send (the sends of one branch
/// together, e.g. PN3 on WhatsApp or push), with impressions, clicks, CTR, conversions
/// and conversions per impression, each variant below its step, the study's figures beside.
fn print_steps_table(report: &pb::CampaignReport, study: &[StudyStep]) {
    let mut groups: Vec<(String, Vec<&pb::StepReport>)> = Vec::new();
    for step in &report.steps {
        if step.kind != pb::FlowStepKind::Send as i32 {
            continue;
        }
        let key = top_level(&step.step_id).to_owned();
        match groups.last_mut() {
            Some((last, steps)) if *last == key => steps.push(step),
            _ => groups.push((key, vec![step])),
        }
    }
    println!(
        "  {:<5} {:<30} {:>11} {:>7} {:>7} {:>11} {:>10}   {:>9} {:>11}",
        "step",
        "channel · template",
        "impressions",
        "clicks",
        "CTR",
        "conversions",
        "conv. rate",
        "study CTR",
        "study conv."
    );
    let row = |label: &str, what: &str, s: &pb::ReportStats, study: Option<&StudyStep>| {
        let (ctr, conv) = match study {
            Some(st) => (
                format!("{:.2}%", st.ctr),
                format!("{:.2}%", st.conversion_rate),
            ),
            None => (String::new(), String::new()),
        };
        println!(
            "  {:<5} {:<30} {:>11} {:>7} {:>7} {:>11} {:>10}   {:>9} {:>11}",
            label,
            what,
            thousands(s.sends),
            thousands(s.clicks),
            pct(s.clicks, s.sends),
            thousands(s.conversions),
            pct(s.conversions, s.sends),
            ctr,
            conv
        );
    };
    for (index, (_, steps)) in groups.iter().enumerate() {
        let push = steps
            .iter()
            .any(|s| s.channels.contains(&(pb::Channel::Push as i32)));
        let label = format!("{}{}", if push { "PN" } else { "NL" }, index + 1);
        let mut total = pb::ReportStats::default();
        for step in steps {
            let s = step.stats.unwrap_or_default();
            total.sends += s.sends;
            total.clicks += s.clicks;
            total.conversions += s.conversions;
        }
        let what = if steps.len() == 1 {
            let step = steps[0];
            let template = if step.variants.is_empty() {
                step.summary
                    .rsplit(' ')
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            } else {
                "A/B".to_owned()
            };
            format!("{} · {template}", channel_list(&step.channels))
        } else {
            "(branch, both paths)".to_owned()
        };
        row(&label, &what, &total, study.get(index));
        if steps.len() > 1 {
            for step in steps {
                let what = format!(
                    "  {} · {}",
                    channel_list(&step.channels),
                    step.summary.rsplit(' ').next().unwrap_or_default()
                );
                row("", &what, &step.stats.unwrap_or_default(), None);
            }
        }
        for step in steps {
            for variant in &step.variants {
                let what = format!("  {} · {}", variant.name, variant.template);
                row("", &what, &variant.stats.unwrap_or_default(), None);
            }
        }
    }
}

/// The study's Tables 11–13 (conversion rate, open + click rate), percent.
fn study_flow(name: &str) -> Option<(&'static str, f64, f64)> {
    match name {
        "onboarding" => Some(("onboarding", 2.17, 4.04)),
        "abandoned-cart" => Some(("active users", 3.60, 2.16)),
        "reactivation" => Some(("reactivation", 1.09, 0.59)),
        _ => None,
    }
}

/// Table 14: share of automated conversions by channel, January–April 2025 (mean of the
/// four months), percent.
fn study_channel(channel: &str) -> Option<f64> {
    match channel {
        "push" => Some((96.38 + 97.12 + 96.10 + 95.08) / 4.0),
        "email" => Some((2.88 + 2.36 + 3.29 + 3.94) / 4.0),
        "whatsapp" => Some((0.73 + 0.52 + 0.61 + 0.97) / 4.0),
        "in_app" => Some((0.015 + 0.005 + 0.007 + 0.003) / 4.0),
        _ => None,
    }
}

/// Prints the reports: the abandoned-cart and onboarding steps as the study's Tables 09–10,
/// every flow's and the broadcast's totals as Tables 11–13, the conversions by channel as
/// Table 14, then the full reports of the abandoned-cart flow and of the broadcast.
pub async fn print_reports(clients: &Clients, flows: &[String]) -> anyhow::Result<()> {
    let mut campaigns = clients.campaigns.clone();
    let mut reports = Vec::new();
    for name in flows {
        let report = campaigns
            .get_flow_report(pb::GetFlowReportRequest {
                name: name.clone(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("Campaigns.GetFlowReport {name}"))?
            .into_inner();
        reports.push(report);
    }
    let broadcast = campaigns
        .get_broadcast_report(pb::GetBroadcastReportRequest {
            name: BROADCAST.into(),
            ..Default::default()
        })
        .await
        .context("Campaigns.GetBroadcastReport")?
        .into_inner();
    let find = |name: &str| reports.iter().find(|r| r.name == name);

    println!("\n==== Campaign reports, in the shape of the Jumia Algeria study's tables ====");
    println!(
        "(conv. rate in the step tables = conversions / impressions, as the study counts them;"
    );
    println!(
        " a conversion is an order within the flow's window after a send, credited to the last send)"
    );
    if let Some(report) = find("abandoned-cart") {
        println!("\nAbandoned cart (the study's active-users flow, Table 10):");
        print_steps_table(report, &STUDY_ACTIVE_USERS);
    }
    if let Some(report) = find("onboarding") {
        println!("\nOnboarding (Table 09):");
        print_steps_table(report, &STUDY_ONBOARDING);
    }

    println!(
        "\nFlows and the broadcast (Tables 11–13; conv. rate = converted customers / customers who entered):"
    );
    println!(
        "  {:<20} {:>8} {:>11} {:>11} {:>11} {:>10} {:>11} {:>12}   {:>11} {:>11}",
        "campaign",
        "entered",
        "impressions",
        "open+click",
        "conversions",
        "conv. rate",
        "revenue £",
        "vs control",
        "study conv.",
        "study o+c"
    );
    let mut all: Vec<&pb::CampaignReport> = reports.iter().collect();
    all.push(&broadcast);
    let mut by_channel: BTreeMap<i32, (u64, f64)> = BTreeMap::new();
    for report in &all {
        let t = report.total.unwrap_or_default();
        let uplift = report
            .uplift
            .as_ref()
            .map(|u| {
                format!(
                    "{:+.1} pts{}",
                    u.absolute * 100.0,
                    if u.significant { "*" } else { "" }
                )
            })
            .unwrap_or_else(|| "-".into());
        let (study_conv, study_oc) = match study_flow(&report.name) {
            Some((_, c, o)) => (format!("{c:.2}%"), format!("{o:.2}%")),
            None => (String::new(), String::new()),
        };
        println!(
            "  {:<20} {:>8} {:>11} {:>11} {:>11} {:>10} {:>11} {:>12}   {:>11} {:>11}",
            report.name,
            thousands(t.entered),
            thousands(t.sends),
            pct(t.opens, t.sends),
            thousands(t.conversions),
            pct(t.conversions, t.entered),
            thousands(t.revenue.round() as u64),
            uplift,
            study_conv,
            study_oc
        );
        for share in &report.channel_shares {
            let entry = by_channel.entry(share.channel).or_default();
            entry.0 += share.conversions;
            entry.1 += share.revenue;
        }
    }
    println!(
        "  (open+click: messages opened or clicked / impressions; vs control: treated minus held-out"
    );
    println!("   conversion rate, * when significant at 5 %)");

    println!("\nConversions by channel, every flow and the broadcast together (Table 14):");
    println!(
        "  {:<9} {:>11} {:>8} {:>11}   {:>22}",
        "channel", "conversions", "share", "revenue £", "study (Jan–Apr 2025)"
    );
    let total: u64 = by_channel.values().map(|(c, _)| c).sum();
    let mut rows: Vec<(i32, (u64, f64))> = by_channel.into_iter().collect();
    rows.sort_by_key(|row| std::cmp::Reverse(row.1.0));
    for channel in [
        pb::Channel::Push,
        pb::Channel::Email,
        pb::Channel::Whatsapp,
        pb::Channel::InApp,
    ] {
        if !rows.iter().any(|(c, _)| *c == channel as i32) {
            rows.push((channel as i32, (0, 0.0)));
        }
    }
    for (channel, (conversions, revenue)) in rows {
        let name = relance_delivery::channels::channel_name(
            pb::Channel::try_from(channel).unwrap_or(pb::Channel::Unspecified),
        );
        let study = study_channel(name)
            .map(|s| format!("{s:.2}%"))
            .unwrap_or_default();
        println!(
            "  {:<9} {:>11} {:>8} {:>11}   {:>22}",
            name,
            thousands(conversions),
            pct(conversions, total),
            thousands(revenue.round() as u64),
            study
        );
    }

    if let Some(report) = find("abandoned-cart") {
        println!("\n---- relance report flow abandoned-cart ----");
        print!("{}", report::render_table(report));
    }
    println!("\n---- relance report broadcast {BROADCAST} ----");
    print!("{}", report::render_table(&broadcast));
    Ok(())
}

/// Archives the demo's flows once the simulation is over, so that no journey of this
/// workspace wakes up when another demo's clock passes its wake time (the reports stay).
pub async fn archive(clients: &Clients, flows: &[String]) -> anyhow::Result<()> {
    let mut campaigns = clients.campaigns.clone();
    for name in flows {
        campaigns
            .archive_flow(pb::ArchiveFlowRequest { name: name.clone() })
            .await
            .with_context(|| format!("Campaigns.ArchiveFlow {name}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broadcast_is_renamed_and_moved_keeping_its_local_time() {
        let yaml = "kind: Broadcast\nname: ramadan-2026-iftar\nschedule: { local_time: \"2026-02-19 21:00\" }\ncontrol_group: 10%\n";
        let date = chrono::NaiveDate::from_ymd_opt(2011, 12, 8).expect("date");
        let moved = move_broadcast(yaml, date);
        assert_eq!(
            moved,
            "kind: Broadcast\nname: ramadan-iftar-demo\nschedule: { local_time: \"2011-12-08 21:00\" }\ncontrol_group: 10%\n"
        );
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../examples/flows/ramadan-broadcast.yaml"),
        )
        .expect("ramadan-broadcast.yaml");
        let def = relance_campaigns::domain::parse::parse_broadcast(&move_broadcast(&text, date))
            .expect("the moved document parses");
        assert_eq!(def.name, BROADCAST);
        assert_eq!(
            def.schedule,
            relance_campaigns::domain::model::BroadcastSchedule::LocalTime {
                date,
                hour: 21,
                minute: 0,
                skip_if_past: false
            }
        );
    }

    #[test]
    fn hour_weights_average_one_and_steps_group_by_top_level() {
        let mean: f64 = (0..24).map(hour_weight).sum::<f64>() / 24.0;
        assert!((mean - 1.0).abs() < 1e-9);
        assert_eq!(top_level("steps[5].branch.else[0]"), "steps[5]");
        assert_eq!(top_level("welcome"), "welcome");
    }

    #[test]
    fn contacts_depend_only_on_the_seed_and_the_customer() {
        let a = contact_of(7, "17850", "France");
        let b = contact_of(7, "17850", "France");
        assert_eq!(
            (a.first_name, a.push, a.email_opt_in),
            (b.first_name, b.push, b.email_opt_in)
        );
        assert_eq!((a.timezone, a.locale), ("Europe/Paris", "fr"));
        let pushable = (0..10_000)
            .filter(|i| contact_of(7, &i.to_string(), "United Kingdom").push)
            .count();
        assert!((8_200..8_800).contains(&pushable), "{pushable}");
    }
}
