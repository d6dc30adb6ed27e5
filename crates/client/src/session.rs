//! The session task: the only owner of the TCP connection and the retransmission buffer.
//!
//! Loop: connect (cycling servers, exponential backoff) → Hello → re-open every handle
//! → retransmit every un-ACKed PUT (same GUIDs) → serve frames and commands until the
//! connection fails or the server finishes a graceful stop → again. PUT deadlines are
//! swept every 50 ms whether connected or not, so no PUT outlives `put_timeout_ms`.

use crate::{ClientConfig, ClientError, ConsumerOptions, Delivery, OutMessage, PutResult};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tern_proto::{
    AckEntry, Frame, FrameCodec, Guid, MessageRef, NackEntry, PutMessage, Status, ACK_DURABLE,
    OPEN_CONSUMER, OPEN_PRODUCER, PROTOCOL_VERSION,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio_util::codec::Framed;

const SWEEP_INTERVAL: Duration = Duration::from_millis(50);
/// Commands taken per wake-up before writing (bounds one batch).
const MAX_CMDS_PER_ROUND: usize = 4096;
/// Headroom kept below the frame limit when filling a PUT frame.
const FRAME_SLACK_BYTES: usize = 64;

pub(crate) enum Cmd {
    Open {
        spec: HandleSpec,
        push_tx: Option<mpsc::UnboundedSender<Delivery>>,
        reply: oneshot::Sender<Result<u64, ClientError>>,
    },
    Put(Box<OutPut>),
    Confirm {
        handle: u64,
        guid: Guid,
        partition: u16,
    },
    Nack {
        handle: u64,
        guid: Guid,
        partition: u16,
        delay_ms: u32,
    },
    Extend {
        handle: u64,
        guid: Guid,
        partition: u16,
        extra_ms: u32,
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
            options: ConsumerOptions::default(),
        }
    }
    pub fn consumer(queue: &str, options: ConsumerOptions) -> Self {
        HandleSpec {
            queue: queue.into(),
            flags: OPEN_CONSUMER,
            options,
        }
    }
}

pub(crate) struct OutPut {
    pub handle: u64,
    pub guid: Guid,
    pub msg: OutMessage,
    pub reply: oneshot::Sender<PutResult>,
    pub permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

struct Pending {
    handle: u64,
    msg: PutMessage,
    reply: oneshot::Sender<PutResult>,
    deadline: Instant,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

struct Handle {
    spec: HandleSpec,
    push_tx: Option<mpsc::UnboundedSender<Delivery>>,
    /// The server's queue_id on the current connection, once OpenQueueOk arrived.
    server_id: Option<u32>,
    /// The caller of `producer()`/`consumer()` waiting for the first open.
    open_reply: Option<oneshot::Sender<Result<u64, ClientError>>>,
}

enum Req {
    Open(u64),
    Admin(oneshot::Sender<(Status, Bytes)>),
}

type Conn = Framed<TcpStream, FrameCodec>;

struct Session {
    cfg: ClientConfig,
    handles: BTreeMap<u64, Handle>,
    next_handle: u64,
    by_server: HashMap<u32, u64>,
    /// The retransmission buffer, in send order.
    pending: BTreeMap<u64, Pending>,
    by_guid: HashMap<Guid, u64>,
    next_seq: u64,
    /// Buffered PUTs not yet written on the current connection.
    unsent: BTreeMap<u64, ()>,
    requests: HashMap<u32, Req>,
    next_req: u32,
    confirms_outstanding: u64,
    confirms_ok: u64,
    flush_waiters: Vec<oneshot::Sender<u64>>,
    /// Frames to write at the end of this round.
    outbox: Vec<Frame>,
    /// The server asked us to stop sending PUTs (graceful stop).
    stopping: bool,
    /// When it asked, and how long it said it would drain.
    stop_deadline: Option<Instant>,
    heartbeat: Duration,
    last_heard: Instant,
}

pub(crate) async fn run(
    cfg: ClientConfig,
    mut cmd_rx: mpsc::Receiver<Cmd>,
    ready: oneshot::Sender<Result<(), String>>,
) {
    let mut s = Session::new(cfg);
    let mut ready = Some(ready);
    let started = Instant::now();
    let mut backoff = Duration::from_millis(s.cfg.reconnect_backoff_min_ms);
    let mut idx = 0usize;
    let mut last_error = String::new();
    loop {
        let addr = s.cfg.servers[idx % s.cfg.servers.len()].clone();
        match connect(&s.cfg, &addr).await {
            Ok((conn, heartbeat_ms)) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Ok(()));
                }
                backoff = Duration::from_millis(s.cfg.reconnect_backoff_min_ms);
                s.heartbeat = Duration::from_millis(u64::from(heartbeat_ms.max(100)));
                let closed = s.serve(conn, &mut cmd_rx).await;
                s.on_disconnect();
                if closed {
                    return; // every client handle is gone
                }
                if s.stopping {
                    idx += 1; // the node is stopping: prefer another one
                    s.stopping = false;
                    s.stop_deadline = None;
                }
            }
            Err(e) => {
                last_error = format!("{addr}: {e}");
                idx += 1;
            }
        }
        if let Some(r) = ready.as_ref() {
            let tried_all = idx >= s.cfg.servers.len();
            if tried_all && started.elapsed() >= Duration::from_millis(s.cfg.connect_timeout_ms) {
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(last_error));
                }
                return;
            }
            let _ = r;
        }
        if s.wait_disconnected(backoff, &mut cmd_rx).await {
            return;
        }
        backoff = (backoff * 2).min(Duration::from_millis(s.cfg.reconnect_backoff_max_ms));
    }
}

async fn connect(cfg: &ClientConfig, addr: &str) -> Result<(Conn, u32), String> {
    let bound = Duration::from_millis(cfg.connect_timeout_ms);
    let stream = tokio::time::timeout(bound, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let mut conn = Framed::new(stream, FrameCodec::new(cfg.max_frame_bytes));
    conn.send(Frame::Hello {
        version: PROTOCOL_VERSION,
        client_name: cfg.client_name.clone(),
    })
    .await
    .map_err(|e| e.to_string())?;
    match tokio::time::timeout(bound, conn.next()).await {
        Ok(Some(Ok(Frame::HelloOk {
            heartbeat_interval_ms,
            ..
        }))) => Ok((conn, heartbeat_interval_ms)),
        Ok(Some(Ok(Frame::Error {
            status, message, ..
        }))) => Err(format!("{status}: {message}")),
        Ok(Some(Ok(other))) => Err(format!("unexpected first frame {other:?}")),
        Ok(Some(Err(e))) => Err(e.to_string()),
        Ok(None) => Err("closed during handshake".into()),
        Err(_) => Err("handshake timed out".into()),
    }
}

impl Session {
    fn new(cfg: ClientConfig) -> Self {
        Session {
            cfg,
            handles: BTreeMap::new(),
            next_handle: 1,
            by_server: HashMap::new(),
            pending: BTreeMap::new(),
            by_guid: HashMap::new(),
            next_seq: 1,
            unsent: BTreeMap::new(),
            requests: HashMap::new(),
            next_req: 1,
            confirms_outstanding: 0,
            confirms_ok: 0,
            flush_waiters: Vec::new(),
            outbox: Vec::new(),
            stopping: false,
            stop_deadline: None,
            heartbeat: Duration::from_secs(2),
            last_heard: Instant::now(),
        }
    }

    /// Serves one connection. Returns true when the command channel closed (client dropped)
    /// and nothing is left to deliver.
    async fn serve(&mut self, mut conn: Conn, cmd_rx: &mut mpsc::Receiver<Cmd>) -> bool {
        self.last_heard = Instant::now();
        self.reopen_all();
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        let mut cmds_open = true;
        loop {
            tokio::select! {
                frame = conn.next() => match frame {
                    Some(Ok(frame)) => {
                        self.last_heard = Instant::now();
                        self.on_frame(frame);
                    }
                    _ => return false,
                },
                cmd = cmd_rx.recv(), if cmds_open => match cmd {
                    Some(cmd) => {
                        self.on_cmd(cmd, true);
                        for _ in 0..MAX_CMDS_PER_ROUND {
                            match cmd_rx.try_recv() {
                                Ok(cmd) => self.on_cmd(cmd, true),
                                Err(_) => break,
                            }
                        }
                    }
                    None => cmds_open = false,
                },
                _ = sweep.tick() => {
                    self.sweep();
                    if self.last_heard.elapsed() > self.heartbeat * 3 {
                        return false; // the server went silent: fail over
                    }
                    if self.stop_deadline.is_some_and(|d| Instant::now() > d) {
                        return false; // the stopping node did not close in time
                    }
                }
            }
            if !cmds_open && self.pending.is_empty() && self.confirms_outstanding == 0 {
                return true;
            }
            self.fill_puts();
            if self.flush(&mut conn).await.is_err() {
                return false;
            }
        }
    }

    /// While disconnected: keep taking commands and sweeping deadlines for `wait`.
    /// Returns true when the client is gone and nothing is pending.
    async fn wait_disconnected(
        &mut self,
        wait: Duration,
        cmd_rx: &mut mpsc::Receiver<Cmd>,
    ) -> bool {
        let until = tokio::time::Instant::now() + wait;
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return false,
                cmd = cmd_rx.recv() => match cmd {
                    Some(cmd) => self.on_cmd(cmd, false),
                    None => {
                        if self.pending.is_empty() {
                            return true;
                        }
                        // Keep trying to deliver buffered PUTs until their deadlines.
                        tokio::time::sleep_until(until).await;
                        self.sweep();
                        return false;
                    }
                },
                _ = sweep.tick() => self.sweep(),
            }
        }
    }

    fn on_cmd(&mut self, cmd: Cmd, connected: bool) {
        match cmd {
            Cmd::Open {
                spec,
                push_tx,
                reply,
            } => {
                let id = self.next_handle;
                self.next_handle += 1;
                self.handles.insert(
                    id,
                    Handle {
                        spec,
                        push_tx,
                        server_id: None,
                        open_reply: Some(reply),
                    },
                );
                if connected {
                    self.send_open(id);
                }
            }
            Cmd::Put(put) => {
                let OutPut {
                    handle,
                    guid,
                    msg,
                    reply,
                    permits,
                } = *put;
                let seq = self.next_seq;
                self.next_seq += 1;
                let msg = PutMessage {
                    guid,
                    ttl_ms: msg.ttl_ms.unwrap_or(0),
                    key: msg.key.unwrap_or_default(),
                    payload: msg.payload,
                };
                let deadline = Instant::now() + Duration::from_millis(self.cfg.put_timeout_ms);
                if let Some(old) = self.by_guid.insert(guid, seq) {
                    // The same GUID twice in flight: the first one's outcome is the answer to both.
                    self.by_guid.insert(guid, old);
                    let _ = reply.send(PutResult {
                        guid,
                        status: Status::InvalidArgument,
                        durable: false,
                    });
                    return;
                }
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
                self.unsent.insert(seq, ());
            }
            Cmd::Confirm {
                handle,
                guid,
                partition,
            } => {
                if let Some(id) = self.handles.get(&handle).and_then(|h| h.server_id) {
                    self.confirms_outstanding += 1;
                    let r = MessageRef { guid, partition };
                    // Coalesce with the previous CONFIRM frame of this round (one frame, many messages).
                    match self.outbox.last_mut() {
                        Some(Frame::Confirm { queue_id, messages })
                            if *queue_id == id && messages.len() < 4096 =>
                        {
                            messages.push(r)
                        }
                        _ => self.outbox.push(Frame::Confirm {
                            queue_id: id,
                            messages: vec![r],
                        }),
                    }
                }
                // Disconnected: the server redelivers the message; nothing to confirm here.
            }
            Cmd::Extend {
                handle,
                guid,
                partition,
                extra_ms,
            } => {
                if let Some(id) = self.handles.get(&handle).and_then(|h| h.server_id) {
                    let entries = vec![tern_proto::ExtendEntry {
                        guid,
                        partition,
                        extra_ms,
                    }];
                    self.outbox.push(Frame::Extend {
                        queue_id: id,
                        entries,
                    });
                }
            }
            Cmd::Nack {
                handle,
                guid,
                partition,
                delay_ms,
            } => {
                if let Some(id) = self.handles.get(&handle).and_then(|h| h.server_id) {
                    self.outbox.push(Frame::Nack {
                        queue_id: id,
                        entries: vec![NackEntry {
                            guid,
                            partition,
                            delay_ms,
                        }],
                    });
                }
            }
            Cmd::Admin { body, reply } => {
                if !connected {
                    let _ = reply.send((
                        Status::Unavailable,
                        Bytes::from_static(b"{\"error\":\"not connected\"}"),
                    ));
                    return;
                }
                let req_id = self.req_id();
                self.requests.insert(req_id, Req::Admin(reply));
                self.outbox.push(Frame::AdminRequest { req_id, body });
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

    fn req_id(&mut self) -> u32 {
        let id = self.next_req;
        self.next_req = self.next_req.wrapping_add(1).max(1);
        id
    }

    fn send_open(&mut self, handle: u64) {
        let Some(h) = self.handles.get(&handle) else {
            return;
        };
        let frame = Frame::OpenQueue {
            req_id: 0,
            queue: h.spec.queue.clone(),
            subscription: h.spec.options.subscription.clone(),
            flags: h.spec.flags,
            max_unconfirmed_msgs: h.spec.options.max_unconfirmed_msgs,
            max_unconfirmed_bytes: h.spec.options.max_unconfirmed_bytes,
        };
        let req_id = self.req_id();
        self.requests.insert(req_id, Req::Open(handle));
        if let Frame::OpenQueue {
            queue,
            subscription,
            flags,
            max_unconfirmed_msgs,
            max_unconfirmed_bytes,
            ..
        } = frame
        {
            self.outbox.push(Frame::OpenQueue {
                req_id,
                queue,
                subscription,
                flags,
                max_unconfirmed_msgs,
                max_unconfirmed_bytes,
            });
        }
    }

    fn reopen_all(&mut self) {
        let ids: Vec<u64> = self.handles.keys().copied().collect();
        for id in ids {
            self.send_open(id);
        }
        self.unsent = self.pending.keys().map(|k| (*k, ())).collect();
    }

    fn on_disconnect(&mut self) {
        self.by_server.clear();
        for h in self.handles.values_mut() {
            h.server_id = None;
        }
        for (_, req) in self.requests.drain() {
            if let Req::Admin(reply) = req {
                let _ = reply.send((
                    Status::Unavailable,
                    Bytes::from_static(b"{\"error\":\"connection lost\"}"),
                ));
            }
        }
        self.outbox.clear();
        // CONFIRMs in flight have unknown outcomes; the server redelivers what did not commit.
        self.confirms_outstanding = 0;
        self.wake_flush_waiters();
    }

    fn on_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Ack { acks } => {
                for a in acks {
                    self.on_ack(a);
                }
            }
            Frame::Push { queue_id, messages } => {
                let Some(h) = self
                    .by_server
                    .get(&queue_id)
                    .and_then(|id| self.handles.get(id))
                else {
                    return;
                };
                if let Some(tx) = &h.push_tx {
                    for m in messages {
                        let _ = tx.send(Delivery {
                            guid: m.guid,
                            partition: m.partition,
                            attempt: m.attempt,
                            payload: m.payload,
                        });
                    }
                }
            }
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
                    if let Some(h) = self.handles.get_mut(&local) {
                        h.server_id = Some(queue_id);
                        self.by_server.insert(queue_id, local);
                        if let Some(reply) = h.open_reply.take() {
                            let _ = reply.send(Ok(local));
                        }
                    }
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
                None => {}
            },
            Frame::AdminResponse {
                req_id,
                status,
                body,
            } => {
                if let Some(Req::Admin(reply)) = self.requests.remove(&req_id) {
                    let _ = reply.send((status, body));
                }
            }
            Frame::Heartbeat => self.outbox.push(Frame::HeartbeatAck),
            Frame::StopRequest { drain_timeout_ms } => {
                // Graceful stop of that node: send it no new PUTs; ACKs still come until it
                // closes. If it outlives its own drain bound (plus a margin), leave anyway.
                self.stopping = true;
                let margin = Duration::from_millis(u64::from(drain_timeout_ms) + 2_000);
                self.stop_deadline = Some(Instant::now() + margin);
                self.outbox.push(Frame::StopResponse);
            }
            _ => {}
        }
    }

    fn open_failed(&mut self, local: u64, status: Status, message: String) {
        let Some(mut h) = self.handles.remove(&local) else {
            return;
        };
        if let Some(reply) = h.open_reply.take() {
            let _ = reply.send(Err(ClientError::Refused { status, message }));
        }
        // Its buffered PUTs can never be sent: answer them with the refusal.
        let seqs: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.handle == local)
            .map(|(s, _)| *s)
            .collect();
        for seq in seqs {
            self.resolve(seq, status, false);
        }
    }

    fn on_ack(&mut self, a: AckEntry) {
        if let Some(seq) = self.by_guid.get(&a.guid).copied() {
            self.resolve(seq, a.status, a.flags & ACK_DURABLE != 0);
        }
    }

    fn resolve(&mut self, seq: u64, status: Status, durable: bool) {
        self.unsent.remove(&seq);
        if let Some(p) = self.pending.remove(&seq) {
            self.by_guid.remove(&p.msg.guid);
            let _ = p.reply.send(PutResult {
                guid: p.msg.guid,
                status,
                durable,
            });
        }
    }

    /// Answers every PUT past its deadline with `timeout` (outcome unknown).
    fn sweep(&mut self) {
        let now = Instant::now();
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(s, _)| *s)
            .collect();
        for seq in expired {
            self.resolve(seq, Status::Timeout, false);
        }
    }

    fn wake_flush_waiters(&mut self) {
        for w in self.flush_waiters.drain(..) {
            let _ = w.send(self.confirms_ok);
        }
    }

    /// Moves unsent PUTs of open handles into PUT frames, each under the frame limit.
    fn fill_puts(&mut self) {
        if self.stopping || self.unsent.is_empty() {
            return;
        }
        let max = self.cfg.max_frame_bytes as usize - FRAME_SLACK_BYTES;
        let mut frames: BTreeMap<u32, (Vec<PutMessage>, usize)> = BTreeMap::new();
        let mut sent = Vec::new();
        for seq in self.unsent.keys() {
            let Some(p) = self.pending.get(seq) else {
                continue;
            };
            let Some(id) = self.handles.get(&p.handle).and_then(|h| h.server_id) else {
                continue;
            };
            let size = 16 + 8 + 2 + p.msg.key.len() + 4 + p.msg.payload.len();
            let entry = frames.entry(id).or_insert_with(|| (Vec::new(), 16));
            if entry.1 + size > max && !entry.0.is_empty() {
                let (msgs, _) = std::mem::replace(entry, (Vec::new(), 16));
                self.outbox.push(Frame::Put {
                    queue_id: id,
                    messages: msgs,
                });
            }
            let entry = frames.entry(id).or_insert_with(|| (Vec::new(), 16));
            entry.0.push(p.msg.clone());
            entry.1 += size;
            sent.push(*seq);
        }
        for seq in sent {
            self.unsent.remove(&seq);
        }
        for (id, (msgs, _)) in frames {
            if !msgs.is_empty() {
                self.outbox.push(Frame::Put {
                    queue_id: id,
                    messages: msgs,
                });
            }
        }
    }

    async fn flush(&mut self, conn: &mut Conn) -> Result<(), tern_proto::ProtoError> {
        if self.outbox.is_empty() {
            return Ok(());
        }
        for frame in self.outbox.drain(..) {
            conn.feed(frame).await?;
        }
        conn.flush().await
    }
}
