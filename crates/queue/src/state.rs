//! The replicated state of one partition: unsettled messages (metadata and the log
//! location of their payload), the GUID history, quotas, counters.
//!
//! Deterministic: the same commands in the same order give the same state on every
//! replica. Time is the commands' `now_ms` (never a clock read); it only moves forward.
//! The `HashMap`s here are lookups only: nothing iterates them in a way that affects
//! results or snapshots.

use crate::command::{Command, DecodedCommand};
use crate::{Guid, QueueError};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// Where a message's payload lives in the partition log: the entry and the byte range in its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub index: u64,
    pub offset: u32,
    pub len: u32,
}

/// Per-queue limits, the same on every replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    pub max_messages: u64,
    pub max_bytes: u64,
    pub max_message_bytes: u32,
    pub dedup_window_ms: u64,
    pub dedup_max_entries: u64,
    /// TTL of a message PUT without one (0 = no expiry).
    pub default_ttl_ms: u64,
    /// Largest TTL a PUT may ask for (0 = unlimited); more is refused.
    pub max_ttl_ms: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_messages: 10_000_000,
            max_bytes: 4 << 30,
            max_message_bytes: 4 << 20,
            dedup_window_ms: 5 * 60 * 1000,
            dedup_max_entries: 1_000_000,
            default_ttl_ms: 0,
            max_ttl_ms: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageMeta {
    /// Commit order within the partition.
    pub seq: u64,
    pub guid: Guid,
    pub location: Location,
    pub size_bytes: u32,
    pub enqueued_ms: u64,
    pub expires_ms: Option<u64>,
    pub key: Bytes,
}

/// The first outcome of a GUID, returned again to any retry within the dedup window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OriginalOutcome {
    Enqueued,
    QuotaExceeded,
    TooLarge,
    InvalidTtl,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    Enqueued {
        seq: u64,
    },
    Duplicate {
        original: OriginalOutcome,
    },
    QuotaExceeded,
    TooLarge,
    /// The PUT asked for a TTL above the queue's maximum.
    InvalidTtl,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfirmOutcome {
    Settled,
    Unknown,
}

/// What applying one command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    Put(Vec<(Guid, PutOutcome)>),
    Confirm(Vec<(Guid, ConfirmOutcome)>),
    Purge { removed: u64 },
    Tick,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionStats {
    pub depth: u64,
    pub bytes: u64,
    pub oldest_enqueued_ms: Option<u64>,
    pub puts_enqueued: u64,
    pub puts_duplicate: u64,
    pub puts_rejected: u64,
    pub confirms: u64,
    pub purged: u64,
    pub expired: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionState {
    config: QueueConfig,
    messages: BTreeMap<u64, MessageMeta>,
    by_guid: HashMap<Guid, u64>,
    /// (expires_ms, seq) of messages with a TTL.
    expiry: BTreeSet<(u64, u64)>,
    /// Unsettled messages per log index, for `min_live_index`.
    live_per_index: BTreeMap<u64, u32>,
    next_seq: u64,
    bytes: u64,
    now_ms: u64,
    dedup_order: VecDeque<(Guid, u64)>,
    dedup: HashMap<Guid, OriginalOutcome>,
    stats: PartitionStats,
}

impl PartitionState {
    pub fn new(config: QueueConfig) -> Self {
        PartitionState {
            config,
            messages: BTreeMap::new(),
            by_guid: HashMap::new(),
            expiry: BTreeSet::new(),
            live_per_index: BTreeMap::new(),
            next_seq: 1,
            bytes: 0,
            now_ms: 0,
            dedup_order: VecDeque::new(),
            dedup: HashMap::new(),
            stats: PartitionStats::default(),
        }
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    pub fn set_config(&mut self, config: QueueConfig) {
        self.config = config;
    }

    pub fn apply(&mut self, index: u64, decoded: &DecodedCommand) -> Applied {
        self.now_ms = self.now_ms.max(decoded.command.now_ms());
        self.expire();
        self.evict_dedup();
        match &decoded.command {
            Command::Put { messages, .. } => {
                assert_eq!(
                    messages.len(),
                    decoded.payload_offsets.len(),
                    "decoder gives one offset per message"
                );
                let out = messages
                    .iter()
                    .zip(&decoded.payload_offsets)
                    .map(|(m, off)| (m.guid, self.put(index, *off, m)))
                    .collect();
                Applied::Put(out)
            }
            Command::Confirm { guids, .. } => {
                Applied::Confirm(guids.iter().map(|g| (*g, self.confirm(g))).collect())
            }
            Command::Purge { .. } => {
                let removed = self.messages.len() as u64;
                let seqs: Vec<u64> = self.messages.keys().copied().collect();
                for seq in seqs {
                    self.remove(seq);
                }
                self.stats.purged += removed;
                Applied::Purge { removed }
            }
            Command::Tick { .. } => Applied::Tick,
        }
    }

    fn put(&mut self, index: u64, offset: u32, m: &crate::PutMessage) -> PutOutcome {
        if let Some(original) = self.dedup.get(&m.guid) {
            self.stats.puts_duplicate += 1;
            return PutOutcome::Duplicate {
                original: *original,
            };
        }
        let size = m.payload.len() as u64;
        let ttl_ms = if m.ttl_ms == 0 {
            self.config.default_ttl_ms
        } else {
            m.ttl_ms
        };
        let (outcome, original) = if size > u64::from(self.config.max_message_bytes) {
            (PutOutcome::TooLarge, OriginalOutcome::TooLarge)
        } else if self.config.max_ttl_ms > 0 && ttl_ms > self.config.max_ttl_ms {
            (PutOutcome::InvalidTtl, OriginalOutcome::InvalidTtl)
        } else if self.messages.len() as u64 >= self.config.max_messages
            || self.bytes + size > self.config.max_bytes
        {
            (PutOutcome::QuotaExceeded, OriginalOutcome::QuotaExceeded)
        } else {
            (
                PutOutcome::Enqueued {
                    seq: self.enqueue(index, offset, m, ttl_ms),
                },
                OriginalOutcome::Enqueued,
            )
        };
        if original == OriginalOutcome::Enqueued {
            self.stats.puts_enqueued += 1;
        } else {
            self.stats.puts_rejected += 1;
        }
        self.remember(m.guid, original);
        outcome
    }

    fn enqueue(&mut self, index: u64, offset: u32, m: &crate::PutMessage, ttl_ms: u64) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let expires_ms = (ttl_ms > 0).then(|| self.now_ms.saturating_add(ttl_ms));
        let meta = MessageMeta {
            seq,
            guid: m.guid,
            location: Location {
                index,
                offset,
                len: m.payload.len() as u32,
            },
            size_bytes: m.payload.len() as u32,
            enqueued_ms: self.now_ms,
            expires_ms,
            key: m.key.clone(),
        };
        if let Some(at) = expires_ms {
            self.expiry.insert((at, seq));
        }
        *self.live_per_index.entry(index).or_default() += 1;
        self.bytes += u64::from(meta.size_bytes);
        self.by_guid.insert(m.guid, seq);
        self.messages.insert(seq, meta);
        seq
    }

    fn confirm(&mut self, guid: &Guid) -> ConfirmOutcome {
        match self.by_guid.get(guid).copied() {
            Some(seq) => {
                self.remove(seq);
                self.stats.confirms += 1;
                ConfirmOutcome::Settled
            }
            None => ConfirmOutcome::Unknown,
        }
    }

    fn remove(&mut self, seq: u64) -> Option<MessageMeta> {
        let meta = self.messages.remove(&seq)?;
        self.by_guid.remove(&meta.guid);
        if let Some(at) = meta.expires_ms {
            self.expiry.remove(&(at, seq));
        }
        let idx = meta.location.index;
        if let Some(n) = self.live_per_index.get_mut(&idx) {
            *n -= 1;
            if *n == 0 {
                self.live_per_index.remove(&idx);
            }
        }
        self.bytes -= u64::from(meta.size_bytes);
        Some(meta)
    }

    /// Removes messages whose TTL has passed (by command time).
    fn expire(&mut self) {
        while let Some(&(at, seq)) = self.expiry.first() {
            if at > self.now_ms {
                break;
            }
            self.remove(seq);
            self.stats.expired += 1;
        }
    }

    fn remember(&mut self, guid: Guid, outcome: OriginalOutcome) {
        self.dedup.insert(guid, outcome);
        self.dedup_order.push_back((guid, self.now_ms));
        self.evict_dedup();
    }

    /// Keeps the GUID history within its time window and count.
    fn evict_dedup(&mut self) {
        while let Some(&(guid, at)) = self.dedup_order.front() {
            let too_old = at.saturating_add(self.config.dedup_window_ms) < self.now_ms;
            let too_many = self.dedup_order.len() as u64 > self.config.dedup_max_entries;
            if !too_old && !too_many {
                break;
            }
            self.dedup_order.pop_front();
            self.dedup.remove(&guid);
        }
    }

    pub fn message(&self, guid: &Guid) -> Option<&MessageMeta> {
        self.messages.get(self.by_guid.get(guid)?)
    }

    pub fn message_by_seq(&self, seq: u64) -> Option<&MessageMeta> {
        self.messages.get(&seq)
    }

    /// Unsettled messages in commit order.
    pub fn unsettled(&self) -> impl Iterator<Item = &MessageMeta> {
        self.messages.values()
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// When the next message expires (by command time), if any has a TTL. The leader
    /// proposes a `Tick` then, so expiry happens without traffic.
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.expiry.first().map(|(at, _)| *at)
    }

    /// The smallest log index still holding an unsettled message's payload.
    pub fn min_live_index(&self) -> Option<u64> {
        self.live_per_index.keys().next().copied()
    }

    pub fn stats(&self) -> PartitionStats {
        PartitionStats {
            depth: self.messages.len() as u64,
            bytes: self.bytes,
            oldest_enqueued_ms: self.messages.values().next().map(|m| m.enqueued_ms),
            ..self.stats.clone()
        }
    }

    /// All replicated state except payloads (they stay in the log).
    pub fn snapshot(&self) -> Bytes {
        let mut b =
            BytesMut::with_capacity(64 + self.messages.len() * 80 + self.dedup_order.len() * 25);
        b.put_u8(1); // format version
        b.put_u64(self.next_seq);
        b.put_u64(self.now_ms);
        let s = &self.stats;
        for v in [
            s.puts_enqueued,
            s.puts_duplicate,
            s.puts_rejected,
            s.confirms,
            s.purged,
            s.expired,
        ] {
            b.put_u64(v);
        }
        b.put_u64(self.messages.len() as u64);
        for m in self.messages.values() {
            b.put_u64(m.seq);
            b.put_slice(&m.guid);
            b.put_u64(m.location.index);
            b.put_u32(m.location.offset);
            b.put_u32(m.location.len);
            b.put_u64(m.enqueued_ms);
            b.put_u64(m.expires_ms.unwrap_or(0));
            b.put_u16(m.key.len() as u16);
            b.put_slice(&m.key);
        }
        b.put_u64(self.dedup_order.len() as u64);
        for (g, at) in &self.dedup_order {
            b.put_slice(g);
            b.put_u64(*at);
            b.put_u8(match self.dedup.get(g) {
                Some(OriginalOutcome::QuotaExceeded) => 1,
                Some(OriginalOutcome::TooLarge) => 2,
                Some(OriginalOutcome::InvalidTtl) => 3,
                _ => 0,
            });
        }
        b.freeze()
    }

    pub fn restore(bytes: &Bytes, config: QueueConfig) -> Result<Self, QueueError> {
        let mut b = bytes.clone();
        let need = |b: &Bytes, n: usize| {
            if b.remaining() < n {
                Err(QueueError::Decode("truncated snapshot".into()))
            } else {
                Ok(())
            }
        };
        need(&b, 1)?;
        if b.get_u8() != 1 {
            return Err(QueueError::Decode("unknown snapshot version".into()));
        }
        let mut st = PartitionState::new(config);
        need(&b, 8 * 9)?;
        st.next_seq = b.get_u64();
        st.now_ms = b.get_u64();
        let s = &mut st.stats;
        for v in [
            &mut s.puts_enqueued,
            &mut s.puts_duplicate,
            &mut s.puts_rejected,
            &mut s.confirms,
            &mut s.purged,
            &mut s.expired,
        ] {
            *v = b.get_u64();
        }
        let n = b.get_u64();
        for _ in 0..n {
            need(&b, 8 + 16 + 8 + 4 + 4 + 8 + 8 + 2)?;
            let seq = b.get_u64();
            let mut guid = [0u8; 16];
            b.copy_to_slice(&mut guid);
            let location = Location {
                index: b.get_u64(),
                offset: b.get_u32(),
                len: b.get_u32(),
            };
            let enqueued_ms = b.get_u64();
            let expires = b.get_u64();
            let key_len = b.get_u16() as usize;
            need(&b, key_len)?;
            let key = b.split_to(key_len);
            let meta = MessageMeta {
                seq,
                guid,
                location,
                size_bytes: location.len,
                enqueued_ms,
                expires_ms: (expires > 0).then_some(expires),
                key,
            };
            if let Some(at) = meta.expires_ms {
                st.expiry.insert((at, seq));
            }
            *st.live_per_index.entry(location.index).or_default() += 1;
            st.bytes += u64::from(location.len);
            st.by_guid.insert(guid, seq);
            st.messages.insert(seq, meta);
        }
        need(&b, 8)?;
        let d = b.get_u64();
        for _ in 0..d {
            need(&b, 16 + 8 + 1)?;
            let mut guid = [0u8; 16];
            b.copy_to_slice(&mut guid);
            let at = b.get_u64();
            let outcome = match b.get_u8() {
                1 => OriginalOutcome::QuotaExceeded,
                2 => OriginalOutcome::TooLarge,
                3 => OriginalOutcome::InvalidTtl,
                _ => OriginalOutcome::Enqueued,
            };
            st.dedup.insert(guid, outcome);
            st.dedup_order.push_back((guid, at));
        }
        if b.has_remaining() {
            return Err(QueueError::Decode("trailing bytes in snapshot".into()));
        }
        Ok(st)
    }
}
