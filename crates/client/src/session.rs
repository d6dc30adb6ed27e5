//! The session task: the only owner of the client's state and retransmission buffer.
//!
//! Loop: connect (cycling through the servers with jittered exponential backoff) →
//! re-open every handle → retransmit every un-ACKed PUT with its same GUID → serve
//! frames and commands until the connection fails, the server goes silent, or a
//! stopping node closes → again.
//!
//! The session never awaits a socket: it hands frame batches to the connection's writer
//! task (see [`crate::conn`]) only when the writer has room, and PUTs wait in the
//! retransmission buffer meanwhile, where they coalesce into larger PUT frames. So PUT
//! deadlines (swept every [`SWEEP_INTERVAL`]) hold whatever the network does, connected
//! or not.

use crate::conn::{self, Conn, ConnectParams};
use crate::{ClientConfig, ClientError, ConsumerOptions, Delivery, OutMessage, PutResult};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_proto::{
    AckEntry, ExtendEntry, Frame, Guid, MessageRef, NackEntry, PutMessage, Status, ACK_DURABLE,
    OPEN_CONSUMER, OPEN_PRODUCER,
};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

/// How often PUT deadlines, open retries and server liveness are checked.
pub(crate) const SWEEP_INTERVAL: Duration = Duration::from_millis(50);
/// Commands taken per wake-up (bounds the work between two socket hand-offs).
const MAX_CMDS_PER_ROUND: usize = 4096;
/// PUT payload bytes per batch handed to the writer (at least one message goes).
const MAX_BATCH_PUT_BYTES: usize = 1024 * 1024;
/// Most entries per CONFIRM/NACK/EXTEND frame.
const MAX_REFS_PER_FRAME: usize = 4096;
/// Delay before re-opening a handle the server could not open for a transient reason.
const OPEN_RETRY_DELAY: Duration = Duration::from_millis(200);
/// A connection that dies sooner than this does not reset the reconnect backoff, so a
/// server that accepts and immediately closes cannot make us spin.
const STABLE_CONNECTION: Duration = Duration::from_secs(1);
/// Time the writer gets to flush when the client shuts down.
const CLOSE_FLUSH_BOUND: Duration = Duration::from_secs(1);
/// Margin added to a stopping node's announced drain time before we leave it anyway.
const STOP_MARGIN: Duration = Duration::from_secs(2);
/// Used until the server announces its heartbeat interval.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(2);

pub(crate) enum Cmd {
    Open {
        spec: HandleSpec,
        push_tx: Option<mpsc::UnboundedSender<(u64, Delivery)>>,
        reply: oneshot::Sender<Result<u64, ClientError>>,
    },
    Close {
        handle: u64,
    },
    Configure {
        handle: u64,
        max_unconfirmed_msgs: u32,
        max_unconfirmed_bytes: u64,
    },
    Put(Box<OutPut>),
    Confirm {
        handle: u64,
        msg: MessageRef,
    },
    Nack {
        handle: u64,
        entry: NackEntry,
    },
    Extend {
        handle: u64,
        entry: ExtendEntry,
    },
    Admin {
        body: Bytes,
        reply: oneshot::Sender<(Status, Bytes)>,
    },
    FlushConfirms {
        reply: oneshot::Sender<u64>,
    },
}

#[derive(Clone, Debug)]
pub(crate) struct HandleSpec {
    queue: String,
    flags: u8,
    options: ConsumerOptions,
}

impl HandleSpec {
    pub fn producer(queue: &str) -> Self {
        HandleSpec {
            queue: queue.into(),
            flags: OPEN_PRODUCER,
            options: ConsumerOptions {
                max_unconfirmed_msgs: 0,
                max_unconfirmed_bytes: 0,
                ..ConsumerOptions::default()
            },
        }
    }
    pub fn consumer(queue: &str, options: ConsumerOptions) -> Self {
        HandleSpec {
            queue: queue.into(),
            flags: OPEN_CONSUMER,
            options,
        }
    }
    fn is_consumer(&self) -> bool {
        self.flags & OPEN_CONSUMER != 0
    }
}

/// A PUT on its way from `Producer::send` to the session.
pub(crate) struct OutPut {
    pub handle: u64,
    pub guid: Guid,
    pub msg: OutMessage,
    pub reply: oneshot::Sender<PutResult>,
    /// Released when the PUT resolves: this is what bounds the retransmission buffer.
    pub permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// One entry of the retransmission buffer.
struct Pending {
    handle: u64,
    msg: PutMessage,
    reply: oneshot::Sender<PutResult>,
    deadline: Instant,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

struct Handle {
    spec: HandleSpec,
    push_tx: Option<mpsc::UnboundedSender<(u64, Delivery)>>,
    /// The server's queue_id on the current connection, once OpenQueueOk arrived.
    server_id: Option<u32>,
    /// The caller of `producer()`/`consumer()`, until the first open succeeds or fails.
    open_reply: Option<oneshot::Sender<Result<u64, ClientError>>>,
    /// Sequence numbers of buffered PUTs not yet written on this connection, in order.
    /// Entries already resolved are skipped lazily.
    unsent: VecDeque<u64>,
    /// Buffered PUTs of this handle (sent or not).
    pending: usize,
    /// The producer was dropped: close once its buffered PUTs are resolved.
    closing: bool,
}

enum Req {
    Open(u64),
    Admin(oneshot::Sender<(Status, Bytes)>),
    /// Close/Configure: the answer carries nothing we need.
    Ignore,
}

/// Why [`Session::serve`] returned.
enum Served {
    /// The connection is gone (the reason is logged).
    Lost(String),
    /// Every client handle was dropped and nothing is left to deliver.
    ClientGone,
}

struct Session {
    cfg: ClientConfig,
    /// Raised on every lost connection; deliveries of older connections are stale.
    generation: Arc<AtomicU64>,
    handles: BTreeMap<u64, Handle>,
    next_handle: u64,
    by_server: HashMap<u32, u64>,
    /// The retransmission buffer, in send order (so deadlines are in order too).
    pending: BTreeMap<u64, Pending>,
    by_guid: HashMap<Guid, u64>,
    next_seq: u64,
    requests: HashMap<u32, Req>,
    next_req: u32,
    /// Admin requests taken while disconnected; sent on the next connection.
    parked_admin: Vec<(Bytes, oneshot::Sender<(Status, Bytes)>)>,
    /// Handles to re-open after a transient refusal, with when.
    open_retries: Vec<(Instant, u64)>,
    confirms_outstanding: u64,
    confirms_ok: u64,
    flush_waiters: Vec<oneshot::Sender<u64>>,
    /// Control frames waiting for the writer.
    outbox: Vec<Frame>,
    connected: bool,
    /// Smallest of our and the server's frame limits.
    frame_limit: usize,
    /// The node asked us to stop sending PUTs (graceful stop).
    stopping: bool,
    stop_deadline: Option<Instant>,
    heartbeat: Duration,
    last_heard: Instant,
    last_sent: Instant,
    /// All `Client` clones are gone: finish what is pending, then end.
    cmds_open: bool,
}

/// Wire size of a PUT frame with no messages (type byte and body, no length prefix).
fn empty_put_frame_len() -> usize {
    let empty = Frame::Put {
        queue_id: 0,
        messages: Vec::new(),
    };
    tern_proto::encoded_len(&empty).saturating_sub(4)
}

pub(crate) async fn run(
    cfg: ClientConfig,
    generation: Arc<AtomicU64>,
    mut cmd_rx: mpsc::Receiver<Cmd>,
    ready: oneshot::Sender<Result<(), String>>,
) {
    let mut s = Session::new(cfg, generation);
    let mut ready = Some(ready);
    let started = Instant::now();
    let connect_timeout = Duration::from_millis(s.cfg.connect_timeout_ms);
    let min_backoff = Duration::from_millis(s.cfg.reconnect_backoff_min_ms.max(1));
    let max_backoff = Duration::from_millis(s.cfg.reconnect_backoff_max_ms).max(min_backoff);
    let mut backoff = min_backoff;
    let mut attempt = 0usize;
    let mut last_error;
    loop {
        let server_idx = attempt % s.cfg.servers.len();
        let addr = s.cfg.servers[server_idx].clone();
        attempt += 1;
        // The first connection must succeed within connect_timeout in total.
        let bound = match ready {
            Some(_) => connect_timeout
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(10)),
            None => connect_timeout,
        };
        let params = ConnectParams {
            addr: addr.clone(),
            client_name: s.cfg.client_name.clone(),
            max_frame_bytes: s.cfg.max_frame_bytes,
            bound,
        };
        let Some(result) = s.offline(conn::connect(params), &mut cmd_rx).await else {
            return;
        };
        match result {
            Ok(mut conn) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Ok(()));
                }
                tracing::debug!(%addr, node_id = conn.server.node_id, "connected");
                let since = Instant::now();
                let served = s.serve(&mut conn, &mut cmd_rx).await;
                s.on_disconnect();
                match served {
                    Served::ClientGone => {
                        conn.close(CLOSE_FLUSH_BOUND).await;
                        return;
                    }
                    Served::Lost(reason) => {
                        tracing::info!(%addr, "connection lost: {reason}; reconnecting");
                        last_error = format!("{addr}: {reason}");
                    }
                }
                if since.elapsed() >= STABLE_CONNECTION {
                    backoff = min_backoff;
                    continue; // reconnect at once: most losses are one node going away
                }
            }
            Err(e) => {
                tracing::debug!(%addr, "connect failed: {e}");
                last_error = format!("{addr}: {e}");
            }
        }
        if ready.is_some() && started.elapsed() >= connect_timeout {
            if let Some(r) = ready.take() {
                let _ = r.send(Err(last_error));
            }
            return;
        }
        // Try every server once before sleeping; then back off with jitter.
        if server_idx + 1 == s.cfg.servers.len() {
            let sleep = jitter(backoff);
            let sleep = match ready {
                Some(_) => sleep.min(connect_timeout.saturating_sub(started.elapsed())),
                None => sleep,
            };
            if s.offline(tokio::time::sleep(sleep), &mut cmd_rx)
                .await
                .is_none()
            {
                return;
            }
            backoff = (backoff * 2).min(max_backoff);
        }
    }
}

/// A random duration in [d/2, d], so clients that lost one node do not reconnect in step.
fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    let extra_us = rand::random::<u64>() % (half.as_micros() as u64 + 1);
    half + Duration::from_micros(extra_us)
}

impl Session {
    fn new(cfg: ClientConfig, generation: Arc<AtomicU64>) -> Self {
        let frame_limit = cfg.max_frame_bytes as usize;
        let heartbeat = cfg
            .heartbeat_interval_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_HEARTBEAT);
        Session {
            cfg,
            generation,
            handles: BTreeMap::new(),
            next_handle: 1,
            by_server: HashMap::new(),
            pending: BTreeMap::new(),
            by_guid: HashMap::new(),
            next_seq: 1,
            requests: HashMap::new(),
            next_req: 1,
            parked_admin: Vec::new(),
            open_retries: Vec::new(),
            confirms_outstanding: 0,
            confirms_ok: 0,
            flush_waiters: Vec::new(),
            outbox: Vec::new(),
            connected: false,
            frame_limit,
            stopping: false,
            stop_deadline: None,
            heartbeat,
            last_heard: Instant::now(),
            last_sent: Instant::now(),
            cmds_open: true,
        }
    }

    /// Nothing is left that the session must finish.
    fn idle(&self) -> bool {
        self.pending.is_empty() && self.confirms_outstanding == 0
    }

    /// Awaits `fut` while disconnected, still taking commands and sweeping deadlines.
    /// `None` when the client is gone and nothing is pending.
    async fn offline<F: Future>(
        &mut self,
        fut: F,
        cmd_rx: &mut mpsc::Receiver<Cmd>,
    ) -> Option<F::Output> {
        tokio::pin!(fut);
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            if !self.cmds_open && self.idle() {
                return None;
            }
            tokio::select! {
                out = &mut fut => return Some(out),
                cmd = cmd_rx.recv(), if self.cmds_open => match cmd {
                    Some(cmd) => self.on_cmd(cmd),
                    None => self.cmds_open = false,
                },
                _ = sweep.tick() => self.sweep(),
            }
        }
    }

    /// Serves one connection until it is lost or the client is gone.
    async fn serve(&mut self, conn: &mut Conn, cmd_rx: &mut mpsc::Receiver<Cmd>) -> Served {
        self.on_connect(conn);
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            if !self.cmds_open && self.idle() {
                return Served::ClientGone;
            }
            let want_write = !self.outbox.is_empty() || self.has_sendable_puts();
            tokio::select! {
                item = conn.frames.recv() => match item {
                    Some(Ok(frame)) => {
                        self.last_heard = Instant::now();
                        self.on_frame(frame);
                    }
                    Some(Err(reason)) => return Served::Lost(reason),
                    None => return Served::Lost("reader ended".into()),
                },
                permit = conn.writer.reserve(), if want_write => match permit {
                    Ok(permit) => {
                        let batch = self.take_batch();
                        if !batch.is_empty() {
                            permit.send(batch);
                            self.last_sent = Instant::now();
                        }
                    }
                    Err(_) => return Served::Lost("writer ended".into()),
                },
                cmd = cmd_rx.recv(), if self.cmds_open => match cmd {
                    Some(cmd) => {
                        self.on_cmd(cmd);
                        for _ in 0..MAX_CMDS_PER_ROUND {
                            let Ok(cmd) = cmd_rx.try_recv() else { break };
                            self.on_cmd(cmd);
                        }
                    }
                    None => self.cmds_open = false,
                },
                _ = sweep.tick() => {
                    self.sweep();
                    if let Some(reason) = self.check_liveness() {
                        return Served::Lost(reason);
                    }
                }
            }
        }
    }

    fn on_connect(&mut self, conn: &Conn) {
        self.connected = true;
        self.frame_limit = (self.cfg.max_frame_bytes.min(conn.server.max_frame_bytes)) as usize;
        let server_hb = Duration::from_millis(u64::from(conn.server.heartbeat_interval_ms));
        self.heartbeat = self
            .cfg
            .heartbeat_interval_ms
            .map(Duration::from_millis)
            .unwrap_or(server_hb)
            .max(Duration::from_millis(100));
        self.last_heard = Instant::now();
        self.last_sent = Instant::now();
        self.stopping = false;
        self.stop_deadline = None;
        // Every buffered PUT goes again, in order, with its same GUID.
        for h in self.handles.values_mut() {
            h.unsent.clear();
        }
        for (seq, p) in &self.pending {
            if let Some(h) = self.handles.get_mut(&p.handle) {
                h.unsent.push_back(*seq);
            }
        }
        let ids: Vec<u64> = self.handles.keys().copied().collect();
        for id in ids {
            self.send_open(id);
        }
        for (body, reply) in std::mem::take(&mut self.parked_admin) {
            self.send_admin(body, reply);
        }
    }

    fn on_disconnect(&mut self) {
        self.connected = false;
        // Deliveries of this connection not yet taken by the app are now stale: the
        // server gives them to a consumer again; `Consumer::next` skips them.
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.stopping = false;
        self.stop_deadline = None;
        self.by_server.clear();
        for h in self.handles.values_mut() {
            h.server_id = None;
        }
        for (_, req) in self.requests.drain() {
            if let Req::Admin(reply) = req {
                // Sent but unanswered: it may or may not have been applied.
                let body = r#"{"error":"connection lost before the answer; the request may have been applied"}"#;
                let _ = reply.send((Status::Unavailable, Bytes::from_static(body.as_bytes())));
            }
        }
        self.open_retries.clear();
        self.outbox.clear();
        // CONFIRMs in flight have unknown outcomes; the server redelivers what did not commit.
        self.confirms_outstanding = 0;
        self.wake_flush_waiters();
    }

    /// `Some(reason)` when the connection must be given up.
    fn check_liveness(&mut self) -> Option<String> {
        if self.last_heard.elapsed() > self.heartbeat * 3 {
            return Some(format!(
                "server silent for {} ms (3 heartbeat intervals)",
                self.last_heard.elapsed().as_millis()
            ));
        }
        if self.stop_deadline.is_some_and(|d| Instant::now() > d) {
            return Some("the stopping node did not close within its drain time".into());
        }
        if self.last_sent.elapsed() >= self.heartbeat && self.outbox.is_empty() {
            self.outbox.push(Frame::Heartbeat);
        }
        None
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Open {
                spec,
                push_tx,
                reply,
            } => self.open(spec, push_tx, reply),
            Cmd::Close { handle } => self.close(handle),
            Cmd::Configure {
                handle,
                max_unconfirmed_msgs,
                max_unconfirmed_bytes,
            } => self.configure(handle, max_unconfirmed_msgs, max_unconfirmed_bytes),
            Cmd::Put(put) => self.put(*put),
            Cmd::Confirm { handle, msg } => {
                if let Some(id) = self.server_id(handle) {
                    self.confirms_outstanding += 1;
                    push_coalesced(&mut self.outbox, id, msg);
                }
                // Disconnected: the server redelivers the message; nothing to confirm here.
            }
            Cmd::Nack { handle, entry } => {
                if let Some(id) = self.server_id(handle) {
                    push_coalesced(&mut self.outbox, id, entry);
                }
            }
            Cmd::Extend { handle, entry } => {
                if let Some(id) = self.server_id(handle) {
                    push_coalesced(&mut self.outbox, id, entry);
                }
            }
            Cmd::Admin { body, reply } => {
                if self.connected {
                    self.send_admin(body, reply);
                } else {
                    self.parked_admin.push((body, reply));
                }
            }
            Cmd::FlushConfirms { reply } => {
                if self.confirms_outstanding == 0 {
                    let _ = reply.send(self.confirms_ok);
                } else {
                    self.flush_waiters.push(reply);
                }
            }
        }
    }

    fn server_id(&self, handle: u64) -> Option<u32> {
        self.handles.get(&handle).and_then(|h| h.server_id)
    }

    fn open(
        &mut self,
        spec: HandleSpec,
        push_tx: Option<mpsc::UnboundedSender<(u64, Delivery)>>,
        reply: oneshot::Sender<Result<u64, ClientError>>,
    ) {
        let id = self.next_handle;
        self.next_handle += 1;
        let handle = Handle {
            spec,
            push_tx,
            server_id: None,
            open_reply: Some(reply),
            unsent: VecDeque::new(),
            pending: 0,
            closing: false,
        };
        self.handles.insert(id, handle);
        // Disconnected: `on_connect` opens it.
        self.send_open(id);
    }

    fn close(&mut self, handle: u64) {
        let Some(h) = self.handles.get_mut(&handle) else {
            return;
        };
        // A producer's buffered PUTs still deserve their ACKs: close after them.
        if !h.spec.is_consumer() && h.pending > 0 {
            h.closing = true;
            return;
        }
        let Some(h) = self.handles.remove(&handle) else {
            return;
        };
        if let Some(queue_id) = h.server_id {
            self.by_server.remove(&queue_id);
            let req_id = self.req_id(Req::Ignore);
            self.outbox.push(Frame::CloseQueue { req_id, queue_id });
        }
    }

    fn configure(&mut self, handle: u64, max_msgs: u32, max_bytes: u64) {
        let Some(h) = self.handles.get_mut(&handle) else {
            return;
        };
        // Remembered for re-opens after a failover.
        h.spec.options.max_unconfirmed_msgs = max_msgs;
        h.spec.options.max_unconfirmed_bytes = max_bytes;
        if let Some(queue_id) = h.server_id {
            let req_id = self.req_id(Req::Ignore);
            self.outbox.push(Frame::Configure {
                req_id,
                queue_id,
                max_unconfirmed_msgs: max_msgs,
                max_unconfirmed_bytes: max_bytes,
            });
        }
    }

    fn put(&mut self, put: OutPut) {
        let OutPut {
            handle,
            guid,
            msg,
            reply,
            permits,
        } = put;
        let msg = PutMessage {
            guid,
            ttl_ms: msg.ttl_ms.unwrap_or(0),
            key: msg.key.unwrap_or_default(),
            payload: msg.payload,
        };
        let refuse = |reply: oneshot::Sender<PutResult>, status| {
            let _ = reply.send(PutResult {
                guid,
                status,
                durable: false,
            });
        };
        // Larger than one frame: no server could take it; say so now instead of
        // letting the connection fail on it over and over until the deadline.
        if empty_put_frame_len() + tern_proto::put_message_encoded_len(&msg) > self.frame_limit {
            return refuse(reply, Status::MessageTooLarge);
        }
        if self.by_guid.contains_key(&guid) {
            // The same GUID twice in flight; the first one's ACK answers the first only.
            return refuse(reply, Status::InvalidArgument);
        }
        let Some(h) = self.handles.get_mut(&handle) else {
            return refuse(reply, Status::UnknownHandle);
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        h.pending += 1;
        h.unsent.push_back(seq);
        self.by_guid.insert(guid, seq);
        let deadline = Instant::now() + Duration::from_millis(self.cfg.put_timeout_ms);
        self.pending.insert(
            seq,
            Pending {
                handle,
                msg,
                reply,
                deadline,
                _permits: permits,
            },
        );
    }

    fn req_id(&mut self, req: Req) -> u32 {
        let id = self.next_req;
        self.next_req = self.next_req.wrapping_add(1).max(1);
        self.requests.insert(id, req);
        id
    }

    fn send_admin(&mut self, body: Bytes, reply: oneshot::Sender<(Status, Bytes)>) {
        if reply.is_closed() {
            return; // the caller gave up waiting
        }
        let req_id = self.req_id(Req::Admin(reply));
        self.outbox.push(Frame::AdminRequest { req_id, body });
    }

    fn send_open(&mut self, handle: u64) {
        if !self.connected {
            return;
        }
        let Some(spec) = self.handles.get(&handle).map(|h| h.spec.clone()) else {
            return;
        };
        let req_id = self.req_id(Req::Open(handle));
        self.outbox.push(Frame::OpenQueue {
            req_id,
            queue: spec.queue,
            subscription: spec.options.subscription,
            flags: spec.flags,
            max_unconfirmed_msgs: spec.options.max_unconfirmed_msgs,
            max_unconfirmed_bytes: spec.options.max_unconfirmed_bytes,
        });
    }

    fn on_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Ack { acks } => {
                for a in acks {
                    self.on_ack(a);
                }
            }
            Frame::Push { queue_id, messages } => self.on_push(queue_id, messages),
            Frame::ConfirmAck { entries, .. } => {
                self.confirms_outstanding = self
                    .confirms_outstanding
                    .saturating_sub(entries.len() as u64);
                self.confirms_ok +=
                    entries.iter().filter(|e| e.status == Status::Ok).count() as u64;
                if self.confirms_outstanding == 0 {
                    self.wake_flush_waiters();
                }
            }
            Frame::OpenQueueOk {
                req_id, queue_id, ..
            } => {
                if let Some(Req::Open(local)) = self.requests.remove(&req_id) {
                    self.opened(local, queue_id);
                }
            }
            Frame::Error {
                req_id,
                status,
                message,
            } if req_id != 0 => match self.requests.remove(&req_id) {
                Some(Req::Open(local)) => self.open_failed(local, status, message),
                Some(Req::Admin(reply)) => {
                    let body = serde_json::json!({ "error": message }).to_string();
                    let _ = reply.send((status, Bytes::from(body)));
                }
                Some(Req::Ignore) | None => {}
            },
            Frame::Error {
                status, message, ..
            } => {
                // `unknown_message`: a notice (a NACK or Extend for a message this
                // consumer does not hold); anything else is connection-level and the
                // server closes next (the reader reports the loss).
                tracing::warn!("server error: {status}: {message}");
            }
            Frame::AdminResponse {
                req_id,
                status,
                body,
            } => {
                if let Some(Req::Admin(reply)) = self.requests.remove(&req_id) {
                    let _ = reply.send((status, body));
                }
            }
            Frame::CloseQueueOk { req_id } | Frame::ConfigureOk { req_id } => {
                self.requests.remove(&req_id);
            }
            Frame::Heartbeat => self.outbox.push(Frame::HeartbeatAck),
            Frame::StopRequest { drain_timeout_ms } => {
                // Graceful stop of that node: send it no new PUTs; ACKs still come until it
                // closes. If it outlives its own drain bound (plus a margin), leave anyway.
                self.stopping = true;
                let drain = Duration::from_millis(u64::from(drain_timeout_ms));
                self.stop_deadline = Some(Instant::now() + drain + STOP_MARGIN);
                self.outbox.push(Frame::StopResponse);
            }
            Frame::HeartbeatAck | Frame::StopResponse => {}
            other => tracing::debug!("ignoring frame type 0x{:02x}", other.type_code()),
        }
    }

    fn on_push(&mut self, queue_id: u32, messages: Vec<tern_proto::PushMessage>) {
        let Some(h) = self
            .by_server
            .get(&queue_id)
            .and_then(|id| self.handles.get(id))
        else {
            return; // closed meanwhile; the server releases them with the handle
        };
        let Some(tx) = &h.push_tx else {
            return;
        };
        let generation = self.generation.load(Ordering::Acquire);
        for m in messages {
            let d = Delivery {
                guid: m.guid,
                partition: m.partition,
                attempt: m.attempt,
                payload: m.payload,
                dead_letter: m.dead_letter,
            };
            let _ = tx.send((generation, d));
        }
    }

    fn opened(&mut self, local: u64, queue_id: u32) {
        let Some(h) = self.handles.get_mut(&local) else {
            // Closed while the open was in flight.
            let req_id = self.req_id(Req::Ignore);
            self.outbox.push(Frame::CloseQueue { req_id, queue_id });
            return;
        };
        h.server_id = Some(queue_id);
        self.by_server.insert(queue_id, local);
        let gave_up = match h.open_reply.take() {
            Some(reply) => reply.send(Ok(local)).is_err(),
            None => false,
        };
        if gave_up {
            // The caller timed out and will never use this handle.
            self.close(local);
        }
    }

    fn open_failed(&mut self, local: u64, status: Status, message: String) {
        let transient = matches!(
            status,
            Status::Unavailable | Status::Overloaded | Status::Stopping | Status::Timeout
        );
        let caller_gone = self
            .handles
            .get(&local)
            .and_then(|h| h.open_reply.as_ref())
            .is_some_and(|r| r.is_closed());
        if transient && !caller_gone {
            // No leader yet, or the node is busy: try again shortly (PUT deadlines bound it).
            self.open_retries
                .push((Instant::now() + OPEN_RETRY_DELAY, local));
            return;
        }
        let Some(mut h) = self.handles.remove(&local) else {
            return;
        };
        tracing::warn!(queue = %h.spec.queue, "cannot open queue: {status}: {message}");
        if let Some(reply) = h.open_reply.take() {
            let _ = reply.send(Err(ClientError::Refused { status, message }));
        }
        // Its buffered PUTs can never be sent: answer them with the refusal.
        let owned: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.handle == local)
            .map(|(s, _)| *s)
            .collect();
        for seq in owned {
            self.resolve(seq, status, false);
        }
    }

    fn on_ack(&mut self, a: AckEntry) {
        if let Some(seq) = self.by_guid.get(&a.guid).copied() {
            self.resolve(seq, a.status, a.flags & ACK_DURABLE != 0);
        }
    }

    fn resolve(&mut self, seq: u64, status: Status, durable: bool) {
        let Some(p) = self.pending.remove(&seq) else {
            return;
        };
        self.by_guid.remove(&p.msg.guid);
        let _ = p.reply.send(PutResult {
            guid: p.msg.guid,
            status,
            durable,
        });
        let close_now = match self.handles.get_mut(&p.handle) {
            Some(h) => {
                h.pending = h.pending.saturating_sub(1);
                h.closing && h.pending == 0
            }
            None => false,
        };
        if close_now {
            self.close(p.handle);
        }
    }

    /// Answers every PUT past its deadline with `timeout` (outcome unknown) and
    /// re-sends opens whose retry time came.
    fn sweep(&mut self) {
        let now = Instant::now();
        // Deadlines grow with the sequence number, so the expired ones are a prefix.
        let expired: Vec<u64> = self
            .pending
            .iter()
            .take_while(|(_, p)| p.deadline <= now)
            .map(|(s, _)| *s)
            .collect();
        for seq in expired {
            self.resolve(seq, Status::Timeout, false);
        }
        if self.connected && !self.open_retries.is_empty() {
            let (due, later): (Vec<_>, Vec<_>) =
                self.open_retries.drain(..).partition(|(at, _)| *at <= now);
            self.open_retries = later;
            for (_, handle) in due {
                self.send_open(handle);
            }
        }
    }

    fn wake_flush_waiters(&mut self) {
        for w in self.flush_waiters.drain(..) {
            let _ = w.send(self.confirms_ok);
        }
    }

    fn has_sendable_puts(&self) -> bool {
        !self.stopping
            && self
                .handles
                .values()
                .any(|h| h.server_id.is_some() && !h.unsent.is_empty())
    }

    /// The next batch for the writer: control frames, then PUT frames up to the budget.
    fn take_batch(&mut self) -> Vec<Frame> {
        let mut batch = std::mem::take(&mut self.outbox);
        self.fill_puts(&mut batch);
        batch
    }

    /// Moves unsent PUTs of open handles into PUT frames, each under the frame limit.
    fn fill_puts(&mut self, batch: &mut Vec<Frame>) {
        if self.stopping {
            return;
        }
        let overhead = empty_put_frame_len();
        let limit = self.frame_limit;
        let mut budget = MAX_BATCH_PUT_BYTES;
        let mut too_large = Vec::new();
        for h in self.handles.values_mut() {
            let Some(queue_id) = h.server_id else {
                continue;
            };
            let mut messages = Vec::new();
            let mut frame_len = overhead;
            while let Some(&seq) = h.unsent.front() {
                let Some(p) = self.pending.get(&seq) else {
                    h.unsent.pop_front(); // resolved meanwhile
                    continue;
                };
                let len = tern_proto::put_message_encoded_len(&p.msg);
                if overhead + len > limit {
                    // This server's limit is below ours: it can never take this message.
                    too_large.push(seq);
                    h.unsent.pop_front();
                    continue;
                }
                if budget < len && !(messages.is_empty() && batch.is_empty()) {
                    break;
                }
                if frame_len + len > limit {
                    let full = std::mem::take(&mut messages);
                    batch.push(Frame::Put {
                        queue_id,
                        messages: full,
                    });
                    frame_len = overhead;
                }
                messages.push(p.msg.clone());
                frame_len += len;
                budget = budget.saturating_sub(len);
                h.unsent.pop_front();
            }
            if !messages.is_empty() {
                batch.push(Frame::Put { queue_id, messages });
            }
            if budget == 0 {
                break;
            }
        }
        for seq in too_large {
            self.resolve(seq, Status::MessageTooLarge, false);
        }
    }
}

/// Frames that carry a list of per-message entries for one queue handle.
trait RefEntry: Sized {
    /// Appends `self` to `frame` if it is this kind of frame for `queue_id` and has room.
    fn append_to(self, frame: &mut Frame, queue_id: u32) -> Result<(), Self>;
    fn into_frame(self, queue_id: u32) -> Frame;
}

impl RefEntry for MessageRef {
    fn append_to(self, frame: &mut Frame, id: u32) -> Result<(), Self> {
        match frame {
            Frame::Confirm { queue_id, messages }
                if *queue_id == id && messages.len() < MAX_REFS_PER_FRAME =>
            {
                messages.push(self);
                Ok(())
            }
            _ => Err(self),
        }
    }
    fn into_frame(self, queue_id: u32) -> Frame {
        Frame::Confirm {
            queue_id,
            messages: vec![self],
        }
    }
}

impl RefEntry for NackEntry {
    fn append_to(self, frame: &mut Frame, id: u32) -> Result<(), Self> {
        match frame {
            Frame::Nack { queue_id, entries }
                if *queue_id == id && entries.len() < MAX_REFS_PER_FRAME =>
            {
                entries.push(self);
                Ok(())
            }
            _ => Err(self),
        }
    }
    fn into_frame(self, queue_id: u32) -> Frame {
        Frame::Nack {
            queue_id,
            entries: vec![self],
        }
    }
}

impl RefEntry for ExtendEntry {
    fn append_to(self, frame: &mut Frame, id: u32) -> Result<(), Self> {
        match frame {
            Frame::Extend { queue_id, entries }
                if *queue_id == id && entries.len() < MAX_REFS_PER_FRAME =>
            {
                entries.push(self);
                Ok(())
            }
            _ => Err(self),
        }
    }
    fn into_frame(self, queue_id: u32) -> Frame {
        Frame::Extend {
            queue_id,
            entries: vec![self],
        }
    }
}

/// Adds an entry to the outbox, into the last frame when it is of the same kind and
/// handle, so a burst of CONFIRMs becomes one frame.
fn push_coalesced<E: RefEntry>(outbox: &mut Vec<Frame>, queue_id: u32, entry: E) {
    let entry = match outbox.last_mut() {
        Some(last) => match entry.append_to(last, queue_id) {
            Ok(()) => return,
            Err(entry) => entry,
        },
        None => entry,
    };
    outbox.push(entry.into_frame(queue_id));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guid(n: u8) -> Guid {
        [n; 16]
    }

    #[test]
    fn confirms_coalesce_per_handle() {
        let mut outbox = Vec::new();
        for n in 0..3 {
            let r = MessageRef {
                guid: guid(n),
                partition: 0,
            };
            push_coalesced(&mut outbox, 7, r);
        }
        let r = MessageRef {
            guid: guid(9),
            partition: 1,
        };
        push_coalesced(&mut outbox, 8, r);
        assert_eq!(outbox.len(), 2);
        assert!(
            matches!(&outbox[0], Frame::Confirm { queue_id: 7, messages } if messages.len() == 3)
        );
        assert!(
            matches!(&outbox[1], Frame::Confirm { queue_id: 8, messages } if messages.len() == 1)
        );
    }

    #[test]
    fn jitter_stays_within_half_and_full() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(100));
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(100));
        }
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }
}
