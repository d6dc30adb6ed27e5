//! Consuming through the library and the CLI: flow control, handles closed on drop,
//! NACK, binary payloads, and CONFIRMs settled before `tern consume` exits.

mod common;

use common::history::History;
use common::*;
use std::collections::HashSet;
use std::time::Duration;
use tern_client::{Client, ConsumerOptions, OutMessage, Status};

async fn put_all(client: &Client, queue: &str, n: usize, history: &mut History) {
    let producer = client.producer(queue).await.expect("producer");
    let mut handles = Vec::new();
    for i in 0..n {
        let msg = OutMessage::new(format!("{queue} {i}"));
        handles.push(producer.send(msg).await.expect("send"));
    }
    for h in handles {
        let r = h.await;
        assert_eq!(r.status, Status::Ok);
        history.put(r.guid, r.status);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_consumer_hands_its_unconfirmed_messages_to_the_next() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = TernServer::start(dir.path(), &[]);
    let client = Client::connect(client_config(&server))
        .await
        .expect("connect");
    let mut history = History::default();
    put_all(&client, "handoff", 100, &mut history).await;
    let limited = ConsumerOptions {
        max_unconfirmed_msgs: 10,
        ..ConsumerOptions::default()
    };
    let mut first = client.consumer("handoff", limited).await.expect("first");
    let mut held = HashSet::new();
    for _ in 0..10 {
        let d = first
            .next_timeout(Duration::from_secs(5))
            .await
            .expect("delivery");
        held.insert(d.guid);
    }
    // Flow control: nothing beyond the 10 unconfirmed.
    assert!(first
        .next_timeout(Duration::from_millis(500))
        .await
        .is_none());
    // Same client, same connection: only closing the handle releases them.
    drop(first);
    let mut second = History::default();
    drain(
        &client,
        "handoff",
        &mut second,
        Duration::from_secs(2),
        Duration::from_secs(30),
    )
    .await;
    for guid in second.delivery_order() {
        history.delivered(*guid, 1);
    }
    let v = history.verdict();
    assert!(v.is_clean(), "{v:?}");
    assert_eq!(v.duplicated, 0, "{v:?}");
    let redelivered: HashSet<_> = second.delivery_order().iter().copied().collect();
    assert!(held.is_subset(&redelivered));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_redelivers_with_a_higher_attempt() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = TernServer::start(dir.path(), &[]);
    let client = Client::connect(client_config(&server))
        .await
        .expect("connect");
    let mut history = History::default();
    put_all(&client, "nack", 1, &mut history).await;
    let mut consumer = client
        .consumer("nack", ConsumerOptions::default())
        .await
        .expect("consumer");
    let d = consumer
        .next_timeout(Duration::from_secs(5))
        .await
        .expect("first delivery");
    assert_eq!(d.attempt, 1);
    consumer.nack(&d, 0).await.expect("nack");
    let again = consumer
        .next_timeout(Duration::from_secs(5))
        .await
        .expect("redelivery");
    assert_eq!(again.guid, d.guid);
    assert_eq!(again.attempt, 2);
    consumer.confirm(&again).await.expect("confirm");
    assert_eq!(consumer.flush_confirms().await, 1);
}

#[test]
fn binary_lines_round_trip_and_consume_settles_before_exit() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = TernServer::start(dir.path(), &[]);
    // A UTF-8 line, a non-UTF-8 line, a CRLF line.
    let input: &[u8] = b"caf\xc3\xa9\n\xff\xfe\x00\nwindows\r\n";
    let out = cli_at(
        &server.addr(),
        &["produce", "--queue", "bin", "--json"],
        Some(input),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut history = History::default();
    history.add_produce_json(&out.stdout);
    let out = cli_at(
        &server.addr(),
        &["consume", "--queue", "bin", "--count", "3", "--json"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    history.add_consume_json(&out.stdout);
    let lines = json_lines(&out.stdout);
    assert_eq!(lines[0]["payload"], "café");
    assert_eq!(lines[1]["payload_b64"], "//4A");
    assert!(lines[1].get("payload").is_none());
    assert_eq!(lines[2]["payload"], "windows");
    for l in &lines {
        assert_eq!(l["attempt"], 1);
        assert!(l["partition"].is_u64());
    }
    let v = history.verdict();
    assert!(v.is_clean() && v.duplicated == 0, "{v:?}");
    // The CONFIRMs were committed before consume exited: the queue is empty now.
    let out = cli_at(&server.addr(), &["queue", "stats", "bin", "--json"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let stats = &json_lines(&out.stdout)[0];
    assert_eq!(stats["depth"], 0, "{stats}");
}

#[test]
fn consume_no_confirm_leaves_messages_and_idle_timeout_ends_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = TernServer::start(dir.path(), &[]);
    let out = cli_at(
        &server.addr(),
        &["produce", "--queue", "nc", "--count", "5", "--size", "16"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("produced 5 messages"));
    let args = [
        "consume",
        "--queue",
        "nc",
        "--idle-timeout",
        "700ms",
        "--no-confirm",
    ];
    let out = cli_at(&server.addr(), &args, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Generated payloads name their sequence number and have the requested size.
    assert_eq!(text.lines().count(), 5, "{text}");
    assert!(text.lines().all(|l| l.len() == 16), "{text}");
    assert!(text.lines().any(|l| l.starts_with("1 x")), "{text}");
    // Not confirmed: they come again (attempt 2).
    let out = cli_at(
        &server.addr(),
        &[
            "consume",
            "--queue",
            "nc",
            "--idle-timeout",
            "700ms",
            "--json",
        ],
        None,
    );
    let again = json_lines(&out.stdout);
    assert_eq!(again.len(), 5);
    assert!(again.iter().all(|m| m["attempt"] == 2), "{again:?}");
}
