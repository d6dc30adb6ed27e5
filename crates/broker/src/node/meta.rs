//! The metadata state machine: queue definitions, replicated through Raft group 0.
//!
//! Pure and deterministic like the queue state machine: commands are JSON (rare,
//! small) and carry everything they need; the effective queue settings are resolved
//! by the proposer, so every replica stores identical definitions.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use tern_proto::admin::QueueSpec;

/// Raft group id of the metadata group. Partition groups get ids from 1 up.
pub const META_GROUP_ID: u64 = 0;

/// One queue as the cluster knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueDef {
    pub name: String,
    /// Effective settings: every field is `Some`.
    pub spec: QueueSpec,
    /// Partition p of this queue is Raft group `first_group_id + p`.
    pub first_group_id: u64,
    pub partitions: u16,
    pub created_ms: u64,
    /// Replica set (node ids) of each partition; empty = created by a single-node
    /// build before placement existed (the one node holds everything).
    #[serde(default)]
    pub replicas: Vec<Vec<u64>>,
}

impl QueueDef {
    pub fn group_ids(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        (0..self.partitions).map(|p| (p, self.first_group_id + u64::from(p)))
    }

    /// The replica set of partition `p` (`local` alone for pre-placement definitions).
    pub fn replicas_of(&self, p: u16, local: u64) -> Vec<u64> {
        match self.replicas.get(usize::from(p)) {
            Some(r) if !r.is_empty() => r.clone(),
            _ => vec![local],
        }
    }
}

/// Rendezvous (highest random weight) placement: for each partition, the `factor`
/// members with the highest hash of (queue, partition, node). Stable: adding a node
/// moves only the partitions it wins. Deterministic across versions (FNV-1a).
pub fn place(queue: &str, partitions: u16, members: &[u64], factor: usize) -> Vec<Vec<u64>> {
    (0..partitions)
        .map(|p| {
            let mut scored: Vec<(u64, u64)> = members
                .iter()
                .map(|&node| {
                    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                    let key = format!("{queue}/{p}/{node}");
                    for b in key.bytes() {
                        h ^= u64::from(b);
                        h = h.wrapping_mul(0x0100_0000_01b3);
                    }
                    (h, node)
                })
                .collect();
            scored.sort_by(|a, b| b.cmp(a));
            scored
                .into_iter()
                .take(factor.max(1))
                .map(|(_, n)| n)
                .collect()
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
// Metadata commands are rare and short-lived; the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum MetaCommand {
    CreateQueue {
        name: String,
        spec: QueueSpec,
        now_ms: u64,
        /// Replica set per partition, chosen by the proposer ([`place`]).
        #[serde(default)]
        replicas: Vec<Vec<u64>>,
    },
    DeleteQueue {
        name: String,
    },
    /// A node joins: partitions it wins by placement move to it (learner first).
    AddNode {
        id: u64,
        peer_addr: String,
    },
    /// A node leaves: its replicas move to the remaining nodes, then it leaves the
    /// metadata group.
    RemoveNode {
        id: u64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum MetaOutcome {
    Created(QueueDef),
    /// Create of a name that exists: the existing definition (same spec = idempotent success).
    Exists(QueueDef),
    Deleted(QueueDef),
    NotFound,
    /// Membership changed (node added or removed).
    Members,
    /// A membership command that cannot apply, with the reason.
    MembersRefused(String),
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MetaState {
    queues: BTreeMap<String, QueueDef>,
    next_group_id: u64,
    /// Current members: node id -> peer address. Empty in snapshots written before
    /// membership changes existed: the caller fills in the initial members.
    #[serde(default)]
    members: BTreeMap<u64, String>,
    /// Ids that were removed: never reused, so an old node's files can't rejoin as new.
    #[serde(default)]
    removed: BTreeSet<u64>,
}

impl MetaState {
    pub fn new() -> Self {
        MetaState {
            queues: BTreeMap::new(),
            next_group_id: 1,
            members: BTreeMap::new(),
            removed: BTreeSet::new(),
        }
    }

    /// Sets the initial members if none are recorded (new state, or an old snapshot).
    pub fn seed_members(&mut self, initial: &[(u64, String)]) {
        if self.members.is_empty() {
            self.members = initial.iter().cloned().collect();
        }
    }

    pub fn members(&self) -> &BTreeMap<u64, String> {
        &self.members
    }

    pub fn member_ids(&self) -> Vec<u64> {
        self.members.keys().copied().collect()
    }

    /// Where partition `p` of `def` should live now: placement over the current members.
    pub fn target_replicas(&self, def: &QueueDef, p: u16, factor: usize) -> Vec<u64> {
        let ids = self.member_ids();
        let factor = factor.min(ids.len()).max(1);
        place(&def.name, def.partitions, &ids, factor)
            .into_iter()
            .nth(usize::from(p))
            .unwrap_or_default()
    }

    fn apply_members(&mut self, cmd: &MetaCommand) -> MetaOutcome {
        match cmd {
            MetaCommand::AddNode { id, peer_addr } => {
                if self.removed.contains(id) {
                    return MetaOutcome::MembersRefused(format!(
                        "node id {id} was removed; a returning node needs a new id"
                    ));
                }
                if let Some(addr) = self.members.get(id) {
                    return if addr == peer_addr {
                        MetaOutcome::Members // idempotent retry
                    } else {
                        MetaOutcome::MembersRefused(format!(
                            "node {id} is already a member at {addr}"
                        ))
                    };
                }
                self.members.insert(*id, peer_addr.clone());
                MetaOutcome::Members
            }
            MetaCommand::RemoveNode { id } => {
                if !self.members.contains_key(id) {
                    return MetaOutcome::MembersRefused(format!("node {id} is not a member"));
                }
                if self.members.len() == 1 {
                    return MetaOutcome::MembersRefused("cannot remove the last node".into());
                }
                self.members.remove(id);
                self.removed.insert(*id);
                MetaOutcome::Members
            }
            _ => MetaOutcome::NotFound,
        }
    }

    pub fn apply(&mut self, cmd: &MetaCommand) -> MetaOutcome {
        match cmd {
            MetaCommand::CreateQueue {
                name,
                spec,
                now_ms,
                replicas,
            } => {
                if let Some(def) = self.queues.get(name) {
                    return MetaOutcome::Exists(def.clone());
                }
                let partitions = spec.partitions.unwrap_or(1).max(1);
                let def = QueueDef {
                    name: name.clone(),
                    spec: spec.clone(),
                    first_group_id: self.next_group_id,
                    partitions,
                    created_ms: *now_ms,
                    replicas: replicas.clone(),
                };
                // Group ids are never reused, so a deleted queue's files can't be mistaken for a new one's.
                self.next_group_id += u64::from(partitions);
                self.queues.insert(name.clone(), def.clone());
                MetaOutcome::Created(def)
            }
            MetaCommand::DeleteQueue { name } => match self.queues.remove(name) {
                Some(def) => MetaOutcome::Deleted(def),
                None => MetaOutcome::NotFound,
            },
            MetaCommand::AddNode { .. } | MetaCommand::RemoveNode { .. } => self.apply_members(cmd),
        }
    }

    pub fn queue(&self, name: &str) -> Option<&QueueDef> {
        self.queues.get(name)
    }

    pub fn queues(&self) -> impl Iterator<Item = &QueueDef> {
        self.queues.values()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<MetaState, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Validates a queue name: 1..=200 chars of `[A-Za-z0-9._-]` (safe in paths, URLs and metrics).
pub fn validate_queue_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err(format!(
            "queue name must be 1 to 200 characters, got {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "queue name {name:?} has the character {c:?}; allowed: A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_is_stable_spread_and_sized() {
        let members = [1, 2, 3, 4, 5];
        let a = place("orders", 8, &members, 3);
        assert_eq!(a, place("orders", 8, &members, 3));
        assert!(a.iter().all(|r| r.len() == 3));
        for r in &a {
            let mut d = r.clone();
            d.dedup();
            assert_eq!(d.len(), 3, "distinct replicas");
        }
        // More than one node leads (first replica) some partition.
        let firsts: std::collections::BTreeSet<u64> = a.iter().map(|r| r[0]).collect();
        assert!(firsts.len() > 1);
        assert_eq!(place("q", 1, &[7], 3), vec![vec![7]]);
    }

    fn spec(p: u16) -> QueueSpec {
        QueueSpec {
            partitions: Some(p),
            ..Default::default()
        }
    }

    #[test]
    fn create_assigns_disjoint_group_ids_and_is_idempotent() {
        let mut m = MetaState::new();
        let a = m.apply(&MetaCommand::CreateQueue {
            name: "a".into(),
            spec: spec(3),
            now_ms: 1,
            replicas: Vec::new(),
        });
        let b = m.apply(&MetaCommand::CreateQueue {
            name: "b".into(),
            spec: spec(2),
            now_ms: 2,
            replicas: Vec::new(),
        });
        let (MetaOutcome::Created(a), MetaOutcome::Created(b)) = (a, b) else {
            panic!("not created")
        };
        assert_eq!(a.first_group_id, 1);
        assert_eq!(b.first_group_id, 4);
        let again = m.apply(&MetaCommand::CreateQueue {
            name: "a".into(),
            spec: spec(3),
            now_ms: 3,
            replicas: Vec::new(),
        });
        assert!(matches!(again, MetaOutcome::Exists(d) if d == a));
        assert!(matches!(
            m.apply(&MetaCommand::DeleteQueue { name: "a".into() }),
            MetaOutcome::Deleted(_)
        ));
        assert_eq!(
            m.apply(&MetaCommand::DeleteQueue { name: "a".into() }),
            MetaOutcome::NotFound
        );
        let c = m.apply(&MetaCommand::CreateQueue {
            name: "a".into(),
            spec: spec(1),
            now_ms: 4,
            replicas: Vec::new(),
        });
        assert!(matches!(c, MetaOutcome::Created(d) if d.first_group_id == 6));
        let restored = MetaState::decode(&m.encode()).expect("decode");
        assert_eq!(restored, m);
    }

    #[test]
    fn queue_names_are_checked() {
        assert!(validate_queue_name("orders.v1-eu_2").is_ok());
        assert!(validate_queue_name("").is_err());
        assert!(validate_queue_name("a/b").is_err());
        assert!(validate_queue_name(&"x".repeat(201)).is_err());
    }
}
