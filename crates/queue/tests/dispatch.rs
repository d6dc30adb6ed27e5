//! Unit tests of the leader-local dispatcher with a real state machine.

mod common;

use common::*;
use tern_queue::*;

/// A leader: state plus dispatcher, fed every applied command.
struct Leader {
    r: Replica,
    d: Dispatcher,
}

impl Leader {
    fn new(config: QueueConfig) -> Self {
        Leader {
            r: Replica::new(config),
            d: Dispatcher::new(),
        }
    }

    fn apply(&mut self, cmd: &Command) -> Applied {
        let applied = self.r.apply(cmd);
        self.d.on_applied(&self.r.state, &applied);
        self.d.check_invariants();
        applied
    }

    fn poll(&mut self, now_ms: u64, max: usize) -> Vec<(ConsumerId, u32, u32)> {
        let out = self.d.poll(&self.r.state, now_ms, max);
        self.d.check_invariants();
        out.iter()
            .map(|d| (d.consumer, guid_id(&d.guid), d.attempt))
            .collect()
    }

    /// Proposes and applies the dispatcher's attempt bumps, like the broker does.
    fn flush_attempts(&mut self, now_ms: u64) -> Applied {
        let bumps = self.d.take_attempt_updates();
        let subscription = self.d.subscription().to_owned();
        self.apply(&Command::Attempts {
            now_ms,
            subscription,
            bumps,
        })
    }
}

fn guid_id(g: &Guid) -> u32 {
    u32::from_be_bytes([g[0], g[1], g[2], g[3]])
}

#[test]
fn round_robin_with_flow_control_and_redelivery_in_seq_order() {
    let mut l = Leader::new(QueueConfig::default());
    l.d.add_consumer(1, limits(2, 1_000));
    l.d.add_consumer(2, limits(1, 1_000));
    l.apply(&put(1, &[10, 11, 12, 13, 14], 10));
    assert_eq!(l.poll(1, 100), vec![(1, 10, 1), (2, 11, 1), (1, 12, 1)]);
    assert_eq!((l.d.inflight(), l.d.available()), (3, 2));
    assert_eq!(l.d.check_confirm(2, &guid(11)), Ok(()));
    assert_eq!(l.d.check_confirm(1, &guid(11)), Err(DispatchError::NotHeld));
    l.d.remove_consumer(1);
    // 10 and 12 come back ahead of 13, with attempt 2, once there is room.
    l.apply(&confirm(2, "", &[11]));
    assert_eq!(l.poll(2, 100), vec![(2, 10, 2)]);
    l.d.add_consumer(3, limits(10, 1_000));
    assert_eq!(l.poll(3, 100), vec![(3, 12, 2), (3, 13, 1), (3, 14, 1)]);
    assert_eq!(
        l.d.take_attempt_updates(),
        vec![(guid(10), 1), (guid(12), 1)]
    );
    assert!(!l.d.has_attempt_updates());
}

#[test]
fn byte_limits_hold_back_but_a_big_message_reaches_an_idle_consumer() {
    let mut l = Leader::new(QueueConfig::default());
    l.d.add_consumer(1, limits(10, 15));
    l.apply(&put(1, &[1, 2], 10));
    l.apply(&put(1, &[3], 100));
    assert_eq!(l.poll(1, 10), vec![(1, 1, 1)], "2 would exceed 15 bytes");
    l.apply(&confirm(2, "", &[1]));
    assert_eq!(l.poll(2, 10), vec![(1, 2, 1)]);
    assert_eq!(l.poll(2, 10), vec![]);
    l.apply(&confirm(2, "", &[2]));
    assert_eq!(
        l.poll(3, 10),
        vec![(1, 3, 1)],
        "too big, but the consumer is idle"
    );
}

#[test]
fn rebuild_makes_every_unsettled_message_available_in_seq_order() {
    let mut l = Leader::new(QueueConfig::default());
    l.d.add_consumer(1, limits(1, 1_000));
    l.apply(&put(1, &[1, 2, 3], 1));
    assert_eq!(l.poll(1, 10), vec![(1, 1, 1)]);
    l.apply(&confirm(1, "", &[1]));
    // A new leader: fresh dispatcher, same state.
    let mut d = Dispatcher::new();
    d.rebuild(&l.r.state);
    assert_eq!((d.available(), d.inflight()), (2, 0));
    d.add_consumer(7, limits(5, 100));
    let got: Vec<u64> = d.poll(&l.r.state, 2, 10).iter().map(|x| x.seq).collect();
    assert_eq!(got, vec![2, 3]);
}

#[test]
fn visibility_timeout_redelivers_and_extend_defers_it() {
    let mut l = Leader::new(QueueConfig {
        visibility_timeout_ms: 100,
        ..QueueConfig::default()
    });
    l.d.add_consumer(1, limits(1, 1_000));
    l.d.add_consumer(2, limits(1, 1_000));
    l.apply(&put(0, &[1, 2], 1));
    assert_eq!(l.poll(0, 10), vec![(1, 1, 1), (2, 2, 1)]);
    assert_eq!(l.d.next_timer_ms(), Some(100));
    l.d.extend(2, &guid(2), 50, 100).expect("held");
    assert_eq!(
        l.d.extend(1, &guid(2), 50, 100),
        Err(DispatchError::NotHeld)
    );
    assert_eq!(l.poll(99, 10), vec![]);
    // 1 times out at 100 and goes to the next consumer with room: only 1 itself.
    assert_eq!(l.poll(100, 10), vec![(1, 1, 2)]);
    assert_eq!(l.d.check_confirm(2, &guid(2)), Ok(()), "extended to 150");
    // 2 times out at 150, which frees its consumer again.
    assert_eq!(l.poll(150, 10), vec![(2, 2, 2)]);
    assert_eq!(l.d.take_attempt_updates(), vec![(guid(1), 1), (guid(2), 1)]);
}

#[test]
fn nack_with_delay_returns_the_message_after_the_delay() {
    let mut l = Leader::new(QueueConfig::default());
    l.d.add_consumer(1, limits(5, 1_000));
    l.apply(&put(0, &[1, 2], 1));
    assert_eq!(l.poll(0, 10).len(), 2);
    l.d.nack(1, &guid(1), 10, 50).expect("held");
    l.d.nack(1, &guid(2), 10, 0).expect("held");
    assert_eq!(l.d.nack(1, &guid(2), 10, 0), Err(DispatchError::NotHeld));
    let stats = l.d.subscription_stats(&l.r.state).expect("stats");
    assert_eq!((stats.delayed, stats.available, stats.in_flight), (1, 1, 0));
    assert_eq!(l.poll(20, 10), vec![(1, 2, 2)]);
    assert_eq!(l.d.next_timer_ms(), Some(60));
    assert_eq!(l.poll(59, 10), vec![]);
    assert_eq!(l.poll(60, 10), vec![(1, 1, 2)]);
}

#[test]
fn max_attempts_parks_then_dead_letters_through_replicated_commands() {
    let mut l = Leader::new(QueueConfig {
        max_delivery_attempts: 2,
        ..QueueConfig::default()
    });
    l.d.add_consumer(1, limits(5, 1_000));
    l.apply(&put(0, &[1], 1));
    assert_eq!(l.poll(0, 10), vec![(1, 1, 1)]);
    l.d.nack(1, &guid(1), 0, 0).expect("held");
    assert_eq!(l.poll(0, 10), vec![(1, 1, 2)]);
    l.d.nack(1, &guid(1), 0, 0).expect("held");
    assert_eq!(l.poll(0, 10), vec![], "at the limit: parked");
    assert_eq!(l.d.parked(), 1);
    let a = l.flush_attempts(1);
    assert_eq!(a.dead_letter_due.len(), 1);
    assert_eq!(a.dead_letter_due[0].attempts, 2);
    assert_eq!(l.d.parked(), 0, "the state machine owns it now");
    // A new leader does not deliver it either, and knows it must dead-letter it.
    let mut d = Dispatcher::new();
    d.rebuild(&l.r.state);
    assert_eq!(d.available(), 0);
    assert_eq!(l.r.state.dead_letters_due().len(), 1);
    l.apply(&Command::Settle {
        now_ms: 2,
        subscription: String::new(),
        guids: vec![guid(1)],
        reason: SettleReason::DeadLettered,
    });
    assert_eq!(l.r.state.stats().depth, 0);
}

#[test]
fn replicated_attempts_survive_failover() {
    let mut l = Leader::new(QueueConfig {
        max_delivery_attempts: 5,
        ..QueueConfig::default()
    });
    l.d.add_consumer(1, limits(5, 1_000));
    l.apply(&put(0, &[1], 1));
    l.poll(0, 1);
    l.d.remove_consumer(1);
    l.flush_attempts(1);
    let mut d = Dispatcher::new();
    d.rebuild(&l.r.state);
    d.add_consumer(2, limits(1, 10));
    assert_eq!(d.poll(&l.r.state, 2, 1)[0].attempt, 2);
}

#[test]
fn expired_messages_are_never_delivered() {
    let mut l = Leader::new(QueueConfig::default());
    l.apply(&Command::Put {
        now_ms: 0,
        messages: vec![msg(1, 1, 10), msg(2, 1, 0)],
    });
    l.d.add_consumer(1, limits(5, 1_000));
    assert_eq!(l.poll(10, 10), vec![(1, 2, 1)], "1 expired by poll time");
    assert_eq!(l.d.parked(), 1);
    let a = l.apply(&Command::Tick { now_ms: 10 });
    assert_eq!(a.expired, vec![guid(1)]);
    assert_eq!(l.d.parked(), 0);
}

#[test]
fn settled_or_expired_while_in_flight_is_dropped_from_the_consumer() {
    let mut l = Leader::new(QueueConfig::default());
    l.d.add_consumer(1, limits(5, 1_000));
    l.apply(&Command::Put {
        now_ms: 0,
        messages: vec![msg(1, 1, 10), msg(2, 1, 0)],
    });
    assert_eq!(l.poll(0, 10).len(), 2);
    l.apply(&Command::Tick { now_ms: 10 });
    assert_eq!(l.d.held_by(1), 1);
    l.apply(&Command::Purge { now_ms: 11 });
    assert_eq!((l.d.held_by(1), l.d.inflight(), l.d.available()), (0, 0, 0));
}

#[test]
fn fanout_has_one_dispatcher_per_subscription() {
    let mut r = Replica::new(QueueConfig {
        mode: QueueMode::Fanout,
        ..QueueConfig::default()
    });
    let mut a = Dispatcher::for_subscription("a");
    let mut b = Dispatcher::for_subscription("b");
    for name in ["a", "b"] {
        r.apply(&Command::Subscribe {
            now_ms: 0,
            name: name.into(),
        });
    }
    let applied = r.apply(&put(1, &[1, 2], 1));
    a.on_applied(&r.state, &applied);
    b.on_applied(&r.state, &applied);
    a.add_consumer(1, limits(5, 100));
    b.add_consumer(1, limits(5, 100));
    assert_eq!(a.poll(&r.state, 1, 10).len(), 2);
    assert_eq!(b.poll(&r.state, 1, 10).len(), 2);
    let applied = r.apply(&confirm(2, "a", &[1, 2]));
    a.on_applied(&r.state, &applied);
    b.on_applied(&r.state, &applied);
    assert_eq!((a.inflight(), b.inflight()), (0, 2));
    let stats = b.subscription_stats(&r.state).expect("b");
    assert_eq!((stats.depth, stats.in_flight, stats.lag), (2, 2, 2));
    let applied = r.apply(&Command::Unsubscribe {
        now_ms: 3,
        name: "b".into(),
    });
    b.on_applied(&r.state, &applied);
    assert_eq!(b.inflight(), 0);
    assert_eq!(r.state.stats().depth, 0);
}

#[test]
fn raising_the_attempt_limit_unparks() {
    let mut l = Leader::new(QueueConfig {
        max_delivery_attempts: 1,
        ..QueueConfig::default()
    });
    l.d.add_consumer(1, limits(5, 1_000));
    l.apply(&put(0, &[1], 1));
    assert_eq!(l.poll(0, 10), vec![(1, 1, 1)]);
    l.d.nack(1, &guid(1), 0, 0).expect("held");
    assert_eq!(l.d.parked(), 1);
    let config = QueueConfig {
        max_delivery_attempts: 0,
        ..QueueConfig::default()
    };
    l.apply(&Command::Configure { now_ms: 1, config });
    assert_eq!(l.poll(1, 10), vec![(1, 1, 2)]);
    let a = l.flush_attempts(2);
    assert!(a.dead_letter_due.is_empty());
}

#[test]
fn a_confirm_resent_after_failover_settles_an_available_message_only() {
    let mut l = Leader::new(QueueConfig::default());
    l.d.add_consumer(1, limits(5, 1_000));
    l.d.add_consumer(2, limits(5, 1_000));
    l.apply(&put(0, &[1, 2], 1));
    // As after a failover: nothing held yet, both messages ready to go.
    assert_eq!(l.d.check_confirm(1, &guid(1)), Err(DispatchError::NotHeld));
    assert_eq!(l.d.check_resent_confirm(1, &guid(1)), Ok(()));
    assert_eq!(
        l.d.check_resent_confirm(9, &guid(1)),
        Err(DispatchError::NotHeld),
        "not attached"
    );
    assert_eq!(
        l.d.check_resent_confirm(1, &guid(77)),
        Err(DispatchError::NotHeld),
        "unknown"
    );
    // Once PUSHed to one consumer, only that consumer may confirm it.
    let pushed = l.poll(0, 10);
    let (holder, _, _) = pushed
        .iter()
        .copied()
        .find(|(_, g, _)| *g == 1)
        .expect("pushed");
    let other = if holder == 1 { 2 } else { 1 };
    assert_eq!(l.d.check_resent_confirm(holder, &guid(1)), Ok(()));
    assert_eq!(
        l.d.check_resent_confirm(other, &guid(1)),
        Err(DispatchError::NotHeld)
    );
}
