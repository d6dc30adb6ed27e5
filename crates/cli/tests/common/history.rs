//! The history checker: every PUT with its outcome, every delivery; after a full drain
//! it counts what DESIGN.md's guarantees forbid (lost, unexpected, double ACKs) and
//! what they allow (duplicated deliveries, recovered unknown outcomes).

use std::collections::{HashMap, HashSet};
use tern_client::{Guid, Status};

#[derive(Default, Debug)]
pub struct History {
    /// Every outcome each GUID got (exactly one is the contract).
    puts: HashMap<Guid, Vec<Status>>,
    /// Deliveries per GUID, with the attempt numbers seen.
    deliveries: HashMap<Guid, Vec<u32>>,
    /// Deliveries in arrival order (for order checks).
    order: Vec<Guid>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// PUTs answered `ok`.
    pub acked_ok: usize,
    /// PUTs answered with anything else (failed or unknown).
    pub acked_not_ok: usize,
    /// ACKed ok, never delivered. Must be 0.
    pub lost: usize,
    /// Delivered, never PUT. Must be 0.
    pub unexpected: usize,
    /// GUIDs that got more than one ACK. Must be 0.
    pub multiple_acks: usize,
    /// GUIDs delivered more than once (allowed: at-least-once).
    pub duplicated: usize,
    /// ACK failed or unknown, delivered anyway (allowed for `timeout`).
    pub recovered: usize,
    /// Delivered although the ACK said it certainly was not stored. Must be 0.
    pub resurrected: usize,
}

impl Verdict {
    /// The forbidden counts are all zero.
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.unexpected == 0 && self.multiple_acks == 0 && self.resurrected == 0
    }
}

impl History {
    pub fn put(&mut self, guid: Guid, status: Status) {
        self.puts.entry(guid).or_default().push(status);
    }

    pub fn delivered(&mut self, guid: Guid, attempt: u32) {
        self.deliveries.entry(guid).or_default().push(attempt);
        self.order.push(guid);
    }

    pub fn delivery_order(&self) -> &[Guid] {
        &self.order
    }

    /// Records `tern produce --json` output.
    pub fn add_produce_json(&mut self, stdout: &[u8]) {
        for v in super::json_lines(stdout) {
            let guid = parse_guid(&v["guid"]);
            let status = v["status"].as_str().expect("status");
            self.put(guid, status_named(status));
        }
    }

    /// Records `tern consume --json` output.
    pub fn add_consume_json(&mut self, stdout: &[u8]) {
        for v in super::json_lines(stdout) {
            let attempt = v["attempt"].as_u64().expect("attempt") as u32;
            self.delivered(parse_guid(&v["guid"]), attempt);
        }
    }

    pub fn verdict(&self) -> Verdict {
        let mut v = Verdict::default();
        for (guid, outcomes) in &self.puts {
            if outcomes.len() > 1 {
                v.multiple_acks += 1;
            }
            let delivered = self.deliveries.contains_key(guid);
            let ok = outcomes.contains(&Status::Ok);
            if ok {
                v.acked_ok += 1;
                if !delivered {
                    v.lost += 1;
                }
            } else {
                v.acked_not_ok += 1;
                if delivered {
                    v.recovered += 1;
                    if outcomes.iter().all(|s| s.certain_failure()) {
                        v.resurrected += 1;
                    }
                }
            }
        }
        for (guid, attempts) in &self.deliveries {
            if !self.puts.contains_key(guid) {
                v.unexpected += 1;
            }
            if attempts.len() > 1 {
                v.duplicated += 1;
            }
        }
        v
    }
}

fn parse_guid(v: &serde_json::Value) -> Guid {
    let text = v.as_str().expect("guid is a string");
    tern_client::guid_from_hex(text).unwrap_or_else(|| panic!("bad guid {text:?}"))
}

/// The status whose CLI name is `name`.
pub fn status_named(name: &str) -> Status {
    (0..=u16::MAX)
        .filter_map(Status::from_u16)
        .find(|s| s.name() == name)
        .unwrap_or_else(|| panic!("unknown status {name:?}"))
}

/// GUIDs of a set of statuses, for assertions on which PUTs failed.
pub fn guids_with(history: &History, status: Status) -> HashSet<Guid> {
    history
        .puts
        .iter()
        .filter(|(_, s)| s.contains(&status))
        .map(|(g, _)| *g)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_counts_each_anomaly() {
        let mut h = History::default();
        h.put([1; 16], Status::Ok); // delivered twice: duplicated
        h.delivered([1; 16], 1);
        h.delivered([1; 16], 2);
        h.put([2; 16], Status::Ok); // never delivered: lost
        h.put([3; 16], Status::Timeout); // unknown, delivered: recovered
        h.delivered([3; 16], 1);
        h.put([4; 16], Status::QuotaExceeded); // refused, delivered: resurrected
        h.delivered([4; 16], 1);
        h.delivered([5; 16], 1); // never PUT: unexpected
        h.put([6; 16], Status::Ok); // two ACKs
        h.put([6; 16], Status::Ok);
        h.delivered([6; 16], 1);
        let v = h.verdict();
        assert_eq!(
            v,
            Verdict {
                acked_ok: 3,
                acked_not_ok: 2,
                lost: 1,
                unexpected: 1,
                multiple_acks: 1,
                duplicated: 1,
                recovered: 2,
                resurrected: 1,
            }
        );
        assert!(!v.is_clean());
        assert_eq!(status_named("quota_exceeded"), Status::QuotaExceeded);
    }
}
