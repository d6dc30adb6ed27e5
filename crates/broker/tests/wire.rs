//! Protocol-level tests against a real broker (real sockets, real files, real fsync),
//! speaking raw frames: the contract of `docs/protocol.md` and hostile input.

use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tern_broker::{Broker, BrokerConfig};
use tern_proto::{
    Frame, FrameCodec, MessageRef, PutMessage, Status, OPEN_CONSUMER, OPEN_PRODUCER,
    PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

const WAIT: Duration = Duration::from_secs(10);

fn config(dir: &std::path::Path) -> BrokerConfig {
    BrokerConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        peer_listen: "127.0.0.1:0".parse().expect("addr"),
        min_free_disk_bytes: 0,
        ..BrokerConfig::default()
    }
}

type Conn = Framed<TcpStream, FrameCodec>;

async fn connect(broker: &Broker) -> Conn {
    let stream = TcpStream::connect(broker.client_addr)
        .await
        .expect("connect");
    let mut conn = Framed::new(stream, FrameCodec::new(tern_proto::DEFAULT_MAX_FRAME_BYTES));
    conn.send(Frame::Hello {
        version: PROTOCOL_VERSION,
        client_name: "test".into(),
    })
    .await
    .expect("hello");
    match next(&mut conn).await {
        Frame::HelloOk { version, .. } => assert_eq!(version, PROTOCOL_VERSION),
        other => panic!("expected HelloOk, got {other:?}"),
    }
    conn
}

/// The next frame that is not a heartbeat.
async fn next(conn: &mut Conn) -> Frame {
    loop {
        let frame = tokio::time::timeout(WAIT, conn.next())
            .await
            .expect("timed out")
            .expect("closed")
            .expect("decode");
        if frame != Frame::Heartbeat {
            return frame;
        }
    }
}

async fn open(conn: &mut Conn, queue: &str, flags: u8) -> u32 {
    conn.send(Frame::OpenQueue {
        req_id: 7,
        queue: queue.into(),
        subscription: String::new(),
        flags,
        max_unconfirmed_msgs: 100_000,
        max_unconfirmed_bytes: 1 << 30,
    })
    .await
    .expect("send open");
    match next(conn).await {
        Frame::OpenQueueOk {
            req_id: 7,
            queue_id,
            ..
        } => queue_id,
        other => panic!("expected OpenQueueOk, got {other:?}"),
    }
}

fn msg(i: u32) -> PutMessage {
    let mut guid = [0u8; 16];
    guid[..4].copy_from_slice(&i.to_be_bytes());
    guid[15] = 0xEE;
    PutMessage {
        guid,
        ttl_ms: 0,
        key: Bytes::new(),
        payload: Bytes::from(format!("message-{i}")),
    }
}

async fn put_all(
    conn: &mut Conn,
    handle: u32,
    range: std::ops::Range<u32>,
) -> Vec<(tern_proto::Guid, Status)> {
    let messages: Vec<PutMessage> = range.clone().map(msg).collect();
    conn.send(Frame::Put {
        queue_id: handle,
        messages,
    })
    .await
    .expect("put");
    let mut acks = Vec::new();
    while acks.len() < range.len() {
        match next(conn).await {
            Frame::Ack { acks: a } => acks.extend(a.into_iter().map(|a| (a.guid, a.status))),
            other => panic!("expected Ack, got {other:?}"),
        }
    }
    acks
}

async fn drain(conn: &mut Conn, handle: u32, n: usize) -> Vec<tern_proto::PushMessage> {
    let mut got = Vec::new();
    while got.len() < n {
        match next(conn).await {
            Frame::Push { queue_id, messages } => {
                assert_eq!(queue_id, handle);
                got.extend(messages);
            }
            other => panic!("expected Push, got {other:?}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_ack_push_confirm_round_trip_and_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(config(dir.path())).await.expect("start");
    let mut p = connect(&broker).await;
    let h = open(&mut p, "orders", OPEN_PRODUCER).await;
    let acks = put_all(&mut p, h, 0..100).await;
    assert!(acks.iter().all(|(_, s)| *s == Status::Ok), "{acks:?}");

    // A retransmission with the same GUIDs is answered with the original outcome, not enqueued again.
    let again = put_all(&mut p, h, 0..10).await;
    assert!(again.iter().all(|(_, s)| *s == Status::Ok));

    // Consume half, confirm them; then restart and find exactly the other half.
    let mut c = connect(&broker).await;
    let ch = open(&mut c, "orders", OPEN_CONSUMER).await;
    let pushed = drain(&mut c, ch, 100).await;
    let payloads: Vec<String> = pushed
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    let expected: Vec<String> = (0..100).map(|i| format!("message-{i}")).collect();
    assert_eq!(
        payloads, expected,
        "first deliveries follow commit order, no duplicates"
    );
    let refs: Vec<MessageRef> = pushed[..50]
        .iter()
        .map(|m| MessageRef {
            guid: m.guid,
            partition: m.partition,
        })
        .collect();
    c.send(Frame::Confirm {
        queue_id: ch,
        messages: refs,
    })
    .await
    .expect("confirm");
    let mut confirmed = 0;
    while confirmed < 50 {
        match next(&mut c).await {
            Frame::ConfirmAck { entries, .. } => {
                assert!(entries.iter().all(|e| e.status == Status::Ok));
                confirmed += entries.len();
            }
            other => panic!("expected ConfirmAck, got {other:?}"),
        }
    }
    drop((p, c));
    broker.stop().await.expect("stop");

    let broker = Broker::start(config(dir.path())).await.expect("restart");
    let mut c = connect(&broker).await;
    let ch = open(&mut c, "orders", OPEN_CONSUMER).await;
    let pushed = drain(&mut c, ch, 50).await;
    let payloads: Vec<String> = pushed
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    let expected: Vec<String> = (50..100).map(|i| format!("message-{i}")).collect();
    assert_eq!(payloads, expected);
    // Nothing more arrives.
    assert!(tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            if let Some(Ok(Frame::Push { .. })) = c.next().await {
                break;
            }
        }
    })
    .await
    .is_err());
    broker.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_consumer_gives_messages_back_with_attempt_raised() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(config(dir.path())).await.expect("start");
    let mut p = connect(&broker).await;
    let h = open(&mut p, "jobs", OPEN_PRODUCER).await;
    put_all(&mut p, h, 0..5).await;
    let mut c1 = connect(&broker).await;
    let h1 = open(&mut c1, "jobs", OPEN_CONSUMER).await;
    let first = drain(&mut c1, h1, 5).await;
    assert!(first.iter().all(|m| m.attempt == 1));
    drop(c1); // killed mid-stream, nothing confirmed
    let mut c2 = connect(&broker).await;
    let h2 = open(&mut c2, "jobs", OPEN_CONSUMER).await;
    let second = drain(&mut c2, h2, 5).await;
    let mut guids: Vec<_> = second.iter().map(|m| m.guid).collect();
    guids.sort();
    let mut expected: Vec<_> = first.iter().map(|m| m.guid).collect();
    expected.sort();
    assert_eq!(guids, expected);
    assert!(second.iter().all(|m| m.attempt == 2), "{second:?}");
    broker.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_closes_only_that_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(config(dir.path())).await.expect("start");
    let mut good = connect(&broker).await;
    let h = open(&mut good, "q", OPEN_PRODUCER).await;

    // 1. Garbage instead of a Hello.
    let mut raw = TcpStream::connect(broker.client_addr)
        .await
        .expect("connect");
    raw.write_all(&[0, 0, 0, 5, 0x99, 1, 2, 3, 4])
        .await
        .expect("write");
    expect_error_then_close(&mut raw).await;

    // 2. A length header far beyond the limit: rejected before the body is read.
    let mut raw = TcpStream::connect(broker.client_addr)
        .await
        .expect("connect");
    let mut buf = BytesMut::new();
    buf.put_u32(0xFFFF_FFF0);
    raw.write_all(&buf).await.expect("write");
    expect_error_then_close(&mut raw).await;

    // 3. Wrong protocol version.
    let stream = TcpStream::connect(broker.client_addr)
        .await
        .expect("connect");
    let mut conn = Framed::new(stream, FrameCodec::new(1 << 20));
    conn.send(Frame::Hello {
        version: 999,
        client_name: "old".into(),
    })
    .await
    .expect("hello");
    match next(&mut conn).await {
        Frame::Error { status, .. } => assert_eq!(status, Status::UnsupportedVersion),
        other => panic!("expected Error, got {other:?}"),
    }

    // 4. PUT on a handle that was never opened: an ACK with a clear status, connection lives.
    let mut c = connect(&broker).await;
    c.send(Frame::Put {
        queue_id: 4242,
        messages: vec![msg(1)],
    })
    .await
    .expect("put");
    match next(&mut c).await {
        Frame::Ack { acks } => assert_eq!(acks[0].status, Status::UnknownHandle),
        other => panic!("expected Ack, got {other:?}"),
    }
    // 5. CONFIRM of a GUID nobody holds.
    let ch = open(&mut c, "q", OPEN_CONSUMER).await;
    c.send(Frame::Confirm {
        queue_id: ch,
        messages: vec![MessageRef {
            guid: [9; 16],
            partition: 0,
        }],
    })
    .await
    .expect("confirm");
    match next(&mut c).await {
        Frame::ConfirmAck { entries, .. } => assert_eq!(entries[0].status, Status::UnknownMessage),
        other => panic!("expected ConfirmAck, got {other:?}"),
    }
    // 5b. NACK of a GUID nobody holds: a notice; the connection stays (step 6 uses it).
    c.send(Frame::Nack {
        queue_id: ch,
        entries: vec![tern_proto::NackEntry {
            guid: [9; 16],
            partition: 0,
            delay_ms: 0,
        }],
    })
    .await
    .expect("nack");
    match next(&mut c).await {
        Frame::Error {
            req_id: 0,
            status,
            message,
        } => {
            assert_eq!(status, Status::UnknownMessage);
            assert!(message.contains("does not hold"), "{message}");
        }
        other => panic!("expected a notice, got {other:?}"),
    }
    // 6. Bad queue name.
    c.send(Frame::OpenQueue {
        req_id: 9,
        queue: "no/slashes".into(),
        subscription: String::new(),
        flags: OPEN_PRODUCER,
        max_unconfirmed_msgs: 1,
        max_unconfirmed_bytes: 1,
    })
    .await
    .expect("open");
    match next(&mut c).await {
        Frame::Error {
            req_id: 9, status, ..
        } => assert_eq!(status, Status::InvalidArgument),
        other => panic!("expected Error, got {other:?}"),
    }

    // The well-behaved connection never noticed.
    let acks = put_all(&mut good, h, 0..3).await;
    assert!(acks.iter().all(|(_, s)| *s == Status::Ok));
    broker.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_and_quota_get_explicit_statuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.queue_defaults.max_message_bytes = 1024;
    cfg.queue_defaults.max_messages = 3;
    let broker = Broker::start(cfg).await.expect("start");
    let mut c = connect(&broker).await;
    let h = open(&mut c, "small", OPEN_PRODUCER).await;
    let mut big = msg(1);
    big.payload = Bytes::from(vec![b'x'; 2048]);
    c.send(Frame::Put {
        queue_id: h,
        messages: vec![big],
    })
    .await
    .expect("put");
    match next(&mut c).await {
        Frame::Ack { acks } => assert_eq!(acks[0].status, Status::MessageTooLarge),
        other => panic!("expected Ack, got {other:?}"),
    }
    let acks = put_all(&mut c, h, 10..15).await;
    let ok = acks.iter().filter(|(_, s)| *s == Status::Ok).count();
    let quota = acks
        .iter()
        .filter(|(_, s)| *s == Status::QuotaExceeded)
        .count();
    assert_eq!((ok, quota), (3, 2), "{acks:?}");
    broker.stop().await.expect("stop");
}

async fn expect_error_then_close(raw: &mut TcpStream) {
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match raw.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "server did not close the connection");
    let mut bytes = BytesMut::from(&got[..]);
    let mut codec = FrameCodec::new(1 << 20);
    let frame = tokio_util::codec::Decoder::decode(&mut codec, &mut bytes)
        .expect("decode")
        .expect("a frame");
    assert!(
        matches!(
            frame,
            Frame::Error {
                req_id: 0,
                status: Status::ProtocolError,
                ..
            }
        ),
        "{frame:?}"
    );
}

async fn admin(
    conn: &mut Conn,
    req: tern_proto::admin::AdminRequest,
) -> (Status, serde_json::Value) {
    let body = Bytes::from(serde_json::to_vec(&req).expect("json"));
    conn.send(Frame::AdminRequest { req_id: 77, body })
        .await
        .expect("admin");
    match next(conn).await {
        Frame::AdminResponse {
            req_id: 77,
            status,
            body,
        } => (status, serde_json::from_slice(&body).expect("json body")),
        other => panic!("expected AdminResponse, got {other:?}"),
    }
}

async fn create(
    conn: &mut Conn,
    name: &str,
    spec: tern_proto::admin::QueueSpec,
) -> (Status, serde_json::Value) {
    admin(
        conn,
        tern_proto::admin::AdminRequest::CreateQueue {
            name: name.into(),
            spec,
        },
    )
    .await
}

async fn confirm_all(conn: &mut Conn, handle: u32, pushed: &[tern_proto::PushMessage]) {
    for chunk in pushed.chunks(1000) {
        let refs = chunk
            .iter()
            .map(|m| MessageRef {
                guid: m.guid,
                partition: m.partition,
            })
            .collect();
        conn.send(Frame::Confirm {
            queue_id: handle,
            messages: refs,
        })
        .await
        .expect("confirm");
    }
    let mut n = 0;
    while n < pushed.len() {
        match next(conn).await {
            Frame::ConfirmAck { entries, .. } => n += entries.len(),
            Frame::Push { .. } => {}
            other => panic!("expected ConfirmAck, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_segments_are_released_and_state_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.segment_max_bytes = 1024 * 1024;
    cfg.snapshot_interval_bytes = 512 * 1024;
    let broker = Broker::start(cfg.clone()).await.expect("start");
    let mut c = connect(&broker).await;
    let p = open(&mut c, "big", OPEN_PRODUCER).await;
    let payload = Bytes::from(vec![b'z'; 4096]);
    let mut next_id = 0u32;
    let mut put_batch = |n: u32| {
        let messages: Vec<PutMessage> = (0..n)
            .map(|_| {
                next_id += 1;
                PutMessage {
                    payload: payload.clone(),
                    ..msg(next_id)
                }
            })
            .collect();
        messages
    };
    // 4 MiB in 16 batches of 64 messages.
    for _ in 0..16 {
        let messages = put_batch(64);
        c.send(Frame::Put {
            queue_id: p,
            messages,
        })
        .await
        .expect("put");
        let mut acked = 0;
        while acked < 64 {
            if let Frame::Ack { acks } = next(&mut c).await {
                assert!(acks.iter().all(|a| a.status == Status::Ok));
                acked += acks.len();
            }
        }
    }
    let (_, before) = admin(
        &mut c,
        tern_proto::admin::AdminRequest::QueueStats { name: "big".into() },
    )
    .await;
    let disk_before = before["partitions"][0]["log_disk_bytes"]
        .as_u64()
        .expect("bytes");
    assert!(disk_before > 4 * 1024 * 1024, "{before}");

    let mut cons = connect(&broker).await;
    let ch = open(&mut cons, "big", OPEN_CONSUMER).await;
    let pushed = drain(&mut cons, ch, 1024).await;
    confirm_all(&mut cons, ch, &pushed).await;
    // More writes move the snapshot point past the confirms; settled segments go.
    for _ in 0..4 {
        let messages = put_batch(64);
        c.send(Frame::Put {
            queue_id: p,
            messages,
        })
        .await
        .expect("put");
        let mut acked = 0;
        while acked < 64 {
            if let Frame::Ack { acks } = next(&mut c).await {
                acked += acks.len();
            }
        }
    }
    let (_, after) = admin(
        &mut c,
        tern_proto::admin::AdminRequest::QueueStats { name: "big".into() },
    )
    .await;
    let disk_after = after["partitions"][0]["log_disk_bytes"]
        .as_u64()
        .expect("bytes");
    assert!(
        disk_after < disk_before / 2,
        "before {disk_before}, after {disk_after}: {after}"
    );
    assert!(
        after["partitions"][0]["log_first_index"]
            .as_u64()
            .expect("first")
            > 1
    );
    assert_eq!(after["depth"].as_u64(), Some(256));
    drop((c, cons));
    broker.stop().await.expect("stop");

    // After the restart exactly the 256 unconfirmed messages come back, payloads intact.
    let broker = Broker::start(cfg).await.expect("restart");
    let mut cons = connect(&broker).await;
    let ch = open(&mut cons, "big", OPEN_CONSUMER).await;
    let pushed = drain(&mut cons, ch, 256).await;
    assert!(pushed.iter().all(|m| m.payload == payload));
    let mut ids: Vec<u32> = pushed
        .iter()
        .map(|m| u32::from_be_bytes(m.guid[..4].try_into().expect("4")))
        .collect();
    ids.dedup();
    assert_eq!(ids, (1025..=1280).collect::<Vec<u32>>());
    broker.stop().await.expect("stop");
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect http");
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .expect("http timeout")
        .expect("read");
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_http_serves_health_ready_metrics_and_queues() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(config(dir.path())).await.expect("start");
    let mut c = connect(&broker).await;
    let h = open(&mut c, "web", OPEN_PRODUCER).await;
    put_all(&mut c, h, 0..7).await;
    let (code, _) = http_get(broker.http_addr, "/health").await;
    assert_eq!(code, 200);
    let mut ready = 0;
    for _ in 0..50 {
        ready = http_get(broker.http_addr, "/ready").await.0;
        if ready == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ready, 200);
    let (code, metrics) = http_get(broker.http_addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("tern_queue_depth{queue=\"web\",partition=\"0\"} 7")
            || metrics.contains("tern_puts_total{queue=\"web\"} 7"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tern_fsync_latency_seconds_count"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tern_ack_latency_seconds_count"),
        "{metrics}"
    );
    let (code, body) = http_get(broker.http_addr, "/v1/queues/web").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["depth"].as_u64(), Some(7));
    let (code, _) = http_get(broker.http_addr, "/v1/queues/nope").await;
    assert_eq!(code, 404);
    let (code, body) = http_get(broker.http_addr, "/v1/queues").await;
    assert_eq!(code, 200);
    assert!(body.contains("\"web\""));
    let (code, body) = http_get(broker.http_addr, "/v1/cluster").await;
    assert_eq!(code, 200);
    assert!(body.contains("\"node_id\":1"), "{body}");
    broker.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_create_list_purge_delete() {
    use tern_proto::admin::{AdminRequest, QueueSpec};
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(config(dir.path())).await.expect("start");
    let mut c = connect(&broker).await;
    let spec = QueueSpec {
        max_messages: Some(5),
        ..Default::default()
    };
    let (status, body) = admin(
        &mut c,
        AdminRequest::CreateQueue {
            name: "a".into(),
            spec: spec.clone(),
        },
    )
    .await;
    assert_eq!(status, Status::Ok, "{body}");
    assert_eq!(body["spec"]["max_messages"].as_u64(), Some(5));
    // Same settings again: idempotent. Other settings: queue_exists.
    let (status, _) = create(&mut c, "a", spec.clone()).await;
    assert_eq!(status, Status::Ok);
    let other = QueueSpec {
        max_messages: Some(6),
        ..Default::default()
    };
    let (status, _) = create(&mut c, "a", other.clone()).await;
    assert_eq!(status, Status::QueueExists);
    let bad = QueueSpec {
        partitions: Some(0),
        ..Default::default()
    };
    let (status, body) = create(&mut c, "b", bad.clone()).await;
    assert_eq!(status, Status::InvalidArgument, "{body}");
    let h = open(&mut c, "a", OPEN_PRODUCER).await;
    put_all(&mut c, h, 0..3).await;
    let (status, _) = admin(&mut c, AdminRequest::PurgeQueue { name: "a".into() }).await;
    assert_eq!(status, Status::Ok);
    let (_, stats) = admin(&mut c, AdminRequest::QueueStats { name: "a".into() }).await;
    assert_eq!(stats["depth"].as_u64(), Some(0));
    let (_, list) = admin(&mut c, AdminRequest::ListQueues).await;
    assert_eq!(list["queues"].as_array().map(|q| q.len()), Some(1));
    let (status, _) = admin(&mut c, AdminRequest::DeleteQueue { name: "a".into() }).await;
    assert_eq!(status, Status::Ok);
    let (status, _) = admin(&mut c, AdminRequest::QueueStats { name: "a".into() }).await;
    assert_eq!(status, Status::UnknownQueue);
    let (status, _) = admin(&mut c, AdminRequest::DeleteQueue { name: "a".into() }).await;
    assert_eq!(status, Status::UnknownQueue);
    broker.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visibility_timeout_extend_and_delayed_nack() {
    use tern_proto::admin::QueueSpec;
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(config(dir.path())).await.expect("start");
    let mut c = connect(&broker).await;
    let spec = QueueSpec {
        visibility_timeout_ms: Some(400),
        ..Default::default()
    };
    let (status, body) = create(&mut c, "vt", spec).await;
    assert_eq!(status, Status::Ok, "{body}");
    let too_long = QueueSpec {
        visibility_timeout_ms: Some(13 * 3600 * 1000),
        ..Default::default()
    };
    let (status, _) = create(&mut c, "vt2", too_long).await;
    assert_eq!(status, Status::InvalidArgument);
    let h = open(&mut c, "vt", OPEN_PRODUCER).await;
    put_all(&mut c, h, 0..2).await;

    let mut cons = connect(&broker).await;
    let ch = open(&mut cons, "vt", OPEN_CONSUMER).await;
    let first = drain(&mut cons, ch, 2).await;
    assert!(first.iter().all(|m| m.attempt == 1));
    // Keep message 0 for 1.5 s more; leave message 1 to time out.
    cons.send(Frame::Extend {
        queue_id: ch,
        entries: vec![tern_proto::ExtendEntry {
            guid: first[0].guid,
            partition: 0,
            extra_ms: 1500,
        }],
    })
    .await
    .expect("extend");
    let started = std::time::Instant::now();
    let again = drain(&mut cons, ch, 1).await;
    let waited = started.elapsed();
    assert_eq!(
        again[0].guid, first[1].guid,
        "the unextended message comes back"
    );
    assert_eq!(again[0].attempt, 2);
    assert!(
        waited >= Duration::from_millis(200),
        "not before its visibility timeout: {waited:?}"
    );
    // NACK it with a delay: it returns after the delay, attempt 3.
    cons.send(Frame::Nack {
        queue_id: ch,
        entries: vec![tern_proto::NackEntry {
            guid: again[0].guid,
            partition: 0,
            delay_ms: 500,
        }],
    })
    .await
    .expect("nack");
    let started = std::time::Instant::now();
    let back = drain(&mut cons, ch, 1).await;
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );
    assert_eq!((back[0].guid, back[0].attempt), (first[1].guid, 3));
    // The extended message was never redelivered meanwhile, and can still be confirmed.
    cons.send(Frame::Confirm {
        queue_id: ch,
        messages: vec![MessageRef {
            guid: first[0].guid,
            partition: 0,
        }],
    })
    .await
    .expect("confirm");
    match next(&mut cons).await {
        Frame::ConfirmAck { entries, .. } => assert_eq!(entries[0].status, Status::Ok),
        other => panic!("expected ConfirmAck, got {other:?}"),
    }
    broker.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_ttl_expires_without_traffic_and_limits_are_checked() {
    use tern_proto::admin::{AdminRequest, QueueSpec};
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(config(dir.path())).await.expect("start");
    let mut c = connect(&broker).await;
    let contradictory = QueueSpec {
        default_ttl_ms: Some(5_000),
        max_ttl_ms: Some(1_000),
        ..Default::default()
    };
    let (status, body) = create(&mut c, "bad-ttl", contradictory).await;
    assert_eq!(status, Status::InvalidArgument, "{body}");
    let spec = QueueSpec {
        default_ttl_ms: Some(300),
        max_ttl_ms: Some(60_000),
        ..Default::default()
    };
    let (status, body) = create(&mut c, "ttl", spec).await;
    assert_eq!(status, Status::Ok, "{body}");
    let h = open(&mut c, "ttl", OPEN_PRODUCER).await;
    let acks = put_all(&mut c, h, 0..3).await;
    assert!(acks.iter().all(|(_, s)| *s == Status::Ok));
    let mut long = msg(99);
    long.ttl_ms = 120_000;
    c.send(Frame::Put {
        queue_id: h,
        messages: vec![long],
    })
    .await
    .expect("put");
    match next(&mut c).await {
        Frame::Ack { acks } => assert_eq!(acks[0].status, Status::InvalidArgument),
        other => panic!("expected Ack, got {other:?}"),
    }
    // No traffic: the leader's Tick expires them.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let (_, stats) = admin(&mut c, AdminRequest::QueueStats { name: "ttl".into() }).await;
    assert_eq!(stats["depth"].as_u64(), Some(0), "{stats}");
    assert_eq!(
        stats["partitions"][0]["expired"].as_u64(),
        Some(3),
        "{stats}"
    );
    let mut cons = connect(&broker).await;
    let _ch = open(&mut cons, "ttl", OPEN_CONSUMER).await;
    let got = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            if let Some(Ok(Frame::Push { .. })) = cons.next().await {
                break;
            }
        }
    })
    .await;
    assert!(got.is_err(), "an expired message is never PUSHed");
    broker.stop().await.expect("stop");
}
