//! The replicated state of one partition: unsettled messages (metadata and the log
//! location of their payload), subscriptions and what each settled, replicated
//! delivery-attempt counts, the GUID history, quotas and counters.
//!
//! Contract:
//! - Deterministic: the same commands in the same order give the same state and the
//!   same [`Applied`] results on every replica (compare [`PartitionState::snapshot`]s).
//! - Time is the commands' `now_ms`, never a clock read. State time only moves
//!   forward: a command stamped earlier than a previous one acts at the later time.
//! - Before a command takes effect, time does its work: messages whose TTL passed are
//!   removed (or reported as dead-letter due), retention drops old messages (fan-out),
//!   the GUID history forgets what left its window. [`Applied`] reports all of it.
//! - A GUID names at most one unsettled message; a PUT of a GUID in the history or
//!   still unsettled is a duplicate and gets the original outcome.
//! - Bounded: messages by the quotas, the GUID history by its window and count,
//!   subscriptions by `max_subscriptions`; per-subscription sets by the messages.
//! - Single-threaded and pure: no I/O, no clock, no randomness.
//!
//! A work queue has one implicit subscription named "". A fan-out queue has the named
//! subscriptions created by `Subscribe`; each gets every message enqueued after it was
//! created, and a message is released (its log index stops counting for
//! [`PartitionState::min_live_index`]) once every subscription settled it. A message
//! enqueued while a fan-out queue has no subscription is released at once (counted as
//! `unrouted`), like a topic nobody listens to.
//!
//! The `HashMap` (GUID → seq) is a lookup index only; everything that is iterated is
//! ordered (`BTreeMap`, `BTreeSet`, `VecDeque`).

use crate::command::{put_name, Command, CommandError, DecodedCommand, PutMessage};
use crate::command::{SettleReason, MAX_SUBSCRIPTION_BYTES};
use crate::dedup::DedupHistory;
use crate::Guid;
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::{BTreeMap, BTreeSet, HashMap};

mod snapshot;

pub use crate::config::{Location, QueueConfig, QueueMode};
pub use crate::outcome::{
    Applied, ConfirmOutcome, DeadLetterDue, DeadLetterReason, MessageMeta, OriginalOutcome,
    Outcome, PartitionStats, PutOutcome, SubscribeOutcome, SubscriptionStats, UnsubscribeOutcome,
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct SubCounters {
    confirmed: u64,
    dead_lettered: u64,
    expired: u64,
    dropped: u64,
    purged: u64,
}

/// Why a message leaves every subscription at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Removal {
    Expired,
    Dropped,
    Purged,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Subscription {
    /// The first seq this subscription receives.
    start_seq: u64,
    /// Live messages it settled that other subscriptions still need.
    settled: BTreeSet<u64>,
    /// Replicated failed delivery attempts (only non-zero entries, live messages only).
    attempts: BTreeMap<u64, u32>,
    /// Not delivered any more; waiting for `Settle { DeadLettered }`.
    dead_letter_due: BTreeMap<u64, DeadLetterReason>,
    pending_msgs: u64,
    pending_bytes: u64,
    counters: SubCounters,
}

impl Subscription {
    fn new(start_seq: u64) -> Self {
        Subscription {
            start_seq,
            settled: BTreeSet::new(),
            attempts: BTreeMap::new(),
            dead_letter_due: BTreeMap::new(),
            pending_msgs: 0,
            pending_bytes: 0,
            counters: SubCounters::default(),
        }
    }

    /// Whether this subscription still needs live message `seq`.
    fn needs(&self, seq: u64) -> bool {
        seq >= self.start_seq && !self.settled.contains(&seq)
    }

    /// Stops needing `seq` (settled or removed): drops its per-message state.
    fn forget(&mut self, seq: u64, size_bytes: u32) {
        debug_assert!(self.needs(seq));
        self.pending_msgs -= 1;
        self.pending_bytes -= u64::from(size_bytes);
        self.attempts.remove(&seq);
        self.dead_letter_due.remove(&seq);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Message {
    meta: MessageMeta,
    /// Subscriptions that still need it; released at 0.
    needed_by: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Counters {
    puts_enqueued: u64,
    puts_duplicate: u64,
    puts_rejected: u64,
    confirms: u64,
    purged: u64,
    expired: u64,
    dead_lettered: u64,
    dropped: u64,
    unrouted: u64,
}

/// The replicated queue state of one partition (see the module docs for the contract).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionState {
    config: QueueConfig,
    now_ms: u64,
    next_seq: u64,
    messages: BTreeMap<u64, Message>,
    seq_by_guid: HashMap<Guid, u64>,
    /// (expires_ms, seq) of live messages whose expiry has not been processed yet.
    expiry: BTreeSet<(u64, u64)>,
    /// Live messages per log index, for `min_live_index`.
    live_per_index: BTreeMap<u64, u32>,
    bytes: u64,
    subscriptions: BTreeMap<String, Subscription>,
    dedup: DedupHistory,
    counters: Counters,
}

/// The implicit subscription of a work queue.
const WORK_SUBSCRIPTION: &str = "";

impl PartitionState {
    pub fn new(config: QueueConfig) -> Self {
        let mut subscriptions = BTreeMap::new();
        if config.mode == QueueMode::Work {
            subscriptions.insert(WORK_SUBSCRIPTION.to_owned(), Subscription::new(1));
        }
        PartitionState {
            config,
            now_ms: 0,
            next_seq: 1,
            messages: BTreeMap::new(),
            seq_by_guid: HashMap::new(),
            expiry: BTreeSet::new(),
            live_per_index: BTreeMap::new(),
            bytes: 0,
            subscriptions,
            dedup: DedupHistory::default(),
            counters: Counters::default(),
        }
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Replaces the settings (the mode stays). Replicas diverge unless every replica
    /// does it at the same log position: on a live partition prefer proposing
    /// `Command::Configure`; call this directly only before the first command is
    /// applied (creation) or right after `restore`. New limits act from the next
    /// command on; messages already enqueued keep their expiry. A lowered
    /// `max_delivery_attempts` makes messages already at it dead-letter due (listed by
    /// [`Self::dead_letters_due`]).
    pub fn set_config(&mut self, config: QueueConfig) {
        self.reconfigure(config);
    }

    /// Applies new settings; returns the messages this made dead-letter due.
    fn reconfigure(&mut self, config: QueueConfig) -> Vec<DeadLetterDue> {
        let mode = self.config.mode;
        self.config = QueueConfig { mode, ..config };
        let max = self.config.max_delivery_attempts;
        let mut due = Vec::new();
        if max == 0 {
            return due;
        }
        for (name, sub) in &mut self.subscriptions {
            for (&seq, &attempts) in &sub.attempts {
                if attempts >= max && !sub.dead_letter_due.contains_key(&seq) {
                    sub.dead_letter_due
                        .insert(seq, DeadLetterReason::MaxAttempts);
                    due.push(DeadLetterDue {
                        subscription: name.clone(),
                        guid: self.messages[&seq].meta.guid,
                        seq,
                        attempts,
                        reason: DeadLetterReason::MaxAttempts,
                    });
                }
            }
        }
        due
    }

    /// Applies one committed command. `index` is the Raft log index of its entry.
    pub fn apply(&mut self, index: u64, decoded: &DecodedCommand) -> Applied {
        let mut applied = Applied {
            outcome: Outcome::Tick,
            expired: Vec::new(),
            dropped: Vec::new(),
            dead_letter_due: Vec::new(),
        };
        self.now_ms = self.now_ms.max(decoded.command.now_ms());
        self.expire(&mut applied);
        self.enforce_retention(&mut applied);
        self.dedup.evict(
            self.now_ms,
            self.config.dedup_window_ms,
            self.config.dedup_max_entries,
        );
        applied.outcome = self.apply_command(index, decoded, &mut applied);
        self.enforce_retention(&mut applied);
        self.check_invariants();
        applied
    }

    fn apply_command(
        &mut self,
        index: u64,
        decoded: &DecodedCommand,
        applied: &mut Applied,
    ) -> Outcome {
        match &decoded.command {
            Command::Put { messages, .. } => {
                assert_eq!(
                    messages.len(),
                    decoded.payload_offsets.len(),
                    "one payload offset per message"
                );
                let results = messages
                    .iter()
                    .zip(&decoded.payload_offsets)
                    .map(|(m, offset)| (m.guid, self.put(index, *offset, m)))
                    .collect();
                Outcome::Put(results)
            }
            Command::Confirm {
                subscription,
                guids,
                ..
            } => Outcome::Confirm {
                subscription: subscription.clone(),
                results: self.settle_all(subscription, guids, None),
            },
            Command::Settle {
                subscription,
                guids,
                reason,
                ..
            } => Outcome::Settle {
                subscription: subscription.clone(),
                reason: *reason,
                results: self.settle_all(subscription, guids, Some(*reason)),
            },
            Command::Purge { .. } => Outcome::Purge {
                removed: self.purge(),
            },
            Command::Tick { .. } => Outcome::Tick,
            Command::Attempts {
                subscription,
                bumps,
                ..
            } => Outcome::Attempts {
                subscription: subscription.clone(),
                updated: self.bump_attempts(subscription, bumps, applied),
            },
            Command::Subscribe { name, .. } => Outcome::Subscribe {
                name: name.clone(),
                outcome: self.subscribe(name),
            },
            Command::Unsubscribe { name, .. } => Outcome::Unsubscribe {
                name: name.clone(),
                outcome: self.unsubscribe(name),
            },
            Command::Configure { config, .. } => {
                let due = self.reconfigure(config.clone());
                applied.dead_letter_due.extend(due);
                Outcome::Configure
            }
        }
    }

    fn put(&mut self, index: u64, offset: u32, m: &PutMessage) -> PutOutcome {
        if let Some(original) = self.dedup.get(&m.guid) {
            self.counters.puts_duplicate += 1;
            return PutOutcome::Duplicate { original };
        }
        if self.seq_by_guid.contains_key(&m.guid) {
            // Forgotten by the history but still unsettled: still the same message.
            self.counters.puts_duplicate += 1;
            return PutOutcome::Duplicate {
                original: OriginalOutcome::Enqueued,
            };
        }
        let outcome = self.admit(index, offset, m);
        let original = match outcome {
            PutOutcome::Enqueued { .. } => OriginalOutcome::Enqueued,
            PutOutcome::QuotaExceeded => OriginalOutcome::QuotaExceeded,
            PutOutcome::TooLarge => OriginalOutcome::TooLarge,
            PutOutcome::InvalidTtl => OriginalOutcome::InvalidTtl,
            PutOutcome::Duplicate { .. } => unreachable!("admit never answers Duplicate"),
        };
        if original == OriginalOutcome::Enqueued {
            self.counters.puts_enqueued += 1;
        } else {
            self.counters.puts_rejected += 1;
        }
        // Rejections are remembered too: a retry must see the same answer.
        self.dedup.insert(m.guid, original, self.now_ms);
        self.dedup.evict(
            self.now_ms,
            self.config.dedup_window_ms,
            self.config.dedup_max_entries,
        );
        outcome
    }

    /// Checks limits and enqueues a new GUID.
    fn admit(&mut self, index: u64, offset: u32, m: &PutMessage) -> PutOutcome {
        let size_bytes = m.payload.len() as u64;
        if size_bytes > u64::from(self.config.max_message_bytes) {
            return PutOutcome::TooLarge;
        }
        let Some(ttl_ms) = self.effective_ttl_ms(m.ttl_ms) else {
            return PutOutcome::InvalidTtl;
        };
        if self.messages.len() as u64 >= self.config.max_messages
            || self.bytes + size_bytes > self.config.max_bytes
        {
            return PutOutcome::QuotaExceeded;
        }
        PutOutcome::Enqueued {
            seq: self.enqueue(index, offset, m, ttl_ms),
        }
    }

    /// The TTL a message gets (0 = none), or None if it asks for more than the maximum.
    fn effective_ttl_ms(&self, requested_ms: u64) -> Option<u64> {
        let ttl_ms = if requested_ms == 0 {
            self.config.default_ttl_ms
        } else {
            requested_ms
        };
        let max_ms = self.config.max_ttl_ms;
        match (max_ms, ttl_ms) {
            (0, ttl_ms) => Some(ttl_ms),
            (max_ms, 0) => Some(max_ms),
            (max_ms, ttl_ms) if ttl_ms > max_ms => None,
            (_, ttl_ms) => Some(ttl_ms),
        }
    }

    fn enqueue(&mut self, index: u64, offset: u32, m: &PutMessage, ttl_ms: u64) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let size_bytes = m.payload.len() as u32;
        let meta = MessageMeta {
            seq,
            guid: m.guid,
            location: Location {
                index,
                offset,
                len: size_bytes,
            },
            size_bytes,
            enqueued_ms: self.now_ms,
            expires_ms: (ttl_ms > 0).then(|| self.now_ms.saturating_add(ttl_ms)),
            key: m.key.clone(),
            dead_letter: m.dead_letter.clone(),
        };
        for sub in self.subscriptions.values_mut() {
            debug_assert!(sub.start_seq <= seq);
            sub.pending_msgs += 1;
            sub.pending_bytes += u64::from(size_bytes);
        }
        let needed_by = self.subscriptions.len() as u32;
        self.insert_message(Message { meta, needed_by });
        if needed_by == 0 {
            self.counters.unrouted += 1;
            self.release(seq);
        }
        seq
    }

    /// Adds a message and its derived indexes.
    fn insert_message(&mut self, message: Message) {
        let meta = &message.meta;
        if let Some(at_ms) = meta.expires_ms {
            if at_ms > self.now_ms {
                self.expiry.insert((at_ms, meta.seq));
            }
        }
        *self.live_per_index.entry(meta.location.index).or_default() += 1;
        self.bytes += u64::from(meta.size_bytes);
        let previous = self.seq_by_guid.insert(meta.guid, meta.seq);
        assert!(previous.is_none(), "a GUID names one unsettled message");
        self.messages.insert(meta.seq, message);
    }

    /// Settles `guids` for one subscription: CONFIRM (`reason` None) or Settle.
    fn settle_all(
        &mut self,
        subscription: &str,
        guids: &[Guid],
        reason: Option<SettleReason>,
    ) -> Vec<(Guid, ConfirmOutcome)> {
        guids
            .iter()
            .map(|guid| {
                let settled = self.settle_one(subscription, guid);
                if settled {
                    self.count_settlement(subscription, reason);
                }
                let outcome = if settled {
                    ConfirmOutcome::Settled
                } else {
                    ConfirmOutcome::Unknown
                };
                (*guid, outcome)
            })
            .collect()
    }

    fn count_settlement(&mut self, subscription: &str, reason: Option<SettleReason>) {
        let Some(sub) = self.subscriptions.get_mut(subscription) else {
            unreachable!("settled for an existing subscription");
        };
        match reason {
            None => {
                sub.counters.confirmed += 1;
                self.counters.confirms += 1;
            }
            Some(SettleReason::DeadLettered) => {
                sub.counters.dead_lettered += 1;
                self.counters.dead_lettered += 1;
            }
        }
    }

    /// Whether `guid` was unsettled for `subscription` (and now is settled).
    fn settle_one(&mut self, subscription: &str, guid: &Guid) -> bool {
        let Some(&seq) = self.seq_by_guid.get(guid) else {
            return false;
        };
        let Some(sub) = self.subscriptions.get_mut(subscription) else {
            return false;
        };
        if !sub.needs(seq) {
            return false;
        }
        let message = self
            .messages
            .get_mut(&seq)
            .expect("indexed message is live");
        sub.forget(seq, message.meta.size_bytes);
        sub.settled.insert(seq);
        message.needed_by -= 1;
        if message.needed_by == 0 {
            self.release(seq);
        }
        true
    }

    /// Removes a message nobody needs any more, and every trace of it.
    fn release(&mut self, seq: u64) -> MessageMeta {
        let message = self
            .messages
            .remove(&seq)
            .expect("released message is live");
        assert_eq!(message.needed_by, 0, "released only when nobody needs it");
        let meta = message.meta;
        self.seq_by_guid.remove(&meta.guid);
        if let Some(at_ms) = meta.expires_ms {
            self.expiry.remove(&(at_ms, seq));
        }
        let index = meta.location.index;
        let live = self
            .live_per_index
            .get_mut(&index)
            .expect("live message counted at its index");
        *live -= 1;
        if *live == 0 {
            self.live_per_index.remove(&index);
        }
        self.bytes -= u64::from(meta.size_bytes);
        for sub in self.subscriptions.values_mut() {
            sub.settled.remove(&seq);
        }
        meta
    }

    /// Removes a message for every subscription that still needs it.
    fn remove_for_all(&mut self, seq: u64, why: Removal) -> MessageMeta {
        let message = self
            .messages
            .get_mut(&seq)
            .expect("removed message is live");
        let size_bytes = message.meta.size_bytes;
        for sub in self.subscriptions.values_mut() {
            if sub.needs(seq) {
                sub.forget(seq, size_bytes);
                match why {
                    Removal::Expired => sub.counters.expired += 1,
                    Removal::Dropped => sub.counters.dropped += 1,
                    Removal::Purged => sub.counters.purged += 1,
                }
                message.needed_by -= 1;
            }
        }
        match why {
            Removal::Expired => self.counters.expired += 1,
            Removal::Dropped => self.counters.dropped += 1,
            Removal::Purged => self.counters.purged += 1,
        }
        self.release(seq)
    }

    fn purge(&mut self) -> u64 {
        let seqs: Vec<u64> = self.messages.keys().copied().collect();
        for &seq in &seqs {
            self.remove_for_all(seq, Removal::Purged);
        }
        seqs.len() as u64
    }

    /// Processes every message whose TTL passed by `now_ms`, in (expiry, seq) order.
    fn expire(&mut self, applied: &mut Applied) {
        while let Some(&(at_ms, seq)) = self.expiry.first() {
            if at_ms > self.now_ms {
                break;
            }
            self.expiry.remove(&(at_ms, seq));
            if self.config.dead_letter_expired {
                self.mark_expired_dead_letter(seq, applied);
            } else {
                let meta = self.remove_for_all(seq, Removal::Expired);
                applied.expired.push(meta.guid);
            }
        }
    }

    fn mark_expired_dead_letter(&mut self, seq: u64, applied: &mut Applied) {
        let guid = self.messages[&seq].meta.guid;
        for (name, sub) in &mut self.subscriptions {
            if !sub.needs(seq) || sub.dead_letter_due.contains_key(&seq) {
                continue;
            }
            sub.dead_letter_due.insert(seq, DeadLetterReason::Expired);
            applied.dead_letter_due.push(DeadLetterDue {
                subscription: name.clone(),
                guid,
                seq,
                attempts: sub.attempts.get(&seq).copied().unwrap_or(0),
                reason: DeadLetterReason::Expired,
            });
        }
    }

    /// Fan-out retention: drops the oldest messages beyond the age or byte limit.
    fn enforce_retention(&mut self, applied: &mut Applied) {
        if self.config.mode != QueueMode::Fanout {
            return;
        }
        let max_age_ms = self.config.retention_max_age_ms;
        let max_bytes = self.config.retention_max_bytes;
        while let Some(oldest) = self.messages.values().next() {
            let too_old =
                max_age_ms > 0 && oldest.meta.enqueued_ms.saturating_add(max_age_ms) <= self.now_ms;
            let too_big = max_bytes > 0 && self.bytes > max_bytes;
            if !too_old && !too_big {
                break;
            }
            let seq = oldest.meta.seq;
            let meta = self.remove_for_all(seq, Removal::Dropped);
            applied.dropped.push(meta.guid);
        }
    }

    fn bump_attempts(
        &mut self,
        subscription: &str,
        bumps: &[(Guid, u32)],
        applied: &mut Applied,
    ) -> u32 {
        let max = self.config.max_delivery_attempts;
        let Some(sub) = self.subscriptions.get_mut(subscription) else {
            return 0;
        };
        let mut updated = 0;
        for (guid, bump) in bumps {
            let Some(&seq) = self.seq_by_guid.get(guid) else {
                continue;
            };
            if !sub.needs(seq) || *bump == 0 {
                continue;
            }
            updated += 1;
            let attempts = sub.attempts.entry(seq).or_default();
            *attempts = attempts.saturating_add(*bump);
            let attempts = *attempts;
            if max > 0 && attempts >= max && !sub.dead_letter_due.contains_key(&seq) {
                sub.dead_letter_due
                    .insert(seq, DeadLetterReason::MaxAttempts);
                applied.dead_letter_due.push(DeadLetterDue {
                    subscription: subscription.to_owned(),
                    guid: *guid,
                    seq,
                    attempts,
                    reason: DeadLetterReason::MaxAttempts,
                });
            }
        }
        updated
    }

    fn subscribe(&mut self, name: &str) -> SubscribeOutcome {
        if self.config.mode != QueueMode::Fanout {
            return SubscribeOutcome::NotFanout;
        }
        if name.is_empty() || name.len() > MAX_SUBSCRIPTION_BYTES {
            return SubscribeOutcome::InvalidName;
        }
        if self.subscriptions.contains_key(name) {
            return SubscribeOutcome::AlreadyExists;
        }
        if self.subscriptions.len() as u64 >= u64::from(self.config.max_subscriptions) {
            return SubscribeOutcome::TooMany;
        }
        self.subscriptions
            .insert(name.to_owned(), Subscription::new(self.next_seq));
        SubscribeOutcome::Created
    }

    fn unsubscribe(&mut self, name: &str) -> UnsubscribeOutcome {
        if self.config.mode != QueueMode::Fanout {
            return UnsubscribeOutcome::Unknown;
        }
        let Some(sub) = self.subscriptions.remove(name) else {
            return UnsubscribeOutcome::Unknown;
        };
        let mut released_seqs = Vec::new();
        for (seq, message) in self.messages.range_mut(sub.start_seq..) {
            if sub.needs(*seq) {
                message.needed_by -= 1;
                if message.needed_by == 0 {
                    released_seqs.push(*seq);
                }
            }
        }
        for &seq in &released_seqs {
            self.release(seq);
        }
        UnsubscribeOutcome::Removed {
            released: released_seqs.len() as u64,
        }
    }

    /// Cheap consistency checks after every command; full ones in debug builds for
    /// small states (tests), where they cost nothing that matters.
    fn check_invariants(&self) {
        assert_eq!(self.messages.len(), self.seq_by_guid.len());
        if cfg!(debug_assertions) && self.messages.len() <= 64 {
            if let Err(what) = self.check_consistency() {
                panic!("inconsistent partition state: {what}");
            }
        }
    }

    /// Every derived count and per-subscription set agrees with the messages.
    fn check_consistency(&self) -> Result<(), &'static str> {
        let bytes: u64 = self
            .messages
            .values()
            .map(|m| u64::from(m.meta.size_bytes))
            .sum();
        if bytes != self.bytes {
            return Err("byte count");
        }
        for (seq, message) in &self.messages {
            let needed = self
                .subscriptions
                .values()
                .filter(|s| s.needs(*seq))
                .count();
            if needed as u32 != message.needed_by || needed == 0 {
                return Err("needed_by count");
            }
        }
        for sub in self.subscriptions.values() {
            let live = |seq: &u64| self.messages.contains_key(seq);
            let needed = |seq: &u64| live(seq) && sub.needs(*seq);
            let settled_ok = sub
                .settled
                .iter()
                .all(|seq| live(seq) && *seq >= sub.start_seq);
            if !settled_ok
                || !sub.attempts.keys().all(needed)
                || !sub.dead_letter_due.keys().all(needed)
            {
                return Err("subscription names a message it does not need");
            }
            let pending = self
                .messages
                .range(sub.start_seq..)
                .filter(|(seq, _)| sub.needs(**seq));
            let (msgs, bytes) = pending.fold((0, 0), |(n, b), (_, m)| {
                (n + 1, b + u64::from(m.meta.size_bytes))
            });
            if (msgs, bytes) != (sub.pending_msgs, sub.pending_bytes) {
                return Err("subscription pending counts");
            }
            if sub.start_seq > self.next_seq {
                return Err("subscription starts in the future");
            }
        }
        if self.config.mode == QueueMode::Work
            && (self.subscriptions.len() != 1
                || !self.subscriptions.contains_key(WORK_SUBSCRIPTION))
        {
            return Err("a work queue has exactly the \"\" subscription");
        }
        Ok(())
    }

    pub fn message(&self, guid: &Guid) -> Option<&MessageMeta> {
        self.message_by_seq(*self.seq_by_guid.get(guid)?)
    }

    pub fn message_by_seq(&self, seq: u64) -> Option<&MessageMeta> {
        self.messages.get(&seq).map(|m| &m.meta)
    }

    /// Unsettled messages (needed by at least one subscription), in seq order.
    pub fn unsettled(&self) -> impl Iterator<Item = &MessageMeta> {
        self.messages.values().map(|m| &m.meta)
    }

    /// Messages `subscription` has not settled, in seq order (empty if it does not exist).
    pub fn pending(&self, subscription: &str) -> impl Iterator<Item = &MessageMeta> {
        let sub = self.subscriptions.get(subscription);
        let start_seq = sub.map_or(u64::MAX, |s| s.start_seq);
        self.messages
            .range(start_seq..)
            .filter(move |(seq, _)| sub.is_some_and(|s| s.needs(**seq)))
            .map(|(_, m)| &m.meta)
    }

    /// Whether `subscription` still needs message `seq` (unsettled for it).
    pub fn is_pending(&self, subscription: &str, seq: u64) -> bool {
        self.messages.contains_key(&seq)
            && self
                .subscriptions
                .get(subscription)
                .is_some_and(|s| s.needs(seq))
    }

    /// The message if it may be delivered to `subscription` at `now_ms`: unsettled for
    /// it, not dead-letter due, not expired by `now_ms`.
    pub fn deliverable(&self, subscription: &str, seq: u64, now_ms: u64) -> Option<&MessageMeta> {
        let sub = self.subscriptions.get(subscription)?;
        let meta = &self.messages.get(&seq)?.meta;
        let ok = sub.needs(seq)
            && !sub.dead_letter_due.contains_key(&seq)
            && !matches!(meta.expires_ms, Some(at_ms) if at_ms <= now_ms);
        ok.then_some(meta)
    }

    /// Replicated failed delivery attempts of message `seq` for `subscription`.
    pub fn attempts(&self, subscription: &str, seq: u64) -> u32 {
        self.subscriptions
            .get(subscription)
            .and_then(|s| s.attempts.get(&seq).copied())
            .unwrap_or(0)
    }

    /// Every message waiting for `Settle { DeadLettered }`, by subscription then seq.
    /// A new leader finishes these (they were reported once, to the old leader perhaps).
    pub fn dead_letters_due(&self) -> Vec<DeadLetterDue> {
        let mut out = Vec::new();
        for (name, sub) in &self.subscriptions {
            for (&seq, &reason) in &sub.dead_letter_due {
                out.push(DeadLetterDue {
                    subscription: name.clone(),
                    guid: self.messages[&seq].meta.guid,
                    seq,
                    attempts: sub.attempts.get(&seq).copied().unwrap_or(0),
                    reason,
                });
            }
        }
        out
    }

    /// Subscription names in order ("" alone for a work queue).
    pub fn subscriptions(&self) -> impl Iterator<Item = &str> {
        self.subscriptions.keys().map(String::as_str)
    }

    /// State time: the largest `now_ms` of the commands applied so far.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// When the next message expires (command time), if any. The leader proposes a
    /// `Tick` then, so expiry happens without traffic.
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.expiry.first().map(|(at_ms, _)| *at_ms)
    }

    /// When fan-out retention next drops a message by age, if it can.
    pub fn next_retention_ms(&self) -> Option<u64> {
        let max_age_ms = self.config.retention_max_age_ms;
        if self.config.mode != QueueMode::Fanout || max_age_ms == 0 {
            return None;
        }
        let oldest = self.messages.values().next()?;
        Some(oldest.meta.enqueued_ms.saturating_add(max_age_ms))
    }

    /// Smallest log index still referenced by an unsettled message: the log may release
    /// segments below it.
    pub fn min_live_index(&self) -> Option<u64> {
        self.live_per_index.keys().next().copied()
    }

    pub fn stats(&self) -> PartitionStats {
        let c = &self.counters;
        PartitionStats {
            depth: self.messages.len() as u64,
            bytes: self.bytes,
            oldest_enqueued_ms: self.messages.values().next().map(|m| m.meta.enqueued_ms),
            puts_enqueued: c.puts_enqueued,
            puts_duplicate: c.puts_duplicate,
            puts_rejected: c.puts_rejected,
            confirms: c.confirms,
            purged: c.purged,
            expired: c.expired,
            dead_lettered: c.dead_lettered,
            dropped: c.dropped,
            unrouted: c.unrouted,
            dead_letter_due: self
                .subscriptions
                .values()
                .map(|s| s.dead_letter_due.len() as u64)
                .sum(),
            subscriptions: self.subscriptions.len() as u64,
            dedup_entries: self.dedup.len() as u64,
        }
    }

    /// Replicated figures of one subscription (leader-local ones are 0).
    pub fn subscription_stats(&self, name: &str) -> Option<SubscriptionStats> {
        let sub = self.subscriptions.get(name)?;
        let oldest = self.pending(name).next();
        let lag = oldest.map_or(0, |m| self.next_seq - m.seq);
        Some(SubscriptionStats {
            name: name.to_owned(),
            depth: sub.pending_msgs,
            bytes: sub.pending_bytes,
            oldest_enqueued_ms: oldest.map(|m| m.enqueued_ms),
            lag,
            dead_letter_due: sub.dead_letter_due.len() as u64,
            confirmed: sub.counters.confirmed,
            dead_lettered: sub.counters.dead_lettered,
            expired: sub.counters.expired,
            dropped: sub.counters.dropped,
            purged: sub.counters.purged,
            in_flight: 0,
            delayed: 0,
            available: 0,
        })
    }
}
