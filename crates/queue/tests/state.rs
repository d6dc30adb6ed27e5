//! Unit tests of the replicated state machine through its public API.

mod common;

use bytes::Bytes;
use common::*;
use tern_queue::*;

#[test]
fn put_records_the_payload_location_in_the_log_entry() {
    let mut r = Replica::new(QueueConfig::default());
    let cmd = put(1, &[1, 2], 10);
    let data = cmd.encode();
    let applied = r.state.apply(7, &Command::decode(&data).expect("decode"));
    assert_eq!(
        put_results(&applied),
        vec![
            PutOutcome::Enqueued { seq: 1 },
            PutOutcome::Enqueued { seq: 2 }
        ]
    );
    for i in [1, 2] {
        let m = r.state.message(&guid(i)).expect("enqueued");
        assert_eq!(m.location.index, 7);
        assert_eq!(m.size_bytes, 10);
        assert_eq!(m.key, Bytes::from(format!("k{i}")));
        let at = m.location.offset as usize;
        assert_eq!(&data[at..at + m.location.len as usize], &[i as u8; 10][..]);
    }
    assert_eq!(r.state.min_live_index(), Some(7));
}

#[test]
fn dedup_returns_the_original_outcome_even_after_confirm() {
    let cfg = QueueConfig {
        max_messages: 2,
        max_message_bytes: 100,
        ..QueueConfig::default()
    };
    let mut r = Replica::new(cfg);
    let first = r.apply(&Command::Put {
        now_ms: 1,
        messages: vec![msg(1, 10, 0), msg(2, 10, 0), msg(3, 10, 0), msg(4, 101, 0)],
    });
    assert_eq!(
        put_results(&first),
        vec![
            PutOutcome::Enqueued { seq: 1 },
            PutOutcome::Enqueued { seq: 2 },
            PutOutcome::QuotaExceeded,
            PutOutcome::TooLarge
        ]
    );
    assert_eq!(
        confirm_results(&r.apply(&confirm(2, "", &[1]))),
        vec![ConfirmOutcome::Settled]
    );
    // Room now, but 3 keeps its original answer; 1 is still a duplicate after confirm.
    let again = r.apply(&put(3, &[1, 3, 4, 5], 10));
    assert_eq!(
        put_results(&again),
        vec![
            PutOutcome::Duplicate {
                original: OriginalOutcome::Enqueued
            },
            PutOutcome::Duplicate {
                original: OriginalOutcome::QuotaExceeded
            },
            PutOutcome::Duplicate {
                original: OriginalOutcome::TooLarge
            },
            PutOutcome::Enqueued { seq: 3 },
        ]
    );
    let s = r.state.stats();
    assert_eq!((s.depth, s.bytes), (2, 20));
    assert_eq!(
        (s.puts_enqueued, s.puts_duplicate, s.puts_rejected),
        (3, 3, 2)
    );
    assert_eq!(s.confirms, 1);
}

#[test]
fn same_guid_twice_in_one_batch_is_a_duplicate() {
    let mut r = Replica::new(QueueConfig::default());
    let a = r.apply(&put(1, &[9, 9], 1));
    assert_eq!(
        put_results(&a),
        vec![
            PutOutcome::Enqueued { seq: 1 },
            PutOutcome::Duplicate {
                original: OriginalOutcome::Enqueued
            }
        ]
    );
}

#[test]
fn dedup_window_evicts_by_command_time_and_count() {
    let cfg = QueueConfig {
        dedup_window_ms: 100,
        dedup_max_entries: 2,
        ..QueueConfig::default()
    };
    let mut r = Replica::new(cfg);
    r.apply(&put(0, &[1], 1));
    r.apply(&confirm(0, "", &[1]));
    r.apply(&Command::Tick { now_ms: 100 });
    assert!(matches!(
        put_results(&r.apply(&put(100, &[1], 1)))[0],
        PutOutcome::Duplicate { .. }
    ));
    r.apply(&Command::Tick { now_ms: 101 });
    assert_eq!(r.state.stats().dedup_entries, 0, "window passed");
    // Forgotten and settled: a new message.
    assert!(matches!(
        put_results(&r.apply(&put(101, &[1], 1)))[0],
        PutOutcome::Enqueued { .. }
    ));
    // Count bound: 2 entries; the oldest (1) goes, but 1 is still unsettled, so still a duplicate.
    r.apply(&put(102, &[2, 3], 1));
    assert_eq!(r.state.stats().dedup_entries, 2);
    assert_eq!(
        put_results(&r.apply(&put(103, &[1], 1))),
        vec![PutOutcome::Duplicate {
            original: OriginalOutcome::Enqueued
        }]
    );
}

#[test]
fn confirm_of_unknown_guid_changes_nothing() {
    let mut r = Replica::new(QueueConfig::default());
    r.apply(&put(1, &[1], 5));
    let before = r.state.snapshot();
    let a = r.apply(&confirm(1, "", &[2]));
    assert_eq!(confirm_results(&a), vec![ConfirmOutcome::Unknown]);
    assert_eq!(
        confirm_results(&r.apply(&confirm(1, "nope", &[1]))),
        vec![ConfirmOutcome::Unknown],
        "work queues only have the \"\" subscription"
    );
    assert_eq!(r.state.snapshot(), before);
    assert_eq!(r.state.stats().confirms, 0);
}

#[test]
fn ttl_expires_by_command_time_and_min_live_index_moves() {
    let mut r = Replica::new(QueueConfig::default());
    r.apply(&Command::Put {
        now_ms: 0,
        messages: vec![msg(1, 1, 50)],
    });
    r.apply(&Command::Put {
        now_ms: 10,
        messages: vec![msg(2, 1, 0)],
    });
    assert_eq!(r.state.min_live_index(), Some(1));
    assert_eq!(r.state.next_expiry_ms(), Some(50));
    let a = r.apply(&Command::Tick { now_ms: 49 });
    assert!(a.expired.is_empty());
    let a = r.apply(&Command::Tick { now_ms: 50 });
    assert_eq!(a.expired, vec![guid(1)]);
    assert_eq!(r.state.min_live_index(), Some(2));
    assert_eq!(r.state.stats().expired, 1);
    // An older timestamp does not move time back.
    r.apply(&Command::Tick { now_ms: 5 });
    assert_eq!(r.state.now_ms(), 50);
    assert_eq!(
        confirm_results(&r.apply(&confirm(60, "", &[1]))),
        vec![ConfirmOutcome::Unknown]
    );
}

#[test]
fn default_and_max_ttl() {
    let cfg = QueueConfig {
        default_ttl_ms: 100,
        max_ttl_ms: 1_000,
        ..QueueConfig::default()
    };
    let mut r = Replica::new(cfg);
    let a = r.apply(&Command::Put {
        now_ms: 10,
        messages: vec![msg(1, 1, 0), msg(2, 1, 1_000), msg(3, 1, 1_001)],
    });
    assert_eq!(put_results(&a)[2], PutOutcome::InvalidTtl);
    assert_eq!(
        r.state.message(&guid(1)).and_then(|m| m.expires_ms),
        Some(110)
    );
    assert_eq!(
        r.state.message(&guid(2)).and_then(|m| m.expires_ms),
        Some(1_010)
    );
    let mut cfg = r.state.config().clone();
    cfg.default_ttl_ms = 0;
    r.state.set_config(cfg);
    r.apply(&Command::Put {
        now_ms: 20,
        messages: vec![msg(4, 1, 0)],
    });
    assert_eq!(
        r.state.message(&guid(4)).and_then(|m| m.expires_ms),
        Some(1_020),
        "max_ttl caps messages that would never expire"
    );
}

#[test]
fn purge_removes_everything_and_keeps_the_history() {
    let mut r = Replica::new(QueueConfig::default());
    r.apply(&put(1, &[1, 2, 3], 4));
    let a = r.apply(&Command::Purge { now_ms: 2 });
    assert_eq!(a.outcome, Outcome::Purge { removed: 3 });
    let s = r.state.stats();
    assert_eq!((s.depth, s.bytes, s.purged), (0, 0, 3));
    assert_eq!(r.state.min_live_index(), None);
    assert!(matches!(
        put_results(&r.apply(&put(3, &[2], 4)))[0],
        PutOutcome::Duplicate { .. }
    ));
}

#[test]
fn snapshot_restore_round_trips_and_rejects_garbage() {
    let cfg = QueueConfig {
        max_delivery_attempts: 3,
        ..QueueConfig::default()
    };
    let mut r = Replica::new(cfg);
    r.apply(&Command::Put {
        now_ms: 1,
        messages: vec![msg(1, 3, 0), msg(2, 4, 500)],
    });
    let mut dead = msg(3, 5, 0);
    let info = std::sync::Arc::new(DeadLetterInfo {
        source_queue: "orders".into(),
        subscription: String::new(),
        reason: DeadLetterReason::MaxAttempts,
        attempts: 4,
        original_guid: guid(77),
    });
    dead.dead_letter = Some(info.clone());
    r.apply(&Command::Put {
        now_ms: 1,
        messages: vec![dead],
    });
    assert_eq!(
        r.state
            .message(&guid(3))
            .and_then(|m| m.dead_letter.clone()),
        Some(info.clone())
    );
    r.apply(&confirm(2, "", &[1]));
    r.apply(&Command::Attempts {
        now_ms: 3,
        subscription: String::new(),
        bumps: vec![(guid(2), 1)],
    });
    let snap = r.state.snapshot();
    let restored = PartitionState::restore(&snap).expect("restore");
    assert_eq!(restored, r.state);
    assert_eq!(restored.snapshot(), snap);
    assert_eq!(
        restored
            .message(&guid(3))
            .and_then(|m| m.dead_letter.clone()),
        Some(info)
    );
    for cut in 0..snap.len() {
        assert!(PartitionState::restore(&snap.slice(..cut)).is_err());
    }
    assert!(PartitionState::restore(&Bytes::from_static(&[1, 2, 3])).is_err());
}

#[test]
fn attempts_reaching_the_limit_report_dead_letter_due_until_settled() {
    let cfg = QueueConfig {
        max_delivery_attempts: 2,
        ..QueueConfig::default()
    };
    let mut r = Replica::new(cfg);
    r.apply(&put(1, &[1, 2], 1));
    let bump = |now_ms| Command::Attempts {
        now_ms,
        subscription: String::new(),
        bumps: vec![(guid(1), 1), (guid(9), 1)],
    };
    let a = r.apply(&bump(2));
    assert_eq!(
        a.outcome,
        Outcome::Attempts {
            subscription: String::new(),
            updated: 1
        }
    );
    assert!(a.dead_letter_due.is_empty());
    let a = r.apply(&bump(3));
    let due = DeadLetterDue {
        subscription: String::new(),
        guid: guid(1),
        seq: 1,
        attempts: 2,
        reason: DeadLetterReason::MaxAttempts,
    };
    assert_eq!(a.dead_letter_due, vec![due.clone()]);
    assert!(
        r.apply(&bump(4)).dead_letter_due.is_empty(),
        "reported once"
    );
    assert_eq!(r.state.deliverable("", 1, 4), None);
    let restored = PartitionState::restore(&r.state.snapshot()).expect("restore");
    assert_eq!(
        restored.dead_letters_due(),
        vec![DeadLetterDue { attempts: 3, ..due }]
    );
    let a = r.apply(&Command::Settle {
        now_ms: 5,
        subscription: String::new(),
        guids: vec![guid(1)],
        reason: SettleReason::DeadLettered,
    });
    assert_eq!(confirm_results(&a), vec![ConfirmOutcome::Settled]);
    let s = r.state.stats();
    assert_eq!((s.depth, s.dead_lettered, s.dead_letter_due), (1, 1, 0));
}

#[test]
fn expired_messages_can_be_dead_lettered_instead_of_dropped() {
    let cfg = QueueConfig {
        dead_letter_expired: true,
        ..QueueConfig::default()
    };
    let mut r = Replica::new(cfg);
    r.apply(&Command::Put {
        now_ms: 0,
        messages: vec![msg(1, 1, 10)],
    });
    let a = r.apply(&Command::Tick { now_ms: 10 });
    assert!(a.expired.is_empty());
    assert_eq!(a.dead_letter_due.len(), 1);
    assert_eq!(a.dead_letter_due[0].reason, DeadLetterReason::Expired);
    assert_eq!(r.state.min_live_index(), Some(1), "kept until settled");
    let restored = PartitionState::restore(&r.state.snapshot()).expect("restore");
    assert_eq!(restored, r.state);
    assert!(r
        .apply(&Command::Tick { now_ms: 20 })
        .dead_letter_due
        .is_empty());
}

fn fanout() -> Replica {
    Replica::new(QueueConfig {
        mode: QueueMode::Fanout,
        ..QueueConfig::default()
    })
}

fn subscribe(r: &mut Replica, name: &str) -> Applied {
    r.apply(&Command::Subscribe {
        now_ms: 0,
        name: name.into(),
    })
}

#[test]
fn fanout_releases_a_message_only_when_every_subscription_settled_it() {
    let mut r = fanout();
    assert_eq!(
        subscribe(&mut r, "a").outcome,
        Outcome::Subscribe {
            name: "a".into(),
            outcome: SubscribeOutcome::Created
        }
    );
    subscribe(&mut r, "b");
    assert_eq!(
        subscribe(&mut r, "b").outcome,
        Outcome::Subscribe {
            name: "b".into(),
            outcome: SubscribeOutcome::AlreadyExists
        }
    );
    r.apply(&put(1, &[1], 10)); // index 4
    r.apply(&put(1, &[2], 10)); // index 5
    subscribe(&mut r, "late");
    r.apply(&put(1, &[3], 10));
    assert_eq!(
        r.state.pending("late").map(|m| m.seq).collect::<Vec<_>>(),
        vec![3]
    );
    assert_eq!(
        confirm_results(&r.apply(&confirm(2, "a", &[1, 1]))),
        vec![ConfirmOutcome::Settled, ConfirmOutcome::Unknown]
    );
    assert_eq!(r.state.min_live_index(), Some(4), "b still needs 1");
    r.apply(&confirm(2, "b", &[1]));
    assert_eq!(r.state.min_live_index(), Some(5));
    let a = r.state.subscription_stats("a").expect("a");
    assert_eq!((a.depth, a.confirmed, a.lag), (2, 1, 2));
    let a = r.apply(&Command::Unsubscribe {
        now_ms: 3,
        name: "b".into(),
    });
    assert_eq!(
        a.outcome,
        Outcome::Unsubscribe {
            name: "b".into(),
            outcome: UnsubscribeOutcome::Removed { released: 0 }
        }
    );
    r.apply(&confirm(3, "a", &[2, 3]));
    assert_eq!(r.state.min_live_index(), Some(7), "late still needs 3");
    r.apply(&Command::Unsubscribe {
        now_ms: 3,
        name: "late".into(),
    });
    assert_eq!(r.state.min_live_index(), None);
    let restored = PartitionState::restore(&r.state.snapshot()).expect("restore");
    assert_eq!(restored, r.state);
}

#[test]
fn fanout_without_subscriptions_releases_at_once_and_work_refuses_subscribe() {
    let mut r = fanout();
    let a = r.apply(&put(1, &[1], 1));
    assert_eq!(put_results(&a), vec![PutOutcome::Enqueued { seq: 1 }]);
    let s = r.state.stats();
    assert_eq!((s.depth, s.unrouted), (0, 1));
    let mut w = Replica::new(QueueConfig::default());
    assert_eq!(
        subscribe(&mut w, "x").outcome,
        Outcome::Subscribe {
            name: "x".into(),
            outcome: SubscribeOutcome::NotFanout
        }
    );
    assert_eq!(
        subscribe(&mut r, "").outcome,
        Outcome::Subscribe {
            name: String::new(),
            outcome: SubscribeOutcome::InvalidName
        }
    );
}

#[test]
fn fanout_retention_drops_the_oldest_for_everyone() {
    let mut r = Replica::new(QueueConfig {
        mode: QueueMode::Fanout,
        retention_max_age_ms: 100,
        retention_max_bytes: 25,
        ..QueueConfig::default()
    });
    subscribe(&mut r, "a");
    subscribe(&mut r, "b");
    r.apply(&put(0, &[1, 2], 10));
    r.apply(&confirm(0, "a", &[1]));
    let a = r.apply(&put(50, &[3], 10));
    assert_eq!(a.dropped, vec![guid(1)], "30 bytes > 25");
    assert_eq!(r.state.subscription_stats("a").map(|s| s.dropped), Some(0));
    assert_eq!(r.state.subscription_stats("b").map(|s| s.dropped), Some(1));
    assert_eq!(r.state.next_retention_ms(), Some(100));
    let a = r.apply(&Command::Tick { now_ms: 100 });
    assert_eq!(a.dropped, vec![guid(2)]);
    assert_eq!(r.state.stats().dropped, 2);
}

#[test]
fn configure_command_changes_limits_at_a_log_position() {
    let mut r = Replica::new(QueueConfig {
        max_delivery_attempts: 5,
        ..QueueConfig::default()
    });
    r.apply(&put(1, &[1, 2], 1));
    r.apply(&Command::Attempts {
        now_ms: 2,
        subscription: String::new(),
        bumps: vec![(guid(1), 2)],
    });
    let config = QueueConfig {
        max_delivery_attempts: 2,
        max_messages: 2,
        mode: QueueMode::Fanout,
        ..QueueConfig::default()
    };
    let a = r.apply(&Command::Configure { now_ms: 3, config });
    assert_eq!(a.outcome, Outcome::Configure);
    assert_eq!(a.dead_letter_due.len(), 1, "already at the lowered limit");
    assert_eq!(a.dead_letter_due[0].guid, guid(1));
    assert_eq!(
        r.state.config().mode,
        QueueMode::Work,
        "the mode never changes"
    );
    assert_eq!(
        put_results(&r.apply(&put(4, &[3], 1))),
        vec![PutOutcome::QuotaExceeded]
    );
    let restored = PartitionState::restore(&r.state.snapshot()).expect("restore");
    assert_eq!(restored, r.state);
}
