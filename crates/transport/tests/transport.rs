//! Real sockets on 127.0.0.1: order, queueing while a peer is down, bounds, refused
//! handshakes, hostile frames and liveness. Every wait is bounded.

use bytes::Bytes;
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_transport::{Inbound, SendError, Transport, TransportConfig};

type Received = Arc<Mutex<Vec<Inbound>>>;

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn start(
    rt: &tokio::runtime::Runtime,
    id: u64,
    cluster: u64,
    addrs: &HashMap<u64, SocketAddr>,
    tune: impl FnOnce(&mut TransportConfig),
) -> (Transport, Received) {
    let mut cfg = TransportConfig::new(id, cluster, addrs[&id], addrs.clone());
    cfg.heartbeat_interval_ms = 100;
    cfg.dead_after_ms = 400;
    tune(&mut cfg);
    let got: Received = Arc::default();
    let sink = got.clone();
    let t = Transport::start(cfg, rt.handle(), move |m| {
        sink.lock().expect("lock").push(m);
    })
    .expect("start");
    (t, got)
}

fn wait_until(what: &str, bound: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for {what}");
}

fn addrs(n: u64) -> HashMap<u64, SocketAddr> {
    (1..=n).map(|id| (id, free_addr())).collect()
}

#[test]
fn three_nodes_exchange_messages_in_order_without_loss() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let a = addrs(3);
    let nodes: Vec<(Transport, Received)> =
        (1..=3).map(|id| start(&rt, id, 9, &a, |_| {})).collect();
    const N: u32 = 20_000;
    for i in 0..N {
        for (from, (t, _)) in nodes.iter().enumerate() {
            let from = from as u64 + 1;
            for to in 1..=3u64 {
                if to != from {
                    let msg = Bytes::from(format!("{from}:{i}"));
                    // The queue bound (65,536) is far above what is in flight here.
                    t.send(to, msg).expect("send");
                }
            }
        }
    }
    for (_, got) in &nodes {
        wait_until("all messages", Duration::from_secs(20), || {
            got.lock().expect("lock").len() == 2 * N as usize
        });
    }
    for (me, (_, got)) in nodes.iter().enumerate() {
        let got = got.lock().expect("lock");
        for from in 1..=3u64 {
            if from == me as u64 + 1 {
                continue;
            }
            let seq: Vec<u32> = got
                .iter()
                .filter(|m| m.from == from)
                .map(|m| {
                    let s = String::from_utf8_lossy(&m.msg).into_owned();
                    s.split(':')
                        .nth(1)
                        .and_then(|n| n.parse().ok())
                        .expect("seq")
                })
                .collect();
            assert_eq!(seq, (0..N).collect::<Vec<_>>(), "in order from {from}");
        }
    }
    for (t, _) in &nodes {
        assert!(t.peers().iter().all(|p| p.connected));
        t.shutdown();
    }
}

#[test]
fn a_peer_that_comes_up_later_gets_what_was_queued_and_bounds_hold() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let a = addrs(2);
    let (t1, _) = start(&rt, 1, 9, &a, |c| {
        c.max_queued_msgs_per_peer = 100;
        c.max_message_bytes = 1000;
    });
    for i in 0..100 {
        t1.send(2, Bytes::from(format!("{i}"))).expect("queued");
    }
    assert_eq!(
        t1.send(2, Bytes::from_static(b"x")),
        Err(SendError::Full(2))
    );
    assert_eq!(
        t1.send(2, Bytes::from(vec![0u8; 2000])),
        Err(SendError::TooLarge(2000))
    );
    assert_eq!(t1.send(7, Bytes::new()), Err(SendError::UnknownPeer(7)));
    assert!(!t1.is_alive(2));
    let (t2, got) = start(&rt, 2, 9, &a, |_| {});
    wait_until("queued messages", Duration::from_secs(10), || {
        got.lock().expect("lock").len() == 100
    });
    wait_until("liveness", Duration::from_secs(5), || {
        t2.is_alive(1) && t1.is_alive(2)
    });
    // A peer that shuts down is dead within dead_after_ms.
    t2.shutdown();
    wait_until("death noticed", Duration::from_secs(5), || !t1.is_alive(2));
    t1.shutdown();
    assert_eq!(t1.send(2, Bytes::new()), Err(SendError::Closed));
}

#[test]
fn other_clusters_and_garbage_are_refused_without_disturbing_others() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let a = addrs(3);
    let (t1, got1) = start(&rt, 1, 9, &a, |_| {});
    // Node 2 believes in another cluster: node 1 never delivers its messages.
    let (t2, _) = start(&rt, 2, 10, &a, |_| {});
    let (t3, _) = start(&rt, 3, 9, &a, |_| {});
    t2.send(1, Bytes::from_static(b"intruder")).expect("queued");
    // Garbage and an oversized length on raw sockets.
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0xff, 0xff, 0xff, 0xff, 1][..],
    ] {
        let mut s = std::net::TcpStream::connect(a[&1]).expect("connect");
        let _ = s.write_all(junk);
    }
    t3.send(1, Bytes::from_static(b"friend")).expect("queued");
    wait_until("the friend's message", Duration::from_secs(5), || {
        !got1.lock().expect("lock").is_empty()
    });
    std::thread::sleep(Duration::from_millis(300));
    let got = got1.lock().expect("lock");
    assert!(got.iter().all(|m| m.from == 3 && &m.msg[..] == b"friend"));
    assert!(!t1.is_alive(2));
    drop(got);
    for t in [t1, t2, t3] {
        t.shutdown();
    }
}
