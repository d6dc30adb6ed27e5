//! Network partitions on real containers: three `tern server` containers (the image
//! `scripts/docker-image` builds, `FROM scratch`) on a private network, a producer and
//! a consumer on the host (the `tern` binary under test) through published ports, and
//! `docker network disconnect` to cut a node off under load. Checked with the history
//! checker: lost = 0, unexpected = 0.
//!
//! Needs Docker and the image: run through `scripts/docker-test`. Without
//! `TERN_DOCKER_TESTS=1` each test prints that it is skipped and returns; with it, a
//! missing Docker engine or image fails the test. Image: `TERN_IMAGE` (default
//! `tern:local`).
//!
//! # One network per cluster, and why
//!
//! Each container is attached to one network only, its cluster's own. That network
//! carries both the peer traffic and the published client and HTTP ports (Docker
//! publishes a port through the network the container is attached to). So
//! `docker network disconnect` cuts a node off from *everyone*: its peers, and also
//! the host's clients — Docker removes the port mapping, established client connections
//! through it are closed and new ones are refused, and the client fails over to the
//! next address of its `--server` list. That is the partition these tests mean: the
//! cut-off node with no client on its side. Reconnecting restores the mapping on the
//! same host port.
//!
//! The other choice, a second network just for the client ports (the default bridge)
//! with only a `peers` network cut, makes a *partial* partition: clients still reach
//! the isolated node, which can neither commit nor forward, so every PUT sent through it
//! ends `timeout` after `--put-timeout` (30 s) rather than `ok`. That is a fair test
//! of "no false ok" but it cannot show what (b) is about — every ACK `ok` while a
//! minority is cut off, with the cut node in the client's `--server` list — and it
//! makes (a) wait for timeouts instead of failing over. So: one network.
//!
//! Peers are given by fixed IPs, so a reconnected node is back at the same address
//! (names would also do: nodes re-resolve their peers' names every 2 s).
//!
//! # Clean-up
//!
//! Containers (with their anonymous /data volumes) and the network are removed by a
//! drop guard, on success and on a failed assertion alike; a producer still running is
//! killed by its own guard. Everything is labelled `tern-docker-test=<pid>`; a test run
//! first removes what a dead process left (a test killed by the nextest timeout runs no
//! destructors), and `scripts/docker-test` does the same when it ends. Names carry the
//! test's name, the pid and a timestamp, so parallel runs do not clash. Every wait is
//! bounded, and so is every `docker` command (`timeout`).

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use support::{free_port, http_get, tern, History};

const LABEL: &str = "tern-docker-test";
/// Bound on one `docker` command (a stuck engine fails the test instead of hanging it).
const DOCKER_BOUND_SECS: &str = "120";

fn enabled() -> bool {
    if std::env::var("TERN_DOCKER_TESTS").as_deref() == Ok("1") {
        return true;
    }
    eprintln!("skipped: set TERN_DOCKER_TESTS=1 (scripts/docker-test builds the image and does)");
    false
}

fn image() -> String {
    std::env::var("TERN_IMAGE").unwrap_or_else(|_| "tern:local".into())
}

/// `docker ARGS`, bounded. Panics only if it cannot be started at all.
fn docker(args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["-k", "5", DOCKER_BOUND_SECS, "docker"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run `timeout docker` (coreutils timeout and docker on PATH)")
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Docker must be there when the tests are enabled: fail loudly, never pass silently.
fn require_docker() {
    let info = docker(&["info", "--format", "{{.ServerVersion}}"]);
    assert!(
        info.status.success(),
        "TERN_DOCKER_TESTS=1 but the Docker engine is not reachable: {}",
        String::from_utf8_lossy(&info.stderr).trim()
    );
    let img = docker(&["image", "inspect", "--format", "{{.Id}}", &image()]);
    assert!(
        img.status.success(),
        "image {} not found: build it with scripts/docker-image",
        image()
    );
}

/// Removes containers and networks labelled by test processes that no longer exist.
fn sweep_leftovers() {
    let alive = |pid: &str| {
        pid.parse::<u32>()
            .map(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
            .unwrap_or(false)
    };
    let filter = format!("label={LABEL}");
    let fmt = format!("{{{{.Names}}}} {{{{.Label \"{LABEL}\"}}}}");
    let containers = docker(&["ps", "-a", "--filter", &filter, "--format", &fmt]);
    for line in String::from_utf8_lossy(&containers.stdout).lines() {
        if let Some((name, pid)) = line.split_once(' ') {
            if !alive(pid) {
                eprintln!("removing leftover container {name} (pid {pid} is gone)");
                let _ = docker(&["rm", "-f", "-v", name]);
            }
        }
    }
    let fmt = format!("{{{{.Name}}}} {{{{.Label \"{LABEL}\"}}}}");
    let networks = docker(&["network", "ls", "--filter", &filter, "--format", &fmt]);
    for line in String::from_utf8_lossy(&networks.stdout).lines() {
        if let Some((name, pid)) = line.split_once(' ') {
            if !alive(pid) {
                eprintln!("removing leftover network {name} (pid {pid} is gone)");
                let _ = docker(&["network", "rm", name]);
            }
        }
    }
}

struct Node {
    id: u64,
    name: String,
    ip: String,
    port: u16,
    http_port: u16,
}

impl Node {
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// This node's `/v1/cluster`, if its HTTP port answers.
    fn cluster(&self) -> Option<serde_json::Value> {
        let (code, body) = http_get(self.http_port, "/v1/cluster")?;
        if code != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }

    /// (leader node id, commit index) of the queue's partition 0 as this node sees it.
    fn partition(&self, queue: &str) -> Option<(u64, u64)> {
        let v = self.cluster()?;
        let p = v["partitions"]
            .as_array()?
            .iter()
            .find(|p| p["queue"] == queue && p["partition"] == 0)?
            .clone();
        Some((p["leader"].as_u64()?, p["commit_index"].as_u64()?))
    }

    fn leader(&self, queue: &str) -> Option<u64> {
        self.partition(queue).map(|(l, _)| l).filter(|l| *l > 0)
    }

    fn logs(&self) -> String {
        let out = docker(&["logs", "--tail", "60", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

/// Three containers on a network of their own; all removed (with their volumes) on drop.
struct DockerCluster {
    started: Instant,
    net: String,
    nodes: Vec<Node>,
}

impl DockerCluster {
    fn start(test: &str) -> DockerCluster {
        require_docker();
        sweep_leftovers();
        let pid = std::process::id();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() % 1_000_000)
            .unwrap_or(0);
        let prefix = format!("tern-dt-{test}-{pid}-{stamp}");
        let label = format!("{LABEL}={pid}");
        // A /24 of its own: start at a place picked from pid and time, skip subnets
        // that other networks (another run's, say) already use.
        let mut net = None;
        let mut last_err = String::new();
        let first = (pid as u128 + stamp) % 150;
        for attempt in 0..150u128 {
            let third = 100 + (first + attempt * 7) % 150;
            let subnet = format!("172.31.{third}.0/24");
            let out = docker(&[
                "network", "create", "--driver", "bridge", "--subnet", &subnet, "--label", &label,
                &prefix,
            ]);
            if out.status.success() {
                net = Some(third);
                break;
            }
            last_err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if !last_err.contains("overlap") {
                break;
            }
        }
        let third = net.unwrap_or_else(|| panic!("cannot create network {prefix}: {last_err}"));
        // From here on the guard removes whatever exists.
        let mut c = DockerCluster {
            started: Instant::now(),
            net: prefix.clone(),
            nodes: Vec::new(),
        };
        let ips: Vec<String> = (1..=3)
            .map(|i| format!("172.31.{third}.{}", 10 + i))
            .collect();
        let members = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| format!("{}={ip}:7452", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        for (i, ip) in ips.iter().enumerate() {
            let node = Node {
                id: i as u64 + 1,
                name: format!("{prefix}-n{}", i + 1),
                ip: ip.clone(),
                port: free_port(),
                http_port: free_port(),
            };
            let publish = format!("127.0.0.1:{}:7450", node.port);
            let publish_http = format!("127.0.0.1:{}:7451", node.http_port);
            let node_id = node.id.to_string();
            let name = node.name.clone();
            c.nodes.push(node);
            docker_ok(&[
                "run",
                "-d",
                "--name",
                &name,
                "--label",
                &label,
                "--network",
                &c.net,
                "--ip",
                ip,
                "-p",
                &publish,
                "-p",
                &publish_http,
                "-e",
                "TERN_LOG=info",
                &image(),
                "server",
                "--node-id",
                &node_id,
                "--data-dir",
                "/data",
                "--listen",
                "0.0.0.0:7450",
                "--http-listen",
                "0.0.0.0:7451",
                "--peer-listen",
                "0.0.0.0:7452",
                "--initial-cluster",
                &members,
                "--min-free-disk-bytes",
                "0",
            ]);
        }
        for i in 0..3 {
            c.wait_until(
                &format!("node {} ready", i + 1),
                Duration::from_secs(60),
                || matches!(http_get(c.nodes[i].http_port, "/ready"), Some((200, _))).then_some(()),
            );
        }
        c.note("3 containers ready");
        c
    }

    fn note(&self, what: &str) {
        eprintln!("[{:6.2}s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// Polls `f` until it gives a value; past `bound` the test fails (with the logs).
    fn wait_until<T>(&self, what: &str, bound: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {bound:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn servers(&self, order: &[usize]) -> String {
        order
            .iter()
            .map(|i| self.nodes[*i].addr())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Index of the node every one of `from` names as the queue's leader.
    fn agreed_leader(&self, from: &[usize], queue: &str) -> Option<usize> {
        let mut seen = from.iter().map(|i| self.nodes[*i].leader(queue));
        let first = seen.next()??;
        seen.all(|l| l == Some(first)).then_some(first as usize - 1)
    }

    fn disconnect(&self, i: usize) {
        docker_ok(&["network", "disconnect", &self.net, &self.nodes[i].name]);
        self.note(&format!("node {} disconnected", i + 1));
    }

    fn reconnect(&self, i: usize) {
        let n = &self.nodes[i];
        docker_ok(&["network", "connect", "--ip", &n.ip, &self.net, &n.name]);
        self.note(&format!("node {} reconnected", i + 1));
    }
}

impl Drop for DockerCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in &self.nodes {
                eprintln!(
                    "---- last log lines of {} (node {}) ----\n{}",
                    n.name,
                    n.id,
                    n.logs()
                );
            }
        }
        let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        if !names.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(names);
            let _ = docker(&args);
        }
        let _ = docker(&["network", "rm", &self.net]);
    }
}

/// A client process on the host whose stdout is collected as it comes (so the test can
/// see progress) and which is killed if the test ends before it does.
struct Client {
    child: Child,
    lines: Lines,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Client {
    fn spawn(args: &[&str]) -> Client {
        let mut cmd = Command::new(tern());
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing. The client
        // dies with the test process even when that is killed (no destructor runs then).
        #[cfg(target_os = "linux")]
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .args(args)
            // The client's "connection lost …; reconnecting" lines show the failovers.
            .env("TERN_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the tern client");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let l = lines.clone();
        let e = stderr.clone();
        let readers = vec![
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    l.lock().unwrap().push(line);
                }
            }),
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = BufReader::new(err).read_to_string(&mut s);
                *e.lock().unwrap() = s;
            }),
        ];
        Client {
            child,
            lines,
            stderr,
            readers,
        }
    }

    fn produce(servers: &str, queue: &str, count: u32) -> Client {
        Client::spawn(&[
            "produce",
            "--queue",
            queue,
            "--count",
            &count.to_string(),
            "--size",
            "200",
            "--json",
            "--max-in-flight",
            "500",
            "--server",
            servers,
        ])
    }

    fn consume(servers: &str, queue: &str) -> Client {
        Client::spawn(&[
            "consume",
            "--queue",
            queue,
            "--idle-timeout",
            "4s",
            "--max-unconfirmed",
            "5000",
            "--json",
            "--server",
            servers,
        ])
    }

    fn lines_so_far(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Waits (bounded) for the exit; returns stdout as bytes for the history checker.
    fn finish(self, bound: Duration) -> Vec<u8> {
        self.finish_with_log(bound).0
    }

    /// `finish`, and the client's log (stderr).
    fn finish_with_log(mut self, bound: Duration) -> Finished {
        let deadline = Instant::now() + bound;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "client still running after {bound:?} ({} lines so far)",
                self.lines_so_far()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let stderr = self.stderr.lock().unwrap().clone();
        assert!(status.success(), "client failed ({status}): {stderr}");
        // Cloned, not taken: `Load` counts every batch's lines after it ended too.
        let lines = self.lines.lock().unwrap().clone();
        let mut out = lines.join("\n");
        out.push('\n');
        (out.into_bytes(), stderr)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A client's stdout lines, shared with the threads that read and count them.
type Lines = Arc<Mutex<Vec<String>>>;
/// One finished client: its stdout and its log (stderr).
type Finished = (Vec<u8>, String);

/// Continuous load: one `tern produce --count BATCH` after another until stopped, so
/// the cut and the heal both happen under load whatever the machine's speed (one batch
/// of 20,000 takes well under a second here).
struct Load {
    /// Stop flag and the running batch's pid, under one lock (no batch starts after
    /// the flag is set, so the drop guard kills the last one).
    state: Arc<Mutex<(bool, Option<u32>)>>,
    /// Stdout lines of every batch so far (the running one's grow).
    batches: Arc<Mutex<Vec<Lines>>>,
    thread: Option<JoinHandle<Vec<Finished>>>,
}

impl Load {
    const BATCH: u32 = 20_000;

    fn start(servers: String, queue: &str) -> Load {
        let state: Arc<Mutex<(bool, Option<u32>)>> = Default::default();
        let batches: Arc<Mutex<Vec<Lines>>> = Default::default();
        let (st, b, q) = (state.clone(), batches.clone(), queue.to_string());
        let thread = std::thread::spawn(move || {
            let mut outs = Vec::new();
            loop {
                let client = {
                    let mut st = st.lock().unwrap();
                    if st.0 {
                        break;
                    }
                    let client = Client::produce(&servers, &q, Load::BATCH);
                    st.1 = Some(client.child.id());
                    client
                };
                b.lock().unwrap().push(client.lines.clone());
                outs.push(client.finish_with_log(Duration::from_secs(180)));
            }
            outs
        });
        Load {
            state,
            batches,
            thread: Some(thread),
        }
    }

    fn acks(&self) -> usize {
        let batches = self.batches.lock().unwrap();
        batches.iter().map(|b| b.lock().unwrap().len()).sum()
    }

    /// Stops after the running batch; returns every batch's (stdout, log).
    fn stop(mut self) -> Vec<Finished> {
        self.state.lock().unwrap().0 = true;
        match self.thread.take().expect("running").join() {
            Ok(outs) => outs,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Load {
    /// Only after a failure elsewhere: kill the running batch and let the thread end.
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        {
            let mut st = self.state.lock().unwrap();
            st.0 = true;
            if let Some(pid) = st.1 {
                support::signal(pid, "KILL");
            }
        }
        let _ = thread.join();
    }
}

fn create(c: &DockerCluster, queue: &str) {
    let out = Command::new(tern())
        .args(["queue", "create", queue, "--partitions", "1", "--server"])
        .arg(c.servers(&[0, 1, 2]))
        .output()
        .expect("tern queue create");
    assert!(
        out.status.success(),
        "queue create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// PUT outcomes: (ok, not ok), and the not-ok statuses with their counts.
fn outcomes(h: &History) -> (usize, usize, Vec<(String, usize)>) {
    let mut by: std::collections::BTreeMap<String, usize> = Default::default();
    for s in h.puts.values() {
        *by.entry(s.clone()).or_default() += 1;
    }
    let ok = by.remove("ok").unwrap_or(0);
    let not_ok = by.values().sum();
    (ok, not_ok, by.into_iter().collect())
}

/// (a) The partition's leader is cut off from everyone under continuous load: the
/// other two elect a new leader and keep ACKing, the producers (the old leader first
/// in their --server list) fail over, the old leader rejoins as a follower and catches
/// up, and nothing ACKed `ok` is missing.
#[test]
fn isolating_the_leader_under_load_loses_no_acked_message() {
    if !enabled() {
        return;
    }
    let q = "cut";
    let c = DockerCluster::start("isolate");
    create(&c, q);
    let leader = c.wait_until(
        "a leader all nodes agree on",
        Duration::from_secs(20),
        || c.agreed_leader(&[0, 1, 2], q),
    );
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    c.note(&format!("partition leader: node {}", leader + 1));

    // The leader first in the list: the producer is connected to the node that is cut
    // off, so it sees its connection go and must resend its unACKed PUTs elsewhere.
    let load = Load::start(c.servers(&[leader, others[0], others[1]]), q);
    std::thread::sleep(Duration::from_millis(1500));
    let before = load.acks();
    assert!(before > 0, "no ACK in the first 1.5 s");
    c.disconnect(leader);
    c.note(&format!("{before} ACKs before the cut"));

    // The majority elects another leader (election timeout 1 s; check-quorum deposes
    // the old one on its side).
    let new_leader = c.wait_until(
        "the majority to agree on a new leader",
        Duration::from_secs(20),
        || c.agreed_leader(&others, q).filter(|l| *l != leader),
    );
    let at_election = load.acks();
    c.note(&format!(
        "new leader: node {} ({at_election} ACKs)",
        new_leader + 1
    ));
    // Stay cut well past the election timeout; the majority keeps ACKing meanwhile.
    std::thread::sleep(Duration::from_secs(4));
    let during = load.acks() - at_election;
    c.note(&format!("{during} ACKs in 4 s with the old leader cut off"));
    assert!(
        during > 0,
        "no ACK from the majority while the leader was cut off"
    );
    c.reconnect(leader);
    // Go on under load for a while after the heal, then stop.
    std::thread::sleep(Duration::from_secs(2));
    let outs = load.stop();
    c.note("producers done");

    let mut h = History::default();
    let mut reconnects = Vec::new();
    for (out, log) in &outs {
        h.add_produce_output(out);
        reconnects.extend(
            log.lines()
                .filter(|l| l.contains("reconnecting"))
                .map(String::from),
        );
    }
    let puts = outs.len() * Load::BATCH as usize;
    assert_eq!(h.puts.len(), puts, "one ACK per PUT");
    let (ok, not_ok, statuses) = outcomes(&h);
    eprintln!("producer reconnects ({}):", reconnects.len());
    for l in reconnects.iter().take(10) {
        eprintln!("  {l}");
    }

    // Healed: the old leader follows the new term and catches up.
    let (lead_now, commit) = c.wait_until(
        "the healed node to follow the leader and catch up",
        Duration::from_secs(30),
        || {
            let (l, commit) = c.nodes[new_leader].partition(q)?;
            let (l2, commit2) = c.nodes[leader].partition(q)?;
            (l > 0 && l == l2 && commit2 == commit).then_some((l, commit))
        },
    );
    c.note(&format!(
        "healed node {} follows node {lead_now}, commit index {commit}",
        leader + 1
    ));

    // Drained through the healed node first: it coordinates again.
    let consumer = Client::consume(&c.servers(&[leader, new_leader]), q);
    h.add_consume_output(&consumer.finish(Duration::from_secs(180)));
    let v = h.check();
    c.note("drained");
    eprintln!(
        "VERDICT leader isolated under load: {puts} PUTs in {} batches, {ok} ok, \
         {not_ok} not ok {statuses:?}; {} deliveries; {v:?}",
        outs.len(),
        h.deliveries.len()
    );
    assert_eq!(v.lost, 0, "ACKed messages lost");
    assert_eq!(v.unexpected, 0, "deliveries of messages never PUT");
}

/// (b) A follower is cut off: the leader and the other follower are a quorum, so
/// producers started after the cut (their --server list names the cut node first)
/// get `ok` for every PUT during 3 s of continuous load; after the heal the cut node
/// catches up with the leader's commit index, and nothing is lost.
#[test]
fn the_majority_keeps_acknowledging_when_a_minority_is_cut_off() {
    if !enabled() {
        return;
    }
    let q = "majority";
    let c = DockerCluster::start("minority");
    create(&c, q);
    let leader = c.wait_until(
        "a leader all nodes agree on",
        Duration::from_secs(20),
        || c.agreed_leader(&[0, 1, 2], q),
    );
    let follower = (leader + 1) % 3;
    let third = (leader + 2) % 3;
    c.note(&format!(
        "leader node {}, cutting off follower node {}",
        leader + 1,
        follower + 1
    ));
    c.disconnect(follower);
    // The cut node's ports are gone with its network: refused, not hanging.
    assert!(
        http_get(c.nodes[follower].http_port, "/ready").is_none(),
        "the cut node's HTTP port still answers"
    );

    let load = Load::start(c.servers(&[follower, leader, third]), q);
    std::thread::sleep(Duration::from_secs(3));
    let outs = load.stop();
    let mut h = History::default();
    for (out, _) in &outs {
        h.add_produce_output(out);
    }
    let puts = outs.len() * Load::BATCH as usize;
    let (ok, not_ok, statuses) = outcomes(&h);
    c.note(&format!(
        "producers during the cut: {puts} PUTs in {} batches, {ok} ok, {not_ok} not ok \
         {statuses:?}",
        outs.len()
    ));
    assert_eq!(h.puts.len(), puts, "one ACK per PUT");
    assert_eq!(
        ok, puts,
        "every PUT ACKed ok while only a minority is cut off"
    );
    // The leader did not change: a quorum was there all along.
    assert_eq!(c.agreed_leader(&[leader, third], q), Some(leader));
    let (_, leader_commit) = c.nodes[leader].partition(q).expect("the leader's view");

    c.reconnect(follower);
    let first_seen = c.wait_until(
        "the healed node's HTTP port",
        Duration::from_secs(30),
        || c.nodes[follower].partition(q).map(|(_, commit)| commit),
    );
    let commit = c.wait_until(
        "the healed node to catch up with the leader's commit index",
        Duration::from_secs(60),
        || {
            let (_, lc) = c.nodes[leader].partition(q)?;
            let (l, fc) = c.nodes[follower].partition(q)?;
            (l == leader as u64 + 1 && fc >= lc).then_some(fc)
        },
    );
    c.note(&format!(
        "healed node {}: commit index {first_seen} when first seen, {commit} caught up \
         (leader: {leader_commit})",
        follower + 1
    ));

    // Drained through the healed node first: it coordinates again.
    let consumer = Client::consume(&c.servers(&[follower, leader, third]), q);
    h.add_consume_output(&consumer.finish(Duration::from_secs(180)));
    let v = h.check();
    c.note("drained");
    eprintln!(
        "VERDICT minority cut off: {puts} PUTs, {ok} ok, {not_ok} not ok; {} deliveries; {v:?}",
        h.deliveries.len()
    );
    assert_eq!(v.lost, 0, "ACKed messages lost");
    assert_eq!(v.unexpected, 0, "deliveries of messages never PUT");
}
