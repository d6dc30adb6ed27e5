//! Snapshots of the replicated state: everything but payloads, canonical bytes.

use super::*;
use crate::command::Reader;
use crate::config::{put_config, read_config};

/// Snapshot format version; see `snapshot`.
const SNAPSHOT_VERSION: u8 = 3;
/// The previous version (no dead-letter info per message) is still read.
const SNAPSHOT_VERSION_V2: u8 = 2;

impl PartitionState {
    /// All replicated state (config, messages' metadata and locations, subscriptions,
    /// attempt counts, the GUID history, counters), NOT payloads: they stay in the log
    /// from [`Self::min_live_index`] on. Canonical: equal states give equal bytes.
    ///
    /// Format (big-endian): `u8 version (= 3; 2 is still read) | config | u64 now_ms | u64 next_seq |
    /// 9 × u64 counters | u64 n, n × message | u64 n, n × subscription |
    /// u64 n, n × { guid[16] | u64 at_ms | u8 outcome }`.
    pub fn snapshot(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(
            256 + self.messages.len() * 80 + self.dedup.len() * 25 + self.subscriptions.len() * 64,
        );
        b.put_u8(SNAPSHOT_VERSION);
        put_config(&mut b, &self.config);
        b.put_u64(self.now_ms);
        b.put_u64(self.next_seq);
        for v in counters_list(&self.counters) {
            b.put_u64(v);
        }
        b.put_u64(self.messages.len() as u64);
        for m in self.messages.values() {
            put_meta(&mut b, &m.meta);
        }
        b.put_u64(self.subscriptions.len() as u64);
        for (name, sub) in &self.subscriptions {
            put_subscription(&mut b, name, sub);
        }
        b.put_u64(self.dedup.len() as u64);
        for (guid, at_ms, outcome) in self.dedup.iter() {
            b.put_slice(&guid);
            b.put_u64(at_ms);
            b.put_u8(outcome_code(outcome));
        }
        b.freeze()
    }

    /// Rebuilds a state from [`Self::snapshot`] bytes; refuses inconsistent input.
    pub fn restore(bytes: &Bytes) -> Result<Self, CommandError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != SNAPSHOT_VERSION && version != SNAPSHOT_VERSION_V2 {
            return Err(CommandError::UnknownVersion(version));
        }
        let config = read_config(&mut r)?;
        let mut st = PartitionState::new(config);
        st.subscriptions.clear();
        st.now_ms = r.u64()?;
        st.next_seq = r.u64()?;
        st.counters = read_counters(&mut r)?;
        let n = r.count64(8 + 16 + 8 + 4 + 4 + 8 + 1 + 2)?;
        let mut metas = Vec::with_capacity(n);
        for _ in 0..n {
            metas.push(read_meta(&mut r, version)?);
        }
        let n = r.count64(2 + 8 + 5 * 8 + 3 * 8)?;
        for _ in 0..n {
            let (name, sub) = read_subscription(&mut r)?;
            if st.subscriptions.insert(name, sub).is_some() {
                return Err(CommandError::BadSnapshot("subscription twice"));
            }
        }
        let n = r.count64(16 + 8 + 1)?;
        for _ in 0..n {
            let guid = r.guid()?;
            let at_ms = r.u64()?;
            let outcome = outcome_from_code(r.u8()?)?;
            if st.dedup.get(&guid).is_some() {
                return Err(CommandError::BadSnapshot("GUID twice in history"));
            }
            st.dedup.insert(guid, outcome, at_ms);
        }
        r.finish()?;
        st.rebuild_derived(metas)?;
        Ok(st)
    }

    /// Re-inserts messages and recomputes every derived index and count.
    fn rebuild_derived(&mut self, metas: Vec<MessageMeta>) -> Result<(), CommandError> {
        let mut last_seq = 0;
        for meta in metas {
            if meta.seq <= last_seq || meta.seq >= self.next_seq {
                return Err(CommandError::BadSnapshot("message seqs out of order"));
            }
            if self.seq_by_guid.contains_key(&meta.guid) {
                return Err(CommandError::BadSnapshot("GUID names two messages"));
            }
            last_seq = meta.seq;
            let mut needed_by = 0;
            for sub in self.subscriptions.values_mut() {
                if sub.needs(meta.seq) {
                    needed_by += 1;
                    sub.pending_msgs += 1;
                    sub.pending_bytes += u64::from(meta.size_bytes);
                }
            }
            if needed_by == 0 {
                return Err(CommandError::BadSnapshot("message nobody needs"));
            }
            self.insert_message(Message { meta, needed_by });
        }
        self.check_consistency()
            .map_err(CommandError::BadSnapshot)?;
        Ok(())
    }
}

fn counters_list(c: &Counters) -> [u64; 9] {
    [
        c.puts_enqueued,
        c.puts_duplicate,
        c.puts_rejected,
        c.confirms,
        c.purged,
        c.expired,
        c.dead_lettered,
        c.dropped,
        c.unrouted,
    ]
}

fn read_counters(r: &mut Reader<'_>) -> Result<Counters, CommandError> {
    Ok(Counters {
        puts_enqueued: r.u64()?,
        puts_duplicate: r.u64()?,
        puts_rejected: r.u64()?,
        confirms: r.u64()?,
        purged: r.u64()?,
        expired: r.u64()?,
        dead_lettered: r.u64()?,
        dropped: r.u64()?,
        unrouted: r.u64()?,
    })
}

fn put_meta(b: &mut BytesMut, m: &MessageMeta) {
    b.put_u64(m.seq);
    b.put_slice(&m.guid);
    b.put_u64(m.location.index);
    b.put_u32(m.location.offset);
    b.put_u32(m.location.len);
    b.put_u64(m.enqueued_ms);
    match m.expires_ms {
        Some(at_ms) => {
            b.put_u8(1);
            b.put_u64(at_ms);
        }
        None => b.put_u8(0),
    }
    b.put_u16(m.key.len() as u16);
    b.put_slice(&m.key);
    match &m.dead_letter {
        Some(d) => {
            b.put_u8(1);
            crate::command::put_dead_letter(b, d);
        }
        None => b.put_u8(0),
    }
}

fn read_meta(r: &mut Reader<'_>, version: u8) -> Result<MessageMeta, CommandError> {
    let seq = r.u64()?;
    let guid = r.guid()?;
    let location = Location {
        index: r.u64()?,
        offset: r.u32()?,
        len: r.u32()?,
    };
    let enqueued_ms = r.u64()?;
    let expires_ms = match r.u8()? {
        0 => None,
        1 => Some(r.u64()?),
        _ => return Err(CommandError::BadSnapshot("bad expiry flag")),
    };
    let key_len = usize::from(r.u16()?);
    let key = r.bytes(key_len)?;
    let dead_letter = match version {
        SNAPSHOT_VERSION_V2 => None,
        _ => match r.u8()? {
            0 => None,
            1 => Some(std::sync::Arc::new(crate::command::read_dead_letter(r)?)),
            _ => return Err(CommandError::BadSnapshot("bad dead-letter flag")),
        },
    };
    Ok(MessageMeta {
        seq,
        guid,
        location,
        size_bytes: location.len,
        enqueued_ms,
        expires_ms,
        key,
        dead_letter,
    })
}

fn put_subscription(b: &mut BytesMut, name: &str, sub: &Subscription) {
    put_name(b, name);
    b.put_u64(sub.start_seq);
    let c = &sub.counters;
    for v in [c.confirmed, c.dead_lettered, c.expired, c.dropped, c.purged] {
        b.put_u64(v);
    }
    b.put_u64(sub.settled.len() as u64);
    for seq in &sub.settled {
        b.put_u64(*seq);
    }
    b.put_u64(sub.attempts.len() as u64);
    for (seq, attempts) in &sub.attempts {
        b.put_u64(*seq);
        b.put_u32(*attempts);
    }
    b.put_u64(sub.dead_letter_due.len() as u64);
    for (seq, reason) in &sub.dead_letter_due {
        b.put_u64(*seq);
        b.put_u8(match reason {
            DeadLetterReason::MaxAttempts => 1,
            DeadLetterReason::Expired => 2,
        });
    }
}

fn read_subscription(r: &mut Reader<'_>) -> Result<(String, Subscription), CommandError> {
    let name = r.name()?;
    let mut sub = Subscription::new(r.u64()?);
    sub.counters = SubCounters {
        confirmed: r.u64()?,
        dead_lettered: r.u64()?,
        expired: r.u64()?,
        dropped: r.u64()?,
        purged: r.u64()?,
    };
    for _ in 0..r.count64(8)? {
        sub.settled.insert(r.u64()?);
    }
    for _ in 0..r.count64(12)? {
        let seq = r.u64()?;
        sub.attempts.insert(seq, r.u32()?);
    }
    for _ in 0..r.count64(9)? {
        let seq = r.u64()?;
        let reason = match r.u8()? {
            1 => DeadLetterReason::MaxAttempts,
            2 => DeadLetterReason::Expired,
            _ => return Err(CommandError::BadSnapshot("unknown dead-letter reason")),
        };
        sub.dead_letter_due.insert(seq, reason);
    }
    Ok((name, sub))
}

fn outcome_code(o: OriginalOutcome) -> u8 {
    match o {
        OriginalOutcome::Enqueued => 0,
        OriginalOutcome::QuotaExceeded => 1,
        OriginalOutcome::TooLarge => 2,
        OriginalOutcome::InvalidTtl => 3,
    }
}

fn outcome_from_code(code: u8) -> Result<OriginalOutcome, CommandError> {
    Ok(match code {
        0 => OriginalOutcome::Enqueued,
        1 => OriginalOutcome::QuotaExceeded,
        2 => OriginalOutcome::TooLarge,
        3 => OriginalOutcome::InvalidTtl,
        _ => return Err(CommandError::BadSnapshot("unknown original outcome")),
    })
}
