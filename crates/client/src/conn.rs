//! One TCP connection to a node: the handshake, then a reader task and a writer task.
//!
//! - The **reader task** decodes frames and forwards them to the session over a bounded
//!   channel. When the session falls behind, the reader stops reading and TCP pushes
//!   back on the server.
//! - The **writer task** drains a bounded channel of frame batches and writes many
//!   frames per `write` call. Because only this task awaits socket writes, a server
//!   that stops reading (SIGSTOP, overload) cannot stall the session: PUT deadlines,
//!   heartbeats and the silence check keep running.
//!
//! Both tasks end when the connection fails or when [`Conn`] is dropped.

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tern_proto::{Frame, FrameCodec, PROTOCOL_VERSION};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::codec::{Encoder, FramedRead, FramedWrite};

/// Decoded frames waiting for the session (each frame may carry many messages).
const READ_QUEUE_FRAMES: usize = 256;
/// Batches waiting for the writer; together with the batch byte budget this bounds
/// what is queued above the socket.
const WRITE_QUEUE_BATCHES: usize = 4;
/// Most bytes the writer encodes before issuing a write.
const MAX_WRITE_BYTES: usize = 1024 * 1024;
/// The writer's buffer is shrunk back after a large frame so one big message does not
/// pin memory for the connection's lifetime.
const WRITE_BUF_KEEP_BYTES: usize = 4 * 1024 * 1024;

/// What the server said in `HelloOk`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ServerInfo {
    pub node_id: u64,
    pub max_frame_bytes: u32,
    pub heartbeat_interval_ms: u32,
}

/// An established connection; dropping it stops both tasks.
pub(crate) struct Conn {
    pub frames: mpsc::Receiver<Result<Frame, String>>,
    pub writer: mpsc::Sender<Vec<Frame>>,
    pub server: ServerInfo,
    reader_task: JoinHandle<()>,
    writer_task: Option<JoinHandle<()>>,
}

impl Conn {
    /// Lets the writer finish what is queued (bounded), then closes.
    pub async fn close(mut self, bound: Duration) {
        let (tx, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.writer, tx));
        if let Some(task) = self.writer_task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(bound, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader_task.abort();
        if let Some(task) = &self.writer_task {
            task.abort();
        }
    }
}

/// Parameters of one connection attempt.
#[derive(Clone, Debug)]
pub(crate) struct ConnectParams {
    pub addr: String,
    pub client_name: String,
    pub max_frame_bytes: u32,
    /// Bound on TCP connect plus handshake.
    pub bound: Duration,
}

/// Connects and runs the `Hello` handshake, all within `params.bound`.
pub(crate) async fn connect(params: ConnectParams) -> Result<Conn, String> {
    let bound = params.bound;
    tokio::time::timeout(bound, connect_inner(params))
        .await
        .map_err(|_| {
            format!(
                "no connection and handshake within {} ms",
                bound.as_millis()
            )
        })?
}

async fn connect_inner(params: ConnectParams) -> Result<Conn, String> {
    let stream = TcpStream::connect(&params.addr)
        .await
        .map_err(|e| e.to_string())?;
    // PUTs and ACKs are small and latency-bound; batching is done by the writer instead.
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let mut reader = FramedRead::new(rd, FrameCodec::new(params.max_frame_bytes));
    let mut writer = FramedWrite::new(wr, FrameCodec::new(params.max_frame_bytes));
    writer
        .send(Frame::Hello {
            version: PROTOCOL_VERSION,
            client_name: params.client_name.clone(),
        })
        .await
        .map_err(|e| e.to_string())?;
    let server = match reader.next().await {
        Some(Ok(Frame::HelloOk {
            node_id,
            max_frame_bytes,
            heartbeat_interval_ms,
            ..
        })) => ServerInfo {
            node_id,
            max_frame_bytes,
            heartbeat_interval_ms,
        },
        Some(Ok(Frame::Error {
            status, message, ..
        })) => return Err(format!("refused: {status}: {message}")),
        Some(Ok(other)) => {
            return Err(format!(
                "unexpected first frame type 0x{:02x}",
                other.type_code()
            ))
        }
        Some(Err(e)) => return Err(e.to_string()),
        None => return Err("closed during the handshake".into()),
    };
    // Encode with the smaller of both limits: the session never queues a larger frame.
    let write_limit = params.max_frame_bytes.min(server.max_frame_bytes);
    let (frames_tx, frames_rx) = mpsc::channel(READ_QUEUE_FRAMES);
    let (batch_tx, batch_rx) = mpsc::channel(WRITE_QUEUE_BATCHES);
    let reader_task = tokio::spawn(read_loop(reader, frames_tx));
    let wr = writer.into_inner();
    let writer_task = tokio::spawn(write_loop(wr, batch_rx, FrameCodec::new(write_limit)));
    Ok(Conn {
        frames: frames_rx,
        writer: batch_tx,
        server,
        reader_task,
        writer_task: Some(writer_task),
    })
}

/// Forwards decoded frames; the last item is the reason the connection ended.
async fn read_loop(
    mut reader: FramedRead<OwnedReadHalf, FrameCodec>,
    tx: mpsc::Sender<Result<Frame, String>>,
) {
    loop {
        let item = tokio::select! {
            item = reader.next() => item,
            _ = tx.closed() => return,
        };
        let (item, last) = match item {
            Some(Ok(frame)) => (Ok(frame), false),
            Some(Err(e)) => (Err(e.to_string()), true),
            None => (Err("closed by the server".to_string()), true),
        };
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

/// Writes queued batches, coalescing whatever is ready into one write.
async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Vec<Frame>>,
    mut codec: FrameCodec,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while let Some(batch) = rx.recv().await {
        if let Err(e) = encode_all(&mut codec, batch, &mut buf) {
            tracing::warn!("dropping the connection: cannot encode a frame: {e}");
            return;
        }
        while buf.len() < MAX_WRITE_BYTES {
            let Ok(batch) = rx.try_recv() else { break };
            if let Err(e) = encode_all(&mut codec, batch, &mut buf) {
                tracing::warn!("dropping the connection: cannot encode a frame: {e}");
                return;
            }
        }
        if wr.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
        if buf.capacity() > WRITE_BUF_KEEP_BYTES {
            buf = BytesMut::with_capacity(64 * 1024);
        }
    }
    let _ = wr.shutdown().await;
}

fn encode_all(
    codec: &mut FrameCodec,
    batch: Vec<Frame>,
    buf: &mut BytesMut,
) -> Result<(), tern_proto::ProtoError> {
    for frame in batch {
        codec.encode(frame, buf)?;
    }
    Ok(())
}
