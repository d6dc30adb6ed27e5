//! The GUID history: the first outcome of every GUID PUT within the dedup window.
//!
//! Replicated state (it is in snapshots), so a PUT retried after a leader failover
//! gets its original outcome. Bounded by a time window and an entry count; eviction
//! is deterministic: oldest insertion first, judged by command time only.
//! The `HashMap` is a lookup index; iteration order never leaks (the `VecDeque` holds
//! the order that eviction and snapshots use).

use crate::state::OriginalOutcome;
use crate::Guid;
use std::collections::{HashMap, VecDeque};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct DedupHistory {
    outcomes: HashMap<Guid, OriginalOutcome>,
    /// Insertion order with insertion time (command time): eviction order.
    order: VecDeque<(Guid, u64)>,
}

impl DedupHistory {
    pub(crate) fn get(&self, guid: &Guid) -> Option<OriginalOutcome> {
        self.outcomes.get(guid).copied()
    }

    /// Remembers a GUID's first outcome. A GUID is remembered at most once.
    pub(crate) fn insert(&mut self, guid: Guid, outcome: OriginalOutcome, now_ms: u64) {
        let fresh = self.outcomes.insert(guid, outcome).is_none();
        assert!(fresh, "a GUID is remembered once");
        self.order.push_back((guid, now_ms));
        debug_assert_eq!(self.outcomes.len(), self.order.len());
    }

    /// Forgets entries older than `window_ms` at `now_ms` and the oldest beyond `max_entries`.
    pub(crate) fn evict(&mut self, now_ms: u64, window_ms: u64, max_entries: u64) {
        while let Some(&(guid, at_ms)) = self.order.front() {
            let too_old = at_ms.saturating_add(window_ms) < now_ms;
            let too_many = self.order.len() as u64 > max_entries;
            if !too_old && !too_many {
                break;
            }
            self.order.pop_front();
            let removed = self.outcomes.remove(&guid);
            assert!(removed.is_some(), "order and outcomes agree");
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    /// Entries in insertion order (for snapshots).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Guid, u64, OriginalOutcome)> + '_ {
        self.order.iter().map(|(guid, at_ms)| {
            let outcome = self.outcomes[guid];
            (*guid, *at_ms, outcome)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_by_time_then_count_in_insertion_order() {
        let mut d = DedupHistory::default();
        d.insert([1; 16], OriginalOutcome::Enqueued, 0);
        d.insert([2; 16], OriginalOutcome::TooLarge, 5);
        d.insert([3; 16], OriginalOutcome::Enqueued, 10);
        d.evict(10, 10, 10);
        assert_eq!(d.len(), 3, "age == window is still inside");
        d.evict(11, 10, 10);
        assert_eq!(d.get(&[1; 16]), None);
        assert_eq!(d.get(&[2; 16]), Some(OriginalOutcome::TooLarge));
        d.evict(11, 10, 1);
        assert_eq!(d.len(), 1);
        assert_eq!(d.get(&[3; 16]), Some(OriginalOutcome::Enqueued));
    }
}
