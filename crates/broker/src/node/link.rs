//! The node loop's way to its peers: the TCP transport (`tern-transport`), or, in the
//! deterministic simulator, an in-memory outbox the simulator delivers from.
//!
//! Contract: `send` never blocks and never fails loudly (a dropped message is
//! retried by Raft or by the coordinator's resends); `is_alive` says whether the peer
//! was heard from recently, as the transport's liveness does; `link_epoch` changes
//! when a link to or from the peer broke (in-flight messages may be lost).

use bytes::Bytes;
use tern_transport::SendError;

#[derive(Clone)]
pub enum Link {
    Tcp(tern_transport::Transport),
    #[cfg(feature = "sim")]
    Sim(crate::sim::SimLink),
}

impl Link {
    pub fn send(&self, to: u64, msg: Bytes) -> Result<(), SendError> {
        match self {
            Link::Tcp(t) => t.send(to, msg),
            #[cfg(feature = "sim")]
            Link::Sim(s) => s.send(to, msg),
        }
    }

    pub fn is_alive(&self, id: u64) -> bool {
        match self {
            Link::Tcp(t) => t.is_alive(id),
            #[cfg(feature = "sim")]
            Link::Sim(s) => s.is_alive(id),
        }
    }

    /// Connections made to and from `id` so far: a change means a link broke and
    /// what was in flight on it may be lost (see `Transport::link_epoch`).
    pub fn link_epoch(&self, id: u64) -> u64 {
        match self {
            Link::Tcp(t) => t.link_epoch(id),
            #[cfg(feature = "sim")]
            Link::Sim(s) => s.link_epoch(id),
        }
    }

    /// The peers this node has links to (not itself).
    pub fn peer_ids(&self) -> Vec<u64> {
        match self {
            Link::Tcp(t) => t.peer_ids(),
            #[cfg(feature = "sim")]
            Link::Sim(s) => s.peer_ids(),
        }
    }
}
