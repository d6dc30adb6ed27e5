//! [`Group`]: one Raft group (a partition or the metadata group) driven by the node loop.

use crate::logger::raft_logger;
use crate::storage::LogStorage;
use crate::ReplicationError;
use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message,
    MessageType,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use std::path::PathBuf;
use tern_log::LogOptions;

/// Static configuration of one group on one node.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    /// This node's Raft id (never 0).
    pub node_id: u64,
    pub group_id: u64,
    pub dir: PathBuf,
    /// Voters used only when the group is created (no state on disk yet).
    pub bootstrap_voters: Vec<u64>,
    /// fsync before counting toward a quorum (durable queues); off for transient ones.
    pub durable: bool,
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    pub max_size_per_msg_bytes: u64,
    pub max_inflight_msgs: usize,
    /// Raft drops proposals beyond this many uncommitted bytes (back-pressure).
    pub max_uncommitted_bytes: u64,
    pub log: LogOptions,
    /// Election timeout exactly `election_tick` instead of raft-rs's random pick in
    /// [election_tick, 2 × election_tick): for the deterministic simulator, which
    /// supplies its own seeded jitter by skipping ticks.
    pub fixed_election_timeout: bool,
}

impl GroupConfig {
    pub fn new(node_id: u64, group_id: u64, dir: PathBuf, voters: Vec<u64>) -> Self {
        GroupConfig {
            node_id,
            group_id,
            dir,
            bootstrap_voters: voters,
            durable: true,
            election_tick: 10,
            heartbeat_tick: 2,
            max_size_per_msg_bytes: 1024 * 1024,
            max_inflight_msgs: 256,
            max_uncommitted_bytes: 256 * 1024 * 1024,
            log: LogOptions::default(),
            fixed_election_timeout: false,
        }
    }
}

/// What one round of Ready processing produced for the caller.
#[derive(Default)]
pub struct ReadyOutput {
    /// Raft messages to send to peers (after this call returns, everything they depend on is persisted).
    pub messages: Vec<Message>,
    /// Committed entries, in order, to apply before the next `handle_ready`.
    pub committed: Vec<Entry>,
    /// Set when the role or leader changed: (role, leader id or 0).
    pub role_change: Option<(StateRole, u64)>,
    /// A snapshot received from the leader was installed: the state machine must restore from it.
    pub installed_snapshot: Option<Bytes>,
    /// Membership changes applied in this round (their entries come back with empty data).
    pub membership: Vec<MembershipChange>,
    /// How long the log fsync of this round took, if one was done.
    pub sync_duration: Option<std::time::Duration>,
}

/// One membership change of a group (Raft configuration change, one node at a time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    /// A non-voting replica that receives the log (catch-up before it votes).
    AddLearner(u64),
    /// A caught-up learner becomes a voter.
    Promote(u64),
    Remove(u64),
}

impl MembershipChange {
    fn to_conf_change(self) -> ConfChange {
        let (kind, id) = match self {
            MembershipChange::AddLearner(id) => (ConfChangeType::AddLearnerNode, id),
            MembershipChange::Promote(id) => (ConfChangeType::AddNode, id),
            MembershipChange::Remove(id) => (ConfChangeType::RemoveNode, id),
        };
        let mut cc = ConfChange::default();
        cc.set_change_type(kind);
        cc.node_id = id;
        cc
    }

    fn from_conf_change(cc: &ConfChangeV2) -> Option<MembershipChange> {
        let single = cc.get_changes().first()?;
        Some(match single.get_change_type() {
            ConfChangeType::AddLearnerNode => MembershipChange::AddLearner(single.node_id),
            ConfChangeType::AddNode => MembershipChange::Promote(single.node_id),
            ConfChangeType::RemoveNode => MembershipChange::Remove(single.node_id),
        })
    }
}

/// A snapshot of a group's progress, for status pages and metrics.
#[derive(Clone, Debug)]
pub struct GroupStatus {
    pub role: StateRole,
    pub leader_id: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub log_first_index: u64,
    pub log_disk_bytes: u64,
    /// Rebuilding from peers after damage to its files: does not vote yet.
    pub repairing: bool,
}

/// Two messages of the repair exchange (see [`Group::step`]). They travel as append
/// responses, so transports need nothing new; only `Group::step` reads them.
/// - replica → leader, `index` = where its log ends: "I lost entries after this";
/// - leader → replica, `index` = what the replica had acknowledged before (the
///   leader's match index for it, from before the reset): "catch up to this".
const LOST_ENTRIES_CONTEXT: &[u8] = b"tern:lost-entries";
const ACKNOWLEDGED_CONTEXT: &[u8] = b"tern:acknowledged";

pub struct Group {
    node: RawNode<LogStorage>,
    group_id: u64,
    applied_index: u64,
    /// Messages this layer itself sends (not Raft's): drained by `handle_ready`.
    /// At most one per peer is queued.
    outbox: Vec<Message>,
    /// Repairing: (term, index) from that term's leader: this replica had
    /// acknowledged entries up to `index`, so it must hold them before it votes.
    repair_target: Option<(u64, u64)>,
}

impl Group {
    /// Opens (or creates) the group. Returns the group and the state-machine snapshot
    /// to restore from, if one exists; entries after it are replayed through
    /// `handle_ready` once they are known committed.
    pub fn open(cfg: &GroupConfig) -> Result<(Group, Option<Bytes>), ReplicationError> {
        let storage = LogStorage::open(
            &cfg.dir,
            cfg.log.clone(),
            &cfg.bootstrap_voters,
            cfg.durable,
        )?;
        let snapshot = storage.snapshot_file().clone();
        let raft_cfg = raft::Config {
            id: cfg.node_id,
            election_tick: cfg.election_tick,
            heartbeat_tick: cfg.heartbeat_tick,
            applied: snapshot.index,
            max_size_per_msg: cfg.max_size_per_msg_bytes,
            max_inflight_msgs: cfg.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            max_uncommitted_size: cfg.max_uncommitted_bytes,
            ..Default::default()
        };
        let raft_cfg = if cfg.fixed_election_timeout {
            raft::Config {
                min_election_tick: cfg.election_tick,
                max_election_tick: cfg.election_tick + 1,
                ..raft_cfg
            }
        } else {
            raft_cfg
        };
        raft_cfg.validate()?;
        let node = RawNode::new(&raft_cfg, storage, &raft_logger(cfg.group_id))?;
        let restore = (snapshot.index > 0).then_some(snapshot.data);
        Ok((
            Group {
                node,
                group_id: cfg.group_id,
                applied_index: snapshot.index,
                outbox: Vec::new(),
                repair_target: None,
            },
            restore,
        ))
    }

    pub fn group_id(&self) -> u64 {
        self.group_id
    }

    /// If this node is the only voter, become leader now instead of waiting for an
    /// election timeout (a single-node cluster starts serving immediately).
    pub fn campaign_if_sole_voter(&mut self) -> Result<(), ReplicationError> {
        let cs = self.node.store().conf_state();
        if cs.voters == [self.node.raft.id] && self.node.raft.state != StateRole::Leader {
            self.node.campaign()?;
        }
        Ok(())
    }

    /// Starts an election now (a new group's first replica, so leaders spread and a new
    /// queue does not wait for an election timeout).
    pub fn campaign(&mut self) -> Result<(), ReplicationError> {
        if self.node.raft.state == StateRole::Leader || self.is_repairing() {
            return Ok(());
        }
        Ok(self.node.campaign()?)
    }

    /// Asks Raft to hand leadership to `to` (graceful stop). The transfer completes
    /// when `to` wins the election it triggers; the caller watches `is_leader`.
    pub fn transfer_leader(&mut self, to: u64) {
        self.node.transfer_leader(to);
    }

    /// Voters of the group's current configuration.
    pub fn voters(&self) -> Vec<u64> {
        self.node.store().conf_state().voters.clone()
    }

    /// Per voter, how far its log matches the leader's (leader only).
    pub fn progress(&self) -> Vec<(u64, u64)> {
        if self.node.raft.state != StateRole::Leader {
            return Vec::new();
        }
        let mut out: Vec<(u64, u64)> = self
            .node
            .raft
            .prs()
            .iter()
            .map(|(id, pr)| (*id, pr.matched))
            .collect();
        out.sort();
        out
    }

    pub fn tick(&mut self) -> bool {
        self.node.tick()
    }

    /// Steps a message from a peer into Raft, with the repair rules around it:
    /// - a repairing replica grants no vote and takes no leadership (what it lost may
    ///   be what makes a quorum intersect with the last one), and asks each new
    ///   leader what it had acknowledged;
    /// - a heartbeat claiming a commit index past this replica's log (the leader
    ///   believes it holds entries it lost) is clamped, which raft-rs would otherwise
    ///   treat as a broken invariant, and the leader is told where the log ends;
    /// - a leader told so answers with what the replica had acknowledged and resends
    ///   from where its log ends.
    pub fn step(&mut self, mut msg: Message) -> Result<(), ReplicationError> {
        if msg.get_msg_type() == MessageType::MsgAppendResponse {
            if msg.context.as_ref() == LOST_ENTRIES_CONTEXT {
                self.resend_lost_entries(&msg);
                return Ok(());
            }
            if msg.context.as_ref() == ACKNOWLEDGED_CONTEXT {
                return self.set_repair_target(&msg);
            }
        }
        let repairing = self.is_repairing();
        let last_index = self.node.raft.raft_log.last_index();
        match msg.get_msg_type() {
            MessageType::MsgRequestVote
            | MessageType::MsgRequestPreVote
            | MessageType::MsgTimeoutNow
                if repairing =>
            {
                tracing::debug!(group = self.group_id, from = msg.from, kind = ?msg.get_msg_type(), "repairing: no vote, no leadership");
                return Ok(());
            }
            MessageType::MsgHeartbeat | MessageType::MsgAppend => {
                let lost =
                    msg.get_msg_type() == MessageType::MsgHeartbeat && msg.commit > last_index;
                if lost {
                    msg.commit = last_index;
                }
                let unasked = repairing && self.repair_target.is_none_or(|(t, _)| t != msg.term);
                if lost || unasked {
                    self.tell_leader_where_the_log_ends(&msg);
                }
            }
            _ => {}
        }
        Ok(self.node.step(msg)?)
    }

    /// This replica rebuilds from its peers after damage to its files.
    pub fn is_repairing(&self) -> bool {
        self.node.store().repairing().is_some()
    }

    /// Queues `m` (one of the repair exchange) for `handle_ready`, replacing one
    /// already queued for the same peer.
    fn queue(&mut self, to: u64, term: u64, index: u64, context: &'static [u8]) {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppendResponse);
        m.to = to;
        m.from = self.node.raft.id;
        m.term = term;
        m.reject = true;
        m.index = index;
        m.reject_hint = index;
        m.context = bytes::Bytes::from_static(context);
        self.outbox.retain(|q| q.to != to);
        self.outbox.push(m);
    }

    fn tell_leader_where_the_log_ends(&mut self, from_leader: &Message) {
        let last = self.node.store().persisted_last_index();
        self.queue(
            from_leader.from,
            from_leader.term,
            last,
            LOST_ENTRIES_CONTEXT,
        );
    }

    /// Leader: a replica says where its log ends. If that is below what it had
    /// acknowledged, it lost entries: probe it again from there (raft-rs never lowers
    /// a replica's match index by itself and would ignore its rejections). Either way,
    /// tell it what it had acknowledged.
    fn resend_lost_entries(&mut self, msg: &Message) {
        if !self.is_leader() || msg.term != self.node.raft.term {
            return;
        }
        let (group, from, holds) = (self.group_id, msg.from, msg.index);
        let Some(pr) = self.node.raft.mut_prs().get_mut(from) else {
            return;
        };
        let acknowledged = pr.matched;
        if acknowledged > holds {
            tracing::warn!(
                group,
                replica = from,
                acknowledged,
                holds,
                "a replica lost entries it had acknowledged: sending them again"
            );
            pr.matched = holds;
            pr.become_probe();
            pr.next_idx = holds + 1;
        }
        let term = self.node.raft.term;
        self.queue(from, term, acknowledged, ACKNOWLEDGED_CONTEXT);
    }

    /// The current leader says what this replica had acknowledged. More than its log
    /// holds, and it did not know it lost anything (a wiped disk under an old id, a
    /// transient replica's lost tail): it becomes a repairing replica now.
    fn set_repair_target(&mut self, msg: &Message) -> Result<(), ReplicationError> {
        let raft = &self.node.raft;
        if msg.term != raft.term || msg.from != raft.leader_id {
            return Ok(());
        }
        if !self.is_repairing() {
            let holds = self.node.store().persisted_last_index();
            if msg.index <= holds {
                return Ok(());
            }
            tracing::error!(
                group = self.group_id,
                acknowledged = msg.index,
                holds,
                "this replica lost entries it had acknowledged: it rebuilds from its peers and does not vote until then"
            );
            let commit = raft.raft_log.committed;
            self.node.mut_store().begin_repair(commit)?;
        }
        self.repair_target = Some((msg.term, msg.index));
        Ok(())
    }

    /// Ends repair once the log holds everything committed before the damage:
    /// - everything the current leader counted this replica's acknowledgement for
    ///   (up to the index it reported), and
    /// - up to its commit index, the log of a leader of the current term that has
    ///   committed an entry of its own term: by Raft's leader completeness that log
    ///   holds every entry committed in earlier terms. That leader was elected
    ///   without this replica's vote.
    fn maybe_finish_repair(&mut self) -> Result<(), ReplicationError> {
        let Some(known_commit) = self.node.store().repairing() else {
            return Ok(());
        };
        let raft = &self.node.raft;
        let Some((term, acknowledged)) = self.repair_target else {
            return Ok(());
        };
        let committed = raft.raft_log.committed;
        let needed = acknowledged.max(known_commit).max(1);
        if raft.leader_id == 0 || term != raft.term || committed < needed {
            return Ok(());
        }
        if raft.raft_log.term(committed).ok() != Some(raft.term) {
            return Ok(());
        }
        self.node.mut_store().finish_repair()?;
        self.repair_target = None;
        tracing::info!(
            group = self.group_id,
            committed,
            "repaired from peers: this replica votes again"
        );
        Ok(())
    }

    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    pub fn leader_id(&self) -> Option<u64> {
        let id = self.node.raft.leader_id;
        (id != 0).then_some(id)
    }

    pub fn term(&self) -> u64 {
        self.node.raft.term
    }

    /// Proposes `data` as one entry. Returns its (index, term): the caller keeps the
    /// pending answer under that key and answers only when that exact entry applies.
    pub fn propose(&mut self, data: Bytes) -> Result<(u64, u64), ReplicationError> {
        if !self.is_leader() {
            return Err(ReplicationError::NotLeader {
                leader: self.leader_id(),
            });
        }
        let before = self.node.raft.raft_log.last_index();
        match self.node.propose(Vec::new(), Vec::from(data)) {
            Ok(()) => {}
            Err(raft::Error::ProposalDropped) => return Err(ReplicationError::ProposalDropped),
            Err(e) => return Err(e.into()),
        }
        let index = self.node.raft.raft_log.last_index();
        if index != before + 1 {
            return Err(ReplicationError::ProposalDropped);
        }
        Ok((index, self.node.raft.term))
    }

    /// Proposes one membership change (leader only; one at a time: the caller checks
    /// [`Group::has_pending_membership_change`] first).
    pub fn propose_membership(&mut self, change: MembershipChange) -> Result<(), ReplicationError> {
        if !self.is_leader() {
            return Err(ReplicationError::NotLeader {
                leader: self.leader_id(),
            });
        }
        match self
            .node
            .propose_conf_change(Vec::new(), change.to_conf_change())
        {
            Ok(()) => Ok(()),
            Err(raft::Error::ProposalDropped) => Err(ReplicationError::ProposalDropped),
            Err(e) => Err(e.into()),
        }
    }

    /// Leadership is being handed to another replica: proposals are refused meanwhile.
    pub fn is_transferring_leadership(&self) -> bool {
        self.node.raft.lead_transferee.is_some()
    }

    /// A proposed membership change is not applied yet.
    pub fn has_pending_membership_change(&self) -> bool {
        self.node.raft.has_pending_conf()
    }

    /// Learners (non-voting replicas) of the current configuration.
    pub fn learners(&self) -> Vec<u64> {
        self.node.store().conf_state().learners.clone()
    }

    /// This node is a voter or learner of the group. A replica opened without a
    /// configuration (added to an existing group) is not, until the leader's snapshot.
    pub fn is_member(&self) -> bool {
        let cs = self.node.store().conf_state();
        let id = self.node.raft.id;
        cs.voters.contains(&id) || cs.learners.contains(&id)
    }

    /// Tells Raft whether a snapshot message reached the transport (leader only).
    pub fn report_snapshot(&mut self, to: u64, sent: bool) {
        let status = if sent {
            SnapshotStatus::Finish
        } else {
            SnapshotStatus::Failure
        };
        self.node.report_snapshot(to, status);
    }

    /// Applies the committed conf-change entries among `entries` and blanks their data
    /// (the state machines above see an empty entry).
    fn apply_membership(
        &mut self,
        entries: &mut [Entry],
        applied: &mut Vec<MembershipChange>,
    ) -> Result<(), ReplicationError> {
        for e in entries.iter_mut() {
            let cc = match e.get_entry_type() {
                EntryType::EntryNormal => continue,
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    cc.merge_from_bytes(&e.data)
                        .map_err(|err| self.corrupt(err))?;
                    let mut single = ConfChangeSingle::default();
                    single.set_change_type(cc.get_change_type());
                    single.node_id = cc.node_id;
                    let mut v2 = ConfChangeV2::default();
                    v2.mut_changes().push(single);
                    v2
                }
                EntryType::EntryConfChangeV2 => {
                    let mut cc = ConfChangeV2::default();
                    cc.merge_from_bytes(&e.data)
                        .map_err(|err| self.corrupt(err))?;
                    cc
                }
            };
            let cs = self.node.apply_conf_change(&cc)?;
            self.node.mut_store().set_conf_state(cs)?;
            if let Some(change) = MembershipChange::from_conf_change(&cc) {
                tracing::info!(group = self.group_id, ?change, "membership change applied");
                applied.push(change);
            }
            e.data = Default::default();
        }
        Ok(())
    }

    fn corrupt(&self, err: impl std::fmt::Display) -> ReplicationError {
        ReplicationError::CorruptState {
            path: PathBuf::new(),
            reason: format!("group {}: undecodable conf change: {err}", self.group_id),
        }
    }

    pub fn has_ready(&self) -> bool {
        self.node.has_ready() || !self.outbox.is_empty()
    }

    /// Processes one Ready: persists entries and hard state (fsync for durable groups)
    /// before returning the messages that depend on them, and returns committed entries.
    /// The caller must apply every returned committed entry before calling again.
    pub fn handle_ready(&mut self) -> Result<Option<ReadyOutput>, ReplicationError> {
        if !self.node.has_ready() {
            if self.outbox.is_empty() {
                return Ok(None);
            }
            return Ok(Some(ReadyOutput {
                messages: std::mem::take(&mut self.outbox),
                ..Default::default()
            }));
        }
        let mut out = ReadyOutput::default();
        out.messages.append(&mut self.outbox);
        let mut rd = self.node.ready();
        if let Some(ss) = rd.ss() {
            out.role_change = Some((ss.raft_state, ss.leader_id));
        }
        // A leader may send appends before its own write: it counts itself only after persisting.
        out.messages.extend(rd.take_messages());
        if !rd.snapshot().is_empty() {
            // This replica fell behind the leader's compaction: take its snapshot (state
            // plus the entries still holding unsettled payloads) before anything else.
            let index = rd.snapshot().get_metadata().index;
            let data = self.node.mut_store().install_snapshot(rd.snapshot())?;
            out.installed_snapshot = Some(data);
            self.applied_index = index;
            tracing::info!(
                group = self.group_id,
                index,
                "installed a snapshot from the leader"
            );
        }
        let mut committed = rd.take_committed_entries();
        self.apply_membership(&mut committed, &mut out.membership)?;
        out.committed.extend(committed);
        let store = self.node.mut_store();
        store.append(rd.entries())?;
        if !rd.entries().is_empty() || rd.must_sync() {
            let started = std::time::Instant::now();
            store.sync()?;
            out.sync_duration = Some(started.elapsed());
        }
        if let Some(hs) = rd.hs() {
            store.set_hard_state(hs)?;
        }
        out.messages.extend(rd.take_persisted_messages());
        let mut light = self.node.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.node.mut_store().set_commit(commit);
        }
        out.messages.extend(light.take_messages());
        let mut committed = light.take_committed_entries();
        self.apply_membership(&mut committed, &mut out.membership)?;
        out.committed.extend(committed);
        if let Some(last) = out.committed.last() {
            debug_assert!(last.index > self.applied_index);
            self.applied_index = last.index;
        }
        self.node.advance_apply();
        if self.is_repairing() {
            // No campaign either: its vote requests stay home.
            out.messages.retain(|m| {
                !matches!(
                    m.get_msg_type(),
                    MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
                )
            });
            self.maybe_finish_repair()?;
        }
        Ok(Some(out))
    }

    /// Reads the data of a log entry (to PUSH a payload that the state machine locates there).
    pub fn entry_data(&self, index: u64) -> Result<Bytes, ReplicationError> {
        self.node.store().entry_data(index)
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    pub fn snapshot_index(&self) -> u64 {
        self.node.store().snapshot_file().index
    }

    /// Log bytes appended since the last snapshot (drives the snapshot policy).
    pub fn log_disk_bytes(&self) -> u64 {
        self.node.store().log().disk_bytes()
    }

    /// Saves a state-machine snapshot at the applied index and releases log segments
    /// below `keep_from` (the oldest index still holding an unsettled payload).
    pub fn compact(&mut self, data: Bytes, keep_from: u64) -> Result<u64, ReplicationError> {
        let index = self.applied_index;
        self.node.mut_store().compact(index, data, keep_from)
    }

    pub fn status(&self) -> GroupStatus {
        let store = self.node.store();
        GroupStatus {
            role: self.node.raft.state,
            leader_id: self.node.raft.leader_id,
            term: self.node.raft.term,
            commit_index: self.node.raft.raft_log.committed,
            applied_index: self.applied_index,
            last_index: self.node.raft.raft_log.last_index(),
            snapshot_index: store.snapshot_file().index,
            log_first_index: store.log().first_index(),
            log_disk_bytes: store.log().disk_bytes(),
            repairing: store.repairing().is_some(),
        }
    }
}
