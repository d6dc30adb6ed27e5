//! The client library against a real `tern server` that is killed, restarted and
//! stopped (SIGSTOP) while it works: nothing ACKed is lost, every PUT resolves exactly
//! once and within its bound, consumers come back by themselves.

mod common;

use common::history::History;
use common::*;
use std::time::{Duration, Instant};
use tern_client::{Client, ClientError, ConsumerOptions, OutMessage, PutResult, Status};
use tokio::task::JoinHandle;

/// Sends `count` messages as fast as the retransmission buffer allows; each PUT's
/// outcome and the time from `send` returning to its resolution are collected.
fn produce_in_background(
    client: Client,
    queue: &'static str,
    count: usize,
) -> JoinHandle<Vec<(PutResult, Duration)>> {
    tokio::spawn(async move {
        let producer = client.producer(queue).await.expect("producer");
        let mut waits = Vec::with_capacity(count);
        for i in 0..count {
            let msg = OutMessage::new(format!("message {i}"));
            let handle = producer.send(msg).await.expect("send within its bound");
            let sent = Instant::now();
            // One task per PUT so the resolution time is taken when it resolves.
            waits.push(tokio::spawn(async move {
                let r = handle.await;
                (r, sent.elapsed())
            }));
        }
        let mut out = Vec::with_capacity(count);
        for w in waits {
            out.push(w.await.expect("join"));
        }
        out
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_twice_during_a_pipelined_produce_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut server = TernServer::start(dir.path(), &[]);
    let config = tern_client::ClientConfig {
        retransmit_max_msgs: 2_000,
        ..client_config(&server)
    };
    let client = Client::connect(config).await.expect("connect");
    let producing = produce_in_background(client.clone(), "k9", 20_000);
    for pause_ms in [300, 700] {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        server.kill9();
        tokio::time::sleep(Duration::from_millis(200)).await;
        tokio::task::block_in_place(|| server.spawn());
    }
    let results = tokio::time::timeout(Duration::from_secs(90), producing)
        .await
        .expect("every PUT resolves")
        .expect("join");
    let mut history = History::default();
    for (r, _) in &results {
        history.put(r.guid, r.status);
    }
    drain(
        &client,
        "k9",
        &mut history,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    let v = history.verdict();
    println!("{v:?}");
    assert!(v.is_clean(), "{v:?}\n{}", server.log());
    // The restarts were far shorter than the PUT timeout: retransmission (same GUIDs,
    // deduplicated by the server) turns every PUT into an ok, enqueued once.
    assert_eq!(v.acked_ok, 20_000, "{v:?}");
    assert_eq!(v.duplicated, 0, "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_cannot_stretch_a_put_past_its_timeout() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = TernServer::start(dir.path(), &[]);
    let put_timeout = Duration::from_millis(1_500);
    let config = tern_client::ClientConfig {
        put_timeout_ms: put_timeout.as_millis() as u64,
        // Declared dead after 3 × 300 ms of silence, then retried.
        heartbeat_interval_ms: Some(300),
        retransmit_max_msgs: 5_000,
        ..client_config(&server)
    };
    let client = Client::connect(config).await.expect("connect");
    let pid = server.pid();
    // Stopped from 0.5 s to 3.5 s while a producer sends for about 6 s.
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        signal(pid, "STOP");
        std::thread::sleep(Duration::from_secs(3));
        signal(pid, "CONT");
    });
    let producer = client.producer("stall").await.expect("producer");
    let started = Instant::now();
    let mut waits = Vec::new();
    let mut slowest_send = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(6) {
        let before = Instant::now();
        let msg = OutMessage::new(vec![b's'; 512]);
        match producer.send(msg).await {
            Ok(handle) => {
                let sent = Instant::now();
                waits.push(tokio::spawn(async move {
                    let r = handle.await;
                    (r, sent.elapsed())
                }));
            }
            // Back-pressure is allowed, but only for the PUT timeout.
            Err(ClientError::Timeout(_)) => {}
            Err(e) => panic!("send: {e}"),
        }
        slowest_send = slowest_send.max(before.elapsed());
    }
    stopper.join().expect("stopper");
    let slack = Duration::from_millis(750);
    assert!(
        slowest_send <= put_timeout + slack,
        "send waited {slowest_send:?}"
    );
    let mut history = History::default();
    let mut slowest_ack = Duration::ZERO;
    for w in waits {
        let (r, took) = w.await.expect("join");
        slowest_ack = slowest_ack.max(took);
        history.put(r.guid, r.status);
    }
    assert!(
        slowest_ack <= put_timeout + slack,
        "a PUT took {slowest_ack:?} to resolve"
    );
    drain(
        &client,
        "stall",
        &mut history,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    let v = history.verdict();
    println!("{v:?}");
    assert!(v.is_clean(), "{v:?}");
    assert!(
        v.acked_not_ok > 0,
        "the stop should have timed PUTs out: {v:?}"
    );
    assert!(
        v.acked_ok > 0,
        "PUTs after the resume should succeed: {v:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_comes_back_after_the_server_restarts() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut server = TernServer::start(dir.path(), &[]);
    let client = Client::connect(client_config(&server))
        .await
        .expect("connect");
    let producer = client.producer("resub").await.expect("producer");
    let mut history = History::default();
    for i in 0..50 {
        let r = producer.put(OutMessage::new(format!("m{i}"))).await;
        let r = r.expect("put");
        assert_eq!(r.status, Status::Ok);
        assert!(r.durable, "a durable queue's ACK says durable");
        history.put(r.guid, r.status);
    }
    let options = ConsumerOptions {
        max_unconfirmed_msgs: 100,
        ..ConsumerOptions::default()
    };
    let mut consumer = client.consumer("resub", options).await.expect("consumer");
    // Take 20 without confirming, then lose the server.
    for _ in 0..20 {
        let d = consumer
            .next_timeout(Duration::from_secs(5))
            .await
            .expect("delivery");
        assert_eq!(d.attempt, 1);
    }
    server.kill9();
    tokio::task::block_in_place(|| server.spawn());
    // The same consumer handle is re-subscribed: all 50 come (again), none confirmed yet.
    let deadline = Instant::now() + Duration::from_secs(30);
    while history.verdict().lost > 0 && Instant::now() < deadline {
        let Some(d) = consumer.next_timeout(Duration::from_secs(5)).await else {
            break;
        };
        history.delivered(d.guid, d.attempt);
        consumer.confirm(&d).await.expect("confirm");
    }
    consumer.flush_confirms().await;
    let v = history.verdict();
    assert!(v.is_clean(), "{v:?}");
    assert_eq!(v.lost, 0, "{v:?}");
    // Everything was confirmed: a fresh consumer finds nothing.
    drop(consumer);
    let mut after = History::default();
    drain(
        &client,
        "resub",
        &mut after,
        Duration::from_millis(700),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(after.delivery_order().len(), 0);
}

#[test]
fn the_cli_fails_over_past_a_dead_server_in_the_list() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = TernServer::start(dir.path(), &[]);
    let dead = format!("127.0.0.1:{}", free_port());
    let list = format!("{dead},{}", server.addr());
    let out = cli_at(
        &list,
        &["produce", "--queue", "fo", "--count", "10", "--json"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json_lines(&out.stdout).len(), 10);
    // TERN_SERVER stands in for --server.
    let out = cli_env(
        &["consume", "--queue", "fo", "--count", "10", "--json"],
        None,
        &[("TERN_SERVER", &list)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json_lines(&out.stdout).len(), 10);
}
