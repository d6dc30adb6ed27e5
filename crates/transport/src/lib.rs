//! Node-to-node links of a Tern cluster.
//!
//! The transport carries **opaque messages** (`Bytes`) between node ids; the broker
//! gives them a meaning (Raft messages, forwarded PUTs, ACKs, PUSHes).
//!
//! Contract:
//! - [`Transport::send`] never blocks and may be called from any thread (the broker's
//!   node loop is a plain OS thread). Each peer has one bounded queue (messages and
//!   bytes); beyond it `send` returns [`SendError::Full`] and the message is dropped.
//! - Messages to one peer are written in send order on one TCP connection, many per
//!   write (up to `max_batch_bytes`). A message in a write that fails is lost; what is
//!   still queued is sent after the reconnect. Callers that need delivery retransmit
//!   (Raft does; the broker's coordinator resends forwarded PUTs).
//! - Each link is one direction: a node writes to a peer over its own outbound
//!   connection and reads what the peer sends on the connection the peer opened.
//!   The first frame of a connection is a handshake naming the cluster and the sender;
//!   a peer from another cluster, an unknown version, or a malformed or oversized frame
//!   closes only that connection.
//! - Liveness: an idle writer sends a heartbeat every `heartbeat_interval_ms`; a peer
//!   heard from within `dead_after_ms` is alive ([`Transport::is_alive`]).
//! - Tasks: one accept task, one reader task per inbound connection, one writer task
//!   per peer, all on the tokio runtime given to [`Transport::start`].
//!
//! Wire format: every frame is `u32 len | u8 kind | body` (len counts kind + body,
//! big-endian). Kinds: 0 handshake (`"TERNPEER" | u16 version | u64 cluster_id |
//! u64 node_id`), 1 message (body = the message), 2 heartbeat (empty body).

use bytes::{BufMut, Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

pub type NodeId = u64;

const MAGIC: &[u8; 8] = b"TERNPEER";
const VERSION: u16 = 1;
const KIND_HANDSHAKE: u8 = 0;
const KIND_MESSAGE: u8 = 1;
const KIND_HEARTBEAT: u8 = 2;
const HANDSHAKE_BODY_BYTES: usize = 8 + 2 + 8 + 8;
/// First backoff after a failed connect; doubles up to `reconnect_backoff_max_ms`.
const RECONNECT_BACKOFF_MIN_MS: u64 = 50;

/// Settings of one node's transport. Every bound has a default (see [`TransportConfig::new`]).
#[derive(Clone, Debug)]
pub struct TransportConfig {
    pub node_id: NodeId,
    /// The handshake refuses a peer that names another cluster.
    pub cluster_id: u64,
    pub listen: SocketAddr,
    /// Peer addresses; an entry for this node itself is ignored.
    pub peers: HashMap<NodeId, SocketAddr>,
    /// Bytes queued per peer before `send` returns `Full` (default 64 MiB).
    pub max_queued_bytes_per_peer: u64,
    /// Messages queued per peer before `send` returns `Full` (default 65,536).
    pub max_queued_msgs_per_peer: usize,
    /// Largest message sent or accepted (default 64 MiB).
    pub max_message_bytes: u32,
    /// Most bytes coalesced into one write (default 1 MiB).
    pub max_batch_bytes: usize,
    /// An idle link sends a heartbeat this often (default 500 ms).
    pub heartbeat_interval_ms: u64,
    /// A peer not heard from for this long is dead (default 1,500 ms).
    pub dead_after_ms: u64,
    /// Bound on one connect attempt (default 1,000 ms).
    pub connect_timeout_ms: u64,
    /// Largest pause between reconnect attempts (default 2,000 ms).
    pub reconnect_backoff_max_ms: u64,
}

impl TransportConfig {
    pub fn new(
        node_id: NodeId,
        cluster_id: u64,
        listen: SocketAddr,
        peers: HashMap<NodeId, SocketAddr>,
    ) -> Self {
        TransportConfig {
            node_id,
            cluster_id,
            listen,
            peers,
            max_queued_bytes_per_peer: 64 * 1024 * 1024,
            max_queued_msgs_per_peer: 65_536,
            max_message_bytes: 64 * 1024 * 1024,
            max_batch_bytes: 1024 * 1024,
            heartbeat_interval_ms: 500,
            dead_after_ms: 1_500,
            connect_timeout_ms: 1_000,
            reconnect_backoff_max_ms: 2_000,
        }
    }
}

/// A message received from a peer.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub from: NodeId,
    pub msg: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    #[error("no peer with id {0}")]
    UnknownPeer(NodeId),
    #[error("the queue to peer {0} is full")]
    Full(NodeId),
    #[error("message of {0} bytes exceeds the transport's limit")]
    TooLarge(usize),
    #[error("the transport is shut down")]
    Closed,
}

/// What [`Transport::peers`] reports per peer.
#[derive(Clone, Debug)]
pub struct PeerStatus {
    pub id: NodeId,
    pub addr: SocketAddr,
    pub connected: bool,
    pub last_heard_ms_ago: Option<u64>,
    pub queued_msgs: usize,
    pub queued_bytes: u64,
    pub sent_msgs: u64,
    pub received_msgs: u64,
}

/// One peer's outbound side: its bounded queue and its writer task's state.
struct Outbound {
    addr: Mutex<SocketAddr>,
    queue: Mutex<Queue>,
    wake: Notify,
    connected: AtomicBool,
    /// Connections made to the peer so far (see [`Transport::link_epoch`]).
    links: AtomicU64,
    sent_msgs: AtomicU64,
    /// Set when the peer is removed: its writer ends.
    removed: AtomicBool,
}

#[derive(Default)]
struct Queue {
    msgs: VecDeque<Bytes>,
    bytes: u64,
}

struct Inner {
    cfg: TransportConfig,
    local_addr: SocketAddr,
    rt: tokio::runtime::Handle,
    peers: Mutex<HashMap<NodeId, Arc<Outbound>>>,
    /// Per node id: when it was last heard from, and messages received.
    heard: Mutex<HashMap<NodeId, (Instant, u64)>>,
    /// Per node id: connections accepted from it so far.
    inbound_links: Mutex<HashMap<NodeId, u64>>,
    closed: AtomicBool,
    shutdown: Notify,
    deliver: Box<dyn Fn(Inbound) + Send + Sync>,
}

/// A node's links to its peers. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short locks leaves consistent data behind.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Transport {
    /// Binds the listener and starts the tasks on `rt`. `deliver` is called for every
    /// received message, from a reader task: it must not block for long.
    pub fn start(
        cfg: TransportConfig,
        rt: &tokio::runtime::Handle,
        deliver: impl Fn(Inbound) + Send + Sync + 'static,
    ) -> Result<Transport, TransportError> {
        let std_listener =
            std::net::TcpListener::bind(cfg.listen).map_err(|source| TransportError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let local_addr = std_listener
            .local_addr()
            .map_err(|source| TransportError::Listen {
                addr: cfg.listen,
                source,
            })?;
        std_listener
            .set_nonblocking(true)
            .map_err(|source| TransportError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let peers = cfg.peers.clone();
        let inner = Arc::new(Inner {
            cfg,
            local_addr,
            rt: rt.clone(),
            peers: Mutex::new(HashMap::new()),
            heard: Mutex::new(HashMap::new()),
            inbound_links: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            shutdown: Notify::new(),
            deliver: Box::new(deliver),
        });
        let t = Transport { inner };
        {
            let _guard = rt.enter();
            let listener =
                TcpListener::from_std(std_listener).map_err(|source| TransportError::Listen {
                    addr: t.inner.cfg.listen,
                    source,
                })?;
            rt.spawn(accept_loop(t.inner.clone(), listener));
        }
        for (id, addr) in peers {
            t.set_peer(id, addr);
        }
        Ok(t)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Queues one message for a peer (never blocks).
    pub fn send(&self, to: NodeId, msg: Bytes) -> Result<(), SendError> {
        self.send_many(to, std::iter::once(msg))
    }

    /// Queues messages for a peer in order; stops at the first that does not fit.
    pub fn send_many(
        &self,
        to: NodeId,
        msgs: impl IntoIterator<Item = Bytes>,
    ) -> Result<(), SendError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(SendError::Closed);
        }
        let out = lock(&self.inner.peers)
            .get(&to)
            .cloned()
            .ok_or(SendError::UnknownPeer(to))?;
        let cfg = &self.inner.cfg;
        let mut result = Ok(());
        {
            let mut q = lock(&out.queue);
            for msg in msgs {
                if msg.len() > cfg.max_message_bytes as usize {
                    result = Err(SendError::TooLarge(msg.len()));
                    break;
                }
                if q.msgs.len() >= cfg.max_queued_msgs_per_peer
                    || q.bytes + msg.len() as u64 > cfg.max_queued_bytes_per_peer
                {
                    result = Err(SendError::Full(to));
                    break;
                }
                q.bytes += msg.len() as u64;
                q.msgs.push_back(msg);
            }
        }
        out.wake.notify_one();
        result
    }

    /// Adds a peer or changes its address (its writer reconnects).
    pub fn set_peer(&self, id: NodeId, addr: SocketAddr) {
        if id == self.inner.cfg.node_id {
            return;
        }
        let mut peers = lock(&self.inner.peers);
        if let Some(out) = peers.get(&id) {
            *lock(&out.addr) = addr;
            return;
        }
        let out = Arc::new(Outbound {
            addr: Mutex::new(addr),
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            connected: AtomicBool::new(false),
            links: AtomicU64::new(0),
            sent_msgs: AtomicU64::new(0),
            removed: AtomicBool::new(false),
        });
        peers.insert(id, out.clone());
        self.inner
            .rt
            .spawn(writer_loop(self.inner.clone(), id, out));
    }

    pub fn remove_peer(&self, id: NodeId) {
        if let Some(out) = lock(&self.inner.peers).remove(&id) {
            out.removed.store(true, Ordering::Release);
            out.wake.notify_one();
        }
    }

    /// The ids of the peers this node has links to, sorted (cheaper than [`Self::peers`]).
    pub fn peer_ids(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = lock(&self.inner.peers).keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    pub fn peers(&self) -> Vec<PeerStatus> {
        let heard = lock(&self.inner.heard).clone();
        let mut out: Vec<PeerStatus> = lock(&self.inner.peers)
            .iter()
            .map(|(id, o)| {
                let q = lock(&o.queue);
                let h = heard.get(id);
                PeerStatus {
                    id: *id,
                    addr: *lock(&o.addr),
                    connected: o.connected.load(Ordering::Relaxed),
                    last_heard_ms_ago: h.map(|(t, _)| t.elapsed().as_millis() as u64),
                    queued_msgs: q.msgs.len(),
                    queued_bytes: q.bytes,
                    sent_msgs: o.sent_msgs.load(Ordering::Relaxed),
                    received_msgs: h.map_or(0, |(_, n)| *n),
                }
            })
            .collect();
        out.sort_by_key(|p| p.id);
        out
    }

    /// How many connections to and from `id` were made so far. A link that breaks
    /// loses what was in flight on it (written to the socket, not yet read by the
    /// peer), and every new connection raises this number: a caller that sees it
    /// change treats what it sent to `id` without an answer as possibly lost.
    pub fn link_epoch(&self, id: NodeId) -> u64 {
        let outbound = lock(&self.inner.peers)
            .get(&id)
            .map_or(0, |o| o.links.load(Ordering::Relaxed));
        let inbound = lock(&self.inner.inbound_links)
            .get(&id)
            .copied()
            .unwrap_or(0);
        outbound + inbound
    }

    /// Whether `id` was heard from within `dead_after_ms`.
    pub fn is_alive(&self, id: NodeId) -> bool {
        let bound = Duration::from_millis(self.inner.cfg.dead_after_ms);
        lock(&self.inner.heard)
            .get(&id)
            .is_some_and(|(t, _)| t.elapsed() < bound)
    }

    /// Stops every task and closes every link; returns at once (tasks end within
    /// their next wake-up, bounded by the heartbeat interval).
    /// `shutdown` was called.
    pub fn is_shut_down(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    pub fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.shutdown.notify_waiters();
        for out in lock(&self.inner.peers).values() {
            out.removed.store(true, Ordering::Release);
            out.wake.notify_one();
        }
    }
}

// ----- outbound ---------------------------------------------------------------------

async fn writer_loop(inner: Arc<Inner>, id: NodeId, out: Arc<Outbound>) {
    let mut backoff_ms = RECONNECT_BACKOFF_MIN_MS;
    while !stopped(&inner, &out) {
        let addr = *lock(&out.addr);
        match connect(&inner, addr).await {
            Ok(stream) => {
                backoff_ms = RECONNECT_BACKOFF_MIN_MS;
                out.connected.store(true, Ordering::Relaxed);
                out.links.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = write_link(&inner, &out, stream).await {
                    tracing::debug!(peer = id, %addr, "peer link lost: {e}");
                }
                out.connected.store(false, Ordering::Relaxed);
            }
            Err(e) => tracing::trace!(peer = id, %addr, "connect failed: {e}"),
        }
        // Jitter without a random source: the node id spreads simultaneous reconnects.
        let pause = backoff_ms + (inner.cfg.node_id * 7 + id * 13) % 50;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(pause)) => {}
            _ = inner.shutdown.notified() => {}
        }
        backoff_ms = (backoff_ms * 2).min(inner.cfg.reconnect_backoff_max_ms);
    }
}

fn stopped(inner: &Inner, out: &Outbound) -> bool {
    inner.closed.load(Ordering::Acquire) || out.removed.load(Ordering::Acquire)
}

async fn connect(inner: &Inner, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let timeout = Duration::from_millis(inner.cfg.connect_timeout_ms);
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Writes the handshake, then batches of queued messages (or heartbeats) until an
/// error or shutdown.
async fn write_link(inner: &Inner, out: &Outbound, mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(inner.cfg.max_batch_bytes + 64);
    put_frame_header(&mut buf, KIND_HANDSHAKE, HANDSHAKE_BODY_BYTES);
    buf.put_slice(MAGIC);
    buf.put_u16(VERSION);
    buf.put_u64(inner.cfg.cluster_id);
    buf.put_u64(inner.cfg.node_id);
    stream.write_all(&buf).await?;
    let heartbeat = Duration::from_millis(inner.cfg.heartbeat_interval_ms);
    loop {
        if stopped(inner, out) {
            return Ok(());
        }
        buf.clear();
        let count = fill_batch(inner, out, &mut buf);
        if count == 0 {
            tokio::select! {
                _ = out.wake.notified() => continue,
                _ = tokio::time::sleep(heartbeat) => {
                    put_frame_header(&mut buf, KIND_HEARTBEAT, 0);
                }
            }
        }
        stream.write_all(&buf).await?;
        out.sent_msgs.fetch_add(count as u64, Ordering::Relaxed);
    }
}

/// Moves queued messages into `buf` as frames, up to the batch bound (at least one).
fn fill_batch(inner: &Inner, out: &Outbound, buf: &mut BytesMut) -> usize {
    let mut q = lock(&out.queue);
    let mut count = 0;
    while let Some(msg) = q.msgs.front() {
        if count > 0 && buf.len() + msg.len() + 5 > inner.cfg.max_batch_bytes {
            break;
        }
        let Some(msg) = q.msgs.pop_front() else { break };
        q.bytes -= msg.len() as u64;
        put_frame_header(buf, KIND_MESSAGE, msg.len());
        buf.put_slice(&msg);
        count += 1;
    }
    count
}

fn put_frame_header(buf: &mut BytesMut, kind: u8, body_len: usize) {
    buf.put_u32((body_len + 1) as u32);
    buf.put_u8(kind);
}

// ----- inbound ----------------------------------------------------------------------

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = inner.shutdown.notified() => return,
        };
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        match accepted {
            Ok((stream, addr)) => {
                let _ = stream.set_nodelay(true);
                let inner = inner.clone();
                tokio::spawn(async move {
                    if let Err(e) = read_link(&inner, stream).await {
                        tracing::debug!(%addr, "inbound peer link closed: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("peer accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("peer silent for {0} ms")]
    Silent(u64),
    #[error("bad frame: {0}")]
    Bad(String),
}

async fn read_link(inner: &Inner, mut stream: TcpStream) -> Result<(), LinkError> {
    let (kind, body) = read_frame(inner, &mut stream).await?;
    let from = check_handshake(inner, kind, &body)?;
    loop {
        let (kind, body) = read_frame(inner, &mut stream).await?;
        {
            let mut heard = lock(&inner.heard);
            let entry = heard.entry(from).or_insert((Instant::now(), 0));
            entry.0 = Instant::now();
            if kind == KIND_MESSAGE {
                entry.1 += 1;
            }
        }
        match kind {
            KIND_MESSAGE => (inner.deliver)(Inbound { from, msg: body }),
            KIND_HEARTBEAT => {}
            other => return Err(LinkError::Bad(format!("unknown frame kind {other}"))),
        }
        if inner.closed.load(Ordering::Acquire) {
            return Ok(());
        }
    }
}

fn check_handshake(inner: &Inner, kind: u8, body: &[u8]) -> Result<NodeId, LinkError> {
    if kind != KIND_HANDSHAKE || body.len() != HANDSHAKE_BODY_BYTES || &body[..8] != MAGIC {
        return Err(LinkError::Bad("not a Tern peer handshake".into()));
    }
    let version = u16::from_be_bytes([body[8], body[9]]);
    if version != VERSION {
        return Err(LinkError::Bad(format!("peer speaks version {version}")));
    }
    let mut cluster = [0u8; 8];
    cluster.copy_from_slice(&body[10..18]);
    if u64::from_be_bytes(cluster) != inner.cfg.cluster_id {
        tracing::warn!("refused a peer of another cluster (different --initial-cluster)");
        return Err(LinkError::Bad("peer of another cluster".into()));
    }
    let mut node = [0u8; 8];
    node.copy_from_slice(&body[18..26]);
    let from = u64::from_be_bytes(node);
    *lock(&inner.inbound_links).entry(from).or_insert(0) += 1;
    // Counts as heard: a fresh link is a live peer.
    lock(&inner.heard)
        .entry(from)
        .and_modify(|e| e.0 = Instant::now())
        .or_insert((Instant::now(), 0));
    Ok(from)
}

/// Reads one frame, bounded in size and in time (a peer silent past `dead_after_ms`
/// is cut off).
async fn read_frame(inner: &Inner, stream: &mut TcpStream) -> Result<(u8, Bytes), LinkError> {
    let silent_ms = inner.cfg.dead_after_ms;
    let bound = Duration::from_millis(silent_ms);
    let mut header = [0u8; 5];
    tokio::time::timeout(bound, stream.read_exact(&mut header))
        .await
        .map_err(|_| LinkError::Silent(silent_ms))??;
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len == 0 || len - 1 > inner.cfg.max_message_bytes as usize {
        return Err(LinkError::Bad(format!("frame length {len}")));
    }
    let mut body = BytesMut::zeroed(len - 1);
    tokio::time::timeout(bound, stream.read_exact(&mut body))
        .await
        .map_err(|_| LinkError::Silent(silent_ms))??;
    Ok((header[4], body.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_the_bound_but_take_at_least_one() {
        let rt = tokio::runtime::Runtime::new().expect("rt");
        let mut cfg =
            TransportConfig::new(1, 7, "127.0.0.1:0".parse().expect("addr"), HashMap::new());
        cfg.max_batch_bytes = 100;
        let t = Transport::start(cfg, rt.handle(), |_| {}).expect("start");
        let out = Outbound {
            addr: Mutex::new("127.0.0.1:1".parse().expect("addr")),
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            connected: AtomicBool::new(false),
            links: AtomicU64::new(0),
            sent_msgs: AtomicU64::new(0),
            removed: AtomicBool::new(false),
        };
        {
            let mut q = lock(&out.queue);
            for n in [200usize, 30, 30, 30] {
                q.bytes += n as u64;
                q.msgs.push_back(Bytes::from(vec![0u8; n]));
            }
        }
        let mut buf = BytesMut::new();
        assert_eq!(
            fill_batch(&t.inner, &out, &mut buf),
            1,
            "a big message alone"
        );
        buf.clear();
        assert_eq!(
            fill_batch(&t.inner, &out, &mut buf),
            2,
            "then two of 35 bytes"
        );
        assert!(buf.len() <= 100);
        t.shutdown();
    }

    /// Two real transports on 127.0.0.1: the epoch counts both directions' links, and
    /// a peer that restarts (its links broke) is seen with a higher epoch.
    #[test]
    fn a_broken_link_raises_the_link_epoch() {
        let rt = tokio::runtime::Runtime::new().expect("rt");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let a = Transport::start(
            TransportConfig::new(1, 7, any, HashMap::new()),
            rt.handle(),
            |_| {},
        )
        .expect("a");
        let start_b = |listen| {
            Transport::start(
                TransportConfig::new(2, 7, listen, HashMap::new()),
                rt.handle(),
                |_| {},
            )
            .expect("b")
        };
        let b = start_b(any);
        let b_addr = b.local_addr();
        a.set_peer(2, b_addr);
        b.set_peer(1, a.local_addr());
        let wait_for = |what: &str, cond: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !cond() {
                assert!(Instant::now() < deadline, "{what}");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        wait_for("both links up", &|| a.link_epoch(2) == 2);
        b.shutdown();
        drop(b);
        std::thread::sleep(Duration::from_millis(100));
        let b = start_b(b_addr);
        b.set_peer(1, a.local_addr());
        wait_for("links made again", &|| a.link_epoch(2) >= 4);
        a.shutdown();
        b.shutdown();
    }
}
