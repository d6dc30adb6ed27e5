//! The CI share of the whole-cluster simulation (`tern_sim::cluster`): production node
//! loops of 3 and 5 nodes under crashes, restarts, partitions, peer link resets, Raft
//! message loss, duplication and reordering, with clients that retry and consumers
//! that leave. Thousands more: `cargo run --release -p tern-sim -- --cluster --seeds
//! 5000` (see README, "Proving the guarantees").

use tern_sim::cluster::{run_cluster, ClusterReport, ClusterSimConfig};

fn scratch() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("tmp")
}

fn seeds(first: u64, count: u64, nodes: u64) -> ClusterReport {
    let dir = scratch();
    let mut t = ClusterReport::default();
    for seed in first..first + count {
        let mut cfg = ClusterSimConfig::new(seed);
        cfg.nodes = nodes;
        let r = run_cluster(cfg, dir.path()).unwrap_or_else(|e| {
            panic!("{e}\nreplay: tern-sim --cluster --seed {seed} --nodes {nodes}")
        });
        // Every seed: nothing lost or made up (run_cluster fails otherwise), and every
        // PUT answered after healing.
        assert_eq!(r.checker.unknown, 0, "seed {seed}: {r:?}");
        t.crashes += r.crashes;
        t.restarts += r.restarts;
        t.partitions += r.partitions;
        t.link_resets += r.link_resets;
        t.dropped_msgs += r.dropped_msgs;
        t.checker.acked_ok += r.checker.acked_ok;
        t.checker.delivered_unique += r.checker.delivered_unique;
        t.checker.duplicated += r.checker.duplicated;
    }
    t
}

#[test]
fn three_node_clusters_keep_every_acked_message_over_many_seeds() {
    let t = seeds(1, 120, 3);
    eprintln!("3 nodes, 120 seeds: {t:?}");
    // The runs exercised what they claim to.
    assert!(t.checker.acked_ok > 50_000, "{t:?}");
    assert!(
        t.crashes > 100 && t.restarts > 30 && t.partitions > 100,
        "{t:?}"
    );
    assert!(t.link_resets > 1_000 && t.dropped_msgs > 10_000, "{t:?}");
    assert_eq!(t.checker.delivered_unique, t.checker.acked_ok, "{t:?}");
}

#[test]
fn five_node_clusters_keep_every_acked_message_over_many_seeds() {
    let t = seeds(50_001, 40, 5);
    eprintln!("5 nodes, 40 seeds: {t:?}");
    assert!(t.checker.acked_ok > 10_000 && t.crashes > 40, "{t:?}");
    assert_eq!(t.checker.delivered_unique, t.checker.acked_ok, "{t:?}");
}
