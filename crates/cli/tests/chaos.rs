//! The short CI version of `tern chaos`: a 3-node cluster on 127.0.0.1 under load, with
//! kill -9 (of any node and of a leader), SIGSTOP/SIGCONT, SIGTERM restarts and damaged
//! log segments (kill -9, a bit flipped, restart: repaired from peers) drawn from a
//! seed; the history checker must find nothing lost, made up or corrupted.
//! Longer runs: `tern chaos --duration 10m` (see README, "Proving the guarantees").

mod support;

use support::tern;

#[test]
fn a_short_chaos_run_loses_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let history = dir.path().join("history.jsonl");
    let out = std::process::Command::new(tern())
        .args([
            "chaos",
            "--duration",
            "16s",
            "--fault-interval",
            "3s",
            "--seed",
            "15",
            "--json",
            "--dir",
        ])
        .arg(dir.path().join("run"))
        .arg("--history")
        .arg(&history)
        .output()
        .expect("run tern chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {stdout}\n{stderr}"));
    eprintln!("chaos report: {report}\n{stderr}");
    assert!(out.status.success(), "chaos run failed: {report}");
    assert_eq!(report["passed"], true);
    assert_eq!(report["lost"], 0);
    assert_eq!(report["unexpected"], 0);
    assert_eq!(report["corrupted"], 0);
    // A leader change costs latency, not failed ACKs (the coordinators and clients
    // retransmit; the GUID history answers duplicates).
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["unknown"], 0, "{report}");
    assert!(report["faults"].as_u64().unwrap_or(0) >= 2, "{report}");
    // Seed 15's schedule includes damaged segments (the rarest path).
    let damaged = report["faults_by_kind"]
        .as_array()
        .and_then(|kinds| kinds.iter().find(|k| k[0] == "damage"))
        .and_then(|k| k[1].as_u64());
    assert!(damaged.unwrap_or(0) >= 1, "{report}");
    assert!(report["acked_ok"].as_u64().unwrap_or(0) >= 1000, "{report}");
    let lines = std::fs::read_to_string(&history).expect("history written");
    assert!(lines.lines().count() as u64 >= report["puts"].as_u64().unwrap_or(0));
}
