//! `tern bench`: producers and consumers in one process, each on its own connection.
//!
//! Each payload starts with a 24-byte header: send time (µs since the Unix epoch), the
//! run id, and a message id. Producers record ACK latency (send → ACK); consumers
//! record end-to-end latency (send → PUSH received) and which ids they saw, so the run
//! also reports lost (ACKed ok, never consumed) and duplicated messages.

use crate::{dur, ClientArgs};
use bytes::{BufMut, Bytes, BytesMut};
use clap::Args;
use hdrhistogram::Histogram;
use std::collections::HashSet;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tern_client::{Client, ConsumerOptions, OutMessage, PutHandle, Status};
use tokio::sync::mpsc;

const HEADER_BYTES: usize = 24;
/// Consumers stop after this long without a message once producers are done.
const DRAIN_IDLE: Duration = Duration::from_secs(10);

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long, default_value = "bench")]
    pub queue: String,
    #[arg(long, default_value_t = 4)]
    pub producers: u32,
    #[arg(long, default_value_t = 4)]
    pub consumers: u32,
    /// Payload size in bytes (at least 24: the timing header).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Total messages over all producers.
    #[arg(long, conflicts_with = "duration")]
    pub count: Option<u64>,
    /// Produce for this long instead of a count (e.g. 30s).
    #[arg(long, value_parser = dur::parse_ms)]
    pub duration: Option<u64>,
    /// Total target rate in messages/s (unlimited if unset).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Most PUTs awaiting their ACK per producer.
    #[arg(long, default_value_t = 2_000)]
    pub max_in_flight: usize,
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 1 h, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).expect("histogram"))
}

struct ProducerResult {
    ok_ids: Vec<u64>,
    failed: u64,
    ack_latency: Histogram<u64>,
}

struct ConsumerResult {
    ids: Vec<u64>,
    e2e_latency: Histogram<u64>,
    foreign: u64,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.producers == 0 || args.max_in_flight == 0 {
        anyhow::bail!("--producers and --max-in-flight must be at least 1");
    }
    if args.count.is_none() && args.duration.is_none() {
        anyhow::bail!("give --count N or --duration DUR");
    }
    let size = args.size.max(HEADER_BYTES);
    let run_id: u64 = rand_u64();
    let produced = Arc::new(AtomicU64::new(0));
    let consumed = Arc::new(AtomicU64::new(0));
    let producers_done = Arc::new(AtomicBool::new(false));

    let mut consumer_tasks = Vec::new();
    for _ in 0..args.consumers {
        let client = Client::connect(args.client.config()).await?;
        let options = ConsumerOptions {
            max_unconfirmed_msgs: 10_000,
            ..ConsumerOptions::default()
        };
        let consumer = client.consumer(&args.queue, options).await?;
        consumer_tasks.push(tokio::spawn(consume(
            consumer,
            run_id,
            consumed.clone(),
            producers_done.clone(),
        )));
    }

    let progress = progress_bar(args.count);
    let started = Instant::now();
    let mut producer_tasks = Vec::new();
    for p in 0..args.producers {
        let client = Client::connect(args.client.config()).await?;
        let producer = client.producer(&args.queue).await?;
        let plan = Plan {
            index: p,
            count: args.count.map(|c| {
                c / u64::from(args.producers)
                    + u64::from(u64::from(p) < c % u64::from(args.producers))
            }),
            until: args.duration.map(|ms| started + Duration::from_millis(ms)),
            rate: args
                .rate
                .map(|r| (r as f64 / f64::from(args.producers)).max(1.0)),
            size,
            run_id,
            max_in_flight: args.max_in_flight,
        };
        producer_tasks.push(tokio::spawn(produce(producer, plan, produced.clone())));
    }
    let ticker = progress.clone().map(|bar| {
        let produced = produced.clone();
        tokio::spawn(async move {
            loop {
                bar.set_position(produced.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });

    let mut ok_ids = HashSet::new();
    let mut failed = 0;
    let mut ack_latency = histogram();
    for t in producer_tasks {
        let r = t.await??;
        ok_ids.extend(r.ok_ids);
        failed += r.failed;
        ack_latency.add(&r.ack_latency)?;
    }
    let produce_secs = started.elapsed().as_secs_f64();
    producers_done.store(true, Ordering::Relaxed);
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }

    let mut seen = HashSet::new();
    let mut received = 0u64;
    let mut foreign = 0;
    let mut e2e = histogram();
    for t in consumer_tasks {
        let r = t.await?;
        received += r.ids.len() as u64;
        seen.extend(r.ids);
        foreign += r.foreign;
        e2e.add(&r.e2e_latency)?;
    }
    let total_secs = started.elapsed().as_secs_f64();
    let ok = ok_ids.len() as u64;
    let lost = if args.consumers > 0 {
        ok_ids.difference(&seen).count() as u64
    } else {
        0
    };
    let duplicated = received - seen.len() as u64;
    let report = Report {
        args: &args,
        size,
        ok,
        failed,
        produce_secs,
        total_secs,
        received,
        lost,
        duplicated,
        foreign,
        ack_latency: &ack_latency,
        e2e: &e2e,
    };
    report.print();
    Ok(if failed > 0 || lost > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn rand_u64() -> u64 {
    let g = tern_client::new_guid();
    u64::from_be_bytes([g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]])
}

fn progress_bar(count: Option<u64>) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = match count {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} produced {pos}/{len} {per_sec} [{elapsed_precise}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(bar)
}

struct Plan {
    index: u32,
    count: Option<u64>,
    until: Option<Instant>,
    rate: Option<f64>,
    size: usize,
    run_id: u64,
    max_in_flight: usize,
}

async fn produce(
    producer: tern_client::Producer,
    plan: Plan,
    produced: Arc<AtomicU64>,
) -> anyhow::Result<ProducerResult> {
    // The channel's capacity bounds the PUTs in flight; the collector awaits ACKs in order.
    let (tx, mut rx) = mpsc::channel::<(u64, Instant, PutHandle)>(plan.max_in_flight);
    let collector = tokio::spawn(async move {
        let mut r = ProducerResult {
            ok_ids: Vec::new(),
            failed: 0,
            ack_latency: histogram(),
        };
        while let Some((id, sent, handle)) = rx.recv().await {
            let result = handle.await;
            let _ = r
                .ack_latency
                .record(sent.elapsed().as_micros().max(1) as u64);
            if result.status == Status::Ok {
                r.ok_ids.push(id);
            } else {
                r.failed += 1;
            }
        }
        r
    });
    let filler = vec![b'.'; plan.size - HEADER_BYTES];
    let started = Instant::now();
    let mut n = 0u64;
    loop {
        if plan.count.is_some_and(|c| n >= c) || plan.until.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        if let Some(rate) = plan.rate {
            let due = started + Duration::from_secs_f64(n as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let id = (u64::from(plan.index) << 40) | n;
        let mut payload = BytesMut::with_capacity(plan.size);
        payload.put_u64(now_micros());
        payload.put_u64(plan.run_id);
        payload.put_u64(id);
        payload.put_slice(&filler);
        let sent = Instant::now();
        let handle = producer.send(OutMessage::new(Bytes::from(payload))).await?;
        if tx.send((id, sent, handle)).await.is_err() {
            break;
        }
        n += 1;
        produced.fetch_add(1, Ordering::Relaxed);
    }
    drop(tx);
    Ok(collector.await?)
}

async fn consume(
    mut consumer: tern_client::Consumer,
    run_id: u64,
    consumed: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
) -> ConsumerResult {
    let mut r = ConsumerResult {
        ids: Vec::new(),
        e2e_latency: histogram(),
        foreign: 0,
    };
    let mut idle_since = Instant::now();
    loop {
        match consumer.next_timeout(Duration::from_millis(200)).await {
            Some(d) => {
                idle_since = Instant::now();
                let _ = consumer.confirm(&d).await;
                let p = &d.payload;
                if p.len() < HEADER_BYTES || p[8..16] != run_id.to_be_bytes() {
                    r.foreign += 1; // left over from an earlier run: confirmed, not counted
                    continue;
                }
                let sent = u64::from_be_bytes(p[0..8].try_into().unwrap_or_default());
                let id = u64::from_be_bytes(p[16..24].try_into().unwrap_or_default());
                let _ = r
                    .e2e_latency
                    .record(now_micros().saturating_sub(sent).max(1));
                r.ids.push(id);
                consumed.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                if done.load(Ordering::Relaxed)
                    && idle_since.elapsed() > DRAIN_IDLE.min(Duration::from_secs(2))
                {
                    break;
                }
                if idle_since.elapsed() > DRAIN_IDLE * 6 {
                    break; // bounded: never wait forever
                }
            }
        }
    }
    consumer.flush_confirms().await;
    r
}

struct Report<'a> {
    args: &'a BenchArgs,
    size: usize,
    ok: u64,
    failed: u64,
    produce_secs: f64,
    total_secs: f64,
    received: u64,
    lost: u64,
    duplicated: u64,
    foreign: u64,
    ack_latency: &'a Histogram<u64>,
    e2e: &'a Histogram<u64>,
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

impl Report<'_> {
    fn print(&self) {
        let msgs_per_s = self.ok as f64 / self.produce_secs.max(1e-9);
        let mib_per_s = msgs_per_s * self.size as f64 / (1024.0 * 1024.0);
        let lat = |h: &Histogram<u64>| serde_json::json!({ "p50_ms": ms(h, 0.5), "p99_ms": ms(h, 0.99), "p999_ms": ms(h, 0.999), "max_ms": h.max() as f64 / 1000.0 });
        if self.args.client.json {
            let v = serde_json::json!({
                "producers": self.args.producers, "consumers": self.args.consumers, "size": self.size,
                "acked_ok": self.ok, "failed": self.failed, "seconds": self.produce_secs,
                "msgs_per_s": msgs_per_s, "mib_per_s": mib_per_s,
                "ack_latency": lat(self.ack_latency),
                "consumed": self.received, "lost": self.lost, "duplicated": self.duplicated, "foreign": self.foreign,
                "e2e_latency": lat(self.e2e), "total_seconds": self.total_secs,
            });
            println!("{v}");
            return;
        }
        println!(
            "produced {} ok, {} failed in {:.2} s: {:.0} msgs/s, {:.1} MiB/s ({} producers, {} B)",
            self.ok,
            self.failed,
            self.produce_secs,
            msgs_per_s,
            mib_per_s,
            self.args.producers,
            self.size
        );
        let h = self.ack_latency;
        println!(
            "ack latency: p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, max {:.2} ms",
            ms(h, 0.5),
            ms(h, 0.99),
            ms(h, 0.999),
            h.max() as f64 / 1000.0
        );
        if self.args.consumers > 0 {
            let h = self.e2e;
            println!(
                "consumed {} ({} consumers): lost {}, duplicated {}, from earlier runs {}",
                self.received, self.args.consumers, self.lost, self.duplicated, self.foreign
            );
            println!(
                "end-to-end latency: p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, max {:.2} ms",
                ms(h, 0.5),
                ms(h, 0.99),
                ms(h, 0.999),
                h.max() as f64 / 1000.0
            );
        }
    }
}
