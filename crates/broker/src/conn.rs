//! One client connection: handshake, frames in, frames out.
//!
//! Contract:
//! - Two tokio tasks per connection: this reader (decodes frames, turns them into
//!   [`NodeCmd`]s) and a writer (drains the connection's outbound channel, many frames
//!   per write). Neither ever blocks the node loop: the node sends on an unbounded
//!   channel whose content is bounded by the in-flight PUT limit and flow control.
//! - Back-pressure: with `max_inflight_puts_per_conn` PUTs un-ACKed, the reader stops
//!   reading the socket until ACKs go out; the client then feels TCP back-pressure.
//! - Hostile input: a malformed or oversized frame gets an `Error` frame (req_id 0)
//!   and closes this connection only. Nothing of it reaches the node loop.
//! - Graceful stop: on the stop signal the server sends `StopRequest`. PUTs already
//!   in flight are still taken and ACKed during the drain; a client that got the
//!   StopRequest sends no new ones. When the node loop leaves, anything unanswered is
//!   retransmitted by the client (same GUID) after it reconnects.

use crate::node::{ConnTx, NodeCmd, Rejection};
use crate::Shared;
use bytes::BytesMut;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_proto::{
    Frame, FrameCodec, ProtoError, Status, OPEN_CONSUMER, OPEN_PRODUCER, PROTOCOL_VERSION,
};
use tern_queue::{ConsumerId, FlowLimits};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio_util::codec::{Encoder, FramedRead};

/// Largest write the writer task assembles before flushing to the socket.
const MAX_WRITE_BATCH_BYTES: usize = 1024 * 1024;
/// Requests (open/close/configure/admin) waiting for the node: bounds one connection's fan-in.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An open queue handle of this connection.
struct Handle {
    queue: Arc<str>,
    consumer: Option<ConsumerId>,
    producer: bool,
}

/// Counts PUT messages sent to the node and not yet ACKed on this connection.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    released: Notify,
}

pub async fn serve(stream: TcpStream, conn_id: u64, shared: Arc<Shared>) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let _ = stream.set_nodelay(true);
    shared.metrics.connections.inc();
    match serve_inner(stream, conn_id, &shared).await {
        Ok(()) => tracing::debug!(conn_id, %peer, "connection closed"),
        Err(e) => tracing::info!(conn_id, %peer, "connection closed: {e}"),
    }
    shared.metrics.connections.dec();
}

async fn serve_inner(
    stream: TcpStream,
    conn_id: u64,
    shared: &Arc<Shared>,
) -> Result<(), ProtoError> {
    let (read, write) = stream.into_split();
    let codec = FrameCodec::new(shared.config.max_frame_bytes);
    let mut reader = FramedRead::new(read, codec.clone());
    let (out_tx, out_rx) = flume::unbounded::<Frame>();
    let conn = ConnTx::new(conn_id, out_tx);
    let inflight = Arc::new(InFlight::default());
    let writer = tokio::spawn(write_loop(write, out_rx, codec, inflight.clone()));

    let result = match handshake(&mut reader, &conn, shared).await {
        Ok(()) => {
            Session::new(conn.clone(), shared.clone(), inflight)
                .run(&mut reader)
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        conn.send(Frame::Error {
            req_id: 0,
            status: Status::ProtocolError,
            message: e.to_string(),
        });
    }
    drop(conn);
    // The writer ends when every sender (ours and the node's copies) is gone; bound the wait.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    result
}

async fn handshake(
    reader: &mut FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
    conn: &ConnTx,
    shared: &Shared,
) -> Result<(), ProtoError> {
    let first = match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()).await {
        Ok(Some(frame)) => frame?,
        Ok(None) => return Ok(()),
        Err(_) => return Err(malformed(0x01, "no Hello within the handshake timeout")),
    };
    match first {
        Frame::Hello { version, .. } if version == PROTOCOL_VERSION => {
            conn.send(Frame::HelloOk {
                version: PROTOCOL_VERSION,
                node_id: shared.config.node_id,
                max_frame_bytes: shared.config.max_frame_bytes,
                heartbeat_interval_ms: shared.config.heartbeat_interval_ms,
            });
            Ok(())
        }
        Frame::Hello { version, .. } => {
            conn.send(Frame::Error {
                req_id: 0,
                status: Status::UnsupportedVersion,
                message: format!("protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}"),
            });
            Err(malformed(0x01, "unsupported version"))
        }
        other => Err(malformed(
            other.type_code(),
            "the first frame must be Hello",
        )),
    }
}

fn malformed(frame_type: u8, reason: &str) -> ProtoError {
    ProtoError::Malformed {
        frame_type,
        reason: reason.to_string(),
    }
}

/// The state of one connection after the handshake.
struct Session {
    conn: ConnTx,
    shared: Arc<Shared>,
    inflight: Arc<InFlight>,
    handles: HashMap<u32, Handle>,
    last_heard: Instant,
    stop_sent: bool,
}

impl Session {
    fn new(conn: ConnTx, shared: Arc<Shared>, inflight: Arc<InFlight>) -> Self {
        Session {
            conn,
            shared,
            inflight,
            handles: HashMap::new(),
            last_heard: Instant::now(),
            stop_sent: false,
        }
    }

    async fn run(
        mut self,
        reader: &mut FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
    ) -> Result<(), ProtoError> {
        let hb = Duration::from_millis(u64::from(self.shared.config.heartbeat_interval_ms));
        let mut ticker = tokio::time::interval(hb);
        let mut stop = self.shared.stop_rx.clone();
        let result = loop {
            self.wait_for_room().await;
            tokio::select! {
                frame = reader.next() => match frame {
                    Some(Ok(frame)) => {
                        self.last_heard = Instant::now();
                        if let Err(e) = self.on_frame(frame).await {
                            break Err(e);
                        }
                    }
                    Some(Err(e)) => break Err(e),
                    None => break Ok(()),
                },
                _ = ticker.tick() => {
                    if self.last_heard.elapsed() > hb * 3 {
                        break Err(malformed(0x40, "client silent for 3 heartbeat intervals"));
                    }
                    self.conn.send(Frame::Heartbeat);
                }
                changed = stop.changed() => {
                    let phase = *stop.borrow();
                    if changed.is_err() || phase == crate::StopPhase::Closed {
                        break Ok(());
                    }
                    if phase == crate::StopPhase::Draining && !self.stop_sent {
                        self.stop_sent = true;
                        self.conn.send(Frame::StopRequest { drain_timeout_ms: self.shared.config.stop_timeout_ms as u32 });
                    }
                }
            }
        };
        let consumers: Vec<ConsumerId> = self.handles.values().filter_map(|h| h.consumer).collect();
        // Always sent: the node forgets the connection (and releases its consumers).
        let _ = self
            .shared
            .node_tx
            .send_async(NodeCmd::ConnClosed {
                conn: self.conn.id,
                consumers,
            })
            .await;
        result
    }

    /// Stops reading while the connection has its maximum of un-ACKed PUTs.
    async fn wait_for_room(&self) {
        let max = self.shared.config.max_inflight_puts_per_conn;
        while self.inflight.count.load(Ordering::Acquire) >= max {
            let notified = self.inflight.released.notified();
            if self.inflight.count.load(Ordering::Acquire) < max {
                break;
            }
            // Bounded wait: re-check periodically in case the node dropped the connection's ACKs.
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    }

    async fn on_frame(&mut self, frame: Frame) -> Result<(), ProtoError> {
        match frame {
            Frame::Put { queue_id, messages } => self.on_put(queue_id, messages).await,
            Frame::Confirm { queue_id, messages } => {
                let Some((queue, consumer)) = self
                    .handles
                    .get(&queue_id)
                    .and_then(|h| Some((h.queue.clone(), h.consumer?)))
                else {
                    // Not a connection-level error: answer each CONFIRM, keep the connection.
                    let entries = messages
                        .iter()
                        .map(|m| tern_proto::ConfirmAckEntry {
                            guid: m.guid,
                            status: Status::UnknownHandle,
                        })
                        .collect();
                    self.conn.send(Frame::ConfirmAck { queue_id, entries });
                    return Ok(());
                };
                let cmd = NodeCmd::Confirm {
                    conn: self.conn.clone(),
                    handle_id: queue_id,
                    consumer,
                    queue,
                    messages,
                };
                self.to_node(cmd).await
            }
            Frame::Nack { queue_id, entries } => {
                if let Some(Handle {
                    queue,
                    consumer: Some(consumer),
                    ..
                }) = self.handles.get(&queue_id)
                {
                    let cmd = NodeCmd::Nack {
                        consumer: *consumer,
                        queue: queue.clone(),
                        entries,
                    };
                    self.to_node(cmd).await?;
                }
                Ok(())
            }
            Frame::Extend { queue_id, entries } => {
                if let Some(Handle {
                    queue,
                    consumer: Some(consumer),
                    ..
                }) = self.handles.get(&queue_id)
                {
                    let cmd = NodeCmd::Extend {
                        consumer: *consumer,
                        queue: queue.clone(),
                        entries,
                    };
                    self.to_node(cmd).await?;
                }
                Ok(())
            }
            Frame::OpenQueue {
                req_id,
                queue,
                subscription,
                flags,
                max_unconfirmed_msgs,
                max_unconfirmed_bytes,
            } => {
                self.on_open(
                    req_id,
                    queue,
                    subscription,
                    flags,
                    FlowLimits {
                        max_unconfirmed_msgs,
                        max_unconfirmed_bytes,
                    },
                )
                .await
            }
            Frame::CloseQueue { req_id, queue_id } => {
                if let Some(h) = self.handles.remove(&queue_id) {
                    if let Some(consumer) = h.consumer {
                        self.to_node(NodeCmd::CloseConsumer { consumer }).await?;
                    }
                }
                self.conn.send(Frame::CloseQueueOk { req_id });
                Ok(())
            }
            Frame::Configure {
                req_id,
                queue_id,
                max_unconfirmed_msgs,
                max_unconfirmed_bytes,
            } => match self.handles.get(&queue_id).and_then(|h| h.consumer) {
                Some(consumer) => {
                    let limits = FlowLimits {
                        max_unconfirmed_msgs,
                        max_unconfirmed_bytes,
                    };
                    self.to_node(NodeCmd::Configure { consumer, limits })
                        .await?;
                    self.conn.send(Frame::ConfigureOk { req_id });
                    Ok(())
                }
                None => self.unknown_handle(req_id, queue_id),
            },
            Frame::AdminRequest { req_id, body } => self.on_admin(req_id, &body).await,
            Frame::Heartbeat => {
                self.conn.send(Frame::HeartbeatAck);
                Ok(())
            }
            Frame::HeartbeatAck | Frame::StopResponse => Ok(()),
            Frame::StopRequest { .. } => {
                self.conn.send(Frame::StopResponse);
                Ok(())
            }
            other => Err(malformed(
                other.type_code(),
                "this frame is not accepted from a client",
            )),
        }
    }

    async fn on_put(
        &mut self,
        queue_id: u32,
        messages: Vec<tern_proto::PutMessage>,
    ) -> Result<(), ProtoError> {
        if messages.is_empty() {
            return Ok(());
        }
        // Counted before any answer can go out, so the writer's decrement never underflows.
        self.inflight
            .count
            .fetch_add(messages.len(), Ordering::AcqRel);
        let Some(h) = self.handles.get(&queue_id).filter(|h| h.producer) else {
            crate::node::reject_puts(&self.conn, &messages, Status::UnknownHandle);
            return Ok(());
        };
        // After StopRequest, PUTs already in flight are still taken and ACKed during the
        // drain (BlazingMQ's contract): refusing them would give producers failed ACKs.
        let cmd = NodeCmd::Put {
            conn: self.conn.clone(),
            queue: h.queue.clone(),
            messages,
            received: Instant::now(),
        };
        self.to_node(cmd).await
    }

    async fn on_open(
        &mut self,
        req_id: u32,
        queue: String,
        subscription: String,
        flags: u8,
        limits: FlowLimits,
    ) -> Result<(), ProtoError> {
        if flags & (OPEN_PRODUCER | OPEN_CONSUMER) == 0
            || flags & !(OPEN_PRODUCER | OPEN_CONSUMER) != 0
        {
            return self.reply_error(
                req_id,
                Status::InvalidArgument,
                format!("invalid OpenQueue flags 0x{flags:02x}"),
            );
        }
        if flags & OPEN_CONSUMER != 0 && limits.max_unconfirmed_msgs == 0 {
            return self.reply_error(
                req_id,
                Status::InvalidArgument,
                "max_unconfirmed_msgs must be at least 1".into(),
            );
        }
        if self.handles.len() >= MAX_HANDLES_PER_CONN {
            return self.reply_error(
                req_id,
                Status::InvalidArgument,
                format!("at most {MAX_HANDLES_PER_CONN} open queues per connection"),
            );
        }
        let handle_id = self.next_handle_id();
        let (tx, rx) = oneshot::channel();
        let consumer = (flags & OPEN_CONSUMER != 0).then_some(limits);
        let cmd = NodeCmd::Open {
            conn: self.conn.clone(),
            req_id,
            handle_id,
            queue: queue.clone(),
            subscription,
            consumer,
            reply: tx,
        };
        self.to_node(cmd).await?;
        match self.await_node(rx).await {
            Ok(opened) => {
                let handle = Handle {
                    queue: Arc::from(queue.as_str()),
                    consumer: opened.consumer,
                    producer: flags & OPEN_PRODUCER != 0,
                };
                // The node already sent OpenQueueOk (ordered before any PUSH on this handle).
                self.handles.insert(handle_id, handle);
                Ok(())
            }
            Err(r) => self.reply_error(req_id, r.status, r.message),
        }
    }

    async fn on_admin(&mut self, req_id: u32, body: &[u8]) -> Result<(), ProtoError> {
        let req = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                return self.admin_reply(
                    req_id,
                    Err(Rejection::new(
                        Status::InvalidArgument,
                        format!("bad admin request: {e}"),
                    )),
                )
            }
        };
        let (tx, rx) = oneshot::channel();
        self.to_node(NodeCmd::Admin { req, reply: tx }).await?;
        let result = self.await_node(rx).await;
        self.admin_reply(req_id, result)
    }

    fn admin_reply(
        &self,
        req_id: u32,
        result: Result<tern_proto::admin::AdminReply, Rejection>,
    ) -> Result<(), ProtoError> {
        let (status, body) = match result {
            Ok(reply) => (Status::Ok, serde_json::to_vec(&reply).unwrap_or_default()),
            Err(r) => (
                r.status,
                serde_json::to_vec(&tern_proto::admin::AdminErrorBody { error: r.message })
                    .unwrap_or_default(),
            ),
        };
        self.conn.send(Frame::AdminResponse {
            req_id,
            status,
            body: body.into(),
        });
        Ok(())
    }

    async fn await_node<T>(
        &self,
        rx: oneshot::Receiver<Result<T, Rejection>>,
    ) -> Result<T, Rejection> {
        let bound = Duration::from_millis(self.shared.config.put_timeout_ms);
        match tokio::time::timeout(bound, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Rejection::new(Status::Unavailable, "the node is stopping")),
            Err(_) => Err(Rejection::new(
                Status::Timeout,
                "no answer within the request timeout",
            )),
        }
    }

    async fn to_node(&self, cmd: NodeCmd) -> Result<(), ProtoError> {
        self.shared
            .node_tx
            .send_async(cmd)
            .await
            .map_err(|_| ProtoError::Io(std::io::Error::other("node loop stopped")))
    }

    fn reply_error(&self, req_id: u32, status: Status, message: String) -> Result<(), ProtoError> {
        self.conn.send(Frame::Error {
            req_id,
            status,
            message,
        });
        Ok(())
    }

    fn unknown_handle(&self, req_id: u32, queue_id: u32) -> Result<(), ProtoError> {
        self.reply_error(
            req_id,
            Status::UnknownHandle,
            format!("queue handle {queue_id} is not open on this connection"),
        )
    }

    fn next_handle_id(&self) -> u32 {
        (1..)
            .find(|id| !self.handles.contains_key(id))
            .unwrap_or(u32::MAX)
    }
}

/// Open queue handles allowed on one connection.
const MAX_HANDLES_PER_CONN: usize = 1024;

/// Drains the outbound channel into the socket, many frames per write.
async fn write_loop(
    mut write: OwnedWriteHalf,
    rx: flume::Receiver<Frame>,
    mut codec: FrameCodec,
    inflight: Arc<InFlight>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while let Ok(frame) = rx.recv_async().await {
        let mut acked = 0;
        let mut next = Some(frame);
        while let Some(frame) = next.take() {
            if let Frame::Ack { acks } = &frame {
                acked += acks.len();
            }
            if let Err(e) = codec.encode(frame, &mut buf) {
                tracing::error!("cannot encode an outbound frame: {e}");
            }
            if buf.len() < MAX_WRITE_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if acked > 0 {
            let before = inflight.count.fetch_sub(acked, Ordering::AcqRel);
            debug_assert!(before >= acked, "more ACKs than PUTs on a connection");
            inflight.released.notify_waiters();
        }
        if write.write_all(&buf).await.is_err() {
            break;
        }
        buf.clear();
    }
    let _ = write.shutdown().await;
}
