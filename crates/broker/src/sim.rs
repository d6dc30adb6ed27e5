//! The node loop under the deterministic simulator (feature `sim`): `tern-sim
//! --cluster` runs whole clusters of real node loops (every Raft group, the queue
//! state machines, dispatch, forwarding between nodes, real log files) in one thread,
//! on virtual time, with an in-memory network it controls.
//!
//! Contract:
//! - Everything here runs on the simulator's thread, which must have entered virtual
//!   time ([`crate::clock::sim::enter`]) before [`SimNode::open`]: the node then reads
//!   only virtual time, iterates its maps in a fixed order and uses fixed Raft election
//!   timeouts (the simulator adds jitter by skipping a node's turns). Given the same
//!   inputs in the same order, a node does the same thing.
//! - The node loop is the production one: [`SimNode::turn`] is the body of one round
//!   of `Node::run` after its commands; the simulator decides which commands (client
//!   requests, peer messages) arrive before each turn.
//! - A [`SimNode`] dropped without [`SimNode::stop`] is a crashed process: its memory is
//!   gone, its files stay as the last write left them.

use crate::clock;
use crate::config::BrokerConfig;
use crate::metrics::Metrics;
use crate::node::{Link, Node, NodeCmd, NodeError, PeerBook};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tern_transport::SendError;

/// Most messages a node may have waiting in its outbox (per turn, the simulator takes
/// them all): a bound like the transport's per-peer queue.
const MAX_OUTBOX_MSGS: usize = 100_000;

/// A node's in-memory link: messages it sends wait in an outbox for the simulator.
#[derive(Clone)]
pub struct SimLink {
    inner: Arc<Mutex<LinkState>>,
}

struct LinkState {
    peers: BTreeSet<u64>,
    outbox: Vec<(u64, Bytes)>,
    heard: BTreeMap<u64, Instant>,
    /// Per peer: links broken so far (the simulator's resets, partitions, restarts).
    epochs: BTreeMap<u64, u64>,
    dead_after: Duration,
}

impl SimLink {
    fn new(peers: BTreeSet<u64>, dead_after: Duration) -> Self {
        SimLink {
            inner: Arc::new(Mutex::new(LinkState {
                peers,
                outbox: Vec::new(),
                heard: BTreeMap::new(),
                epochs: BTreeMap::new(),
                dead_after,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        // One thread uses it; a poisoned lock still holds consistent data.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn send(&self, to: u64, msg: Bytes) -> Result<(), SendError> {
        let mut s = self.lock();
        if !s.peers.contains(&to) {
            return Err(SendError::UnknownPeer(to));
        }
        if s.outbox.len() >= MAX_OUTBOX_MSGS {
            return Err(SendError::Full(to));
        }
        s.outbox.push((to, msg));
        Ok(())
    }

    pub(crate) fn is_alive(&self, id: u64) -> bool {
        let s = self.lock();
        let dead_after = s.dead_after;
        s.heard
            .get(&id)
            .is_some_and(|t| clock::now().saturating_duration_since(*t) < dead_after)
    }

    /// Connected from the start (1); every break adds one.
    pub(crate) fn link_epoch(&self, id: u64) -> u64 {
        1 + self.lock().epochs.get(&id).copied().unwrap_or(0)
    }

    pub(crate) fn peer_ids(&self) -> Vec<u64> {
        self.lock().peers.iter().copied().collect()
    }
}

/// One node of a simulated cluster: the production node loop plus its outbox.
pub struct SimNode {
    id: u64,
    node: Node,
    link: SimLink,
    next_tick: Instant,
}

impl SimNode {
    /// Opens the node from `cfg.data_dir` (new, or as a crashed one left it).
    /// `cfg.initial_cluster` names the members; `dead_after_ms` is the liveness bound
    /// of the link (the transport's `dead_after_ms`).
    pub fn open(cfg: BrokerConfig, dead_after_ms: u64) -> Result<SimNode, NodeError> {
        assert!(
            clock::sim::elapsed_ms().is_some(),
            "SimNode::open outside virtual time"
        );
        let me = cfg.node_id;
        let peers: BTreeSet<u64> = cfg
            .member_ids()
            .into_iter()
            .filter(|id| *id != me)
            .collect();
        let link = SimLink::new(peers, Duration::from_millis(dead_after_ms));
        let tick = Duration::from_millis(cfg.tick_interval_ms);
        let node = Node::open(
            cfg,
            Arc::new(Metrics::new()),
            Some(Link::Sim(link.clone())),
            PeerBook::default(),
        )?;
        Ok(SimNode {
            id: me,
            node,
            link,
            next_tick: clock::now() + tick,
        })
    }

    /// A client request or peer message arriving at the node loop.
    pub fn handle(&mut self, cmd: NodeCmd) {
        let _span = tracing::info_span!("node", id = self.id).entered();
        if let NodeCmd::Peer { from, .. } = &cmd {
            self.link.lock().heard.insert(*from, clock::now());
        }
        // A Stop request's reply channel is dropped: the simulator stops nodes with
        // `stop`, never through a command.
        let _ = self.node.handle(cmd);
    }

    /// One round of the node loop after its commands. Returns whether Ready work is
    /// still waiting (the production loop would go round again without sleeping).
    pub fn turn(&mut self) -> Result<bool, NodeError> {
        let _span = tracing::info_span!("node", id = self.id).entered();
        self.node.turn(&mut self.next_tick)
    }

    /// The links between this node and `peer` broke (the simulator drops what was
    /// in flight on them).
    pub fn reset_link(&mut self, peer: u64) {
        *self.link.lock().epochs.entry(peer).or_insert(0) += 1;
    }

    /// Messages the node sent to peers since the last call, in order.
    pub fn take_outbox(&mut self) -> Vec<(u64, Bytes)> {
        std::mem::take(&mut self.link.lock().outbox)
    }

    /// Where a PUT waits on this node (for failure reports).
    pub fn find_put(&self, guid: &[u8; 16]) -> Vec<String> {
        self.node.find_put(guid)
    }

    /// The consumers of the partitions this node leads and what they hold.
    pub fn holders(&self) -> Vec<String> {
        self.node.holders()
    }

    /// A graceful stop (SIGTERM): state snapshotted, files closed.
    pub fn stop(mut self) -> Result<(), NodeError> {
        let _span = tracing::info_span!("node", id = self.id).entered();
        self.node.stop()
    }
}
