//! The CI share of the deterministic simulation: a few hundred seeds of a 3-replica
//! group and some of a 5-replica one, each with crashes (some with a damaged file to
//! repair from peers), partitions, message loss, duplication and reordering. Thousands more: `cargo run --release -p tern-sim --
//! --seeds 5000` (see README, "Proving the guarantees").

use tern_sim::{run, SimConfig};

fn scratch() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("tmp")
}

fn seeds(first: u64, count: u64, nodes: u64) -> tern_sim::Report {
    let dir = scratch();
    let mut total = tern_sim::Report::default();
    for seed in first..first + count {
        let mut cfg = SimConfig::new(seed);
        cfg.nodes = nodes;
        let r = run(cfg, dir.path())
            .unwrap_or_else(|e| panic!("{e}\nreplay: tern-sim --seed {seed} --nodes {nodes}"));
        total.acked_puts += r.acked_puts;
        total.crashes += r.crashes;
        total.damaged += r.damaged;
        total.repaired += r.repaired;
        total.checked_messages += r.checked_messages;
        total.partitions += r.partitions;
        total.snapshots_installed += r.snapshots_installed;
    }
    total
}

#[test]
fn three_replicas_keep_every_acked_message_over_many_seeds() {
    let t = seeds(1, 300, 3);
    eprintln!("3 replicas, 300 seeds: {t:?}");
    // The run exercised what it claims to.
    assert!(t.acked_puts > 10_000 && t.crashes > 100 && t.partitions > 100);
    // The history checker saw every replica's messages after healing.
    assert!(t.checked_messages > 2 * t.acked_puts, "{t:?}");
    assert!(t.snapshots_installed > 50, "{t:?}");
    // Replicas with damaged files were repaired from their peers, without a loss.
    assert!(t.repaired > 30, "{t:?}");
}

#[test]
fn five_replicas_keep_every_acked_message_over_many_seeds() {
    let t = seeds(100_001, 100, 5);
    eprintln!("5 replicas, 100 seeds: {t:?}");
    assert!(t.acked_puts > 5_000 && t.crashes > 50);
}

#[test]
fn a_seed_replays_exactly() {
    let dir = scratch();
    let a = run(SimConfig::new(77), dir.path()).expect("seed 77");
    let b = run(SimConfig::new(77), dir.path()).expect("seed 77 again");
    assert_eq!(a, b);
}
