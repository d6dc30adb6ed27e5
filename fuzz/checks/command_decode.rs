//! The check behind the `command_decode` fuzz target, shared with the corpus replay test
//! `crates/queue/tests/fuzz_corpus.rs` (included there with `#[path]`).
//!
//! Byte 0 picks what the rest is fed to:
//! - even: `Command::decode` (a Raft entry's data). After `Ok`: each Put payload offset
//!   points at that payload in the input; the command re-encodes and decodes back to
//!   itself with the offsets `DecodedCommand::from_command` computes; applying it to a
//!   fresh partition state does not panic and leaves a state whose snapshot restores.
//! - odd: `PartitionState::restore` (a snapshot file's body). After `Ok`: the snapshot
//!   is canonical (restore ∘ snapshot is the identity on bytes); the read-only queries
//!   and applying a Tick do not panic ("restore refuses inconsistent input").

use bytes::Bytes;
use tern_queue::{Command, DecodedCommand, PartitionState, QueueConfig};

fn snapshot_round_trip(state: &PartitionState) {
    let snap = state.snapshot();
    let back = PartitionState::restore(&snap)
        .unwrap_or_else(|e| panic!("a state's own snapshot does not restore: {e}"));
    assert_eq!(back.snapshot(), snap, "snapshot is not canonical");
}

fn poke(state: &mut PartitionState, index: u64) {
    let _ = state.stats();
    let _ = state.dead_letters_due();
    let _ = state.min_live_index();
    let _ = state.next_expiry_ms();
    let _ = state.next_retention_ms();
    let subs: Vec<String> = state.subscriptions().map(str::to_owned).collect();
    for s in &subs {
        let _ = state.subscription_stats(s);
        let _ = state.pending(s).count();
    }
    let tick = DecodedCommand::from_command(Command::Tick {
        now_ms: state.now_ms().saturating_add(1),
    });
    state.apply(index, &tick);
    snapshot_round_trip(state);
}

pub fn check(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = Bytes::copy_from_slice(rest);
    if mode % 2 == 0 {
        let Ok(decoded) = Command::decode(&bytes) else {
            return;
        };
        if let Command::Put { messages, .. } = &decoded.command {
            assert_eq!(decoded.payload_offsets.len(), messages.len());
            for (m, &off) in messages.iter().zip(&decoded.payload_offsets) {
                let off = off as usize;
                assert_eq!(
                    bytes.get(off..off + m.payload.len()),
                    Some(&m.payload[..]),
                    "payload offset {off} does not point at the payload"
                );
            }
        }
        let encoded = decoded.command.encode();
        let again = Command::decode(&encoded)
            .unwrap_or_else(|e| panic!("a decoded command does not re-encode: {e}"));
        assert_eq!(again.command, decoded.command, "re-encoded command differs");
        assert_eq!(
            again.payload_offsets,
            DecodedCommand::from_command(decoded.command.clone()).payload_offsets,
            "from_command's payload offsets disagree with decode's"
        );
        let mut state = PartitionState::new(QueueConfig::default());
        state.apply(1, &decoded);
        poke(&mut state, 2);
    } else {
        let Ok(mut state) = PartitionState::restore(&bytes) else {
            return;
        };
        snapshot_round_trip(&state);
        let index = u64::MAX >> 1;
        poke(&mut state, index);
    }
}
