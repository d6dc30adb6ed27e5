//! Deterministic simulation of one Tern partition: N replicas of the real Raft group
//! (`tern-replication`, real log files) applying the real queue state machine
//! (`tern-queue`), driven by one seeded random generator that owns everything else:
//! the clock (ticks, with per-node jitter), the network (delay, reorder, drop,
//! duplication, partitions), the clients (PUTs, retries with the same GUID,
//! CONFIRMs) and crashes with restarts from disk. A failing seed replays exactly:
//! `tern-sim --seed N`.
//!
//! [`cluster`] simulates whole clusters of production node loops the same way
//! (`tern-sim --cluster`).
//!
//! Checked at every applied entry and after healing:
//! - **one history**: every replica applies the same entry at the same index;
//! - **no duplicates**: a GUID is enqueued at most once per replica, retries included;
//! - **nothing ACKed is lost**: a PUT whose entry committed in the proposer's term
//!   (the broker's ACK rule) is, on every replica after healing, either unsettled with
//!   its exact payload readable from the log, or settled by a committed CONFIRM;
//! - **convergence**: after healing every replica reaches the same applied index;
//! - **the history checker's verdict** (`tern-checker`, the same one `tern chaos`
//!   uses) over each replica after healing: lost, unexpected and corrupted are 0.
//! - **repair**: a replica whose files were damaged while it was down (a flipped bit
//!   in a log segment or snapshot file, at most one replica at a time) rebuilds from
//!   its peers and ends the run repaired, with all of the above holding for it too.
//!
//! Not modelled: a crash inside one fsync (the log's torn-tail recovery is tested on
//! its own, and by the fuzz target `log_recovery`); wall-clock jumps (the state
//! machine takes time from the entries it applies).

pub mod cluster;

use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tern_checker::SeededRng;
use tern_queue::{Command, ConfirmOutcome, Outcome, PartitionState, PutMessage, PutOutcome};
use tern_replication::{Group, GroupConfig, Message, ReplicationError};

/// Knobs of one run; every probability is per step, in thousandths.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: u64,
    /// Steps with faults and client traffic (one step ≈ one Raft tick).
    pub steps: u64,
    /// Quiet steps after healing, for convergence.
    pub heal_steps: u64,
    pub drop_per_mille: u64,
    pub dup_per_mille: u64,
    pub max_delay_steps: u64,
    pub crash_per_mille: u64,
    /// Chance (per thousand crashes) that the crashed replica's files are damaged
    /// while it is down: one bit flipped in a log segment or snapshot file.
    pub damage_per_mille_of_crashes: u64,
    pub partition_per_mille: u64,
    pub put_per_mille: u64,
    pub confirm_per_mille: u64,
    /// Each replica compacts its log after this many applied entries.
    pub snapshot_every_entries: u64,
}

impl SimConfig {
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            nodes: 3,
            steps: 600,
            heal_steps: 400,
            drop_per_mille: 30,
            dup_per_mille: 20,
            max_delay_steps: 4,
            crash_per_mille: 8,
            damage_per_mille_of_crashes: 250,
            partition_per_mille: 6,
            put_per_mille: 500,
            confirm_per_mille: 200,
            snapshot_every_entries: 40,
        }
    }
}

/// What one run did (all counts over the run).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub seed: u64,
    pub acked_puts: u64,
    pub confirmed: u64,
    pub retried: u64,
    pub crashes: u64,
    /// Crashed replicas whose files were damaged, and how many of those recovery
    /// found damaged and repaired from peers (a flip in a torn, unsynced tail is cut
    /// by recovery instead).
    pub damaged: u64,
    pub repaired: u64,
    pub partitions: u64,
    pub leader_changes: u64,
    pub snapshots_taken: u64,
    pub snapshots_installed: u64,
    pub messages_delivered: u64,
    pub messages_dropped: u64,
    /// Messages the history checker found on the replicas after healing (each
    /// replica counted), unsettled or settled by a committed CONFIRM.
    pub checked_messages: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("seed {seed}: storage failed on node {node}: {source}")]
    Storage {
        seed: u64,
        node: u64,
        source: ReplicationError,
    },
    #[error("seed {seed}, step {step}: {what}")]
    Violation { seed: u64, step: u64, what: String },
}

/// A client request waiting for its entry to apply on the replica that proposed it.
enum Proposal {
    Puts(Vec<[u8; 16]>),
    Confirm,
}

struct Node {
    id: u64,
    dir: PathBuf,
    group: Option<Group>,
    state: PartitionState,
    restart_at: Option<u64>,
    pending: BTreeMap<u64, (u64, Proposal)>,
    enqueued: BTreeSet<[u8; 16]>,
    applied_since_snapshot: u64,
    leader: bool,
    /// Its files were damaged while down; cleared when it restarts.
    damaged: bool,
}

struct Sim {
    cfg: SimConfig,
    /// The only source of randomness of a run.
    rng: SeededRng,
    nodes: Vec<Node>,
    /// (deliver at step, sequence) → message: a BTreeMap keeps delivery deterministic.
    net: BTreeMap<(u64, u64), Message>,
    net_seq: u64,
    /// Nodes on side A of the current partition, and when it heals.
    partition: Option<(BTreeSet<u64>, u64)>,
    /// Index → (term, data) as first applied anywhere: the one history.
    history: BTreeMap<u64, (u64, Bytes)>,
    acked: BTreeSet<[u8; 16]>,
    confirmed: BTreeSet<[u8; 16]>,
    /// PUTs whose outcome is unknown (proposer died or was deposed): retried.
    unknown: BTreeSet<[u8; 16]>,
    next_guid: u64,
    step: u64,
    report: Report,
}

fn guid_of(n: u64) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[..8].copy_from_slice(&n.to_be_bytes());
    g[8..].copy_from_slice(&(!n).to_be_bytes());
    g
}

/// The payload of a GUID: checkable without remembering it.
fn payload_of(g: &[u8; 16]) -> Bytes {
    let mut p = Vec::with_capacity(48);
    for i in 0..3u8 {
        p.extend(g.iter().map(|b| b ^ i));
    }
    Bytes::from(p)
}

/// Runs one seed under `base` (a scratch directory, removed afterwards).
pub fn run(cfg: SimConfig, base: &Path) -> Result<Report, SimError> {
    let dir = base.join(format!("seed-{}", cfg.seed));
    let _ = std::fs::remove_dir_all(&dir);
    let result = Sim::new(cfg, &dir).and_then(|mut sim| sim.run());
    let _ = std::fs::remove_dir_all(&dir);
    result
}

impl Sim {
    fn new(cfg: SimConfig, dir: &Path) -> Result<Sim, SimError> {
        let voters: Vec<u64> = (1..=cfg.nodes).collect();
        let mut nodes = Vec::new();
        for id in 1..=cfg.nodes {
            let mut node = Node {
                id,
                dir: dir.join(format!("node{id}")),
                group: None,
                state: PartitionState::new(Default::default()),
                restart_at: None,
                pending: BTreeMap::new(),
                enqueued: BTreeSet::new(),
                applied_since_snapshot: 0,
                leader: false,
                damaged: false,
            };
            open(&mut node, &voters, cfg.seed)?;
            nodes.push(node);
        }
        Ok(Sim {
            rng: SeededRng::new(cfg.seed),
            report: Report {
                seed: cfg.seed,
                ..Report::default()
            },
            cfg,
            nodes,
            net: BTreeMap::new(),
            net_seq: 0,
            partition: None,
            history: BTreeMap::new(),
            acked: BTreeSet::new(),
            confirmed: BTreeSet::new(),
            unknown: BTreeSet::new(),
            next_guid: 1,
            step: 0,
        })
    }

    fn violation(&self, what: String) -> SimError {
        SimError::Violation {
            seed: self.cfg.seed,
            step: self.step,
            what,
        }
    }

    fn run(&mut self) -> Result<Report, SimError> {
        let total = self.cfg.steps + self.cfg.heal_steps;
        while self.step < total {
            let faults = self.step < self.cfg.steps;
            if faults {
                self.inject_faults()?;
                self.client();
            } else if self.step == self.cfg.steps {
                self.heal()?;
            }
            self.restart_due()?;
            self.tick();
            self.deliver();
            for i in 0..self.nodes.len() {
                self.ready(i)?;
            }
            self.step += 1;
        }
        self.final_check()?;
        Ok(self.report.clone())
    }

    // ----- faults ----------------------------------------------------------------

    fn inject_faults(&mut self) -> Result<(), SimError> {
        let down = self.nodes.iter().filter(|n| n.group.is_none()).count() as u64;
        let minority = (self.cfg.nodes - 1) / 2;
        if down < minority && self.rng.chance(self.cfg.crash_per_mille) {
            let i = self.rng.below(self.cfg.nodes) as usize;
            if self.nodes[i].group.is_some() {
                let restart_at = self.step + 5 + self.rng.below(40);
                let node = &mut self.nodes[i];
                // The process dies: memory is gone, the files stay.
                node.group = None;
                node.state = PartitionState::new(Default::default());
                node.enqueued.clear();
                node.leader = false;
                node.restart_at = Some(restart_at);
                for (_, (_, p)) in std::mem::take(&mut node.pending) {
                    if let Proposal::Puts(guids) = p {
                        self.unknown.extend(guids);
                    }
                }
                self.report.crashes += 1;
                if self.rng.chance(self.cfg.damage_per_mille_of_crashes) {
                    self.damage(i)?;
                }
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
            let until = self.step + 10 + self.rng.below(60);
            self.partition = Some((side, until));
            self.report.partitions += 1;
        }
        Ok(())
    }

    /// Flips one bit of one of replica `i`'s log segment or snapshot files, unless
    /// another replica is damaged or repairing (damage stays within a minority).
    fn damage(&mut self, i: usize) -> Result<(), SimError> {
        let busy = self
            .nodes
            .iter()
            .any(|n| n.damaged || n.group.as_ref().is_some_and(|g| g.is_repairing()));
        if busy {
            return Ok(());
        }
        let mut files = Vec::new();
        collect_damageable(&self.nodes[i].dir, &mut files);
        files.sort();
        if files.is_empty() {
            return Ok(());
        }
        let path = files[self.rng.below(files.len() as u64) as usize].clone();
        let (seed, step) = (self.cfg.seed, self.step);
        let io = |e: std::io::Error| SimError::Violation {
            seed,
            step,
            what: format!("damaging {}: {e}", path.display()),
        };
        let mut data = std::fs::read(&path).map_err(io)?;
        if data.is_empty() {
            return Ok(());
        }
        let at = self.rng.below(data.len() as u64) as usize;
        data[at] ^= 1 << self.rng.below(8);
        std::fs::write(&path, &data).map_err(io)?;
        self.nodes[i].damaged = true;
        self.report.damaged += 1;
        Ok(())
    }

    fn heal(&mut self) -> Result<(), SimError> {
        self.partition = None;
        for n in &mut self.nodes {
            if n.group.is_none() {
                n.restart_at = Some(self.step);
            }
        }
        Ok(())
    }

    fn restart_due(&mut self) -> Result<(), SimError> {
        let voters: Vec<u64> = (1..=self.cfg.nodes).collect();
        for n in &mut self.nodes {
            if n.restart_at.is_some_and(|t| t <= self.step) {
                n.restart_at = None;
                open(n, &voters, self.cfg.seed)?;
                if std::mem::take(&mut n.damaged)
                    && n.group.as_ref().is_some_and(|g| g.is_repairing())
                {
                    self.report.repaired += 1;
                }
            }
        }
        Ok(())
    }

    fn cut(&self, a: u64, b: u64) -> bool {
        self.partition
            .as_ref()
            .is_some_and(|(side, _)| side.contains(&a) != side.contains(&b))
    }

    // ----- clock, clients, network -----------------------------------------------

    fn tick(&mut self) {
        for i in 0..self.nodes.len() {
            // Jitter: a node misses a tick now and then, so elections do not tie forever.
            let skip = self.rng.chance(150);
            if let (Some(g), false) = (self.nodes[i].group.as_mut(), skip) {
                g.tick();
            }
        }
    }

    fn client(&mut self) {
        let leaders: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].group.as_ref().is_some_and(|g| g.is_leader()))
            .collect();
        if leaders.is_empty() {
            return;
        }
        let i = leaders[self.rng.below(leaders.len() as u64) as usize];
        if self.rng.chance(self.cfg.put_per_mille) {
            let mut guids = Vec::new();
            if !self.unknown.is_empty() && self.rng.chance(300) {
                // Retry an unknown outcome with the same GUID: dedup must hold.
                let pick = self.rng.below(self.unknown.len() as u64) as usize;
                if let Some(g) = self.unknown.iter().nth(pick).copied() {
                    self.unknown.remove(&g);
                    guids.push(g);
                    self.report.retried += 1;
                }
            }
            for _ in 0..1 + self.rng.below(4) {
                guids.push(guid_of(self.next_guid));
                self.next_guid += 1;
            }
            let messages: Vec<PutMessage> = guids
                .iter()
                .map(|g| PutMessage {
                    guid: *g,
                    ttl_ms: 0,
                    key: Bytes::new(),
                    payload: payload_of(g),
                    dead_letter: None,
                })
                .collect();
            let data = Command::encode_put(self.step, &messages);
            self.propose(i, data, Proposal::Puts(guids));
        }
        if self.rng.chance(self.cfg.confirm_per_mille) {
            let open: Vec<[u8; 16]> = self.acked.difference(&self.confirmed).copied().collect();
            if open.is_empty() {
                return;
            }
            let mut guids = BTreeSet::new();
            for _ in 0..1 + self.rng.below(3) {
                guids.insert(open[self.rng.below(open.len() as u64) as usize]);
            }
            let data = Command::Confirm {
                now_ms: self.step,
                subscription: String::new(),
                guids: guids.into_iter().collect(),
            }
            .encode();
            self.propose(i, data, Proposal::Confirm);
        }
    }

    fn propose(&mut self, i: usize, data: Bytes, p: Proposal) {
        let node = &mut self.nodes[i];
        let Some(g) = node.group.as_mut() else { return };
        match g.propose(data) {
            Ok((index, term)) => {
                node.pending.insert(index, (term, p));
            }
            Err(_) => {
                if let Proposal::Puts(guids) = p {
                    self.unknown.extend(guids);
                }
            }
        }
    }

    fn send(&mut self, from: u64, msgs: Vec<Message>) {
        for m in msgs {
            if m.get_msg_type() == tern_replication::MessageType::MsgSnapshot {
                // As the node does: handed to the network = finished; a loss shows up
                // as the follower's next rejection, and Raft sends it again.
                let to = m.to;
                if let Some(g) = self.nodes[(from - 1) as usize].group.as_mut() {
                    g.report_snapshot(to, true);
                }
            }
            if self.rng.chance(self.cfg.drop_per_mille) {
                self.report.messages_dropped += 1;
                continue;
            }
            let copies = if self.rng.chance(self.cfg.dup_per_mille) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let at = self.step + self.rng.below(self.cfg.max_delay_steps + 1);
                self.net_seq += 1;
                self.net.insert((at, self.net_seq), m.clone());
            }
        }
    }

    fn deliver(&mut self) {
        let due: Vec<(u64, u64)> = self
            .net
            .range(..(self.step + 1, 0))
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            let Some(m) = self.net.remove(&k) else {
                continue;
            };
            let (from, to) = (m.from, m.to);
            if self.cut(from, to) {
                self.report.messages_dropped += 1;
                continue;
            }
            let Some(g) = self.nodes[(to - 1) as usize].group.as_mut() else {
                self.report.messages_dropped += 1;
                continue;
            };
            let _ = g.step(m);
            self.report.messages_delivered += 1;
        }
    }

    // ----- ready and apply -------------------------------------------------------

    fn ready(&mut self, i: usize) -> Result<(), SimError> {
        for _ in 0..8 {
            let seed = self.cfg.seed;
            let node = &mut self.nodes[i];
            let id = node.id;
            let Some(g) = node.group.as_mut() else {
                return Ok(());
            };
            let out = match g.handle_ready() {
                Ok(Some(out)) => out,
                Ok(None) => return Ok(()),
                Err(source) => {
                    return Err(SimError::Storage {
                        seed,
                        node: id,
                        source,
                    })
                }
            };
            if let Some((role, _)) = out.role_change {
                let leader = role == tern_replication::StateRole::Leader;
                if leader && !node.leader {
                    self.report.leader_changes += 1;
                }
                node.leader = leader;
            }
            if let Some(bytes) = &out.installed_snapshot {
                let restored = PartitionState::restore(bytes);
                let Ok(state) = restored else {
                    return Err(
                        self.violation(format!("node {id}: the leader's snapshot does not decode"))
                    );
                };
                self.nodes[i].state = state;
                self.nodes[i].enqueued.clear();
                self.report.snapshots_installed += 1;
            }
            self.send(id, out.messages);
            for entry in out.committed {
                self.apply(i, entry)?;
            }
            self.maybe_compact(i)?;
        }
        Ok(())
    }

    fn apply(&mut self, i: usize, entry: tern_replication::Entry) -> Result<(), SimError> {
        let id = self.nodes[i].id;
        match self.history.get(&entry.index) {
            Some((term, data)) if *term != entry.term || *data != entry.data => {
                return Err(self.violation(format!(
                    "node {id} applied a different entry at index {} (term {} vs {term})",
                    entry.index, entry.term
                )));
            }
            Some(_) => {}
            None => {
                self.history
                    .insert(entry.index, (entry.term, entry.data.clone()));
            }
        }
        let node = &mut self.nodes[i];
        node.applied_since_snapshot += 1;
        let applied = if entry.data.is_empty() {
            None
        } else {
            let cmd = Command::decode(&entry.data)
                .map_err(|e| self.violation(format!("undecodable entry: {e}")))?;
            Some(self.nodes[i].state.apply(entry.index, &cmd))
        };
        if let Some(a) = &applied {
            if let Outcome::Put(results) = &a.outcome {
                for (g, o) in results {
                    if matches!(o, PutOutcome::Enqueued { .. })
                        && !self.nodes[i].enqueued.insert(*g)
                    {
                        return Err(self.violation(format!("node {id} enqueued a GUID twice")));
                    }
                }
            }
        }
        let Some((term, p)) = self.nodes[i].pending.remove(&entry.index) else {
            return Ok(());
        };
        match (p, applied) {
            (Proposal::Puts(_), Some(a)) if term == entry.term => {
                if let Outcome::Put(results) = &a.outcome {
                    for (g, o) in results {
                        if matches!(
                            o,
                            PutOutcome::Enqueued { .. } | PutOutcome::Duplicate { .. }
                        ) {
                            self.acked.insert(*g);
                            self.unknown.remove(g);
                            self.report.acked_puts += 1;
                        }
                    }
                }
            }
            (Proposal::Confirm, Some(a)) if term == entry.term => {
                if let Outcome::Confirm { results, .. } = &a.outcome {
                    for (g, o) in results {
                        if *o == ConfirmOutcome::Settled {
                            self.confirmed.insert(*g);
                            self.report.confirmed += 1;
                        }
                    }
                }
            }
            (Proposal::Puts(guids), _) => {
                // Overwritten by another leader's entry: the outcome is unknown.
                self.unknown.extend(guids);
            }
            (Proposal::Confirm, _) => {}
        }
        Ok(())
    }

    fn maybe_compact(&mut self, i: usize) -> Result<(), SimError> {
        let seed = self.cfg.seed;
        let every = self.cfg.snapshot_every_entries;
        let node = &mut self.nodes[i];
        if node.applied_since_snapshot < every {
            return Ok(());
        }
        let Some(g) = node.group.as_mut() else {
            return Ok(());
        };
        let applied = g.applied_index();
        let keep_from = node.state.min_live_index().unwrap_or(applied + 1);
        g.compact(node.state.snapshot(), keep_from)
            .map_err(|source| SimError::Storage {
                seed,
                node: node.id,
                source,
            })?;
        node.applied_since_snapshot = 0;
        self.report.snapshots_taken += 1;
        Ok(())
    }

    // ----- the verdict -----------------------------------------------------------

    /// GUIDs named by a committed CONFIRM (whoever proposed it, answered or not).
    fn committed_confirms(&self) -> BTreeSet<[u8; 16]> {
        let mut out = BTreeSet::new();
        for (_, data) in self.history.values() {
            if data.is_empty() {
                continue;
            }
            if let Ok(decoded) = Command::decode(data) {
                if let Command::Confirm { guids, .. } = &decoded.command {
                    out.extend(guids.iter().copied());
                }
            }
        }
        out
    }

    /// The verdict of the history checker (`tern-checker`, the one `tern chaos` uses)
    /// over what replica `n` holds after healing: every PUT with its outcome (ACKed,
    /// or unknown: its proposer died or was deposed), and as deliveries every message
    /// still unsettled there (its payload read back from the log) and every message a
    /// committed CONFIRM settled. Lost, unexpected and corrupted must be 0.
    fn checker_verdict(
        &self,
        n: &Node,
        g: &Group,
        confirmed: &BTreeSet<[u8; 16]>,
    ) -> Result<tern_checker::Report, SimError> {
        let hex = |g: &[u8; 16]| g.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let mut h = tern_checker::History::new();
        for seq in 1..self.next_guid {
            let guid = guid_of(seq);
            let outcome = if self.acked.contains(&guid) {
                tern_checker::Outcome::Ok
            } else {
                tern_checker::Outcome::Unknown
            };
            h.record(tern_checker::Event::Put {
                guid: hex(&guid),
                producer: 0,
                seq,
                key: None,
                digest: tern_checker::digest(&payload_of(&guid)),
                sent_ms: 0,
                done_ms: 0,
                outcome,
            });
        }
        let deliver = |guid: &[u8; 16], digest: u64| tern_checker::Event::Deliver {
            guid: hex(guid),
            consumer: n.id as u32,
            digest,
            attempt: 1,
            partition: 0,
            at_ms: 0,
        };
        for seq in 1..self.next_guid {
            let guid = guid_of(seq);
            if let Some(meta) = n.state.message(&guid) {
                let data = g.entry_data(meta.location.index).map_err(|e| {
                    self.violation(format!("node {}: payload unreadable: {e}", n.id))
                })?;
                let (off, len) = (meta.location.offset as usize, meta.location.len as usize);
                let payload = data.get(off..off + len).unwrap_or_default();
                h.record(deliver(&guid, tern_checker::digest(payload)));
            } else if confirmed.contains(&guid) {
                h.record(deliver(&guid, tern_checker::digest(&payload_of(&guid))));
            }
        }
        let report = h.check();
        if !report.passed() {
            return Err(self.violation(format!(
                "node {}: the history checker fails it:\n{}",
                n.id,
                report.table()
            )));
        }
        Ok(report)
    }

    fn final_check(&mut self) -> Result<(), SimError> {
        let committed_confirms = self.committed_confirms();
        let applied: Vec<u64> = self
            .nodes
            .iter()
            .filter_map(|n| n.group.as_ref().map(|g| g.applied_index()))
            .collect();
        if applied.len() != self.nodes.len() || applied.iter().any(|a| *a != applied[0]) {
            let detail: Vec<String> = self
                .nodes
                .iter()
                .filter_map(|n| n.group.as_ref().map(|g| (n.id, g.status(), g.progress())))
                .map(|(id, s, p)| {
                    format!(
                        "node {id}: {:?} term {} commit {} applied {} last {} snap {} log_first {} progress {p:?}",
                        s.role, s.term, s.commit_index, s.applied_index, s.last_index, s.snapshot_index, s.log_first_index
                    )
                })
                .collect();
            return Err(self.violation(format!(
                "replicas did not converge: applied {applied:?}\n  {}",
                detail.join("\n  ")
            )));
        }
        for n in &self.nodes {
            let Some(g) = n.group.as_ref() else { continue };
            if g.is_repairing() {
                return Err(self.violation(format!("node {}: still repairing after healing", n.id)));
            }
            for guid in &self.acked {
                let settled = committed_confirms.contains(guid);
                match n.state.message(guid) {
                    Some(_) if settled => {
                        return Err(self.violation(format!(
                            "node {}: a confirmed message is still unsettled",
                            n.id
                        )))
                    }
                    None if !settled => {
                        let put_at = self
                            .history
                            .iter()
                            .find(|(_, (_, d))| d.windows(16).any(|w| w == guid));
                        return Err(self.violation(format!(
                            "node {}: an ACKed message is lost (guid {:?}, in history at {:?}, applied {}, snapshot {})",
                            n.id,
                            &guid[..8],
                            put_at.map(|(i, (t, _))| (i, t)),
                            g.applied_index(),
                            g.snapshot_index()
                        )));
                    }
                    None => {}
                    Some(meta) => {
                        let data = g.entry_data(meta.location.index).map_err(|e| {
                            self.violation(format!("node {}: payload unreadable: {e}", n.id))
                        })?;
                        let (off, len) =
                            (meta.location.offset as usize, meta.location.len as usize);
                        let ok = data
                            .get(off..off + len)
                            .is_some_and(|p| *p == payload_of(guid)[..]);
                        if !ok {
                            return Err(self.violation(format!(
                                "node {}: payload of an ACKed message differs",
                                n.id
                            )));
                        }
                    }
                }
            }
        }
        for n in &self.nodes {
            let Some(g) = n.group.as_ref() else { continue };
            let report = self.checker_verdict(n, g, &committed_confirms)?;
            self.report.checked_messages += report.delivered_unique;
        }
        Ok(())
    }
}

/// The files of a replica that damage may hit: log segments and snapshot files (not
/// `state`, whose term and vote cannot be rebuilt, nor the repair bookkeeping).
fn collect_damageable(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(items) = std::fs::read_dir(dir) else {
        return;
    };
    for item in items.flatten() {
        let path = item.path();
        let name = item.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if name != "quarantine" {
                collect_damageable(&path, out);
            }
        } else if !matches!(name.as_ref(), "state" | "repairing") && !name.ends_with(".tmp") {
            out.push(path);
        }
    }
}

/// Opens (or reopens after a crash) a replica: Raft state from its files, the state
/// machine from its snapshot; entries after it are re-applied as Raft hands them out.
fn open(node: &mut Node, voters: &[u64], seed: u64) -> Result<(), SimError> {
    let mut cfg = GroupConfig::new(node.id, 1, node.dir.clone(), voters.to_vec());
    cfg.fixed_election_timeout = true;
    cfg.log.segment_max_bytes = 64 * 1024;
    let storage = |source| SimError::Storage {
        seed,
        node: node.id,
        source,
    };
    let (group, snapshot) = Group::open(&cfg).map_err(storage)?;
    node.state = match snapshot {
        Some(bytes) => PartitionState::restore(&bytes).map_err(|e| SimError::Violation {
            seed,
            step: 0,
            what: format!("node {}: own snapshot does not decode: {e}", node.id),
        })?,
        None => PartitionState::new(Default::default()),
    };
    node.enqueued.clear();
    node.applied_since_snapshot = 0;
    node.leader = false;
    node.group = Some(group);
    Ok(())
}
