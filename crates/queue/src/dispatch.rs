//! The leader-local dispatcher: which consumer holds which message right now.
//!
//! Not replicated (at-least-once allows it): after a failover the new leader rebuilds
//! it with every unsettled message available. Pure and single-threaded; its size is
//! bounded by the partition's unsettled messages, which quotas bound.

use crate::state::{Applied, ConfirmOutcome, Location, PartitionState, PutOutcome};
use crate::Guid;
use std::collections::{BTreeMap, BTreeSet, HashMap};

pub type ConsumerId = u64;

/// Per-consumer flow control.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowLimits {
    pub max_unconfirmed_msgs: u32,
    pub max_unconfirmed_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub consumer: ConsumerId,
    pub guid: Guid,
    pub seq: u64,
    /// 1 on first delivery.
    pub attempt: u32,
    pub location: Location,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DispatchError {
    #[error("the consumer does not hold this message")]
    NotHeld,
}

#[derive(Debug, Default)]
struct ConsumerState {
    limits: Option<FlowLimits>,
    held_msgs: u32,
    held_bytes: u64,
    held: BTreeSet<Guid>,
}

/// A message PUSHed to a consumer and not yet confirmed.
#[derive(Debug, Clone, Copy)]
struct Held {
    consumer: ConsumerId,
    seq: u64,
    bytes: u32,
    /// When it goes back to `available` if not confirmed (visibility timeout).
    deadline_ms: Option<u64>,
}

#[derive(Debug, Default)]
pub struct Dispatcher {
    /// Seqs ready to deliver, in commit order (redeliveries fall back into place).
    available: BTreeSet<u64>,
    /// NACKed with a delay: (ready at, seq).
    delayed: BTreeSet<(u64, u64)>,
    /// Deliveries made so far per message (for the attempt count).
    attempts: HashMap<u64, u32>,
    inflight: HashMap<Guid, Held>,
    /// Visibility deadlines of held messages: (deadline, guid).
    deadlines: BTreeSet<(u64, Guid)>,
    consumers: BTreeMap<ConsumerId, ConsumerState>,
    /// Round robin: the consumer served last.
    last_served: Option<ConsumerId>,
    /// 0 = a delivery stays with its consumer until confirmed or the consumer leaves.
    visibility_timeout_ms: u64,
}

impl Dispatcher {
    pub fn new() -> Self {
        Self::default()
    }

    /// A PUSHed message not confirmed within this time goes back for redelivery (0 = never).
    pub fn set_visibility_timeout(&mut self, ms: u64) {
        self.visibility_timeout_ms = ms;
    }

    /// Every unsettled message becomes available; consumers stay, holding nothing.
    pub fn rebuild(&mut self, state: &PartitionState) {
        self.available = state.unsettled().map(|m| m.seq).collect();
        self.delayed.clear();
        self.attempts.clear();
        self.inflight.clear();
        self.deadlines.clear();
        for c in self.consumers.values_mut() {
            c.held_msgs = 0;
            c.held_bytes = 0;
            c.held.clear();
        }
    }

    pub fn on_applied(&mut self, _state: &PartitionState, applied: &Applied) {
        match applied {
            Applied::Put(outcomes) => {
                for (_, o) in outcomes {
                    if let PutOutcome::Enqueued { seq } = o {
                        self.available.insert(*seq);
                    }
                }
            }
            Applied::Confirm(outcomes) => {
                for (guid, o) in outcomes {
                    if *o == ConfirmOutcome::Settled {
                        if let Some(held) = self.take_inflight(guid) {
                            self.attempts.remove(&held.seq);
                        }
                    }
                }
            }
            Applied::Purge { .. } => {
                self.available.clear();
                self.delayed.clear();
                self.attempts.clear();
                let guids: Vec<Guid> = self.inflight.keys().copied().collect();
                for g in guids {
                    self.take_inflight(&g);
                }
            }
            Applied::Tick => {}
        }
    }

    pub fn add_consumer(&mut self, id: ConsumerId, limits: FlowLimits) {
        self.consumers.entry(id).or_default().limits = Some(limits);
    }

    pub fn set_limits(&mut self, id: ConsumerId, limits: FlowLimits) {
        if let Some(c) = self.consumers.get_mut(&id) {
            c.limits = Some(limits);
        }
    }

    /// Its unconfirmed messages become available again; the next delivery counts a new attempt.
    pub fn remove_consumer(&mut self, id: ConsumerId) {
        let Some(c) = self.consumers.get(&id) else {
            return;
        };
        let held: Vec<Guid> = c.held.iter().copied().collect();
        for guid in held {
            if let Some(h) = self.take_inflight(&guid) {
                self.available.insert(h.seq);
            }
        }
        self.consumers.remove(&id);
    }

    /// Gives one held message back for redelivery now (NACK without delay).
    pub fn release(&mut self, consumer: ConsumerId, guid: &Guid) {
        let _ = self.nack(consumer, guid, 0, 0);
    }

    /// NACK: gives a held message back, for redelivery now (`delay_ms` 0) or after the delay.
    pub fn nack(
        &mut self,
        consumer: ConsumerId,
        guid: &Guid,
        now_ms: u64,
        delay_ms: u64,
    ) -> Result<(), DispatchError> {
        self.check_confirm(consumer, guid)?;
        if let Some(h) = self.take_inflight(guid) {
            if delay_ms == 0 {
                self.available.insert(h.seq);
            } else {
                self.delayed
                    .insert((now_ms.saturating_add(delay_ms), h.seq));
            }
        }
        Ok(())
    }

    /// Extends the visibility deadline of a held message to `now_ms + extra_ms` (never shortens it).
    pub fn extend(
        &mut self,
        consumer: ConsumerId,
        guid: &Guid,
        now_ms: u64,
        extra_ms: u64,
    ) -> Result<(), DispatchError> {
        self.check_confirm(consumer, guid)?;
        let Some(h) = self.inflight.get_mut(guid) else {
            return Err(DispatchError::NotHeld);
        };
        if let Some(old) = h.deadline_ms {
            let new = old.max(now_ms.saturating_add(extra_ms));
            h.deadline_ms = Some(new);
            self.deadlines.remove(&(old, *guid));
            self.deadlines.insert((new, *guid));
        }
        Ok(())
    }

    fn take_inflight(&mut self, guid: &Guid) -> Option<Held> {
        let h = self.inflight.remove(guid)?;
        if let Some(d) = h.deadline_ms {
            self.deadlines.remove(&(d, *guid));
        }
        if let Some(cs) = self.consumers.get_mut(&h.consumer) {
            cs.held.remove(guid);
            cs.held_msgs -= 1;
            cs.held_bytes -= u64::from(h.bytes);
        }
        Some(h)
    }

    pub fn check_confirm(&self, consumer: ConsumerId, guid: &Guid) -> Result<(), DispatchError> {
        match self.inflight.get(guid) {
            Some(h) if h.consumer == consumer => Ok(()),
            _ => Err(DispatchError::NotHeld),
        }
    }

    /// The earliest time a timer (visibility deadline or NACK delay) fires, if any.
    pub fn next_timer_ms(&self) -> Option<u64> {
        let d = self.deadlines.first().map(|(t, _)| *t);
        let n = self.delayed.first().map(|(t, _)| *t);
        match (d, n) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Moves timed-out deliveries and due NACK delays back to `available`.
    fn fire_timers(&mut self, now_ms: u64) {
        while let Some(&(at, guid)) = self.deadlines.first() {
            if at > now_ms {
                break;
            }
            match self.take_inflight(&guid) {
                Some(h) => {
                    self.available.insert(h.seq);
                }
                None => {
                    self.deadlines.remove(&(at, guid));
                }
            }
        }
        while let Some(&(at, seq)) = self.delayed.first() {
            if at > now_ms {
                break;
            }
            self.delayed.remove(&(at, seq));
            self.available.insert(seq);
        }
    }

    /// Hands out up to `max` messages, round robin over consumers with room, in commit order.
    pub fn poll(&mut self, state: &PartitionState, now_ms: u64, max: usize) -> Vec<Delivery> {
        self.fire_timers(now_ms);
        let mut out = Vec::new();
        while out.len() < max {
            let Some(&seq) = self.available.first() else {
                break;
            };
            let Some(meta) = state.message_by_seq(seq) else {
                // Settled or expired since it became available.
                self.available.remove(&seq);
                self.attempts.remove(&seq);
                continue;
            };
            if meta.expires_ms.is_some_and(|at| at <= now_ms) {
                self.available.remove(&seq);
                continue; // expired: never delivered; the state machine removes it on its next apply
            }
            let Some(consumer) = self.next_consumer_with_room(meta.size_bytes) else {
                break;
            };
            self.available.remove(&seq);
            let attempt = self.attempts.entry(seq).or_default();
            *attempt += 1;
            let attempt = *attempt;
            let cs = self.consumers.entry(consumer).or_default();
            cs.held_msgs += 1;
            cs.held_bytes += u64::from(meta.size_bytes);
            cs.held.insert(meta.guid);
            let deadline_ms = (self.visibility_timeout_ms > 0)
                .then(|| now_ms.saturating_add(self.visibility_timeout_ms));
            if let Some(d) = deadline_ms {
                self.deadlines.insert((d, meta.guid));
            }
            self.inflight.insert(
                meta.guid,
                Held {
                    consumer,
                    seq,
                    bytes: meta.size_bytes,
                    deadline_ms,
                },
            );
            self.last_served = Some(consumer);
            out.push(Delivery {
                consumer,
                guid: meta.guid,
                seq,
                attempt,
                location: meta.location,
            });
        }
        out
    }

    fn next_consumer_with_room(&self, size_bytes: u32) -> Option<ConsumerId> {
        let after = self.last_served.unwrap_or(0);
        let order = self
            .consumers
            .range(after + 1..)
            .chain(self.consumers.range(..=after));
        for (id, c) in order {
            let Some(l) = c.limits else { continue };
            let fits_bytes =
                c.held_bytes + u64::from(size_bytes) <= l.max_unconfirmed_bytes || c.held_msgs == 0;
            if c.held_msgs < l.max_unconfirmed_msgs && fits_bytes {
                return Some(*id);
            }
        }
        None
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    pub fn available(&self) -> usize {
        self.available.len()
    }

    /// Messages NACKed with a delay that has not passed yet.
    pub fn delayed(&self) -> usize {
        self.delayed.len()
    }

    pub fn consumer_count(&self) -> usize {
        self.consumers.len()
    }

    /// Messages a consumer holds (for invariant checks).
    pub fn held_by(&self, consumer: ConsumerId) -> usize {
        self.consumers.get(&consumer).map_or(0, |c| c.held.len())
    }
}
