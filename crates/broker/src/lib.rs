//! The Tern broker: a node serving clients over TCP and operators over HTTP.
//!
//! Follow one PUT: [`conn`] decodes the frame and sends a `NodeCmd::Put` to the node
//! loop ([`node`]); `node::partition` batches it into a Raft entry; the
//! `tern-replication` group appends and fsyncs it to the `tern-log` segment; once
//! committed, `tern-queue`'s state machine applies it and the partition sends the ACK
//! back on the connection's outbound channel, which [`conn`]'s writer puts on the wire.
//!
//! Threads: one `tern-node` OS thread (all Raft groups, all disk I/O) and a tokio
//! runtime for sockets and HTTP.

pub mod clock;
pub mod config;
mod conn;
mod http;
pub mod metrics;
pub mod node;
pub mod peer;
#[cfg(feature = "sim")]
pub mod sim;

pub use config::{BrokerConfig, ConfigError, QueueDefaults};

use metrics::Metrics;
use node::NodeCmd;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// State shared by every connection task and the HTTP server.
pub struct Shared {
    pub config: BrokerConfig,
    pub node_tx: flume::Sender<NodeCmd>,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// The graceful-stop phase, watched by every connection.
    pub stop_rx: watch::Receiver<StopPhase>,
    connections: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Node(#[from] node::NodeError),
    #[error("the node loop panicked")]
    NodePanicked,
}

/// Where a graceful stop is. Connections send StopRequest at `Draining` and close at `Closed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StopPhase {
    Running,
    Draining,
    Closed,
}

/// A running broker. Dropping it does not stop it; call [`Broker::stop`].
pub struct Broker {
    shared: Arc<Shared>,
    stop_tx: watch::Sender<StopPhase>,
    node_thread: Option<std::thread::JoinHandle<Result<(), node::NodeError>>>,
    pub client_addr: SocketAddr,
    pub http_addr: SocketAddr,
}

impl Broker {
    /// Validates the config, recovers storage, binds the listeners and starts serving.
    pub async fn start(config: BrokerConfig) -> Result<Broker, BrokerError> {
        config.validate()?;
        let metrics = Arc::new(Metrics::new());
        let client = bind(config.listen).await?;
        let http = bind(config.http_listen).await?;
        let client_addr = client.local_addr().map_err(|source| BrokerError::Listen {
            addr: config.listen,
            source,
        })?;
        let http_addr = http.local_addr().map_err(|source| BrokerError::Listen {
            addr: config.http_listen,
            source,
        })?;
        let handle = node::start(
            config.clone(),
            metrics.clone(),
            &tokio::runtime::Handle::current(),
        )?;
        let (stop_tx, stop_rx) = watch::channel(StopPhase::Running);
        let shared = Arc::new(Shared {
            config,
            node_tx: handle.tx,
            metrics,
            ready: handle.ready,
            stop_rx,
            connections: AtomicU64::new(0),
        });
        tokio::spawn(accept_loop(client, shared.clone()));
        tokio::spawn(http::serve(http, shared.clone()));
        tracing::info!(%client_addr, %http_addr, node_id = shared.config.node_id, "tern broker serving");
        Ok(Broker {
            shared,
            stop_tx,
            node_thread: Some(handle.thread),
            client_addr,
            http_addr,
        })
    }

    /// Resolves when the node loop has ended on its own (a fatal storage error).
    pub async fn wait_failed(&mut self) -> BrokerError {
        loop {
            if self.node_thread.as_ref().is_some_and(|t| t.is_finished()) {
                return match self.join_node() {
                    Err(e) => e,
                    Ok(()) => BrokerError::NodePanicked,
                };
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Graceful stop (guarantee 8): tell clients to stop sending PUTs here, let
    /// in-flight PUTs and CONFIRMs drain (bounded by `stop_timeout_ms`), snapshot, leave.
    pub async fn stop(mut self) -> Result<(), BrokerError> {
        // First hand leadership to other replicas (a cluster keeps serving meanwhile).
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self
            .shared
            .node_tx
            .send_async(NodeCmd::ReleaseLeadership { reply: tx })
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
        }
        let _ = self.stop_tx.send(StopPhase::Draining);
        self.shared.ready.store(false, Ordering::Relaxed);
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.shared.config.stop_timeout_ms);
        // Drain: wait until no PUT is waiting for its ACK, or the bound passes.
        while tokio::time::Instant::now() < deadline && self.shared.metrics.pending_puts() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self
            .shared
            .node_tx
            .send_async(NodeCmd::Stop { reply: tx })
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_secs(30), rx).await;
        }
        let result = self.join_node();
        // Give connection writers a moment to put the last ACKs on the wire, then close
        // every connection (bounded; clients retransmit anything that did not make it).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = self.stop_tx.send(StopPhase::Closed);
        tokio::time::sleep(Duration::from_millis(50)).await;
        result
    }

    fn join_node(&mut self) -> Result<(), BrokerError> {
        match self.node_thread.take().map(|t| t.join()) {
            Some(Ok(Ok(()))) | None => Ok(()),
            Some(Ok(Err(e))) => Err(e.into()),
            Some(Err(_)) => Err(BrokerError::NodePanicked),
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, BrokerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BrokerError::Listen { addr, source })
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id: u64 = 1;
    let mut stop = shared.stop_rx.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let open = shared.connections.load(Ordering::Relaxed);
                    if open as usize >= shared.config.max_connections {
                        tracing::warn!(open, "connection limit reached; refusing a client");
                        tokio::spawn(refuse(stream));
                        continue;
                    }
                    let id = next_id;
                    next_id += 1;
                    let shared = shared.clone();
                    shared.connections.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        conn::serve(stream, id, shared.clone()).await;
                        shared.connections.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => if *stop.borrow() != StopPhase::Running { return },
        }
    }
}

async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::Encoder;
    let mut buf = bytes::BytesMut::new();
    let frame = tern_proto::Frame::Error {
        req_id: 0,
        status: tern_proto::Status::Overloaded,
        message: "the server's connection limit is reached".into(),
    };
    if tern_proto::FrameCodec::new(4096)
        .encode(frame, &mut buf)
        .is_ok()
    {
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&buf)).await;
    }
}
