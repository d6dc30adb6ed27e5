use super::*;
use bytes::Bytes;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

fn guid(i: u32) -> Guid {
    let mut g = [0u8; 16];
    g[..4].copy_from_slice(&i.to_be_bytes());
    g
}

fn put_cmd(now_ms: u64, ids: &[u32], size: usize) -> Command {
    let messages = ids
        .iter()
        .map(|i| PutMessage {
            guid: guid(*i),
            ttl_ms: 0,
            key: Bytes::new(),
            payload: Bytes::from(vec![*i as u8; size]),
        })
        .collect();
    Command::Put { now_ms, messages }
}

fn apply(st: &mut PartitionState, index: u64, cmd: &Command) -> Applied {
    let data = cmd.encode();
    let decoded = Command::decode(&data).expect("decode");
    assert_eq!(&decoded.command, cmd);
    st.apply(index, &decoded)
}

#[test]
fn command_round_trip_and_payload_offsets() {
    let cmd = put_cmd(5, &[1, 2, 3], 10);
    let data = cmd.encode();
    let d = Command::decode(&data).expect("decode");
    let Command::Put { messages, .. } = &d.command else {
        panic!("not a put")
    };
    for (m, off) in messages.iter().zip(&d.payload_offsets) {
        assert_eq!(
            &data[*off as usize..*off as usize + m.payload.len()],
            &m.payload[..]
        );
    }
    let confirm = Command::Confirm {
        now_ms: 9,
        subscription: "s".into(),
        guids: vec![guid(1)],
    };
    assert_eq!(
        Command::decode(&confirm.encode()).expect("decode").command,
        confirm
    );
    assert!(Command::decode(&Bytes::from_static(&[
        1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff
    ]))
    .is_err());
    assert!(Command::decode(&Bytes::from_static(&[9])).is_err());
}

#[test]
fn dedup_returns_the_original_outcome_and_quota_is_enforced() {
    let cfg = QueueConfig {
        max_messages: 2,
        max_message_bytes: 100,
        ..QueueConfig::default()
    };
    let mut st = PartitionState::new(cfg);
    let a = apply(&mut st, 1, &put_cmd(1, &[1, 2, 3], 10));
    let Applied::Put(o) = a else { panic!() };
    assert!(matches!(o[0].1, PutOutcome::Enqueued { .. }));
    assert!(matches!(o[1].1, PutOutcome::Enqueued { .. }));
    assert_eq!(o[2].1, PutOutcome::QuotaExceeded);
    let Applied::Put(o) = apply(&mut st, 2, &put_cmd(2, &[1, 3, 4], 10)) else {
        panic!()
    };
    assert_eq!(
        o[0].1,
        PutOutcome::Duplicate {
            original: OriginalOutcome::Enqueued
        }
    );
    assert_eq!(
        o[1].1,
        PutOutcome::Duplicate {
            original: OriginalOutcome::QuotaExceeded
        }
    );
    assert_eq!(o[2].1, PutOutcome::QuotaExceeded);
    let Applied::Put(o) = apply(&mut st, 3, &put_cmd(3, &[9], 200)) else {
        panic!()
    };
    assert_eq!(o[0].1, PutOutcome::TooLarge);
    assert_eq!(st.stats().depth, 2);
    // Confirmed messages stay in the GUID history: a late retry is not enqueued again.
    apply(
        &mut st,
        4,
        &Command::Confirm {
            now_ms: 4,
            subscription: String::new(),
            guids: vec![guid(1)],
        },
    );
    let Applied::Put(o) = apply(&mut st, 5, &put_cmd(5, &[1], 10)) else {
        panic!()
    };
    assert_eq!(
        o[0].1,
        PutOutcome::Duplicate {
            original: OriginalOutcome::Enqueued
        }
    );
}

#[test]
fn dedup_window_evicts_by_command_time_and_count() {
    let cfg = QueueConfig {
        dedup_window_ms: 100,
        dedup_max_entries: 1000,
        ..QueueConfig::default()
    };
    let mut st = PartitionState::new(cfg);
    apply(&mut st, 1, &put_cmd(1_000, &[1], 1));
    apply(&mut st, 2, &Command::Tick { now_ms: 1_050 });
    let Applied::Put(o) = apply(&mut st, 3, &put_cmd(1_060, &[1], 1)) else {
        panic!()
    };
    assert!(matches!(o[0].1, PutOutcome::Duplicate { .. }));
    apply(&mut st, 4, &Command::Tick { now_ms: 1_200 });
    let Applied::Put(o) = apply(&mut st, 5, &put_cmd(1_201, &[1], 1)) else {
        panic!()
    };
    assert!(
        matches!(o[0].1, PutOutcome::Enqueued { .. }),
        "window passed: {o:?}"
    );
}

#[test]
fn ttl_expires_by_command_time_and_min_live_index_moves() {
    let mut st = PartitionState::new(QueueConfig::default());
    let cmd = Command::Put {
        now_ms: 100,
        messages: vec![PutMessage {
            guid: guid(1),
            ttl_ms: 50,
            key: Bytes::new(),
            payload: Bytes::from_static(b"x"),
        }],
    };
    apply(&mut st, 7, &cmd);
    apply(&mut st, 8, &put_cmd(120, &[2], 1));
    assert_eq!(st.min_live_index(), Some(7));
    apply(&mut st, 9, &Command::Tick { now_ms: 151 });
    assert_eq!(st.stats().expired, 1);
    assert_eq!(st.min_live_index(), Some(8));
    assert!(st.message(&guid(1)).is_none());
}

#[test]
fn dispatcher_round_robin_flow_control_and_redelivery() {
    let mut st = PartitionState::new(QueueConfig::default());
    let mut d = Dispatcher::new();
    let limits = FlowLimits {
        max_unconfirmed_msgs: 2,
        max_unconfirmed_bytes: 1 << 20,
    };
    d.add_consumer(1, limits);
    d.add_consumer(2, limits);
    let a = apply(&mut st, 1, &put_cmd(1, &[1, 2, 3, 4, 5], 10));
    d.on_applied(&st, &a);
    let got = d.poll(&st, 1, 100);
    assert_eq!(got.len(), 4, "2 consumers x 2 unconfirmed");
    assert_eq!(got.iter().filter(|x| x.consumer == 1).count(), 2);
    let seqs: Vec<u64> = got.iter().map(|x| x.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    d.remove_consumer(1);
    let again = d.poll(&st, 1, 100);
    assert!(again.is_empty(), "consumer 2 is full");
    let held2: Vec<Guid> = got
        .iter()
        .filter(|x| x.consumer == 2)
        .map(|x| x.guid)
        .collect();
    let c = apply(
        &mut st,
        2,
        &Command::Confirm {
            now_ms: 2,
            subscription: String::new(),
            guids: held2,
        },
    );
    d.on_applied(&st, &c);
    let again = d.poll(&st, 2, 100);
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|x| x.consumer == 2));
    assert_eq!(again[0].attempt, 2, "redelivered with attempt raised");
    assert_eq!(again[0].seq, 1, "redeliveries keep commit order");
    assert!(d.check_confirm(2, &again[0].guid).is_ok());
    assert!(d.check_confirm(1, &again[0].guid).is_err());
}

#[test]
fn oversized_message_still_reaches_an_idle_consumer() {
    let mut st = PartitionState::new(QueueConfig::default());
    let mut d = Dispatcher::new();
    d.add_consumer(
        1,
        FlowLimits {
            max_unconfirmed_msgs: 10,
            max_unconfirmed_bytes: 5,
        },
    );
    let a = apply(&mut st, 1, &put_cmd(1, &[1, 2], 10));
    d.on_applied(&st, &a);
    assert_eq!(d.poll(&st, 1, 10).len(), 1);
}

#[test]
fn visibility_timeout_redelivers_to_another_consumer_and_extend_defers_it() {
    let mut st = PartitionState::new(QueueConfig::default());
    let mut d = Dispatcher::new();
    d.set_visibility_timeout(100);
    let limits = FlowLimits {
        max_unconfirmed_msgs: 1,
        max_unconfirmed_bytes: 1 << 20,
    };
    d.add_consumer(1, limits);
    let a = apply(&mut st, 1, &put_cmd(1_000, &[1, 2], 10));
    d.on_applied(&st, &a);
    let first = d.poll(&st, 1_000, 10);
    assert_eq!(first.len(), 1);
    assert_eq!(d.next_timer_ms(), Some(1_100));
    d.add_consumer(2, limits);
    let second = d.poll(&st, 1_050, 10);
    assert_eq!(second.len(), 1, "consumer 2 gets the other message");
    // Consumer 1 extends its message; consumer 2 does not.
    d.extend(1, &first[0].guid, 1_090, 500).expect("held");
    assert!(
        d.extend(2, &first[0].guid, 1_090, 500).is_err(),
        "only the holder extends"
    );
    // At 1_200 consumer 2's message (deadline 1_150) has timed out: it goes back and,
    // consumer 2 having room again, is redelivered to it with attempt 2. Consumer 1's
    // extended message (deadline 1_590) stays where it is.
    let later = d.poll(&st, 1_200, 10);
    let redelivered: Vec<(u64, u64, u32)> = later
        .iter()
        .map(|x| (x.consumer, x.seq, x.attempt))
        .collect();
    assert_eq!(redelivered, vec![(2, second[0].seq, 2)]);
    assert!(d.check_confirm(1, &first[0].guid).is_ok());
    // After its extended deadline consumer 1's message goes back too.
    d.remove_consumer(2);
    assert!(d.poll(&st, 1_589, 10).is_empty());
    let last = d.poll(&st, 1_590, 10);
    // Consumer 1 (room for one) gets its own message back first: commit order.
    let got: Vec<(u64, u32)> = last.iter().map(|x| (x.seq, x.attempt)).collect();
    assert_eq!(got, vec![(first[0].seq, 2)]);
}

#[test]
fn nack_with_delay_returns_the_message_after_the_delay() {
    let mut st = PartitionState::new(QueueConfig::default());
    let mut d = Dispatcher::new();
    d.add_consumer(
        1,
        FlowLimits {
            max_unconfirmed_msgs: 10,
            max_unconfirmed_bytes: 1 << 20,
        },
    );
    let a = apply(&mut st, 1, &put_cmd(1_000, &[1], 10));
    d.on_applied(&st, &a);
    let got = d.poll(&st, 1_000, 10);
    assert!(
        d.nack(2, &got[0].guid, 1_000, 0).is_err(),
        "only the holder may NACK"
    );
    d.nack(1, &got[0].guid, 1_000, 250).expect("nack");
    assert_eq!((d.delayed(), d.inflight()), (1, 0));
    assert!(d.poll(&st, 1_249, 10).is_empty());
    let back = d.poll(&st, 1_250, 10);
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].attempt, 2);
    d.nack(1, &back[0].guid, 1_300, 0).expect("nack now");
    assert_eq!(d.poll(&st, 1_300, 10)[0].attempt, 3);
}

#[test]
fn queue_default_and_max_ttl() {
    let cfg = QueueConfig {
        default_ttl_ms: 100,
        max_ttl_ms: 1_000,
        ..QueueConfig::default()
    };
    let mut st = PartitionState::new(cfg);
    let long = Command::Put {
        now_ms: 10,
        messages: vec![PutMessage {
            guid: guid(7),
            ttl_ms: 5_000,
            key: Bytes::new(),
            payload: Bytes::from_static(b"x"),
        }],
    };
    let Applied::Put(o) = apply(&mut st, 1, &long) else {
        panic!()
    };
    assert_eq!(o[0].1, PutOutcome::InvalidTtl);
    let Applied::Put(o) = apply(&mut st, 2, &put_cmd(10, &[1], 1)) else {
        panic!()
    };
    assert!(matches!(o[0].1, PutOutcome::Enqueued { .. }));
    assert_eq!(st.next_expiry_ms(), Some(110), "the queue default applies");
    apply(&mut st, 3, &Command::Tick { now_ms: 110 });
    assert_eq!((st.stats().depth, st.stats().expired), (0, 1));
    assert_eq!(st.next_expiry_ms(), None);
    // A retry of the refused PUT gets the same answer from the dedup history.
    let Applied::Put(o) = apply(&mut st, 4, &long) else {
        panic!()
    };
    assert_eq!(
        o[0].1,
        PutOutcome::Duplicate {
            original: OriginalOutcome::InvalidTtl
        }
    );
}

#[derive(Debug, Clone)]
enum Op {
    Put(Vec<u32>),
    Poll,
    Confirm(usize),
    AddConsumer(u64),
    RemoveConsumer(u64),
    Purge,
    Tick(u64),
    SnapshotRestore,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(0u32..60, 1..5).prop_map(Op::Put),
        4 => Just(Op::Poll),
        4 => any::<usize>().prop_map(Op::Confirm),
        1 => (1u64..4).prop_map(Op::AddConsumer),
        1 => (1u64..4).prop_map(Op::RemoveConsumer),
        1 => Just(Op::Purge),
        1 => (0u64..1000).prop_map(Op::Tick),
        1 => Just(Op::SnapshotRestore),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Random interleavings: no message is held by two consumers at once; flow limits
    /// hold; first deliveries follow commit order; every enqueued message ends
    /// confirmed or purged exactly once; a snapshot/restore changes nothing; two
    /// replicas applying the same commands agree.
    #[test]
    fn state_machine_invariants(ops in prop::collection::vec(op(), 1..80)) {
        let cfg = QueueConfig { max_messages: 40, ..QueueConfig::default() };
        let mut st = PartitionState::new(cfg.clone());
        let mut replica = PartitionState::new(cfg.clone());
        let mut d = Dispatcher::new();
        let limits = FlowLimits { max_unconfirmed_msgs: 3, max_unconfirmed_bytes: 1 << 20 };
        let mut index = 0u64;
        let mut now = 1u64;
        let mut enqueued: BTreeSet<u64> = BTreeSet::new();
        let mut ended: BTreeMap<u64, &'static str> = BTreeMap::new();
        let mut first_delivered: Vec<u64> = Vec::new();
        let mut holder: BTreeMap<Guid, u64> = BTreeMap::new();
        let mut run = |cmd: Command, st: &mut PartitionState, replica: &mut PartitionState, d: &mut Dispatcher| -> Applied {
            index += 1;
            let a = apply(st, index, &cmd);
            let b = apply(replica, index, &cmd);
            assert_eq!(&a, &b);
            d.on_applied(st, &a);
            a
        };
        for op in ops {
            now += 1;
            match op {
                Op::Put(ids) => {
                    let a = run(put_cmd(now, &ids, 8), &mut st, &mut replica, &mut d);
                    if let Applied::Put(o) = a {
                        for (_, out) in o {
                            if let PutOutcome::Enqueued { seq } = out {
                                prop_assert!(enqueued.insert(seq), "seq enqueued twice");
                            }
                        }
                    }
                }
                Op::Poll => {
                    for del in d.poll(&st, now, 10) {
                        prop_assert!(holder.insert(del.guid, del.consumer).is_none(), "held by two consumers");
                        if del.attempt == 1 { first_delivered.push(del.seq); }
                    }
                }
                Op::Confirm(pick) => {
                    if !holder.is_empty() {
                        let (g, c) = holder.iter().nth(pick % holder.len()).map(|(g, c)| (*g, *c)).expect("one");
                        prop_assert!(d.check_confirm(c, &g).is_ok());
                        let seq = st.message(&g).map(|m| m.seq);
                        let a = run(Command::Confirm { now_ms: now, subscription: String::new(), guids: vec![g] }, &mut st, &mut replica, &mut d);
                        holder.remove(&g);
                        if let (Applied::Confirm(o), Some(seq)) = (a, seq) {
                            prop_assert_eq!(o[0].1, ConfirmOutcome::Settled);
                            prop_assert!(ended.insert(seq, "confirmed").is_none(), "ended twice");
                        }
                    }
                }
                Op::AddConsumer(c) => d.add_consumer(c, limits),
                Op::RemoveConsumer(c) => {
                    d.remove_consumer(c);
                    holder.retain(|_, h| *h != c);
                }
                Op::Purge => {
                    let live: Vec<u64> = st.unsettled().map(|m| m.seq).collect();
                    run(Command::Purge { now_ms: now }, &mut st, &mut replica, &mut d);
                    for seq in live { prop_assert!(ended.insert(seq, "purged").is_none()); }
                    holder.clear();
                }
                Op::Tick(dt) => { now += dt; run(Command::Tick { now_ms: now }, &mut st, &mut replica, &mut d); }
                Op::SnapshotRestore => {
                    let restored = PartitionState::restore(&st.snapshot(), cfg.clone()).expect("restore");
                    prop_assert_eq!(&restored, &st);
                    st = restored;
                }
            }
            for c in 1..4u64 { prop_assert!(d.held_by(c) <= 3); }
            prop_assert_eq!(d.inflight(), holder.len());
        }
        let mut sorted = first_delivered.clone();
        sorted.sort_unstable();
        prop_assert_eq!(first_delivered, sorted, "first deliveries in commit order");
        // Everything enqueued is either still unsettled or ended exactly once.
        let live: BTreeSet<u64> = st.unsettled().map(|m| m.seq).collect();
        for seq in &enqueued {
            prop_assert!(live.contains(seq) ^ ended.contains_key(seq), "seq {} lost or double-ended", seq);
        }
        prop_assert_eq!(st.snapshot(), replica.snapshot());
    }
}
