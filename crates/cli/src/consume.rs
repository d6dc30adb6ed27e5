//! `tern consume`: print each message, then CONFIRM it (so a crash between the two
//! means redelivery, never loss). Before exiting, wait (bounded) for the CONFIRMs'
//! answers so an exit after `--count N` really settled N messages.

use crate::{dur, ClientArgs};
use base64::Engine;
use clap::Args;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;
use tern_client::{guid_hex, Client, ConsumerOptions, Delivery};

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
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_unconfirmed: u32,
    /// Subscription name (fanout queues).
    #[arg(long, default_value = "")]
    pub subscription: String,
    /// Print without confirming (the messages are redelivered later).
    #[arg(long, conflicts_with = "nack")]
    pub no_confirm: bool,
    /// Print, then give each message back (NACK) for redelivery; counts as a failed
    /// delivery attempt (see `queue create --max-delivery-attempts`).
    #[arg(long)]
    pub nack: bool,
}

pub async fn run(args: ConsumeArgs) -> anyhow::Result<ExitCode> {
    let client = Client::connect(args.client.config()).await?;
    let options = ConsumerOptions {
        subscription: args.subscription.clone(),
        max_unconfirmed_msgs: args.max_unconfirmed,
        ..ConsumerOptions::default()
    };
    let mut consumer = client.consumer(&args.queue, options).await?;
    let mut received = 0u64;
    let mut out = std::io::stdout().lock();
    let stop = stop_signal();
    tokio::pin!(stop);
    while args.count.is_none_or(|n| received < n) {
        let next = async {
            match args.idle_timeout {
                Some(ms) => consumer.next_timeout(Duration::from_millis(ms)).await,
                None => consumer.next().await,
            }
        };
        let next = tokio::select! {
            d = next => d,
            _ = &mut stop => None,
        };
        let Some(d) = next else { break };
        received += 1;
        if args.client.json {
            writeln!(out, "{}", json_line(&d))?;
        } else {
            out.write_all(&d.payload)?;
            out.write_all(b"\n")?;
            if let Some(dl) = &d.dead_letter {
                eprintln!(
                    "  (dead letter from {}{}: {} after {} attempts)",
                    dl.source_queue,
                    if dl.subscription.is_empty() {
                        String::new()
                    } else {
                        format!("/{}", dl.subscription)
                    },
                    dl.reason.name(),
                    dl.attempts
                );
            }
        }
        // Printed first, confirmed second: at-least-once from the reader's view too.
        out.flush()?;
        if args.nack {
            consumer.nack(&d, 0).await?;
        } else if !args.no_confirm {
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

/// `{"guid":…,"payload":…,"partition":P,"attempt":A}`, or `payload_b64` when the payload
/// is not UTF-8.
fn json_line(d: &Delivery) -> serde_json::Value {
    let mut v = serde_json::json!({ "guid": guid_hex(&d.guid) });
    match std::str::from_utf8(&d.payload) {
        Ok(text) => v["payload"] = text.into(),
        Err(_) => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(&d.payload);
            v["payload_b64"] = b64.into();
        }
    }
    v["partition"] = d.partition.into();
    v["attempt"] = d.attempt.into();
    if let Some(dl) = &d.dead_letter {
        v["dead_letter"] = serde_json::json!({
            "queue": dl.source_queue,
            "subscription": dl.subscription,
            "reason": dl.reason.name(),
            "attempts": dl.attempts,
            "original_guid": guid_hex(&dl.original_guid),
        });
    }
    v
}

/// Resolves on SIGINT or SIGTERM: stop taking messages, settle the confirms, exit.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn delivery(payload: &'static [u8]) -> Delivery {
        Delivery {
            guid: [0xab; 16],
            partition: 3,
            attempt: 2,
            payload: Bytes::from_static(payload),
            dead_letter: None,
        }
    }

    #[test]
    fn json_line_text_and_binary() {
        let v = json_line(&delivery(b"hello"));
        assert_eq!(
            v.to_string(),
            format!(
                r#"{{"guid":"{}","payload":"hello","partition":3,"attempt":2}}"#,
                "ab".repeat(16)
            )
        );
        let v = json_line(&delivery(&[0xff, 0x00]));
        assert_eq!(v["payload_b64"], "/wA=");
        assert!(v.get("payload").is_none());
    }
}
