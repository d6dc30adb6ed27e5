//! Queue semantics through the `tern` binary on a real server: dead letters, fan-out
//! subscriptions with retention, memory queues, and their stats.

mod support;

use serde_json::Value;
use std::time::Duration;
use support::*;

/// Runs a client command that must succeed; returns its stdout's JSON lines.
fn ok(server: &Server, args: &[&str], stdin: Option<&str>) -> Vec<Value> {
    let mut args = args.to_vec();
    if !args.contains(&"--json") {
        args.push("--json");
    }
    let out = run(&server.addr(), &args, stdin);
    assert!(
        out.status.success(),
        "tern {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_lines(&out.stdout)
}

/// Runs a client command that must fail; returns its stderr.
fn refused(server: &Server, args: &[&str]) -> String {
    let out = run(&server.addr(), args, None);
    assert!(!out.status.success(), "tern {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stats(server: &Server, queue: &str) -> Value {
    ok(server, &["queue", "stats", queue], None)
        .pop()
        .expect("stats line")
}

fn consume(server: &Server, queue: &str, extra: &[&str]) -> Vec<Value> {
    let mut args = vec![
        "consume",
        "--queue",
        queue,
        "--idle-timeout",
        "700ms",
        "--json",
    ];
    args.extend_from_slice(extra);
    ok(server, &args, None)
}

fn payloads(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| m["payload"].as_str().expect("text payload").to_owned())
        .collect()
}

fn lines(range: std::ops::Range<u32>) -> String {
    range.map(|i| format!("m{i}\n")).collect()
}

#[test]
fn a_poison_message_goes_to_the_dead_letter_queue_with_reason_and_attempts() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = Server::start(dir.path(), &[]);
    // Bad settings get clear errors and create nothing.
    let err = refused(
        &server,
        &["queue", "create", "jobs", "--dead-letter-queue", "jobs"],
    );
    assert!(err.contains("its own dead-letter queue"), "{err}");
    let err = refused(
        &server,
        &["queue", "create", "jobs", "--dead-letter-queue", "nowhere"],
    );
    assert!(err.contains("does not exist"), "{err}");
    let err = refused(
        &server,
        &["queue", "create", "jobs", "--dead-letter-expired"],
    );
    assert!(err.contains("needs a dead_letter_queue"), "{err}");

    ok(&server, &["queue", "create", "jobs-dlq"], None);
    ok(
        &server,
        &[
            "queue",
            "create",
            "jobs",
            "--max-delivery-attempts",
            "2",
            "--dead-letter-queue",
            "jobs-dlq",
        ],
        None,
    );
    let err = refused(&server, &["queue", "delete", "jobs-dlq"]);
    assert!(err.contains("dead-letter queue of"), "{err}");

    let acks = ok(
        &server,
        &["produce", "--queue", "jobs", "--json"],
        Some(&lines(0..3)),
    );
    assert_eq!(acks.len(), 3);
    // Two failed attempts each: a consumer that leaves without confirming, then one
    // that gives them back (NACK). Then they are gone from the queue...
    for (attempt, how) in [(1u64, "--no-confirm"), (2, "--nack")] {
        let got = ok(
            &server,
            &["consume", "--queue", "jobs", "--count", "3", how],
            None,
        );
        assert_eq!(payloads(&got), ["m0", "m1", "m2"]);
        assert!(
            got.iter().all(|m| m["attempt"].as_u64() == Some(attempt)),
            "{got:?}"
        );
    }
    assert!(consume(&server, "jobs", &[]).is_empty());
    // ...and in the dead-letter queue, with where they came from and why.
    // Dead letters keep no order among themselves: match them by payload.
    let mut dead = consume(&server, "jobs-dlq", &[]);
    dead.sort_by_key(|m| m["payload"].as_str().map(str::to_owned));
    assert_eq!(payloads(&dead), ["m0", "m1", "m2"]);
    for (m, ack) in dead.iter().zip(&acks) {
        let dl = &m["dead_letter"];
        assert_eq!(dl["queue"], "jobs");
        assert_eq!(dl["reason"], "max_attempts");
        assert_eq!(dl["attempts"], 2);
        assert_eq!(dl["original_guid"], ack["guid"]);
    }
    let s = stats(&server, "jobs");
    assert_eq!(s["depth"], 0);
    assert_eq!(s["partitions"][0]["dead_lettered"], 3);
    assert_eq!(stats(&server, "jobs-dlq")["depth"], 0);
}

#[test]
fn expired_messages_are_dead_lettered_when_the_queue_says_so() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = Server::start(dir.path(), &[]);
    ok(&server, &["queue", "create", "late"], None);
    ok(
        &server,
        &[
            "queue",
            "create",
            "offers",
            "--default-ttl",
            "300ms",
            "--dead-letter-queue",
            "late",
            "--dead-letter-expired",
        ],
        None,
    );
    ok(
        &server,
        &["produce", "--queue", "offers"],
        Some(&lines(0..2)),
    );
    std::thread::sleep(Duration::from_millis(1200));
    assert!(consume(&server, "offers", &[]).is_empty());
    let dead = consume(&server, "late", &[]);
    assert_eq!(payloads(&dead), ["m0", "m1"]);
    assert!(dead.iter().all(|m| m["dead_letter"]["reason"] == "expired"));
}

#[test]
fn fanout_subscriptions_each_get_every_message_and_survive_a_crash() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut server = Server::start(dir.path(), &[]);
    ok(
        &server,
        &[
            "queue",
            "create",
            "events",
            "--mode",
            "fanout",
            "--partitions",
            "2",
        ],
        None,
    );
    for sub in ["billing", "audit"] {
        ok(
            &server,
            &["queue", "subscribe", "events", "--subscription", sub],
            None,
        );
    }
    let err = refused(&server, &["consume", "--queue", "events", "--count", "1"]);
    assert!(err.contains("name a subscription"), "{err}");
    ok(&server, &["queue", "create", "plain"], None);
    let err = refused(
        &server,
        &[
            "consume",
            "--queue",
            "plain",
            "--subscription",
            "x",
            "--count",
            "1",
        ],
    );
    assert!(err.contains("work queue"), "{err}");

    ok(
        &server,
        &["produce", "--queue", "events"],
        Some(&lines(0..40)),
    );
    let mut billing = payloads(&consume(&server, "events", &["--subscription", "billing"]));
    billing.sort();
    let mut expected: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    expected.sort();
    assert_eq!(billing, expected);
    let first_audit = payloads(&ok(
        &server,
        &[
            "consume",
            "--queue",
            "events",
            "--subscription",
            "audit",
            "--count",
            "15",
            "--json",
        ],
        None,
    ));
    assert_eq!(first_audit.len(), 15);
    let s = stats(&server, "events");
    assert_eq!(s["depth"], 25, "stored once, kept for audit: {s}");

    // kill -9: cursors are replicated state, so audit gets exactly the rest.
    server.kill9();
    server.spawn();
    assert!(consume(&server, "events", &["--subscription", "billing"]).is_empty());
    let mut audit = first_audit;
    audit.extend(payloads(&consume(
        &server,
        "events",
        &["--subscription", "audit"],
    )));
    audit.sort();
    assert_eq!(audit, expected);
    assert_eq!(stats(&server, "events")["depth"], 0);

    // A subscription created later gets what is PUT from then on.
    ok(
        &server,
        &["queue", "subscribe", "events", "--subscription", "late"],
        None,
    );
    ok(&server, &["produce", "--queue", "events"], Some("new\n"));
    let late = consume(&server, "events", &["--subscription", "late"]);
    assert_eq!(payloads(&late), ["new"]);
    ok(
        &server,
        &["queue", "unsubscribe", "events", "--subscription", "audit"],
        None,
    );
    let err = refused(
        &server,
        &["queue", "unsubscribe", "events", "--subscription", "audit"],
    );
    assert!(err.contains("no subscription"), "{err}");
    let (_, metrics) = http_get(server.http_port, "/metrics").expect("metrics");
    assert!(
        metrics.contains("tern_subscription_lag{") && metrics.contains("subscription=\"billing\""),
        "{metrics}"
    );
}

#[test]
fn fanout_retention_drops_the_oldest_and_counts_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = Server::start(dir.path(), &[]);
    let err = refused(
        &server,
        &["queue", "create", "w", "--retention-max-bytes", "1000"],
    );
    assert!(err.contains("apply to fanout queues"), "{err}");
    ok(
        &server,
        &[
            "queue",
            "create",
            "ticks",
            "--mode",
            "fanout",
            "--retention-max-bytes",
            "1000",
        ],
        None,
    );
    ok(
        &server,
        &["queue", "subscribe", "ticks", "--subscription", "slow"],
        None,
    );
    // 20 messages of 100 bytes into a 1000-byte retention limit.
    ok(
        &server,
        &[
            "produce", "--queue", "ticks", "--count", "20", "--size", "100",
        ],
        None,
    );
    let s = stats(&server, "ticks");
    let part = &s["partitions"][0];
    let dropped = part["dropped"].as_u64().expect("dropped");
    let depth = s["depth"].as_u64().expect("depth");
    assert!(s["bytes"].as_u64().expect("bytes") <= 1000, "{s}");
    assert_eq!(dropped + depth, 20, "{s}");
    assert!(dropped >= 10, "{s}");
    assert_eq!(part["subscriptions"][0]["dropped"], dropped);
    let got = consume(&server, "ticks", &["--subscription", "slow"]);
    assert_eq!(got.len() as u64, depth);
}

#[test]
fn memory_queue_acks_say_so_and_a_restart_empties_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut server = Server::start(dir.path(), &[]);
    ok(
        &server,
        &["queue", "create", "scratch", "--storage", "memory"],
        None,
    );
    let acks = ok(
        &server,
        &["produce", "--queue", "scratch", "--json"],
        Some(&lines(0..3)),
    );
    assert!(acks
        .iter()
        .all(|a| a["status"] == "ok" && a["durable"] == false));
    assert_eq!(
        payloads(&ok(
            &server,
            &["consume", "--queue", "scratch", "--count", "1", "--json"],
            None
        )),
        ["m0"]
    );
    // Durable queues' ACKs carry no such key.
    let acks = ok(
        &server,
        &["produce", "--queue", "kept", "--json"],
        Some("x\n"),
    );
    assert!(acks[0].get("durable").is_none());
    server.kill9();
    server.spawn();
    assert_eq!(stats(&server, "scratch")["depth"], 0);
    assert_eq!(payloads(&consume(&server, "kept", &[])), ["x"]);
}
