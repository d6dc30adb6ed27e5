//! Membership changes: nodes joining and leaving, and the replica moves they cause.
//!
//! Contract (runs on the node loop, once per tick):
//! - Where a partition should live is placement over the *current* members
//!   ([`MetaState::target_replicas`]); `tern cluster add-node` / `remove-node` only
//!   change the members in the metadata group. Each group's leader then moves its own
//!   replicas, one Raft configuration change at a time:
//!   1. a node that should hold a replica and does not is added as a **learner**; the
//!      leader compacts right after, so the learner starts from a snapshot that names
//!      it (a replica never starts from an empty configuration);
//!   2. a learner within [`LEARNER_CAUGHT_UP_ENTRIES`] of the commit index is
//!      **promoted** to voter;
//!   3. only then is a replica that should go **removed**; a leader that should go
//!      first hands leadership to a caught-up voter that stays.
//!
//!   So the number of voters never drops below the target while replicas move, and
//!   every ACKed message stays on a quorum throughout.
//! - The metadata group follows the member list the same way, except that a leaving
//!   node is removed from it only once no partition group lists it any more (so it
//!   keeps learning the metadata that tells it to hand its replicas over).

use super::meta::META_GROUP_ID;
use super::{Node, NodeError};
use tern_replication::{Group, MembershipChange};

/// A learner this close to the leader's commit index counts as caught up.
const LEARNER_CAUGHT_UP_ENTRIES: u64 = 100;

/// The next configuration step of one group, decided by its leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    Change(MembershipChange),
    /// This leader must go: hand leadership to this voter first.
    Transfer(u64),
}

/// Decides the next step towards `target` (pure: unit-tested below).
pub(super) fn next_step(
    me: u64,
    target: &[u64],
    voters: &[u64],
    learners: &[u64],
    progress: &[(u64, u64)],
    commit: u64,
) -> Option<Step> {
    if target.is_empty() {
        return None; // no members known: never empty a group
    }
    let present = |n: &u64| voters.contains(n) || learners.contains(n);
    if let Some(n) = target.iter().find(|n| !present(n)) {
        return Some(Step::Change(MembershipChange::AddLearner(*n)));
    }
    let caught_up = |n: &u64| {
        progress
            .iter()
            .any(|(id, matched)| id == n && matched + LEARNER_CAUGHT_UP_ENTRIES >= commit)
    };
    if let Some(l) = learners.iter().find(|l| target.contains(l) && caught_up(l)) {
        return Some(Step::Change(MembershipChange::Promote(*l)));
    }
    if let Some(l) = learners.iter().find(|l| !target.contains(l)) {
        return Some(Step::Change(MembershipChange::Remove(*l)));
    }
    // Remove a voter only once every target node votes.
    if !target.iter().all(|n| voters.contains(n)) {
        return None;
    }
    let leaving = voters.iter().find(|v| !target.contains(v))?;
    if *leaving != me {
        return Some(Step::Change(MembershipChange::Remove(*leaving)));
    }
    target
        .iter()
        .find(|n| **n != me && caught_up(n))
        .map(|n| Step::Transfer(*n))
}

fn step_group(group: &mut Group, me: u64, target: &[u64], gid: u64) -> Option<Step> {
    if !group.is_leader() || group.has_pending_membership_change() {
        return None;
    }
    let commit = group.status().commit_index;
    let step = next_step(
        me,
        target,
        &group.voters(),
        &group.learners(),
        &group.progress(),
        commit,
    )?;
    match step {
        Step::Change(change) => match group.propose_membership(change) {
            Ok(()) => tracing::info!(group = gid, ?change, "membership change proposed"),
            Err(e) => tracing::debug!(group = gid, ?change, "membership change refused: {e}"),
        },
        Step::Transfer(to) => group.transfer_leader(to),
    }
    Some(step)
}

impl Node {
    /// One reconciliation pass over the groups this node leads.
    pub(super) fn reconcile_membership(&mut self) {
        if self.transport.is_none() {
            return;
        }
        let me = self.cfg.node_id;
        let factor = self.cfg.replication_factor;
        for (gid, part) in self.partitions.iter_mut() {
            let Some(def) = self.meta.queue(&part.queue) else {
                continue;
            };
            let target = self.meta.target_replicas(def, part.index, factor);
            step_group(&mut part.group, me, &target, *gid);
        }
        if !self.meta_group.is_leader() || self.meta_group.has_pending_membership_change() {
            return;
        }
        let target = self.meta.member_ids();
        let leaving = self
            .meta_group
            .voters()
            .into_iter()
            .chain(self.meta_group.learners())
            .find(|v| !target.contains(v));
        if let Some(v) = leaving {
            if self.holds_replicas(v) {
                return; // it still has replicas to hand over: keep it informed
            }
        }
        step_group(&mut self.meta_group, me, &target, META_GROUP_ID);
    }

    /// Whether any partition group still lists node `id` (as its leader last told us,
    /// or as our own replica sees it). Unknown groups count as "yes".
    fn holds_replicas(&self, id: u64) -> bool {
        self.meta.queues().any(|def| {
            def.group_ids().any(|(_, gid)| {
                if let Some(p) = self.partitions.get(&gid) {
                    if p.group.is_leader() {
                        return p.group.voters().contains(&id) || p.group.learners().contains(&id);
                    }
                }
                match self.cluster.replica_hints.get(&gid) {
                    Some((voters, learners)) => voters.contains(&id) || learners.contains(&id),
                    None => true,
                }
            })
        })
    }

    /// After a partition group applied membership changes: a leader that added a
    /// learner compacts (the learner must start from a snapshot); a replica that was
    /// removed closes and leaves a tombstone.
    pub(super) fn after_partition_membership(
        &mut self,
        gid: u64,
        changes: &[MembershipChange],
    ) -> Result<(), NodeError> {
        let me = self.cfg.node_id;
        for change in changes {
            match change {
                MembershipChange::AddLearner(_) => {
                    if let Some(part) = self.partitions.get_mut(&gid) {
                        if part.group.is_leader() {
                            part.snapshot_now()?;
                        }
                    }
                }
                MembershipChange::Remove(id) if *id == me => self.close_removed_partition(gid),
                _ => {}
            }
        }
        Ok(())
    }

    /// The metadata group's counterpart of [`Node::after_partition_membership`].
    pub(super) fn after_meta_membership(
        &mut self,
        changes: &[MembershipChange],
    ) -> Result<(), NodeError> {
        for change in changes {
            match change {
                MembershipChange::AddLearner(_) if self.meta_group.is_leader() => {
                    let data = bytes::Bytes::from(self.meta.encode());
                    self.meta_group.compact(data, u64::MAX)?;
                }
                MembershipChange::Remove(id) if *id == self.cfg.node_id => {
                    tracing::warn!(
                        "this node was removed from the cluster; it holds no replicas and can be stopped"
                    );
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn close_removed_partition(&mut self, gid: u64) {
        let Some(part) = self.partitions.remove(&gid) else {
            return;
        };
        // A removed replica is a follower (a leader hands over first): nothing pending.
        let bytes = part.fail_all(tern_proto::Status::Unavailable);
        self.pending_put_bytes = self.pending_put_bytes.saturating_sub(bytes);
        let dir = super::group_dir(&self.cfg, gid);
        let result = std::fs::remove_dir_all(&dir)
            .and_then(|()| std::fs::create_dir_all(&dir))
            .and_then(|()| std::fs::write(dir.join(REMOVED_MARKER), b"removed\n"));
        match result {
            Ok(()) => tracing::info!(group = gid, "replica removed from this node"),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), "could not clean a removed replica: {e}")
            }
        }
    }

    /// Hands the current members' peer addresses to the resolver task, which points
    /// the transport at them (new members, changed addresses) within seconds.
    pub(super) fn sync_transport_peers(&self) {
        let me = self.cfg.node_id;
        self.peer_book.set(
            self.meta
                .members()
                .iter()
                .filter(|(id, _)| **id != me)
                .map(|(id, addr)| (*id, addr.clone())),
        );
    }
}

/// File left in a group directory whose replica was removed from this node.
pub(super) const REMOVED_MARKER: &str = "removed";

#[cfg(test)]
mod tests {
    use super::*;
    use MembershipChange::*;

    #[test]
    fn a_new_target_node_is_added_as_learner_first() {
        let s = next_step(1, &[1, 2, 4], &[1, 2, 3], &[], &[], 10);
        assert_eq!(s, Some(Step::Change(AddLearner(4))));
    }

    #[test]
    fn a_learner_is_promoted_only_when_caught_up() {
        let behind = [(1, 1000), (2, 1000), (3, 1000), (4, 10)];
        assert_eq!(
            next_step(1, &[1, 2, 4], &[1, 2, 3], &[4], &behind, 1000),
            None
        );
        let close = [(1, 1000), (2, 1000), (3, 1000), (4, 950)];
        assert_eq!(
            next_step(1, &[1, 2, 4], &[1, 2, 3], &[4], &close, 1000),
            Some(Step::Change(Promote(4)))
        );
    }

    #[test]
    fn a_voter_leaves_only_after_the_target_votes() {
        let p = [(1, 9), (2, 9), (3, 9), (4, 9)];
        assert_eq!(
            next_step(1, &[1, 2, 4], &[1, 2, 3, 4], &[], &p, 9),
            Some(Step::Change(Remove(3)))
        );
    }

    #[test]
    fn a_leaving_leader_transfers_first() {
        let p = [(1, 9), (2, 9), (3, 9)];
        assert_eq!(
            next_step(1, &[2, 3], &[1, 2, 3], &[], &p, 9),
            Some(Step::Transfer(2))
        );
    }

    #[test]
    fn a_stray_learner_is_removed_and_a_settled_group_is_left_alone() {
        assert_eq!(
            next_step(1, &[1, 2, 3], &[1, 2, 3], &[5], &[], 9),
            Some(Step::Change(Remove(5)))
        );
        assert_eq!(next_step(1, &[1, 2, 3], &[1, 2, 3], &[], &[], 9), None);
        assert_eq!(next_step(1, &[], &[1, 2, 3], &[], &[], 9), None);
    }
}
