//! The node as a cluster member: Raft messages to and from peers, and the coordinator
//! role (a client connected here can use any queue, wherever its partition leaders are).
//!
//! Contract (all on the node-loop thread):
//! - Raft messages of every group go to peers through the transport right after the
//!   Ready that produced them (persist before promise is the group's job).
//! - Upstream, a PUT for a partition led elsewhere is kept in the coordinator's
//!   retransmission buffer (`forwarded`, bounded by `max_pending_put_bytes` like every
//!   PUT and by `put_timeout_ms`) and sent to the leader; it is sent again to each new
//!   leader until its ACK passes back through here. The GUID history makes resends
//!   safe; only the first ACK reaches the client.
//! - Downstream, consumers of this node are attached to each partition's leader; PUSH,
//!   ConfirmAck and ACK frames come back as `ToConn` and go to the client's socket.
//!   A leader change re-attaches them (the new leader re-PUSHes what is unconfirmed).
//! - A peer that stops answering loses its consumers here: their messages go back to
//!   the queue (at-least-once).

use super::{
    now_ms, ConnId, ConnTx, Consumer, HeldOp, Node, NodeCmd, QueueDef, Rejection, META_GROUP_ID,
};
use crate::clock::{Map, Set};
use crate::peer::{LedGroup, NodeId, PeerMsg};
use bytes::{Bytes, BytesMut};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tern_proto::admin::{AdminReply, AdminRequest};
use tern_proto::{AckEntry, Frame, FrameCodec, Guid, Status};
use tern_queue::{Command, ConsumerId, FlowLimits};
use tokio::sync::oneshot;
use tokio_util::codec::{Decoder, Encoder};

/// How often this node tells its peers which groups it leads.
const LEADER_GOSSIP_INTERVAL_MS: u64 = 500;
/// A forwarded PUT unanswered this long is sent again (with all unanswered ones of
/// its group), at most this often per group.
const FORWARD_RESEND_MS: u64 = 2_000;
/// Consumer attachments at leaders elsewhere are sent again this often (soft state).
const CONSUMER_REFRESH_MS: u64 = 1_000;
/// Most CONFIRMs remembered for resending after a failover; beyond it the new leader
/// redelivers (at-least-once), nothing grows.
pub(super) const MAX_FORWARDED_CONFIRMS: usize = 65_536;
/// A forwarded CONFIRM unanswered for this long is forgotten (its message comes back).
const FORWARDED_CONFIRM_TTL_MS: u64 = 30_000;
/// A forwarded admin request unanswered for this long gets `unavailable`.
const ADMIN_FORWARD_TIMEOUT_MS: u64 = 10_000;

/// A PUT sent to a leader elsewhere, kept until its ACK passes back through here.
pub(super) struct Forwarded {
    pub gid: u64,
    pub conn: ConnTx,
    pub msg: tern_queue::PutMessage,
    pub since: Instant,
    /// Arrival order at this coordinator: resends keep it, so one producer's PUTs of
    /// one partition reach the leader in the order it sent them.
    pub seq: u64,
}

/// Per group: where its forwarded PUTs were last sent.
#[derive(Default)]
pub(super) struct ForwardGroup {
    pub sent_to: Option<NodeId>,
    /// When everything unanswered was last sent in full.
    pub full_send: Option<Instant>,
    /// Every unanswered forwarded PUT, in arrival order (seq → GUID).
    pub guids: BTreeMap<u64, Guid>,
    /// Arrived since the last send to `sent_to`, in order.
    pub unsent: Vec<Guid>,
}

/// A peer's admin request running here: (peer, its request id, our answer).
pub(super) type RemoteAdmin = (
    NodeId,
    u64,
    oneshot::Receiver<Result<AdminReply, Rejection>>,
);

/// The coordinator's cluster-facing state.
#[derive(Default)]
pub(super) struct ClusterState {
    pub forwarded: Map<Guid, Forwarded>,
    pub forward_groups: Map<u64, ForwardGroup>,
    pub next_forward_seq: u64,
    /// Leaders learnt from gossip, for groups with no replica here: group → (leader, term).
    pub leader_hints: Map<u64, (NodeId, u64)>,
    /// Replica sets (voters, learners) as their leaders last gossiped them.
    pub replica_hints: Map<u64, (Vec<u64>, Vec<u64>)>,
    /// Where each local consumer is attached per group it reads.
    pub consumer_homes: Map<(ConsumerId, u64), NodeId>,
    /// Consumers of other nodes attached here: consumer → (node, its incarnation, groups).
    pub remote_consumers: Map<ConsumerId, (NodeId, u64, Set<u64>)>,
    /// The latest incarnation seen per peer: a new one means the peer restarted, and
    /// the consumers its previous process attached here are gone.
    pub peer_incarnations: Map<NodeId, u64>,
    /// Per peer: the link epoch last seen (`drop_dead_peers_consumers`).
    pub link_epochs: Map<NodeId, u64>,
    /// This process's incarnation (its start time in ms).
    pub incarnation: u64,
    /// Client connections of this node, to deliver frames coming back from leaders.
    pub local_conns: Map<ConnId, ConnTx>,
    /// Admin requests forwarded to the metadata leader: id → (reply, deadline).
    pub admin_waits: Map<u64, (oneshot::Sender<Result<AdminReply, Rejection>>, Instant)>,
    pub next_admin_id: u64,
    /// Admin requests of peers running here: (peer, their id, our reply channel).
    pub remote_admin: Vec<RemoteAdmin>,
    /// Opens waiting for a queue another node is creating: (queue, open, deadline).
    pub opens_waiting: Vec<(String, Box<NodeCmd>, Instant)>,
    pub last_gossip: Option<Instant>,
    pub last_consumer_refresh: Option<Instant>,
    /// CONFIRMs forwarded to a leader and not yet answered: (conn, handle, guid) →
    /// (consumer, group, since). Resent to a new leader after a failover, so the
    /// consumer does not get the message again. Bounded by [`MAX_FORWARDED_CONFIRMS`].
    pub forwarded_confirms: Map<(ConnId, u32, Guid), (ConsumerId, u64, Instant)>,
    /// Graceful stop in progress: reply when no group is led here (or at the deadline).
    pub releasing: Option<(oneshot::Sender<()>, Instant)>,
    pub last_transfer: Option<Instant>,
}

impl Node {
    pub(super) fn is_cluster(&self) -> bool {
        self.transport.is_some()
    }

    /// Sends one message to a peer; a full or dead link drops it (Raft retries, and the
    /// coordinator resends forwarded PUTs on leader changes).
    pub(super) fn send_peer(&self, to: NodeId, msg: &PeerMsg) -> bool {
        if to == self.cfg.node_id {
            return false;
        }
        let Some(t) = &self.transport else {
            return false;
        };
        match t.send(to, msg.encode()) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(peer = to, "peer send dropped: {e}");
                false
            }
        }
    }

    /// Sends a group's Raft messages. A snapshot's fate is reported back to Raft, which
    /// otherwise waits for it forever: handed to the transport = finished (a lost one
    /// is detected by the follower's next reply and sent again), dropped = failed.
    pub(super) fn send_raft(&mut self, group: u64, msgs: Vec<raft::eraftpb::Message>) {
        for msg in msgs {
            let to = msg.to;
            let snapshot = msg.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot;
            let sent = self.send_peer(to, &PeerMsg::Raft { group, msg });
            if snapshot {
                let g = if group == META_GROUP_ID {
                    Some(&mut self.meta_group)
                } else {
                    self.partitions.get_mut(&group).map(|p| &mut p.group)
                };
                if let Some(g) = g {
                    g.report_snapshot(to, sent);
                }
            }
        }
    }

    /// The leader of a group as this node knows it.
    pub(super) fn leader_of(&self, gid: u64) -> Option<NodeId> {
        if let Some(p) = self.partitions.get(&gid) {
            return p.group.leader_id();
        }
        self.cluster.leader_hints.get(&gid).map(|(l, _)| *l)
    }

    // ----- inbound -------------------------------------------------------------

    pub(super) fn handle_peer(&mut self, from: NodeId, data: Bytes) {
        let msg = match PeerMsg::decode(&data) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(peer = from, "malformed peer message dropped: {e}");
                return;
            }
        };
        match msg {
            PeerMsg::Raft { group, msg } => self.step_raft(group, msg),
            PeerMsg::Put { group, conn, puts } => self.remote_put(from, group, conn, puts),
            PeerMsg::ToConn { conn, frame } => self.deliver_to_conn(conn, frame),
            PeerMsg::Consume {
                group,
                consumer,
                incarnation,
                conn,
                handle,
                subscription,
                max_msgs,
                max_bytes,
            } => {
                let limits = FlowLimits {
                    max_unconfirmed_msgs: max_msgs,
                    max_unconfirmed_bytes: max_bytes,
                };
                self.note_incarnation(from, incarnation);
                let origin = (from, incarnation, conn, handle);
                self.remote_consume(origin, group, consumer, &subscription, limits);
            }
            PeerMsg::StopConsume { group, consumer } => self.remote_stop_consume(group, consumer),
            PeerMsg::Confirm {
                group,
                consumer,
                conn,
                handle,
                guids,
                resent,
            } => {
                let conn = self.remote_conn(from, conn);
                if let Some(p) = self.partitions.get_mut(&group) {
                    let rejected = p.enqueue_confirms(&conn, handle, consumer, guids, resent);
                    super::answer_unknown_confirms(&conn, handle, rejected);
                }
            }
            PeerMsg::Nack {
                group,
                consumer,
                entries,
            } => self.apply_held_op(group, consumer, HeldOp::Nack, &entries),
            PeerMsg::Extend {
                group,
                consumer,
                entries,
            } => self.apply_held_op(group, consumer, HeldOp::Extend, &entries),
            PeerMsg::Admin { id, body } => self.remote_admin_request(from, id, &body),
            PeerMsg::AdminReply { id, status, body } => self.admin_reply(id, status, &body),
            PeerMsg::Leaders {
                incarnation,
                groups,
            } => {
                self.note_incarnation(from, incarnation);
                for g in groups {
                    let newer = self
                        .cluster
                        .leader_hints
                        .get(&g.group)
                        .is_none_or(|(_, t)| g.term >= *t);
                    if newer {
                        self.cluster.leader_hints.insert(g.group, (from, g.term));
                        self.cluster
                            .replica_hints
                            .insert(g.group, (g.voters, g.learners));
                    }
                }
            }
        }
    }

    fn step_raft(&mut self, group: u64, msg: raft::eraftpb::Message) {
        let g = if group == META_GROUP_ID {
            &mut self.meta_group
        } else if let Some(p) = self.partitions.get_mut(&group) {
            &mut p.group
        } else {
            // The queue is not known here yet (metadata still applying): Raft retries.
            return;
        };
        // A replica opened without a configuration starts from the leader's snapshot,
        // never from entry 1: those entries would leave it without the founding voters.
        let from_scratch = msg.get_msg_type() == raft::eraftpb::MessageType::MsgAppend
            && msg.index == 0
            && !g.is_member();
        if from_scratch {
            return;
        }
        let result = g.step(msg);
        if let Err(e) = result {
            tracing::debug!(group, "raft step refused: {e}");
        }
    }

    /// A connection of node `node`, as seen from here: frames go back as `ToConn`.
    pub(super) fn remote_conn(&self, node: NodeId, conn: ConnId) -> ConnTx {
        ConnTx::remote(node, conn, self.transport.clone(), self.cfg.max_frame_bytes)
    }

    fn remote_put(&mut self, from: NodeId, gid: u64, conn: ConnId, puts: Bytes) {
        let cmd = match Command::decode(&puts) {
            Ok(d) => d.command,
            Err(e) => {
                tracing::warn!(peer = from, "undecodable forwarded PUT dropped: {e}");
                return;
            }
        };
        let Command::Put { messages, .. } = cmd else {
            return;
        };
        let conn = self.remote_conn(from, conn);
        match self.partitions.get_mut(&gid) {
            // Not the leader (any more): drop; the coordinator resends when it sees the
            // new leader, and times the PUT out within its bound otherwise.
            Some(p) if p.group.is_leader() => {
                let bytes: u64 = messages.iter().map(|m| m.payload.len() as u64).sum();
                self.pending_put_bytes += bytes;
                p.enqueue_puts(conn, messages, crate::clock::now());
            }
            _ => {}
        }
    }

    /// A frame from a leader for one of this node's client connections.
    fn deliver_to_conn(&mut self, conn: ConnId, frame: Bytes) {
        let mut codec = FrameCodec::new(self.cfg.max_frame_bytes);
        let mut buf = BytesMut::from(&frame[..]);
        let frame = match codec.decode(&mut buf) {
            Ok(Some(f)) => f,
            _ => {
                tracing::warn!("undecodable frame from a peer dropped");
                return;
            }
        };
        let frame = match frame {
            Frame::ConfirmAck { queue_id, entries } => {
                for e in &entries {
                    self.cluster
                        .forwarded_confirms
                        .remove(&(conn, queue_id, e.guid));
                }
                Frame::ConfirmAck { queue_id, entries }
            }
            Frame::Ack { acks } => {
                // Only the first ACK of a GUID goes to the client (a resend to a new
                // leader can produce a second one, with the same outcome). It goes to
                // the connection that is waiting for it NOW: a client that reconnected
                // and sent the PUT again waits on its new connection, while the leader
                // may answer the send made for the old one. (Found by the whole-cluster
                // simulator: such ACKs went to the closed connection.)
                let mut by_conn: BTreeMap<ConnId, (ConnTx, Vec<AckEntry>)> = BTreeMap::new();
                for a in acks {
                    if let Some(f) = self.take_forwarded(&a.guid) {
                        by_conn
                            .entry(f.conn.id)
                            .or_insert_with(|| (f.conn.clone(), Vec::new()))
                            .1
                            .push(a);
                    }
                }
                for (_, (c, acks)) in by_conn {
                    c.send(Frame::Ack { acks });
                }
                return;
            }
            other => other,
        };
        match self.cluster.local_conns.get(&conn) {
            Some(c) => c.send(frame),
            None => tracing::debug!(conn, "frame for a connection gone from here dropped"),
        }
    }

    /// Removes a forwarded PUT whose ACK arrived; None if it was already answered.
    fn take_forwarded(&mut self, guid: &Guid) -> Option<Forwarded> {
        let f = self.cluster.forwarded.remove(guid)?;
        self.pending_put_bytes = self
            .pending_put_bytes
            .saturating_sub(f.msg.payload.len() as u64);
        if let Some(g) = self.cluster.forward_groups.get_mut(&f.gid) {
            g.guids.remove(&f.seq);
        }
        Some(f)
    }

    // ----- upstream: PUT forwarding ------------------------------------------------

    /// Hands PUTs for group `gid` to the local leader, or forwards them to the leader
    /// elsewhere (keeping them until their ACK comes back).
    pub(super) fn enqueue_or_forward(
        &mut self,
        gid: u64,
        conn: ConnTx,
        messages: Vec<tern_queue::PutMessage>,
        received: Instant,
    ) {
        let local_leader = self
            .partitions
            .get(&gid)
            .is_some_and(|p| p.group.is_leader());
        let has_local = self.partitions.contains_key(&gid);
        let leader = self.leader_of(gid);
        let forward = self.is_cluster()
            && conn.id != super::INTERNAL_CONN_ID
            && !local_leader
            && (leader.is_some_and(|l| l != self.cfg.node_id) || !has_local);
        if !forward {
            if let Some(p) = self.partitions.get_mut(&gid) {
                p.enqueue_puts(conn, messages, received);
            }
            return;
        }
        self.cluster.local_conns.insert(conn.id, conn.clone());
        let group = self.cluster.forward_groups.entry(gid).or_default();
        for msg in messages {
            if let Some(f) = self.cluster.forwarded.get_mut(&msg.guid) {
                // A client retransmission of a PUT still on its way (after a reconnect):
                // its ACK now goes to the new connection; its place in line stays. An
                // OLDER request for the same GUID (one this node had proposed as leader
                // and now forwards after losing leadership) must not take the ACK away
                // from the newer connection: found by the whole-cluster simulator.
                if received >= f.since {
                    f.conn = conn.clone();
                    f.since = received;
                }
                // The caller counted its bytes again; the entry is counted once.
                self.pending_put_bytes = self
                    .pending_put_bytes
                    .saturating_sub(msg.payload.len() as u64);
                continue;
            }
            self.cluster.next_forward_seq += 1;
            let seq = self.cluster.next_forward_seq;
            group.guids.insert(seq, msg.guid);
            group.unsent.push(msg.guid);
            let f = Forwarded {
                gid,
                conn: conn.clone(),
                msg,
                since: received,
                seq,
            };
            self.cluster.forwarded.insert(f.msg.guid, f);
        }
        // Sent by `resend_forwarded` this same round, to whoever leads now.
    }

    /// Sends every forwarded PUT of a group whose leader changed (or that was never
    /// sent) to its current leader; a group that is now led here takes them locally.
    pub(super) fn resend_forwarded(&mut self) {
        self.forward_parked();
        let gids: Vec<u64> = self.cluster.forward_groups.keys().copied().collect();
        for gid in gids {
            let leader = self.leader_of(gid);
            let Some(g) = self.cluster.forward_groups.get_mut(&gid) else {
                continue;
            };
            if g.guids.is_empty() {
                self.cluster.forward_groups.remove(&gid);
                continue;
            }
            let Some(leader) = leader else { continue };
            // Same leader, but the oldest PUT is unanswered for long: the PUT or its ACK
            // was dropped (a peer link reset while this node or the leader paused).
            // Send everything again; the leader's GUID history answers duplicates.
            let stuck = g.sent_to == Some(leader)
                && g.full_send.is_none_or(|t| {
                    crate::clock::now().saturating_duration_since(t)
                        >= Duration::from_millis(FORWARD_RESEND_MS)
                })
                && g.guids.values().next().is_some_and(|oldest| {
                    self.cluster.forwarded.get(oldest).is_some_and(|f| {
                        crate::clock::now().saturating_duration_since(f.since)
                            >= Duration::from_millis(FORWARD_RESEND_MS)
                    })
                });
            let guids: Vec<Guid> = if g.sent_to == Some(leader) && !stuck {
                // Same leader: only what arrived since (in order).
                std::mem::take(&mut g.unsent)
            } else {
                // New leader (or first send, or stuck): everything unanswered, in order.
                g.sent_to = Some(leader);
                g.full_send = Some(crate::clock::now());
                g.unsent.clear();
                g.guids.values().copied().collect()
            };
            if guids.is_empty() {
                continue;
            }
            if leader == self.cfg.node_id {
                self.take_back_forwarded(gid, guids);
                continue;
            }
            self.send_forwarded(gid, leader, &guids);
        }
    }

    /// PUTs parked at a local follower go to the leader elsewhere once one is known.
    fn forward_parked(&mut self) {
        if !self.is_cluster() {
            return;
        }
        let me = self.cfg.node_id;
        let gids: Vec<u64> = self
            .partitions
            .iter()
            .filter(|(_, p)| !p.group.is_leader() && p.group.leader_id().is_some_and(|l| l != me))
            .filter(|(_, p)| p.outstanding_puts() > 0)
            .map(|(gid, _)| *gid)
            .collect();
        for gid in gids {
            let Some(p) = self.partitions.get_mut(&gid) else {
                continue;
            };
            for (conn, msgs, received, bytes) in p.take_parked() {
                if conn.id == super::INTERNAL_CONN_ID {
                    // Dead letters wait for a local leader (answered `timeout` otherwise,
                    // then retried by their source partition).
                    if let Some(p) = self.partitions.get_mut(&gid) {
                        p.enqueue_puts(conn, msgs, received);
                    }
                    continue;
                }
                if conn.is_remote() {
                    // Another node's PUT, taken while this replica led: its coordinator
                    // still holds it and sends it to the new leader itself. Passing it
                    // on from here would add a second path for its ACK, which could
                    // take the ACK from the client's newer connection (found by the
                    // whole-cluster simulator).
                    self.pending_put_bytes = self.pending_put_bytes.saturating_sub(bytes);
                    continue;
                }
                // Already counted in pending bytes; enqueue_or_forward keeps them counted.
                self.enqueue_or_forward(gid, conn, msgs, received);
            }
        }
    }

    fn send_forwarded(&self, gid: u64, leader: NodeId, guids: &[Guid]) {
        // One message per origin connection: ACKs must find their socket.
        let mut by_conn: BTreeMap<ConnId, Vec<tern_queue::PutMessage>> = BTreeMap::new();
        for g in guids {
            if let Some(f) = self.cluster.forwarded.get(g) {
                by_conn.entry(f.conn.id).or_default().push(f.msg.clone());
            }
        }
        for (conn, msgs) in by_conn {
            let puts = Command::encode_put(now_ms(), &msgs);
            self.send_peer(
                leader,
                &PeerMsg::Put {
                    group: gid,
                    conn,
                    puts,
                },
            );
        }
    }

    /// This node became the leader of a group it had forwarded PUTs for.
    fn take_back_forwarded(&mut self, gid: u64, guids: Vec<Guid>) {
        for g in guids {
            if let Some(f) = self.cluster.forwarded.remove(&g) {
                if let Some(fg) = self.cluster.forward_groups.get_mut(&gid) {
                    fg.guids.remove(&f.seq);
                }
                if let Some(p) = self.partitions.get_mut(&gid) {
                    // Bytes stay counted: the local partition releases them on answer.
                    p.enqueue_puts(f.conn, vec![f.msg], f.since);
                }
            }
        }
    }

    /// Forwarded PUTs older than the PUT timeout are answered `timeout` (outcome unknown:
    /// the client may retry with the same GUID to learn it).
    pub(super) fn expire_forwarded(&mut self, bound: Duration) {
        let expired: Vec<Guid> = self
            .cluster
            .forwarded
            .iter()
            .filter(|(_, f)| crate::clock::now().saturating_duration_since(f.since) >= bound)
            .map(|(g, _)| *g)
            .collect();
        for g in expired {
            if let Some(f) = self.take_forwarded(&g) {
                super::reject_guids(&f.conn, &[g], Status::Timeout);
            }
        }
    }

    // ----- downstream: consumers ---------------------------------------------------

    /// Attaches a local consumer to each partition's leader elsewhere (and detaches it
    /// from a leader that no longer leads). Runs every round; cheap when nothing moved.
    ///
    /// An attachment is soft state at the leader: it drops it when this node goes
    /// silent (a pause, a cut link) or restarts, and a `Consume` can be lost. So every
    /// [`CONSUMER_REFRESH_MS`] each attachment is sent again (idempotent at the leader:
    /// what the consumer holds stays), and a lost one heals within that time.
    pub(super) fn home_consumers(&mut self) {
        if !self.is_cluster() {
            return;
        }
        let refresh = self.cluster.last_consumer_refresh.is_none_or(|t| {
            crate::clock::now().saturating_duration_since(t)
                >= Duration::from_millis(CONSUMER_REFRESH_MS)
        });
        if refresh {
            self.cluster.last_consumer_refresh = Some(crate::clock::now());
            let ttl = Duration::from_millis(FORWARDED_CONFIRM_TTL_MS);
            self.cluster.forwarded_confirms.retain(|_, (_, _, since)| {
                crate::clock::now().saturating_duration_since(*since) < ttl
            });
        }
        let mut moves = Vec::new();
        for (id, c) in &self.consumers {
            if super::is_remote_consumer(*id, self.cfg.node_id) {
                continue;
            }
            let Some(def) = self.meta.queue(&c.queue) else {
                continue;
            };
            for (_, gid) in def.group_ids() {
                let leader = self.leader_of(gid);
                let home = self.cluster.consumer_homes.get(&(*id, gid)).copied();
                if leader.is_some() && leader != home {
                    moves.push((*id, gid, home, leader));
                } else if refresh && home.is_some_and(|h| h != self.cfg.node_id) {
                    moves.push((*id, gid, None, home));
                }
            }
        }
        for (id, gid, old, new) in moves {
            let Some(new) = new else { continue };
            if let Some(old) = old.filter(|o| *o != self.cfg.node_id) {
                self.send_peer(
                    old,
                    &PeerMsg::StopConsume {
                        group: gid,
                        consumer: id,
                    },
                );
            }
            self.cluster.consumer_homes.insert((id, gid), new);
            let moved = old.is_some_and(|o| o != new);
            if new == self.cfg.node_id {
                if moved {
                    self.resend_confirms(id, gid, new);
                }
                continue; // the local partition has it already
            }
            let Some(c) = self.consumers.get(&id) else {
                continue;
            };
            let msg = PeerMsg::Consume {
                group: gid,
                consumer: id,
                incarnation: self.cluster.incarnation,
                conn: c.conn.id,
                handle: c.handle_id,
                subscription: c.subscription.clone(),
                max_msgs: c.limits.max_unconfirmed_msgs,
                max_bytes: c.limits.max_unconfirmed_bytes,
            };
            self.send_peer(new, &msg);
            if moved {
                self.resend_confirms(id, gid, new);
            }
        }
    }

    /// After consumer `id` moved to the new leader `to` of group `gid`: its CONFIRMs
    /// the old leader never answered go to the new one.
    fn resend_confirms(&mut self, id: ConsumerId, gid: u64, to: NodeId) {
        let ttl = Duration::from_millis(FORWARDED_CONFIRM_TTL_MS);
        self.cluster
            .forwarded_confirms
            .retain(|_, (_, _, since)| crate::clock::now().saturating_duration_since(*since) < ttl);
        let mut by_handle: BTreeMap<(ConnId, u32), Vec<Guid>> = BTreeMap::new();
        for ((conn, handle, guid), (c, g, _)) in &self.cluster.forwarded_confirms {
            if *c == id && *g == gid {
                by_handle.entry((*conn, *handle)).or_default().push(*guid);
            }
        }
        for ((conn, handle), guids) in by_handle {
            tracing::debug!(
                gid,
                consumer = id,
                n = guids.len(),
                "CONFIRMs resent to the new leader"
            );
            if to == self.cfg.node_id {
                let Some(c) = self.cluster.local_conns.get(&conn).cloned() else {
                    continue;
                };
                if let Some(p) = self.partitions.get_mut(&gid) {
                    let rejected = p.enqueue_confirms(&c, handle, id, guids, true);
                    super::answer_unknown_confirms(&c, handle, rejected);
                }
                continue;
            }
            let msg = PeerMsg::Confirm {
                group: gid,
                consumer: id,
                conn,
                handle,
                guids,
                resent: true,
            };
            let _ = self.send_peer(to, &msg);
        }
    }

    /// A local consumer left: detach it from every leader elsewhere.
    pub(super) fn unhome_consumer(&mut self, id: ConsumerId) {
        let homes: Vec<((ConsumerId, u64), NodeId)> = self
            .cluster
            .consumer_homes
            .iter()
            .filter(|((c, _), _)| *c == id)
            .map(|(k, v)| (*k, *v))
            .collect();
        for ((c, gid), node) in homes {
            self.cluster.consumer_homes.remove(&(c, gid));
            self.send_peer(
                node,
                &PeerMsg::StopConsume {
                    group: gid,
                    consumer: c,
                },
            );
        }
    }

    /// A peer's incarnation changed: it restarted, and the consumers its previous
    /// process attached here are gone (their messages go back to the queue).
    fn note_incarnation(&mut self, from: NodeId, incarnation: u64) {
        let previous = self.cluster.peer_incarnations.insert(from, incarnation);
        if previous.is_none_or(|p| p == incarnation) {
            return;
        }
        let stale: Vec<(ConsumerId, Vec<u64>)> = self
            .cluster
            .remote_consumers
            .iter()
            .filter(|(_, (node, inc, _))| *node == from && *inc != incarnation)
            .map(|(c, (_, _, groups))| (*c, groups.iter().copied().collect()))
            .collect();
        for (c, groups) in stale {
            for gid in groups {
                self.remote_stop_consume(gid, c);
            }
        }
    }

    /// Attaches consumer `consumer` of (node, incarnation, conn, handle) to a partition led here.
    fn remote_consume(
        &mut self,
        origin: (NodeId, u64, ConnId, u32),
        gid: u64,
        consumer: ConsumerId,
        subscription: &str,
        limits: FlowLimits,
    ) {
        let (from, incarnation, conn, handle) = origin;
        let Some(p) = self.partitions.get_mut(&gid) else {
            return;
        };
        p.add_consumer(consumer, subscription, limits);
        let queue = p.queue.clone();
        let entry = self
            .cluster
            .remote_consumers
            .entry(consumer)
            .or_insert_with(|| (from, incarnation, Set::default()));
        entry.2.insert(gid);
        let conn = self.remote_conn(from, conn);
        self.consumers.insert(
            consumer,
            Consumer {
                conn,
                handle_id: handle,
                queue,
                subscription: subscription.to_owned(),
                limits,
            },
        );
    }

    fn remote_stop_consume(&mut self, gid: u64, consumer: ConsumerId) {
        if let Some(p) = self.partitions.get_mut(&gid) {
            p.remove_consumer(consumer);
        }
        if let Some((_, _, groups)) = self.cluster.remote_consumers.get_mut(&consumer) {
            groups.remove(&gid);
            if groups.is_empty() {
                self.cluster.remote_consumers.remove(&consumer);
                self.consumers.remove(&consumer);
            }
        }
    }

    /// Consumers of a peer that stopped answering give their messages back; so do
    /// those of a peer whose link broke since the last look: PUSHes to them, or their
    /// CONFIRMs, may have been lost with it, and nothing resends those. Their home
    /// attaches them again within a second (`home_consumers`); what they held is
    /// redelivered (at-least-once). Found by the whole-cluster simulator: without
    /// this, a PUSH lost on a link reset stayed in flight until the consumer left.
    pub(super) fn drop_dead_peers_consumers(&mut self) {
        let Some(t) = &self.transport else { return };
        let mut broken: Set<NodeId> = Set::default();
        // Every peer's epoch is tracked, not only current homes': a consumer may attach
        // just before a break that this look is the first to see.
        for node in t.peer_ids() {
            let epoch = t.link_epoch(node);
            let seen = self.cluster.link_epochs.insert(node, epoch);
            // 0 → n is the first connection, not a break.
            if seen.is_some_and(|e| e != 0 && e != epoch) {
                tracing::debug!(
                    peer = node,
                    epoch,
                    "link to a consumers' home broke: their messages return"
                );
                broken.insert(node);
            }
        }
        let dead: Vec<(ConsumerId, Vec<u64>)> = self
            .cluster
            .remote_consumers
            .iter()
            .filter(|(_, (node, _, _))| !t.is_alive(*node) || broken.contains(node))
            .map(|(c, (_, _, groups))| (*c, groups.iter().copied().collect()))
            .collect();
        for (c, groups) in dead {
            for gid in groups {
                self.remote_stop_consume(gid, c);
            }
        }
    }

    // ----- admin -------------------------------------------------------------------

    /// Runs an admin request on the metadata leader when this node is not it.
    /// Returns the request back if it should run here.
    pub(super) fn forward_admin(
        &mut self,
        req: AdminRequest,
        reply: oneshot::Sender<Result<AdminReply, Rejection>>,
    ) -> Option<(AdminRequest, oneshot::Sender<Result<AdminReply, Rejection>>)> {
        let needs_meta_leader = matches!(
            req,
            AdminRequest::CreateQueue { .. }
                | AdminRequest::DeleteQueue { .. }
                | AdminRequest::AddNode { .. }
                | AdminRequest::RemoveNode { .. }
        );
        if !self.is_cluster() || !needs_meta_leader || self.meta_group.is_leader() {
            return Some((req, reply));
        }
        let Some(leader) = self.meta_group.leader_id() else {
            let _ = reply.send(Err(Rejection::new(
                Status::Unavailable,
                "the cluster has no metadata leader right now; retry",
            )));
            return None;
        };
        let body = match serde_json::to_vec(&req) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                let _ = reply.send(Err(Rejection::new(Status::Internal, e.to_string())));
                return None;
            }
        };
        self.cluster.next_admin_id += 1;
        let id = self.cluster.next_admin_id;
        let deadline = crate::clock::now() + Duration::from_millis(ADMIN_FORWARD_TIMEOUT_MS);
        self.cluster.admin_waits.insert(id, (reply, deadline));
        let _ = self.send_peer(leader, &PeerMsg::Admin { id, body });
        None
    }

    fn remote_admin_request(&mut self, from: NodeId, id: u64, body: &[u8]) {
        let (tx, rx) = oneshot::channel();
        match serde_json::from_slice::<AdminRequest>(body) {
            Ok(req) => self.handle_admin(req, tx),
            Err(e) => {
                let _ = tx.send(Err(Rejection::new(
                    Status::InvalidArgument,
                    format!("bad admin request: {e}"),
                )));
            }
        }
        self.cluster.remote_admin.push((from, id, rx));
    }

    fn admin_reply(&mut self, id: u64, status: u16, body: &[u8]) {
        let Some((reply, _)) = self.cluster.admin_waits.remove(&id) else {
            return;
        };
        let result = if status == 0 {
            serde_json::from_slice::<AdminReply>(body)
                .map_err(|e| Rejection::new(Status::Internal, e.to_string()))
        } else {
            let status = Status::from_u16(status).unwrap_or(Status::Internal);
            Err(Rejection::new(
                status,
                String::from_utf8_lossy(body).into_owned(),
            ))
        };
        let _ = reply.send(result);
    }

    /// Sends back the answers of peers' admin requests that completed; times out ours.
    pub(super) fn poll_admin(&mut self) {
        let mut still = Vec::new();
        for (from, id, mut rx) in std::mem::take(&mut self.cluster.remote_admin) {
            match rx.try_recv() {
                Ok(result) => {
                    let (status, body) = match result {
                        Ok(reply) => (0, serde_json::to_vec(&reply).unwrap_or_default()),
                        Err(r) => (r.status as u16, r.message.into_bytes()),
                    };
                    self.send_peer(
                        from,
                        &PeerMsg::AdminReply {
                            id,
                            status,
                            body: Bytes::from(body),
                        },
                    );
                }
                Err(oneshot::error::TryRecvError::Empty) => still.push((from, id, rx)),
                Err(oneshot::error::TryRecvError::Closed) => {}
            }
        }
        self.cluster.remote_admin = still;
        let now = crate::clock::now();
        let late: Vec<u64> = self
            .cluster
            .admin_waits
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some((reply, _)) = self.cluster.admin_waits.remove(&id) {
                let _ = reply.send(Err(Rejection::new(
                    Status::Unavailable,
                    "the metadata leader did not answer in time; retry",
                )));
            }
        }
        let waiting = std::mem::take(&mut self.cluster.opens_waiting);
        for (queue, open, deadline) in waiting {
            if self.meta.queue(&queue).is_some() {
                self.handle_open(*open);
            } else if deadline <= now {
                if let NodeCmd::Open { reply, .. } = *open {
                    let _ = reply.send(Err(Rejection::new(
                        Status::Unavailable,
                        format!("queue {queue:?} was not created in time; retry"),
                    )));
                }
            } else {
                self.cluster.opens_waiting.push((queue, open, deadline));
            }
        }
    }

    /// Auto-create from a node that is not the metadata leader: ask the leader, and open
    /// once the definition has been applied here.
    pub(super) fn create_remotely_then_open(&mut self, def_spec: AdminRequest, open: NodeCmd) {
        let (tx, _rx) = oneshot::channel();
        // The reply itself is not needed: the open proceeds when the queue appears.
        if let Some((req, reply)) = self.forward_admin(def_spec, tx) {
            self.handle_admin(req, reply);
        }
        let queue = match &open {
            NodeCmd::Open { queue, .. } => queue.clone(),
            _ => return,
        };
        let deadline = crate::clock::now() + Duration::from_millis(ADMIN_FORWARD_TIMEOUT_MS);
        self.cluster
            .opens_waiting
            .push((queue, Box::new(open), deadline));
    }

    // ----- graceful stop -------------------------------------------------------------

    /// While releasing: asks every group led here to move to its most caught-up live
    /// follower (again every second, since a transfer can fail), and answers when done.
    pub(super) fn release_leadership(&mut self) {
        let Some((_, deadline)) = &self.cluster.releasing else {
            return;
        };
        let led: Vec<u64> = self
            .partitions
            .iter()
            .filter(|(_, p)| p.group.is_leader() && p.group.voters().len() > 1)
            .map(|(gid, _)| *gid)
            .chain(
                (self.meta_group.is_leader() && self.meta_group.voters().len() > 1)
                    .then_some(META_GROUP_ID),
            )
            .collect();
        if led.is_empty() || crate::clock::now() >= *deadline {
            if let Some((reply, _)) = self.cluster.releasing.take() {
                if !led.is_empty() {
                    tracing::warn!(
                        groups = led.len(),
                        "graceful stop: some groups still led here"
                    );
                }
                let _ = reply.send(());
            }
            return;
        }
        let due = self.cluster.last_transfer.is_none_or(|t| {
            crate::clock::now().saturating_duration_since(t) >= Duration::from_secs(1)
        });
        if !due {
            return;
        }
        self.cluster.last_transfer = Some(crate::clock::now());
        for gid in led {
            let group = if gid == META_GROUP_ID {
                &mut self.meta_group
            } else if let Some(p) = self.partitions.get_mut(&gid) {
                &mut p.group
            } else {
                continue;
            };
            let me = self.cfg.node_id;
            let alive = |id: u64| self.transport.as_ref().is_some_and(|t| t.is_alive(id));
            let target = group
                .progress()
                .into_iter()
                .filter(|(id, _)| *id != me && alive(*id))
                .max_by_key(|(_, matched)| *matched)
                .map(|(id, _)| id);
            if let Some(to) = target {
                group.transfer_leader(to);
            }
        }
    }

    // ----- gossip ------------------------------------------------------------------

    /// Tells every peer which groups this node leads (for nodes without a replica).
    pub(super) fn gossip_leaders(&mut self) {
        let Some(t) = &self.transport else { return };
        // Paced by the monotonic clock, like every timer of the loop.
        let now = crate::clock::now();
        let interval = Duration::from_millis(LEADER_GOSSIP_INTERVAL_MS);
        if self
            .cluster
            .last_gossip
            .is_some_and(|t| now.saturating_duration_since(t) < interval)
        {
            return;
        }
        self.cluster.last_gossip = Some(now);
        let led = |gid: u64, g: &tern_replication::Group| LedGroup {
            group: gid,
            term: g.term(),
            voters: g.voters(),
            learners: g.learners(),
        };
        let mut groups: Vec<LedGroup> = self
            .partitions
            .iter()
            .filter(|(_, p)| p.group.is_leader())
            .map(|(gid, p)| led(*gid, &p.group))
            .collect();
        if self.meta_group.is_leader() {
            groups.push(led(META_GROUP_ID, &self.meta_group));
        }
        let msg = PeerMsg::Leaders {
            incarnation: self.cluster.incarnation,
            groups,
        }
        .encode();
        for peer in t.peer_ids() {
            if peer != self.cfg.node_id {
                let _ = t.send(peer, msg.clone());
            }
        }
    }

    /// Starts elections in new multi-voter groups where this node is the first replica,
    /// so leaders spread over the nodes and a new queue serves without waiting for an
    /// election timeout.
    pub(super) fn campaign_if_first(&mut self, def: &QueueDef) {
        for (p, gid) in def.group_ids() {
            let replicas = def.replicas_of(p, self.cfg.node_id);
            if replicas.first() == Some(&self.cfg.node_id) && replicas.len() > 1 {
                if let Some(part) = self.partitions.get_mut(&gid) {
                    if let Err(e) = part.group.campaign() {
                        tracing::debug!(gid, "campaign failed: {e}");
                    }
                }
            }
        }
    }
}

/// Encodes a client frame for a `ToConn` message.
pub(super) fn encode_frame(frame: Frame, max_frame_bytes: u32) -> Option<Bytes> {
    let mut codec = FrameCodec::new(max_frame_bytes);
    let mut buf = BytesMut::new();
    codec.encode(frame, &mut buf).ok()?;
    Some(buf.freeze())
}
