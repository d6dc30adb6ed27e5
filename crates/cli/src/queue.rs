//! `tern queue create|list|stats|delete|purge` and `tern cluster status`.

use crate::{dur, ClientArgs};
use clap::{Args, Subcommand};
use std::process::ExitCode;
use tern_client::admin::{AdminReply, AdminRequest, QueueInfo, QueueSpec};
use tern_client::Client;

#[derive(Args, Debug)]
pub struct QueueArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: QueueCommand,
}

#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// Create a queue (unset settings take the server's defaults).
    Create(CreateArgs),
    /// List queues with depth and in-flight counts.
    List,
    /// Depth, in flight, bytes, oldest age, per partition.
    Stats { name: String },
    /// Delete a queue and its messages.
    Delete { name: String },
    /// Remove every message of a queue (the queue stays).
    Purge { name: String },
    /// Fanout: create a named subscription; it receives every message PUT from now on.
    Subscribe {
        queue: String,
        #[arg(long)]
        subscription: String,
    },
    /// Fanout: delete a subscription; messages only it still needed are released.
    Unsubscribe {
        queue: String,
        #[arg(long)]
        subscription: String,
    },
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    pub name: String,
    #[arg(long)]
    pub partitions: Option<u16>,
    /// work: each message to one consumer; fanout: each subscription gets every message.
    #[arg(long, value_parser = ["work", "fanout"])]
    pub mode: Option<String>,
    /// durable: fsynced by a quorum before the ACK; memory: replicated, not fsynced.
    #[arg(long, value_parser = ["durable", "memory"])]
    pub storage: Option<String>,
    #[arg(long)]
    pub max_messages: Option<u64>,
    #[arg(long)]
    pub max_bytes: Option<u64>,
    #[arg(long)]
    pub max_message_bytes: Option<u32>,
    #[arg(long, value_parser = dur::parse_ms)]
    pub dedup_window: Option<u64>,
    #[arg(long, value_parser = dur::parse_ms)]
    pub visibility_timeout: Option<u64>,
    /// After this many failed deliveries (visibility timeout, NACK, consumer gone) a
    /// message goes to the dead-letter queue (or is discarded without one). 0 = never.
    #[arg(long)]
    pub max_delivery_attempts: Option<u32>,
    /// An existing queue that receives this queue's dead letters.
    #[arg(long)]
    pub dead_letter_queue: Option<String>,
    /// Dead-letter expired messages instead of dropping them (needs --dead-letter-queue).
    #[arg(long)]
    pub dead_letter_expired: bool,
    /// Fanout: drop messages older than this for every subscription (e.g. 7d).
    #[arg(long, value_parser = dur::parse_ms)]
    pub retention_max_age: Option<u64>,
    /// Fanout: drop the oldest messages when the queue holds more payload bytes than this.
    #[arg(long)]
    pub retention_max_bytes: Option<u64>,
    #[arg(long, value_parser = dur::parse_ms)]
    pub default_ttl: Option<u64>,
    #[arg(long, value_parser = dur::parse_ms)]
    pub max_ttl: Option<u64>,
}

#[derive(Args, Debug)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Nodes and, per partition, leader, replicas, commit index and replica lag.
    Status,
    /// Add a node (`ID=HOST:PORT`, its peer address), then start it with `tern server
    /// --join`. Waits until the replicas it wins by placement have moved to it.
    AddNode {
        /// `ID=HOST:PORT`: the new node's id and peer address.
        member: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Remove a node: its replicas move to the others first, then it leaves the
    /// metadata group and can be stopped. Waits until it holds nothing.
    RemoveNode {
        id: u64,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(Args, Debug)]
pub struct WaitArgs {
    /// Return once the change is committed, without waiting for replicas to move.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this long (the move goes on in the cluster), e.g. `120s`.
    #[arg(long, default_value = "120s", value_parser = dur::parse_ms)]
    pub wait_timeout: u64,
}

pub async fn run(args: QueueArgs) -> anyhow::Result<ExitCode> {
    let client = Client::connect(args.client.config()).await?;
    let json = args.client.json;
    let req = match args.command {
        QueueCommand::Create(c) => AdminRequest::CreateQueue {
            name: c.name,
            spec: QueueSpec {
                mode: c.mode,
                storage: c.storage,
                partitions: c.partitions,
                max_messages: c.max_messages,
                max_bytes: c.max_bytes,
                max_message_bytes: c.max_message_bytes,
                dedup_window_ms: c.dedup_window,
                visibility_timeout_ms: c.visibility_timeout,
                max_delivery_attempts: c.max_delivery_attempts,
                dead_letter_queue: c.dead_letter_queue,
                dead_letter_expired: c.dead_letter_expired.then_some(true),
                retention_max_age_ms: c.retention_max_age,
                retention_max_bytes: c.retention_max_bytes,
                default_ttl_ms: c.default_ttl,
                max_ttl_ms: c.max_ttl,
            },
        },
        QueueCommand::List => AdminRequest::ListQueues,
        QueueCommand::Stats { name } => AdminRequest::QueueStats { name },
        QueueCommand::Delete { name } => AdminRequest::DeleteQueue { name },
        QueueCommand::Purge { name } => AdminRequest::PurgeQueue { name },
        QueueCommand::Subscribe {
            queue,
            subscription,
        } => AdminRequest::CreateSubscription {
            queue,
            name: subscription,
        },
        QueueCommand::Unsubscribe {
            queue,
            subscription,
        } => AdminRequest::DeleteSubscription {
            queue,
            name: subscription,
        },
    };
    let reply = client.admin(req).await?;
    if json {
        println!("{}", serde_json::to_string(&reply)?);
        return Ok(ExitCode::SUCCESS);
    }
    match reply {
        AdminReply::Queue(q) => print_queue(&q),
        AdminReply::Queues { queues } => print_table(&queues),
        AdminReply::Done { .. } => println!("done"),
        AdminReply::Cluster(v) => println!("{}", serde_json::to_string_pretty(&v)?),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn cluster(args: ClusterArgs) -> anyhow::Result<ExitCode> {
    let client = Client::connect(args.client.config()).await?;
    let (req, wait) = match args.command {
        ClusterCommand::Status => (AdminRequest::ClusterStatus, None),
        ClusterCommand::AddNode { member, wait } => {
            let Some((id, peer_addr)) = member.split_once('=') else {
                anyhow::bail!("add-node takes ID=HOST:PORT, got {member:?}");
            };
            let id: u64 = id
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("{id:?} is not a node id"))?;
            let req = AdminRequest::AddNode {
                id,
                peer_addr: peer_addr.trim().to_string(),
            };
            (req, Some((id, true, wait)))
        }
        ClusterCommand::RemoveNode { id, wait } => {
            (AdminRequest::RemoveNode { id }, Some((id, false, wait)))
        }
    };
    if let Some((id, adding, wait)) = wait {
        client.admin(req).await?;
        if wait.no_wait {
            println!("node {id}: change committed; replicas move in the background");
            return Ok(ExitCode::SUCCESS);
        }
        let timeout = std::time::Duration::from_millis(wait.wait_timeout);
        return wait_for_membership(&client, id, adding, timeout).await;
    }
    let reply = client.admin(req).await?;
    let value = serde_json::to_value(&reply)?;
    if args.client.json {
        println!("{value}");
    } else {
        print_cluster(&value)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Polls the cluster status until node `id` is a voting member holding its replicas
/// (adding) or holds nothing any more (removing), bounded by `timeout`.
async fn wait_for_membership(
    client: &Client,
    id: u64,
    adding: bool,
    timeout: std::time::Duration,
) -> anyhow::Result<ExitCode> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let status = serde_json::to_value(client.admin(AdminRequest::ClusterStatus).await?)?;
        let (done, progress) = membership_progress(&status, id, adding);
        if done {
            println!("node {id}: {}", if adding { "added" } else { "removed" });
            return Ok(ExitCode::SUCCESS);
        }
        if progress != last {
            eprintln!("node {id}: {progress}");
            last = progress;
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!(
                "tern: node {id}: still moving after {} s; the change goes on (see `tern cluster status`)",
                timeout.as_secs()
            );
            return Ok(ExitCode::from(1));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// (done, a one-line description of what is left) for an add or remove of `id`.
fn membership_progress(v: &serde_json::Value, id: u64, adding: bool) -> (bool, String) {
    let status = v.get("Cluster").unwrap_or(v);
    let role = status["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["id"].as_u64() == Some(id)))
        .and_then(|n| n["role"].as_str())
        .unwrap_or("absent")
        .to_string();
    let ids = |x: &serde_json::Value| -> Vec<u64> {
        let mut v: Vec<u64> = x
            .as_array()
            .map(|a| a.iter().filter_map(|i| i.as_u64()).collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    };
    let parts = status["partitions"].as_array().cloned().unwrap_or_default();
    let unsettled = parts
        .iter()
        .filter(|p| {
            let replicas = ids(&p["replicas"]);
            let learners = ids(&p["learners"]);
            if adding {
                replicas != ids(&p["target_replicas"]) || !learners.is_empty()
            } else {
                replicas.contains(&id) || learners.contains(&id)
            }
        })
        .count();
    let done = unsettled == 0
        && if adding {
            role == "voter"
        } else {
            role == "absent"
        };
    (
        done,
        format!(
            "metadata role {role}, {unsettled} of {} partitions still moving",
            parts.len()
        ),
    )
}

/// Nodes, metadata group and partitions as tables; unknown shapes as pretty JSON.
fn print_cluster(v: &serde_json::Value) -> anyhow::Result<()> {
    let (Some(nodes), Some(parts)) = (v["nodes"].as_array(), v["partitions"].as_array()) else {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    };
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    println!("connected to node {}", text(&v["node_id"]));
    let meta = &v["metadata"];
    println!(
        "metadata: leader {} term {} commit {}",
        text(&meta["leader"]),
        text(&meta["term"]),
        text(&meta["commit_index"])
    );
    println!(
        "{:>6} {:<24} {:<8} {:<8}",
        "NODE", "PEER_ADDR", "ROLE", "HEALTHY"
    );
    for n in nodes {
        println!(
            "{:>6} {:<24} {:<8} {:<8}",
            text(&n["id"]),
            text(&n["peer_addr"]),
            text(&n["role"]),
            text(&n["healthy"])
        );
    }
    println!(
        "{:<24} {:>4} {:>7} {:>6} {:>10} {:>10} {:<12} {:<8} {:<12} {:<}",
        "QUEUE",
        "PART",
        "LEADER",
        "TERM",
        "COMMIT",
        "APPLIED",
        "REPLICAS",
        "LEARNERS",
        "TARGET",
        "LAG"
    );
    for p in parts {
        println!(
            "{:<24} {:>4} {:>7} {:>6} {:>10} {:>10} {:<12} {:<8} {:<12} {:<}",
            text(&p["queue"]),
            text(&p["partition"]),
            text(&p["leader"]),
            text(&p["term"]),
            text(&p["commit_index"]),
            text(&p["applied_index"]),
            text(&p["replicas"]),
            text(&p["learners"]),
            text(&p["target_replicas"]),
            text(&p["replica_lag"])
        );
    }
    Ok(())
}

fn age(ms: Option<u64>) -> String {
    ms.map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0))
}

fn print_table(queues: &[QueueInfo]) {
    println!(
        "{:<32} {:>10} {:>10} {:>12} {:>9} {:>10}",
        "QUEUE", "DEPTH", "IN_FLIGHT", "BYTES", "CONSUMERS", "OLDEST"
    );
    for q in queues {
        println!(
            "{:<32} {:>10} {:>10} {:>12} {:>9} {:>10}",
            q.name,
            q.depth,
            q.in_flight,
            q.bytes,
            q.consumers,
            age(q.oldest_age_ms)
        );
    }
}

fn print_queue(q: &QueueInfo) {
    println!("queue {}", q.name);
    let s = &q.spec;
    let ms = |v: Option<u64>| {
        v.filter(|v| *v > 0)
            .map_or("off".to_string(), |v| format!("{v} ms"))
    };
    println!(
        "  mode {} storage {} partitions {} max_messages {} max_bytes {} max_message_bytes {}",
        s.mode.as_deref().unwrap_or("-"),
        s.storage.as_deref().unwrap_or("-"),
        s.partitions.unwrap_or(0),
        s.max_messages.unwrap_or(0),
        s.max_bytes.unwrap_or(0),
        s.max_message_bytes.unwrap_or(0),
    );
    println!(
        "  dedup_window {} visibility_timeout {} default_ttl {} max_ttl {}",
        ms(s.dedup_window_ms),
        ms(s.visibility_timeout_ms),
        ms(s.default_ttl_ms),
        ms(s.max_ttl_ms)
    );
    println!(
        "  max_delivery_attempts {} dead_letter_queue {} dead_letter_expired {} retention_max_age {} retention_max_bytes {}",
        s.max_delivery_attempts.filter(|v| *v > 0).map_or("off".to_string(), |v| v.to_string()),
        s.dead_letter_queue.as_deref().unwrap_or("-"),
        s.dead_letter_expired.unwrap_or(false),
        ms(s.retention_max_age_ms),
        s.retention_max_bytes.filter(|v| *v > 0).map_or("off".to_string(), |v| v.to_string()),
    );
    println!(
        "  depth {} in_flight {} bytes {} consumers {} oldest {}",
        q.depth,
        q.in_flight,
        q.bytes,
        q.consumers,
        age(q.oldest_age_ms)
    );
    println!(
        "  {:>4} {:>7} {:>10} {:>10} {:>8} {:>8} {:>12} {:>10} {:>12}",
        "PART",
        "LEADER",
        "DEPTH",
        "IN_FLIGHT",
        "DELAYED",
        "EXPIRED",
        "COMMIT",
        "OLDEST",
        "LOG_BYTES"
    );
    for p in &q.partitions {
        println!(
            "  {:>4} {:>7} {:>10} {:>10} {:>8} {:>8} {:>12} {:>10} {:>12}",
            p.partition,
            p.leader.map_or("-".into(), |l| l.to_string()),
            p.depth,
            p.in_flight,
            p.delayed,
            p.expired,
            p.commit_index,
            age(p.oldest_age_ms),
            p.log_disk_bytes
        );
    }
    let subs: Vec<_> = q
        .partitions
        .iter()
        .flat_map(|p| p.subscriptions.iter().map(move |s| (p.partition, s)))
        .collect();
    if subs.is_empty() {
        return;
    }
    println!(
        "  {:>4} {:<16} {:>8} {:>8} {:>9} {:>7} {:>8} {:>9} {:>7} {:>7} {:>9} {:>8}",
        "PART",
        "SUBSCRIPTION",
        "DEPTH",
        "LAG",
        "IN_FLIGHT",
        "DELAYED",
        "DLQ_DUE",
        "DEAD_LTR",
        "EXPIRED",
        "DROPPED",
        "CONSUMERS",
        "OLDEST"
    );
    for (part, s) in subs {
        println!(
            "  {:>4} {:<16} {:>8} {:>8} {:>9} {:>7} {:>8} {:>9} {:>7} {:>7} {:>9} {:>8}",
            part,
            if s.name.is_empty() { "(work)" } else { &s.name },
            s.depth,
            s.lag,
            s.in_flight,
            s.delayed,
            s.dead_letter_due,
            s.dead_lettered,
            s.expired,
            s.dropped,
            s.consumers,
            age(s.oldest_age_ms)
        );
    }
}
