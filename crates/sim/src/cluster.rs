//! Deterministic simulation of whole Tern clusters: N production node loops
//! (`tern_broker::sim::SimNode`: every Raft group, the metadata group, the queue state
//! machines, dispatch, forwarding between nodes and real log files) in one thread, on
//! virtual time, with one seeded generator owning everything else:
//! - **network**: every peer message is delayed, reordered, dropped or duplicated at
//!   random; partitions cut the cluster in two for a while;
//! - **clock**: virtual milliseconds, advanced one step at a time; a node now and then
//!   misses turns (a slow or descheduled process), which also de-synchronises the
//!   nodes' fixed Raft election timeouts;
//! - **processes**: crashes (memory gone, files kept) and graceful restarts, at most
//!   a minority down at once;
//! - **clients**: a producer and a consumer per node, speaking the node loop's API
//!   as a connection task would. Producers retry with the same GUID on a retryable
//!   status and after losing their node (as `tern-client` does); consumers confirm
//!   after a random delay and sometimes disconnect while holding messages.
//!
//! After the faults stop, every node is brought back, the partition heals, and the run
//! goes on until every producer has its answers and every ACKed message was delivered
//! (bounded by `heal_ms`). The history goes through the same checker as `tern chaos`
//! (`tern-checker`): lost, unexpected and corrupted must be 0. A producer still
//! without an answer after healing is a violation too (producers never hang).
//!
//! A failing seed replays exactly: `tern-sim --cluster --seed N`.
//!
//! Not modelled here: damaged files (the partition simulator, `crate::run`, does
//! that), machine crashes that drop unsynced pages, membership changes.

use crate::SimError;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tern_broker::clock;
use tern_broker::node::{ConnTx, NodeCmd, Opened, Rejection};
use tern_broker::peer::PeerMsg;
use tern_broker::sim::SimNode;
use tern_broker::BrokerConfig;
use tern_checker::{digest, Event, History, Outcome, SeededRng};
use tern_proto::admin::{AdminRequest, QueueSpec};
use tern_proto::{Frame, MessageRef, PutMessage, Status};
use tern_queue::{ConsumerId, FlowLimits};
use tokio::sync::oneshot;

/// The simulated queue.
const QUEUE: &str = "sim";
/// Most PUTs a producer has waiting for their ACK (a client's in-flight window).
const MAX_PENDING_PUTS: usize = 24;
/// Steps a producer waits before resending after a retryable status.
const RETRY_STEPS: u64 = 20;
/// Steps an Open may take before the client gives up on that node and tries another.
const OPEN_TIMEOUT_STEPS: u64 = 600;
/// Most Ready passes per node per step (the production loop's MAX_READY_PASSES rule).
const MAX_TURNS_PER_STEP: usize = 4;

/// Knobs of one run; probabilities are per step (per message for the network), in
/// thousandths.
#[derive(Clone, Debug)]
pub struct ClusterSimConfig {
    pub seed: u64,
    pub nodes: u64,
    pub queue_partitions: u16,
    /// Virtual time of one step.
    pub step_ms: u64,
    /// Virtual time with faults and new PUTs.
    pub fault_ms: u64,
    /// Most virtual time after healing, for answers and the drain.
    pub heal_ms: u64,
    /// Raft messages only (see [`ClusterSim::send`]).
    pub drop_per_mille: u64,
    /// Raft messages only.
    pub dup_per_mille: u64,
    pub max_delay_steps: u64,
    /// Chance per step that one peer link breaks, losing what was in flight on it.
    pub link_reset_per_mille: u64,
    pub crash_per_mille: u64,
    pub restart_per_mille: u64,
    pub partition_per_mille: u64,
    pub stall_per_mille: u64,
    pub put_per_mille: u64,
    /// Chance per step that a consumer drops its connection while holding messages.
    pub consumer_leave_per_mille: u64,
}

impl ClusterSimConfig {
    pub fn new(seed: u64) -> Self {
        ClusterSimConfig {
            seed,
            nodes: 3,
            queue_partitions: 2,
            step_ms: 10,
            fault_ms: 12_000,
            heal_ms: 60_000,
            drop_per_mille: 20,
            dup_per_mille: 10,
            max_delay_steps: 5,
            link_reset_per_mille: 20,
            crash_per_mille: 3,
            restart_per_mille: 1,
            partition_per_mille: 2,
            stall_per_mille: 30,
            put_per_mille: 250,
            consumer_leave_per_mille: 2,
        }
    }
}

/// What one run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterReport {
    pub seed: u64,
    pub steps: u64,
    pub crashes: u64,
    pub restarts: u64,
    pub partitions: u64,
    pub peer_msgs: u64,
    pub dropped_msgs: u64,
    pub duplicated_msgs: u64,
    pub link_resets: u64,
    pub checker: tern_checker::Report,
    /// Events recorded in the history (a replay must give the same count).
    pub events: u64,
}

/// Runs one seed under `base` (a scratch directory, removed afterwards).
pub fn run_cluster(cfg: ClusterSimConfig, base: &Path) -> Result<ClusterReport, SimError> {
    let dir = base.join(format!("cluster-seed-{}", cfg.seed));
    let _ = std::fs::remove_dir_all(&dir);
    clock::sim::enter();
    let result = ClusterSim::new(cfg, &dir).and_then(|mut sim| sim.run());
    clock::sim::leave();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

struct SimNodeSlot {
    id: u64,
    dir: PathBuf,
    node: Option<SimNode>,
    /// Raised at every (re)start: a client's connection to an older one is broken.
    generation: u64,
    restart_at: Option<u64>,
}

/// A client's connection to one node.
struct Conn {
    node: usize,
    generation: u64,
    tx: ConnTx,
    rx: flume::Receiver<Frame>,
    open: Option<oneshot::Receiver<Result<Opened, Rejection>>>,
    opened_at: u64,
    consumer: Option<ConsumerId>,
}

struct PendingPut {
    seq: u64,
    key: Option<String>,
    payload: Bytes,
    sent_ms: u64,
    in_flight: bool,
    retry_at: u64,
}

impl PendingPut {
    /// The history's record of this PUT, answered (or given up) at `done_ms`.
    fn event(self, guid: &[u8; 16], producer: u32, done_ms: u64, outcome: Outcome) -> Event {
        Event::Put {
            guid: hex(guid),
            producer,
            seq: self.seq,
            key: self.key,
            digest: digest(&self.payload),
            sent_ms: self.sent_ms,
            done_ms,
            outcome,
        }
    }
}

struct Producer {
    id: u32,
    next_node: usize,
    conn: Option<Conn>,
    next_seq: u64,
    pending: BTreeMap<[u8; 16], PendingPut>,
}

struct Consumer {
    id: u32,
    next_node: usize,
    conn: Option<Conn>,
    /// Held messages and the step at which to CONFIRM them.
    held: Vec<(u64, MessageRef)>,
}

struct ClusterSim {
    cfg: ClusterSimConfig,
    rng: SeededRng,
    step: u64,
    nodes: Vec<SimNodeSlot>,
    /// (delivery step, order) -> (from, to, message)
    network: BTreeMap<(u64, u64), (u64, u64, Bytes)>,
    net_seq: u64,
    /// Per link (from, to): the step its last in-order message is delivered at.
    link_tail: BTreeMap<(u64, u64), u64>,
    /// The queue exists: clients may open it.
    queue_ready: bool,
    partition: Option<(BTreeSet<u64>, u64)>,
    producers: Vec<Producer>,
    consumers: Vec<Consumer>,
    next_conn_id: u64,
    history: History,
    acked_ok: BTreeSet<[u8; 16]>,
    delivered: BTreeSet<[u8; 16]>,
    report: ClusterReport,
}

fn guid_of(producer: u32, seq: u64) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[..4].copy_from_slice(&producer.to_be_bytes());
    g[4..12].copy_from_slice(&seq.to_be_bytes());
    g[12..].copy_from_slice(&0x7e41_5e4du32.to_be_bytes());
    g
}

fn hex(g: &[u8; 16]) -> String {
    g.iter().map(|b| format!("{b:02x}")).collect()
}

fn retryable(s: Status) -> bool {
    matches!(
        s,
        Status::Unavailable | Status::Overloaded | Status::Stopping | Status::Timeout
    )
}

impl ClusterSim {
    fn new(cfg: ClusterSimConfig, dir: &Path) -> Result<ClusterSim, SimError> {
        let mut sim = ClusterSim {
            rng: SeededRng::new(cfg.seed),
            step: 0,
            nodes: (1..=cfg.nodes)
                .map(|id| SimNodeSlot {
                    id,
                    dir: dir.join(format!("node-{id}")),
                    node: None,
                    generation: 0,
                    restart_at: None,
                })
                .collect(),
            network: BTreeMap::new(),
            net_seq: 0,
            link_tail: BTreeMap::new(),
            queue_ready: false,
            partition: None,
            producers: (0..cfg.nodes as u32)
                .map(|i| Producer {
                    id: i + 1,
                    next_node: i as usize,
                    conn: None,
                    next_seq: 1,
                    pending: BTreeMap::new(),
                })
                .collect(),
            consumers: (0..cfg.nodes as u32)
                .map(|i| Consumer {
                    id: i + 1,
                    next_node: i as usize,
                    conn: None,
                    held: Vec::new(),
                })
                .collect(),
            next_conn_id: 1,
            history: History::new(),
            acked_ok: BTreeSet::new(),
            delivered: BTreeSet::new(),
            report: ClusterReport {
                seed: cfg.seed,
                ..Default::default()
            },
            cfg,
        };
        for i in 0..sim.nodes.len() {
            sim.start_node(i)?;
        }
        Ok(sim)
    }

    fn violation(&self, what: String) -> SimError {
        SimError::Violation {
            seed: self.cfg.seed,
            step: self.step,
            what,
        }
    }

    fn broker_config(&self, i: usize) -> BrokerConfig {
        let slot = &self.nodes[i];
        BrokerConfig {
            node_id: slot.id,
            data_dir: slot.dir.clone(),
            initial_cluster: self
                .nodes
                .iter()
                .map(|n| format!("{}=sim-node-{}:7452", n.id, n.id))
                .collect(),
            segment_max_bytes: 256 * 1024,
            snapshot_interval_bytes: 128 * 1024,
            log_cache_bytes: 4 * 1024 * 1024,
            min_free_disk_bytes: 0,
            auto_create_queues: false,
            ..BrokerConfig::default()
        }
    }

    fn start_node(&mut self, i: usize) -> Result<(), SimError> {
        let cfg = self.broker_config(i);
        let node = SimNode::open(cfg, 1_500)
            .map_err(|e| self.violation(format!("node {} does not open: {e}", i + 1)))?;
        let slot = &mut self.nodes[i];
        let restarted = slot.generation > 0;
        slot.node = Some(node);
        slot.generation += 1;
        slot.restart_at = None;
        if restarted {
            // The peers' connections to the old process broke.
            let id = self.nodes[i].id;
            for other in 1..=self.cfg.nodes {
                if other != id {
                    self.reset_link(id, other);
                }
            }
        }
        Ok(())
    }

    fn run(&mut self) -> Result<ClusterReport, SimError> {
        self.create_queue()?;
        let fault_steps = self.cfg.fault_ms / self.cfg.step_ms;
        let heal_steps = self.cfg.heal_ms / self.cfg.step_ms;
        let start = self.step;
        while self.step < start + fault_steps {
            self.inject_faults()?;
            self.step_once(true)?;
        }
        self.heal()?;
        let heal_start = self.step;
        while self.step < heal_start + heal_steps && !self.drained() {
            self.restart_due()?;
            self.step_once(false)?;
        }
        self.finish()
    }

    /// The queue is created through node 1 like `tern queue create` would.
    fn create_queue(&mut self) -> Result<(), SimError> {
        let spec = QueueSpec {
            partitions: Some(self.cfg.queue_partitions),
            // No visibility timeout (the default): a message lost on its way to a
            // consumer must come back by the cluster's own means.
            visibility_timeout_ms: None,
            ..Default::default()
        };
        let mut last = String::from("no answer");
        for _attempt in 0..20 {
            for _ in 0..100 {
                self.step_once(false)?; // elections first
            }
            let (reply, mut rx) = oneshot::channel();
            self.node_cmd(
                0,
                NodeCmd::Admin {
                    req: AdminRequest::CreateQueue {
                        name: QUEUE.into(),
                        spec: spec.clone(),
                    },
                    reply,
                },
            );
            for _ in 0..2_000 {
                self.step_once(false)?;
                match rx.try_recv() {
                    Ok(Ok(_)) => {
                        self.queue_ready = true;
                        return Ok(());
                    }
                    Ok(Err(r)) => {
                        last = format!("{:?}: {}", r.status, r.message);
                        break;
                    }
                    Err(oneshot::error::TryRecvError::Empty) => {}
                    Err(oneshot::error::TryRecvError::Closed) => break,
                }
            }
        }
        Err(self.violation(format!(
            "the queue could not be created in 20 tries (last: {last})"
        )))
    }

    fn node_cmd(&mut self, i: usize, cmd: NodeCmd) -> bool {
        match self.nodes[i].node.as_mut() {
            Some(n) => {
                n.handle(cmd);
                true
            }
            None => false,
        }
    }

    fn up(&self, i: usize) -> bool {
        self.nodes[i].node.is_some()
    }

    // ----- faults ------------------------------------------------------------

    fn inject_faults(&mut self) -> Result<(), SimError> {
        self.restart_due()?;
        let down = self.nodes.iter().filter(|n| n.node.is_none()).count() as u64;
        let minority = (self.cfg.nodes - 1) / 2;
        if down < minority && self.rng.chance(self.cfg.crash_per_mille) {
            let i = self.rng.below(self.cfg.nodes) as usize;
            if let Some(node) = self.nodes[i].node.take() {
                drop(node); // the process dies: memory gone, files as written
                self.nodes[i].restart_at = Some(self.step + 50 + self.rng.below(300));
                self.report.crashes += 1;
                self.fault("crash", i);
            }
        } else if down < minority && self.rng.chance(self.cfg.restart_per_mille) {
            let i = self.rng.below(self.cfg.nodes) as usize;
            if let Some(node) = self.nodes[i].node.take() {
                node.stop()
                    .map_err(|e| self.violation(format!("node {} stop: {e}", i + 1)))?;
                self.nodes[i].restart_at = Some(self.step + 10 + self.rng.below(100));
                self.report.restarts += 1;
                self.fault("restart", i);
            }
        }
        if self.rng.chance(self.cfg.link_reset_per_mille) {
            let from = 1 + self.rng.below(self.cfg.nodes);
            let to = 1 + self.rng.below(self.cfg.nodes);
            if from != to {
                self.reset_link(from, to);
            }
        }
        if let Some((_, until)) = &self.partition {
            if self.step >= *until {
                self.partition = None;
            }
        } else if self.rng.chance(self.cfg.partition_per_mille) {
            let mut side = BTreeSet::new();
            let size = 1 + self.rng.below(self.cfg.nodes - 1);
            while (side.len() as u64) < size {
                side.insert(1 + self.rng.below(self.cfg.nodes));
            }
            let until = self.step + 100 + self.rng.below(600);
            // TCP connections across the cut break (heartbeats stop); in-flight is lost.
            for a in 1..=self.cfg.nodes {
                for b in (a + 1)..=self.cfg.nodes {
                    if side.contains(&a) != side.contains(&b) {
                        self.reset_link(a, b);
                    }
                }
            }
            self.partition = Some((side, until));
            self.report.partitions += 1;
            self.fault("partition", 0);
        }
        Ok(())
    }

    fn fault(&mut self, kind: &str, i: usize) {
        tracing::info!(step = self.step, kind, node = i + 1, partition = ?self.partition, "fault");
        self.history.record(Event::Fault {
            kind: kind.into(),
            node: i as u64 + 1,
            at_ms: self.step * self.cfg.step_ms,
        });
    }

    fn restart_due(&mut self) -> Result<(), SimError> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].restart_at.is_some_and(|at| at <= self.step) {
                self.start_node(i)?;
            }
        }
        Ok(())
    }

    fn heal(&mut self) -> Result<(), SimError> {
        self.partition = None;
        for i in 0..self.nodes.len() {
            if !self.up(i) {
                self.start_node(i)?;
            }
        }
        Ok(())
    }

    fn cut(&self, a: u64, b: u64) -> bool {
        self.partition
            .as_ref()
            .is_some_and(|(side, _)| side.contains(&a) != side.contains(&b))
    }

    // ----- one step ----------------------------------------------------------

    fn step_once(&mut self, faults: bool) -> Result<(), SimError> {
        self.step += 1;
        clock::sim::advance(self.cfg.step_ms);
        self.deliver_network();
        self.producers_act(faults);
        self.consumers_act(faults);
        for i in 0..self.nodes.len() {
            if faults && self.rng.chance(self.cfg.stall_per_mille) {
                continue; // this process misses its turn
            }
            self.turn(i)?;
        }
        self.producers_read();
        self.consumers_read();
        Ok(())
    }

    fn turn(&mut self, i: usize) -> Result<(), SimError> {
        let Some(node) = self.nodes[i].node.as_mut() else {
            return Ok(());
        };
        let mut result = Ok(());
        for _ in 0..MAX_TURNS_PER_STEP {
            match node.turn() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let out = node.take_outbox();
        if let Err(e) = result {
            return Err(self.violation(format!("node {} stopped: {e}", i + 1)));
        }
        let from = self.nodes[i].id;
        for (to, msg) in out {
            self.send(from, to, msg);
        }
        Ok(())
    }

    /// Puts one peer message on the simulated network.
    ///
    /// The real transport is one TCP connection per pair of nodes: in order, never
    /// duplicated, and losing only what was in flight when the connection breaks
    /// (see [`Self::reset_link`]). The node protocol's own messages (forwarded PUTs,
    /// frames for remote connections, consumer and CONFIRM traffic) get exactly that.
    /// Raft messages must survive anything, so they are also dropped, duplicated and
    /// reordered at random.
    fn send(&mut self, from: u64, to: u64, msg: Bytes) {
        self.report.peer_msgs += 1;
        let raft = matches!(PeerMsg::decode(&msg), Ok(PeerMsg::Raft { .. }));
        let delay = 1 + self.rng.below(self.cfg.max_delay_steps + 1);
        if !raft {
            let tail = self.link_tail.entry((from, to)).or_insert(0);
            let at = (self.step + delay).max(*tail);
            *tail = at;
            self.net_seq += 1;
            self.network.insert((at, self.net_seq), (from, to, msg));
            return;
        }
        if self.rng.chance(self.cfg.drop_per_mille) {
            self.report.dropped_msgs += 1;
            return;
        }
        let copies = if self.rng.chance(self.cfg.dup_per_mille) {
            self.report.duplicated_msgs += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.step + 1 + self.rng.below(self.cfg.max_delay_steps + 1);
            self.net_seq += 1;
            self.network
                .insert((at, self.net_seq), (from, to, msg.clone()));
        }
    }

    /// The connections between two nodes break: everything in flight on them is
    /// lost, and both nodes see the break (their link epoch moves on) once they are
    /// connected again.
    fn reset_link(&mut self, a: u64, b: u64) {
        let before = self.network.len();
        self.network
            .retain(|_, (f, t, _)| !((*f == a && *t == b) || (*f == b && *t == a)));
        self.report.dropped_msgs += (before - self.network.len()) as u64;
        self.report.link_resets += 1;
        tracing::debug!(
            step = self.step,
            a,
            b,
            lost = before - self.network.len(),
            "link reset"
        );
        for (me, peer) in [(a, b), (b, a)] {
            if let Some(node) = self
                .nodes
                .iter_mut()
                .find(|n| n.id == me)
                .and_then(|n| n.node.as_mut())
            {
                node.reset_link(peer);
            }
        }
    }

    fn deliver_network(&mut self) {
        while let Some(entry) = self.network.first_entry() {
            if entry.key().0 > self.step {
                break;
            }
            let (from, to, msg) = entry.remove();
            if self.cut(from, to) {
                continue;
            }
            let Some(i) = self.nodes.iter().position(|n| n.id == to) else {
                continue;
            };
            self.node_cmd(i, NodeCmd::Peer { from, msg });
        }
    }

    // ----- clients -----------------------------------------------------------

    /// Opens a connection for a client on its next live node (None: all down).
    fn connect(&mut self, start: usize, consumer: bool) -> Option<Conn> {
        let n = self.nodes.len();
        let node = (0..n).map(|k| (start + k) % n).find(|&i| self.up(i))?;
        let (tx, rx) = flume::unbounded();
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        let conn = ConnTx::new(id, tx);
        let (reply, open) = oneshot::channel();
        let limits = FlowLimits {
            max_unconfirmed_msgs: 8,
            max_unconfirmed_bytes: 1024 * 1024,
        };
        self.node_cmd(
            node,
            NodeCmd::Open {
                conn: conn.clone(),
                req_id: 1,
                handle_id: 1,
                queue: QUEUE.into(),
                subscription: String::new(),
                consumer: consumer.then_some(limits),
                reply,
            },
        );
        Some(Conn {
            node,
            generation: self.nodes[node].generation,
            tx: conn,
            rx,
            open: Some(open),
            opened_at: self.step,
            consumer: None,
        })
    }

    /// Whether the connection still stands: its node has not died since it opened.
    fn alive(&self, c: &Conn) -> bool {
        self.nodes[c.node].node.is_some() && self.nodes[c.node].generation == c.generation
    }

    /// The client closes a connection whose node still runs (the node learns it as
    /// from a closed socket); dropping `c` also drops a pending Open's reply channel.
    fn close(&mut self, c: &Conn) {
        if self.alive(c) {
            let consumers = c.consumer.into_iter().collect();
            self.node_cmd(
                c.node,
                NodeCmd::ConnClosed {
                    conn: c.tx.id,
                    consumers,
                },
            );
        }
    }

    /// Polls a connection's Open. Some(false): the client must connect elsewhere.
    fn poll_open(&self, c: &mut Conn) -> Option<bool> {
        let rx = c.open.as_mut()?;
        match rx.try_recv() {
            Ok(Ok(opened)) => {
                c.consumer = opened.consumer;
                c.open = None;
                Some(true)
            }
            Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => Some(false),
            Err(oneshot::error::TryRecvError::Empty) => {
                Some(self.step < c.opened_at + OPEN_TIMEOUT_STEPS)
            }
        }
    }

    fn producers_act(&mut self, faults: bool) {
        if !self.queue_ready {
            return;
        }
        for p in 0..self.producers.len() {
            let mut conn = self.producers[p].conn.take();
            if conn.as_ref().is_some_and(|c| !self.alive(c)) {
                // Connection lost: what it had in flight is sent again elsewhere.
                if let Some(c) = conn.take() {
                    self.read_producer_frames(p, &c);
                }
                for put in self.producers[p].pending.values_mut() {
                    put.in_flight = false;
                }
                self.producers[p].next_node += 1;
            }
            if conn.is_none() {
                conn = self.connect(self.producers[p].next_node, false);
            }
            let Some(mut c) = conn else { continue };
            match self.poll_open(&mut c) {
                Some(false) => {
                    self.close(&c);
                    for put in self.producers[p].pending.values_mut() {
                        put.in_flight = false;
                    }
                    self.producers[p].next_node += 1;
                    continue; // closed: reconnect next step
                }
                Some(true) if c.open.is_some() => {
                    self.producers[p].conn = Some(c);
                    continue;
                }
                _ => {}
            }
            self.send_puts(p, &c, faults);
            self.producers[p].conn = Some(c);
        }
    }

    fn send_puts(&mut self, p: usize, c: &Conn, faults: bool) {
        let step = self.step;
        let now_ms = step * self.cfg.step_ms;
        let mut messages = Vec::new();
        let prod = &mut self.producers[p];
        for (guid, put) in prod.pending.iter_mut() {
            if !put.in_flight && put.retry_at <= step {
                put.in_flight = true;
                messages.push(PutMessage {
                    guid: *guid,
                    ttl_ms: 0,
                    key: put.key.clone().map(Bytes::from).unwrap_or_default(),
                    payload: put.payload.clone(),
                });
            }
        }
        if faults
            && self.producers[p].pending.len() < MAX_PENDING_PUTS
            && self.rng.chance(self.cfg.put_per_mille)
        {
            let count = 1 + self.rng.below(3);
            for _ in 0..count {
                let prod = &mut self.producers[p];
                let seq = prod.next_seq;
                prod.next_seq += 1;
                let guid = guid_of(prod.id, seq);
                let key = seq.is_multiple_of(2).then(|| format!("k{}", prod.id));
                let mut payload = format!("producer {} seq {seq} ", prod.id).into_bytes();
                let extra = self.rng.below(200) as usize;
                payload.extend(std::iter::repeat_n(b'x', extra));
                let payload = Bytes::from(payload);
                messages.push(PutMessage {
                    guid,
                    ttl_ms: 0,
                    key: key.clone().map(Bytes::from).unwrap_or_default(),
                    payload: payload.clone(),
                });
                self.producers[p].pending.insert(
                    guid,
                    PendingPut {
                        seq,
                        key,
                        payload,
                        sent_ms: now_ms,
                        in_flight: true,
                        retry_at: 0,
                    },
                );
            }
        }
        if !messages.is_empty() {
            tracing::debug!(
                step = self.step,
                producer = self.producers[p].id,
                node = c.node + 1,
                conn = c.tx.id,
                guids = ?messages.iter().map(|m| hex(&m.guid)).collect::<Vec<_>>(),
                "PUT"
            );
            let cmd = NodeCmd::Put {
                conn: c.tx.clone(),
                queue: Arc::from(QUEUE),
                messages,
                received: clock::now(),
            };
            self.node_cmd(c.node, cmd);
        }
    }

    fn producers_read(&mut self) {
        for p in 0..self.producers.len() {
            if let Some(c) = self.producers[p].conn.take() {
                self.read_producer_frames(p, &c);
                self.producers[p].conn = Some(c);
            }
        }
    }

    fn read_producer_frames(&mut self, p: usize, c: &Conn) {
        let now_ms = self.step * self.cfg.step_ms;
        while let Ok(frame) = c.rx.try_recv() {
            let Frame::Ack { acks } = frame else { continue };
            for ack in acks {
                tracing::debug!(step = self.step, conn = c.tx.id, guid = hex(&ack.guid), status = ?ack.status, "ACK");
                let prod = &mut self.producers[p];
                let Some(put) = prod.pending.get_mut(&ack.guid) else {
                    continue; // an answer to a resend already answered
                };
                let outcome = match ack.status {
                    Status::Ok => Outcome::Ok,
                    s if retryable(s) => {
                        put.in_flight = false;
                        put.retry_at = self.step + RETRY_STEPS;
                        continue;
                    }
                    s => Outcome::Failed(format!("{s:?}")),
                };
                let Some(put) = prod.pending.remove(&ack.guid) else {
                    continue;
                };
                if outcome == Outcome::Ok {
                    self.acked_ok.insert(ack.guid);
                }
                let producer = prod.id;
                self.history
                    .record(put.event(&ack.guid, producer, now_ms, outcome));
            }
        }
    }

    fn consumers_act(&mut self, faults: bool) {
        if !self.queue_ready {
            return;
        }
        for k in 0..self.consumers.len() {
            let mut conn = self.consumers[k].conn.take();
            if conn.as_ref().is_some_and(|c| !self.alive(c)) {
                conn = None;
                self.consumers[k].held.clear();
                self.consumers[k].next_node += 1;
            }
            if faults
                && conn.as_ref().is_some_and(|c| c.open.is_none())
                && self.rng.chance(self.cfg.consumer_leave_per_mille)
            {
                // The consumer closes its connection holding messages: they return.
                if let Some(c) = conn.take() {
                    self.close(&c);
                }
                self.consumers[k].held.clear();
                continue;
            }
            if conn.is_none() {
                conn = self.connect(self.consumers[k].next_node, true);
            }
            let Some(mut c) = conn else { continue };
            match self.poll_open(&mut c) {
                Some(false) => {
                    // Giving up on this node: the connection closes (dropping `c`
                    // drops the Open's reply channel too).
                    self.close(&c);
                    self.consumers[k].next_node += 1;
                    continue;
                }
                Some(true) if c.open.is_some() => {
                    self.consumers[k].conn = Some(c);
                    continue;
                }
                _ => {}
            }
            self.send_confirms(k, &c);
            self.consumers[k].conn = Some(c);
        }
    }

    fn send_confirms(&mut self, k: usize, c: &Conn) {
        let step = self.step;
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.consumers[k].held)
            .into_iter()
            .partition(|(at, _)| *at <= step);
        self.consumers[k].held = keep;
        let Some(consumer) = c.consumer else { return };
        if due.is_empty() {
            return;
        }
        tracing::debug!(step = self.step, conn = c.tx.id, n = due.len(), "CONFIRM");
        let cmd = NodeCmd::Confirm {
            conn: c.tx.clone(),
            handle_id: 1,
            consumer,
            queue: Arc::from(QUEUE),
            messages: due.into_iter().map(|(_, m)| m).collect(),
        };
        self.node_cmd(c.node, cmd);
    }

    fn consumers_read(&mut self) {
        let now_ms = self.step * self.cfg.step_ms;
        for k in 0..self.consumers.len() {
            let Some(c) = self.consumers[k].conn.take() else {
                continue;
            };
            while let Ok(frame) = c.rx.try_recv() {
                match frame {
                    Frame::Push { messages, .. } => {
                        tracing::debug!(
                            step = self.step,
                            conn = c.tx.id,
                            n = messages.len(),
                            "PUSH"
                        );
                        for m in messages {
                            self.delivered.insert(m.guid);
                            self.history.record(Event::Deliver {
                                guid: hex(&m.guid),
                                consumer: self.consumers[k].id,
                                digest: digest(&m.payload),
                                attempt: m.attempt,
                                partition: m.partition,
                                at_ms: now_ms,
                            });
                            let at = self.step + self.rng.below(40);
                            self.consumers[k].held.push((
                                at,
                                MessageRef {
                                    guid: m.guid,
                                    partition: m.partition,
                                },
                            ));
                        }
                    }
                    Frame::ConfirmAck { entries, .. } => {
                        tracing::debug!(step = self.step, conn = c.tx.id, acks = ?entries.iter().map(|e| e.status).collect::<Vec<_>>(), "CONFIRM ACK");
                        for e in entries.iter().filter(|e| e.status == Status::Ok) {
                            self.history.record(Event::Confirm {
                                guid: hex(&e.guid),
                                consumer: self.consumers[k].id,
                                at_ms: now_ms,
                            });
                        }
                    }
                    _ => {}
                }
            }
            self.consumers[k].conn = Some(c);
        }
    }

    // ----- the end -----------------------------------------------------------

    /// For a failure report: each node's view of the queue (depth, in flight,
    /// consumers, per partition) and of the cluster.
    fn queue_stats(&mut self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            if let Some(node) = &n.node {
                for h in node.holders() {
                    out.push_str(&format!("node {}: {h}\n", n.id));
                }
            }
        }
        for c in &self.consumers {
            let conn = c.conn.as_ref().map(|k| {
                format!(
                    "node {} conn {} consumer {:?}",
                    k.node + 1,
                    k.tx.id,
                    k.consumer
                )
            });
            out.push_str(&format!(
                "client consumer {}: {conn:?}, holds {}\n",
                c.id,
                c.held.len()
            ));
        }
        for i in 0..self.nodes.len() {
            for req in [
                AdminRequest::QueueStats { name: QUEUE.into() },
                AdminRequest::ClusterStatus,
            ] {
                let (reply, mut rx) = oneshot::channel();
                if !self.node_cmd(i, NodeCmd::Admin { req, reply }) {
                    continue;
                }
                let mut answer = "no answer in 500 steps".to_string();
                for _ in 0..500 {
                    let _ = self.step_once(false);
                    if let Ok(r) = rx.try_recv() {
                        answer = match r {
                            Ok(reply) => serde_json::to_string(&reply).unwrap_or_default(),
                            Err(e) => format!("{e:?}"),
                        };
                        break;
                    }
                }
                out.push_str(&format!("node {}: {answer}\n", i + 1));
            }
        }
        out
    }

    /// Every producer has all its answers and every ACKed message was delivered.
    fn drained(&self) -> bool {
        self.producers.iter().all(|p| p.pending.is_empty())
            && self.acked_ok.iter().all(|g| self.delivered.contains(g))
    }

    fn finish(&mut self) -> Result<ClusterReport, SimError> {
        let nodes = &self.nodes;
        let waiting: Vec<String> = self
            .producers
            .iter()
            .flat_map(|p| {
                let conn = match &p.conn {
                    Some(c) => format!(
                        "node {} (opened at step {}, open done {}, alive {})",
                        c.node + 1,
                        c.opened_at,
                        c.open.is_none(),
                        nodes[c.node].generation == c.generation
                    ),
                    None => "no connection".into(),
                };
                p.pending.iter().map(move |(g, put)| {
                    let found: Vec<String> = nodes
                        .iter()
                        .filter_map(|n| Some((n.id, n.node.as_ref()?.find_put(g))))
                        .flat_map(|(id, w)| w.into_iter().map(move |w| format!("node {id}: {w}")))
                        .collect();
                    format!(
                        "{} (producer {} on {conn}, sent at {} ms, in flight {}, retry at step {}; {})",
                        hex(g),
                        p.id,
                        put.sent_ms,
                        put.in_flight,
                        put.retry_at,
                        found.join("; ")
                    )
                })
            })
            .take(3)
            .collect();
        let now_ms = self.step * self.cfg.step_ms;
        for p in 0..self.producers.len() {
            let id = self.producers[p].id;
            for (guid, put) in std::mem::take(&mut self.producers[p].pending) {
                self.history
                    .record(put.event(&guid, id, now_ms, Outcome::Unknown));
            }
        }
        self.report.steps = self.step;
        self.report.events = self.history.events().len() as u64;
        self.report.checker = self.history.check();
        let c = self.report.checker.clone();
        if !c.passed() {
            let stats = self.queue_stats();
            return Err(self.violation(format!(
                "the history checker failed: lost {}, unexpected {}, corrupted {}\n{}\nthe queue as the nodes see it:\n{stats}",
                c.lost,
                c.unexpected,
                c.corrupted,
                c.table()
            )));
        }
        for i in 0..self.nodes.len() {
            if let Some(node) = self.nodes[i].node.take() {
                node.stop()
                    .map_err(|e| self.violation(format!("node {} stop: {e}", i + 1)))?;
            }
        }
        if !waiting.is_empty() {
            return Err(self.violation(format!(
                "producers still without an answer {} ms after healing (e.g. {})",
                self.cfg.heal_ms,
                waiting.join(", ")
            )));
        }
        Ok(self.report.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> tempfile::TempDir {
        let shm = std::path::Path::new("/dev/shm");
        if shm.is_dir() {
            tempfile::tempdir_in(shm).expect("scratch dir")
        } else {
            tempfile::tempdir().expect("scratch dir")
        }
    }

    #[test]
    fn a_seed_replays_exactly() {
        let dir = scratch();
        let a = run_cluster(ClusterSimConfig::new(11), dir.path()).expect("seed 11");
        let b = run_cluster(ClusterSimConfig::new(11), dir.path()).expect("seed 11 again");
        assert_eq!(a, b);
        assert!(a.checker.acked_ok > 0, "{a:?}");
    }
}
