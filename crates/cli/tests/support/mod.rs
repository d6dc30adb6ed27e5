//! Helpers for tests that run the real `tern` binary: servers on free ports with a
//! temporary data dir, and a small history checker.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "../../src/ports.rs"]
mod ports;

/// A port nobody listens on right now (see `src/ports.rs`).
pub fn free_port() -> u16 {
    ports::find_free_port().expect("free port")
}

pub fn tern() -> &'static str {
    env!("CARGO_BIN_EXE_tern")
}

/// A `tern server` process with its own ports and data dir.
pub struct Server {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub port: u16,
    pub http_port: u16,
    pub peer_port: u16,
    pub extra: Vec<String>,
}

/// Three (or N) `tern server` processes forming one cluster on 127.0.0.1.
pub struct Cluster {
    pub nodes: Vec<Server>,
}

impl Cluster {
    /// The servers of an `n`-node cluster on free ports, configured but not started.
    pub fn configure(dir: &Path, n: usize, extra: &[&str]) -> Vec<Server> {
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let members: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, _, peer))| format!("{}=127.0.0.1:{peer}", i + 1))
            .collect();
        let members = members.join(",");
        ports
            .iter()
            .enumerate()
            .map(|(i, (port, http, peer))| {
                let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
                extra.extend([
                    "--node-id".to_string(),
                    (i + 1).to_string(),
                    "--initial-cluster".to_string(),
                    members.clone(),
                ]);
                let node_dir = dir.join(format!("node{}", i + 1));
                std::fs::create_dir_all(&node_dir).expect("node dir");
                Server {
                    child: None,
                    dir: node_dir,
                    port: *port,
                    http_port: *http,
                    peer_port: *peer,
                    extra,
                }
            })
            .collect()
    }

    pub fn start(dir: &Path, n: usize, extra: &[&str]) -> Cluster {
        let mut nodes = Cluster::configure(dir, n, extra);
        // Start all before waiting: a node is ready only once a leader is elected.
        for n in &mut nodes {
            n.spawn_no_wait();
        }
        for n in &nodes {
            n.wait_ready();
        }
        Cluster { nodes }
    }

    /// `--server` value listing every node.
    pub fn servers(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.addr())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node (index) that leads group `gid`, as node `from` sees it.
    pub fn leader_of_group(&self, from: usize, gid: u64) -> Option<usize> {
        let (_, body) = http_get(self.nodes[from].http_port, "/v1/cluster")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["partitions"]
            .as_array()?
            .iter()
            .find(|p| p["group"].as_u64() == Some(gid))
            .and_then(|p| p["leader"].as_u64())
            .filter(|l| *l > 0)
            .map(|l| l as usize - 1)
    }
}

impl Server {
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        let mut s = Server {
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

    pub fn spawn(&mut self) {
        self.spawn_no_wait();
        self.wait_ready();
    }

    pub fn spawn_no_wait(&mut self) {
        self.spawn_no_wait_with_env::<&str, &str>(&[]);
    }

    /// [`Server::spawn_no_wait`] with extra environment variables for this process
    /// only (e.g. an LD_PRELOAD library with settings of its own per node), so the
    /// clients a test starts do not inherit them.
    pub fn spawn_no_wait_with_env<K, V>(&mut self, env: &[(K, V)])
    where
        K: AsRef<std::ffi::OsStr>,
        V: AsRef<std::ffi::OsStr>,
    {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("log file");
        let child = Command::new(tern())
            .arg("server")
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--listen")
            .arg(self.addr())
            .arg("--http-listen")
            .arg(format!("127.0.0.1:{}", self.http_port))
            .arg("--peer-listen")
            .arg(format!("127.0.0.1:{}", self.peer_port))
            .args(self.default_reserve())
            .args(&self.extra)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tern server");
        self.child = Some(child);
    }

    /// Tests run on machines with little free disk: no reserve unless a test sets one.
    fn default_reserve(&self) -> Vec<&'static str> {
        if self.extra.iter().any(|a| a == "--min-free-disk-bytes") {
            vec![]
        } else {
            vec!["--min-free-disk-bytes", "0"]
        }
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if http_get(self.http_port, "/ready")
                .map(|(code, _)| code == 200)
                .unwrap_or(false)
            {
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

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        signal(c.id(), "TERM");
        wait_timeout(&mut c, Duration::from_secs(30)).expect("server did not stop after SIGTERM")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

pub fn wait_timeout(c: &mut Child, bound: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = c.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    None
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

/// Runs a client command (`tern <args> --server ADDR`) and returns its output.
pub fn run(server: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(tern())
        .args(args)
        .arg("--server")
        .arg(server)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tern");
    if let Some(mut input) = child.stdin.take() {
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).expect("stdin");
        }
    }
    child.wait_with_output().expect("wait")
}

pub fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// What a history shows: every PUT outcome and every delivery.
#[derive(Default, Debug)]
pub struct History {
    /// guid -> status of its ACK ("ok", "timeout", ...)
    pub puts: HashMap<String, String>,
    /// guids in delivery order (with repeats)
    pub deliveries: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    /// ACKed ok, never delivered.
    pub lost: usize,
    /// Delivered, never PUT.
    pub unexpected: usize,
    /// Delivered more than once.
    pub duplicated: usize,
    /// ACK failed or unknown, delivered anyway.
    pub recovered: usize,
}

impl History {
    pub fn add_produce_output(&mut self, out: &[u8]) {
        for v in json_lines(out) {
            let guid = v["guid"].as_str().expect("guid").to_string();
            let status = v["status"].as_str().expect("status").to_string();
            self.puts.insert(guid, status);
        }
    }

    pub fn add_consume_output(&mut self, out: &[u8]) {
        for v in json_lines(out) {
            self.deliveries
                .push(v["guid"].as_str().expect("guid").to_string());
        }
    }

    pub fn check(&self) -> Verdict {
        let delivered: HashSet<&String> = self.deliveries.iter().collect();
        let lost = self
            .puts
            .iter()
            .filter(|(g, s)| s.as_str() == "ok" && !delivered.contains(g))
            .count();
        let unexpected = delivered
            .iter()
            .filter(|g| !self.puts.contains_key(**g))
            .count();
        let duplicated = self.deliveries.len() - delivered.len();
        let recovered = self
            .puts
            .iter()
            .filter(|(g, s)| s.as_str() != "ok" && delivered.contains(g))
            .count();
        Verdict {
            lost,
            unexpected,
            duplicated,
            recovered,
        }
    }
}

/// Consumes what is left of `queue` (idle 3 s ends it) into the history.
/// Runs a `tern` client command that must succeed; `what` names it in the failure.
pub fn run_ok(server: &str, args: &[&str], what: &str) -> Output {
    let out = run(server, args, None);
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn drain(server: &str, queue: &str, h: &mut History) {
    let out = run_ok(
        server,
        &[
            "consume",
            "--queue",
            queue,
            "--idle-timeout",
            "3s",
            "--max-unconfirmed",
            "5000",
            "--json",
        ],
        "drain",
    );
    h.add_consume_output(&out.stdout);
}

/// The Raft group of partition 0 of `queue`, as the cluster status shows it.
pub fn group_of(c: &Cluster, queue: &str) -> u64 {
    let (_, body) = http_get(c.nodes[0].http_port, "/v1/cluster").expect("cluster status");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .find(|p| p["queue"] == queue && p["partition"] == 0)
        .and_then(|p| p["group"].as_u64())
        .expect("group of the queue")
}
