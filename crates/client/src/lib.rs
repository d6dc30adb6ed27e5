//! The Tern client library (async, tokio).
//!
//! ```no_run
//! # async fn demo() -> Result<(), tern_client::ClientError> {
//! use tern_client::{Client, ClientConfig, ConsumerOptions, OutMessage};
//! let client = Client::connect(ClientConfig::new(["127.0.0.1:7450"])).await?;
//! let producer = client.producer("orders").await?;
//! let result = producer.put(OutMessage::new("hello")).await?;
//! assert_eq!(result.status, tern_client::Status::Ok);
//! let mut consumer = client.consumer("orders", ConsumerOptions::default()).await?;
//! if let Some(msg) = consumer.next().await {
//!     println!("{}", String::from_utf8_lossy(&msg.payload));
//!     consumer.confirm(&msg).await?;
//! }
//! consumer.flush_confirms().await;
//! # Ok(()) }
//! ```
//!
//! Contract:
//! - One background *session task* per [`Client`] owns the TCP connection: it
//!   connects (cycling through `servers` with exponential backoff), re-opens every
//!   queue handle after a reconnect, and retransmits every un-ACKed PUT with its same
//!   GUID (the server's dedup history makes that safe). All public types talk to it over
//!   one bounded channel, so they are cheap to clone and use from any task.
//! - Every PUT resolves exactly once: to the server's status, or to
//!   [`Status::Timeout`] when `put_timeout_ms` passes without an ACK (outcome unknown:
//!   retry with the same GUID via [`Producer::send_with_guid`] to learn it).
//! - The retransmission buffer is bounded by `retransmit_max_msgs` and
//!   `retransmit_max_bytes`; `send` waits for room (back-pressure), at most
//!   `put_timeout_ms`.

mod session;

use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
pub use tern_proto::admin;
pub use tern_proto::{guid_hex, Guid, Status};
use tokio::sync::{mpsc, oneshot, Semaphore};

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
    /// Bound on requests (open, admin, configure).
    pub request_timeout_ms: u64,
    pub retransmit_max_msgs: usize,
    pub retransmit_max_bytes: u64,
    pub reconnect_backoff_min_ms: u64,
    pub reconnect_backoff_max_ms: u64,
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
    #[error("no answer within {0:?}")]
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
    pub key: Option<Bytes>,
    pub ttl_ms: Option<u64>,
}

impl OutMessage {
    pub fn new(payload: impl Into<Bytes>) -> Self {
        OutMessage {
            payload: payload.into(),
            ..Default::default()
        }
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
    pub attempt: u32,
    pub payload: Bytes,
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

/// A connection to a Tern cluster (any node). Cheap to clone.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub config: ClientConfig,
    pub cmd_tx: mpsc::Sender<session::Cmd>,
    pub slots: Arc<Semaphore>,
    pub bytes: Arc<Semaphore>,
}

/// Bytes are accounted in KiB units in the semaphore (its permit count is a u32-ish usize).
fn kib(bytes: usize) -> u32 {
    (bytes.div_ceil(1024)).clamp(1, u32::MAX as usize) as u32
}

impl Client {
    /// Connects to one of `config.servers` (bounded by `connect_timeout_ms`) and starts the session task.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        if config.servers.is_empty() {
            return Err(ClientError::Invalid("no server address given".into()));
        }
        let (cmd_tx, cmd_rx) = mpsc::channel(4096);
        let (ready_tx, ready_rx) = oneshot::channel();
        tokio::spawn(session::run(config.clone(), cmd_rx, ready_tx));
        match tokio::time::timeout(
            Duration::from_millis(config.connect_timeout_ms + 500),
            ready_rx,
        )
        .await
        {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(reason))) => {
                return Err(ClientError::Connect {
                    servers: config.servers.clone(),
                    reason,
                })
            }
            _ => {
                return Err(ClientError::Connect {
                    servers: config.servers.clone(),
                    reason: "timed out".into(),
                })
            }
        }
        let max_kib = (config.retransmit_max_bytes / 1024).max(1) as usize;
        let shared = Arc::new(Shared {
            slots: Arc::new(Semaphore::new(config.retransmit_max_msgs.max(1))),
            bytes: Arc::new(Semaphore::new(max_kib.min(Semaphore::MAX_PERMITS))),
            config,
            cmd_tx,
        });
        Ok(Client { shared })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.shared.config
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> session::Cmd,
    ) -> Result<T, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .cmd_tx
            .send(make(tx))
            .await
            .map_err(|_| ClientError::Closed)?;
        let bound = Duration::from_millis(self.shared.config.request_timeout_ms);
        match tokio::time::timeout(bound, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout(bound)),
        }
    }

    /// Opens `queue` for producing (auto-created by the server if it allows).
    pub async fn producer(&self, queue: &str) -> Result<Producer, ClientError> {
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
            handle,
        })
    }

    /// Opens `queue` for consuming: the server PUSHes within the flow-control limits.
    pub async fn consumer(
        &self,
        queue: &str,
        options: ConsumerOptions,
    ) -> Result<Consumer, ClientError> {
        let spec = session::HandleSpec::consumer(queue, options);
        // Unbounded but bounded by construction: the server never has more than
        // `max_unconfirmed_msgs` unconfirmed PUSHes outstanding on this handle.
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
            handle,
            rx: push_rx,
        })
    }

    /// Runs an administrative request (queue create/list/stats/delete/purge, cluster status).
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

/// Sends messages to one queue. Cheap to clone.
#[derive(Clone)]
pub struct Producer {
    client: Client,
    handle: u64,
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
            // The session task resolves every PUT; a dropped sender means the client was
            // shut down, and then the outcome is unknown.
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
    /// Buffers and sends one message; returns as soon as it is on its way.
    pub async fn send(&self, msg: OutMessage) -> Result<PutHandle, ClientError> {
        self.send_with_guid(new_guid(), msg).await
    }

    /// As [`send`](Self::send) with a GUID chosen by the caller (to retry an unknown outcome).
    pub async fn send_with_guid(
        &self,
        guid: Guid,
        msg: OutMessage,
    ) -> Result<PutHandle, ClientError> {
        let shared = &self.client.shared;
        let bound = Duration::from_millis(shared.config.put_timeout_ms);
        let size = msg.payload.len() + msg.key.as_ref().map_or(0, |k| k.len());
        let permits = tokio::time::timeout(bound, async {
            let slot = shared.slots.clone().acquire_owned().await;
            let bytes = shared.bytes.clone().acquire_many_owned(kib(size)).await;
            (slot, bytes)
        })
        .await
        .map_err(|_| ClientError::Timeout(bound))?;
        let (Ok(slot), Ok(bytes)) = permits else {
            return Err(ClientError::Closed);
        };
        let (tx, rx) = oneshot::channel();
        let put = session::OutPut {
            handle: self.handle,
            guid,
            msg,
            reply: tx,
            permits: (slot, bytes),
        };
        shared
            .cmd_tx
            .send(session::Cmd::Put(Box::new(put)))
            .await
            .map_err(|_| ClientError::Closed)?;
        Ok(PutHandle { guid, rx })
    }

    /// Sends one message and waits for its ACK.
    pub async fn put(&self, msg: OutMessage) -> Result<PutResult, ClientError> {
        Ok(self.send(msg).await?.await)
    }
}

/// Receives messages from one queue.
pub struct Consumer {
    client: Client,
    handle: u64,
    rx: mpsc::UnboundedReceiver<Delivery>,
}

impl Consumer {
    /// The next message; `None` when the client is closed.
    pub async fn next(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// The next message if one comes within `wait`.
    pub async fn next_timeout(&mut self, wait: Duration) -> Option<Delivery> {
        tokio::time::timeout(wait, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Tells the server this message is processed (it is deleted once the CONFIRM commits).
    pub async fn confirm(&self, d: &Delivery) -> Result<(), ClientError> {
        let cmd = session::Cmd::Confirm {
            handle: self.handle,
            guid: d.guid,
            partition: d.partition,
        };
        self.client
            .shared
            .cmd_tx
            .send(cmd)
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Gives the message back for redelivery (now, or after `delay_ms`).
    pub async fn nack(&self, d: &Delivery, delay_ms: u32) -> Result<(), ClientError> {
        let cmd = session::Cmd::Nack {
            handle: self.handle,
            guid: d.guid,
            partition: d.partition,
            delay_ms,
        };
        self.client
            .shared
            .cmd_tx
            .send(cmd)
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Still working on it: push the message's visibility deadline to now + `extra_ms`
    /// (queues with a visibility timeout only; otherwise a no-op).
    pub async fn extend(&self, d: &Delivery, extra_ms: u32) -> Result<(), ClientError> {
        let cmd = session::Cmd::Extend {
            handle: self.handle,
            guid: d.guid,
            partition: d.partition,
            extra_ms,
        };
        self.client
            .shared
            .cmd_tx
            .send(cmd)
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Waits (bounded by `request_timeout_ms`) until every CONFIRM sent so far was answered.
    /// Returns how many were answered `ok`.
    pub async fn flush_confirms(&self) -> u64 {
        self.client
            .request(|reply| session::Cmd::FlushConfirms { reply })
            .await
            .unwrap_or(0)
    }
}
