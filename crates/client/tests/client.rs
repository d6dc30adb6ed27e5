//! The client library against a real in-process broker (real sockets, files, fsync).

use std::collections::HashSet;
use std::time::{Duration, Instant};
use tern_broker::{Broker, BrokerConfig};
use tern_client::{Client, ClientConfig, ConsumerOptions, OutMessage, Status};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

fn broker_config(dir: &std::path::Path, port: u16) -> BrokerConfig {
    BrokerConfig {
        data_dir: dir.to_path_buf(),
        listen: format!("127.0.0.1:{port}").parse().expect("addr"),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        peer_listen: "127.0.0.1:0".parse().expect("addr"),
        min_free_disk_bytes: 0,
        stop_timeout_ms: 2_000,
        ..BrokerConfig::default()
    }
}

fn client_config(port: u16) -> ClientConfig {
    ClientConfig {
        put_timeout_ms: 20_000,
        ..ClientConfig::new([format!("127.0.0.1:{port}")])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_puts_are_each_acked_once_and_consumed_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let broker = Broker::start(broker_config(dir.path(), port))
        .await
        .expect("start");
    let client = Client::connect(client_config(port)).await.expect("connect");
    let producer = client.producer("p").await.expect("producer");
    let mut handles = Vec::new();
    for i in 0..2000 {
        handles.push(
            producer
                .send(OutMessage::new(format!("m{i}")))
                .await
                .expect("send"),
        );
    }
    let mut guids = HashSet::new();
    for h in handles {
        let r = h.await;
        assert_eq!(r.status, Status::Ok);
        assert!(r.durable);
        assert!(guids.insert(r.guid));
    }
    let mut consumer = client
        .consumer("p", ConsumerOptions::default())
        .await
        .expect("consumer");
    let mut seen = Vec::new();
    while seen.len() < 2000 {
        let d = consumer
            .next_timeout(Duration::from_secs(10))
            .await
            .expect("delivery");
        consumer.confirm(&d).await.expect("confirm");
        seen.push(String::from_utf8(d.payload.to_vec()).expect("utf8"));
    }
    assert_eq!(seen, (0..2000).map(|i| format!("m{i}")).collect::<Vec<_>>());
    assert_eq!(consumer.flush_confirms().await, 2000);
    assert!(consumer
        .next_timeout(Duration::from_millis(300))
        .await
        .is_none());
    broker.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_survive_a_broker_restart_without_loss_or_duplicates() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let broker = Broker::start(broker_config(dir.path(), port))
        .await
        .expect("start");
    let client = Client::connect(client_config(port)).await.expect("connect");
    let producer = client.producer("r").await.expect("producer");
    let sender = tokio::spawn({
        let producer = producer.clone();
        async move {
            let mut handles = Vec::new();
            for i in 0..3000u32 {
                handles.push(
                    producer
                        .send(OutMessage::new(format!("{i}")))
                        .await
                        .expect("send"),
                );
                if i % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            let mut statuses = Vec::new();
            for h in handles {
                statuses.push(h.await.status);
            }
            statuses
        }
    });
    tokio::time::sleep(Duration::from_millis(60)).await;
    broker.stop().await.expect("stop");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let broker = Broker::start(broker_config(dir.path(), port))
        .await
        .expect("restart");
    let statuses = sender.await.expect("sender");
    assert!(
        statuses.iter().all(|s| *s == Status::Ok),
        "failed ACKs: {:?}",
        statuses.iter().filter(|s| **s != Status::Ok).count()
    );
    let mut consumer = client
        .consumer(
            "r",
            ConsumerOptions {
                max_unconfirmed_msgs: 4000,
                ..Default::default()
            },
        )
        .await
        .expect("consumer");
    let mut seen = HashSet::new();
    while seen.len() < 3000 {
        let d = consumer
            .next_timeout(Duration::from_secs(10))
            .await
            .expect("every ACKed message is delivered");
        assert!(
            seen.insert(String::from_utf8(d.payload.to_vec()).expect("utf8")),
            "duplicate delivery"
        );
        consumer.confirm(&d).await.expect("confirm");
    }
    assert!(
        consumer
            .next_timeout(Duration::from_millis(500))
            .await
            .is_none(),
        "unexpected extra message"
    );
    broker.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_without_a_server_resolves_to_timeout_within_its_bound() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let broker = Broker::start(broker_config(dir.path(), port))
        .await
        .expect("start");
    let mut cfg = client_config(port);
    cfg.put_timeout_ms = 700;
    let client = Client::connect(cfg).await.expect("connect");
    let producer = client.producer("t").await.expect("producer");
    broker.stop().await.expect("stop");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let r = producer
        .put(OutMessage::new("lost in the void"))
        .await
        .expect("send");
    assert_eq!(r.status, Status::Timeout);
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_nothing_fails_within_the_connect_timeout() {
    let port = free_port();
    let cfg = ClientConfig {
        connect_timeout_ms: 500,
        ..client_config(port)
    };
    let started = Instant::now();
    assert!(Client::connect(cfg).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_partitions_keep_order_per_key_and_spread_load() {
    use tern_client::admin::{AdminReply, AdminRequest, QueueSpec};
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let broker = Broker::start(broker_config(dir.path(), port))
        .await
        .expect("start");
    let client = Client::connect(client_config(port)).await.expect("connect");
    let spec = QueueSpec {
        partitions: Some(4),
        ..Default::default()
    };
    client
        .admin(AdminRequest::CreateQueue {
            name: "keyed".into(),
            spec,
        })
        .await
        .expect("create");
    let producer = client.producer("keyed").await.expect("producer");
    let mut handles = Vec::new();
    for i in 0..400u32 {
        let key = format!("customer-{}", i % 10);
        let msg = OutMessage {
            key: Some(key.clone().into()),
            ..OutMessage::new(format!("{key}:{i}"))
        };
        handles.push(producer.send(msg).await.expect("send"));
    }
    for h in handles {
        assert_eq!(h.await.status, Status::Ok);
    }
    // Two consumers share the partitions. Each consumer sees each key's messages in PUT
    // order (first deliveries follow commit order per partition). Across consumers the
    // processing order of one key can interleave: partition-exclusive consumers are
    // issue 3's work.
    // Small flow-control windows, so the first consumer cannot take everything.
    let small = ConsumerOptions {
        max_unconfirmed_msgs: 5,
        ..ConsumerOptions::default()
    };
    let mut a = client
        .consumer("keyed", small.clone())
        .await
        .expect("consumer a");
    let mut b = client.consumer("keyed", small).await.expect("consumer b");
    let mut per_key: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
    let mut per_key_b: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
    let mut partitions = HashSet::new();
    let (mut got_a, mut got_b) = (0, 0);
    while got_a + got_b < 400 {
        tokio::select! {
            Some(d) = a.next() => { got_a += 1; record(&d, &mut per_key, &mut partitions); a.confirm(&d).await.expect("confirm"); }
            Some(d) = b.next() => { got_b += 1; record(&d, &mut per_key_b, &mut partitions); b.confirm(&d).await.expect("confirm"); }
            _ = tokio::time::sleep(Duration::from_secs(10)) => panic!("stalled at {}", got_a + got_b),
        }
    }
    fn record(
        d: &tern_client::Delivery,
        per_key: &mut std::collections::BTreeMap<String, Vec<u32>>,
        parts: &mut HashSet<u16>,
    ) {
        let text = String::from_utf8(d.payload.to_vec()).expect("utf8");
        let (key, i) = text.split_once(':').expect("key:i");
        per_key
            .entry(key.to_string())
            .or_default()
            .push(i.parse().expect("number"));
        parts.insert(d.partition);
    }
    let all_keys: HashSet<&String> = per_key.keys().chain(per_key_b.keys()).collect();
    assert_eq!(all_keys.len(), 10);
    for (key, seq) in per_key.iter().chain(per_key_b.iter()) {
        let mut sorted = seq.clone();
        sorted.sort_unstable();
        assert_eq!(seq, &sorted, "order kept for {key}");
    }
    assert!(
        partitions.len() >= 3,
        "keys spread over partitions: {partitions:?}"
    );
    assert!(
        got_a > 0 && got_b > 0,
        "both consumers served: {got_a} / {got_b}"
    );
    let reply = client
        .admin(AdminRequest::QueueStats {
            name: "keyed".into(),
        })
        .await
        .expect("stats");
    let AdminReply::Queue(info) = reply else {
        panic!("not a queue reply")
    };
    assert_eq!(info.partitions.len(), 4);
    broker.stop().await.expect("stop");
}
