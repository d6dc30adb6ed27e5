//! The history checker: what a workload saw, and whether it is allowed.
//!
//! A workload (the `tern chaos` command, the fault tests) records every PUT with its
//! outcome, every delivery (PUSH) and every CONFIRM into a [`History`]. After the
//! cluster has healed and the queue is drained, [`History::check`] reports:
//! - **lost**: ACKed `ok`, never delivered — must be 0;
//! - **unexpected**: delivered, never PUT — must be 0;
//! - **corrupted**: delivered with a payload whose digest differs from the PUT's — must be 0;
//! - **duplicated**: deliveries beyond the first of a message (at-least-once allows them);
//! - **recovered**: PUTs that failed or timed out but were delivered anyway (allowed: an
//!   unknown outcome may have committed);
//! - **order violations**: per consumer and per (producer, key), a first delivery of an
//!   older PUT after a newer one (reported, not failed: retransmission across a
//!   failover may reorder).
//!
//! Pure data structure, no I/O except [`History::write_jsonl`]; not thread-safe by
//! itself (wrap it in a mutex when several tasks record).

mod rng;

pub use rng::SeededRng;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;

/// A PUT's outcome as its producer saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "status")]
pub enum Outcome {
    /// ACK ok: the cluster took responsibility.
    Ok,
    /// ACK with a failure status: not enqueued (but may show up if it was retried).
    Failed(String),
    /// No answer within the bound (timeout, connection lost for good): may or may not
    /// have been enqueued.
    Unknown,
}

/// One event of a history, as written to the JSON-lines file.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Put {
        guid: String,
        producer: u32,
        seq: u64,
        key: Option<String>,
        digest: u64,
        sent_ms: u64,
        done_ms: u64,
        #[serde(flatten)]
        outcome: Outcome,
    },
    Deliver {
        guid: String,
        consumer: u32,
        digest: u64,
        attempt: u32,
        partition: u16,
        at_ms: u64,
    },
    Confirm {
        guid: String,
        consumer: u32,
        at_ms: u64,
    },
    /// A fault injected (or healed) during the run: for reading the history.
    Fault { kind: String, node: u64, at_ms: u64 },
}

/// Every event of one run, in the order recorded.
#[derive(Default, Debug)]
pub struct History {
    events: Vec<Event>,
}

/// The verdict over a history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub puts: u64,
    pub acked_ok: u64,
    pub failed: u64,
    pub unknown: u64,
    pub delivered_unique: u64,
    pub deliveries: u64,
    pub lost: u64,
    pub unexpected: u64,
    pub corrupted: u64,
    pub duplicated: u64,
    pub recovered: u64,
    pub order_violations: u64,
    pub faults: u64,
}

impl Report {
    /// The guarantees hold: nothing ACKed was lost, nothing delivered was made up.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.unexpected == 0 && self.corrupted == 0
    }

    /// A two-column table for people.
    pub fn table(&self) -> String {
        let rows = [
            ("PUTs", self.puts),
            ("  acked ok", self.acked_ok),
            ("  failed", self.failed),
            ("  unknown (timeout)", self.unknown),
            ("deliveries", self.deliveries),
            ("  distinct messages", self.delivered_unique),
            ("lost (must be 0)", self.lost),
            ("unexpected (must be 0)", self.unexpected),
            ("corrupted (must be 0)", self.corrupted),
            ("duplicated", self.duplicated),
            ("recovered (failed/unknown, delivered)", self.recovered),
            (
                "order violations (per consumer, key)",
                self.order_violations,
            ),
            ("faults injected", self.faults),
        ];
        let mut out = String::new();
        for (name, v) in rows {
            out.push_str(&format!("{name:<40} {v:>10}\n"));
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write the history to {path}: {source}")]
pub struct WriteError {
    pub path: String,
    pub source: std::io::Error,
}

/// 64-bit FNV-1a of a payload: enough to tell a corrupted or swapped payload.
pub fn digest(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl History {
    pub fn new() -> Self {
        History::default()
    }

    pub fn record(&mut self, event: Event) {
        self.events.push(event);
    }

    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Writes one JSON object per event, for studying a failed run.
    pub fn write_jsonl(&self, path: &Path) -> Result<(), WriteError> {
        let err = |source| WriteError {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::create(path).map_err(err)?;
        let mut w = std::io::BufWriter::new(file);
        for e in &self.events {
            let line = serde_json::to_string(e).map_err(|e| err(e.into()))?;
            writeln!(w, "{line}").map_err(err)?;
        }
        w.flush().map_err(err)
    }

    pub fn check(&self) -> Report {
        let mut r = Report::default();
        // guid -> (outcome, digest, producer, key, seq)
        let mut puts: HashMap<&str, (&Outcome, u64, u32, Option<&str>, u64)> = HashMap::new();
        for e in &self.events {
            match e {
                Event::Put {
                    guid,
                    outcome,
                    digest,
                    producer,
                    key,
                    seq,
                    ..
                } => {
                    r.puts += 1;
                    match outcome {
                        Outcome::Ok => r.acked_ok += 1,
                        Outcome::Failed(_) => r.failed += 1,
                        Outcome::Unknown => r.unknown += 1,
                    }
                    puts.insert(guid, (outcome, *digest, *producer, key.as_deref(), *seq));
                }
                Event::Fault { .. } => r.faults += 1,
                _ => {}
            }
        }
        let mut delivered: HashSet<&str> = HashSet::new();
        // (consumer, producer, key) -> highest seq first-delivered so far
        let mut last_seq: HashMap<(u32, u32, &str), u64> = HashMap::new();
        for e in &self.events {
            let Event::Deliver {
                guid,
                consumer,
                digest,
                ..
            } = e
            else {
                continue;
            };
            r.deliveries += 1;
            let first = delivered.insert(guid);
            if !first {
                r.duplicated += 1;
            }
            let Some((outcome, put_digest, producer, key, seq)) = puts.get(guid.as_str()) else {
                if first {
                    r.unexpected += 1;
                }
                continue;
            };
            if digest != put_digest {
                r.corrupted += 1;
            }
            if !first {
                continue;
            }
            if **outcome != Outcome::Ok {
                r.recovered += 1;
            }
            if let Some(key) = key {
                let last = last_seq.entry((*consumer, *producer, key)).or_insert(0);
                if *seq < *last {
                    r.order_violations += 1;
                } else {
                    *last = *seq;
                }
            }
        }
        r.delivered_unique = delivered.len() as u64;
        r.lost = puts
            .iter()
            .filter(|(g, (o, ..))| **o == Outcome::Ok && !delivered.contains(*g))
            .count() as u64;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(guid: &str, seq: u64, outcome: Outcome) -> Event {
        Event::Put {
            guid: guid.into(),
            producer: 1,
            seq,
            key: Some("k".into()),
            digest: digest(guid.as_bytes()),
            sent_ms: 0,
            done_ms: 1,
            outcome,
        }
    }

    fn deliver(guid: &str, consumer: u32) -> Event {
        Event::Deliver {
            guid: guid.into(),
            consumer,
            digest: digest(guid.as_bytes()),
            attempt: 1,
            partition: 0,
            at_ms: 2,
        }
    }

    #[test]
    fn a_clean_history_passes() {
        let mut h = History::new();
        h.record(put("a", 1, Outcome::Ok));
        h.record(put("b", 2, Outcome::Ok));
        h.record(deliver("a", 1));
        h.record(deliver("b", 1));
        let r = h.check();
        assert!(r.passed(), "{r:?}");
        assert_eq!((r.puts, r.delivered_unique, r.duplicated), (2, 2, 0));
    }

    #[test]
    fn lost_unexpected_corrupted_and_duplicates_are_counted() {
        let mut h = History::new();
        h.record(put("a", 1, Outcome::Ok));
        h.record(put("b", 2, Outcome::Ok));
        h.record(put("c", 3, Outcome::Unknown));
        h.record(put("d", 4, Outcome::Failed("overloaded".into())));
        h.record(deliver("a", 1));
        h.record(deliver("a", 2));
        h.record(deliver("c", 1));
        h.record(deliver("zz", 1));
        h.record(Event::Deliver {
            guid: "d".into(),
            consumer: 1,
            digest: 7,
            attempt: 1,
            partition: 0,
            at_ms: 3,
        });
        let r = h.check();
        assert_eq!(r.lost, 1, "b was ACKed ok and never delivered");
        assert_eq!(r.unexpected, 1);
        assert_eq!(r.corrupted, 1);
        assert_eq!(r.duplicated, 1);
        assert_eq!(r.recovered, 2, "c (unknown) and d (failed) came through");
        assert!(!r.passed());
    }

    #[test]
    fn a_key_delivered_out_of_order_to_one_consumer_is_a_violation() {
        let mut h = History::new();
        h.record(put("a", 1, Outcome::Ok));
        h.record(put("b", 2, Outcome::Ok));
        h.record(deliver("b", 1));
        h.record(deliver("a", 1));
        assert_eq!(h.check().order_violations, 1);
        // Spread over two consumers, no single stream is out of order.
        let mut h = History::new();
        h.record(put("a", 1, Outcome::Ok));
        h.record(put("b", 2, Outcome::Ok));
        h.record(deliver("b", 1));
        h.record(deliver("a", 2));
        assert_eq!(h.check().order_violations, 0);
    }

    #[test]
    fn the_history_is_written_as_json_lines() {
        let mut h = History::new();
        h.record(put("a", 1, Outcome::Failed("timeout".into())));
        h.record(deliver("a", 1));
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("h.jsonl");
        h.write_jsonl(&path).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "put");
        assert_eq!(lines[0]["outcome"], "failed");
        assert_eq!(lines[0]["status"], "timeout");
        assert_eq!(lines[1]["event"], "deliver");
    }
}
