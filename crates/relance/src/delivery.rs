//! `relance delivery dlq list|replay`: the send requests in the dead-letter queue.

use std::process::ExitCode;

use relance_kit::Settings;
use relance_kit::bus::Bus;

#[derive(Debug, clap::Subcommand)]
pub enum DeliveryCommand {
    /// The dead-letter queue of send requests.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// Show the requests waiting in the dead-letter queue (they stay there).
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print each request's raw JSON envelope too.
        #[arg(long)]
        raw: bool,
    },
    /// Move requests back to the delivery queue; their idempotency keys keep a message that
    /// was sent from going out twice.
    Replay {
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

pub async fn run(settings: Settings, command: DeliveryCommand) -> anyhow::Result<ExitCode> {
    let bus = Bus::connect(&settings).await?;
    match command {
        DeliveryCommand::Dlq(DlqCommand::List { limit, raw }) => {
            let letters = relance_delivery::dlq::list(&bus, limit).await?;
            if letters.is_empty() {
                println!("the dead-letter queue is empty");
            }
            for letter in letters {
                println!(
                    "{}  attempt {}  {}  {}",
                    letter.message_id, letter.attempt, letter.routing_key, letter.summary
                );
                if raw {
                    println!("  {}", String::from_utf8_lossy(&letter.body));
                }
            }
        }
        DeliveryCommand::Dlq(DlqCommand::Replay { limit }) => {
            let replayed = relance_delivery::dlq::replay(&bus, limit).await?;
            println!("replayed {replayed} request(s)");
        }
    }
    Ok(ExitCode::SUCCESS)
}
