//! The node loop: one OS thread that owns every Raft group of this node, their state
//! machines and dispatchers, and all disk I/O of the data path.
//!
//! Contract:
//! - Runs on its own thread (`tern-node`), never on the tokio runtime, because it
//!   blocks in fsync. Everything else talks to it through [`NodeCmd`]s on one bounded
//!   channel; it answers through per-connection outbound channels and oneshots.
//! - One round of the loop: take every queued command (bounded per round), turn the
//!   PUTs and CONFIRMs of each partition into ONE Raft entry (group commit: one
//!   fdatasync for the whole batch), tick, persist and apply Ready, answer, dispatch.
//! - ACK after apply: a PUT's ACK is sent only when its entry is committed, fsynced and
//!   applied, and only if the applied entry is the one proposed (same index and term).
//! - A storage error is fatal: the loop returns it and the process exits.

mod cluster;
mod link;
mod membership;
pub mod meta;
mod partition;

use crate::clock::Map;
use crate::config::BrokerConfig;
use crate::metrics::Metrics;
pub use link::Link;
use meta::{MetaCommand, MetaOutcome, MetaState, QueueDef, META_GROUP_ID};
use partition::{config_from_spec, Partition};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_proto::admin::{AdminReply, AdminRequest, QueueInfo, QueueSpec};
use tern_proto::{Frame, MessageRef, NackEntry, PutMessage, Status};
use tern_queue::{ConsumerId, FlowLimits};
use tern_replication::{Group, GroupConfig, ReplicationError};
use tokio::sync::oneshot;

/// Identifies one client connection.
pub type ConnId = u64;

/// The outbound side of a client connection: frames the node sends to it.
///
/// A local connection is an unbounded channel, bounded by construction: it carries
/// ACKs for at most `max_inflight_puts_per_conn` PUTs, PUSHes within the consumer's
/// flow-control window, and one reply per request. A connection of another node
/// (this node leads a partition that node's client uses) sends frames back through
/// the transport, whose per-peer queue is bounded.
#[derive(Clone)]
pub struct ConnTx {
    pub id: ConnId,
    route: Route,
}

#[derive(Clone)]
enum Route {
    Local(flume::Sender<Frame>),
    Remote {
        node: u64,
        conn: ConnId,
        transport: Option<Link>,
        max_frame_bytes: u32,
    },
}

impl std::fmt::Debug for ConnTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.route {
            Route::Local(_) => write!(f, "ConnTx(local {})", self.id),
            Route::Remote { node, conn, .. } => write!(f, "ConnTx(node {node} conn {conn})"),
        }
    }
}

/// Connection and consumer ids carry the node id in their top bits, so ids made on
/// different nodes never collide.
const NODE_ID_SHIFT: u32 = 40;

impl ConnTx {
    pub fn new(id: ConnId, tx: flume::Sender<Frame>) -> Self {
        ConnTx {
            id,
            route: Route::Local(tx),
        }
    }

    /// Connection `conn` of node `node`: frames for it go back through the transport.
    pub fn remote(node: u64, conn: ConnId, transport: Option<Link>, max_frame_bytes: u32) -> Self {
        ConnTx {
            id: (node << NODE_ID_SHIFT) ^ conn,
            route: Route::Remote {
                node,
                conn,
                transport,
                max_frame_bytes,
            },
        }
    }

    /// Whether this is another node's client connection (frames go back through the
    /// transport).
    pub fn is_remote(&self) -> bool {
        matches!(self.route, Route::Remote { .. })
    }

    /// Sends a frame; a closed connection is not an error (its client will retransmit).
    pub fn send(&self, frame: Frame) {
        match &self.route {
            Route::Local(tx) => {
                let _ = tx.send(frame);
            }
            Route::Remote {
                node,
                conn,
                transport,
                max_frame_bytes,
            } => {
                let (Some(t), Some(frame)) =
                    (transport, cluster::encode_frame(frame, *max_frame_bytes))
                else {
                    return;
                };
                let msg = crate::peer::PeerMsg::ToConn { conn: *conn, frame };
                let _ = t.send(*node, msg.encode());
            }
        }
    }
}

/// Whether a consumer id was made on another node.
pub(crate) fn is_remote_consumer(id: ConsumerId, node_id: u64) -> bool {
    id >> NODE_ID_SHIFT != node_id
}

/// A refused request: the status and a message for the client.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub status: Status,
    pub message: String,
}

impl Rejection {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Rejection {
            status,
            message: message.into(),
        }
    }
}

/// What a successful OpenQueue gives the connection.
#[derive(Clone, Debug)]
pub struct Opened {
    pub partitions: u16,
    pub consumer: Option<ConsumerId>,
}

/// Requests to the node loop.
pub enum NodeCmd {
    /// On success the node itself sends `OpenQueueOk` on `conn`, ahead of any PUSH for the handle.
    Open {
        conn: ConnTx,
        req_id: u32,
        handle_id: u32,
        queue: String,
        subscription: String,
        /// Some = this handle consumes, with these flow-control limits.
        consumer: Option<FlowLimits>,
        reply: oneshot::Sender<Result<Opened, Rejection>>,
    },
    CloseConsumer {
        consumer: ConsumerId,
    },
    Configure {
        consumer: ConsumerId,
        limits: FlowLimits,
    },
    Put {
        conn: ConnTx,
        queue: Arc<str>,
        messages: Vec<PutMessage>,
        received: Instant,
    },
    Confirm {
        conn: ConnTx,
        handle_id: u32,
        consumer: ConsumerId,
        queue: Arc<str>,
        messages: Vec<MessageRef>,
    },
    Nack {
        consumer: ConsumerId,
        queue: Arc<str>,
        entries: Vec<NackEntry>,
    },
    Extend {
        consumer: ConsumerId,
        queue: Arc<str>,
        entries: Vec<tern_proto::ExtendEntry>,
    },
    ConnClosed {
        conn: ConnId,
        consumers: Vec<ConsumerId>,
    },
    /// A message from another node (through the transport).
    Peer {
        from: u64,
        msg: bytes::Bytes,
    },
    Admin {
        req: AdminRequest,
        reply: oneshot::Sender<Result<AdminReply, Rejection>>,
    },
    /// Graceful stop, first step: hand every group this node leads to another replica;
    /// the reply comes when none is led here any more, or after the bound.
    ReleaseLeadership {
        reply: oneshot::Sender<()>,
    },
    /// Graceful stop: snapshot every group and leave the loop.
    Stop {
        reply: oneshot::Sender<()>,
    },
}

/// Errors that stop the node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("replication storage failed: {0}")]
    Replication(#[from] ReplicationError),
    #[error("cannot use the data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt metadata snapshot: {0}")]
    Meta(String),
    #[error("cluster: {0}")]
    Cluster(String),
}

/// Handle held by the async side.
pub struct NodeHandle {
    pub tx: flume::Sender<NodeCmd>,
    pub ready: Arc<AtomicBool>,
    pub thread: std::thread::JoinHandle<Result<(), NodeError>>,
}

/// Upper bound of a queue's visibility timeout (as SQS: 12 hours).
const MAX_VISIBILITY_TIMEOUT_MS: u64 = 12 * 3600 * 1000;
/// Most commands taken from the channel in one round (bounds the round's latency).
const MAX_CMDS_PER_ROUND: usize = 4096;
/// Most Ready passes per round before going back to the channel.
const MAX_READY_PASSES: usize = 4;
/// Graceful stop: how long to wait for leadership transfers to complete.
const LEADERSHIP_RELEASE_MS: u64 = 5_000;
/// Connection id of the node itself (dead-letter PUTs); client connections start at 1.
const INTERNAL_CONN_ID: ConnId = 0;

pub(crate) use crate::clock::now_ms;

/// Opens storage (so startup errors surface before serving) and starts the node thread.
///
/// `rt` runs the node-to-node transport (multi-node clusters only).
pub fn start(
    cfg: BrokerConfig,
    metrics: Arc<Metrics>,
    rt: &tokio::runtime::Handle,
) -> Result<NodeHandle, NodeError> {
    let (tx, rx) = flume::bounded(cfg.node_queue_capacity);
    let peer_book = PeerBook::default();
    let transport = start_transport(&cfg, rt, tx.clone(), &peer_book)?;
    let node = Node::open(cfg, metrics, transport.map(Link::Tcp), peer_book)?;
    let ready = node.ready.clone();
    let thread = std::thread::Builder::new()
        .name("tern-node".into())
        .spawn(move || node.run(rx))
        .map_err(|source| NodeError::DataDir {
            path: "thread".into(),
            source,
        })?;
    Ok(NodeHandle { tx, ready, thread })
}

/// Starts the node-to-node transport when a member list is given (even of one node,
/// so the cluster can grow with `tern cluster add-node`). Peer messages enter the node
/// loop's channel like client commands (a full channel slows the peer's link:
/// back-pressure, not loss). Peer names are resolved by [`resolve_peers`], never here:
/// a member that is down (its name unknown to DNS) must not stop this node starting.
fn start_transport(
    cfg: &BrokerConfig,
    rt: &tokio::runtime::Handle,
    tx: flume::Sender<NodeCmd>,
    book: &PeerBook,
) -> Result<Option<tern_transport::Transport>, NodeError> {
    let members = cfg
        .members()
        .map_err(|e| NodeError::Cluster(e.to_string()))?;
    if members.is_empty() && !cfg.join {
        return Ok(None);
    }
    book.set(members.iter().filter(|(id, _)| *id != cfg.node_id).cloned());
    let tcfg = tern_transport::TransportConfig::new(
        cfg.node_id,
        cluster_id(&members),
        cfg.peer_listen,
        std::collections::HashMap::new(),
    );
    let transport = tern_transport::Transport::start(tcfg, rt, move |inbound| {
        let _ = tx.send(NodeCmd::Peer {
            from: inbound.from,
            msg: inbound.msg,
        });
    })
    .map_err(|e| {
        NodeError::Cluster(format!(
            "cannot start the peer transport on {}: {e}",
            cfg.peer_listen
        ))
    })?;
    rt.spawn(resolve_peers(book.clone(), transport.clone()));
    Ok(Some(transport))
}

/// The members' peer addresses as given (`HOST:PORT`), shared between the node loop
/// (which changes them on membership changes) and [`resolve_peers`].
#[derive(Clone, Default)]
pub(crate) struct PeerBook(Arc<std::sync::Mutex<BTreeMap<u64, String>>>);

impl PeerBook {
    pub(crate) fn set(&self, members: impl Iterator<Item = (u64, String)>) {
        if let Ok(mut b) = self.0.lock() {
            *b = members.collect();
        }
    }

    fn snapshot(&self) -> Vec<(u64, String)> {
        self.0
            .lock()
            .map(|b| b.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default()
    }
}

/// How often peer names are resolved again: a restarted container may come back at
/// another address, and a stopped one's name may not resolve for a while.
const PEER_RESOLVE_INTERVAL: Duration = Duration::from_secs(2);

/// Resolves every member's name now and then, off the node loop, and points the
/// transport at the result. A name that does not resolve is logged once and retried;
/// it never stops the node. Ends when the transport shuts down.
async fn resolve_peers(book: PeerBook, transport: tern_transport::Transport) {
    let mut known: std::collections::HashMap<u64, std::net::SocketAddr> =
        std::collections::HashMap::new();
    let mut warned: std::collections::HashSet<u64> = std::collections::HashSet::new();
    loop {
        for (id, name) in book.snapshot() {
            let lookup =
                tokio::time::timeout(PEER_RESOLVE_INTERVAL, tokio::net::lookup_host(name.clone()));
            match lookup.await {
                Ok(Ok(mut addrs)) => {
                    if let Some(addr) = addrs.next() {
                        warned.remove(&id);
                        if known.insert(id, addr) != Some(addr) {
                            tracing::info!(node = id, %addr, "peer address resolved");
                            transport.set_peer(id, addr);
                        }
                    }
                }
                _ => {
                    if warned.insert(id) {
                        tracing::warn!(
                            node = id,
                            name,
                            "cannot resolve a member's peer address yet; retrying"
                        );
                    }
                }
            }
        }
        if transport.is_shut_down() {
            return;
        }
        tokio::time::sleep(PEER_RESOLVE_INTERVAL).await;
    }
}

/// Members of one cluster agree on this id; a node started with another member list is
/// refused by the transport's handshake instead of joining the wrong cluster.
fn cluster_id(members: &[(u64, String)]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (id, _) in members {
        for b in id.to_be_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

enum MetaWaiter {
    Admin(oneshot::Sender<Result<AdminReply, Rejection>>),
    Open(Box<NodeCmd>),
}

/// What a consumer asks of a message it holds, other than CONFIRM.
#[derive(Clone, Copy, Debug)]
pub(super) enum HeldOp {
    /// Give it back, now or after a delay (ms).
    Nack,
    /// Push its visibility deadline out (ms).
    Extend,
}

impl HeldOp {
    fn name(self) -> &'static str {
        match self {
            HeldOp::Nack => "NACK",
            HeldOp::Extend => "Extend",
        }
    }
}

struct Consumer {
    conn: ConnTx,
    handle_id: u32,
    queue: Arc<str>,
    subscription: String,
    limits: FlowLimits,
}

/// An admin subscribe/unsubscribe in progress: answered when every partition applied it.
struct SubscriptionOpWait {
    remaining: usize,
    all_ok: bool,
    what: String,
    reply: oneshot::Sender<Result<AdminReply, Rejection>>,
}

/// A dead letter on its way to a dead-letter queue: where to settle it once ACKed.
struct DeadLetterWait {
    source_gid: u64,
    subscription: String,
    original_guid: tern_proto::Guid,
}

/// A purge in progress: the reply goes out when every partition applied it.
struct PurgeWait {
    remaining: usize,
    removed: u64,
    reply: oneshot::Sender<Result<AdminReply, Rejection>>,
}

pub struct Node {
    cfg: BrokerConfig,
    metrics: Arc<Metrics>,
    meta_group: Group,
    meta: MetaState,
    meta_pending: BTreeMap<u64, (u64, MetaWaiter)>,
    partitions: Map<u64, Partition>,
    consumers: Map<ConsumerId, Consumer>,
    next_consumer_id: ConsumerId,
    purges: Map<u64, PurgeWait>,
    next_purge_id: u64,
    subscription_ops: Map<u64, SubscriptionOpWait>,
    /// Dead letters PUT to dead-letter queues, by their GUID there.
    dead_letter_waits: Map<tern_proto::Guid, DeadLetterWait>,
    /// The node's own "connection" for dead-letter PUTs: their ACKs come back here.
    internal_tx: ConnTx,
    internal_rx: flume::Receiver<Frame>,
    /// Payload bytes accepted and not yet answered, over all partitions.
    pending_put_bytes: u64,
    ready: Arc<AtomicBool>,
    disk: DiskGuard,
    stopping: bool,
    /// None for a single-node cluster.
    transport: Option<Link>,
    /// Members' peer addresses for the resolver task (see [`resolve_peers`]).
    peer_book: PeerBook,
    cluster: cluster::ClusterState,
}

impl Node {
    pub(crate) fn open(
        cfg: BrokerConfig,
        metrics: Arc<Metrics>,
        transport: Option<Link>,
        peer_book: PeerBook,
    ) -> Result<Node, NodeError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| NodeError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        })?;
        let mut gcfg = group_config(&cfg, META_GROUP_ID, true, cfg.member_ids());
        gcfg.log.segment_max_bytes = 8 * 1024 * 1024;
        let (mut meta_group, snapshot) = Group::open(&gcfg)?;
        let mut meta = match snapshot {
            Some(bytes) => MetaState::decode(&bytes).map_err(|e| NodeError::Meta(e.to_string()))?,
            None => MetaState::new(),
        };
        meta.seed_members(&initial_members(&cfg));
        meta_group.campaign_if_sole_voter()?;
        // Ids made here carry the node id in their top bits (unique cluster-wide) and
        // start from the clock, so a restarted node does not reuse its old ids.
        let first_id = (cfg.node_id << NODE_ID_SHIFT) + ((now_ms() & 0xffff) << 24) + 1;
        let disk = DiskGuard::new(cfg.data_dir.clone(), cfg.min_free_disk_bytes);
        // Bounded by construction: at most MAX_DEAD_LETTERS_IN_FLIGHT ACKs per partition.
        let (internal, internal_rx) = flume::unbounded();
        let mut node = Node {
            cfg,
            metrics,
            meta_group,
            meta,
            meta_pending: BTreeMap::new(),
            partitions: Map::default(),
            consumers: Map::default(),
            next_consumer_id: first_id,
            purges: Map::default(),
            next_purge_id: 1,
            subscription_ops: Map::default(),
            dead_letter_waits: Map::default(),
            internal_tx: ConnTx::new(INTERNAL_CONN_ID, internal),
            internal_rx,
            pending_put_bytes: 0,
            ready: Arc::new(AtomicBool::new(false)),
            disk,
            stopping: false,
            transport,
            peer_book,
            cluster: cluster::ClusterState {
                incarnation: now_ms(),
                ..Default::default()
            },
        };
        node.open_all_partitions()?;
        node.sync_transport_peers();
        Ok(node)
    }

    fn run(mut self, rx: flume::Receiver<NodeCmd>) -> Result<(), NodeError> {
        let tick = Duration::from_millis(self.cfg.tick_interval_ms);
        let mut next_tick = crate::clock::now() + tick;
        let mut busy = true;
        let mut stop_reply = None;
        loop {
            let wait = if busy {
                Duration::ZERO
            } else {
                next_tick.saturating_duration_since(crate::clock::now())
            };
            match rx.recv_timeout(wait) {
                Ok(cmd) => stop_reply = stop_reply.or(self.handle(cmd)),
                Err(flume::RecvTimeoutError::Timeout) => {}
                Err(flume::RecvTimeoutError::Disconnected) => break,
            }
            for _ in 0..MAX_CMDS_PER_ROUND {
                match rx.try_recv() {
                    Ok(cmd) => stop_reply = stop_reply.or(self.handle(cmd)),
                    Err(_) => break,
                }
            }
            busy = self.turn(&mut next_tick)?;
            if let Some(reply) = stop_reply.take() {
                self.stop()?;
                let _ = reply.send(());
                return Ok(());
            }
        }
        self.stop()
    }

    /// The work of one round after its commands were handled: propose, tick when
    /// `next_tick` passed, persist and apply Ready, answer, dispatch, snapshot.
    /// Returns whether more Ready work is waiting (the loop then does not sleep).
    pub(crate) fn turn(&mut self, next_tick: &mut Instant) -> Result<bool, NodeError> {
        self.resend_forwarded();
        self.home_consumers();
        self.flush_proposals();
        self.poll_admin();
        self.gossip_leaders();
        self.release_leadership();
        if crate::clock::now() >= *next_tick {
            self.tick_all();
            self.reconcile_membership();
            *next_tick = crate::clock::now() + Duration::from_millis(self.cfg.tick_interval_ms);
        }
        let busy = self.process_readies()?;
        self.process_dead_letters()?;
        self.dispatch_all();
        self.maybe_snapshot()?;
        self.update_ready_flag();
        let outstanding: usize = self
            .partitions
            .values()
            .map(|p| p.outstanding_puts())
            .sum::<usize>()
            + self.cluster.forwarded.len();
        self.metrics.pending_puts.set(outstanding as i64);
        Ok(busy)
    }

    /// Where a PUT waits on this node, for the simulator's failure reports.
    #[cfg(feature = "sim")]
    pub(crate) fn find_put(&self, guid: &tern_proto::Guid) -> Vec<String> {
        let mut out = Vec::new();
        for (gid, p) in &self.partitions {
            out.extend(
                p.find_put(guid)
                    .into_iter()
                    .map(|w| format!("group {gid}: {w}")),
            );
        }
        if let Some(f) = self.cluster.forwarded.get(guid) {
            out.push(format!(
                "forwarded for group {} (leader known: {:?})",
                f.gid,
                self.leader_of(f.gid)
            ));
        }
        out
    }

    /// Each led partition's consumers, what they hold and where they live
    /// (failure reports).
    #[cfg(feature = "sim")]
    pub(crate) fn holders(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (gid, p) in &self.partitions {
            if !p.group.is_leader() {
                continue;
            }
            for (c, held) in p.holders() {
                let home = self.cluster.remote_consumers.get(&c).map(|(n, _, _)| *n);
                let conn = self.consumers.get(&c).map(|k| format!("{:?}", k.conn));
                out.push(format!(
                    "group {gid}: consumer {c} holds {held} (home {home:?}, conn {conn:?})"
                ));
            }
        }
        out
    }

    /// Handles one command. Returns the reply channel of a Stop request.
    pub(crate) fn handle(&mut self, cmd: NodeCmd) -> Option<oneshot::Sender<()>> {
        match cmd {
            NodeCmd::Open { .. } => self.handle_open(cmd),
            NodeCmd::CloseConsumer { consumer } => self.remove_consumer(consumer),
            NodeCmd::Configure { consumer, limits } => self.configure_consumer(consumer, limits),
            NodeCmd::Put {
                conn,
                queue,
                messages,
                received,
            } => self.handle_put(conn, &queue, messages, received),
            NodeCmd::Confirm {
                conn,
                handle_id,
                consumer,
                queue,
                messages,
            } => self.handle_confirm(conn, handle_id, consumer, &queue, messages),
            NodeCmd::Nack {
                consumer,
                queue,
                entries,
            } => self.handle_nack(consumer, &queue, entries),
            NodeCmd::Extend {
                consumer,
                queue,
                entries,
            } => self.handle_extend(consumer, &queue, entries),
            NodeCmd::ConnClosed { conn, consumers } => {
                for c in consumers {
                    self.remove_consumer(c);
                }
                self.cluster.local_conns.remove(&conn);
            }
            NodeCmd::Peer { from, msg } => self.handle_peer(from, msg),
            NodeCmd::ReleaseLeadership { reply } => {
                let deadline = crate::clock::now() + Duration::from_millis(LEADERSHIP_RELEASE_MS);
                self.cluster.releasing = Some((reply, deadline));
            }
            NodeCmd::Admin { req, reply } => self.handle_admin(req, reply),
            NodeCmd::Stop { reply } => {
                self.stopping = true;
                return Some(reply);
            }
        }
        None
    }

    // ----- queues and partitions -------------------------------------------------

    fn open_all_partitions(&mut self) -> Result<(), NodeError> {
        let defs: Vec<QueueDef> = self.meta.queues().cloned().collect();
        for def in &defs {
            self.open_partitions(def)?;
        }
        Ok(())
    }

    /// Opens this node's replicas of `def`'s partitions:
    /// - a group with files here opens from them (whatever its configuration says);
    /// - a group placed here at the queue's creation bootstraps with that placement,
    ///   exactly as every other first replica did;
    /// - a group placed here later (membership changed) opens *without* a
    ///   configuration and waits for its leader to add it and send a snapshot;
    /// - a group whose replica was removed from here stays closed unless placement
    ///   brings it back (then it starts over without a configuration).
    fn open_partitions(&mut self, def: &QueueDef) -> Result<(), NodeError> {
        let queue: Arc<str> = Arc::from(def.name.as_str());
        let me = self.cfg.node_id;
        for (p, gid) in def.group_ids() {
            if self.partitions.contains_key(&gid) {
                continue;
            }
            let dir = group_dir(&self.cfg, gid);
            let durable = def.spec.storage.as_deref() != Some("memory");
            if !durable && !self.is_cluster() {
                // A single node's memory queue starts empty after a restart: what was
                // written without fsync is not trusted. (In a cluster the replicas keep
                // it: after a process restart the page cache still has it, and after a
                // machine crash the replica is skipped below and the others serve.)
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(NodeError::DataDir { path: dir, source }),
                }
            }
            let removed = dir.join(membership::REMOVED_MARKER).exists();
            let has_files = !removed && dir.join("state").exists();
            let initial = def.replicas_of(p, me);
            let target = self
                .meta
                .target_replicas(def, p, self.cfg.replication_factor);
            let replicas = if has_files || (!removed && initial.contains(&me)) {
                initial
            } else if target.contains(&me) {
                if removed {
                    std::fs::remove_dir_all(&dir).map_err(|source| NodeError::DataDir {
                        path: dir.clone(),
                        source,
                    })?;
                }
                Vec::new()
            } else {
                continue; // another node's partition: reached through its leader
            };
            let gcfg = group_config(&self.cfg, gid, durable, replicas);
            let config = config_from_spec(&def.spec);
            let part = match Partition::open(queue.clone(), p, &gcfg, config.clone()) {
                Ok(part) => part,
                Err(e) if !durable => {
                    // A memory queue's replica that lost its unsynced tail (machine
                    // crash): not served from here; the other replicas hold the messages.
                    tracing::error!(queue = %def.name, partition = p, "memory queue replica not opened (its unsynced log was lost): {e}");
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            self.partitions.insert(gid, part);
        }
        Ok(())
    }

    fn queue_partition_ids(&self, queue: &str) -> Option<Vec<u64>> {
        self.meta
            .queue(queue)
            .map(|d| d.group_ids().map(|(_, g)| g).collect())
    }

    fn handle_open(&mut self, cmd: NodeCmd) {
        let NodeCmd::Open {
            conn,
            req_id,
            handle_id,
            queue,
            subscription,
            consumer,
            reply,
        } = cmd
        else {
            return;
        };
        if let Err(e) = meta::validate_queue_name(&queue) {
            let _ = reply.send(Err(Rejection::new(Status::InvalidArgument, e)));
            return;
        }
        let Some(def) = self.meta.queue(&queue).cloned() else {
            if !self.cfg.auto_create_queues {
                let _ = reply.send(Err(Rejection::new(
                    Status::UnknownQueue,
                    format!("no queue named {queue:?}"),
                )));
                return;
            }
            let spec = match self.effective_spec(&queue, &QueueSpec::default()) {
                Ok(s) => s,
                Err(r) => {
                    let _ = reply.send(Err(r));
                    return;
                }
            };
            let open = NodeCmd::Open {
                conn,
                req_id,
                handle_id,
                queue: queue.clone(),
                subscription,
                consumer,
                reply,
            };
            if self.is_cluster() && !self.meta_group.is_leader() {
                let req = AdminRequest::CreateQueue {
                    name: queue,
                    spec: QueueSpec::default(),
                };
                self.create_remotely_then_open(req, open);
                return;
            }
            let cmd = self.create_command(queue, spec);
            self.propose_meta(cmd, MetaWaiter::Open(Box::new(open)));
            return;
        };
        self.cluster.local_conns.insert(conn.id, conn.clone());
        if consumer.is_some() {
            if let Err(e) = check_subscription(&def, &subscription) {
                let _ = reply.send(Err(Rejection::new(Status::InvalidArgument, e)));
                return;
            }
        }
        // OpenQueueOk goes out on the connection's channel before the first PUSH can.
        conn.send(Frame::OpenQueueOk {
            req_id,
            queue_id: handle_id,
            partitions: def.partitions,
        });
        let consumer_id =
            consumer.map(|limits| self.add_consumer(conn, handle_id, &def, &subscription, limits));
        let sent = reply.send(Ok(Opened {
            partitions: def.partitions,
            consumer: consumer_id,
        }));
        if sent.is_err() {
            // Nobody waits for this open any more (the connection closed, or gave up
            // on a slow open): its ConnClosed did not know this consumer, so it would
            // hold messages forever. Found by the whole-cluster simulator.
            if let Some(c) = consumer_id {
                self.remove_consumer(c);
            }
        }
    }

    fn add_consumer(
        &mut self,
        conn: ConnTx,
        handle_id: u32,
        def: &QueueDef,
        subscription: &str,
        limits: FlowLimits,
    ) -> ConsumerId {
        let id = self.next_consumer_id;
        self.next_consumer_id += 1;
        let queue: Arc<str> = Arc::from(def.name.as_str());
        for (_, gid) in def.group_ids() {
            if let Some(p) = self.partitions.get_mut(&gid) {
                p.add_consumer(id, subscription, limits);
            }
        }
        self.consumers.insert(
            id,
            Consumer {
                conn,
                handle_id,
                queue,
                subscription: subscription.to_owned(),
                limits,
            },
        );
        // Partitions led elsewhere get it attached by `home_consumers` this round.
        id
    }

    fn remove_consumer(&mut self, id: ConsumerId) {
        let Some(c) = self.consumers.remove(&id) else {
            return;
        };
        self.unhome_consumer(id);
        for gid in self.queue_partition_ids(&c.queue).unwrap_or_default() {
            if let Some(p) = self.partitions.get_mut(&gid) {
                p.remove_consumer(id);
            }
        }
    }

    fn configure_consumer(&mut self, id: ConsumerId, limits: FlowLimits) {
        let Some(c) = self.consumers.get_mut(&id) else {
            return;
        };
        c.limits = limits;
        let queue = c.queue.clone();
        for gid in self.queue_partition_ids(&queue).unwrap_or_default() {
            if let Some(p) = self.partitions.get_mut(&gid) {
                p.set_consumer_limits(id, limits);
            }
        }
    }

    // ----- data path -------------------------------------------------------------

    fn handle_put(
        &mut self,
        conn: ConnTx,
        queue: &str,
        messages: Vec<PutMessage>,
        received: Instant,
    ) {
        if self.stopping {
            // The loop is leaving: no ACK, the connection closes and the client
            // retransmits with the same GUIDs elsewhere (or after the restart).
            return;
        }
        let Some(gids) = self.queue_partition_ids(queue) else {
            reject_puts(&conn, &messages, Status::UnknownQueue);
            return;
        };
        self.metrics
            .puts
            .get_or_create(&queue_labels(queue))
            .inc_by(messages.len() as u64);
        let status = self.admission(&messages);
        if status != Status::Ok {
            self.count_acks(queue, status, messages.len());
            reject_puts(&conn, &messages, status);
            return;
        }
        let messages = messages
            .into_iter()
            .map(|m| tern_queue::PutMessage {
                guid: m.guid,
                ttl_ms: m.ttl_ms,
                key: m.key,
                payload: m.payload,
                dead_letter: None,
            })
            .collect();
        self.route_puts(conn, &gids, messages, received);
    }

    /// Hands PUTs to their partitions. A message's key picks its partition, so order is
    /// kept per key; keyless messages are spread.
    fn route_puts(
        &mut self,
        conn: ConnTx,
        gids: &[u64],
        messages: Vec<tern_queue::PutMessage>,
        received: Instant,
    ) {
        let bytes: u64 = messages.iter().map(|m| m.payload.len() as u64).sum();
        self.pending_put_bytes += bytes;
        if gids.len() == 1 {
            self.enqueue_or_forward(gids[0], conn, messages, received);
            return;
        }
        let mut by_partition: BTreeMap<usize, Vec<tern_queue::PutMessage>> = BTreeMap::new();
        for m in messages {
            // Unkeyed messages spread by GUID: a retransmission (another connection,
            // another node) lands in the same partition, whose dedup history knows it.
            // (Spreading by connection sent retries elsewhere: duplicates that no
            // dedup could see, found by the whole-cluster simulator.)
            let p = if m.key.is_empty() {
                key_partition(&m.guid, gids.len())
            } else {
                key_partition(&m.key, gids.len())
            };
            by_partition.entry(p).or_default().push(m);
        }
        for (p, msgs) in by_partition {
            self.enqueue_or_forward(gids[p], conn.clone(), msgs, received);
        }
    }

    // ----- dead letters ----------------------------------------------------------

    /// Moves due dead letters to their dead-letter queues (a PUT from the node itself),
    /// and settles in the source partition those whose PUT was ACKed.
    fn process_dead_letters(&mut self) -> Result<(), NodeError> {
        self.take_internal_acks();
        let now = now_ms();
        let due: Vec<u64> = self
            .partitions
            .iter()
            .filter(|(_, p)| p.has_dead_letters_due())
            .map(|(gid, _)| *gid)
            .collect();
        for gid in due {
            let Some(part) = self.partitions.get(&gid) else {
                continue;
            };
            let dlq = self
                .meta
                .queue(&part.queue)
                .and_then(|d| d.spec.dead_letter_queue.clone());
            let target = dlq.as_deref().and_then(|q| self.queue_partition_ids(q));
            if dlq.is_some() && target.is_none() {
                continue; // the dead-letter queue is gone: keep them due (visible in stats)
            }
            let Some(part) = self.partitions.get_mut(&gid) else {
                continue;
            };
            let outs = part.take_dead_letters(now, dlq.as_deref())?;
            let (Some(target), false) = (target, outs.is_empty()) else {
                continue;
            };
            let mut messages = Vec::with_capacity(outs.len());
            for out in outs {
                self.dead_letter_waits.insert(
                    out.message.guid,
                    DeadLetterWait {
                        source_gid: gid,
                        subscription: out.subscription,
                        original_guid: out.guid,
                    },
                );
                messages.push(out.message);
            }
            let conn = self.internal_tx.clone();
            self.route_puts(conn, &target, messages, crate::clock::now());
        }
        Ok(())
    }

    fn take_internal_acks(&mut self) {
        let now = now_ms();
        while let Ok(frame) = self.internal_rx.try_recv() {
            let Frame::Ack { acks } = frame else {
                continue;
            };
            for ack in acks {
                let Some(w) = self.dead_letter_waits.remove(&ack.guid) else {
                    continue;
                };
                let written = ack.status == Status::Ok;
                if !written {
                    tracing::warn!(status = %ack.status.name(), "dead-letter queue refused a dead letter; retrying");
                }
                if let Some(p) = self.partitions.get_mut(&w.source_gid) {
                    p.dead_letter_done(w.subscription, w.original_guid, written, now);
                }
            }
        }
    }

    /// Server-wide admission: memory bound and disk reserve. Per-queue quotas are
    /// decided by the state machine (deterministically, on every replica).
    fn admission(&mut self, messages: &[PutMessage]) -> Status {
        let bytes: u64 = messages.iter().map(|m| m.payload.len() as u64).sum();
        if self.pending_put_bytes + bytes > self.cfg.max_pending_put_bytes {
            return Status::Overloaded;
        }
        if !self.disk.has_room() {
            return Status::StorageFull;
        }
        Status::Ok
    }

    fn handle_confirm(
        &mut self,
        conn: ConnTx,
        handle_id: u32,
        consumer: ConsumerId,
        queue: &str,
        refs: Vec<MessageRef>,
    ) {
        let Some(gids) = self.queue_partition_ids(queue) else {
            return;
        };
        let mut rejected = Vec::new();
        let mut by_partition: BTreeMap<usize, Vec<tern_proto::Guid>> = BTreeMap::new();
        for r in refs {
            match gids.get(usize::from(r.partition)) {
                Some(_) => by_partition
                    .entry(usize::from(r.partition))
                    .or_default()
                    .push(r.guid),
                None => rejected.push(r.guid),
            }
        }
        for (p, guids) in by_partition {
            let gid = gids[p];
            match self.cluster.consumer_homes.get(&(consumer, gid)).copied() {
                Some(home) if home != self.cfg.node_id => {
                    // Led elsewhere: the leader answers with a ConfirmAck through us.
                    // Remembered until then, to resend if that leader fails.
                    let since = crate::clock::now();
                    for g in &guids {
                        if self.cluster.forwarded_confirms.len() < cluster::MAX_FORWARDED_CONFIRMS {
                            self.cluster
                                .forwarded_confirms
                                .insert((conn.id, handle_id, *g), (consumer, gid, since));
                        }
                    }
                    let msg = crate::peer::PeerMsg::Confirm {
                        group: gid,
                        consumer,
                        conn: conn.id,
                        handle: handle_id,
                        resent: false,
                        guids,
                    };
                    self.send_peer(home, &msg);
                }
                _ => {
                    if let Some(part) = self.partitions.get_mut(&gid) {
                        rejected.extend(
                            part.enqueue_confirms(&conn, handle_id, consumer, guids, false),
                        );
                    }
                }
            }
        }
        answer_unknown_confirms(&conn, handle_id, rejected);
    }

    fn handle_nack(&mut self, consumer: ConsumerId, queue: &str, entries: Vec<NackEntry>) {
        let entries = entries
            .into_iter()
            .map(|e| (e.partition, e.guid, e.delay_ms));
        self.handle_held_op(consumer, queue, HeldOp::Nack, entries);
    }

    fn handle_extend(
        &mut self,
        consumer: ConsumerId,
        queue: &str,
        entries: Vec<tern_proto::ExtendEntry>,
    ) {
        let entries = entries
            .into_iter()
            .map(|e| (e.partition, e.guid, e.extra_ms));
        self.handle_held_op(consumer, queue, HeldOp::Extend, entries);
    }

    /// Routes NACKs or Extends (partition, GUID, ms): to the partition's leader
    /// elsewhere, or applied here.
    fn handle_held_op(
        &mut self,
        consumer: ConsumerId,
        queue: &str,
        op: HeldOp,
        entries: impl Iterator<Item = (u16, tern_proto::Guid, u32)>,
    ) {
        let Some(gids) = self.queue_partition_ids(queue) else {
            return;
        };
        for (partition, guid, ms) in entries {
            let Some(&gid) = gids.get(usize::from(partition)) else {
                continue;
            };
            match self.cluster.consumer_homes.get(&(consumer, gid)).copied() {
                Some(home) if home != self.cfg.node_id => {
                    let entries = vec![(guid, ms)];
                    let msg = match op {
                        HeldOp::Nack => crate::peer::PeerMsg::Nack {
                            group: gid,
                            consumer,
                            entries,
                        },
                        HeldOp::Extend => crate::peer::PeerMsg::Extend {
                            group: gid,
                            consumer,
                            entries,
                        },
                    };
                    self.send_peer(home, &msg);
                }
                _ => self.apply_held_op(gid, consumer, op, &[(guid, ms)]),
            }
        }
    }

    /// Applies NACKs (delay ms) or Extends (extra ms) of `consumer` to partition `gid`
    /// led here; the consumer is told of any message it does not hold.
    pub(super) fn apply_held_op(
        &mut self,
        gid: u64,
        consumer: ConsumerId,
        op: HeldOp,
        entries: &[(tern_proto::Guid, u32)],
    ) {
        let Some(part) = self.partitions.get_mut(&gid) else {
            return;
        };
        let now = now_ms();
        let not_held: Vec<tern_proto::Guid> = entries
            .iter()
            .filter(|(guid, ms)| {
                let held = match op {
                    HeldOp::Nack => part.nack(consumer, *guid, now, u64::from(*ms)),
                    HeldOp::Extend => part.extend(consumer, *guid, now, u64::from(*ms)),
                };
                !held
            })
            .map(|(guid, _)| *guid)
            .collect();
        for guid in not_held {
            self.notify_not_held(consumer, &guid, op.name());
        }
    }

    /// A NACK or Extend for a message this consumer does not hold: the consumer is told
    /// with a notice (`Error`, request id 0, `unknown_message`; the connection stays).
    fn notify_not_held(&self, consumer: ConsumerId, guid: &tern_proto::Guid, what: &str) {
        if let Some(c) = self.consumers.get(&consumer) {
            c.conn.send(Frame::Error {
                req_id: 0,
                status: Status::UnknownMessage,
                message: format!(
                    "{what} of {} ignored: this consumer does not hold that message",
                    tern_proto::guid_hex(guid)
                ),
            });
        }
    }

    fn flush_proposals(&mut self) {
        let max_entry_bytes = self.cfg.max_entry_bytes;
        for part in self.partitions.values_mut() {
            part.flush(max_entry_bytes, &self.metrics);
        }
    }

    fn tick_all(&mut self) {
        self.meta_group.tick();
        let put_timeout = Duration::from_millis(self.cfg.put_timeout_ms);
        let now = now_ms();
        for part in self.partitions.values_mut() {
            part.group.tick();
            part.check_timers(now);
            part.maybe_propose_tick(now, &self.metrics);
            let expired = part.expire_parked(put_timeout);
            self.pending_put_bytes = self.pending_put_bytes.saturating_sub(expired);
        }
        self.expire_forwarded(put_timeout);
        self.drop_dead_peers_consumers();
        self.disk.refresh();
        for part in self.partitions.values() {
            part.update_gauges(&self.metrics);
        }
    }

    /// Persists and applies every group's Ready. Returns true if more work is waiting.
    fn process_readies(&mut self) -> Result<bool, NodeError> {
        for _ in 0..MAX_READY_PASSES {
            let mut any = false;
            any |= self.process_meta_ready()?;
            let gids: Vec<u64> = self.partitions.keys().copied().collect();
            for gid in gids {
                any |= self.process_partition_ready(gid)?;
            }
            if !any {
                return Ok(false);
            }
        }
        Ok(self.meta_group.has_ready() || self.partitions.values().any(|p| p.group.has_ready()))
    }

    fn process_partition_ready(&mut self, gid: u64) -> Result<bool, NodeError> {
        let Some(part) = self.partitions.get_mut(&gid) else {
            return Ok(false);
        };
        let Some(mut out) = part.group.handle_ready()? else {
            return Ok(false);
        };
        let msgs = std::mem::take(&mut out.messages);
        self.send_raft(gid, msgs);
        let Some(part) = self.partitions.get_mut(&gid) else {
            return Ok(false);
        };
        if let Some(d) = out.sync_duration {
            self.metrics.fsync_latency.observe(d.as_secs_f64());
        }
        let membership = std::mem::take(&mut out.membership);
        let result = part.apply_ready(out, &self.metrics);
        self.pending_put_bytes = self.pending_put_bytes.saturating_sub(result.answered_bytes);
        for (purge_id, removed) in result.purged {
            self.finish_purge(purge_id, removed);
        }
        for (op_id, ok) in result.subscription_ops {
            self.finish_subscription_op(op_id, ok);
        }
        if !membership.is_empty() {
            self.after_partition_membership(gid, &membership)?;
        }
        Ok(true)
    }

    fn process_meta_ready(&mut self) -> Result<bool, NodeError> {
        let Some(mut out) = self.meta_group.handle_ready()? else {
            return Ok(false);
        };
        let msgs = std::mem::take(&mut out.messages);
        self.send_raft(META_GROUP_ID, msgs);
        if let Some(d) = out.sync_duration {
            self.metrics.fsync_latency.observe(d.as_secs_f64());
        }
        if let Some(bytes) = out.installed_snapshot.take() {
            self.install_meta_snapshot(&bytes)?;
        }
        let membership = std::mem::take(&mut out.membership);
        self.after_meta_membership(&membership)?;
        for entry in out.committed {
            // An empty entry (a new leader's, or a membership change) may sit where a
            // proposal of a deposed term was: that one is answered "retry".
            let outcome = if entry.data.is_empty() {
                None
            } else {
                match serde_json::from_slice::<MetaCommand>(&entry.data) {
                    Ok(cmd) => Some(self.apply_meta(&cmd)?),
                    Err(e) => {
                        tracing::error!(
                            index = entry.index,
                            "undecodable metadata entry skipped: {e}"
                        );
                        None
                    }
                }
            };
            if let Some((term, waiter)) = self.meta_pending.remove(&entry.index) {
                match outcome {
                    Some(outcome) if term == entry.term => self.answer_meta(waiter, outcome),
                    _ => self.answer_meta_lost(waiter),
                }
            }
        }
        Ok(true)
    }

    /// The metadata leader's snapshot replaced ours: open the partitions of queues we
    /// did not know and drop those of queues deleted meanwhile.
    fn install_meta_snapshot(&mut self, bytes: &[u8]) -> Result<(), NodeError> {
        let mut new = MetaState::decode(bytes).map_err(|e| NodeError::Meta(e.to_string()))?;
        new.seed_members(&initial_members(&self.cfg));
        let old = std::mem::replace(&mut self.meta, new);
        let deleted: Vec<QueueDef> = old
            .queues()
            .filter(|d| self.meta.queue(&d.name) != Some(*d))
            .cloned()
            .collect();
        for def in &deleted {
            self.drop_partitions(def);
        }
        let created: Vec<QueueDef> = self
            .meta
            .queues()
            .filter(|d| old.queue(&d.name) != Some(*d))
            .cloned()
            .collect();
        for def in &created {
            self.open_partitions(def)?;
        }
        // Members may have changed too: new peers, and partitions placed here now.
        self.sync_transport_peers();
        self.open_all_partitions()?;
        tracing::info!(
            dropped = deleted.len(),
            opened = created.len(),
            "metadata restored from the leader's snapshot"
        );
        Ok(())
    }

    fn apply_meta(&mut self, cmd: &MetaCommand) -> Result<MetaOutcome, NodeError> {
        let outcome = self.meta.apply(cmd);
        match &outcome {
            MetaOutcome::Created(def) => {
                self.open_partitions(def)?;
                self.campaign_if_first(def);
            }
            MetaOutcome::Deleted(def) => self.drop_partitions(def),
            MetaOutcome::Members => {
                self.sync_transport_peers();
                self.open_all_partitions()?;
            }
            MetaOutcome::Exists(_) | MetaOutcome::NotFound | MetaOutcome::MembersRefused(_) => {}
        }
        Ok(outcome)
    }

    fn drop_partitions(&mut self, def: &QueueDef) {
        let consumers: Vec<ConsumerId> = self
            .consumers
            .iter()
            .filter(|(_, c)| &*c.queue == def.name.as_str())
            .map(|(id, _)| *id)
            .collect();
        for c in consumers {
            self.consumers.remove(&c);
        }
        for (_, gid) in def.group_ids() {
            if let Some(part) = self.partitions.remove(&gid) {
                let bytes = part.fail_all(Status::UnknownQueue);
                self.pending_put_bytes = self.pending_put_bytes.saturating_sub(bytes);
                let dir = group_dir(&self.cfg, gid);
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(dir = %dir.display(), "could not remove a deleted queue's files: {e}");
                }
            }
        }
    }

    fn propose_meta(&mut self, cmd: MetaCommand, waiter: MetaWaiter) {
        let data = match serde_json::to_vec(&cmd) {
            Ok(d) => d,
            Err(e) => {
                return self
                    .answer_meta_err(waiter, Rejection::new(Status::Internal, e.to_string()))
            }
        };
        match self.meta_group.propose(data.into()) {
            Ok((index, term)) => {
                self.meta_pending.insert(index, (term, waiter));
            }
            Err(e) => {
                self.answer_meta_err(waiter, Rejection::new(Status::Unavailable, e.to_string()))
            }
        }
    }

    fn answer_meta(&mut self, waiter: MetaWaiter, outcome: MetaOutcome) {
        match waiter {
            MetaWaiter::Open(cmd) => {
                // The queue now exists (created by us or concurrently): open again.
                self.handle_open(*cmd);
            }
            MetaWaiter::Admin(reply) => {
                let result = match outcome {
                    MetaOutcome::Created(def) => Ok(AdminReply::Queue(self.queue_info(&def))),
                    MetaOutcome::Exists(def) => Err(Rejection::new(
                        Status::QueueExists,
                        format!("queue {:?} already exists", def.name),
                    )),
                    MetaOutcome::Deleted(_) | MetaOutcome::Members => {
                        Ok(AdminReply::Done { done: true })
                    }
                    MetaOutcome::MembersRefused(reason) => {
                        Err(Rejection::new(Status::InvalidArgument, reason))
                    }
                    MetaOutcome::NotFound => {
                        Err(Rejection::new(Status::UnknownQueue, "no such queue"))
                    }
                };
                let _ = reply.send(result);
            }
        }
    }

    fn answer_meta_lost(&mut self, waiter: MetaWaiter) {
        self.answer_meta_err(
            waiter,
            Rejection::new(Status::Unavailable, "leadership changed; retry"),
        );
    }

    fn answer_meta_err(&mut self, waiter: MetaWaiter, r: Rejection) {
        match waiter {
            MetaWaiter::Admin(reply) => {
                let _ = reply.send(Err(r));
            }
            MetaWaiter::Open(cmd) => {
                if let NodeCmd::Open { reply, .. } = *cmd {
                    let _ = reply.send(Err(r));
                }
            }
        }
    }

    fn dispatch_all(&mut self) {
        let consumers = self.consumers_view();
        for part in self.partitions.values_mut() {
            if let Err(e) = part.dispatch(&consumers, &self.metrics) {
                tracing::error!(queue = %part.queue, partition = part.index, "cannot read payloads to push: {e}");
            }
        }
    }

    fn consumers_view(&self) -> Map<ConsumerId, (ConnTx, u32)> {
        // Cheap: a handful of consumers per partition; rebuilt per round only when dispatching.
        self.consumers
            .iter()
            .map(|(id, c)| (*id, (c.conn.clone(), c.handle_id)))
            .collect()
    }

    fn maybe_snapshot(&mut self) -> Result<(), NodeError> {
        let interval = self.cfg.snapshot_interval_bytes;
        for part in self.partitions.values_mut() {
            part.maybe_snapshot(interval)?;
        }
        Ok(())
    }

    fn update_ready_flag(&self) {
        // Ready = this node can serve: the metadata group and every local partition
        // have a leader somewhere (a coordinator forwards to it).
        let ready = !self.stopping
            && self.meta_group.leader_id().is_some()
            && self
                .partitions
                .values()
                .all(|p| p.group.leader_id().is_some());
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub(crate) fn stop(&mut self) -> Result<(), NodeError> {
        self.ready.store(false, Ordering::Relaxed);
        for part in self.partitions.values_mut() {
            part.snapshot_now()?;
        }
        tracing::info!("node loop stopped; state snapshotted");
        Ok(())
    }

    // ----- admin -----------------------------------------------------------------

    /// A queue creation with its placement: the proposer chooses the replicas, so every
    /// node stores the same definition.
    fn create_command(&self, name: String, spec: QueueSpec) -> MetaCommand {
        let members = self.meta.member_ids();
        let factor = self.cfg.replication_factor.min(members.len()).max(1);
        let replicas = meta::place(&name, spec.partitions.unwrap_or(1), &members, factor);
        MetaCommand::CreateQueue {
            name,
            spec,
            now_ms: now_ms(),
            replicas,
        }
    }

    fn handle_admin(
        &mut self,
        req: AdminRequest,
        reply: oneshot::Sender<Result<AdminReply, Rejection>>,
    ) {
        let Some((req, reply)) = self.forward_admin(req, reply) else {
            return;
        };
        match req {
            AdminRequest::CreateQueue { name, spec } => {
                if let Err(e) = meta::validate_queue_name(&name) {
                    let _ = reply.send(Err(Rejection::new(Status::InvalidArgument, e)));
                    return;
                }
                match self.effective_spec(&name, &spec) {
                    Ok(spec) => {
                        if let Some(def) = self.meta.queue(&name) {
                            let result = if def.spec == spec {
                                Ok(AdminReply::Queue(self.queue_info(&def.clone())))
                            } else {
                                Err(Rejection::new(
                                    Status::QueueExists,
                                    format!("queue {name:?} exists with other settings"),
                                ))
                            };
                            let _ = reply.send(result);
                            return;
                        }
                        let cmd = self.create_command(name, spec);
                        self.propose_meta(cmd, MetaWaiter::Admin(reply));
                    }
                    Err(r) => {
                        let _ = reply.send(Err(r));
                    }
                }
            }
            AdminRequest::DeleteQueue { name } => {
                if let Some(user) = self
                    .meta
                    .queues()
                    .find(|d| d.name != name && d.spec.dead_letter_queue.as_deref() == Some(&name))
                {
                    let _ = reply.send(Err(Rejection::new(
                        Status::InvalidArgument,
                        format!(
                            "queue {name:?} is the dead-letter queue of {:?}; delete that queue first",
                            user.name
                        ),
                    )));
                    return;
                }
                if self.meta.queue(&name).is_none() {
                    let _ = reply.send(Err(Rejection::new(
                        Status::UnknownQueue,
                        format!("no queue named {name:?}"),
                    )));
                    return;
                }
                self.propose_meta(MetaCommand::DeleteQueue { name }, MetaWaiter::Admin(reply));
            }
            AdminRequest::PurgeQueue { name } => self.start_purge(&name, reply),
            AdminRequest::CreateSubscription { queue, name } => {
                self.start_subscription_op(&queue, &name, true, reply)
            }
            AdminRequest::DeleteSubscription { queue, name } => {
                self.start_subscription_op(&queue, &name, false, reply)
            }
            AdminRequest::ListQueues => {
                let defs: Vec<QueueDef> = self.meta.queues().cloned().collect();
                let queues = defs.iter().map(|d| self.queue_info(d)).collect();
                let _ = reply.send(Ok(AdminReply::Queues { queues }));
            }
            AdminRequest::QueueStats { name } => {
                let result = match self.meta.queue(&name).cloned() {
                    Some(def) => Ok(AdminReply::Queue(self.queue_info(&def))),
                    None => Err(Rejection::new(
                        Status::UnknownQueue,
                        format!("no queue named {name:?}"),
                    )),
                };
                let _ = reply.send(result);
            }
            AdminRequest::ClusterStatus => {
                let _ = reply.send(Ok(AdminReply::Cluster(self.cluster_status())));
            }
            AdminRequest::AddNode { id, peer_addr } => self.admin_add_node(id, peer_addr, reply),
            AdminRequest::RemoveNode { id } => {
                if !self.is_cluster() {
                    let _ = reply.send(Err(Rejection::new(
                        Status::InvalidArgument,
                        "a single-node server has no members to remove",
                    )));
                    return;
                }
                self.propose_meta(MetaCommand::RemoveNode { id }, MetaWaiter::Admin(reply));
            }
        }
    }

    fn admin_add_node(
        &mut self,
        id: u64,
        peer_addr: String,
        reply: oneshot::Sender<Result<AdminReply, Rejection>>,
    ) {
        let invalid = |m: String| Err(Rejection::new(Status::InvalidArgument, m));
        let result = if !self.is_cluster() {
            invalid(
                "a server started without --initial-cluster cannot add nodes: start it with --initial-cluster 1=HOST:PORT"
                    .into(),
            )
        } else if id == 0 {
            invalid("node ids start at 1".into())
        } else if peer_addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            invalid(format!("{peer_addr:?} is not HOST:PORT"))
        } else {
            Ok(())
        };
        match result {
            Ok(()) => self.propose_meta(
                MetaCommand::AddNode { id, peer_addr },
                MetaWaiter::Admin(reply),
            ),
            Err(r) => {
                let _ = reply.send(Err(r));
            }
        }
    }

    fn start_purge(&mut self, name: &str, reply: oneshot::Sender<Result<AdminReply, Rejection>>) {
        let Some(gids) = self.queue_partition_ids(name) else {
            let _ = reply.send(Err(Rejection::new(
                Status::UnknownQueue,
                format!("no queue named {name:?}"),
            )));
            return;
        };
        let id = self.next_purge_id;
        self.next_purge_id += 1;
        let mut proposed = 0;
        for gid in &gids {
            if let Some(p) = self.partitions.get_mut(gid) {
                if p.propose_purge(id).is_ok() {
                    proposed += 1;
                }
            }
        }
        if proposed < gids.len() {
            let _ = reply.send(Err(Rejection::new(
                Status::Unavailable,
                "a partition has no leader; retry",
            )));
            return;
        }
        self.purges.insert(
            id,
            PurgeWait {
                remaining: proposed,
                removed: 0,
                reply,
            },
        );
    }

    fn start_subscription_op(
        &mut self,
        queue: &str,
        name: &str,
        create: bool,
        reply: oneshot::Sender<Result<AdminReply, Rejection>>,
    ) {
        let Some(def) = self.meta.queue(queue).cloned() else {
            let _ = reply.send(Err(Rejection::new(
                Status::UnknownQueue,
                format!("no queue named {queue:?}"),
            )));
            return;
        };
        if let Err(e) = check_subscription(&def, name) {
            let _ = reply.send(Err(Rejection::new(Status::InvalidArgument, e)));
            return;
        }
        let id = self.next_purge_id;
        self.next_purge_id += 1;
        let gids: Vec<u64> = def.group_ids().map(|(_, g)| g).collect();
        let mut proposed = 0;
        for gid in &gids {
            if let Some(p) = self.partitions.get_mut(gid) {
                if p.propose_subscription_op(id, name, create).is_ok() {
                    proposed += 1;
                }
            }
        }
        if proposed < gids.len() {
            let _ = reply.send(Err(Rejection::new(
                Status::Unavailable,
                "a partition has no leader; retry",
            )));
            return;
        }
        let what = if create {
            format!("cannot create subscription {name:?} of {queue:?} (limit of subscriptions reached?)")
        } else {
            format!("queue {queue:?} has no subscription {name:?}")
        };
        self.subscription_ops.insert(
            id,
            SubscriptionOpWait {
                remaining: proposed,
                all_ok: true,
                what,
                reply,
            },
        );
    }

    fn finish_subscription_op(&mut self, id: u64, ok: bool) {
        let Some(w) = self.subscription_ops.get_mut(&id) else {
            return;
        };
        w.remaining -= 1;
        w.all_ok &= ok;
        if w.remaining == 0 {
            if let Some(w) = self.subscription_ops.remove(&id) {
                let result = if w.all_ok {
                    Ok(AdminReply::Done { done: true })
                } else {
                    Err(Rejection::new(Status::InvalidArgument, w.what))
                };
                let _ = w.reply.send(result);
            }
        }
    }

    fn finish_purge(&mut self, id: u64, removed: u64) {
        let Some(w) = self.purges.get_mut(&id) else {
            return;
        };
        w.remaining -= 1;
        w.removed += removed;
        if w.remaining == 0 {
            if let Some(w) = self.purges.remove(&id) {
                let _ = w.reply.send(Ok(AdminReply::Done { done: true }));
            }
        }
    }

    /// Resolves every unset field of a queue spec to the server default and checks ranges.
    fn effective_spec(&self, name: &str, spec: &QueueSpec) -> Result<QueueSpec, Rejection> {
        let d = &self.cfg.queue_defaults;
        let invalid = |m: String| Err(Rejection::new(Status::InvalidArgument, m));
        let mode = spec.mode.clone().unwrap_or_else(|| "work".into());
        if mode != "work" && mode != "fanout" {
            return invalid(format!("mode must be work or fanout, got {mode:?}"));
        }
        let storage = spec.storage.clone().unwrap_or_else(|| "durable".into());
        if storage != "durable" && storage != "memory" {
            return invalid(format!(
                "storage must be durable or memory, got {storage:?}"
            ));
        }
        let partitions = spec.partitions.unwrap_or(d.partitions);
        if partitions == 0 || partitions > 1024 {
            return invalid(format!("partitions must be in 1..=1024, got {partitions}"));
        }
        let max_message_bytes = spec.max_message_bytes.unwrap_or(d.max_message_bytes);
        let frame_room = self.cfg.max_frame_bytes.saturating_sub(1024);
        if max_message_bytes == 0 || max_message_bytes > frame_room {
            return invalid(format!(
                "max_message_bytes must be in 1..={frame_room}, got {max_message_bytes}"
            ));
        }
        if mode != "fanout"
            && (spec.retention_max_age_ms.is_some() || spec.retention_max_bytes.is_some())
        {
            return invalid(
                "retention limits apply to fanout queues (a work queue has max_messages/max_bytes)"
                    .into(),
            );
        }
        // 0 = off: a delivery stays with its consumer until confirmed or the consumer leaves.
        let visibility_timeout_ms = spec.visibility_timeout_ms.unwrap_or(0);
        if visibility_timeout_ms > MAX_VISIBILITY_TIMEOUT_MS {
            return invalid(format!(
                "visibility_timeout_ms must be at most {MAX_VISIBILITY_TIMEOUT_MS} (12 h), got {visibility_timeout_ms}"
            ));
        }
        let default_ttl_ms = spec.default_ttl_ms.unwrap_or(0);
        let max_ttl_ms = spec.max_ttl_ms.unwrap_or(0);
        if max_ttl_ms > 0 && default_ttl_ms > max_ttl_ms {
            return invalid(format!(
                "default_ttl_ms ({default_ttl_ms}) is above max_ttl_ms ({max_ttl_ms})"
            ));
        }
        self.check_dead_letter_queue(name, spec)?;
        let dead_letter_expired = spec.dead_letter_expired.unwrap_or(false);
        if dead_letter_expired && spec.dead_letter_queue.is_none() {
            return invalid("dead_letter_expired needs a dead_letter_queue".into());
        }
        let retention = mode == "fanout";
        Ok(QueueSpec {
            mode: Some(mode),
            storage: Some(storage),
            partitions: Some(partitions),
            max_messages: Some(spec.max_messages.unwrap_or(d.max_messages)),
            max_bytes: Some(spec.max_bytes.unwrap_or(d.max_bytes)),
            max_message_bytes: Some(max_message_bytes),
            dedup_window_ms: Some(spec.dedup_window_ms.unwrap_or(d.dedup_window_ms)),
            visibility_timeout_ms: Some(visibility_timeout_ms),
            default_ttl_ms: Some(default_ttl_ms),
            max_ttl_ms: Some(max_ttl_ms),
            max_delivery_attempts: Some(spec.max_delivery_attempts.unwrap_or(0)),
            dead_letter_queue: spec.dead_letter_queue.clone(),
            dead_letter_expired: Some(dead_letter_expired),
            retention_max_age_ms: retention.then(|| spec.retention_max_age_ms.unwrap_or(0)),
            retention_max_bytes: retention.then(|| spec.retention_max_bytes.unwrap_or(0)),
        })
    }

    /// A dead-letter queue must exist, differ from the queue and not send its own dead
    /// letters back (a loop of two would bounce poison messages forever).
    fn check_dead_letter_queue(&self, name: &str, spec: &QueueSpec) -> Result<(), Rejection> {
        let Some(dlq) = spec.dead_letter_queue.as_deref() else {
            return Ok(());
        };
        let invalid = |m: String| Err(Rejection::new(Status::InvalidArgument, m));
        if dlq == name {
            return invalid(format!(
                "queue {name:?} cannot be its own dead-letter queue"
            ));
        }
        let Some(def) = self.meta.queue(dlq) else {
            return invalid(format!(
                "dead-letter queue {dlq:?} does not exist; create it first"
            ));
        };
        if def.spec.dead_letter_queue.as_deref() == Some(name) {
            return invalid(format!(
                "{dlq:?} sends its dead letters to {name:?}: a loop"
            ));
        }
        Ok(())
    }

    fn queue_info(&self, def: &QueueDef) -> QueueInfo {
        let now = now_ms();
        let mut info = QueueInfo {
            name: def.name.clone(),
            spec: def.spec.clone(),
            ..Default::default()
        };
        for (_, gid) in def.group_ids() {
            let Some(p) = self.partitions.get(&gid) else {
                continue;
            };
            let pi = p.info(now);
            info.depth += pi.depth;
            info.bytes += pi.bytes;
            info.in_flight += pi.in_flight;
            info.oldest_age_ms = match (info.oldest_age_ms, pi.oldest_age_ms) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            info.partitions.push(pi);
        }
        info.consumers = self
            .consumers
            .values()
            .filter(|c| &*c.queue == def.name.as_str())
            .count() as u64;
        info
    }

    fn cluster_status(&self) -> serde_json::Value {
        let meta = self.meta_group.status();
        let factor = self.cfg.replication_factor;
        let groups: Vec<serde_json::Value> = self
            .meta
            .queues()
            .flat_map(|def| {
                def.group_ids().map(move |(p, gid)| {
                    let target = self.meta.target_replicas(def, p, factor);
                    let mut v = self.partition_status(gid, def.replicas_of(p, self.cfg.node_id));
                    v["queue"] = def.name.clone().into();
                    v["partition"] = p.into();
                    v["group"] = gid.into();
                    v["target_replicas"] = target.into();
                    v
                })
            })
            .collect();
        let meta_voters = self.meta_group.voters();
        let meta_learners = self.meta_group.learners();
        let mut ids: Vec<u64> = self.meta.member_ids();
        ids.extend(
            meta_voters
                .iter()
                .chain(&meta_learners)
                .filter(|v| !ids.contains(v))
                .copied()
                .collect::<Vec<_>>(),
        );
        ids.sort_unstable();
        ids.dedup();
        let nodes: Vec<serde_json::Value> = ids
            .iter()
            .map(|id| {
                let healthy = *id == self.cfg.node_id
                    || self.transport.as_ref().is_some_and(|t| t.is_alive(*id));
                let role = if !self.meta.members().contains_key(id) {
                    "leaving"
                } else if meta_voters.contains(id) {
                    "voter"
                } else if meta_learners.contains(id) {
                    "learner"
                } else {
                    "joining"
                };
                serde_json::json!({
                    "id": id,
                    "peer_addr": self.meta.members().get(id),
                    "healthy": healthy,
                    "role": role,
                })
            })
            .collect();
        // Groups whose replica on this node rebuilds from its peers after damage.
        let mut repairing: Vec<u64> = self
            .partitions
            .iter()
            .filter(|(_, p)| p.group.is_repairing())
            .map(|(gid, _)| *gid)
            .collect();
        repairing.sort_unstable();
        if self.meta_group.is_repairing() {
            repairing.insert(0, META_GROUP_ID);
        }
        serde_json::json!({
            "node_id": self.cfg.node_id,
            "nodes": nodes,
            "metadata": {"leader": meta.leader_id, "term": meta.term, "commit_index": meta.commit_index,
                         "voters": meta_voters, "learners": meta_learners},
            "partitions": groups,
            "repairing": repairing,
        })
    }

    /// One partition's replication state: from the local replica when there is one,
    /// else from its leader's gossip. `replicas` are the voters.
    fn partition_status(&self, gid: u64, initial: Vec<u64>) -> serde_json::Value {
        let Some(part) = self.partitions.get(&gid) else {
            let (voters, learners) = self
                .cluster
                .replica_hints
                .get(&gid)
                .cloned()
                .unwrap_or((initial, Vec::new()));
            return serde_json::json!({
                "leader": self.leader_of(gid), "replicas": voters, "learners": learners,
            });
        };
        let s = part.group.status();
        let lag: serde_json::Map<String, serde_json::Value> = part
            .group
            .progress()
            .iter()
            .map(|(id, matched)| (id.to_string(), s.last_index.saturating_sub(*matched).into()))
            .collect();
        let (voters, learners) = if part.group.is_member() || part.group.leader_id().is_none() {
            (part.group.voters(), part.group.learners())
        } else {
            self.cluster
                .replica_hints
                .get(&gid)
                .cloned()
                .unwrap_or_default()
        };
        serde_json::json!({
            "leader": s.leader_id, "replicas": voters, "learners": learners,
            "term": s.term, "commit_index": s.commit_index,
            "applied_index": s.applied_index,
            "replica_lag": if lag.is_empty() { serde_json::Value::Null } else { lag.into() },
        })
    }

    fn count_acks(&self, queue: &str, status: Status, n: usize) {
        self.metrics
            .acks
            .get_or_create(&crate::metrics::StatusLabels {
                queue: queue.to_string(),
                status: status.name().to_string(),
            })
            .inc_by(n as u64);
    }
}

fn queue_labels(queue: &str) -> crate::metrics::QueueLabels {
    crate::metrics::QueueLabels {
        queue: queue.to_string(),
    }
}

/// A consumer of a work queue has no subscription; one of a fan-out queue names one.
fn check_subscription(def: &QueueDef, subscription: &str) -> Result<(), String> {
    let fanout = def.spec.mode.as_deref() == Some("fanout");
    match (fanout, subscription.is_empty()) {
        (false, false) => Err(format!(
            "queue {:?} is a work queue; subscriptions apply to fanout queues",
            def.name
        )),
        (true, true) => Err(format!(
            "queue {:?} is a fanout queue: name a subscription (--subscription NAME)",
            def.name
        )),
        (true, false) => meta::validate_queue_name(subscription)
            .map_err(|e| e.replace("queue name", "subscription name")),
        (false, true) => Ok(()),
    }
}

/// Answers CONFIRMs of messages the consumer does not hold with `unknown_message`.
pub(crate) fn answer_unknown_confirms(
    conn: &ConnTx,
    handle_id: u32,
    rejected: Vec<tern_proto::Guid>,
) {
    if rejected.is_empty() {
        return;
    }
    let entries = rejected
        .into_iter()
        .map(|guid| tern_proto::ConfirmAckEntry {
            guid,
            status: Status::UnknownMessage,
        })
        .collect();
    conn.send(Frame::ConfirmAck {
        queue_id: handle_id,
        entries,
    });
}

/// Answers PUT messages, named by GUID, with one failure status.
pub(crate) fn reject_guids(conn: &ConnTx, guids: &[tern_proto::Guid], status: Status) {
    let acks = guids
        .iter()
        .map(|g| tern_proto::AckEntry {
            guid: *g,
            status,
            flags: 0,
        })
        .collect();
    conn.send(Frame::Ack { acks });
}

/// Answers every message of a PUT with the same failure status.
pub(crate) fn reject_puts(conn: &ConnTx, messages: &[PutMessage], status: Status) {
    let acks = messages
        .iter()
        .map(|m| tern_proto::AckEntry {
            guid: m.guid,
            status,
            flags: 0,
        })
        .collect();
    conn.send(Frame::Ack { acks });
}

/// The partition a key maps to: FNV-1a, stable across versions and languages.
pub fn key_partition(key: &[u8], partitions: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % partitions.max(1) as u64) as usize
}

pub(crate) fn group_dir(cfg: &BrokerConfig, gid: u64) -> std::path::PathBuf {
    cfg.data_dir.join("groups").join(format!("{gid:08}"))
}

/// The founding members, as the metadata state starts with them.
fn initial_members(cfg: &BrokerConfig) -> Vec<(u64, String)> {
    match cfg.members() {
        Ok(m) if !m.is_empty() => m,
        _ => vec![(cfg.node_id, cfg.peer_listen.to_string())],
    }
}

fn group_config(cfg: &BrokerConfig, gid: u64, durable: bool, voters: Vec<u64>) -> GroupConfig {
    let mut g = GroupConfig::new(cfg.node_id, gid, group_dir(cfg, gid), voters);
    g.durable = durable;
    g.log.segment_max_bytes = cfg.segment_max_bytes;
    g.log.cache_max_bytes = cfg.log_cache_bytes;
    g.log.max_record_bytes = (cfg.max_entry_bytes + 1024 * 1024).min(u64::from(u32::MAX)) as u32;
    // raft-rs draws election timeouts from a thread RNG; the simulator's runs must
    // replay, so there they are fixed (it adds its own jitter).
    g.fixed_election_timeout = crate::clock::simulated();
    g
}

/// Tracks free space of the data directory, refreshed once per tick (statvfs is cheap
/// but not free, and free space changes slowly relative to a tick).
struct DiskGuard {
    dir: std::path::PathBuf,
    min_free_bytes: u64,
    has_room: bool,
}

impl DiskGuard {
    fn new(dir: std::path::PathBuf, min_free_bytes: u64) -> Self {
        let mut g = DiskGuard {
            dir,
            min_free_bytes,
            has_room: true,
        };
        g.refresh();
        g
    }

    fn has_room(&self) -> bool {
        self.has_room
    }

    fn refresh(&mut self) {
        if let Some(free) = free_bytes(&self.dir) {
            let was = self.has_room;
            self.has_room = free >= self.min_free_bytes;
            if was && !self.has_room {
                tracing::warn!(
                    free,
                    min = self.min_free_bytes,
                    "disk below free-space reserve: refusing PUTs"
                );
            }
        }
    }
}

fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `st` a valid out-pointer.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_partition_is_stable_and_in_range() {
        assert_eq!(key_partition(b"order-42", 8), key_partition(b"order-42", 8));
        for k in 0..100u32 {
            assert!(key_partition(&k.to_be_bytes(), 7) < 7);
        }
        assert_eq!(key_partition(b"", 1), 0);
    }
}
