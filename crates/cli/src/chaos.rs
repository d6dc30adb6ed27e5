//! `tern chaos`: a fault-injection run anyone can repeat with one command.
//!
//! Starts a cluster of real `tern server` processes on 127.0.0.1 (this binary, free
//! ports, a scratch directory), runs producers and consumers against it through the
//! client library, injects faults on a schedule drawn from `--seed` (one at a time, so
//! a majority always survives), then heals, drains the queue and checks the history
//! with `tern-checker`. Exits 1 if anything ACKed was lost, anything delivered was
//! never PUT, or a payload changed; 0 otherwise. The history is written as JSON lines.
//!
//! Faults: `kill` (kill -9 a random node, restart it 1–3 s later), `kill-leader`
//! (the same, aimed at a partition leader), `pause` (SIGSTOP for 2–4 s, longer than
//! the election timeout, then SIGCONT), `restart` (SIGTERM: graceful stop, restart).
//! Network partitions need containers: see `crates/cli/tests/docker.rs`.

use crate::dur;
use anyhow::Context;
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tern_checker::{digest, Event, History, Outcome, SeededRng};
use tern_client::{guid_hex, Client, ClientConfig, ConsumerOptions, OutMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const QUEUE: &str = "chaos";
/// How long a node may take to become ready again after a restart.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// After the run: a consumer that sees nothing for this long has drained the queue.
const DRAIN_IDLE: Duration = Duration::from_secs(5);
/// Upper bound of a damaged node's repair before the next fault.
const REPAIR_MAX: Duration = Duration::from_secs(60);
/// Upper bound of the drain phase.
const DRAIN_MAX: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Fault {
    Kill,
    KillLeader,
    Pause,
    Restart,
    /// kill -9, one bit flipped in one of the node's log segments, restart: the node
    /// must find the damage and rebuild that replica from its peers.
    Damage,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::KillLeader => "kill-leader",
            Fault::Pause => "pause",
            Fault::Restart => "restart",
            Fault::Damage => "damage",
        }
    }
}

#[derive(Args, Debug)]
pub struct ChaosArgs {
    /// Nodes in the cluster (3 or more; one fault at a time keeps a majority).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=9))]
    pub nodes: u64,
    /// How long the workload and the faults run (then heal and drain), e.g. 60s, 10m.
    #[arg(long, default_value = "30s", value_parser = dur::parse_ms)]
    pub duration: u64,
    /// Seed of the fault schedule (which fault, which node, when).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Faults to draw from.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "kill,kill-leader,pause,restart,damage"
    )]
    pub faults: Vec<Fault>,
    /// Mean time between faults (each is 50–150% of it).
    #[arg(long, default_value = "4s", value_parser = dur::parse_ms)]
    pub fault_interval: u64,
    #[arg(long, default_value_t = 2)]
    pub producers: u32,
    #[arg(long, default_value_t = 2)]
    pub consumers: u32,
    /// PUTs per second per producer.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rate: u32,
    /// Payload bytes.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(32..=1_048_576))]
    pub size: u32,
    #[arg(long, default_value_t = 3)]
    pub partitions: u16,
    /// Distinct keys (order is checked per consumer and key).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub keys: u32,
    /// Where to write the history (JSON lines). [default: DIR/history.jsonl]
    #[arg(long)]
    pub history: Option<PathBuf>,
    /// Scratch directory for the nodes' data and logs. [default: a new temporary one]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the scratch directory even when the run passes.
    #[arg(long)]
    pub keep: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One `tern server` process of the run.
struct Node {
    id: u64,
    port: u16,
    http_port: u16,
    peer_port: u16,
    dir: PathBuf,
    members: String,
    child: Option<Child>,
}

impl Node {
    fn spawn(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("cannot find the tern binary")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .context("cannot open a node log")?;
        let child = Command::new(exe)
            .arg("server")
            .args(["--node-id", &self.id.to_string()])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--http-listen", &format!("127.0.0.1:{}", self.http_port)])
            .args(["--peer-listen", &format!("127.0.0.1:{}", self.peer_port)])
            .args(["--initial-cluster", &self.members])
            // A chaos run checks the cluster, not the disk reserve of a scratch dir.
            .args(["--min-free-disk-bytes", "0"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start tern server")?;
        self.child = Some(child);
        Ok(())
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &c.id().to_string()])
                .status();
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (bounded) for the graceful stop; SIGKILL if it overruns.
    fn stop(&mut self) -> bool {
        self.signal("TERM");
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.signal("CONT");
        self.kill9();
    }
}

fn free_port() -> anyhow::Result<u16> {
    crate::ports::find_free_port().context("no free port")
}

/// A minimal HTTP GET against a node's admin port (bounded by 2 s).
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((code, body))
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .ok()
        .flatten()
}

async fn wait_ready(node: &Node) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if matches!(http_get(node.http_port, "/ready").await, Some((200, _))) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!(
        "node {} not ready within {} s (log: {})",
        node.id,
        READY_TIMEOUT.as_secs(),
        node.dir.join("server.log").display()
    )
}

type Shared = Arc<Mutex<History>>;

fn record(h: &Shared, e: Event) {
    if let Ok(mut h) = h.lock() {
        h.record(e);
    }
}

pub async fn run(args: ChaosArgs) -> anyhow::Result<ExitCode> {
    if args.faults.is_empty() {
        anyhow::bail!("--faults needs at least one fault");
    }
    let (dir, _tmp) = match &args.dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = std::env::temp_dir().join(format!(
                "tern-chaos-{}-{}",
                std::process::id(),
                args.seed
            ));
            (t.clone(), Some(t))
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut nodes = start_cluster(&dir, args.nodes)?;
    for n in &nodes {
        wait_ready(n).await?;
    }
    let servers: Vec<String> = nodes.iter().map(Node::addr).collect();
    let admin = Client::connect(ClientConfig::new(servers.clone())).await?;
    admin
        .admin(tern_client::admin::AdminRequest::CreateQueue {
            name: QUEUE.into(),
            spec: tern_client::admin::QueueSpec {
                partitions: Some(args.partitions),
                ..Default::default()
            },
        })
        .await
        .context("cannot create the chaos queue")?;
    eprintln!(
        "chaos: {} nodes in {}, {} s, seed {}, faults {:?}",
        args.nodes,
        dir.display(),
        args.duration / 1000,
        args.seed,
        args.faults.iter().map(|f| f.name()).collect::<Vec<_>>()
    );
    let history: Shared = Arc::new(Mutex::new(History::new()));
    let producing = Arc::new(AtomicBool::new(true));
    let draining = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    for c in 0..args.consumers {
        consumers.push(tokio::spawn(consume(
            servers.clone(),
            c,
            history.clone(),
            draining.clone(),
        )));
    }
    let mut producers = Vec::new();
    for p in 0..args.producers {
        producers.push(tokio::spawn(produce(
            servers.clone(),
            p,
            ProduceSpec {
                rate: args.rate,
                size: args.size as usize,
                keys: args.keys,
            },
            history.clone(),
            producing.clone(),
        )));
    }
    let end = Instant::now() + Duration::from_millis(args.duration);
    let fault_counts = inject_faults(&mut nodes, &args, end, &history).await;
    producing.store(false, Ordering::Release);
    // Heal: every node up and running before the drain.
    for n in nodes.iter_mut() {
        n.signal("CONT");
        if n.child.is_none() {
            n.spawn()?;
        }
    }
    for n in &nodes {
        wait_ready(n).await?;
    }
    for p in producers {
        p.await.context("producer task")??;
    }
    draining.store(true, Ordering::Release);
    for c in consumers {
        c.await.context("consumer task")??;
    }
    let report = history
        .lock()
        .map_err(|_| anyhow::anyhow!("history lock"))?
        .check();
    let hist_path = args
        .history
        .clone()
        .unwrap_or_else(|| dir.join("history.jsonl"));
    history
        .lock()
        .map_err(|_| anyhow::anyhow!("history lock"))?
        .write_jsonl(&hist_path)?;
    drop(nodes);
    let passed = report.passed() && report.acked_ok > 0;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["faults_by_kind"] = serde_json::to_value(&fault_counts)?;
        v["passed"] = passed.into();
        v["seed"] = args.seed.into();
        println!("{v}");
    } else {
        print!("{}", report.table());
        for (kind, n) in &fault_counts {
            println!("  {kind:<38} {n:>10}");
        }
        println!(
            "verdict: {} (history: {})",
            if passed { "PASS" } else { "FAIL" },
            hist_path.display()
        );
    }
    if passed && !args.keep && args.dir.is_none() && args.history.is_some() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn start_cluster(dir: &Path, n: u64) -> anyhow::Result<Vec<Node>> {
    let mut ports = Vec::new();
    for _ in 0..n {
        ports.push((free_port()?, free_port()?, free_port()?));
    }
    let members: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, _, peer))| format!("{}=127.0.0.1:{peer}", i + 1))
        .collect();
    let members = members.join(",");
    let mut nodes = Vec::new();
    for (i, (port, http_port, peer_port)) in ports.into_iter().enumerate() {
        let node_dir = dir.join(format!("node{}", i + 1));
        std::fs::create_dir_all(&node_dir)?;
        let mut node = Node {
            id: i as u64 + 1,
            port,
            http_port,
            peer_port,
            dir: node_dir,
            members: members.clone(),
            child: None,
        };
        node.spawn()?;
        nodes.push(node);
    }
    Ok(nodes)
}

/// Runs the fault schedule until `end`; one fault at a time, each healed before the
/// next. Returns how many faults of each kind were injected.
async fn inject_faults(
    nodes: &mut [Node],
    args: &ChaosArgs,
    end: Instant,
    history: &Shared,
) -> Vec<(String, u64)> {
    let mut rng = SeededRng::new(args.seed);
    let mut counts: Vec<(String, u64)> = args
        .faults
        .iter()
        .map(|f| (f.name().to_string(), 0))
        .collect();
    let interval = args.fault_interval.max(100);
    loop {
        let wait = rng.between_ms(interval / 2, interval * 3 / 2);
        if Instant::now() + wait >= end {
            tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
            return counts;
        }
        tokio::time::sleep(wait).await;
        let kind = args.faults[rng.below(args.faults.len() as u64) as usize];
        let target = match kind {
            Fault::KillLeader => leader_of_some_partition(nodes, &mut rng).await,
            _ => None,
        }
        .unwrap_or_else(|| rng.below(nodes.len() as u64) as usize);
        let node = &mut nodes[target];
        record(
            history,
            Event::Fault {
                kind: kind.name().into(),
                node: node.id,
                at_ms: now_ms(),
            },
        );
        eprintln!("chaos: {} node {}", kind.name(), node.id);
        match kind {
            Fault::Kill | Fault::KillLeader => {
                node.kill9();
                tokio::time::sleep(rng.between_ms(1000, 3000)).await;
            }
            Fault::Pause => {
                node.signal("STOP");
                tokio::time::sleep(rng.between_ms(2000, 4000)).await;
                node.signal("CONT");
            }
            Fault::Restart => {
                if !node.stop() {
                    eprintln!("chaos: node {} did not stop cleanly on SIGTERM", node.id);
                }
            }
            Fault::Damage => {
                node.kill9();
                match damage_a_segment(&node.dir, &mut rng) {
                    Ok(Some(path)) => eprintln!("chaos: flipped a bit in {}", path.display()),
                    Ok(None) => eprintln!("chaos: node {} has no segment to damage", node.id),
                    Err(e) => eprintln!("chaos: cannot damage node {}: {e}", node.id),
                }
            }
        }
        if node.child.is_none() {
            if let Err(e) = node.spawn() {
                eprintln!("chaos: cannot restart node {}: {e:#}", node.id);
            }
        }
        if let Err(e) = wait_ready(node).await {
            eprintln!("chaos: {e:#}");
        }
        if kind == Fault::Damage {
            // Damage stays within a minority: the next fault waits for the repair.
            if let Err(e) = wait_repaired(node).await {
                eprintln!("chaos: {e:#}");
            }
        }
        if let Some(c) = counts.iter_mut().find(|(k, _)| k == kind.name()) {
            c.1 += 1;
        }
    }
}

/// Flips one bit in the first half of one of a stopped node's log segments (synced
/// records, with a sync marker after them). Returns the file, or None if it has none.
fn damage_a_segment(node_dir: &Path, rng: &mut SeededRng) -> std::io::Result<Option<PathBuf>> {
    let mut segments = Vec::new();
    for group in std::fs::read_dir(node_dir.join("data/groups"))? {
        let Ok(items) = std::fs::read_dir(group?.path().join("log")) else {
            continue;
        };
        for item in items.flatten() {
            let big = item.metadata().is_ok_and(|m| m.len() > 4096);
            if big && item.file_name().to_string_lossy().ends_with(".log") {
                segments.push(item.path());
            }
        }
    }
    segments.sort();
    if segments.is_empty() {
        return Ok(None);
    }
    let path = segments[rng.below(segments.len() as u64) as usize].clone();
    let mut data = std::fs::read(&path)?;
    let at = 64 + rng.below(data.len() as u64 / 2 - 64) as usize;
    data[at] ^= 1 << rng.below(8);
    std::fs::write(&path, &data)?;
    Ok(Some(path))
}

/// Waits (bounded) until the node reports no replica still repairing.
async fn wait_repaired(node: &Node) -> anyhow::Result<()> {
    let deadline = Instant::now() + REPAIR_MAX;
    while Instant::now() < deadline {
        if let Some((200, body)) = http_get(node.http_port, "/v1/cluster").await {
            let v: serde_json::Value = serde_json::from_str(&body)?;
            if v["repairing"].as_array().is_some_and(|r| r.is_empty()) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("node {} still repairing after {REPAIR_MAX:?}", node.id)
}

/// The node (index) leading a random partition, as a live node reports it.
async fn leader_of_some_partition(nodes: &[Node], rng: &mut SeededRng) -> Option<usize> {
    for n in nodes {
        let Some((200, body)) = http_get(n.http_port, "/v1/cluster").await else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let parts = v["partitions"].as_array()?;
        let p = &parts[rng.below(parts.len() as u64) as usize];
        let leader = p["leader"].as_u64().filter(|l| *l > 0)?;
        return nodes.iter().position(|n| n.id == leader);
    }
    None
}

#[derive(Clone, Copy)]
struct ProduceSpec {
    rate: u32,
    size: usize,
    keys: u32,
}

/// Deterministic payload of (producer, seq): the checker compares digests.
fn payload(producer: u32, seq: u64, size: usize) -> Vec<u8> {
    let mut p = format!("p{producer}-s{seq}-").into_bytes();
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(producer);
    while p.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p.push(b'a' + (x % 26) as u8);
    }
    p.truncate(size.max(1));
    p
}

async fn produce(
    servers: Vec<String>,
    id: u32,
    spec: ProduceSpec,
    history: Shared,
    running: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let client = Client::connect(ClientConfig::new(servers)).await?;
    let producer = client.producer(QUEUE).await?;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / u64::from(spec.rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut waits = tokio::task::JoinSet::new();
    let mut seq = 0u64;
    while running.load(Ordering::Acquire) {
        tick.tick().await;
        seq += 1;
        let key = format!("k{}", seq % u64::from(spec.keys));
        let body = payload(id, seq, spec.size);
        let put = Event::Put {
            guid: String::new(),
            producer: id,
            seq,
            key: Some(key.clone()),
            digest: digest(&body),
            sent_ms: now_ms(),
            done_ms: 0,
            outcome: Outcome::Unknown,
        };
        match producer.send(OutMessage::new(body).with_key(key)).await {
            Ok(handle) => {
                let history = history.clone();
                waits.spawn(async move {
                    let guid = guid_hex(&handle.guid());
                    let result = handle.await;
                    let outcome = match result.status {
                        tern_client::Status::Ok => Outcome::Ok,
                        tern_client::Status::Timeout => Outcome::Unknown,
                        other => Outcome::Failed(other.name().into()),
                    };
                    record(&history, finish_put(put, guid, outcome));
                });
            }
            Err(e) => {
                // Never sent (the client's buffer stayed full): a definite failure.
                record(
                    &history,
                    finish_put(put, String::from("-"), Outcome::Failed(e.to_string())),
                );
            }
        }
        // Reap finished ACK waiters so the set stays bounded by the in-flight PUTs.
        while waits.try_join_next().is_some() {}
    }
    while waits.join_next().await.is_some() {}
    Ok(())
}

fn finish_put(put: Event, guid: String, outcome: Outcome) -> Event {
    match put {
        Event::Put {
            producer,
            seq,
            key,
            digest,
            sent_ms,
            ..
        } => Event::Put {
            guid,
            producer,
            seq,
            key,
            digest,
            sent_ms,
            done_ms: now_ms(),
            outcome,
        },
        other => other,
    }
}

async fn consume(
    servers: Vec<String>,
    id: u32,
    history: Shared,
    draining: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let client = Client::connect(ClientConfig::new(servers)).await?;
    let mut consumer = client.consumer(QUEUE, ConsumerOptions::default()).await?;
    let mut drain_started: Option<Instant> = None;
    let mut last_delivery = Instant::now();
    loop {
        if draining.load(Ordering::Acquire) {
            let started = *drain_started.get_or_insert_with(Instant::now);
            let idle = last_delivery.elapsed().min(started.elapsed());
            if idle >= DRAIN_IDLE || started.elapsed() >= DRAIN_MAX {
                break;
            }
        }
        let Some(d) = consumer.next_timeout(Duration::from_millis(250)).await else {
            continue;
        };
        last_delivery = Instant::now();
        let guid = guid_hex(&d.guid);
        record(
            &history,
            Event::Deliver {
                guid: guid.clone(),
                consumer: id,
                digest: digest(&d.payload),
                attempt: d.attempt,
                partition: d.partition,
                at_ms: now_ms(),
            },
        );
        if consumer.confirm(&d).await.is_ok() {
            record(
                &history,
                Event::Confirm {
                    guid,
                    consumer: id,
                    at_ms: now_ms(),
                },
            );
        }
    }
    consumer.flush_confirms().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_deterministic_and_sized() {
        assert_eq!(payload(1, 42, 100), payload(1, 42, 100));
        assert_ne!(payload(1, 42, 100), payload(2, 42, 100));
        assert_eq!(payload(1, 42, 100).len(), 100);
    }
}
