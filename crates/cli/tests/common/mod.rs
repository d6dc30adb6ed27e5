//! Helpers for the `client_*` tests: a real `tern server` process on free ports with a
//! temporary data dir, the CLI as a user runs it, and the history checker.

#![allow(dead_code)]

pub mod history;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Bound on a server becoming ready after a (re)start.
const READY_BOUND: Duration = Duration::from_secs(30);
/// Bound on any one CLI command in these tests.
const CLI_BOUND: Duration = Duration::from_secs(120);

pub fn tern() -> &'static str {
    env!("CARGO_BIN_EXE_tern")
}

#[path = "../../src/ports.rs"]
mod ports;

/// A port nobody listens on right now (see `src/ports.rs`).
pub fn free_port() -> u16 {
    ports::find_free_port().expect("free port")
}

/// A `tern server` with its own ports and data dir; killed when dropped.
pub struct TernServer {
    child: Option<Child>,
    dir: PathBuf,
    pub port: u16,
    pub http_port: u16,
    pub peer_port: u16,
    extra: Vec<String>,
}

impl TernServer {
    pub fn start(dir: &Path, extra: &[&str]) -> TernServer {
        let mut s = TernServer {
            child: None,
            dir: dir.to_path_buf(),
            port: free_port(),
            http_port: free_port(),
            peer_port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn();
        s
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// Starts (or restarts) the process on the same ports and data dir.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("log file");
        let child = Command::new(tern())
            .arg("server")
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen", &self.addr()])
            .args(["--http-listen", &format!("127.0.0.1:{}", self.http_port)])
            .args(["--peer-listen", &format!("127.0.0.1:{}", self.peer_port)])
            // Test machines have little free disk; no reserve.
            .args(["--min-free-disk-bytes", "0"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tern server");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_BOUND;
        while Instant::now() < deadline {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                panic!("server exited ({status}); log:\n{}", self.log());
            }
            if http_get(self.http_port, "/ready").is_some_and(|(code, _)| code == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server did not become ready; log:\n{}", self.log());
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for TernServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends a signal by name (`STOP`, `CONT`, `TERM`, `KILL`) to one process.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// Runs `tern ARGS` with `stdin` as input, killed after [`CLI_BOUND`].
pub fn cli(args: &[&str], stdin: Option<&[u8]>) -> Output {
    cli_env(args, stdin, &[])
}

pub fn cli_env(args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(tern())
        .args(args)
        // Only what the test gives: an inherited TERN_SERVER would change the target.
        .env_remove("TERN_SERVER")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tern");
    let input = stdin.map(<[u8]>::to_vec).unwrap_or_default();
    let mut pipe = child.stdin.take().expect("stdin");
    // Pipes are served from threads so a child that does not read (or writes a lot)
    // cannot block the test.
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    let stdout = read_all(child.stdout.take().expect("stdout"));
    let stderr = read_all(child.stderr.take().expect("stderr"));
    // Until it is reaped the child's pid cannot be reused, so killing it is safe.
    let deadline = Instant::now() + CLI_BOUND;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = writer.join();
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

fn read_all(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Like [`cli`] with `--server ADDR` appended.
pub fn cli_at(server: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--server", server]);
    cli(&all, stdin)
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// A client config for tests: short bounds so failures show quickly.
pub fn client_config(server: &TernServer) -> tern_client::ClientConfig {
    tern_client::ClientConfig {
        connect_timeout_ms: 5_000,
        put_timeout_ms: 15_000,
        request_timeout_ms: 15_000,
        reconnect_backoff_min_ms: 20,
        reconnect_backoff_max_ms: 200,
        ..tern_client::ClientConfig::new([server.addr()])
    }
}

/// Consumes `queue` until nothing came for `idle`, confirming everything, and records
/// every delivery. Bounded by `bound` in total.
pub async fn drain(
    client: &tern_client::Client,
    queue: &str,
    history: &mut history::History,
    idle: Duration,
    bound: Duration,
) {
    let mut consumer = client
        .consumer(queue, tern_client::ConsumerOptions::default())
        .await
        .expect("open consumer");
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        let Some(d) = consumer.next_timeout(idle).await else {
            break;
        };
        history.delivered(d.guid, d.attempt);
        consumer.confirm(&d).await.expect("confirm");
    }
    consumer.flush_confirms().await;
}
