//! Property tests: random interleavings of PUT (with duplicate GUIDs), poll, CONFIRM,
//! NACK, extend, consumers coming and going, purge, time passing, attempt flushes,
//! dead-lettering and failovers, for work and fan-out queues. Checked invariants:
//! - every enqueued message ends exactly once per subscription (confirmed,
//!   dead-lettered, expired, dropped or purged), and a final drain ends them all;
//! - a message is never held by two consumers at once (a new holder appears only after
//!   the old one lost it: visibility timeout, NACK, removal);
//! - a consumer never holds more than its limits (one big message to an idle consumer);
//! - first deliveries (per dispatcher lifetime) follow seq order;
//! - a duplicate PUT gets the original outcome;
//! - determinism: replaying the log gives identical results and snapshots, also when
//!   restored from a snapshot half way.

mod common;

use bytes::Bytes;
use common::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use tern_queue::*;

#[derive(Clone, Debug)]
enum Op {
    Put {
        ids: Vec<u32>,
        size_bytes: usize,
        ttl_ms: u64,
    },
    Poll {
        sub: usize,
        max: usize,
    },
    Confirm {
        sub: usize,
        consumer: u64,
        pick: usize,
    },
    Nack {
        sub: usize,
        consumer: u64,
        pick: usize,
        delay_ms: u64,
    },
    Extend {
        sub: usize,
        consumer: u64,
        pick: usize,
    },
    AddConsumer {
        sub: usize,
        consumer: u64,
        msgs: u32,
        bytes: u64,
    },
    RemoveConsumer {
        sub: usize,
        consumer: u64,
    },
    Purge,
    Advance {
        ms: u64,
    },
    FlushAttempts,
    SettleDeadLetters,
    Failover,
    Configure {
        max_attempts: u32,
        visibility_ms: u64,
        dead_letter_expired: bool,
    },
    Resubscribe {
        sub: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (prop::collection::vec(0u32..24, 1..4), 0usize..40, prop_oneof![Just(0u64), 1u64..300])
            .prop_map(|(ids, size_bytes, ttl_ms)| Op::Put { ids, size_bytes, ttl_ms }),
        6 => (0usize..2, 1usize..6).prop_map(|(sub, max)| Op::Poll { sub, max }),
        5 => (0usize..2, 0u64..3, 0usize..8).prop_map(|(sub, consumer, pick)| Op::Confirm { sub, consumer, pick }),
        3 => (0usize..2, 0u64..3, 0usize..8, prop_oneof![Just(0u64), 1u64..100])
            .prop_map(|(sub, consumer, pick, delay_ms)| Op::Nack { sub, consumer, pick, delay_ms }),
        1 => (0usize..2, 0u64..3, 0usize..8).prop_map(|(sub, consumer, pick)| Op::Extend { sub, consumer, pick }),
        2 => (0usize..2, 0u64..3, 0u32..4, 1u64..80)
            .prop_map(|(sub, consumer, msgs, bytes)| Op::AddConsumer { sub, consumer, msgs, bytes }),
        1 => (0usize..2, 0u64..3).prop_map(|(sub, consumer)| Op::RemoveConsumer { sub, consumer }),
        1 => Just(Op::Purge),
        3 => (1u64..120).prop_map(|ms| Op::Advance { ms }),
        2 => Just(Op::FlushAttempts),
        2 => Just(Op::SettleDeadLetters),
        1 => Just(Op::Failover),
        1 => (0u32..3, prop_oneof![Just(0u64), Just(40)], any::<bool>())
            .prop_map(|(max_attempts, visibility_ms, dead_letter_expired)| Op::Configure { max_attempts, visibility_ms, dead_letter_expired }),
        1 => (0usize..2).prop_map(|sub| Op::Resubscribe { sub }),
    ]
}

fn config(fanout: bool) -> impl Strategy<Value = QueueConfig> {
    (
        prop_oneof![Just(0u64), Just(60)],
        prop_oneof![Just(0u32), Just(1), Just(2)],
        any::<bool>(),
        prop_oneof![Just(0u64), Just(250)],
        prop_oneof![Just(0u64), Just(400)],
        prop_oneof![Just(0u64), Just(150)],
    )
        .prop_map(
            move |(vis, attempts, dl_expired, default_ttl, max_ttl, retention)| QueueConfig {
                max_messages: 8,
                max_bytes: 200,
                max_message_bytes: 30,
                dedup_window_ms: 300,
                dedup_max_entries: 10_000,
                default_ttl_ms: default_ttl,
                max_ttl_ms: max_ttl,
                mode: if fanout {
                    QueueMode::Fanout
                } else {
                    QueueMode::Work
                },
                visibility_timeout_ms: vis,
                max_delivery_attempts: attempts,
                dead_letter_expired: dl_expired,
                retention_max_age_ms: if fanout { retention * 2 } else { 0 },
                retention_max_bytes: if fanout { retention } else { 0 },
                max_subscriptions: 4,
            },
        )
}

/// What one subscription's consumers believe and what the checker tracks.
#[derive(Default)]
struct SubView {
    /// Every consumer's limits.
    limits: BTreeMap<ConsumerId, FlowLimits>,
    /// What each consumer was given (maybe taken back since).
    received: BTreeMap<ConsumerId, Vec<Guid>>,
    /// Who got each message last.
    last_holder: BTreeMap<Guid, ConsumerId>,
    /// Seqs first delivered by the current dispatcher, and the largest of them.
    delivered: BTreeSet<u64>,
    max_first_seq: u64,
    /// Live messages (unsettled for this subscription).
    live: BTreeSet<Guid>,
    /// Messages enqueued since the subscription was created, and how many ended.
    expected: u64,
    ended: u64,
}

struct Harness {
    state: PartitionState,
    dispatchers: Vec<Dispatcher>,
    views: Vec<SubView>,
    index: u64,
    now_ms: u64,
    /// Every entry applied (index, data) and its results, for the replay check.
    log: Vec<(u64, Bytes, Applied)>,
    /// First outcome of each GUID and when it was remembered.
    first: BTreeMap<Guid, (OriginalOutcome, u64)>,
    window_ms: u64,
    enqueued: u64,
}

impl Harness {
    fn new(config: QueueConfig) -> Self {
        let window_ms = config.dedup_window_ms;
        let fanout = config.mode == QueueMode::Fanout;
        let mut h = Harness {
            state: PartitionState::new(config),
            dispatchers: Vec::new(),
            views: Vec::new(),
            index: 0,
            now_ms: 0,
            log: Vec::new(),
            first: BTreeMap::new(),
            window_ms,
            enqueued: 0,
        };
        if fanout {
            for name in ["a", "b"] {
                h.apply(Command::Subscribe {
                    now_ms: 0,
                    name: name.into(),
                });
                h.dispatchers.push(Dispatcher::for_subscription(name));
                h.views.push(SubView::default());
            }
        } else {
            h.dispatchers.push(Dispatcher::new());
            h.views.push(SubView::default());
        }
        h
    }

    fn sub_name(&self, sub: usize) -> String {
        self.dispatchers[sub].subscription().to_owned()
    }

    fn apply(&mut self, cmd: Command) -> Applied {
        self.index += 1;
        let data = cmd.encode();
        let decoded = Command::decode(&data).expect("own encoding decodes");
        let applied = self.state.apply(self.index, &decoded);
        for d in &mut self.dispatchers {
            d.on_applied(&self.state, &applied);
            d.check_invariants();
            let depth = self
                .state
                .subscription_stats(d.subscription())
                .map_or(0, |s| s.depth);
            assert!(
                d.tracked() as u64 <= depth,
                "the dispatcher is bounded by the state"
            );
        }
        self.check_put(&cmd, &applied);
        self.record_fates(&applied);
        self.log.push((self.index, data, applied.clone()));
        applied
    }

    fn check_put(&mut self, cmd: &Command, applied: &Applied) {
        let (Command::Put { messages, .. }, Outcome::Put(results)) = (cmd, &applied.outcome) else {
            return;
        };
        assert_eq!(messages.len(), results.len());
        let now_ms = self.state.now_ms();
        for (guid, outcome) in results {
            let original = match outcome {
                PutOutcome::Duplicate { original } => {
                    if let Some((first, _)) = self.first.get(guid) {
                        assert_eq!(
                            original, first,
                            "duplicate answered with the original outcome"
                        );
                    }
                    continue;
                }
                PutOutcome::Enqueued { .. } => OriginalOutcome::Enqueued,
                PutOutcome::QuotaExceeded => OriginalOutcome::QuotaExceeded,
                PutOutcome::TooLarge => OriginalOutcome::TooLarge,
                PutOutcome::InvalidTtl => OriginalOutcome::InvalidTtl,
            };
            if let Some((_, at_ms)) = self.first.get(guid) {
                assert!(
                    at_ms + self.window_ms < now_ms,
                    "a GUID is new again only after the dedup window"
                );
            }
            self.first.insert(*guid, (original, now_ms));
        }
    }

    fn end(&mut self, sub: usize, guid: &Guid) {
        let view = &mut self.views[sub];
        assert!(
            view.live.remove(guid),
            "a message ends once per subscription"
        );
        view.ended += 1;
    }

    fn end_everywhere(&mut self, guid: &Guid) {
        for sub in 0..self.views.len() {
            if self.views[sub].live.contains(guid) {
                self.end(sub, guid);
            }
        }
    }

    fn record_fates(&mut self, applied: &Applied) {
        for guid in applied.expired.iter().chain(&applied.dropped) {
            self.end_everywhere(guid);
        }

        match &applied.outcome {
            Outcome::Put(results) => {
                for (guid, outcome) in results {
                    if let PutOutcome::Enqueued { .. } = outcome {
                        self.enqueued += 1;
                        for view in &mut self.views {
                            assert!(view.live.insert(*guid), "one live message per GUID");
                            view.expected += 1;
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
            } => {
                let sub = (0..self.views.len()).find(|s| self.sub_name(*s) == *subscription);
                for (guid, outcome) in results {
                    if *outcome == ConfirmOutcome::Settled {
                        self.end(sub.expect("settled for a known subscription"), guid);
                    }
                }
            }
            Outcome::Purge { .. } => {
                let live: BTreeSet<Guid> = self
                    .views
                    .iter()
                    .flat_map(|v| v.live.iter().copied())
                    .collect();
                for guid in &live {
                    self.end_everywhere(guid);
                }
            }
            _ => {}
        }
    }

    fn held_guid(&self, sub: usize, consumer: ConsumerId, pick: usize) -> Option<Guid> {
        let got = self.views[sub].received.get(&consumer)?;
        let guid = *got.get(pick % got.len().max(1))?;
        self.dispatchers[sub]
            .check_confirm(consumer, &guid)
            .ok()
            .map(|_| guid)
    }

    fn poll(&mut self, sub: usize, max: usize) -> Vec<Delivery> {
        let out = self.dispatchers[sub].poll(&self.state, self.now_ms, max);
        let d = &self.dispatchers[sub];
        d.check_invariants();
        let view = &mut self.views[sub];
        for delivery in &out {
            if let Some(previous) = view.last_holder.get(&delivery.guid) {
                if *previous != delivery.consumer {
                    assert!(
                        d.check_confirm(*previous, &delivery.guid).is_err(),
                        "never held by two consumers"
                    );
                }
            }
            if view.delivered.insert(delivery.seq) {
                assert!(
                    delivery.seq > view.max_first_seq,
                    "first deliveries follow seq order"
                );
                view.max_first_seq = delivery.seq;
            }
            view.last_holder.insert(delivery.guid, delivery.consumer);
            view.received
                .entry(delivery.consumer)
                .or_default()
                .push(delivery.guid);
            let deliverable = self
                .state
                .deliverable(d.subscription(), delivery.seq, self.now_ms);
            assert!(deliverable.is_some(), "only deliverable messages go out");
        }
        for (id, l) in &view.limits {
            let held = d.held_by(*id) as u64;
            assert!(held <= u64::from(l.max_unconfirmed_msgs), "message limit");
            assert!(
                d.held_bytes(*id) <= l.max_unconfirmed_bytes || held == 1,
                "byte limit"
            );
        }
        out
    }

    fn flush_attempts(&mut self) {
        for sub in 0..self.dispatchers.len() {
            let bumps = self.dispatchers[sub].take_attempt_updates();
            if !bumps.is_empty() {
                let subscription = self.sub_name(sub);
                self.apply(Command::Attempts {
                    now_ms: self.now_ms,
                    subscription,
                    bumps,
                });
            }
        }
    }

    fn settle_dead_letters(&mut self) {
        let mut by_sub: BTreeMap<String, Vec<Guid>> = BTreeMap::new();
        for due in self.state.dead_letters_due() {
            by_sub.entry(due.subscription).or_default().push(due.guid);
        }
        for (subscription, guids) in by_sub {
            let reason = SettleReason::DeadLettered;
            self.apply(Command::Settle {
                now_ms: self.now_ms,
                subscription,
                guids,
                reason,
            });
        }
    }

    fn failover(&mut self) {
        let restored = PartitionState::restore(&self.state.snapshot()).expect("restore");
        assert_eq!(restored, self.state);
        self.state = restored;
        for sub in 0..self.dispatchers.len() {
            let mut d = Dispatcher::for_subscription(&self.sub_name(sub));
            d.rebuild(&self.state);
            for (id, l) in &self.views[sub].limits {
                d.add_consumer(*id, *l);
            }
            self.dispatchers[sub] = d;
            let view = &mut self.views[sub];
            view.received.clear();
            view.last_holder.clear();
            view.delivered.clear();
            view.max_first_seq = 0;
        }
    }

    fn step(&mut self, op: &Op) {
        let subs = self.dispatchers.len();
        match op {
            Op::Put {
                ids,
                size_bytes,
                ttl_ms,
            } => {
                let messages = ids.iter().map(|i| msg(*i, *size_bytes, *ttl_ms)).collect();
                self.apply(Command::Put {
                    now_ms: self.now_ms,
                    messages,
                });
            }
            Op::Poll { sub, max } => {
                self.poll(sub % subs, *max);
            }
            Op::Confirm {
                sub,
                consumer,
                pick,
            } => {
                if let Some(guid) = self.held_guid(sub % subs, *consumer, *pick) {
                    let cmd = confirm_guids(self.now_ms, &self.sub_name(sub % subs), vec![guid]);
                    self.apply(cmd);
                }
            }
            Op::Nack {
                sub,
                consumer,
                pick,
                delay_ms,
            } => {
                if let Some(guid) = self.held_guid(sub % subs, *consumer, *pick) {
                    let d = &mut self.dispatchers[sub % subs];
                    d.nack(*consumer, &guid, self.now_ms, *delay_ms)
                        .expect("held");
                }
            }
            Op::Extend {
                sub,
                consumer,
                pick,
            } => {
                if let Some(guid) = self.held_guid(sub % subs, *consumer, *pick) {
                    let d = &mut self.dispatchers[sub % subs];
                    d.extend(*consumer, &guid, self.now_ms, 30).expect("held");
                }
            }
            Op::AddConsumer {
                sub,
                consumer,
                msgs,
                bytes,
            } => {
                let view = &mut self.views[sub % subs];
                if !view.limits.contains_key(consumer) {
                    let l = limits(*msgs, *bytes);
                    view.limits.insert(*consumer, l);
                    self.dispatchers[sub % subs].add_consumer(*consumer, l);
                }
            }
            Op::RemoveConsumer { sub, consumer } => {
                self.views[sub % subs].limits.remove(consumer);
                self.views[sub % subs].received.remove(consumer);
                self.dispatchers[sub % subs].remove_consumer(*consumer);
            }
            Op::Purge => {
                self.apply(Command::Purge {
                    now_ms: self.now_ms,
                });
            }
            Op::Advance { ms } => {
                self.now_ms += ms;
                self.apply(Command::Tick {
                    now_ms: self.now_ms,
                });
            }
            Op::FlushAttempts => self.flush_attempts(),
            Op::SettleDeadLetters => self.settle_dead_letters(),
            Op::Failover => self.failover(),
            Op::Configure {
                max_attempts,
                visibility_ms,
                dead_letter_expired,
            } => {
                let config = QueueConfig {
                    max_delivery_attempts: *max_attempts,
                    visibility_timeout_ms: *visibility_ms,
                    dead_letter_expired: *dead_letter_expired,
                    ..self.state.config().clone()
                };
                self.apply(Command::Configure {
                    now_ms: self.now_ms,
                    config,
                });
            }
            Op::Resubscribe { sub } => self.resubscribe(sub % subs),
        }
    }

    /// Fan-out only: deletes and recreates a subscription; what it still needed is gone
    /// for it, and the new one sees only new messages.
    fn resubscribe(&mut self, sub: usize) {
        if self.state.config().mode != QueueMode::Fanout {
            return;
        }
        let name = self.sub_name(sub);
        let now_ms = self.now_ms;
        let a = self.apply(Command::Unsubscribe {
            now_ms,
            name: name.clone(),
        });
        assert!(matches!(
            a.outcome,
            Outcome::Unsubscribe {
                outcome: UnsubscribeOutcome::Removed { .. },
                ..
            }
        ));
        let limits = std::mem::take(&mut self.views[sub].limits);
        self.views[sub] = SubView {
            limits,
            ..SubView::default()
        };
        let mut d = Dispatcher::for_subscription(&name);
        for (id, l) in &self.views[sub].limits {
            d.add_consumer(*id, *l);
        }
        self.dispatchers[sub] = d;
        let a = self.apply(Command::Subscribe { now_ms, name });
        assert!(matches!(
            a.outcome,
            Outcome::Subscribe {
                outcome: SubscribeOutcome::Created,
                ..
            }
        ));
    }

    /// Every consumer leaves, one greedy consumer per subscription confirms everything.
    fn drain(&mut self) {
        for sub in 0..self.dispatchers.len() {
            let ids: Vec<ConsumerId> = self.views[sub].limits.keys().copied().collect();
            for id in ids {
                self.dispatchers[sub].remove_consumer(id);
            }
            let l = limits(1_000, u64::MAX);
            self.views[sub].limits = BTreeMap::from([(99, l)]);
            self.dispatchers[sub].add_consumer(99, l);
        }
        for _ in 0..50 {
            if self.state.stats().depth == 0 {
                break;
            }
            self.now_ms += 100;
            self.apply(Command::Tick {
                now_ms: self.now_ms,
            });
            self.flush_attempts();
            self.settle_dead_letters();
            for sub in 0..self.dispatchers.len() {
                let guids: Vec<Guid> = self.poll(sub, 1_000).iter().map(|d| d.guid).collect();
                if !guids.is_empty() {
                    let cmd = confirm_guids(self.now_ms, &self.sub_name(sub), guids);
                    self.apply(cmd);
                }
            }
        }
        assert_eq!(self.state.stats().depth, 0, "the drain ends every message");
        assert_eq!(self.state.min_live_index(), None);
        for view in &self.views {
            assert!(view.live.is_empty(), "no message lost");
            assert_eq!(view.ended, view.expected, "each ended exactly once");
        }
        let s = self.state.stats();
        if self.state.config().mode == QueueMode::Work {
            assert_eq!(
                s.puts_enqueued,
                s.confirms + s.purged + s.expired + s.dead_lettered
            );
        }
        for sub in 0..self.dispatchers.len() {
            let st = self.dispatchers[sub]
                .subscription_stats(&self.state)
                .expect("exists");
            let ended = st.confirmed + st.dead_lettered + st.expired + st.dropped + st.purged;
            assert_eq!(
                ended, self.views[sub].expected,
                "per-subscription counters add up"
            );
        }
    }

    /// Replays the log into fresh states: whole, and from a snapshot at `cut`.
    fn check_replay(&self, initial: &QueueConfig, cut: usize) {
        let mut fresh = PartitionState::new(initial.clone());
        let cut = cut % (self.log.len() + 1);
        let mut from_snapshot = None;
        for (i, (index, data, applied)) in self.log.iter().enumerate() {
            if i == cut {
                from_snapshot = Some(PartitionState::restore(&fresh.snapshot()).expect("restore"));
            }
            let decoded = Command::decode(data).expect("decode");
            assert_eq!(
                &fresh.apply(*index, &decoded),
                applied,
                "deterministic results"
            );
            if let Some(other) = from_snapshot.as_mut() {
                assert_eq!(
                    &other.apply(*index, &decoded),
                    applied,
                    "same after restore"
                );
            }
        }
        assert_eq!(fresh.snapshot(), self.state.snapshot(), "identical state");
        if let Some(other) = from_snapshot {
            assert_eq!(
                other.snapshot(),
                self.state.snapshot(),
                "identical after restore"
            );
        }
    }
}

fn confirm_guids(now_ms: u64, subscription: &str, guids: Vec<Guid>) -> Command {
    Command::Confirm {
        now_ms,
        subscription: subscription.into(),
        guids,
    }
}

fn run(config: QueueConfig, ops: &[Op], cut: usize) {
    let mut h = Harness::new(config.clone());
    for op in ops {
        h.step(op);
    }
    h.drain();
    h.check_replay(&config, cut);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn work_queue_invariants(config in config(false), ops in prop::collection::vec(op(), 1..120), cut in any::<usize>()) {
        run(config, &ops, cut);
    }

    #[test]
    fn fanout_invariants(config in config(true), ops in prop::collection::vec(op(), 1..120), cut in any::<usize>()) {
        run(config, &ops, cut);
    }
}
