//! The Tern client library (async, tokio).
//!
//! Produce, pipelining many PUTs and then awaiting their ACKs:
//!
//! ```no_run
//! # async fn demo() -> Result<(), tern_client::ClientError> {
//! use tern_client::{Client, ClientConfig, OutMessage, Status};
//! let client = Client::connect(ClientConfig::new(["127.0.0.1:7450", "127.0.0.1:7460"])).await?;
//! let producer = client.producer("orders").await?;
//! let mut in_flight = Vec::new();
//! for i in 0..100 {
//!     in_flight.push(producer.send(OutMessage::new(format!("order {i}"))).await?);
//! }
//! for handle in in_flight {
//!     let ack = handle.await; // exactly once, within put_timeout_ms
//!     if ack.status != Status::Ok {
//!         eprintln!("{}: {}", tern_client::guid_hex(&ack.guid), ack.status);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Consume, confirming after processing (a crash in between means redelivery):
//!
//! ```no_run
//! # async fn demo() -> Result<(), tern_client::ClientError> {
//! use tern_client::{Client, ClientConfig, ConsumerOptions};
//! let client = Client::connect(ClientConfig::new(["127.0.0.1:7450"])).await?;
//! let mut consumer = client.consumer("orders", ConsumerOptions::default()).await?;
//! while let Some(msg) = consumer.next().await {
//!     println!("{}", String::from_utf8_lossy(&msg.payload));
//!     consumer.confirm(&msg).await?;
//! }
//! consumer.flush_confirms().await;
//! # Ok(()) }
//! ```
//!
//! Tasks (per [`Client`]):
//! - the **session task** (`session.rs`) owns all state: queue handles, the
//!   retransmission buffer, requests. It connects (cycling through `servers` with
//!   jittered exponential backoff), re-opens every handle after a reconnect and
//!   retransmits every un-ACKed PUT with its same GUID (the server's dedup history makes
//!   that safe). It never awaits the socket, so every deadline holds whatever the
//!   network does;
//! - per connection, a **reader task** (decodes frames) and a **writer task** (drains
//!   a bounded queue of frame batches, many frames per write) (`conn.rs`).
//!
//! Public types talk to the session over one bounded channel; they are cheap to clone
//! and usable from any task.
//!
//! Contract:
//! - Every PUT resolves exactly once: to the server's status, or to
//!   [`Status::Timeout`] when `put_timeout_ms` passes without an ACK (outcome unknown:
//!   retry with the same GUID via [`Producer::send_with_guid`] to learn it).
//! - The retransmission buffer is bounded by `retransmit_max_msgs` and
//!   `retransmit_max_bytes`; `send` waits for room (back-pressure), at most
//!   `put_timeout_ms`.
//! - On a graceful stop (`StopRequest`) the client sends that node no new PUTs, keeps
//!   taking its ACKs, and moves to another server when the node closes.
//! - A node silent for three heartbeat intervals counts as dead.
//! - Deliveries received on a connection that has since been lost are dropped by
//!   [`Consumer::next`]: the server redelivers them (at-least-once), and confirming them
//!   on the new connection could not work.

mod conn;
mod session;

use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
pub use tern_proto::admin;
pub use tern_proto::{guid_from_hex, guid_hex, Guid, Status};
use tern_proto::{ExtendEntry, MessageRef, NackEntry};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Commands waiting for the session task.
const CMD_QUEUE_LEN: usize = 4096;

/// Client settings. Every wait is bounded by one of these.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `host:port` of any nodes; the client fails over among them.
    pub servers: Vec<String>,
    pub client_name: String,
    /// Giving up on the first connection after this long.
    pub connect_timeout_ms: u64,
    /// Every PUT resolves within this bound (then `Status::Timeout`).
    pub put_timeout_ms: u64,
    /// Bound on requests (open, admin, flush of confirms).
    pub request_timeout_ms: u64,
    /// Most PUTs buffered awaiting their ACK.
    pub retransmit_max_msgs: usize,
    /// Most payload and key bytes buffered awaiting their ACK.
    pub retransmit_max_bytes: u64,
    pub reconnect_backoff_min_ms: u64,
    pub reconnect_backoff_max_ms: u64,
    /// Heartbeat interval when idle; `None` takes the server's (from its `HelloOk`).
    /// A server silent for three intervals counts as dead.
    pub heartbeat_interval_ms: Option<u64>,
    /// Largest frame we send or accept (the server's limit also applies).
    pub max_frame_bytes: u32,
}

impl ClientConfig {
    pub fn new<S: Into<String>>(servers: impl IntoIterator<Item = S>) -> Self {
        ClientConfig {
            servers: servers.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            servers: vec!["127.0.0.1:7450".into()],
            client_name: format!("tern-client-{}", std::process::id()),
            connect_timeout_ms: 5_000,
            put_timeout_ms: 30_000,
            request_timeout_ms: 30_000,
            retransmit_max_msgs: 100_000,
            retransmit_max_bytes: 256 * 1024 * 1024,
            reconnect_backoff_min_ms: 50,
            reconnect_backoff_max_ms: 2_000,
            heartbeat_interval_ms: None,
            max_frame_bytes: tern_proto::DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to any of {servers:?}: {reason}")]
    Connect {
        servers: Vec<String>,
        reason: String,
    },
    #[error("the server refused: {status}: {message}")]
    Refused { status: Status, message: String },
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("the client is closed")]
    Closed,
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// A message to PUT.
#[derive(Clone, Debug, Default)]
pub struct OutMessage {
    pub payload: Bytes,
    /// Partitioning key: messages with one key go to one partition, in order.
    pub key: Option<Bytes>,
    /// Time to live; `None` takes the queue's default.
    pub ttl_ms: Option<u64>,
}

impl OutMessage {
    pub fn new(payload: impl Into<Bytes>) -> Self {
        OutMessage {
            payload: payload.into(),
            ..Default::default()
        }
    }

    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn with_ttl_ms(mut self, ttl_ms: u64) -> Self {
        self.ttl_ms = Some(ttl_ms);
        self
    }
}

/// The outcome of one PUT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PutResult {
    pub guid: Guid,
    pub status: Status,
    /// Stored durably (fsynced by a quorum) rather than in memory only.
    pub durable: bool,
}

/// A message delivered to a consumer.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub guid: Guid,
    pub partition: u16,
    /// 1 on the first delivery, raised on every redelivery.
    pub attempt: u32,
    pub payload: Bytes,
    /// Set on messages of a dead-letter queue: the queue they came from and why.
    pub dead_letter: Option<tern_proto::DeadLetterInfo>,
}

#[derive(Clone, Debug)]
pub struct ConsumerOptions {
    /// Subscription name (fanout queues); empty for work queues.
    pub subscription: String,
    /// Most PUSHed-but-unconfirmed messages the server lets this consumer hold.
    pub max_unconfirmed_msgs: u32,
    /// Most PUSHed-but-unconfirmed payload bytes.
    pub max_unconfirmed_bytes: u64,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            subscription: String::new(),
            max_unconfirmed_msgs: 1024,
            max_unconfirmed_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A connection to a Tern cluster (any node). Cheap to clone; the connection closes
/// when the last clone (and every producer and consumer) is dropped and every buffered
/// PUT is resolved.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

struct Shared {
    config: ClientConfig,
    cmd_tx: mpsc::Sender<session::Cmd>,
    /// Retransmission buffer room: one permit per message ...
    slots: Arc<Semaphore>,
    /// ... and one per KiB of payload and key.
    kib: Arc<Semaphore>,
    /// The session's connection generation (see [`Consumer::next`]).
    generation: Arc<AtomicU64>,
}

/// KiB permits a message of `bytes` takes (at least one, so empty messages count too).
fn kib_permits(bytes: usize) -> u32 {
    bytes.div_ceil(1024).clamp(1, u32::MAX as usize) as u32
}

impl Client {
    /// Connects to one of `config.servers` (bounded by `connect_timeout_ms`) and starts
    /// the session task.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        validate(&config)?;
        let (cmd_tx, cmd_rx) = mpsc::channel(CMD_QUEUE_LEN);
        let (ready_tx, ready_rx) = oneshot::channel();
        let generation = Arc::new(AtomicU64::new(0));
        tokio::spawn(session::run(
            config.clone(),
            generation.clone(),
            cmd_rx,
            ready_tx,
        ));
        // The session answers within connect_timeout_ms; the margin only guards a bug.
        let bound = Duration::from_millis(config.connect_timeout_ms + 1_000);
        let reason = match tokio::time::timeout(bound, ready_rx).await {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(reason))) => Some(reason),
            Ok(Err(_)) => Some("the session task ended".into()),
            Err(_) => Some(format!("timed out after {} ms", bound.as_millis())),
        };
        if let Some(reason) = reason {
            return Err(ClientError::Connect {
                servers: config.servers.clone(),
                reason,
            });
        }
        let max_kib = (config.retransmit_max_bytes / 1024).max(1) as usize;
        let shared = Arc::new(Shared {
            slots: Arc::new(Semaphore::new(
                config.retransmit_max_msgs.clamp(1, Semaphore::MAX_PERMITS),
            )),
            kib: Arc::new(Semaphore::new(max_kib.min(Semaphore::MAX_PERMITS))),
            config,
            cmd_tx,
            generation,
        });
        Ok(Client { shared })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.shared.config
    }

    fn request_bound(&self) -> Duration {
        Duration::from_millis(self.shared.config.request_timeout_ms)
    }

    /// Sends a command to the session (bounded: the session never blocks for long).
    async fn command(&self, cmd: session::Cmd) -> Result<(), ClientError> {
        let bound = self.request_bound();
        match tokio::time::timeout(bound, self.shared.cmd_tx.send(cmd)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout(bound)),
        }
    }

    /// Sends a command and awaits its answer, both within `request_timeout_ms`.
    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> session::Cmd,
    ) -> Result<T, ClientError> {
        let bound = self.request_bound();
        let (tx, rx) = oneshot::channel();
        let exchange = async {
            self.shared
                .cmd_tx
                .send(make(tx))
                .await
                .map_err(|_| ClientError::Closed)?;
            rx.await.map_err(|_| ClientError::Closed)
        };
        tokio::time::timeout(bound, exchange)
            .await
            .map_err(|_| ClientError::Timeout(bound))?
    }

    /// Opens `queue` for producing (auto-created by the server if it allows).
    pub async fn producer(&self, queue: &str) -> Result<Producer, ClientError> {
        validate_queue(queue)?;
        let spec = session::HandleSpec::producer(queue);
        let handle = self
            .request(|reply| session::Cmd::Open {
                spec,
                push_tx: None,
                reply,
            })
            .await??;
        Ok(Producer {
            client: self.clone(),
            guard: Arc::new(HandleGuard {
                cmd_tx: self.shared.cmd_tx.clone(),
                handle,
            }),
        })
    }

    /// Opens `queue` for consuming: the server PUSHes within the flow-control limits.
    pub async fn consumer(
        &self,
        queue: &str,
        options: ConsumerOptions,
    ) -> Result<Consumer, ClientError> {
        validate_queue(queue)?;
        if options.max_unconfirmed_msgs == 0 {
            return Err(ClientError::Invalid(
                "max_unconfirmed_msgs must be at least 1".into(),
            ));
        }
        let spec = session::HandleSpec::consumer(queue, options);
        // Unbounded in type, bounded in fact: the server PUSHes at most
        // `max_unconfirmed_msgs` unconfirmed messages per connection, and `next` drops
        // those of lost connections.
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let handle = self
            .request(|reply| session::Cmd::Open {
                spec,
                push_tx: Some(push_tx),
                reply,
            })
            .await??;
        Ok(Consumer {
            client: self.clone(),
            guard: HandleGuard {
                cmd_tx: self.shared.cmd_tx.clone(),
                handle,
            },
            rx: push_rx,
        })
    }

    /// Runs an administrative request (queue create/list/stats/delete/purge, cluster
    /// status). A refusal becomes [`ClientError::Refused`] with the server's message.
    pub async fn admin(&self, req: admin::AdminRequest) -> Result<admin::AdminReply, ClientError> {
        let body = serde_json::to_vec(&req).map_err(|e| ClientError::Invalid(e.to_string()))?;
        let (status, body) = self
            .request(|reply| session::Cmd::Admin {
                body: body.into(),
                reply,
            })
            .await?;
        if status != Status::Ok {
            let message = serde_json::from_slice::<admin::AdminErrorBody>(&body)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Refused { status, message });
        }
        serde_json::from_slice(&body)
            .map_err(|e| ClientError::Invalid(format!("bad admin reply: {e}")))
    }
}

fn validate(config: &ClientConfig) -> Result<(), ClientError> {
    if config.servers.is_empty() {
        return Err(ClientError::Invalid("no server address given".into()));
    }
    if let Some(bad) = config.servers.iter().find(|s| !s.contains(':')) {
        return Err(ClientError::Invalid(format!(
            "server address {bad:?} is not HOST:PORT"
        )));
    }
    if config.put_timeout_ms == 0 || config.request_timeout_ms == 0 {
        return Err(ClientError::Invalid(
            "put_timeout_ms and request_timeout_ms must be positive".into(),
        ));
    }
    Ok(())
}

fn validate_queue(queue: &str) -> Result<(), ClientError> {
    // The wire carries names as u16-length strings; the server judges the rest.
    if queue.is_empty() || queue.len() > usize::from(u16::MAX) {
        return Err(ClientError::Invalid(format!(
            "queue name must be 1..=65535 bytes, got {}",
            queue.len()
        )));
    }
    Ok(())
}

/// Closes a queue handle when its owner is dropped.
struct HandleGuard {
    cmd_tx: mpsc::Sender<session::Cmd>,
    handle: u64,
}

impl Drop for HandleGuard {
    fn drop(&mut self) {
        let cmd = session::Cmd::Close {
            handle: self.handle,
        };
        // Drop cannot await; if the queue is momentarily full, send from a task.
        if let Err(mpsc::error::TrySendError::Full(cmd)) = self.cmd_tx.try_send(cmd) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let tx = self.cmd_tx.clone();
                rt.spawn(async move {
                    let _ = tx.send(cmd).await;
                });
            }
        }
    }
}

/// Sends messages to one queue. Cheap to clone; the handle closes (after its buffered
/// PUTs are resolved) when the last clone is dropped.
#[derive(Clone)]
pub struct Producer {
    client: Client,
    guard: Arc<HandleGuard>,
}

/// Resolves to the PUT's outcome, exactly once.
pub struct PutHandle {
    guid: Guid,
    rx: oneshot::Receiver<PutResult>,
}

impl PutHandle {
    pub fn guid(&self) -> Guid {
        self.guid
    }

    /// True if the outcome has arrived (awaiting will not wait).
    pub fn is_ready_hint(&self) -> bool {
        !self.rx.is_empty() || self.rx.is_terminated()
    }
}

impl Future for PutHandle {
    type Output = PutResult;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<PutResult> {
        let guid = self.guid;
        Pin::new(&mut self.rx).poll(cx).map(|r| {
            // The session resolves every PUT; a dropped sender means the runtime is
            // shutting down, and then the outcome is unknown.
            r.unwrap_or(PutResult {
                guid,
                status: Status::Timeout,
                durable: false,
            })
        })
    }
}

/// A fresh random GUID.
pub fn new_guid() -> Guid {
    rand::random()
}

impl Producer {
    /// Buffers and sends one message; returns as soon as it is on its way. Waits for
    /// room in the retransmission buffer, at most `put_timeout_ms`.
    pub async fn send(&self, msg: OutMessage) -> Result<PutHandle, ClientError> {
        self.send_with_guid(new_guid(), msg).await
    }

    /// As [`send`](Self::send) with a GUID chosen by the caller, to retry a PUT whose
    /// outcome is unknown (`Status::Timeout`): the server's dedup history answers it.
    pub async fn send_with_guid(
        &self,
        guid: Guid,
        msg: OutMessage,
    ) -> Result<PutHandle, ClientError> {
        let shared = &self.client.shared;
        let bound = Duration::from_millis(shared.config.put_timeout_ms);
        let size = msg.payload.len() + msg.key.as_ref().map_or(0, |k| k.len());
        let (tx, rx) = oneshot::channel();
        let enqueue = async {
            let slot = shared.slots.clone().acquire_owned().await;
            let kib = shared
                .kib
                .clone()
                .acquire_many_owned(kib_permits(size))
                .await;
            let (Ok(slot), Ok(kib)) = (slot, kib) else {
                return Err(ClientError::Closed);
            };
            let put = session::OutPut {
                handle: self.guard.handle,
                guid,
                msg,
                reply: tx,
                permits: (slot, kib),
            };
            shared
                .cmd_tx
                .send(session::Cmd::Put(Box::new(put)))
                .await
                .map_err(|_| ClientError::Closed)
        };
        tokio::time::timeout(bound, enqueue)
            .await
            .map_err(|_| ClientError::Timeout(bound))??;
        Ok(PutHandle { guid, rx })
    }

    /// Sends one message and waits for its ACK.
    pub async fn put(&self, msg: OutMessage) -> Result<PutResult, ClientError> {
        Ok(self.send(msg).await?.await)
    }
}

/// Receives messages from one queue. The handle closes when this is dropped (the
/// server then redelivers what it held unconfirmed).
pub struct Consumer {
    client: Client,
    guard: HandleGuard,
    rx: mpsc::UnboundedReceiver<(u64, Delivery)>,
}

impl Consumer {
    /// The next message; `None` when the handle is closed for good (e.g. the queue was
    /// deleted). Messages PUSHed on a connection that has since been lost are skipped:
    /// the server redelivers them.
    pub async fn next(&mut self) -> Option<Delivery> {
        loop {
            let (generation, d) = self.rx.recv().await?;
            if generation >= self.client.shared.generation.load(Ordering::Acquire) {
                return Some(d);
            }
        }
    }

    /// The next message if one comes within `wait`.
    pub async fn next_timeout(&mut self, wait: Duration) -> Option<Delivery> {
        tokio::time::timeout(wait, self.next()).await.ok().flatten()
    }

    /// Tells the server this message is processed (it is deleted once the CONFIRM
    /// commits). Use [`flush_confirms`](Self::flush_confirms) to wait for that.
    pub async fn confirm(&self, d: &Delivery) -> Result<(), ClientError> {
        let msg = MessageRef {
            guid: d.guid,
            partition: d.partition,
        };
        let handle = self.guard.handle;
        self.client
            .command(session::Cmd::Confirm { handle, msg })
            .await
    }

    /// Gives the message back for redelivery (now, or after `delay_ms`).
    pub async fn nack(&self, d: &Delivery, delay_ms: u32) -> Result<(), ClientError> {
        let entry = NackEntry {
            guid: d.guid,
            partition: d.partition,
            delay_ms,
        };
        let handle = self.guard.handle;
        self.client
            .command(session::Cmd::Nack { handle, entry })
            .await
    }

    /// Still working on it: push the message's visibility deadline to now + `extra_ms`
    /// (queues with a visibility timeout only; otherwise a no-op).
    pub async fn extend(&self, d: &Delivery, extra_ms: u32) -> Result<(), ClientError> {
        let entry = ExtendEntry {
            guid: d.guid,
            partition: d.partition,
            extra_ms,
        };
        let handle = self.guard.handle;
        self.client
            .command(session::Cmd::Extend { handle, entry })
            .await
    }

    /// Changes this consumer's flow-control limits (kept across reconnects).
    pub async fn configure(
        &self,
        max_unconfirmed_msgs: u32,
        max_unconfirmed_bytes: u64,
    ) -> Result<(), ClientError> {
        if max_unconfirmed_msgs == 0 {
            return Err(ClientError::Invalid(
                "max_unconfirmed_msgs must be at least 1".into(),
            ));
        }
        let handle = self.guard.handle;
        self.client
            .command(session::Cmd::Configure {
                handle,
                max_unconfirmed_msgs,
                max_unconfirmed_bytes,
            })
            .await
    }

    /// Waits (bounded by `request_timeout_ms`) until every CONFIRM sent so far was
    /// answered, or its connection was lost. Returns how many CONFIRMs of this client
    /// were answered `ok` in total.
    pub async fn flush_confirms(&self) -> u64 {
        self.client
            .request(|reply| session::Cmd::FlushConfirms { reply })
            .await
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kib_permits_round_up_and_count_empty_messages() {
        assert_eq!(kib_permits(0), 1);
        assert_eq!(kib_permits(1), 1);
        assert_eq!(kib_permits(1024), 1);
        assert_eq!(kib_permits(1025), 2);
    }

    #[test]
    fn config_validation() {
        assert!(validate(&ClientConfig::default()).is_ok());
        assert!(validate(&ClientConfig::new(Vec::<String>::new())).is_err());
        assert!(validate(&ClientConfig::new(["localhost"])).is_err());
        let zero = ClientConfig {
            put_timeout_ms: 0,
            ..ClientConfig::default()
        };
        assert!(validate(&zero).is_err());
        assert!(validate_queue("").is_err());
        assert!(validate_queue("orders").is_ok());
    }

    #[tokio::test]
    async fn connect_to_nothing_fails_within_the_connect_timeout() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let cfg = ClientConfig {
            connect_timeout_ms: 300,
            ..ClientConfig::new([format!("127.0.0.1:{port}")])
        };
        let started = std::time::Instant::now();
        let err = Client::connect(cfg).await.err().expect("must fail");
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_millis(1_000));
    }
}
