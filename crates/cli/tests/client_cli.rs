//! The `tern` client commands as scripts use them: queue administration, cluster
//! status, bench, exit codes and clear errors on bad input.

mod common;

use common::history::History;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn queue_admin_round_trip_in_json_and_tables() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = TernServer::start(dir.path(), &[]);
    let addr = server.addr();
    let create = [
        "queue",
        "create",
        "orders",
        "--partitions",
        "2",
        "--max-messages",
        "1000",
        "--visibility-timeout",
        "30s",
        "--json",
    ];
    let out = cli_at(&addr, &create, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let created = &json_lines(&out.stdout)[0];
    assert_eq!(created["name"], "orders");
    assert_eq!(created["spec"]["partitions"], 2);
    assert_eq!(created["spec"]["visibility_timeout_ms"], 30_000);

    let out = cli_at(&addr, &["queue", "list"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(table.starts_with("QUEUE"), "{table}");
    assert!(table.contains("orders"), "{table}");

    let out = cli_at(
        &addr,
        &["produce", "--queue", "orders", "--count", "7"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli_at(&addr, &["queue", "stats", "orders", "--json"], None);
    let stats = &json_lines(&out.stdout)[0];
    assert_eq!(stats["depth"], 7, "{stats}");
    assert_eq!(stats["partitions"].as_array().map(Vec::len), Some(2));
    let out = cli_at(&addr, &["queue", "stats", "orders"], None);
    let human = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        human.contains("queue orders") && human.contains("PART"),
        "{human}"
    );

    let out = cli_at(&addr, &["queue", "purge", "orders"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli_at(&addr, &["queue", "stats", "orders", "--json"], None);
    assert_eq!(json_lines(&out.stdout)[0]["depth"], 0);

    let out = cli_at(&addr, &["queue", "delete", "orders", "--json"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    // A refused request: non-zero exit and the server's message.
    let out = cli_at(&addr, &["queue", "stats", "orders"], None);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("unknown_queue") && err.contains("orders"),
        "{err}"
    );
}

#[test]
fn cluster_status_in_json_and_as_a_table() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = TernServer::start(dir.path(), &[]);
    let out = cli_at(&server.addr(), &["cluster", "status", "--json"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = &json_lines(&out.stdout)[0];
    assert!(status["node_id"].is_u64(), "{status}");
    let out = cli_at(&server.addr(), &["cluster", "status"], None);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("NODE") && text.contains("metadata"), "{text}");
}

#[test]
fn bench_reports_figures_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = TernServer::start(dir.path(), &[]);
    let args = [
        "bench",
        "--queue",
        "b",
        "--producers",
        "2",
        "--consumers",
        "2",
        "--size",
        "256",
        "--count",
        "4000",
        "--json",
    ];
    let out = cli_at(&server.addr(), &args, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = &json_lines(&out.stdout)[0];
    assert_eq!(report["acked_ok"], 4000, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["consumed"], 4000, "{report}");
    assert!(
        report["msgs_per_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{report}"
    );
    for key in ["ack_latency", "e2e_latency"] {
        for q in ["p50_ms", "p99_ms", "p999_ms", "max_ms"] {
            assert!(report[key][q].is_f64(), "{key}.{q} in {report}");
        }
    }
}

#[test]
fn produce_exits_1_when_any_ack_fails_and_reports_every_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = TernServer::start(dir.path(), &[]);
    let addr = server.addr();
    let create = ["queue", "create", "tiny", "--max-messages", "3"];
    assert!(cli_at(&addr, &create, None).status.success());
    let input: String = (1..=5).map(|i| format!("m{i}\n")).collect();
    let args = ["produce", "--queue", "tiny", "--json", "--key", "k"];
    let out = cli_at(&addr, &args, Some(input.as_bytes()));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let acks = json_lines(&out.stdout);
    let seqs: Vec<u64> = acks.iter().filter_map(|a| a["seq"].as_u64()).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert_eq!(acks[0]["status"], "ok");
    assert_eq!(acks[4]["status"], "quota_exceeded");
    assert!(stderr(&out).contains("2 of 5"), "{}", stderr(&out));
    let mut h = History::default();
    h.add_produce_json(&out.stdout);
    let out = cli_at(
        &addr,
        &[
            "consume",
            "--queue",
            "tiny",
            "--idle-timeout",
            "700ms",
            "--json",
        ],
        None,
    );
    h.add_consume_json(&out.stdout);
    let v = h.verdict();
    assert!(v.is_clean(), "{v:?}");
    assert_eq!((v.acked_ok, v.acked_not_ok, v.recovered), (3, 2, 0));
    // One key: the order of the PUTs.
    let payloads: Vec<String> = json_lines(&out.stdout)
        .iter()
        .map(|m| m["payload"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(payloads, ["m1", "m2", "m3"]);
}

#[test]
fn a_message_larger_than_a_frame_is_refused_at_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = TernServer::start(
        dir.path(),
        &[
            "--max-frame-bytes",
            "1048576",
            "--default-max-message-bytes",
            "500000",
        ],
    );
    let started = Instant::now();
    let args = [
        "produce", "--queue", "big", "--count", "1", "--size", "2000000", "--json",
    ];
    let out = cli_at(&server.addr(), &args, None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(json_lines(&out.stdout)[0]["status"], "message_too_large");
    // Not after the 30 s PUT timeout: no server could ever take it.
    assert!(started.elapsed() < Duration::from_secs(10));
    // The connection and the server are fine.
    let out = cli_at(
        &server.addr(),
        &["produce", "--queue", "big", "--count", "1"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn bad_input_gets_a_clear_error_and_a_bounded_exit() {
    // Values clap can check.
    for args in [
        &["queue", "create", "q", "--mode", "bogus"][..],
        &["queue", "create", "q", "--storage", "disk"],
        &["produce", "--queue", "q", "--max-in-flight", "0"],
        &["consume", "--queue", "q", "--max-unconfirmed", "0"],
        &["produce", "--queue", "q", "--ttl", "5 parsecs"],
        &["produce", "--queue", "q", "--size", "10"],
        &["bench", "--count", "1", "--duration", "1s"],
    ] {
        let out = cli(args, None);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains("error"), "{args:?}: {}", stderr(&out));
    }
    // No server: every client command fails within its connect timeout.
    let nowhere = format!("127.0.0.1:{}", free_port());
    for args in [
        &["produce", "--queue", "q", "--count", "1"][..],
        &["consume", "--queue", "q", "--count", "1"],
        &["queue", "list"],
        &["cluster", "status"],
        &["bench", "--count", "10"],
    ] {
        let mut all = args.to_vec();
        all.extend(["--connect-timeout", "400ms"]);
        let started = Instant::now();
        let out = cli_at(&nowhere, &all, None);
        assert!(!out.status.success(), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.contains("cannot connect") && err.contains(&nowhere),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(3), "{args:?}");
    }
    // An address that is not HOST:PORT.
    let out = cli(&["queue", "list", "--server", "localhost"], None);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("HOST:PORT"), "{}", stderr(&out));
}
