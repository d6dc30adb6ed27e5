//! Messages between nodes. The transport (`tern-transport`) carries them as opaque bytes;
//! this module gives them a meaning and a compact binary encoding.
//!
//! Contract:
//! - Encoding and decoding are pure (no I/O) and run on the node-loop thread.
//! - Decoding never panics and never allocates more than the input justifies: a
//!   malformed message from a peer is an error the node logs and drops (the sender's
//!   retransmission or Raft's own retries cover it).
//! - Forwarded client traffic keeps the client's connection id (`conn`) of the
//!   coordinator that sent it, so answers find their way back to the same socket.
//!
//! Format: `u8 tag` then the fields below, big-endian; `bytes` = `u32 len | data`,
//! `str` = `u16 len | UTF-8`, `guids` = `u32 count | count × 16 bytes`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use protobuf::Message as _;
use raft::eraftpb::Message as RaftMessage;
use tern_proto::Guid;

/// A node's id in the cluster.
pub type NodeId = u64;

/// One message between two nodes.
#[derive(Clone, Debug, PartialEq)]
pub enum PeerMsg {
    /// A Raft message of one group.
    Raft { group: u64, msg: RaftMessage },
    /// Coordinator → leader: PUTs of the coordinator's client connection `conn`,
    /// encoded as a queue `Put` command (the leader re-stamps the time).
    Put { group: u64, conn: u64, puts: Bytes },
    /// Leader → coordinator: a client frame (FrameCodec encoding) for its connection `conn`.
    ToConn { conn: u64, frame: Bytes },
    /// Coordinator → leader: attach a consumer (cluster-wide id) of the coordinator's
    /// connection `conn`, handle `handle`, to the partition.
    Consume {
        group: u64,
        consumer: u64,
        /// The sender's process incarnation: a restarted node's old consumers are dropped.
        incarnation: u64,
        conn: u64,
        handle: u32,
        subscription: String,
        max_msgs: u32,
        max_bytes: u64,
    },
    /// Coordinator → leader: detach a consumer.
    StopConsume { group: u64, consumer: u64 },
    /// Coordinator → leader: CONFIRMs; the ConfirmAck comes back as `ToConn`.
    Confirm {
        group: u64,
        consumer: u64,
        conn: u64,
        handle: u32,
        guids: Vec<Guid>,
        /// Resent after a failover: the leader may settle messages no one holds.
        resent: bool,
    },
    /// Coordinator → leader: NACKs (GUID, delay ms).
    Nack {
        group: u64,
        consumer: u64,
        entries: Vec<(Guid, u32)>,
    },
    /// Coordinator → leader: Extends (GUID, extra ms).
    Extend {
        group: u64,
        consumer: u64,
        entries: Vec<(Guid, u32)>,
    },
    /// Any node → metadata leader: an admin request (JSON) to run there.
    Admin { id: u64, body: Bytes },
    /// Metadata leader → asker: the answer (`status` 0 = ok; body JSON).
    AdminReply { id: u64, status: u16, body: Bytes },
    /// Gossip: the sender's incarnation and the groups it leads, with their terms and
    /// replica sets (voters then learners, split at `voters`).
    Leaders {
        incarnation: u64,
        groups: Vec<LedGroup>,
    },
}

/// One group a node leads, as gossiped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedGroup {
    pub group: u64,
    pub term: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

/// Most replicas gossiped per group (a replica set is a handful of nodes).
const MAX_GOSSIP_REPLICAS: usize = 64;

const T_RAFT: u8 = 1;
const T_PUT: u8 = 2;
const T_TO_CONN: u8 = 3;
const T_CONSUME: u8 = 4;
const T_STOP_CONSUME: u8 = 5;
const T_CONFIRM: u8 = 6;
const T_NACK: u8 = 7;
const T_EXTEND: u8 = 8;
const T_ADMIN: u8 = 9;
const T_ADMIN_REPLY: u8 = 10;
const T_LEADERS: u8 = 11;

/// Why bytes from a peer are not a [`PeerMsg`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerMsgError {
    #[error("truncated peer message")]
    Truncated,
    #[error("unknown peer message tag {0}")]
    UnknownTag(u8),
    #[error("bad raft message: {0}")]
    BadRaft(String),
    #[error("string is not UTF-8")]
    BadString,
    #[error("trailing bytes after a peer message")]
    Trailing,
    #[error("malformed peer message: {0}")]
    Malformed(&'static str),
}

impl PeerMsg {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(64);
        match self {
            PeerMsg::Raft { group, msg } => {
                b.put_u8(T_RAFT);
                b.put_u64(*group);
                // A Message always serializes; an error here would be a protobuf bug.
                let data = msg.write_to_bytes().unwrap_or_default();
                put_bytes(&mut b, &data);
            }
            PeerMsg::Put { group, conn, puts } => {
                b.put_u8(T_PUT);
                b.put_u64(*group);
                b.put_u64(*conn);
                put_bytes(&mut b, puts);
            }
            PeerMsg::ToConn { conn, frame } => {
                b.put_u8(T_TO_CONN);
                b.put_u64(*conn);
                put_bytes(&mut b, frame);
            }
            PeerMsg::Consume {
                group,
                consumer,
                incarnation,
                conn,
                handle,
                subscription,
                max_msgs,
                max_bytes,
            } => {
                b.put_u8(T_CONSUME);
                b.put_u64(*group);
                b.put_u64(*consumer);
                b.put_u64(*incarnation);
                b.put_u64(*conn);
                b.put_u32(*handle);
                put_str(&mut b, subscription);
                b.put_u32(*max_msgs);
                b.put_u64(*max_bytes);
            }
            PeerMsg::StopConsume { group, consumer } => {
                b.put_u8(T_STOP_CONSUME);
                b.put_u64(*group);
                b.put_u64(*consumer);
            }
            PeerMsg::Confirm {
                group,
                consumer,
                conn,
                handle,
                guids,
                resent,
            } => {
                b.put_u8(T_CONFIRM);
                b.put_u64(*group);
                b.put_u64(*consumer);
                b.put_u64(*conn);
                b.put_u32(*handle);
                b.put_u8(u8::from(*resent));
                b.put_u32(guids.len() as u32);
                for g in guids {
                    b.put_slice(g);
                }
            }
            PeerMsg::Nack {
                group,
                consumer,
                entries,
            }
            | PeerMsg::Extend {
                group,
                consumer,
                entries,
            } => {
                b.put_u8(if matches!(self, PeerMsg::Nack { .. }) {
                    T_NACK
                } else {
                    T_EXTEND
                });
                b.put_u64(*group);
                b.put_u64(*consumer);
                b.put_u32(entries.len() as u32);
                for (g, ms) in entries {
                    b.put_slice(g);
                    b.put_u32(*ms);
                }
            }
            PeerMsg::Admin { id, body } => {
                b.put_u8(T_ADMIN);
                b.put_u64(*id);
                put_bytes(&mut b, body);
            }
            PeerMsg::AdminReply { id, status, body } => {
                b.put_u8(T_ADMIN_REPLY);
                b.put_u64(*id);
                b.put_u16(*status);
                put_bytes(&mut b, body);
            }
            PeerMsg::Leaders {
                incarnation,
                groups,
            } => {
                b.put_u8(T_LEADERS);
                b.put_u64(*incarnation);
                b.put_u32(groups.len() as u32);
                for g in groups {
                    b.put_u64(g.group);
                    b.put_u64(g.term);
                    for ids in [&g.voters, &g.learners] {
                        b.put_u16(ids.len().min(MAX_GOSSIP_REPLICAS) as u16);
                        for id in ids.iter().take(MAX_GOSSIP_REPLICAS) {
                            b.put_u64(*id);
                        }
                    }
                }
            }
        }
        b.freeze()
    }

    pub fn decode(data: &Bytes) -> Result<PeerMsg, PeerMsgError> {
        let mut r = Reader { buf: data.clone() };
        let msg = match r.u8()? {
            T_RAFT => {
                let group = r.u64()?;
                let raw = r.bytes()?;
                let msg = RaftMessage::parse_from_bytes(&raw)
                    .map_err(|e| PeerMsgError::BadRaft(e.to_string()))?;
                PeerMsg::Raft { group, msg }
            }
            T_PUT => PeerMsg::Put {
                group: r.u64()?,
                conn: r.u64()?,
                puts: r.bytes()?,
            },
            T_TO_CONN => PeerMsg::ToConn {
                conn: r.u64()?,
                frame: r.bytes()?,
            },
            T_CONSUME => PeerMsg::Consume {
                group: r.u64()?,
                consumer: r.u64()?,
                incarnation: r.u64()?,
                conn: r.u64()?,
                handle: r.u32()?,
                subscription: r.str()?,
                max_msgs: r.u32()?,
                max_bytes: r.u64()?,
            },
            T_STOP_CONSUME => PeerMsg::StopConsume {
                group: r.u64()?,
                consumer: r.u64()?,
            },
            T_CONFIRM => PeerMsg::Confirm {
                group: r.u64()?,
                consumer: r.u64()?,
                conn: r.u64()?,
                handle: r.u32()?,
                resent: r.u8()? != 0,
                guids: r.guids()?,
            },
            tag @ (T_NACK | T_EXTEND) => {
                let group = r.u64()?;
                let consumer = r.u64()?;
                let n = r.count(20)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push((r.guid()?, r.u32()?));
                }
                if tag == T_NACK {
                    PeerMsg::Nack {
                        group,
                        consumer,
                        entries,
                    }
                } else {
                    PeerMsg::Extend {
                        group,
                        consumer,
                        entries,
                    }
                }
            }
            T_ADMIN => PeerMsg::Admin {
                id: r.u64()?,
                body: r.bytes()?,
            },
            T_ADMIN_REPLY => PeerMsg::AdminReply {
                id: r.u64()?,
                status: r.u16()?,
                body: r.bytes()?,
            },
            T_LEADERS => {
                let incarnation = r.u64()?;
                let n = r.count(20)?;
                let mut groups = Vec::with_capacity(n);
                for _ in 0..n {
                    let group = r.u64()?;
                    let term = r.u64()?;
                    let mut sets = [Vec::new(), Vec::new()];
                    for set in &mut sets {
                        let k = usize::from(r.u16()?);
                        if k > MAX_GOSSIP_REPLICAS {
                            return Err(PeerMsgError::Malformed("too many replicas"));
                        }
                        for _ in 0..k {
                            set.push(r.u64()?);
                        }
                    }
                    let [voters, learners] = sets;
                    groups.push(LedGroup {
                        group,
                        term,
                        voters,
                        learners,
                    });
                }
                PeerMsg::Leaders {
                    incarnation,
                    groups,
                }
            }
            other => return Err(PeerMsgError::UnknownTag(other)),
        };
        if r.buf.has_remaining() {
            return Err(PeerMsgError::Trailing);
        }
        Ok(msg)
    }
}

fn put_bytes(b: &mut BytesMut, data: &[u8]) {
    b.put_u32(data.len() as u32);
    b.put_slice(data);
}

fn put_str(b: &mut BytesMut, s: &str) {
    let len = s.len().min(usize::from(u16::MAX));
    b.put_u16(len as u16);
    b.put_slice(&s.as_bytes()[..len]);
}

struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), PeerMsgError> {
        if self.buf.remaining() < n {
            return Err(PeerMsgError::Truncated);
        }
        Ok(())
    }
    fn u8(&mut self) -> Result<u8, PeerMsgError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, PeerMsgError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self) -> Result<u32, PeerMsgError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self) -> Result<u64, PeerMsgError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    fn bytes(&mut self) -> Result<Bytes, PeerMsgError> {
        let n = self.u32()? as usize;
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    fn str(&mut self) -> Result<String, PeerMsgError> {
        let n = usize::from(self.u16()?);
        self.need(n)?;
        let raw = self.buf.split_to(n);
        String::from_utf8(raw.to_vec()).map_err(|_| PeerMsgError::BadString)
    }
    fn guid(&mut self) -> Result<Guid, PeerMsgError> {
        self.need(16)?;
        let mut g = [0u8; 16];
        self.buf.copy_to_slice(&mut g);
        Ok(g)
    }
    /// A u32 count, checked against the bytes left so a hostile count cannot allocate.
    fn count(&mut self, min_item_bytes: usize) -> Result<usize, PeerMsgError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item_bytes) > self.buf.remaining() {
            return Err(PeerMsgError::Truncated);
        }
        Ok(n)
    }
    fn guids(&mut self) -> Result<Vec<Guid>, PeerMsgError> {
        let n = self.count(16)?;
        (0..n).map(|_| self.guid()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<PeerMsg> {
        let raft = RaftMessage {
            from: 1,
            to: 2,
            term: 7,
            ..Default::default()
        };
        vec![
            PeerMsg::Raft {
                group: 3,
                msg: raft,
            },
            PeerMsg::Put {
                group: 4,
                conn: 9,
                puts: Bytes::from_static(b"cmd"),
            },
            PeerMsg::ToConn {
                conn: 9,
                frame: Bytes::from_static(b"frame"),
            },
            PeerMsg::Consume {
                group: 4,
                consumer: 1 << 48 | 5,
                incarnation: 77,
                conn: 9,
                handle: 2,
                subscription: "billing".into(),
                max_msgs: 10,
                max_bytes: 1000,
            },
            PeerMsg::StopConsume {
                group: 4,
                consumer: 5,
            },
            PeerMsg::Confirm {
                group: 4,
                consumer: 5,
                conn: 9,
                handle: 2,
                guids: vec![[1; 16], [2; 16]],
                resent: true,
            },
            PeerMsg::Nack {
                group: 4,
                consumer: 5,
                entries: vec![([3; 16], 100)],
            },
            PeerMsg::Extend {
                group: 4,
                consumer: 5,
                entries: vec![([3; 16], 200)],
            },
            PeerMsg::Admin {
                id: 1,
                body: Bytes::from_static(b"{}"),
            },
            PeerMsg::AdminReply {
                id: 1,
                status: 0,
                body: Bytes::from_static(b"{}"),
            },
            PeerMsg::Leaders {
                incarnation: 77,
                groups: vec![
                    LedGroup {
                        group: 0,
                        term: 3,
                        voters: vec![1, 2, 3],
                        learners: vec![],
                    },
                    LedGroup {
                        group: 5,
                        term: 4,
                        voters: vec![2],
                        learners: vec![4],
                    },
                ],
            },
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        for m in all() {
            assert_eq!(PeerMsg::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn truncated_or_garbage_input_is_an_error_not_a_panic() {
        for m in all() {
            let b = m.encode();
            for cut in 0..b.len() {
                assert!(PeerMsg::decode(&b.slice(..cut)).is_err());
            }
        }
        assert_eq!(
            PeerMsg::decode(&Bytes::from_static(&[200])),
            Err(PeerMsgError::UnknownTag(200))
        );
        // A huge count with no bytes behind it allocates nothing.
        let mut b = BytesMut::new();
        b.put_u8(T_LEADERS);
        b.put_u64(1);
        b.put_u32(u32::MAX);
        assert_eq!(PeerMsg::decode(&b.freeze()), Err(PeerMsgError::Truncated));
    }
}
