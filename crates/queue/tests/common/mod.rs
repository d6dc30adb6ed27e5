//! Helpers shared by the integration tests.
#![allow(dead_code)]

use bytes::Bytes;
use tern_queue::*;

pub fn guid(i: u32) -> Guid {
    let mut g = [0u8; 16];
    g[..4].copy_from_slice(&i.to_be_bytes());
    g
}

pub fn msg(i: u32, size_bytes: usize, ttl_ms: u64) -> PutMessage {
    PutMessage {
        guid: guid(i),
        ttl_ms,
        key: Bytes::from(format!("k{i}")),
        payload: Bytes::from(vec![i as u8; size_bytes]),
        dead_letter: None,
    }
}

pub fn put(now_ms: u64, ids: &[u32], size_bytes: usize) -> Command {
    Command::Put {
        now_ms,
        messages: ids.iter().map(|i| msg(*i, size_bytes, 0)).collect(),
    }
}

pub fn confirm(now_ms: u64, subscription: &str, ids: &[u32]) -> Command {
    Command::Confirm {
        now_ms,
        subscription: subscription.into(),
        guids: ids.iter().map(|i| guid(*i)).collect(),
    }
}

/// A partition with its own log index counter, applying through encode/decode.
pub struct Replica {
    pub state: PartitionState,
    pub index: u64,
}

impl Replica {
    pub fn new(config: QueueConfig) -> Self {
        Replica {
            state: PartitionState::new(config),
            index: 0,
        }
    }

    pub fn apply(&mut self, cmd: &Command) -> Applied {
        self.index += 1;
        let data = cmd.encode();
        let decoded = Command::decode(&data).expect("decode");
        assert_eq!(&decoded.command, cmd);
        self.state.apply(self.index, &decoded)
    }
}

pub fn put_results(applied: &Applied) -> Vec<PutOutcome> {
    match &applied.outcome {
        Outcome::Put(results) => results.iter().map(|(_, o)| *o).collect(),
        other => panic!("not a put: {other:?}"),
    }
}

pub fn confirm_results(applied: &Applied) -> Vec<ConfirmOutcome> {
    match &applied.outcome {
        Outcome::Confirm { results, .. } | Outcome::Settle { results, .. } => {
            results.iter().map(|(_, o)| *o).collect()
        }
        other => panic!("not a confirm: {other:?}"),
    }
}

pub fn limits(msgs: u32, bytes: u64) -> FlowLimits {
    FlowLimits {
        max_unconfirmed_msgs: msgs,
        max_unconfirmed_bytes: bytes,
    }
}
