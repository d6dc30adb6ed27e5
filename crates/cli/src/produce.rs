//! `tern produce`: PUT one message per stdin line (or `--count` generated ones) and
//! report every ACK, in input order. Exit 0 only if every ACK was `ok`.

use crate::{dur, ClientArgs};
use bytes::Bytes;
use clap::Args;
use std::io::{BufRead, Write};
use std::process::ExitCode;
use tern_client::{guid_hex, Client, OutMessage, PutHandle, Status};
use tokio::sync::mpsc;

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
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Partitioning key (messages with one key keep their order).
    #[arg(long)]
    pub key: Option<String>,
    /// Time to live of each message (e.g. 30s, 5m).
    #[arg(long, value_parser = dur::parse_ms)]
    pub ttl: Option<u64>,
    /// Most PUTs awaiting their ACK at once.
    #[arg(long, default_value_t = 10_000)]
    pub max_in_flight: usize,
}

pub async fn run(args: ProduceArgs) -> anyhow::Result<ExitCode> {
    if args.max_in_flight == 0 {
        anyhow::bail!("--max-in-flight must be at least 1");
    }
    let client = Client::connect(args.client.config()).await?;
    let producer = client.producer(&args.queue).await?;
    let (tx, rx) = mpsc::channel::<(u64, PutHandle)>(args.max_in_flight);
    let json = args.client.json;
    let reporter = tokio::spawn(report(rx, json));
    let key = args.key.clone().map(Bytes::from);
    let make = |payload: Bytes| OutMessage {
        payload,
        key: key.clone(),
        ttl_ms: args.ttl,
    };
    let mut seq = 0u64;
    match args.count {
        Some(n) => {
            let payload = Bytes::from(vec![b'x'; args.size]);
            for _ in 0..n {
                seq += 1;
                let handle = producer.send(make(payload.clone())).await?;
                if tx.send((seq, handle)).await.is_err() {
                    break;
                }
            }
        }
        None => {
            // stdin is read on a blocking thread, one line at a time, with a bounded channel.
            let (ltx, mut lrx) = mpsc::channel::<std::io::Result<String>>(1024);
            std::thread::spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    if ltx.blocking_send(line).is_err() {
                        break;
                    }
                }
            });
            while let Some(line) = lrx.recv().await {
                let line = line?;
                seq += 1;
                let handle = producer.send(make(Bytes::from(line))).await?;
                if tx.send((seq, handle)).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let (ok, failed) = reporter.await?;
    if !json {
        println!(
            "produced {} messages to {} (ok {ok}, failed {failed})",
            ok + failed,
            args.queue
        );
    }
    if failed > 0 {
        eprintln!(
            "tern: {failed} of {} PUTs were not acknowledged ok",
            ok + failed
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Awaits ACKs in input order and prints them. Returns (ok, failed).
async fn report(mut rx: mpsc::Receiver<(u64, PutHandle)>, json: bool) -> (u64, u64) {
    let (mut ok, mut failed) = (0, 0);
    // Buffered output, flushed when no ACK is ready (stdout's lock is not held across awaits).
    let mut out = std::io::BufWriter::new(std::io::stdout());
    while let Some((seq, handle)) = rx.recv().await {
        if !handle.is_ready_hint() {
            let _ = out.flush();
        }
        let r = handle.await;
        if r.status == Status::Ok {
            ok += 1;
        } else {
            failed += 1;
        }
        if json {
            let line = serde_json::json!({ "seq": seq, "guid": guid_hex(&r.guid), "status": r.status.name() });
            let _ = writeln!(out, "{line}");
        } else if r.status != Status::Ok {
            let _ = writeln!(out, "message {seq} ({}): {}", guid_hex(&r.guid), r.status);
        }
    }
    let _ = out.flush();
    (ok, failed)
}
