//! `tern produce`: PUT one message per stdin line (or `--count` generated ones) and
//! report every ACK, in input order. Exit 0 only if every ACK was `ok`.

use crate::{dur, ClientArgs};
use bytes::Bytes;
use clap::Args;
use std::io::{BufRead, Write};
use std::process::ExitCode;
use tern_client::{guid_hex, Client, OutMessage, PutHandle, Status};
use tokio::sync::mpsc;

/// Lines read ahead of the producer (bounds memory when stdin is fast).
const LINE_QUEUE_LEN: usize = 1024;

#[derive(Args, Debug)]
pub struct ProduceArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Queue to PUT to (created with defaults if the server auto-creates queues).
    #[arg(long)]
    pub queue: String,
    /// Generate this many messages instead of reading stdin.
    #[arg(long)]
    pub count: Option<u64>,
    /// Size in bytes of generated messages (with --count).
    #[arg(long, default_value_t = 100, requires = "count")]
    pub size: usize,
    /// Partitioning key (messages with one key keep their order).
    #[arg(long)]
    pub key: Option<String>,
    /// Time to live of each message (e.g. 30s, 5m).
    #[arg(long, value_parser = dur::parse_ms)]
    pub ttl: Option<u64>,
    /// Most PUTs awaiting their ACK at once.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_in_flight: u64,
}

/// Counts of ACK outcomes.
#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
}

pub async fn run(args: ProduceArgs) -> anyhow::Result<ExitCode> {
    let client = Client::connect(args.client.config()).await?;
    let producer = client.producer(&args.queue).await?;
    let (tx, rx) = mpsc::channel::<(u64, PutHandle)>(args.max_in_flight as usize);
    let reporter = tokio::spawn(report(rx, args.client.json));
    let key = args.key.clone().map(Bytes::from);
    let make = |payload: Bytes| OutMessage {
        payload,
        key: key.clone(),
        ttl_ms: args.ttl,
    };
    let mut payloads = payload_source(&args);
    let mut seq = 0u64;
    // A send error (back-pressure beyond the PUT timeout) stops the input, but every
    // PUT already sent is still reported.
    let mut send_error = None;
    while let Some(payload) = payloads.recv().await {
        let payload = match payload {
            Ok(p) => p,
            Err(e) => {
                send_error = Some(anyhow::anyhow!("reading stdin: {e}"));
                break;
            }
        };
        seq += 1;
        match producer.send(make(payload)).await {
            Ok(handle) => {
                if tx.send((seq, handle)).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                send_error = Some(anyhow::anyhow!("message {seq} was not sent: {e}"));
                break;
            }
        }
    }
    drop(tx);
    let tally = reporter.await?;
    summarize(&args, &tally, send_error)
}

fn summarize(
    args: &ProduceArgs,
    tally: &Tally,
    send_error: Option<anyhow::Error>,
) -> anyhow::Result<ExitCode> {
    let total = tally.ok + tally.failed;
    if !args.client.json {
        println!(
            "produced {total} messages to {} (ok {}, failed {})",
            args.queue, tally.ok, tally.failed
        );
    }
    if let Some(e) = &send_error {
        eprintln!("tern: error: {}", crate::error_text(e));
    }
    if tally.failed > 0 || send_error.is_some() {
        eprintln!(
            "tern: {} of {total} PUTs were not acknowledged ok",
            tally.failed
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Payloads in input order: stdin lines, or `--count` generated ones.
fn payload_source(args: &ProduceArgs) -> mpsc::Receiver<std::io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel(LINE_QUEUE_LEN);
    match args.count {
        Some(n) => {
            let size = args.size;
            tokio::spawn(async move {
                for seq in 1..=n {
                    if tx.send(Ok(generated(seq, size))).await.is_err() {
                        break;
                    }
                }
            });
        }
        // stdin is read on a blocking thread; lines are bytes (any encoding) without
        // the line ending.
        None => {
            std::thread::spawn(move || {
                let mut input = std::io::stdin().lock();
                loop {
                    let mut line = Vec::new();
                    let item = match input.read_until(b'\n', &mut line) {
                        Ok(0) => break,
                        Ok(_) => Ok(Bytes::from(strip_line_ending(line))),
                        Err(e) => Err(e),
                    };
                    let stop = item.is_err();
                    if tx.blocking_send(item).is_err() || stop {
                        break;
                    }
                }
            });
        }
    }
    rx
}

fn strip_line_ending(mut line: Vec<u8>) -> Vec<u8> {
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
    line
}

/// A generated payload of exactly `size` bytes that names its sequence number, so
/// messages can be told apart when consumed ("42 xxxx...").
fn generated(seq: u64, size: usize) -> Bytes {
    let mut p = format!("{seq} ").into_bytes();
    p.resize(size, b'x');
    Bytes::from(p)
}

/// Awaits ACKs in input order and prints them.
async fn report(mut rx: mpsc::Receiver<(u64, PutHandle)>, json: bool) -> Tally {
    let mut tally = Tally::default();
    // Buffered output, flushed whenever the next ACK is not ready yet.
    let mut out = std::io::BufWriter::new(std::io::stdout());
    while let Some((seq, handle)) = rx.recv().await {
        if !handle.is_ready_hint() {
            let _ = out.flush();
        }
        let r = handle.await;
        if r.status == Status::Ok {
            tally.ok += 1;
        } else {
            tally.failed += 1;
        }
        if json {
            let mut line = serde_json::json!({ "seq": seq, "guid": guid_hex(&r.guid), "status": r.status.name() });
            if r.status == Status::Ok && !r.durable {
                // A memory (transient) queue: stored by the cluster, not fsynced.
                line["durable"] = false.into();
            }
            let _ = writeln!(out, "{line}");
        } else if r.status != Status::Ok {
            let _ = writeln!(out, "message {seq} ({}): {}", guid_hex(&r.guid), r.status);
        }
    }
    let _ = out.flush();
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_payloads_have_the_size_and_name_their_seq() {
        assert_eq!(&generated(42, 8)[..], b"42 xxxxx");
        assert_eq!(generated(7, 100).len(), 100);
        assert_eq!(&generated(12345, 3)[..], b"123");
        assert!(generated(1, 0).is_empty());
    }

    #[test]
    fn line_endings_are_stripped_once() {
        assert_eq!(strip_line_ending(b"a\r\n".to_vec()), b"a");
        assert_eq!(strip_line_ending(b"a\n".to_vec()), b"a");
        assert_eq!(strip_line_ending(b"a".to_vec()), b"a");
        assert_eq!(strip_line_ending(b"a\n\n".to_vec()), b"a\n");
        assert_eq!(strip_line_ending(vec![0xff, b'\n']), vec![0xff]);
    }
}
