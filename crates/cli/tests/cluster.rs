//! A three-node cluster of real `tern server` processes on 127.0.0.1: any node
//! coordinates any queue, and killing or pausing a partition leader under load loses
//! no ACKed message (checked with the history checker).

mod support;

use std::process::{Command, Output, Stdio};
use std::time::Duration;
use support::*;

/// `tern produce` in the background. Its output is read as it comes (a thread waits on
/// it): a producer whose stdout pipe filled up would stall, and the test's "under
/// load" would quietly become "paused".
fn producer(servers: &str, queue: &str, count: u32) -> std::thread::JoinHandle<Output> {
    let child = Command::new(tern())
        .args([
            "produce",
            "--queue",
            queue,
            "--count",
            &count.to_string(),
            "--size",
            "200",
            "--json",
            "--max-in-flight",
            "500",
            "--server",
            servers,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("producer");
    std::thread::spawn(move || child.wait_with_output().expect("producer output"))
}

fn create(server: &str, queue: &str, partitions: &str) {
    let args = [
        "queue",
        "create",
        queue,
        "--partitions",
        partitions,
        "--json",
    ];
    run_ok(server, &args, "create");
}

/// Waits (bounded) until node `from` knows a leader of group `gid`.
fn wait_leader(c: &Cluster, from: usize, gid: u64) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if let Some(l) = c.leader_of_group(from, gid) {
            return l;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no leader for group {gid} within 15 s");
}

#[test]
fn any_node_coordinates_any_queue() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Cluster::start(dir.path(), 3, &[]);
    create(&c.nodes[0].addr(), "spread", "3");
    let (_, body) = http_get(c.nodes[1].http_port, "/v1/cluster").expect("status");
    let status: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        status["nodes"].as_array().map(Vec::len),
        Some(3),
        "{status}"
    );
    for p in status["partitions"].as_array().expect("partitions") {
        assert_eq!(p["replicas"].as_array().map(Vec::len), Some(3), "{status}");
    }
    // Produce through node 2, consume through node 3: both forward to the leaders.
    let input: String = (0..600).map(|i| format!("m{i}\n")).collect();
    let out = run(
        &c.nodes[1].addr(),
        &["produce", "--queue", "spread", "--json"],
        Some(&input),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut h = History::default();
    h.add_produce_output(&out.stdout);
    assert_eq!(h.puts.len(), 600);
    drain(&c.nodes[2].addr(), "spread", &mut h);
    let v = h.check();
    assert_eq!(
        v,
        Verdict {
            lost: 0,
            unexpected: 0,
            duplicated: 0,
            recovered: 0
        }
    );
}

#[test]
fn killing_the_partition_leader_under_load_loses_no_acked_message() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut c = Cluster::start(dir.path(), 3, &[]);
    create(&c.nodes[0].addr(), "orders", "1");
    let gid = group_of(&c, "orders");
    wait_leader(&c, 0, gid);
    let producer = producer(&c.servers(), "orders", 60_000);
    std::thread::sleep(Duration::from_millis(700));
    let leader = wait_leader(&c, 0, gid);
    assert!(!producer.is_finished(), "the kill must hit under load");
    c.nodes[leader].kill9();
    let out = producer.join().expect("producer thread");
    let mut h = History::default();
    h.add_produce_output(&out.stdout);
    assert_eq!(
        h.puts.len(),
        60_000,
        "every PUT got exactly one ACK: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = h.puts.values().filter(|s| s.as_str() == "ok").count();
    c.nodes[leader].spawn();
    let other = (leader + 1) % 3;
    drain(&c.nodes[other].addr(), "orders", &mut h);
    let v = h.check();
    eprintln!("leader killed under load: {ok} ok of 60000, verdict {v:?}");
    assert_eq!(v.lost, 0, "ACKed messages lost");
    assert_eq!(v.unexpected, 0, "messages nobody produced");
    assert!(ok >= 57_000, "failover should be invisible; only {ok} ok");
}

#[test]
fn a_paused_leader_is_replaced_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Cluster::start(dir.path(), 3, &[]);
    create(&c.nodes[0].addr(), "paused", "1");
    let gid = group_of(&c, "paused");
    let leader = wait_leader(&c, 0, gid);
    let pid = c.nodes[leader]
        .child
        .as_ref()
        .map(|ch| ch.id())
        .expect("pid");
    let producer = producer(&c.servers(), "paused", 30_000);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!producer.is_finished(), "the pause must hit under load");
    signal(pid, "STOP");
    // Longer than the election timeout (10 ticks of 100 ms).
    std::thread::sleep(Duration::from_millis(3000));
    let other = (leader + 1) % 3;
    let new_leader = c.leader_of_group(other, gid);
    signal(pid, "CONT");
    assert!(
        new_leader.is_some_and(|l| l != leader),
        "a new leader was elected while the old one was paused ({new_leader:?})"
    );
    let out = producer.join().expect("producer thread");
    let mut h = History::default();
    h.add_produce_output(&out.stdout);
    assert_eq!(h.puts.len(), 30_000);
    let ok = h.puts.values().filter(|s| s.as_str() == "ok").count();
    drain(&c.nodes[other].addr(), "paused", &mut h);
    let v = h.check();
    eprintln!("leader paused under load: {ok} ok of 30000, verdict {v:?}");
    assert_eq!(v.lost, 0);
    assert_eq!(v.unexpected, 0);
}

#[test]
fn a_rolling_sigterm_restart_under_load_fails_no_ack() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut c = Cluster::start(dir.path(), 3, &[]);
    create(&c.nodes[0].addr(), "rolling", "2");
    let gid = group_of(&c, "rolling");
    wait_leader(&c, 0, gid);
    wait_leader(&c, 0, gid + 1);
    let producer = producer(&c.servers(), "rolling", 150_000);
    // A consumer on its own node list, reading while nodes restart.
    let consumer = Command::new(tern())
        .args([
            "consume",
            "--queue",
            "rolling",
            "--idle-timeout",
            "6s",
            "--json",
            "--server",
            &c.servers(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("consumer");
    let consumer =
        std::thread::spawn(move || consumer.wait_with_output().expect("consumer output"));
    std::thread::sleep(Duration::from_millis(800));
    for i in 0..3 {
        let status = c.nodes[i].sigterm();
        assert!(status.success(), "node {} stopped with {status}", i + 1);
        c.nodes[i].spawn();
        // Let the restarted node catch up before the next one goes.
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        !producer.is_finished(),
        "every restart must happen under load"
    );
    let out = producer.join().expect("producer thread");
    let mut h = History::default();
    h.add_produce_output(&out.stdout);
    assert_eq!(h.puts.len(), 150_000);
    let failed: Vec<String> = h
        .puts
        .values()
        .filter(|s| s.as_str() != "ok")
        .cloned()
        .collect();
    let consumed = consumer.join().expect("consumer thread");
    h.add_consume_output(&consumed.stdout);
    drain(&c.nodes[0].addr(), "rolling", &mut h);
    let v = h.check();
    eprintln!(
        "rolling restart: {} failed ACKs, verdict {v:?}; producer: {}",
        failed.len(),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
    );
    assert!(failed.is_empty(), "failed ACKs during a rolling restart");
    assert_eq!(v.lost, 0);
    assert_eq!(v.unexpected, 0);
}

/// Replicas that were down while the leader compacted its log catch up from its
/// snapshot (state plus the entries still holding unsettled payloads), keep compacting
/// on their own, and then serve every unsettled message without the old leader.
#[test]
fn replicas_behind_the_leaders_compaction_catch_up_from_its_snapshot() {
    let dir = tempfile::tempdir().expect("tmp");
    let small = [
        "--snapshot-interval-bytes",
        "1048576",
        "--segment-max-bytes",
        "1048576",
    ];
    let mut c = Cluster::start(dir.path(), 3, &small);
    create(&c.nodes[0].addr(), "behind", "1");
    let gid = group_of(&c, "behind");
    let leader = wait_leader(&c, 0, gid);
    let (f, g) = ((leader + 1) % 3, (leader + 2) % 3);
    let mut h = History::default();
    // Round 1 without F, round 2 without G: each misses several snapshots and
    // released segments, and must install the leader's snapshot when it returns.
    for away in [f, g] {
        c.nodes[away].kill9();
        produce_settle_produce(&c.nodes[leader].addr(), &mut h);
        c.nodes[away].spawn();
        wait_for_log(&c.nodes[away], "installed a snapshot");
    }
    // Let the appends after the last snapshot reach both, then lose the only full copy.
    std::thread::sleep(Duration::from_millis(1000));
    c.nodes[leader].kill9();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while c.leader_of_group(f, gid).is_none_or(|l| l == leader) {
        assert!(std::time::Instant::now() < deadline, "no new leader");
        std::thread::sleep(Duration::from_millis(100));
    }
    drain(&c.nodes[f].addr(), "behind", &mut h);
    let v = h.check();
    eprintln!("catch-up from snapshot: verdict {v:?}");
    assert_eq!(h.puts.len(), 2 * 5000);
    assert_eq!(v.lost, 0, "ACKed messages lost");
    assert_eq!(v.unexpected, 0);
}

/// ~4 MB of PUTs, 1500 of them consumed, then ~1 MB more so a snapshot records the settles.
fn produce_settle_produce(server: &str, h: &mut History) {
    for (count, consume) in [("4000", "1500"), ("1000", "")] {
        let args = [
            "produce", "--queue", "behind", "--count", count, "--size", "1000", "--json",
        ];
        let out = run(server, &args, None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        h.add_produce_output(&out.stdout);
        if !consume.is_empty() {
            let args = ["consume", "--queue", "behind", "--count", consume, "--json"];
            let out = run(server, &args, None);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            h.add_consume_output(&out.stdout);
        }
    }
}

fn wait_for_log(node: &Server, needle: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !node.log().contains(needle) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {needle:?} in the log:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `tern cluster add-node` then `remove-node` under load: the new node receives the
/// replicas placement gives it (learner, snapshot, voter), the removed node hands its
/// replicas and leadership over, and no ACKed message is lost.
#[test]
fn adding_and_removing_a_node_under_load_moves_replicas_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut c = Cluster::start(dir.path(), 3, &[]);
    create(&c.nodes[0].addr(), "moving", "4");
    let members: Vec<String> = c
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{}=127.0.0.1:{}", i + 1, n.peer_port))
        .collect();
    let node4_dir = dir.path().join("node4");
    std::fs::create_dir_all(&node4_dir).expect("node4 dir");
    let mut node4 = Server {
        child: None,
        dir: node4_dir,
        port: free_port(),
        http_port: free_port(),
        peer_port: free_port(),
        extra: vec![
            "--node-id".into(),
            "4".into(),
            "--join".into(),
            "--initial-cluster".into(),
            members.join(","),
        ],
    };
    let all = format!("{},{}", c.servers(), node4.addr());
    let producer = producer(&all, "moving", 20_000);
    std::thread::sleep(Duration::from_millis(1000));
    let member4 = format!("4=127.0.0.1:{}", node4.peer_port);
    let out = run(
        &c.nodes[1].addr(),
        &["cluster", "add-node", &member4, "--no-wait"],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    node4.spawn_no_wait();
    let out = run(
        &c.nodes[1].addr(),
        &["cluster", "add-node", &member4, "--wait-timeout", "60s"],
        None,
    );
    assert!(
        out.status.success(),
        "add-node did not complete: {}\nnode 4 log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        node4.log()
    );
    let out = run(
        &c.nodes[1].addr(),
        &["cluster", "remove-node", "1", "--wait-timeout", "60s"],
        None,
    );
    assert!(
        out.status.success(),
        "remove-node did not complete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every replica of node 4 started from its leader's snapshot, never from entry 1.
    assert!(
        node4.log().contains("installed a snapshot"),
        "{}",
        node4.log()
    );
    assert!(
        c.nodes[0]
            .log()
            .contains("this node was removed from the cluster"),
        "{}",
        c.nodes[0].log()
    );
    // Node 1 holds nothing now: killing it costs nothing.
    c.nodes[0].kill9();
    let (_, body) = http_get(node4.http_port, "/v1/cluster").expect("status of node 4");
    let status: serde_json::Value = serde_json::from_str(&body).expect("json");
    let parts = status["partitions"].as_array().expect("partitions");
    let on4 = parts
        .iter()
        .filter(|p| {
            p["replicas"]
                .as_array()
                .is_some_and(|r| r.contains(&4.into()))
        })
        .count();
    assert!(on4 >= 1, "node 4 holds no replica: {status}");
    for p in parts {
        let r = p["replicas"].as_array().expect("replicas");
        assert!(!r.contains(&1.into()), "node 1 still a replica: {status}");
        assert_eq!(r.len(), 3, "{status}");
    }
    let out = producer.join().expect("producer thread");
    let mut h = History::default();
    h.add_produce_output(&out.stdout);
    assert_eq!(h.puts.len(), 20_000);
    let ok = h.puts.values().filter(|s| s.as_str() == "ok").count();
    drain(&node4.addr(), "moving", &mut h);
    let v = h.check();
    eprintln!("add/remove under load: {ok} ok of 20000, {on4} partitions on node 4, verdict {v:?}");
    assert_eq!(v.lost, 0, "ACKed messages lost");
    assert_eq!(v.unexpected, 0);
}

/// A memory queue in a cluster: PUTs are ACKed without fsync (`"durable":false`) once a
/// quorum holds them in memory, so the death of one node loses none, and the killed node
/// comes back serving (its unsynced log survived in the page cache).
#[test]
fn a_memory_queue_survives_the_death_of_its_leader() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut c = Cluster::start(dir.path(), 3, &[]);
    let out = run(
        &c.nodes[0].addr(),
        &[
            "queue",
            "create",
            "transient",
            "--storage",
            "memory",
            "--json",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gid = group_of(&c, "transient");
    let leader = wait_leader(&c, 0, gid);
    let out = run(
        &c.servers(),
        &[
            "produce",
            "--queue",
            "transient",
            "--count",
            "2000",
            "--json",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&out.stdout);
    assert!(
        lines.iter().all(|l| l["durable"] == false),
        "ACKs say memory only"
    );
    let mut h = History::default();
    h.add_produce_output(&out.stdout);
    c.nodes[leader].kill9();
    let other = (leader + 1) % 3;
    drain(&c.nodes[other].addr(), "transient", &mut h);
    let v = h.check();
    eprintln!("memory queue, leader killed: verdict {v:?}");
    assert_eq!(v.lost, 0, "a node's death lost ACKed memory-queue messages");
    assert_eq!(v.unexpected, 0);
    c.nodes[leader].spawn();
    assert!(
        !c.nodes[leader].log().contains("not opened"),
        "{}",
        c.nodes[leader].log()
    );
}

/// The log directory of group `gid` on node `n`.
fn group_log_dir(n: &Server, gid: u64) -> std::path::PathBuf {
    n.dir
        .join("data/groups")
        .join(format!("{gid:08}"))
        .join("log")
}

/// Flips one bit in the middle of the largest segment of `log_dir` (well inside
/// synced records: a sync marker follows it). Returns the file's name.
fn flip_a_bit_in_the_largest_segment(log_dir: &std::path::Path) -> String {
    let largest = std::fs::read_dir(log_dir)
        .expect("log dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .expect("a segment");
    let path = largest.path();
    let mut data = std::fs::read(&path).expect("read segment");
    assert!(
        data.len() > 100_000,
        "segment too small to damage its middle"
    );
    let middle = data.len() / 2;
    data[middle] ^= 0x10;
    std::fs::write(&path, &data).expect("write segment");
    largest.file_name().to_string_lossy().into_owned()
}

fn produce_all(server: &str, queue: &str, count: u32, h: &mut History) -> usize {
    let out = producer(server, queue, count)
        .join()
        .expect("producer thread");
    h.add_produce_output(&out.stdout);
    let ok = json_lines(&out.stdout)
        .iter()
        .filter(|l| l["status"] == "ok")
        .count();
    assert_eq!(
        ok,
        count as usize,
        "every PUT ok: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok
}

/// A bit flipped in a follower's log segment while it is down (bit rot, a torn
/// synced write): recovery finds it by checksum, the replica moves the damaged files to
/// `quarantine/` and rebuilds from its peers under load, without voting until it holds
/// all it had acknowledged. Then its copy is the one that saves the data: the other
/// follower stops, more is ACKed by leader + repaired replica, the leader dies, and
/// the repaired replica leads with everything.
#[test]
fn a_replica_with_a_damaged_segment_is_repaired_from_its_peers() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut c = Cluster::start(dir.path(), 3, &[]);
    create(&c.nodes[0].addr(), "rot", "1");
    let gid = group_of(&c, "rot");
    let leader = wait_leader(&c, 0, gid);
    let (f, g) = ((leader + 1) % 3, (leader + 2) % 3);
    let mut h = History::default();
    let mut ok = produce_all(&c.servers(), "rot", 5_000, &mut h);

    c.nodes[f].kill9();
    let damaged = flip_a_bit_in_the_largest_segment(&group_log_dir(&c.nodes[f], gid));
    let under_load = producer(&c.nodes[leader].addr(), "rot", 5_000);
    c.nodes[f].spawn();
    wait_for_log(&c.nodes[f], "damaged replica");
    wait_for_log(&c.nodes[f], "repaired from peers");
    let out = under_load.join().expect("producer thread");
    h.add_produce_output(&out.stdout);
    let group_dir = group_log_dir(&c.nodes[f], gid);
    let group_dir = group_dir.parent().expect("group dir");
    assert!(
        group_dir.join("quarantine/log").join(&damaged).exists(),
        "the damaged segment is kept for study"
    );
    assert!(!group_dir.join("repairing").exists(), "repair finished");
    assert!(
        c.nodes[f].log().contains("checksum mismatch"),
        "recovery named the damage"
    );

    c.nodes[g].kill9();
    ok += produce_all(&c.nodes[leader].addr(), "rot", 2_000, &mut h);
    c.nodes[leader].kill9();
    c.nodes[g].spawn();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while c.leader_of_group(f, gid).is_none_or(|l| l == leader) {
        assert!(std::time::Instant::now() < deadline, "no new leader");
        std::thread::sleep(Duration::from_millis(100));
    }
    drain(&c.nodes[f].addr(), "rot", &mut h);
    let v = h.check();
    eprintln!("damaged replica repaired: {ok} ok, verdict {v:?}");
    assert_eq!(h.puts.len(), 12_000);
    assert_eq!(v.lost, 0, "ACKed messages lost");
    assert_eq!(v.unexpected, 0);
}

/// Builds the fsync fault library (`tests/faults/fsync_eio.c`) into `dir`.
fn build_fsync_fault_library(dir: &std::path::Path) -> std::path::PathBuf {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/faults/fsync_eio.c");
    let lib = dir.join("libfsync_eio.so");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-ldl")
        .status()
        .expect("run cc (the C compiler builds the fault library)");
    assert!(status.success(), "cc failed on {}", src.display());
    lib
}

/// A disk that fails an fsync under load (EIO from fdatasync, injected at the libc
/// boundary with LD_PRELOAD): the partition leader must stop rather than carry on
/// with page-cache state it cannot trust; the others take over, and after it restarts
/// nothing ACKed is missing.
#[test]
fn an_fsync_error_stops_the_node_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let lib = build_fsync_fault_library(dir.path());
    let armed = dir.path().join("fsync-eio");
    std::fs::create_dir(&armed).expect("fault dir");
    // Every process this test starts loads the library; it fails fsync only in a
    // process whose pid is a file in `armed`. (nextest runs each test in its own
    // process, so no other test sees these variables.)
    std::env::set_var("LD_PRELOAD", &lib);
    std::env::set_var("TERN_FAULT_FSYNC_EIO_DIR", &armed);
    let mut c = Cluster::start(dir.path(), 3, &[]);
    create(&c.nodes[0].addr(), "eio", "1");
    let gid = group_of(&c, "eio");
    wait_leader(&c, 0, gid);
    let load = producer(&c.servers(), "eio", 50_000);
    std::thread::sleep(Duration::from_millis(500));
    let leader = wait_leader(&c, 0, gid);
    assert!(!load.is_finished(), "the fault must hit under load");
    let child = c.nodes[leader].child.as_mut().expect("leader running");
    std::fs::write(armed.join(child.id().to_string()), b"").expect("arm");
    let status = wait_timeout(child, Duration::from_secs(15))
        .expect("the node kept running after a failed fsync");
    c.nodes[leader].child = None;
    assert!(
        !status.success(),
        "a failed fsync must end the process with an error"
    );
    let log = c.nodes[leader].log();
    assert!(
        log.contains("Input/output error") && log.contains("fatal"),
        "the node names the failed fsync:\n{log}"
    );

    let out = load.join().expect("producer thread");
    let mut h = History::default();
    h.add_produce_output(&out.stdout);
    assert_eq!(h.puts.len(), 50_000, "every PUT got exactly one ACK");
    let ok = h.puts.values().filter(|s| s.as_str() == "ok").count();
    c.nodes[leader].spawn();
    drain(&c.nodes[(leader + 1) % 3].addr(), "eio", &mut h);
    let v = h.check();
    eprintln!("fsync EIO on the leader: {ok} ok of 50000, verdict {v:?}");
    assert_eq!(v.lost, 0, "ACKed messages lost");
    assert_eq!(v.unexpected, 0);
    assert!(ok >= 49_000, "failover after the fsync error; only {ok} ok");
}
