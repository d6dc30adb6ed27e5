//! One partition on this node: its Raft group, its replicated queue state, its
//! leader-local dispatcher, and the PUTs/CONFIRMs waiting to become one entry.
//!
//! Runs only on the node-loop thread. The path of one PUT through this file:
//! `enqueue_puts` (batched) → `flush` (one Raft entry per batch) → the group's
//! `handle_ready` appends and fsyncs → `apply_ready` applies the committed entry to
//! the state machine and sends each producer its ACK → `dispatch` PUSHes it.

use super::{now_ms, ConnTx};
use crate::clock::{Map, Set};
use crate::metrics::{Metrics, PartitionLabels, QueueLabels, StatusLabels, SubscriptionLabels};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_proto::admin::{PartitionInfo, QueueSpec, SubscriptionInfo};
use tern_proto::{AckEntry, ConfirmAckEntry, Frame, Guid, PushMessage, Status, ACK_DURABLE};
use tern_queue::{
    Applied, Command, ConfirmOutcome, ConsumerId, DeadLetterDue, DeadLetterInfo, Dispatcher,
    FlowLimits, Location, Outcome, PartitionState, PutOutcome, QueueConfig, QueueMode,
    SettleReason, SubscribeOutcome,
};
use tern_replication::{Group, GroupConfig, ReadyOutput, ReplicationError};

/// Most PUSHes produced per partition per round (bounds a round's latency).
const MAX_PUSH_PER_ROUND: usize = 4096;

/// The state machine's settings for a queue's effective spec.
pub fn config_from_spec(spec: &QueueSpec) -> QueueConfig {
    let mut config = QueueConfig::default();
    if let Some(v) = spec.max_messages {
        config.max_messages = v;
    }
    if let Some(v) = spec.max_bytes {
        config.max_bytes = v;
    }
    if let Some(v) = spec.max_message_bytes {
        config.max_message_bytes = v;
    }
    if let Some(v) = spec.dedup_window_ms {
        config.dedup_window_ms = v;
    }
    config.default_ttl_ms = spec.default_ttl_ms.unwrap_or(0);
    config.max_ttl_ms = spec.max_ttl_ms.unwrap_or(0);
    config.visibility_timeout_ms = spec.visibility_timeout_ms.unwrap_or(0);
    config.max_delivery_attempts = spec.max_delivery_attempts.unwrap_or(0);
    config.dead_letter_expired = spec.dead_letter_expired.unwrap_or(false);
    config.retention_max_age_ms = spec.retention_max_age_ms.unwrap_or(0);
    config.retention_max_bytes = spec.retention_max_bytes.unwrap_or(0);
    if spec.mode.as_deref() == Some("fanout") {
        config.mode = QueueMode::Fanout;
    }
    config
}

/// Most dead letters one partition has on their way to its dead-letter queue at once.
const MAX_DEAD_LETTERS_IN_FLIGHT: usize = 1024;
/// A dead letter whose write failed (dead-letter queue full, no leader) is retried after this.
const DEAD_LETTER_RETRY_MS: u64 = 1000;

/// A message to write to the dead-letter queue, then settle here.
pub struct DeadLetterOut {
    pub subscription: String,
    pub guid: Guid,
    pub message: tern_queue::PutMessage,
}

/// A run of consecutive messages in a batch that came from one connection.
#[derive(Clone)]
struct Origin {
    conn: ConnTx,
    count: usize,
    received: Instant,
}

#[derive(Default)]
struct PutBatch {
    msgs: Vec<tern_queue::PutMessage>,
    origins: Vec<Origin>,
    bytes: u64,
}

struct ConfirmOrigin {
    conn: ConnTx,
    handle_id: u32,
    count: usize,
}

#[derive(Default)]
struct ConfirmBatch {
    guids: Vec<Guid>,
    origins: Vec<ConfirmOrigin>,
}

enum PendingKind {
    /// Keeps the messages so a proposal lost to a leader change can be proposed again.
    Puts {
        batch: PutBatch,
    },
    Confirms {
        batch: ConfirmBatch,
    },
    Purge {
        id: u64,
    },
    /// A time-only command, proposed so TTL expiry happens without traffic.
    Tick,
    /// Attempts, Settle, Subscribe, Unsubscribe: nobody waits for the answer.
    Internal,
    /// An admin subscribe/unsubscribe: the node answers when every partition applied it.
    SubscriptionOp {
        id: u64,
    },
}

struct Pending {
    term: u64,
    kind: PendingKind,
}

/// What applying one Ready produced for the node.
#[derive(Default)]
pub struct ApplyResult {
    /// Payload bytes of PUTs answered (released from the server-wide bound).
    pub answered_bytes: u64,
    /// Purges that completed: (purge id, messages removed).
    pub purged: Vec<(u64, u64)>,
    /// Admin subscription operations that completed here: (op id, ok).
    pub subscription_ops: Vec<(u64, bool)>,
}

pub struct Partition {
    pub queue: Arc<str>,
    pub index: u16,
    pub group: Group,
    state: PartitionState,
    /// Leader-local, one per subscription ("" for a work queue).
    dispatchers: BTreeMap<String, Dispatcher>,
    /// Consumers attached here: their subscription and flow limits.
    consumers: Map<ConsumerId, (String, FlowLimits)>,
    batch: PutBatch,
    /// CONFIRMs of the round, per subscription.
    confirms: BTreeMap<String, ConfirmBatch>,
    /// Dead letters written to the dead-letter queue, to settle here, per subscription.
    settles: BTreeMap<String, Vec<Guid>>,
    /// Leader-local: dead letters to write (with the time they may be tried again).
    dead_letters_due: VecDeque<(DeadLetterDue, u64)>,
    /// Leader-local: dead letters on their way, by (subscription, GUID).
    dead_letters_in_flight: Set<(String, Guid)>,
    /// Durable queue: fsync before ACK, and ACKs carry `ACK_DURABLE`.
    durable: bool,
    pending: BTreeMap<u64, Pending>,
    /// PUT batches waiting for a leader, with the time they were parked.
    parked: VecDeque<(PutBatch, Instant)>,
    log_bytes_at_snapshot: u64,
    /// The last entry read to PUSH from: batch entries hold many messages in a row.
    read_cache: Option<(u64, Bytes)>,
    /// Set when something may have become deliverable.
    dispatch_dirty: bool,
}

impl Partition {
    pub fn open(
        queue: Arc<str>,
        index: u16,
        gcfg: &GroupConfig,
        config: QueueConfig,
    ) -> Result<Self, ReplicationError> {
        let (mut group, snapshot) = Group::open(gcfg)?;
        let state = match snapshot {
            Some(bytes) => {
                let mut state = PartitionState::restore(&bytes).map_err(|e| {
                    ReplicationError::CorruptState {
                        path: gcfg.dir.join("snapshot"),
                        reason: e.to_string(),
                    }
                })?;
                state.set_config(config);
                state
            }
            None => PartitionState::new(config),
        };
        group.campaign_if_sole_voter()?;
        let log_bytes_at_snapshot = group.log_disk_bytes();
        let mut part = Partition {
            queue,
            index,
            group,
            state,
            dispatchers: BTreeMap::new(),
            consumers: Map::default(),
            batch: PutBatch::default(),
            confirms: BTreeMap::new(),
            settles: BTreeMap::new(),
            dead_letters_due: VecDeque::new(),
            dead_letters_in_flight: Set::default(),
            durable: gcfg.durable,
            pending: BTreeMap::new(),
            parked: VecDeque::new(),
            log_bytes_at_snapshot,
            read_cache: None,
            dispatch_dirty: true,
        };
        part.rebuild_dispatchers();
        Ok(part)
    }

    fn is_fanout(&self) -> bool {
        self.state.config().mode == QueueMode::Fanout
    }

    /// After a leader change (or at open): a fresh dispatcher per subscription, every
    /// unsettled message available again, and dead letters still due picked up.
    fn rebuild_dispatchers(&mut self) {
        let names: Vec<String> = self.state.subscriptions().map(str::to_owned).collect();
        self.dispatchers.retain(|name, _| names.contains(name));
        for name in names {
            self.dispatcher_for(&name);
        }
        for d in self.dispatchers.values_mut() {
            d.rebuild(&self.state);
        }
        self.dead_letters_in_flight.clear();
        self.dead_letters_due = self
            .state
            .dead_letters_due()
            .into_iter()
            .map(|d| (d, 0))
            .collect();
        self.dispatch_dirty = true;
    }

    /// The dispatcher of `subscription`, created (with its attached consumers) if missing.
    fn dispatcher_for(&mut self, subscription: &str) -> &mut Dispatcher {
        if !self.dispatchers.contains_key(subscription) {
            let mut d = if subscription.is_empty() {
                Dispatcher::new()
            } else {
                Dispatcher::for_subscription(subscription)
            };
            for (id, (sub, limits)) in &self.consumers {
                if sub == subscription {
                    d.add_consumer(*id, *limits);
                }
            }
            d.rebuild(&self.state);
            self.dispatchers.insert(subscription.to_owned(), d);
        }
        self.dispatchers
            .get_mut(subscription)
            .expect("inserted above")
    }

    // ----- consumers -------------------------------------------------------------

    /// Attaches a consumer to `subscription` ("" on a work queue). On a fan-out queue a
    /// subscription that does not exist yet is created (proposed by the leader).
    pub fn add_consumer(&mut self, id: ConsumerId, subscription: &str, limits: FlowLimits) {
        self.consumers.insert(id, (subscription.to_owned(), limits));
        if self.is_fanout()
            && !self.state.subscriptions().any(|s| s == subscription)
            && self.group.is_leader()
        {
            let cmd = Command::Subscribe {
                now_ms: now_ms(),
                name: subscription.to_owned(),
            };
            if let Err((_, e)) = self.propose_internal(cmd, PendingKind::Internal) {
                tracing::warn!(queue = %self.queue, "subscribe proposal failed: {e}");
            }
        }
        self.dispatcher_for(subscription).add_consumer(id, limits);
        self.dispatch_dirty = true;
    }

    pub fn remove_consumer(&mut self, id: ConsumerId) {
        if let Some((sub, _)) = self.consumers.remove(&id) {
            if let Some(d) = self.dispatchers.get_mut(&sub) {
                d.remove_consumer(id);
            }
        }
        self.dispatch_dirty = true;
    }

    pub fn set_consumer_limits(&mut self, id: ConsumerId, limits: FlowLimits) {
        let Some((sub, l)) = self.consumers.get_mut(&id) else {
            return;
        };
        *l = limits;
        if let Some(d) = self.dispatchers.get_mut(sub.as_str()) {
            d.set_limits(id, limits);
        }
        self.dispatch_dirty = true;
    }

    fn consumer_dispatcher(&mut self, consumer: ConsumerId) -> Option<&mut Dispatcher> {
        let (sub, _) = self.consumers.get(&consumer)?;
        self.dispatchers.get_mut(sub.as_str())
    }

    /// NACK from the holder: redeliver now or after `delay_ms`. From anyone else: ignored.
    /// False if the consumer does not hold the message (the caller tells it so).
    pub fn nack(&mut self, consumer: ConsumerId, guid: Guid, now_ms: u64, delay_ms: u64) -> bool {
        let Some(d) = self.consumer_dispatcher(consumer) else {
            return false;
        };
        let held = d.nack(consumer, &guid, now_ms, delay_ms).is_ok();
        self.dispatch_dirty |= held;
        held
    }

    /// The holder is still working on it: push its visibility deadline out. False if
    /// the consumer does not hold the message.
    pub fn extend(&mut self, consumer: ConsumerId, guid: Guid, now_ms: u64, extra_ms: u64) -> bool {
        self.consumer_dispatcher(consumer)
            .is_some_and(|d| d.extend(consumer, &guid, now_ms, extra_ms).is_ok())
    }

    /// Proposes an admin subscribe (`create`) or unsubscribe; answered in `ApplyResult`.
    pub fn propose_subscription_op(
        &mut self,
        id: u64,
        name: &str,
        create: bool,
    ) -> Result<(), ReplicationError> {
        let now_ms = now_ms();
        let name = name.to_owned();
        let cmd = if create {
            Command::Subscribe { now_ms, name }
        } else {
            Command::Unsubscribe { now_ms, name }
        };
        self.propose_internal(cmd, PendingKind::SubscriptionOp { id })
            .map_err(|(_, e)| e)
    }

    fn propose_internal(
        &mut self,
        cmd: Command,
        kind: PendingKind,
    ) -> Result<(), (PendingKind, ReplicationError)> {
        match self.group.propose(cmd.encode()) {
            Ok((index, term)) => {
                let previous = self.pending.insert(index, Pending { term, kind });
                assert!(previous.is_none(), "two proposals at index {index}");
                Ok(())
            }
            Err(e) => Err((kind, e)),
        }
    }

    // ----- dead letters ----------------------------------------------------------

    /// Leader: dead letters ready to write now (payload read from the log), at most
    /// what the in-flight bound allows. `dead_letter_queue` None = discard them.
    pub fn take_dead_letters(
        &mut self,
        now_ms: u64,
        dead_letter_queue: Option<&str>,
    ) -> Result<Vec<DeadLetterOut>, ReplicationError> {
        let mut out = Vec::new();
        if !self.group.is_leader() {
            return Ok(out);
        }
        let mut later = VecDeque::new();
        while let Some((due, not_before_ms)) = self.dead_letters_due.pop_front() {
            if not_before_ms > now_ms
                || self.dead_letters_in_flight.len() >= MAX_DEAD_LETTERS_IN_FLIGHT
            {
                later.push_back((due, not_before_ms));
                continue;
            }
            let key = (due.subscription.clone(), due.guid);
            if self.dead_letters_in_flight.contains(&key) {
                continue;
            }
            let Some(meta) = self.state.message_by_seq(due.seq).cloned() else {
                continue; // settled meanwhile (confirmed, purged)
            };
            if dead_letter_queue.is_none() {
                // No dead-letter queue: the message is discarded, counted as dead-lettered.
                self.settles
                    .entry(due.subscription.clone())
                    .or_default()
                    .push(due.guid);
                self.dead_letters_in_flight.insert(key);
                continue;
            }
            let payload = self.payload_at(meta.location)?;
            let message = tern_queue::PutMessage {
                guid: dead_letter_guid(&due.guid, &due.subscription),
                ttl_ms: 0,
                key: meta.key.clone(),
                payload,
                dead_letter: Some(Arc::new(DeadLetterInfo {
                    source_queue: self.queue.to_string(),
                    subscription: due.subscription.clone(),
                    reason: due.reason,
                    attempts: due.attempts,
                    original_guid: due.guid,
                })),
            };
            self.dead_letters_in_flight.insert(key);
            out.push(DeadLetterOut {
                subscription: due.subscription,
                guid: due.guid,
                message,
            });
        }
        self.dead_letters_due = later;
        Ok(out)
    }

    /// The dead-letter queue ACKed (`written`) or refused a dead letter.
    pub fn dead_letter_done(
        &mut self,
        subscription: String,
        guid: Guid,
        written: bool,
        now_ms: u64,
    ) {
        let key = (subscription, guid);
        if !self.dead_letters_in_flight.contains(&key) {
            return; // leadership changed meanwhile: the new term starts over
        }
        if written {
            self.settles.entry(key.0).or_default().push(key.1);
            return;
        }
        self.dead_letters_in_flight.remove(&key);
        if let Some(seq) = self.state.message(&key.1).map(|m| m.seq) {
            let attempts = self.state.attempts(&key.0, seq);
            let reason = self
                .state
                .dead_letters_due()
                .into_iter()
                .find(|d| d.guid == key.1 && d.subscription == key.0)
                .map(|d| d.reason);
            if let Some(reason) = reason {
                self.dead_letters_due.push_back((
                    DeadLetterDue {
                        subscription: key.0,
                        guid: key.1,
                        seq,
                        attempts,
                        reason,
                    },
                    now_ms + DEAD_LETTER_RETRY_MS,
                ));
            }
        }
    }

    pub fn has_dead_letters_due(&self) -> bool {
        !self.dead_letters_due.is_empty()
    }

    /// Called every tick: a due visibility deadline or NACK delay makes delivery run.
    /// Called every tick by the leader: if a message's TTL has passed, propose a Tick so
    /// every replica removes it (time in the state machine comes only from the log).
    pub fn maybe_propose_tick(&mut self, now_ms: u64, metrics: &Metrics) {
        let due = [self.state.next_expiry_ms(), self.state.next_retention_ms()]
            .into_iter()
            .flatten()
            .any(|t| t <= now_ms);
        let pending = self
            .pending
            .values()
            .any(|p| matches!(p.kind, PendingKind::Tick));
        if due && !pending && self.group.is_leader() {
            let _ = self.propose(
                Command::Tick { now_ms }.encode(),
                PendingKind::Tick,
                metrics,
            );
        }
    }

    pub fn check_timers(&mut self, now_ms: u64) {
        if self
            .dispatchers
            .values()
            .any(|d| d.next_timer_ms().is_some_and(|t| t <= now_ms))
        {
            self.dispatch_dirty = true;
        }
    }

    // ----- PUT and CONFIRM batching ---------------------------------------------

    pub fn enqueue_puts(
        &mut self,
        conn: ConnTx,
        messages: Vec<tern_queue::PutMessage>,
        received: Instant,
    ) {
        let count = messages.len();
        for m in messages {
            self.batch.bytes += m.payload.len() as u64;
            self.batch.msgs.push(m);
        }
        self.batch.origins.push(Origin {
            conn,
            count,
            received,
        });
    }

    /// Queues CONFIRMs checked against the dispatcher; returns GUIDs this consumer does not hold.
    /// `resent`: CONFIRMs a coordinator sends again after a failover (see
    /// `Dispatcher::check_resent_confirm`).
    pub fn enqueue_confirms(
        &mut self,
        conn: &ConnTx,
        handle_id: u32,
        consumer: ConsumerId,
        guids: Vec<Guid>,
        resent: bool,
    ) -> Vec<Guid> {
        let Some((sub, _)) = self.consumers.get(&consumer) else {
            return guids;
        };
        let sub = sub.clone();
        let Some(dispatcher) = self.dispatchers.get(&sub) else {
            return guids;
        };
        let mut rejected = Vec::new();
        let mut accepted = Vec::new();
        for g in guids {
            let ok = if resent {
                dispatcher.check_resent_confirm(consumer, &g)
            } else {
                dispatcher.check_confirm(consumer, &g)
            };
            if ok.is_ok() {
                accepted.push(g);
            } else {
                rejected.push(g);
            }
        }
        let count = accepted.len();
        if count > 0 {
            let batch = self.confirms.entry(sub).or_default();
            batch.guids.extend(accepted);
            batch.origins.push(ConfirmOrigin {
                conn: conn.clone(),
                handle_id,
                count,
            });
        }
        rejected
    }

    /// Turns the round's batches into Raft proposals: one entry per `max_entry_bytes` of PUTs.
    pub fn flush(&mut self, max_entry_bytes: u64, metrics: &Metrics) {
        if !self.group.is_leader() {
            if !self.batch.msgs.is_empty() {
                self.parked
                    .push_back((std::mem::take(&mut self.batch), crate::clock::now()));
            }
            // CONFIRMs need the leader's dispatcher; a non-leader has none to check
            // against. The consumer's messages are redelivered by the new leader.
            for (_, batch) in std::mem::take(&mut self.confirms) {
                answer_confirms_failed(batch, Status::Unavailable);
            }
            self.settles.clear();
            return;
        }
        // Taken out first: a batch refused again (a leadership transfer) parks anew
        // for the next round instead of looping here.
        for (batch, _) in std::mem::take(&mut self.parked) {
            self.propose_puts(batch, max_entry_bytes, metrics);
        }
        let batch = std::mem::take(&mut self.batch);
        if !batch.msgs.is_empty() {
            self.propose_puts(batch, max_entry_bytes, metrics);
        }
        for (subscription, confirms) in std::mem::take(&mut self.confirms) {
            let cmd = Command::Confirm {
                now_ms: now_ms(),
                subscription,
                guids: confirms.guids.clone(),
            };
            if let Err((kind, e)) = self.propose(
                cmd.encode(),
                PendingKind::Confirms { batch: confirms },
                metrics,
            ) {
                tracing::warn!(queue = %self.queue, "confirm proposal failed: {e}");
                if let PendingKind::Confirms { batch } = kind {
                    answer_confirms_failed(batch, Status::Unavailable);
                }
            }
        }
        self.propose_housekeeping();
    }

    /// Replicated attempt counts and dead-letter settlements, batched per round.
    fn propose_housekeeping(&mut self) {
        let now_ms = now_ms();
        let mut cmds = Vec::new();
        for d in self.dispatchers.values_mut() {
            if d.has_attempt_updates() {
                cmds.push(Command::Attempts {
                    now_ms,
                    subscription: d.subscription().to_owned(),
                    bumps: d.take_attempt_updates(),
                });
            }
        }
        for (subscription, guids) in std::mem::take(&mut self.settles) {
            cmds.push(Command::Settle {
                now_ms,
                subscription,
                guids,
                reason: SettleReason::DeadLettered,
            });
        }
        for cmd in cmds {
            if let Err((_, e)) = self.propose_internal(cmd, PendingKind::Internal) {
                // Lost attempt counts only delay dead-lettering; a new leader re-derives
                // dead letters from the state.
                tracing::warn!(queue = %self.queue, "housekeeping proposal failed: {e}");
            }
        }
    }

    /// Proposes one entry and remembers what to answer when exactly that entry applies.
    /// On failure, hands the pending work back with the error.
    fn propose(
        &mut self,
        data: Bytes,
        kind: PendingKind,
        metrics: &Metrics,
    ) -> Result<(), (PendingKind, ReplicationError)> {
        match self.group.propose(data) {
            Ok((index, term)) => {
                metrics.entries_proposed.inc();
                let previous = self.pending.insert(index, Pending { term, kind });
                assert!(previous.is_none(), "two proposals at index {index}");
                Ok(())
            }
            Err(e) => Err((kind, e)),
        }
    }

    fn propose_puts(&mut self, batch: PutBatch, max_entry_bytes: u64, metrics: &Metrics) {
        for chunk in split_batch(batch, max_entry_bytes) {
            let data = Command::encode_put(now_ms(), &chunk.msgs);
            match self.propose(data, PendingKind::Puts { batch: chunk }, metrics) {
                Ok(()) => {}
                Err((PendingKind::Puts { batch }, ReplicationError::NotLeader { .. })) => {
                    self.parked.push_back((batch, crate::clock::now()))
                }
                Err((PendingKind::Puts { batch }, ReplicationError::ProposalDropped))
                    if self.group.is_transferring_leadership() =>
                {
                    // Handing leadership over (graceful stop): the PUTs wait for the new
                    // leader (forwarded there) instead of failing.
                    self.parked.push_back((batch, crate::clock::now()))
                }
                Err((PendingKind::Puts { batch }, e)) => {
                    tracing::warn!(queue = %self.queue, "put proposal refused: {e}");
                    answer_puts_failed(&self.queue, batch, Status::Overloaded, metrics);
                }
                Err(_) => unreachable!("propose hands back the kind it was given"),
            }
        }
    }

    pub fn propose_purge(&mut self, id: u64) -> Result<(), ReplicationError> {
        let (index, term) = self
            .group
            .propose(Command::Purge { now_ms: now_ms() }.encode())?;
        self.pending.insert(
            index,
            Pending {
                term,
                kind: PendingKind::Purge { id },
            },
        );
        Ok(())
    }

    /// Where a PUT waits in this partition, for the simulator's failure reports.
    #[cfg(feature = "sim")]
    pub fn find_put(&self, guid: &Guid) -> Vec<String> {
        let has = |b: &PutBatch| b.msgs.iter().any(|m| &m.guid == guid);
        let mut out = Vec::new();
        if has(&self.batch) {
            out.push("in the round's batch".to_string());
        }
        if self.parked.iter().any(|(b, _)| has(b)) {
            out.push("parked".into());
        }
        for (index, p) in &self.pending {
            if matches!(&p.kind, PendingKind::Puts { batch } if has(batch)) {
                out.push(format!(
                    "proposed at index {index} term {} (leader {}, term {}, applied {})",
                    p.term,
                    self.group.is_leader(),
                    self.group.term(),
                    self.group.applied_index()
                ));
            }
        }
        out
    }

    /// Consumers attached here and how many messages each holds (failure reports).
    #[cfg(feature = "sim")]
    pub fn holders(&self) -> Vec<(ConsumerId, usize)> {
        let mut out: Vec<(ConsumerId, usize)> = self
            .consumers
            .keys()
            .map(|c| {
                let held = self.dispatchers.values().map(|d| d.held_by(*c)).sum();
                (*c, held)
            })
            .collect();
        out.sort();
        out
    }

    /// PUTs parked here while this replica is not the leader, per origin connection, to
    /// be forwarded to the leader elsewhere (with the time each was received).
    pub fn take_parked(&mut self) -> Vec<(ConnTx, Vec<tern_queue::PutMessage>, Instant, u64)> {
        let mut out = Vec::new();
        let mut batches: Vec<PutBatch> = self.parked.drain(..).map(|(b, _)| b).collect();
        batches.push(std::mem::take(&mut self.batch));
        for batch in batches {
            let mut msgs = batch.msgs.into_iter();
            for o in batch.origins {
                let chunk: Vec<_> = msgs.by_ref().take(o.count).collect();
                let bytes = chunk.iter().map(|m| m.payload.len() as u64).sum();
                out.push((o.conn, chunk, o.received, bytes));
            }
        }
        out
    }

    /// Answers parked PUTs older than `bound` with `timeout` (outcome unknown to the client,
    /// which may retry with the same GUID). Returns the payload bytes released.
    pub fn expire_parked(&mut self, bound: Duration) -> u64 {
        let mut released = 0;
        while let Some((_, since)) = self.parked.front() {
            if crate::clock::now().saturating_duration_since(*since) < bound {
                break;
            }
            if let Some((batch, _)) = self.parked.pop_front() {
                released += batch.bytes;
                answer_batch(&batch, false, |_| Status::Timeout);
            }
        }
        released
    }

    // ----- apply -----------------------------------------------------------------

    /// Applies a Ready's committed entries and answers the proposals they complete.
    pub fn apply_ready(&mut self, out: ReadyOutput, metrics: &Metrics) -> ApplyResult {
        let mut result = ApplyResult::default();
        if let Some(bytes) = &out.installed_snapshot {
            self.restore_installed(bytes);
            // Proposals left from an earlier leadership of this replica: the snapshot
            // replaced the log they were in, so no entry of theirs will be applied
            // here to answer them. Propose them again through the leader (same GUIDs:
            // the dedup history answers any that did commit). Found by the
            // whole-cluster simulator: those PUTs waited for an answer forever.
            for (_, p) in std::mem::take(&mut self.pending) {
                self.reproposal(p.kind, &mut result);
            }
        }
        for entry in out.committed {
            // A new leader's empty entry (or a membership change) applies nothing, but
            // it may sit at the index of a proposal of ours from a deposed term: that
            // proposal then never committed and must be proposed again.
            let applied = if entry.data.is_empty() {
                None
            } else {
                match Command::decode(&entry.data) {
                    Ok(cmd) => Some(self.state.apply(entry.index, &cmd)),
                    Err(e) => {
                        // Entries are checksummed on disk; an undecodable one is a bug, not bit rot.
                        tracing::error!(queue = %self.queue, index = entry.index, "undecodable entry skipped: {e}");
                        None
                    }
                }
            };
            if let (Some(applied), true) = (&applied, self.group.is_leader()) {
                self.leader_applied(applied);
            }
            if let Some(p) = self.pending.remove(&entry.index) {
                match &applied {
                    Some(applied) if p.term == entry.term => {
                        self.answer(p.kind, applied, metrics, &mut result)
                    }
                    _ => self.reproposal(p.kind, &mut result),
                }
            }
        }
        if let Some((role, _leader)) = out.role_change {
            if role == tern_replication::StateRole::Leader {
                // A new leader treats every unsettled message as available (at-least-once).
                self.rebuild_dispatchers();
            } else {
                // Deposed: what this replica proposed as leader may still commit (if the
                // next leader has it) or be overwritten, maybe at an index this log does
                // not reach again for a long while (no traffic). Either way it is
                // proposed again through the new leader now, with the same GUIDs: the
                // dedup history answers those that did commit. Found by the
                // whole-cluster simulator: such PUTs waited for an answer forever.
                for (_, p) in std::mem::take(&mut self.pending) {
                    self.reproposal(p.kind, &mut result);
                }
            }
        }
        result
    }

    /// This replica took the leader's snapshot: its state replaces ours (the caller
    /// re-proposes what it had waiting from an earlier leadership).
    fn restore_installed(&mut self, bytes: &Bytes) {
        match PartitionState::restore(bytes) {
            Ok(mut state) => {
                state.set_config(self.state.config().clone());
                self.state = state;
                self.read_cache = None;
                self.log_bytes_at_snapshot = self.group.log_disk_bytes();
                self.rebuild_dispatchers();
                tracing::info!(queue = %self.queue, partition = self.index, "state restored from the leader's snapshot");
            }
            Err(e) => {
                // The leader checksums and we decode its own encoding: this is a bug. Keep
                // the old state rather than guess; the node's status shows the lag.
                tracing::error!(queue = %self.queue, partition = self.index, "leader's snapshot does not decode: {e}");
            }
        }
    }

    /// Leader-local bookkeeping after one applied command.
    fn leader_applied(&mut self, applied: &Applied) {
        match &applied.outcome {
            Outcome::Subscribe {
                name,
                outcome: SubscribeOutcome::Created,
            } => {
                self.dispatcher_for(name);
            }
            Outcome::Unsubscribe { name, .. } => {
                self.dispatchers.remove(name);
            }
            Outcome::Settle {
                subscription,
                results,
                ..
            } => {
                for (guid, _) in results {
                    self.dead_letters_in_flight
                        .remove(&(subscription.clone(), *guid));
                }
            }
            _ => {}
        }
        for d in self.dispatchers.values_mut() {
            d.on_applied(&self.state, applied);
        }
        for due in &applied.dead_letter_due {
            self.dead_letters_due.push_back((due.clone(), 0));
        }
        self.dispatch_dirty = true;
    }

    fn answer(
        &mut self,
        kind: PendingKind,
        applied: &Applied,
        metrics: &Metrics,
        result: &mut ApplyResult,
    ) {
        match (kind, &applied.outcome) {
            (PendingKind::Puts { batch }, Outcome::Put(outcomes)) => {
                result.answered_bytes += batch.bytes;
                debug_assert_eq!(outcomes.len(), batch.msgs.len());
                let statuses: Map<Guid, Status> =
                    outcomes.iter().map(|(g, o)| (*g, put_status(o))).collect();
                for o in &batch.origins {
                    metrics.ack_latency.observe(
                        crate::clock::now()
                            .saturating_duration_since(o.received)
                            .as_secs_f64(),
                    );
                }
                self.count_acks(&batch, &statuses, metrics);
                answer_batch(&batch, self.durable, |g| {
                    statuses.get(g).copied().unwrap_or(Status::Internal)
                });
            }
            (
                PendingKind::Confirms { batch },
                Outcome::Confirm {
                    results: outcomes, ..
                },
            ) => {
                let settled = outcomes
                    .iter()
                    .filter(|(_, o)| matches!(o, ConfirmOutcome::Settled))
                    .count();
                metrics
                    .confirms
                    .get_or_create(&QueueLabels {
                        queue: self.queue.to_string(),
                    })
                    .inc_by(settled as u64);
                let statuses: Map<Guid, Status> = outcomes
                    .iter()
                    .map(|(g, o)| {
                        (
                            *g,
                            if matches!(o, ConfirmOutcome::Settled) {
                                Status::Ok
                            } else {
                                Status::UnknownMessage
                            },
                        )
                    })
                    .collect();
                answer_confirms(batch, |g| {
                    statuses.get(g).copied().unwrap_or(Status::Internal)
                });
            }
            (PendingKind::Purge { id }, Outcome::Purge { removed }) => {
                result.purged.push((id, *removed))
            }
            (PendingKind::SubscriptionOp { id }, Outcome::Subscribe { outcome, .. }) => {
                result.subscription_ops.push((
                    id,
                    matches!(
                        outcome,
                        SubscribeOutcome::Created | SubscribeOutcome::AlreadyExists
                    ),
                ))
            }
            (PendingKind::SubscriptionOp { id }, Outcome::Unsubscribe { outcome, .. }) => {
                result.subscription_ops.push((
                    id,
                    matches!(outcome, tern_queue::UnsubscribeOutcome::Removed { .. }),
                ))
            }
            (PendingKind::Tick | PendingKind::Internal, _) => {}
            (kind, _) => {
                // The entry at our index is a different command: our proposal was replaced.
                tracing::error!(queue = %self.queue, "applied entry does not match its proposal");
                self.reproposal(kind, result);
            }
        }
    }

    /// A proposal was overwritten by another leader's entry: it never committed, so it is
    /// safe to propose again (same GUIDs; the dedup history covers any doubt).
    fn reproposal(&mut self, kind: PendingKind, result: &mut ApplyResult) {
        match kind {
            PendingKind::Puts { batch } => self.parked.push_back((batch, crate::clock::now())),
            PendingKind::Confirms { batch } => answer_confirms_failed(batch, Status::Unavailable),
            PendingKind::Purge { id } => result.purged.push((id, 0)),
            PendingKind::SubscriptionOp { id } => result.subscription_ops.push((id, false)),
            PendingKind::Tick | PendingKind::Internal => {}
        }
    }

    fn count_acks(&self, batch: &PutBatch, statuses: &Map<Guid, Status>, metrics: &Metrics) {
        let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
        for m in &batch.msgs {
            let s = statuses.get(&m.guid).copied().unwrap_or(Status::Internal);
            *counts.entry(s.name()).or_default() += 1;
        }
        for (status, n) in counts {
            metrics
                .acks
                .get_or_create(&StatusLabels {
                    queue: self.queue.to_string(),
                    status: status.to_string(),
                })
                .inc_by(n);
        }
    }

    // ----- delivery --------------------------------------------------------------

    /// PUSHes what the dispatcher hands out, reading payloads from the log.
    pub fn dispatch(
        &mut self,
        consumers: &Map<ConsumerId, (ConnTx, u32)>,
        metrics: &Metrics,
    ) -> Result<(), ReplicationError> {
        if !self.dispatch_dirty || !self.group.is_leader() {
            return Ok(());
        }
        self.dispatch_dirty = false;
        let now_ms = now_ms();
        let mut deliveries = Vec::new();
        for d in self.dispatchers.values_mut() {
            let budget = MAX_PUSH_PER_ROUND - deliveries.len();
            let polled = d.poll(&self.state, now_ms, budget);
            if polled.len() == budget {
                self.dispatch_dirty = true; // more may be waiting: continue next round
            }
            deliveries.extend(polled);
            if deliveries.len() == MAX_PUSH_PER_ROUND {
                break;
            }
        }
        let mut frames: BTreeMap<ConsumerId, Vec<PushMessage>> = BTreeMap::new();
        for d in deliveries {
            let payload = self.payload_at(d.location)?;
            let dead_letter = self
                .state
                .message_by_seq(d.seq)
                .and_then(|m| m.dead_letter.as_deref())
                .map(proto_dead_letter);
            frames.entry(d.consumer).or_default().push(PushMessage {
                guid: d.guid,
                partition: self.index,
                attempt: d.attempt,
                payload,
                dead_letter,
            });
        }
        for (consumer, messages) in frames {
            match consumers.get(&consumer) {
                Some((conn, handle_id)) => {
                    metrics
                        .pushes
                        .get_or_create(&QueueLabels {
                            queue: self.queue.to_string(),
                        })
                        .inc_by(messages.len() as u64);
                    conn.send(Frame::Push {
                        queue_id: *handle_id,
                        messages,
                    });
                }
                None => {
                    // The consumer left between poll and send: give its messages back.
                    self.remove_consumer(consumer);
                }
            }
        }
        Ok(())
    }

    fn payload_at(&mut self, loc: Location) -> Result<Bytes, ReplicationError> {
        let data = match &self.read_cache {
            Some((index, data)) if *index == loc.index => data.clone(),
            _ => {
                let data = self.group.entry_data(loc.index)?;
                self.read_cache = Some((loc.index, data.clone()));
                data
            }
        };
        let start = loc.offset as usize;
        let end = start + loc.len as usize;
        if end > data.len() {
            return Err(ReplicationError::CorruptState {
                path: Default::default(),
                reason: format!(
                    "payload location {loc:?} outside entry of {} bytes",
                    data.len()
                ),
            });
        }
        Ok(data.slice(start..end))
    }

    // ----- snapshots and status --------------------------------------------------

    pub fn maybe_snapshot(&mut self, interval_bytes: u64) -> Result<(), ReplicationError> {
        if self.group.log_disk_bytes() >= self.log_bytes_at_snapshot + interval_bytes {
            self.snapshot_now()?;
        }
        Ok(())
    }

    /// Snapshots the state machine at the applied index and releases settled segments.
    pub fn snapshot_now(&mut self) -> Result<(), ReplicationError> {
        let applied = self.group.applied_index();
        if applied == 0 || applied == self.group.snapshot_index() {
            return Ok(());
        }
        let keep_from = self.state.min_live_index().unwrap_or(applied + 1);
        let released = self.group.compact(self.state.snapshot(), keep_from)?;
        self.read_cache = None;
        self.log_bytes_at_snapshot = self.group.log_disk_bytes();
        tracing::debug!(queue = %self.queue, partition = self.index, applied, released, "snapshot taken");
        Ok(())
    }

    pub fn info(&self, now_ms: u64) -> PartitionInfo {
        let stats = self.state.stats();
        let status = self.group.status();
        PartitionInfo {
            partition: self.index,
            leader: (status.leader_id != 0).then_some(status.leader_id),
            depth: stats.depth,
            bytes: stats.bytes,
            in_flight: self.dispatchers.values().map(|d| d.inflight() as u64).sum(),
            delayed: self.dispatchers.values().map(|d| d.delayed() as u64).sum(),
            oldest_age_ms: stats.oldest_enqueued_ms.map(|t| now_ms.saturating_sub(t)),
            commit_index: status.commit_index,
            applied_index: status.applied_index,
            log_first_index: status.log_first_index,
            log_disk_bytes: status.log_disk_bytes,
            puts_enqueued: stats.puts_enqueued,
            puts_duplicate: stats.puts_duplicate,
            puts_rejected: stats.puts_rejected,
            confirms: stats.confirms,
            purged: stats.purged,
            expired: stats.expired,
            dead_lettered: stats.dead_lettered,
            dead_letter_due: stats.dead_letter_due,
            dropped: stats.dropped,
            subscriptions: self.subscription_infos(now_ms),
        }
    }

    fn subscription_infos(&self, now_ms: u64) -> Vec<SubscriptionInfo> {
        self.state
            .subscriptions()
            .filter_map(|name| {
                let st = match self.dispatchers.get(name) {
                    Some(d) if self.group.is_leader() => d.subscription_stats(&self.state),
                    _ => self.state.subscription_stats(name),
                }?;
                Some(SubscriptionInfo {
                    name: st.name,
                    depth: st.depth,
                    bytes: st.bytes,
                    lag: st.lag,
                    in_flight: st.in_flight,
                    delayed: st.delayed,
                    dead_letter_due: st.dead_letter_due,
                    oldest_age_ms: st.oldest_enqueued_ms.map(|t| now_ms.saturating_sub(t)),
                    consumers: self
                        .dispatchers
                        .get(name)
                        .map_or(0, |d| d.consumer_count() as u64),
                    confirmed: st.confirmed,
                    dead_lettered: st.dead_lettered,
                    expired: st.expired,
                    dropped: st.dropped,
                })
            })
            .collect()
    }

    /// PUT messages accepted here and not yet answered.
    pub fn outstanding_puts(&self) -> usize {
        let pending: usize = self
            .pending
            .values()
            .map(|p| match &p.kind {
                PendingKind::Puts { batch } => batch.msgs.len(),
                _ => 0,
            })
            .sum();
        let parked: usize = self.parked.iter().map(|(b, _)| b.msgs.len()).sum();
        self.batch.msgs.len() + pending + parked
    }

    pub fn update_gauges(&self, metrics: &Metrics) {
        let labels = PartitionLabels {
            queue: self.queue.to_string(),
            partition: self.index.to_string(),
        };
        let stats = self.state.stats();
        metrics.depth.get_or_create(&labels).set(stats.depth as i64);
        metrics
            .queue_bytes
            .get_or_create(&labels)
            .set(stats.bytes as i64);
        let inflight: usize = self.dispatchers.values().map(|d| d.inflight()).sum();
        metrics
            .in_flight
            .get_or_create(&labels)
            .set(inflight as i64);
        metrics
            .consumers
            .get_or_create(&labels)
            .set(self.consumers.len() as i64);
        for info in self.subscription_infos(now_ms()) {
            let sl = SubscriptionLabels {
                queue: self.queue.to_string(),
                partition: self.index.to_string(),
                subscription: info.name.clone(),
            };
            metrics.sub_depth.get_or_create(&sl).set(info.depth as i64);
            metrics.sub_lag.get_or_create(&sl).set(info.lag as i64);
            metrics
                .sub_dead_lettered
                .get_or_create(&sl)
                .set(info.dead_lettered as i64);
            metrics
                .sub_dropped
                .get_or_create(&sl)
                .set(info.dropped as i64);
        }
        metrics
            .log_disk_bytes
            .get_or_create(&labels)
            .set(self.group.log_disk_bytes() as i64);
    }

    /// The queue is being deleted: answer everything still waiting. Returns PUT bytes released.
    pub fn fail_all(mut self, status: Status) -> u64 {
        let mut released = 0;
        let mut batches: Vec<PutBatch> = self.parked.drain(..).map(|(b, _)| b).collect();
        batches.push(std::mem::take(&mut self.batch));
        for (_, p) in std::mem::take(&mut self.pending) {
            match p.kind {
                PendingKind::Puts { batch } => batches.push(batch),
                PendingKind::Confirms { batch } => answer_confirms_failed(batch, status),
                PendingKind::Purge { .. }
                | PendingKind::Tick
                | PendingKind::Internal
                | PendingKind::SubscriptionOp { .. } => {}
            }
        }
        for b in batches {
            released += b.bytes;
            answer_batch(&b, false, |_| status);
        }
        released
    }
}

fn put_status(o: &PutOutcome) -> Status {
    match o {
        PutOutcome::Enqueued { .. } => Status::Ok,
        PutOutcome::Duplicate { original } => original_status(original),
        PutOutcome::QuotaExceeded => Status::QuotaExceeded,
        PutOutcome::TooLarge => Status::MessageTooLarge,
        PutOutcome::InvalidTtl => Status::InvalidArgument,
    }
}

fn original_status(o: &tern_queue::OriginalOutcome) -> Status {
    match o {
        tern_queue::OriginalOutcome::Enqueued => Status::Ok,
        tern_queue::OriginalOutcome::QuotaExceeded => Status::QuotaExceeded,
        tern_queue::OriginalOutcome::TooLarge => Status::MessageTooLarge,
        tern_queue::OriginalOutcome::InvalidTtl => Status::InvalidArgument,
    }
}

/// Sends every origin of a batch its ACKs, with the status `status_of` gives each GUID.
fn answer_batch(batch: &PutBatch, durable: bool, status_of: impl Fn(&Guid) -> Status) {
    let mut msgs = batch.msgs.iter();
    for o in &batch.origins {
        let acks: Vec<AckEntry> = msgs
            .by_ref()
            .take(o.count)
            .map(|m| {
                let status = status_of(&m.guid);
                let flags = if status == Status::Ok && durable {
                    ACK_DURABLE
                } else {
                    0
                };
                AckEntry {
                    guid: m.guid,
                    status,
                    flags,
                }
            })
            .collect();
        o.conn.send(Frame::Ack { acks });
    }
}

fn answer_puts_failed(queue: &str, batch: PutBatch, status: Status, metrics: &Metrics) {
    metrics
        .acks
        .get_or_create(&StatusLabels {
            queue: queue.to_string(),
            status: status.name().to_string(),
        })
        .inc_by(batch.msgs.len() as u64);
    answer_batch(&batch, false, |_| status);
}

fn answer_confirms(batch: ConfirmBatch, status_of: impl Fn(&Guid) -> Status) {
    let mut guids = batch.guids.iter();
    for o in &batch.origins {
        let entries: Vec<ConfirmAckEntry> = guids
            .by_ref()
            .take(o.count)
            .map(|g| ConfirmAckEntry {
                guid: *g,
                status: status_of(g),
            })
            .collect();
        o.conn.send(Frame::ConfirmAck {
            queue_id: o.handle_id,
            entries,
        });
    }
}

fn answer_confirms_failed(batch: ConfirmBatch, status: Status) {
    answer_confirms(batch, |_| status);
}

/// Splits a batch into chunks of at most `max_bytes` of payload (at least one message
/// each), splitting origin runs where a chunk boundary falls inside one.
fn split_batch(batch: PutBatch, max_bytes: u64) -> Vec<PutBatch> {
    if batch.bytes <= max_bytes {
        return vec![batch];
    }
    let mut out = Vec::new();
    let mut cur = PutBatch::default();
    let mut origins = batch.origins.into_iter();
    let mut origin = origins.next();
    let mut left_in_origin = origin.as_ref().map_or(0, |o| o.count);
    for m in batch.msgs {
        let size = m.payload.len() as u64;
        if !cur.msgs.is_empty() && cur.bytes + size > max_bytes {
            out.push(std::mem::take(&mut cur));
        }
        while left_in_origin == 0 {
            origin = origins.next();
            left_in_origin = origin.as_ref().map_or(usize::MAX, |o| o.count);
        }
        if let Some(o) = &origin {
            match cur.origins.last_mut() {
                Some(last) if last.conn.id == o.conn.id && last.received == o.received => {
                    last.count += 1
                }
                _ => cur.origins.push(Origin {
                    conn: o.conn.clone(),
                    count: 1,
                    received: o.received,
                }),
            }
        }
        left_in_origin -= 1;
        cur.bytes += size;
        cur.msgs.push(m);
    }
    if !cur.msgs.is_empty() {
        out.push(cur);
    }
    out
}

/// The GUID a dead letter gets in the dead-letter queue: the original for a work queue;
/// mixed with the subscription's name for a fan-out queue, so dead letters of one message
/// from two subscriptions are two messages. Deterministic, so a retried write is
/// recognised by the dead-letter queue's dedup history.
pub fn dead_letter_guid(guid: &Guid, subscription: &str) -> Guid {
    if subscription.is_empty() {
        return *guid;
    }
    let mut out = *guid;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, b) in subscription.bytes().enumerate() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
        out[i % 16] ^= (h >> 56) as u8;
    }
    for (i, b) in h.to_be_bytes().iter().enumerate() {
        out[i] ^= b;
    }
    out
}

fn proto_dead_letter(d: &DeadLetterInfo) -> tern_proto::DeadLetterInfo {
    tern_proto::DeadLetterInfo {
        source_queue: d.source_queue.clone(),
        subscription: d.subscription.clone(),
        reason: match d.reason {
            tern_queue::DeadLetterReason::MaxAttempts => tern_proto::DeadLetterReason::MaxAttempts,
            tern_queue::DeadLetterReason::Expired => tern_proto::DeadLetterReason::Expired,
        },
        attempts: d.attempts,
        original_guid: d.original_guid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: u8, size: usize) -> tern_queue::PutMessage {
        tern_queue::PutMessage {
            guid: [i; 16],
            ttl_ms: 0,
            key: Bytes::new(),
            payload: Bytes::from(vec![0u8; size]),
            dead_letter: None,
        }
    }

    #[test]
    fn split_batch_keeps_every_message_with_its_origin() {
        let (tx1, _r1) = flume::unbounded();
        let (tx2, _r2) = flume::unbounded();
        let now = crate::clock::now();
        let a = ConnTx::new(1, tx1);
        let b = ConnTx::new(2, tx2);
        let batch = PutBatch {
            msgs: (0..10).map(|i| msg(i, 100)).collect(),
            origins: vec![
                Origin {
                    conn: a,
                    count: 3,
                    received: now,
                },
                Origin {
                    conn: b,
                    count: 7,
                    received: now,
                },
            ],
            bytes: 1000,
        };
        let chunks = split_batch(batch, 250);
        assert_eq!(chunks.len(), 5);
        let total: usize = chunks.iter().map(|c| c.msgs.len()).sum();
        assert_eq!(total, 10);
        for c in &chunks {
            assert!(c.bytes <= 250);
            assert_eq!(
                c.origins.iter().map(|o| o.count).sum::<usize>(),
                c.msgs.len()
            );
        }
        let owners: Vec<u64> = chunks
            .iter()
            .flat_map(|c| {
                c.origins
                    .iter()
                    .flat_map(|o| std::iter::repeat_n(o.conn.id, o.count))
            })
            .collect();
        assert_eq!(owners, vec![1, 1, 1, 2, 2, 2, 2, 2, 2, 2]);
    }

    #[test]
    fn dead_letter_guids_differ_per_subscription_and_are_stable() {
        let g = [7u8; 16];
        assert_eq!(dead_letter_guid(&g, ""), g);
        let a = dead_letter_guid(&g, "billing");
        assert_ne!(a, g);
        assert_ne!(a, dead_letter_guid(&g, "audit"));
        assert_eq!(a, dead_letter_guid(&g, "billing"));
    }
}
