//! `relance import online-retail FILE`: the UCI Online Retail data set into a running
//! Relance — customers with their country, one `order_completed` per invoice with its lines
//! as items, cancellations as `order_refunded`, guest invoices as anonymous events.
//!
//! Message ids are derived from invoice numbers, so importing the same file twice stores
//! nothing twice.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, NaiveDateTime, TimeZone as _, Utc};
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use relance_proto::convert::{chrono_to_timestamp, json_to_struct};
use relance_proto::v1 as pb;
use relance_retail_data::{Invoice, Reader, Stats};

use crate::client::{Clients, Target};

#[derive(Debug, clap::Subcommand)]
pub enum ImportCommand {
    /// The UCI "Online Retail" CSV (gzipped or plain).
    OnlineRetail {
        /// The file, e.g. examples/data/online-retail-sample.csv.gz.
        file: PathBuf,
        #[command(flatten)]
        target: Target,
        /// Events per Import chunk.
        #[arg(long, default_value_t = 500)]
        chunk: usize,
        /// No progress bar (for logs and scripts).
        #[arg(long)]
        quiet: bool,
    },
}

/// What an import did.
#[derive(Debug, Default)]
pub struct ImportSummary {
    pub stats: Stats,
    pub events_sent: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub errors: Vec<pb::ItemError>,
    pub invoices_without_products: u64,
    pub customers_upserted: u64,
    /// Catalog items upserted; `None` when the recommendations service is not running.
    pub items_upserted: Option<u64>,
    /// When the newest order of the file was placed.
    pub latest_order: Option<DateTime<Utc>>,
}

pub async fn run(command: ImportCommand) -> anyhow::Result<ExitCode> {
    let ImportCommand::OnlineRetail {
        file,
        target,
        chunk,
        quiet,
    } = command;
    let clients = target.connect().await?;
    let summary = import_online_retail(&clients, &file, chunk, !quiet).await?;
    print_summary(&file, &summary);
    if summary.rejected > 0 {
        return Ok(ExitCode::from(crate::exit::PARTIAL));
    }
    Ok(ExitCode::SUCCESS)
}

/// The shop's invoice times are UK local time.
pub fn to_utc(local: NaiveDateTime) -> DateTime<Utc> {
    match chrono_tz::Europe::London
        .from_local_datetime(&local)
        .earliest()
    {
        Some(time) => time.with_timezone(&Utc),
        None => Utc.from_utc_datetime(&local),
    }
}

/// One invoice as the event it stands for.
pub fn invoice_event(invoice: &Invoice) -> pb::Event {
    let mut items = Vec::with_capacity(invoice.lines.len());
    for line in &invoice.lines {
        items.push(serde_json::json!({
            "product_id": line.stock_code,
            "name": line.description,
            "quantity": line.quantity,
            "price": line.unit_price,
        }));
    }
    let revenue = (invoice.revenue() * 100.0).round() / 100.0;
    let properties = serde_json::json!({
        "order_id": invoice.invoice_no,
        "revenue": revenue,
        "currency": "GBP",
        "country": invoice.country,
        "items": items,
    });
    let (customer_id, anonymous_id) = match &invoice.customer_id {
        Some(id) => (id.clone(), String::new()),
        None => (String::new(), format!("guest-{}", invoice.invoice_no)),
    };
    pb::Event {
        message_id: format!("online-retail:{}", invoice.invoice_no),
        name: if invoice.is_cancellation {
            "order_refunded"
        } else {
            "order_completed"
        }
        .to_owned(),
        customer_id,
        anonymous_id,
        timestamp: Some(chrono_to_timestamp(to_utc(invoice.invoiced_at))),
        properties: Some(json_to_struct(&properties)),
        context: [("source".to_owned(), "online-retail-import".to_owned())].into(),
    }
}

/// What the reading thread hands back: its stats, each customer's country, events sent,
/// invoices without products, and the catalog.
type ReadOutcome = (Stats, HashMap<String, String>, u64, u64, Catalog);

/// The products seen in the file: the latest description and price of each stock code, and
/// when it was first sold.
#[derive(Debug, Default)]
pub struct Catalog {
    pub items: HashMap<String, (String, f64, NaiveDateTime)>,
    pub latest_order: Option<NaiveDateTime>,
}

impl Catalog {
    fn add(&mut self, invoice: &Invoice) {
        if invoice.is_cancellation {
            return;
        }
        self.latest_order = self.latest_order.max(Some(invoice.invoiced_at));
        for line in &invoice.lines {
            let entry = self.items.entry(line.stock_code.clone()).or_insert((
                String::new(),
                line.unit_price,
                invoice.invoiced_at,
            ));
            if !line.description.is_empty() {
                entry.0 = line.description.clone();
            }
            entry.1 = line.unit_price;
            entry.2 = entry.2.min(invoice.invoiced_at);
        }
    }
}

/// Categories of the Online Retail products, which the file does not have: the first rule
/// whose keyword appears in the description (upper case, as written) wins.
const CATEGORY_RULES: &[(&[&str], &str, &str)] = &[
    (
        &["CHRISTMAS", "XMAS", "ADVENT", "SANTA", "REINDEER"],
        "Seasonal",
        "Christmas",
    ),
    (&["EASTER", "HALLOWEEN"], "Seasonal", "Other holidays"),
    (
        &[
            "CANDLE",
            "T-LIGHT",
            "TEALIGHT",
            "LANTERN",
            "NIGHT LIGHT",
            "LAMP",
        ],
        "Home",
        "Candles & lights",
    ),
    (&["CLOCK"], "Home", "Clocks"),
    (&["FRAME"], "Home", "Frames"),
    (
        &["CUSHION", "THROW", "BLANKET", "QUILT"],
        "Home",
        "Textiles",
    ),
    (&["SIGN", "PLAQUE"], "Home", "Signs"),
    (
        &[
            "MUG", "CUP", "SAUCER", "PLATE", "BOWL", "JUG", "GLASS", "TEAPOT", "NAPKIN", "CUTLERY",
        ],
        "Kitchen",
        "Tableware",
    ),
    (
        &[
            "CAKE",
            "BAKING",
            "CUPCAKE",
            "BAKE",
            "APRON",
            "OVEN GLOVE",
            "TEA TOWEL",
        ],
        "Kitchen",
        "Baking",
    ),
    (
        &["JAR", "TIN", "LUNCH BOX", "STORAGE", "BOTTLE"],
        "Kitchen",
        "Storage",
    ),
    (&["BAG", "TOTE", "PURSE"], "Bags", "Bags"),
    (
        &[
            "CARD", "WRAP", "PAPER", "NOTEBOOK", "PENCIL", "PEN", "STICKER", "RIBBON", "ENVELOPE",
            "TAPE",
        ],
        "Stationery & gifts",
        "Stationery",
    ),
    (
        &["NECKLACE", "BRACELET", "EARRINGS", "RING", "JEWEL", "HAIR"],
        "Fashion",
        "Jewellery & accessories",
    ),
    (
        &["UMBRELLA", "SCARF", "GLOVES", "HAT"],
        "Fashion",
        "Clothing accessories",
    ),
    (
        &[
            "TOY",
            "GAME",
            "DOLL",
            "PUZZLE",
            "SPACEBOY",
            "DOMINOES",
            "SKITTLES",
            "BALLOON",
            "PLAYHOUSE",
        ],
        "Kids",
        "Toys & games",
    ),
    (
        &["GARDEN", "PLANT", "FLOWER POT", "WATERING", "BIRD", "SEED"],
        "Garden",
        "Garden",
    ),
    (&["SOAP", "BATH", "TOWEL", "MIRROR"], "Home", "Bathroom"),
    (
        &[
            "HEART",
            "DECORATION",
            "HANGING",
            "ORNAMENT",
            "BUNTING",
            "GARLAND",
            "WREATH",
            "VINTAGE",
        ],
        "Home",
        "Decorations",
    ),
    (
        &[
            "BOX", "BASKET", "HOOK", "DOORSTOP", "DRAWER", "CABINET", "SHELF",
        ],
        "Home",
        "Storage & furniture",
    ),
];

/// The category path an Online Retail description gets (see [`CATEGORY_RULES`]): a
/// keyword matches whole words, plurals included (`CARDS`, `BOXES`), so that `DESIGN` is
/// not a sign nor `TINY` a tin.
pub fn online_retail_category(description: &str) -> Vec<String> {
    let upper = description.to_uppercase();
    let words: Vec<&str> = upper
        .split(|c: char| !(c.is_alphanumeric() || c == '-'))
        .filter(|w| !w.is_empty())
        .collect();
    let matches = |keyword: &str| {
        let parts: Vec<&str> = keyword.split(' ').collect();
        words.windows(parts.len()).any(|window| {
            window
                .iter()
                .zip(&parts)
                .enumerate()
                .all(|(index, (word, part))| {
                    // Only the last word of a phrase may carry a plural ending.
                    let last = index + 1 == parts.len();
                    *word == *part
                        || (last
                            && (word.strip_suffix('S') == Some(part)
                                || word.strip_suffix("ES") == Some(part)))
                })
        })
    };
    for (keywords, top, leaf) in CATEGORY_RULES {
        if keywords.iter().any(|k| matches(k)) {
            return vec![(*top).to_owned(), (*leaf).to_owned()];
        }
    }
    vec!["Other".to_owned(), "Other".to_owned()]
}

/// Upserts the catalog through the recommendations service; `None` when it is not running
/// (the import of events and profiles does not need it).
async fn upsert_catalog(clients: &Clients, catalog: Catalog) -> anyhow::Result<Option<u64>> {
    let mut items: Vec<pb::CatalogItem> = Vec::with_capacity(catalog.items.len());
    for (id, (description, price, first_sold)) in catalog.items {
        items.push(pb::CatalogItem {
            title: title_case(&description),
            category_path: online_retail_category(&description),
            price,
            currency: "GBP".into(),
            in_stock: true,
            created_at: Some(chrono_to_timestamp(to_utc(first_sold))),
            id,
            ..Default::default()
        });
    }
    items.sort_by(|a, b| a.id.cmp(&b.id));
    let mut upserted = 0u64;
    for chunk in items.chunks(1000) {
        let mut client = clients.recommendations.clone();
        let request = pb::UpsertItemsRequest {
            items: chunk.to_vec(),
        };
        match client.upsert_items(request).await {
            Ok(response) => upserted += response.into_inner().accepted as u64,
            Err(status) if status.code() == tonic::Code::Unimplemented => return Ok(None),
            Err(status) => return Err(status).context("Recommendations.UpsertItems"),
        }
    }
    Ok(Some(upserted))
}

/// `WHITE HANGING HEART` → `White Hanging Heart`.
fn title_case(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut start = true;
    for c in text.chars() {
        if start {
            out.extend(c.to_uppercase());
        } else {
            out.extend(c.to_lowercase());
        }
        start = c.is_whitespace() || c == '-';
    }
    out
}

/// Streams the file into Events.Import, then upserts the customers.
pub async fn import_online_retail(
    clients: &Clients,
    file: &Path,
    chunk: usize,
    progress: bool,
) -> anyhow::Result<ImportSummary> {
    let opened =
        std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let size = opened.metadata().map(|m| m.len()).unwrap_or(0);
    // The bar follows the bytes read from the file (compressed or not): a true fraction of
    // the work, with an estimate of the time left.
    let bar = if progress {
        ProgressBar::new(size)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {percent:>3}% eta {eta}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut reader = Reader::from_reader(bar.wrap_read(opened))
        .with_context(|| format!("reading {}", file.display()))?;

    // Parsing is CPU work: a blocking thread reads, the async side sends.
    let (chunks_tx, chunks_rx) = tokio::sync::mpsc::channel::<pb::ImportRequest>(8);
    let chunk = chunk.clamp(1, 1000);
    let reading = tokio::task::spawn_blocking(move || -> anyhow::Result<ReadOutcome> {
        let mut countries: HashMap<String, String> = HashMap::new();
        let mut catalog = Catalog::default();
        let mut batch = Vec::with_capacity(chunk);
        let mut sent = 0u64;
        let mut without_products = 0u64;
        for invoice in &mut reader {
            let invoice = invoice?;
            if let Some(customer) = &invoice.customer_id {
                countries
                    .entry(customer.clone())
                    .or_insert_with(|| invoice.country.clone());
            }
            if invoice.lines.is_empty() {
                // Postage-only invoices, fees, adjustments: not an order of products.
                without_products += 1;
                continue;
            }
            catalog.add(&invoice);
            batch.push(invoice_event(&invoice));
            if batch.len() == chunk {
                sent += batch.len() as u64;
                let events = std::mem::replace(&mut batch, Vec::with_capacity(chunk));
                if chunks_tx
                    .blocking_send(pb::ImportRequest { events })
                    .is_err()
                {
                    anyhow::bail!("the import stream closed early");
                }
            }
        }
        if !batch.is_empty() {
            sent += batch.len() as u64;
            let _ = chunks_tx.blocking_send(pb::ImportRequest { events: batch });
        }
        Ok((
            reader.into_stats(),
            countries,
            sent,
            without_products,
            catalog,
        ))
    });

    let counted_bar = bar.clone();
    let mut streamed = 0u64;
    let requests = tokio_stream::wrappers::ReceiverStream::new(chunks_rx).inspect(move |chunk| {
        streamed += chunk.events.len() as u64;
        counted_bar.set_message(format!("{streamed} events sent"));
    });
    let mut events = clients.events.clone();
    let response = events
        .import(requests)
        .await
        .context("Events.Import")?
        .into_inner();
    let (stats, countries, events_sent, invoices_without_products, catalog) = reading.await??;

    let latest_order = catalog.latest_order.map(to_utc);
    bar.set_message(format!("upserting {} catalog items", catalog.items.len()));
    let items_upserted = upsert_catalog(clients, catalog).await?;

    bar.set_message(format!("upserting {} customers", countries.len()));
    let mut upserts = futures::stream::iter(countries.into_iter().map(|(customer_id, country)| {
        let mut profiles = clients.profiles.clone();
        async move {
            let request = pb::UpsertProfileRequest {
                customer: Some(pb::CustomerRef {
                    id: Some(pb::customer_ref::Id::CustomerId(customer_id)),
                }),
                attributes: Some(json_to_struct(&serde_json::json!({ "country": country }))),
                ..Default::default()
            };
            profiles.upsert(request).await
        }
    }))
    .buffer_unordered(8);
    let mut customers_upserted = 0u64;
    while let Some(result) = upserts.next().await {
        result.context("Profiles.Upsert")?;
        customers_upserted += 1;
    }
    bar.finish_and_clear();
    Ok(ImportSummary {
        stats,
        events_sent,
        accepted: response.accepted,
        duplicates: response.duplicates,
        rejected: response.rejected,
        errors: response.errors,
        invoices_without_products,
        customers_upserted,
        items_upserted,
        latest_order,
    })
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (index, c) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn print_summary(file: &Path, summary: &ImportSummary) {
    let s = &summary.stats;
    let mut lines: BTreeMap<usize, (String, String)> = BTreeMap::new();
    let mut row = |label: &str, value: String| {
        lines.insert(lines.len(), (label.to_owned(), value));
    };
    row("rows read", thousands(s.rows));
    row(
        "invoices",
        format!(
            "{} ({} cancellations, {} guest checkouts)",
            thousands(s.invoices),
            thousands(s.cancellations),
            thousands(s.guest_invoices)
        ),
    );
    row(
        "customers",
        format!(
            "{} (profiles upserted: {})",
            thousands(s.customers),
            thousands(summary.customers_upserted)
        ),
    );
    row(
        "catalog items",
        match summary.items_upserted {
            Some(items) => thousands(items),
            None => "not upserted (the recommendations service is not running)".into(),
        },
    );
    row("events sent", thousands(summary.events_sent));
    row("events accepted", thousands(summary.accepted));
    row("events already stored", thousands(summary.duplicates));
    row("events rejected", thousands(summary.rejected));
    row(
        "invoices skipped",
        format!(
            "{} (no product lines: postage, fees, adjustments)",
            thousands(summary.invoices_without_products)
        ),
    );
    row("rows skipped", thousands(s.skipped_total()));
    for (reason, count) in &s.skipped {
        row(&format!("  {reason}"), thousands(*count));
    }
    println!("Online Retail import of {}", file.display());
    for (label, value) in lines.values() {
        println!("  {label:<24} {value}");
    }
    for error in summary.errors.iter().take(10) {
        println!(
            "  refused event {}: {}: {}",
            error.index, error.field, error.reason
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relance_retail_data::Line;

    fn invoice(no: &str, customer: Option<&str>) -> Invoice {
        Invoice {
            invoice_no: no.into(),
            customer_id: customer.map(Into::into),
            country: "France".into(),
            invoiced_at: NaiveDateTime::parse_from_str("2011-07-01 10:00:00", "%Y-%m-%d %H:%M:%S")
                .expect("date"),
            is_cancellation: no.starts_with('C'),
            lines: vec![Line {
                stock_code: "22423".into(),
                description: "CAKESTAND".into(),
                quantity: 2,
                unit_price: 12.75,
            }],
        }
    }

    #[test]
    fn online_retail_products_get_a_category() {
        assert_eq!(
            online_retail_category("WHITE HANGING HEART T-LIGHT HOLDER"),
            vec!["Home", "Candles & lights"]
        );
        assert_eq!(
            online_retail_category("SET OF 3 CAKE TINS PANTRY DESIGN"),
            vec!["Kitchen", "Baking"]
        );
        assert_eq!(
            online_retail_category("PAPER CHAIN KIT 50'S CHRISTMAS"),
            vec!["Seasonal", "Christmas"]
        );
        assert_eq!(online_retail_category("ZEBRA"), vec!["Other", "Other"]);
        assert_eq!(
            online_retail_category("SET OF 6 T-LIGHTS SNOWFLAKES"),
            vec!["Home", "Candles & lights"]
        );
        assert_eq!(
            online_retail_category("LUNCH BOXES RED RETROSPOT"),
            vec!["Kitchen", "Storage"]
        );
        assert_eq!(title_case("WHITE T-LIGHT"), "White T-Light");
    }

    #[test]
    fn an_invoice_becomes_one_order_event_in_utc() {
        let event = invoice_event(&invoice("536365", Some("17850")));
        assert_eq!(event.name, "order_completed");
        assert_eq!(event.message_id, "online-retail:536365");
        assert_eq!(event.customer_id, "17850");
        // 10:00 British Summer Time is 09:00 UTC.
        assert_eq!(
            event.timestamp.expect("ts").seconds,
            Utc.with_ymd_and_hms(2011, 7, 1, 9, 0, 0)
                .single()
                .expect("d")
                .timestamp()
        );
        let properties = relance_proto::convert::struct_to_json(&event.properties.expect("props"));
        assert_eq!(properties["revenue"], serde_json::json!(25.5));
        assert_eq!(properties["items"][0]["product_id"], "22423");
    }

    #[test]
    fn cancellations_are_refunds_and_guests_are_anonymous() {
        let event = invoice_event(&invoice("C536379", None));
        assert_eq!(event.name, "order_refunded");
        assert_eq!(event.customer_id, "");
        assert_eq!(event.anonymous_id, "guest-C536379");
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(541_909), "541,909");
        assert_eq!(thousands(12), "12");
    }
}
