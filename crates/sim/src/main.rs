//! `tern-sim`: runs the deterministic simulation over many seeds, or replays one.
//!
//!   tern-sim --seeds 1000              seeds 1..=1000, stop at the first failure
//!   tern-sim --seeds 500 --from 9000   seeds 9000..9500
//!   tern-sim --seed 4242               replay one seed
//!   tern-sim --seeds 200 --nodes 5     five replicas
//!   tern-sim --seeds 200 --damage 0    no damaged files (default: 250 of 1000 crashes)
//!   tern-sim --cluster --seeds 100     whole clusters: the production node loops
//!   tern-sim --cluster --seed 77       replay one whole-cluster seed
//!
//! `RUST_LOG=info tern-sim --seed N` traces the replay (Raft's own log lines and the
//! replicas' repair steps).
//!
//! Exit status 1 on a violation (the seed is printed), 2 on bad arguments.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;
use tern_sim::cluster::{run_cluster, ClusterReport, ClusterSimConfig};
use tern_sim::{run, SimConfig};

fn usage() -> ExitCode {
    eprintln!("usage: tern-sim [--cluster] [--seed N | --seeds COUNT [--from FIRST]] [--nodes 3|5] [--steps N] [--damage PER_MILLE_OF_CRASHES] [--dir DIR]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    // RUST_LOG=info (or debug) traces a replayed seed: elections, snapshots, repairs.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let whole_cluster = args.iter().any(|a| a == "--cluster");
    args.retain(|a| a != "--cluster");
    let mut first = 1u64;
    let mut count = 100u64;
    let mut nodes = 3u64;
    let mut steps: Option<u64> = None;
    let mut damage: Option<u64> = None;
    let mut dir = std::env::temp_dir();
    if std::path::Path::new("/dev/shm").is_dir() {
        dir = "/dev/shm".into();
    }
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned();
        let num = value.as_deref().and_then(|v| v.parse::<u64>().ok());
        match (args[i].as_str(), num) {
            ("--seed", Some(n)) => {
                first = n;
                count = 1;
            }
            ("--seeds", Some(n)) => count = n,
            ("--from", Some(n)) => first = n,
            ("--nodes", Some(n)) if n == 3 || n == 5 => nodes = n,
            ("--steps", Some(n)) if n > 0 => steps = Some(n),
            ("--damage", Some(n)) if n <= 1000 => damage = Some(n),
            ("--dir", _) if value.is_some() => dir = value.unwrap_or_default().into(),
            _ => return usage(),
        }
        i += 2;
    }
    let dir = dir.join(format!("tern-sim-{}", std::process::id()));
    let started = Instant::now();
    if whole_cluster {
        return run_clusters(first, count, nodes, &dir, started);
    }
    let mut totals = tern_sim::Report::default();
    for seed in first..first.saturating_add(count) {
        let mut cfg = SimConfig::new(seed);
        cfg.nodes = nodes;
        if let Some(s) = steps {
            cfg.steps = s;
        }
        if let Some(d) = damage {
            cfg.damage_per_mille_of_crashes = d;
        }
        match run(cfg, &dir) {
            Ok(r) => {
                if count == 1 {
                    println!("{r:?}");
                }
                totals.acked_puts += r.acked_puts;
                totals.confirmed += r.confirmed;
                totals.retried += r.retried;
                totals.crashes += r.crashes;
                totals.damaged += r.damaged;
                totals.repaired += r.repaired;
                totals.partitions += r.partitions;
                totals.leader_changes += r.leader_changes;
                totals.snapshots_installed += r.snapshots_installed;
                totals.messages_dropped += r.messages_dropped;
                totals.checked_messages += r.checked_messages;
            }
            Err(e) => {
                eprintln!("FAIL: {e}\nreplay: tern-sim --seed {seed} --nodes {nodes}");
                let _ = std::fs::remove_dir_all(&dir);
                return ExitCode::from(1);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{count} seeds from {first} passed in {:.1} s: {} PUTs ACKed, {} confirmed, {} retried, {} crashes ({} with damaged files, {} repaired from peers), {} partitions, {} leader changes, {} snapshots installed, {} messages dropped; the history checker found {} messages on the replicas, none lost, made up or corrupted",
        started.elapsed().as_secs_f64(),
        totals.acked_puts,
        totals.confirmed,
        totals.retried,
        totals.crashes,
        totals.damaged,
        totals.repaired,
        totals.partitions,
        totals.leader_changes,
        totals.snapshots_installed,
        totals.messages_dropped,
        totals.checked_messages
    );
    ExitCode::SUCCESS
}

/// `--cluster`: whole clusters of production node loops (`tern_sim::cluster`).
fn run_clusters(first: u64, count: u64, nodes: u64, dir: &Path, started: Instant) -> ExitCode {
    let mut t = ClusterReport::default();
    for seed in first..first.saturating_add(count) {
        let mut cfg = ClusterSimConfig::new(seed);
        cfg.nodes = nodes;
        match run_cluster(cfg, dir) {
            Ok(r) => {
                if count == 1 {
                    println!("{r:?}");
                }
                t.steps += r.steps;
                t.crashes += r.crashes;
                t.restarts += r.restarts;
                t.partitions += r.partitions;
                t.peer_msgs += r.peer_msgs;
                t.dropped_msgs += r.dropped_msgs;
                t.duplicated_msgs += r.duplicated_msgs;
                t.link_resets += r.link_resets;
                let (a, c) = (&mut t.checker, &r.checker);
                a.puts += c.puts;
                a.acked_ok += c.acked_ok;
                a.failed += c.failed;
                a.unknown += c.unknown;
                a.delivered_unique += c.delivered_unique;
                a.duplicated += c.duplicated;
                a.recovered += c.recovered;
                a.order_violations += c.order_violations;
            }
            Err(e) => {
                eprintln!("FAIL: {e}\nreplay: tern-sim --cluster --seed {seed} --nodes {nodes}");
                let _ = std::fs::remove_dir_all(dir);
                return ExitCode::from(1);
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    let c = &t.checker;
    println!(
        "{count} whole-cluster seeds from {first} passed in {:.1} s: {} PUTs ({} ACKed ok, {} failed, {} unknown), {} delivered, lost 0, unexpected 0, {} duplicated, {} order inversions; {} crashes, {} restarts, {} partitions, {} peer link resets; {} peer messages ({} dropped, {} duplicated); {:.0} s of virtual time",
        started.elapsed().as_secs_f64(),
        c.puts,
        c.acked_ok,
        c.failed,
        c.unknown,
        c.delivered_unique,
        c.duplicated,
        c.order_violations,
        t.crashes,
        t.restarts,
        t.partitions,
        t.link_resets,
        t.peer_msgs,
        t.dropped_msgs,
        t.duplicated_msgs,
        (t.steps * 10) as f64 / 1000.0
    );
    ExitCode::SUCCESS
}
