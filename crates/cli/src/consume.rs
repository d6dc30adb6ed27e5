//! `tern consume`: print each message, then CONFIRM it (so a crash between the two
//! means redelivery, never loss).

use crate::{dur, ClientArgs};
use base64::Engine;
use clap::Args;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;
use tern_client::{guid_hex, Client, ConsumerOptions};

#[derive(Args, Debug)]
pub struct ConsumeArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub queue: String,
    /// Exit after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit when no message came for this long (e.g. 2s).
    #[arg(long, value_parser = dur::parse_ms)]
    pub idle_timeout: Option<u64>,
    /// Most messages held unconfirmed at once (flow control).
    #[arg(long, default_value_t = 1024)]
    pub max_unconfirmed: u32,
    /// Subscription name (fanout queues).
    #[arg(long, default_value = "")]
    pub subscription: String,
    /// Print without confirming (messages are redelivered later).
    #[arg(long)]
    pub no_confirm: bool,
}

pub async fn run(args: ConsumeArgs) -> anyhow::Result<ExitCode> {
    if args.max_unconfirmed == 0 {
        anyhow::bail!("--max-unconfirmed must be at least 1");
    }
    let client = Client::connect(args.client.config()).await?;
    let options = ConsumerOptions {
        subscription: args.subscription.clone(),
        max_unconfirmed_msgs: args.max_unconfirmed,
        ..ConsumerOptions::default()
    };
    let mut consumer = client.consumer(&args.queue, options).await?;
    let mut received = 0u64;
    let mut out = std::io::stdout().lock();
    while args.count.is_none_or(|n| received < n) {
        let next = match args.idle_timeout {
            Some(ms) => consumer.next_timeout(Duration::from_millis(ms)).await,
            None => consumer.next().await,
        };
        let Some(d) = next else { break };
        received += 1;
        if args.client.json {
            let mut v = serde_json::json!({ "guid": guid_hex(&d.guid), "partition": d.partition, "attempt": d.attempt });
            match std::str::from_utf8(&d.payload) {
                Ok(text) => v["payload"] = text.into(),
                Err(_) => {
                    v["payload_b64"] = base64::engine::general_purpose::STANDARD
                        .encode(&d.payload)
                        .into()
                }
            }
            writeln!(out, "{v}")?;
        } else {
            writeln!(out, "{}", String::from_utf8_lossy(&d.payload))?;
        }
        // Printed first, confirmed second: at-least-once from the reader's point of view too.
        out.flush()?;
        if !args.no_confirm {
            consumer.confirm(&d).await?;
        }
    }
    let confirmed = consumer.flush_confirms().await;
    if !args.client.json {
        eprintln!(
            "consumed {received} messages from {} ({confirmed} confirmed)",
            args.queue
        );
    }
    Ok(ExitCode::SUCCESS)
}
