//! The leader-local dispatcher of one subscription: which consumer holds which message
//! right now, visibility deadlines, NACK delays, failed-attempt counts not yet
//! replicated.
//!
//! Contract:
//! - Not replicated (at-least-once allows it): after a failover the new leader calls
//!   [`Dispatcher::rebuild`] and every unsettled, deliverable message is available again.
//! - A message is held by at most one consumer at a time; a consumer never holds more
//!   than its [`FlowLimits`], except one message larger than its byte limit when it
//!   holds nothing (so a big message is never stuck).
//! - Available messages go out lowest seq first, so first deliveries follow commit
//!   order; redeliveries fall back into their seq place, ahead of newer messages.
//! - A delivery that ends without CONFIRM (visibility timeout, NACK, consumer removed)
//!   is a failed attempt: the next delivery has `attempt + 1`, and the bump is queued
//!   for replication ([`Dispatcher::take_attempt_updates`] → `Command::Attempts`). At
//!   `max_delivery_attempts` the message is parked (not delivered) until the state
//!   machine reports it dead-letter due.
//! - Pure, deterministic and single-threaded: time is passed in; all maps are ordered.
//! - Bounded: it tracks only messages unsettled for its subscription in the state.
//!
//! Each tracked message is in exactly one of: available, delayed, in flight, parked.

use crate::state::PutOutcome;
use crate::state::{Applied, ConfirmOutcome, Location, MessageMeta, Outcome, PartitionState};
use crate::state::{SubscriptionStats, UnsubscribeOutcome};
use crate::Guid;
use std::collections::{BTreeMap, BTreeSet};

pub type ConsumerId = u64;

/// Per-consumer flow control.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowLimits {
    pub max_unconfirmed_msgs: u32,
    pub max_unconfirmed_bytes: u64,
}

/// One PUSH to make: the caller reads the payload at `location`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub consumer: ConsumerId,
    pub guid: Guid,
    pub seq: u64,
    /// 1 on first delivery; failed attempts so far + 1.
    pub attempt: u32,
    pub location: Location,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DispatchError {
    #[error("the consumer does not hold this message")]
    NotHeld,
}

#[derive(Debug, Default)]
struct ConsumerState {
    limits: Option<FlowLimits>,
    held_bytes: u64,
    held: BTreeSet<Guid>,
}

impl ConsumerState {
    fn has_room(&self, size_bytes: u32) -> bool {
        let Some(limits) = self.limits else {
            return false;
        };
        let held_msgs = self.held.len() as u64;
        let fits_bytes = self.held_bytes + u64::from(size_bytes) <= limits.max_unconfirmed_bytes
            || held_msgs == 0;
        held_msgs < u64::from(limits.max_unconfirmed_msgs) && fits_bytes
    }
}

/// A message PUSHed to a consumer and not yet confirmed.
#[derive(Debug, Clone, Copy)]
struct Held {
    consumer: ConsumerId,
    seq: u64,
    size_bytes: u32,
    /// When it goes back if not confirmed (visibility timeout); None = never.
    deadline_ms: Option<u64>,
}

#[derive(Debug, Default)]
pub struct Dispatcher {
    subscription: String,
    /// Seq of every tracked message.
    tracked: BTreeMap<Guid, u64>,
    /// Ready to deliver, by seq.
    available: BTreeSet<u64>,
    /// NACKed with a delay: (ready_ms, seq), and the reverse index.
    delayed: BTreeSet<(u64, u64)>,
    delayed_ready_ms: BTreeMap<u64, u64>,
    inflight: BTreeMap<Guid, Held>,
    /// Visibility deadlines of held messages: (deadline_ms, guid).
    deadlines: BTreeSet<(u64, Guid)>,
    /// Not deliverable until the state machine resolves them (dead-letter due, expired).
    parked: BTreeSet<u64>,
    /// Failed attempts per seq: the replicated count at tracking time plus ours.
    failures: BTreeMap<u64, u32>,
    /// Failed attempts not yet handed out for replication.
    pending_bumps: BTreeMap<Guid, u32>,
    consumers: BTreeMap<ConsumerId, ConsumerState>,
    /// Round robin: the consumer served last.
    last_served: Option<ConsumerId>,
    /// Copied from the state's config whenever the state is seen.
    visibility_timeout_ms: u64,
    max_delivery_attempts: u32,
}

impl Dispatcher {
    /// The dispatcher of a work queue (its implicit subscription "").
    pub fn new() -> Self {
        Self::default()
    }

    /// The dispatcher of one fan-out subscription.
    pub fn for_subscription(name: &str) -> Self {
        Dispatcher {
            subscription: name.to_owned(),
            ..Self::default()
        }
    }

    pub fn subscription(&self) -> &str {
        &self.subscription
    }

    fn refresh_config(&mut self, state: &PartitionState) {
        self.visibility_timeout_ms = state.config().visibility_timeout_ms;
        let max = state.config().max_delivery_attempts;
        if max != self.max_delivery_attempts {
            self.max_delivery_attempts = max;
            // Parked at the old limit may be deliverable under the new one: `poll`
            // re-parks whatever still is not.
            self.available.append(&mut self.parked);
        }
    }

    /// After restart or becoming leader: every deliverable unsettled message of `state`
    /// is available, in seq order. Consumers stay, holding nothing; unreplicated
    /// attempt bumps are dropped (they were the old term's).
    pub fn rebuild(&mut self, state: &PartitionState) {
        self.refresh_config(state);
        self.tracked.clear();
        self.available.clear();
        self.delayed.clear();
        self.delayed_ready_ms.clear();
        self.inflight.clear();
        self.deadlines.clear();
        self.parked.clear();
        self.failures.clear();
        self.pending_bumps.clear();
        for c in self.consumers.values_mut() {
            c.held.clear();
            c.held_bytes = 0;
        }
        let now_ms = state.now_ms();
        for meta in state.pending(&self.subscription) {
            if state
                .deliverable(&self.subscription, meta.seq, now_ms)
                .is_some()
            {
                self.track(state, meta.guid, meta.seq);
            }
        }
    }

    fn track(&mut self, state: &PartitionState, guid: Guid, seq: u64) {
        let previous = self.tracked.insert(guid, seq);
        debug_assert!(previous.is_none(), "tracked once");
        let failures = state.attempts(&self.subscription, seq);
        if failures > 0 {
            self.failures.insert(seq, failures);
        }
        if self.at_max_attempts(seq) {
            self.parked.insert(seq);
        } else {
            self.available.insert(seq);
        }
    }

    /// Forgets a message (settled, expired, dropped, purged, dead-letter due).
    fn untrack(&mut self, guid: &Guid) {
        let Some(seq) = self.tracked.remove(guid) else {
            return;
        };
        self.available.remove(&seq);
        if let Some(ready_ms) = self.delayed_ready_ms.remove(&seq) {
            self.delayed.remove(&(ready_ms, seq));
        }
        self.take_inflight(guid);
        self.parked.remove(&seq);
        self.failures.remove(&seq);
        self.pending_bumps.remove(guid);
    }

    fn untrack_all(&mut self) {
        let guids: Vec<Guid> = self.tracked.keys().copied().collect();
        for guid in &guids {
            self.untrack(guid);
        }
    }

    /// Follows one applied command: enqueued → available; settled, expired, dropped,
    /// purged, dead-letter due → forgotten.
    pub fn on_applied(&mut self, state: &PartitionState, applied: &Applied) {
        self.refresh_config(state);
        for guid in applied.expired.iter().chain(&applied.dropped) {
            self.untrack(guid);
        }
        for due in &applied.dead_letter_due {
            if due.subscription == self.subscription {
                self.untrack(&due.guid);
            }
        }
        match &applied.outcome {
            Outcome::Put(results) => {
                for (guid, outcome) in results {
                    if let PutOutcome::Enqueued { seq } = outcome {
                        if state.is_pending(&self.subscription, *seq) {
                            self.track(state, *guid, *seq);
                        }
                    }
                }
            }
            Outcome::Confirm {
                subscription,
                results,
            }
            | Outcome::Settle {
                subscription,
                results,
                ..
            } if *subscription == self.subscription => {
                for (guid, outcome) in results {
                    if *outcome == ConfirmOutcome::Settled {
                        self.untrack(guid);
                    }
                }
            }
            Outcome::Purge { .. } => self.untrack_all(),
            Outcome::Unsubscribe {
                name,
                outcome: UnsubscribeOutcome::Removed { .. },
            } if *name == self.subscription => self.untrack_all(),
            _ => {}
        }
    }

    /// Adds a consumer (or replaces its limits).
    pub fn add_consumer(&mut self, id: ConsumerId, limits: FlowLimits) {
        self.consumers.entry(id).or_default().limits = Some(limits);
    }

    /// New limits apply to future deliveries; nothing held is taken back.
    pub fn set_limits(&mut self, id: ConsumerId, limits: FlowLimits) {
        if let Some(c) = self.consumers.get_mut(&id) {
            c.limits = Some(limits);
        }
    }

    /// Its unconfirmed messages become available again (in seq order, ahead of newer
    /// ones) with attempt + 1.
    pub fn remove_consumer(&mut self, id: ConsumerId) {
        let Some(c) = self.consumers.remove(&id) else {
            return;
        };
        for guid in &c.held {
            let held = self
                .inflight
                .remove(guid)
                .expect("held message is in flight");
            if let Some(deadline_ms) = held.deadline_ms {
                self.deadlines.remove(&(deadline_ms, *guid));
            }
            self.fail(*guid, held.seq, None);
        }
        if self.last_served == Some(id) {
            self.last_served = None;
        }
    }

    /// NACK: the consumer gives a held message back, for redelivery now (`delay_ms` 0)
    /// or once `now_ms + delay_ms` has passed. Counts as a failed attempt.
    pub fn nack(
        &mut self,
        consumer: ConsumerId,
        guid: &Guid,
        now_ms: u64,
        delay_ms: u64,
    ) -> Result<(), DispatchError> {
        self.check_confirm(consumer, guid)?;
        let held = self.take_inflight(guid).expect("checked above");
        let ready_ms = (delay_ms > 0).then(|| now_ms.saturating_add(delay_ms));
        self.fail(*guid, held.seq, ready_ms);
        Ok(())
    }

    /// NACK without delay.
    pub fn release(&mut self, consumer: ConsumerId, guid: &Guid) -> Result<(), DispatchError> {
        self.nack(consumer, guid, 0, 0)
    }

    /// Pushes a held message's visibility deadline to `now_ms + extra_ms` (never earlier
    /// than it was). No effect when visibility timeouts are off.
    pub fn extend(
        &mut self,
        consumer: ConsumerId,
        guid: &Guid,
        now_ms: u64,
        extra_ms: u64,
    ) -> Result<(), DispatchError> {
        self.check_confirm(consumer, guid)?;
        let held = self.inflight.get_mut(guid).expect("checked above");
        if let Some(old_ms) = held.deadline_ms {
            let new_ms = old_ms.max(now_ms.saturating_add(extra_ms));
            held.deadline_ms = Some(new_ms);
            self.deadlines.remove(&(old_ms, *guid));
            self.deadlines.insert((new_ms, *guid));
        }
        Ok(())
    }

    /// Check a CONFIRM (or NACK, extend) before proposing it: Ok if `consumer` holds `guid`.
    pub fn check_confirm(&self, consumer: ConsumerId, guid: &Guid) -> Result<(), DispatchError> {
        match self.inflight.get(guid) {
            Some(held) if held.consumer == consumer => Ok(()),
            _ => Err(DispatchError::NotHeld),
        }
    }

    /// A CONFIRM resent after a failover: the consumer got the message from the
    /// previous leader, which died before committing the CONFIRM. Accepted if the
    /// consumer holds it here too, or if no one does and it is ready to go (settling
    /// it spares a duplicate delivery).
    pub fn check_resent_confirm(
        &self,
        consumer: ConsumerId,
        guid: &Guid,
    ) -> Result<(), DispatchError> {
        if self.inflight.contains_key(guid) || !self.consumers.contains_key(&consumer) {
            return self.check_confirm(consumer, guid);
        }
        match self.tracked.get(guid) {
            Some(seq) if self.available.contains(seq) => Ok(()),
            _ => Err(DispatchError::NotHeld),
        }
    }

    /// Failed attempts to replicate, as `Command::Attempts { bumps }` for this
    /// dispatcher's subscription, in GUID order. Empties the queue.
    pub fn take_attempt_updates(&mut self) -> Vec<(Guid, u32)> {
        std::mem::take(&mut self.pending_bumps)
            .into_iter()
            .collect()
    }

    /// Whether attempt bumps wait for [`Self::take_attempt_updates`].
    pub fn has_attempt_updates(&self) -> bool {
        !self.pending_bumps.is_empty()
    }

    fn take_inflight(&mut self, guid: &Guid) -> Option<Held> {
        let held = self.inflight.remove(guid)?;
        if let Some(deadline_ms) = held.deadline_ms {
            self.deadlines.remove(&(deadline_ms, *guid));
        }
        let c = self
            .consumers
            .get_mut(&held.consumer)
            .expect("the holder is a consumer");
        c.held.remove(guid);
        c.held_bytes -= u64::from(held.size_bytes);
        Some(held)
    }

    fn at_max_attempts(&self, seq: u64) -> bool {
        let max = self.max_delivery_attempts;
        max > 0 && self.failures.get(&seq).copied().unwrap_or(0) >= max
    }

    /// A delivery ended without CONFIRM: count it, then make the message available
    /// (now or at `ready_ms`) or park it at the attempt limit.
    fn fail(&mut self, guid: Guid, seq: u64, ready_ms: Option<u64>) {
        let failures = self.failures.entry(seq).or_default();
        *failures = failures.saturating_add(1);
        let bump = self.pending_bumps.entry(guid).or_default();
        *bump = bump.saturating_add(1);
        if self.at_max_attempts(seq) {
            self.parked.insert(seq);
        } else if let Some(ready_ms) = ready_ms {
            self.delayed.insert((ready_ms, seq));
            self.delayed_ready_ms.insert(seq, ready_ms);
        } else {
            self.available.insert(seq);
        }
    }

    /// The earliest time a timer (visibility deadline or NACK delay) fires, if any.
    pub fn next_timer_ms(&self) -> Option<u64> {
        let deadline = self.deadlines.first().map(|(at_ms, _)| *at_ms);
        let delayed = self.delayed.first().map(|(at_ms, _)| *at_ms);
        match (deadline, delayed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Moves timed-out deliveries and due NACK delays back.
    fn fire_timers(&mut self, now_ms: u64) {
        while let Some(&(at_ms, guid)) = self.deadlines.first() {
            if at_ms > now_ms {
                break;
            }
            let held = self
                .take_inflight(&guid)
                .expect("a deadline belongs to a delivery");
            self.fail(guid, held.seq, None);
        }
        while let Some(&(at_ms, seq)) = self.delayed.first() {
            if at_ms > now_ms {
                break;
            }
            self.delayed.remove(&(at_ms, seq));
            self.delayed_ready_ms.remove(&seq);
            self.available.insert(seq);
        }
    }

    /// Fires due timers, then hands out up to `max` messages, lowest seq first, round
    /// robin over consumers with room. Skips (parks) what the state says is not
    /// deliverable at `now_ms` (expired, dead-letter due).
    pub fn poll(&mut self, state: &PartitionState, now_ms: u64, max: usize) -> Vec<Delivery> {
        self.refresh_config(state);
        self.fire_timers(now_ms);
        let mut out = Vec::new();
        while out.len() < max {
            let Some(&seq) = self.available.first() else {
                break;
            };
            let deliverable = state.deliverable(&self.subscription, seq, now_ms);
            let Some(meta) = deliverable.filter(|_| !self.at_max_attempts(seq)) else {
                self.available.remove(&seq);
                self.parked.insert(seq);
                continue;
            };
            let Some(consumer) = self.next_consumer_with_room(meta.size_bytes) else {
                break;
            };
            self.available.remove(&seq);
            out.push(self.deliver(consumer, meta, now_ms));
        }
        out
    }

    fn deliver(&mut self, consumer: ConsumerId, meta: &MessageMeta, now_ms: u64) -> Delivery {
        let (guid, seq, size_bytes) = (meta.guid, meta.seq, meta.size_bytes);
        debug_assert_eq!(self.tracked.get(&guid), Some(&seq));
        let deadline_ms = (self.visibility_timeout_ms > 0)
            .then(|| now_ms.saturating_add(self.visibility_timeout_ms));
        if let Some(deadline_ms) = deadline_ms {
            self.deadlines.insert((deadline_ms, guid));
        }
        let previous = self.inflight.insert(
            guid,
            Held {
                consumer,
                seq,
                size_bytes,
                deadline_ms,
            },
        );
        assert!(previous.is_none(), "never held twice");
        let c = self
            .consumers
            .get_mut(&consumer)
            .expect("chosen consumer exists");
        c.held.insert(guid);
        c.held_bytes += u64::from(size_bytes);
        self.last_served = Some(consumer);
        Delivery {
            consumer,
            guid,
            seq,
            attempt: self
                .failures
                .get(&seq)
                .copied()
                .unwrap_or(0)
                .saturating_add(1),
            location: meta.location,
        }
    }

    /// The first consumer after the last one served that has room for `size_bytes`.
    fn next_consumer_with_room(&self, size_bytes: u32) -> Option<ConsumerId> {
        let start = self.last_served.map_or(0, |last| last.wrapping_add(1));
        self.consumers
            .range(start..)
            .chain(self.consumers.range(..start))
            .find(|(_, c)| c.has_room(size_bytes))
            .map(|(id, _)| *id)
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    pub fn available(&self) -> usize {
        self.available.len()
    }

    /// NACKed with a delay that has not passed yet.
    pub fn delayed(&self) -> usize {
        self.delayed.len()
    }

    /// Waiting for the state machine to dead-letter or expire them.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    pub fn consumer_count(&self) -> usize {
        self.consumers.len()
    }

    /// Messages a consumer holds now.
    pub fn held_by(&self, consumer: ConsumerId) -> usize {
        self.consumers.get(&consumer).map_or(0, |c| c.held.len())
    }

    /// Messages tracked (available, delayed, in flight or parked): at most the
    /// subscription's unsettled messages in the state.
    pub fn tracked(&self) -> usize {
        self.tracked.len()
    }

    /// Payload bytes a consumer holds now.
    pub fn held_bytes(&self, consumer: ConsumerId) -> u64 {
        self.consumers.get(&consumer).map_or(0, |c| c.held_bytes)
    }

    /// The consumer holding `guid`, if any.
    pub fn holder(&self, guid: &Guid) -> Option<ConsumerId> {
        self.inflight.get(guid).map(|h| h.consumer)
    }

    /// The subscription's replicated figures plus this dispatcher's in flight, delayed
    /// and available counts.
    pub fn subscription_stats(&self, state: &PartitionState) -> Option<SubscriptionStats> {
        let mut stats = state.subscription_stats(&self.subscription)?;
        stats.in_flight = self.inflight.len() as u64;
        stats.delayed = self.delayed.len() as u64;
        stats.available = self.available.len() as u64;
        Some(stats)
    }

    /// Internal consistency (tests and debug checks).
    pub fn check_invariants(&self) {
        let parts =
            self.available.len() + self.delayed.len() + self.inflight.len() + self.parked.len();
        assert_eq!(
            parts,
            self.tracked.len(),
            "each tracked message in one place"
        );
        assert_eq!(self.delayed.len(), self.delayed_ready_ms.len());
        let held: usize = self.consumers.values().map(|c| c.held.len()).sum();
        assert_eq!(held, self.inflight.len());
        for (guid, h) in &self.inflight {
            assert!(self.consumers[&h.consumer].held.contains(guid));
            assert_eq!(self.tracked.get(guid), Some(&h.seq));
        }
        for guid in self.pending_bumps.keys() {
            assert!(
                self.tracked.contains_key(guid),
                "bumps only for tracked messages"
            );
        }
    }
}
