//! Wall-clock jumps (an NTP step, `date -s`, a VM resumed) break no guarantee: every
//! PUT is ACKed ok, nothing ACKed is lost, and a message held without CONFIRM comes
//! back after its visibility timeout, not an hour early or an hour late.
//!
//! Each `tern server` runs under libfaketime (LD_PRELOAD, Debian package `faketime`)
//! with a timestamp file of its own read on every call (`FAKETIME_NO_CACHE=1`): the
//! test rewrites a node's file (`+3600`, `-3600`, `+0`) to step that node's
//! CLOCK_REALTIME while it runs. CLOCK_MONOTONIC is left alone
//! (`FAKETIME_DONT_FAKE_MONOTONIC=1`), as on a real machine. Clients run on the real
//! clock.
//!
//! The probe: a consumer that never confirms and holds one message at a time gets the
//! same message again after every visibility timeout (1 s). Every gap between two of
//! its deliveries is measured, and clocks are stepped right after a delivery, so each
//! step lands while the message is in flight with its deadline running.
//!
//! Gate: runs when libfaketime is installed. With `TERN_CLOCK_TESTS=1` (scripts/test
//! sets it after installing the package) a missing library fails the test; without
//! it the test says skipped and passes.

mod support;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::*;

/// Where distributions put libfaketime (Debian/Ubuntu multiarch first).
const FAKETIME_LIBS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
];

const HOUR_S: i64 = 3_600;
/// The probe queue's visibility timeout.
const VISIBILITY: Duration = Duration::from_millis(1_000);
/// A redelivery earlier than this after the last one fired a timer early.
const EARLIEST: Duration = Duration::from_millis(500);
/// A redelivery later than this (no failover in between) was held up by the clock.
const LATEST: Duration = Duration::from_millis(3 * 1_000);
/// Across a SIGTERM restart: the old leader hands over, the consumer may have to
/// reconnect to another node, and the new leader rebuilds its dispatcher.
const LATEST_ACROSS_FAILOVER: Duration = Duration::from_millis(3 * 1_000 + 6_000);
/// PUTs per producer run of the background load.
const LOAD_BATCH: usize = 2_000;

/// The libfaketime library, or None (test skipped) when it is not installed and
/// `TERN_CLOCK_TESTS` is not `1`.
fn faketime_library() -> Option<PathBuf> {
    if let Some(lib) = FAKETIME_LIBS.iter().map(PathBuf::from).find(|p| p.exists()) {
        return Some(lib);
    }
    assert!(
        std::env::var("TERN_CLOCK_TESTS").as_deref() != Ok("1"),
        "TERN_CLOCK_TESTS=1 but libfaketime is not installed (looked for {FAKETIME_LIBS:?}); \
         install it with `apt-get install faketime`"
    );
    eprintln!(
        "skipped: libfaketime is not installed (`apt-get install faketime`; scripts/test \
         installs it and sets TERN_CLOCK_TESTS=1)"
    );
    None
}

fn unix_now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .expect("clock after 1970")
}

/// One node's wall clock: the libfaketime timestamp file its process reads on every
/// clock_gettime(CLOCK_REALTIME).
struct NodeClock {
    lib: PathBuf,
    file: PathBuf,
}

impl NodeClock {
    fn new(lib: &Path, file: PathBuf) -> NodeClock {
        let clock = NodeClock {
            lib: lib.to_path_buf(),
            file,
        };
        clock.set(0);
        clock
    }

    /// The environment of a server on this clock. `FAKETIME` itself would win over the
    /// file, so it is removed if the test runner has it.
    fn env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        vec![
            ("LD_PRELOAD", self.lib.clone().into_os_string()),
            (
                "FAKETIME_TIMESTAMP_FILE",
                self.file.clone().into_os_string(),
            ),
            ("FAKETIME_NO_CACHE", "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
        ]
    }

    /// Steps the clock to `offset_s` from the real time (atomically: a reader never
    /// sees a half-written file), and checks with `date` under the same settings that
    /// libfaketime reads it so.
    fn set(&self, offset_s: i64) {
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{offset_s:+}\n")).expect("write faketime file");
        std::fs::rename(&tmp, &self.file).expect("replace faketime file");
        let out = Command::new("date")
            .arg("+%s")
            .envs(self.env())
            .env_remove("FAKETIME")
            .output()
            .expect("run date under libfaketime");
        let faked: i64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("date under libfaketime: {out:?}"));
        let seen = faked - unix_now_s();
        assert!(
            (seen - offset_s).abs() <= 5,
            "libfaketime shows an offset of {seen} s, not {offset_s} s ({})",
            self.file.display()
        );
    }
}

/// libfaketime keeps a shared-memory segment and a semaphore per process in /dev/shm
/// and removes them only at a clean exit. Servers ended by kill -9 (the cluster's drop)
/// would leave theirs, and a later process that gets the same pid would fail to start
/// under libfaketime ("shm_open failed: File exists"). Dropped after the cluster.
#[derive(Default)]
struct ShmLeftovers(Vec<u32>);

impl Drop for ShmLeftovers {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = std::fs::remove_file(format!("/dev/shm/faketime_shm_{pid}"));
            let _ = std::fs::remove_file(format!("/dev/shm/sem.faketime_sem_{pid}"));
        }
    }
}

/// Starts (or restarts) `node` on `clock`.
fn spawn_on(node: &mut Server, clock: &NodeClock, shm: &mut ShmLeftovers) {
    node.spawn_no_wait_with_env(&clock.env());
    shm.0
        .push(node.child.as_ref().map(Child::id).expect("started"));
}

/// A test whose fault silently did not apply would prove nothing: the running server
/// must have libfaketime mapped.
fn assert_on_faked_clock(node: &Server) {
    let pid = node.child.as_ref().map(Child::id).expect("running");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    assert!(
        maps.contains("libfaketime"),
        "libfaketime is not loaded in the server (pid {pid})"
    );
}

/// A three-node cluster like `Cluster::start`, each node on its own clock.
fn start_cluster(dir: &Path, lib: &Path, shm: &mut ShmLeftovers) -> (Cluster, Vec<NodeClock>) {
    let mut nodes = Cluster::configure(dir, 3, &[]);
    let mut clocks = Vec::new();
    for (i, node) in nodes.iter_mut().enumerate() {
        let clock = NodeClock::new(lib, dir.join(format!("clock{}", i + 1)));
        spawn_on(node, &clock, shm);
        clocks.push(clock);
    }
    for n in &nodes {
        n.wait_ready();
        assert_on_faked_clock(n);
    }
    (Cluster { nodes }, clocks)
}

fn create(server: &str, args: &[&str]) {
    let mut all = vec!["queue", "create"];
    all.extend_from_slice(args);
    all.push("--json");
    run_ok(server, &all, "queue create");
}

/// The leader of group `gid` once the running nodes agree on one (bounded).
fn agreed_leader(c: &Cluster, gid: u64) -> usize {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let seen: Vec<Option<usize>> = (0..c.nodes.len())
            .map(|i| c.leader_of_group(i, gid))
            .collect();
        if let Some(Some(l)) = seen.first() {
            if seen.iter().all(|s| *s == Some(*l)) {
                return *l;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no agreed leader of group {gid} within 15 s: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM (graceful: leadership handed over first), then the same node again on
/// `clock`, which it reads once more at start.
fn restart(c: &mut Cluster, i: usize, clock: &NodeClock, shm: &mut ShmLeftovers) {
    let status = c.nodes[i].sigterm();
    assert!(status.success(), "node {} stopped with {status}", i + 1);
    spawn_on(&mut c.nodes[i], clock, shm);
    c.nodes[i].wait_ready();
    assert_on_faked_clock(&c.nodes[i]);
}

/// Producers one after another until `stop`: load for as long as the test needs it,
/// each run ending with all its ACKs printed (`done` counts the runs). Output is read
/// as it comes (`output()`).
fn load(
    servers: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<Vec<Output>> {
    std::thread::spawn(move || {
        let mut runs = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let out = Command::new(tern())
                .args(["produce", "--queue", "load", "--count"])
                .arg(LOAD_BATCH.to_string())
                .args(["--size", "200", "--json", "--max-in-flight", "32"])
                .args(["--server", &servers])
                .output()
                .expect("producer");
            runs.push(out);
            done.fetch_add(1, Ordering::Relaxed);
        }
        runs
    })
}

/// A consumer of the probe queue that never confirms and holds one message at a time:
/// it gets the same message back after every visibility timeout.
struct Probe {
    child: Child,
    deliveries: mpsc::Receiver<(Instant, serde_json::Value)>,
    stderr: PathBuf,
    guid: String,
    last: Instant,
    /// (what was going on, gap since the previous delivery, attempt)
    gaps: Vec<(String, Duration, u64)>,
}

impl Probe {
    fn start(servers: &str, stderr: &Path) -> Probe {
        let mut child = Command::new(tern())
            .args(["consume", "--queue", "probe", "--no-confirm"])
            .args(["--max-unconfirmed", "1", "--json", "--server", servers])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(stderr).expect("probe stderr"))
            .spawn()
            .expect("probe consumer");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, deliveries) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                let v: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
                if tx.send((at, v)).is_err() {
                    break;
                }
            }
        });
        let (last, first) = deliveries
            .recv_timeout(Duration::from_secs(15))
            .expect("the probe consumer got no message within 15 s");
        Probe {
            child,
            deliveries,
            stderr: stderr.to_path_buf(),
            guid: first["guid"].as_str().expect("guid").to_string(),
            last,
            gaps: Vec::new(),
        }
    }

    /// Waits for the next delivery of the probe message, at most `latest` after the
    /// previous one, and checks it came no earlier than `earliest`.
    fn next(&mut self, what: &str, earliest: Duration, latest: Duration) {
        let wait = (self.last + latest).saturating_duration_since(Instant::now());
        let (at, v) = match self.deliveries.recv_timeout(wait) {
            Ok(delivery) => delivery,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "{what}: the unconfirmed message did not come back within {latest:?} \
                 (visibility timeout {VISIBILITY:?}); gaps so far: {:?}",
                self.gaps
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                "{what}: the probe consumer ended: {}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            ),
        };
        assert_eq!(v["guid"], self.guid.as_str(), "{what}: {v}");
        let gap = at - self.last;
        let attempt = v["attempt"].as_u64().unwrap_or(0);
        eprintln!("{what}: redelivered after {gap:?} (attempt {attempt})");
        self.gaps.push((what.to_string(), gap, attempt));
        assert!(
            gap >= earliest,
            "{what}: redelivered after {gap:?}, before its visibility timeout \
             ({VISIBILITY:?}) ran out: a clock step fired the timer early"
        );
        self.last = at;
    }

    /// Takes the deliveries that came while the test was busy (a restart blocks it for
    /// seconds), each within `latest` of the one before.
    fn take_queued(&mut self, what: &str, latest: Duration) {
        while let Ok((at, v)) = self.deliveries.try_recv() {
            assert_eq!(v["guid"], self.guid.as_str(), "{what}: {v}");
            let gap = at - self.last;
            let attempt = v["attempt"].as_u64().unwrap_or(0);
            eprintln!("{what}: redelivered after {gap:?} (attempt {attempt}, queued)");
            self.gaps.push((format!("{what} (queued)"), gap, attempt));
            assert!(gap <= latest, "{what}: a redelivery took {gap:?}");
            self.last = at;
        }
    }

    /// A redelivery with no failover in between: one visibility timeout, give or take.
    fn cycle(&mut self, what: &str) {
        self.next(what, EARLIEST, LATEST);
    }

    /// SIGTERM: the consumer disconnects without confirming what it holds.
    fn disconnect(mut self) -> Vec<(String, Duration, u64)> {
        signal(self.child.id(), "TERM");
        let status = wait_timeout(&mut self.child, Duration::from_secs(15));
        assert!(status.is_some(), "the probe consumer did not stop");
        std::mem::take(&mut self.gaps)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A three-node cluster under PUT load whose nodes' wall clocks are stepped an hour
/// forward and back (partition leaders and a follower), and a node restarted while
/// its clock is an hour behind: every PUT is ACKed ok, nothing is lost, and the
/// visibility timeout holds to about a second all along.
#[test]
fn wall_clock_jumps_move_no_timer_and_lose_nothing() {
    let Some(lib) = faketime_library() else {
        return;
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tmp");
    let mut shm = ShmLeftovers::default();
    let (mut c, clocks) = start_cluster(dir.path(), &lib, &mut shm);
    let vt = format!("{}ms", VISIBILITY.as_millis());
    create(&c.nodes[0].addr(), &["load", "--partitions", "1"]);
    create(&c.nodes[0].addr(), &["probe", "--visibility-timeout", &vt]);
    let (load_gid, probe_gid) = (group_of(&c, "load"), group_of(&c, "probe"));
    let probe_leader = agreed_leader(&c, probe_gid);
    let load_leader = agreed_leader(&c, load_gid);
    let mut leaders = vec![probe_leader];
    if load_leader != probe_leader {
        leaders.push(load_leader);
    }
    let follower = (0..3)
        .rev()
        .find(|i| !leaders.contains(i))
        .expect("a follower");
    eprintln!(
        "probe led by node {}, load led by node {}, follower node {}",
        probe_leader + 1,
        load_leader + 1,
        follower + 1
    );

    let mut h = History::default();
    let out = run(
        &c.servers(),
        &["produce", "--queue", "probe", "--json"],
        Some("probe\n"),
    );
    assert!(out.status.success());
    h.add_produce_output(&out.stdout);
    let stop = Arc::new(AtomicBool::new(false));
    let runs_done = Arc::new(AtomicUsize::new(0));
    let producers = load(c.servers(), stop.clone(), runs_done.clone());
    let mut probe = Probe::start(&c.servers(), &dir.path().join("probe.stderr"));
    probe.cycle("steady, all clocks right");
    let runs_before = runs_done.load(Ordering::Relaxed);

    // Each step right after a delivery: the message is in flight, its deadline set.
    let step = |nodes: &[usize], offset_s: i64| {
        for &n in nodes {
            clocks[n].set(offset_s);
        }
    };
    step(&leaders, HOUR_S);
    probe.cycle("leaders +1 h");
    probe.cycle("leaders +1 h, steady");
    step(&leaders, -HOUR_S);
    probe.cycle("leaders -2 h (now -1 h)");
    probe.cycle("leaders -1 h, steady");
    step(&leaders, 0);
    step(&[follower], HOUR_S);
    probe.cycle("leaders back to 0, follower +1 h");
    step(&[follower], -HOUR_S);
    probe.cycle("follower -2 h (now -1 h)");
    let runs_stepped = runs_done.load(Ordering::Relaxed);
    assert!(
        runs_stepped > runs_before && !producers.is_finished(),
        "the load runs through the clock steps"
    );

    // A node that starts while its clock is an hour behind takes that as its time; the
    // clock is then set right, which a running node must not notice either. Node 3
    // (usually the follower above): then hand the probe partition to it by restarting
    // whoever leads it (SIGTERM hands leadership to the most caught-up peer, the
    // highest id on a tie, so node 3 has it within two handovers; four at most).
    let skewed = 2;
    step(&[skewed], -HOUR_S);
    restart(&mut c, skewed, &clocks[skewed], &mut shm);
    step(&[skewed], 0);
    let what = format!("node {} restarted at -1 h", skewed + 1);
    probe.next(&what, Duration::ZERO, LATEST_ACROSS_FAILOVER);
    probe.take_queued(&what, LATEST_ACROSS_FAILOVER);
    let mut handovers = 0;
    let mut leader = agreed_leader(&c, probe_gid);
    while leader != skewed && handovers < 4 {
        restart(&mut c, leader, &clocks[leader], &mut shm);
        handovers += 1;
        let what = format!("node {} restarted (handover)", leader + 1);
        probe.next(&what, Duration::ZERO, LATEST_ACROSS_FAILOVER);
        probe.take_queued(&what, LATEST_ACROSS_FAILOVER);
        leader = agreed_leader(&c, probe_gid);
    }
    assert_eq!(
        leader, skewed,
        "the node started with its clock an hour behind did not take the lead of the probe \
         partition in {handovers} handovers"
    );
    eprintln!(
        "probe now led by node {} (started at -1 h), after {handovers} handovers",
        leader + 1
    );
    // The first redelivery may still be the new leader's rebuild; then the timer's.
    let what = "leader restarted at -1 h, first redelivery";
    probe.next(what, Duration::ZERO, LATEST_ACROSS_FAILOVER);
    probe.cycle("leader started at -1 h, clock since set right");
    probe.cycle("leader started at -1 h, steady");
    assert!(
        runs_done.load(Ordering::Relaxed) > runs_stepped && !producers.is_finished(),
        "the load runs through the restarts"
    );

    // A consumer that leaves without confirming gives the message back at once.
    let probe_guid = probe.guid.clone();
    let gaps = probe.disconnect();
    let gone = Instant::now();
    let out = run(
        &c.servers(),
        &[
            "consume",
            "--queue",
            "probe",
            "--count",
            "1",
            "--idle-timeout",
            "9s",
            "--json",
        ],
        None,
    );
    let back_after = gone.elapsed();
    assert!(out.status.success());
    let got = json_lines(&out.stdout);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["guid"], probe_guid.as_str(), "{got:?}");
    h.add_consume_output(&out.stdout);
    assert!(
        back_after < LATEST,
        "a consumer that left without confirming: its message came back after {back_after:?}"
    );

    stop.store(true, Ordering::Relaxed);
    let runs = producers.join().expect("producer thread");
    for out in &runs {
        assert!(
            out.status.success() && json_lines(&out.stdout).len() == LOAD_BATCH,
            "a producer run without one ACK per PUT: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        h.add_produce_output(&out.stdout);
    }
    let puts = h.puts.len();
    assert_eq!(puts, 1 + runs.len() * LOAD_BATCH, "every PUT got one ACK");
    let failed: Vec<&String> = h.puts.values().filter(|s| s.as_str() != "ok").collect();
    assert!(failed.is_empty(), "failed ACKs: {} of {puts}", failed.len());
    for (i, n) in c.nodes.iter_mut().enumerate() {
        let child = n.child.as_mut().expect("running");
        assert!(
            matches!(child.try_wait(), Ok(None)),
            "node {} exited; log:\n{}",
            i + 1,
            n.log()
        );
    }
    let drain_started = Instant::now();
    drain(&c.nodes[0].addr(), "load", &mut h);
    let drained_in = drain_started.elapsed();
    let v = h.check();
    let timer_gaps: Vec<Duration> = gaps
        .iter()
        .filter(|(what, ..)| !what.contains("restarted"))
        .map(|g| g.1)
        .collect();
    let across_restarts = gaps.iter().filter(|(what, ..)| what.contains("restarted"));
    eprintln!(
        "clock jumps: {puts} PUTs ok, verdict {v:?}; probe redelivered {} times, by its \
         timer after {:?}..{:?}, across restarts at most {:?}; back {back_after:?} after \
         its consumer left; drained in {drained_in:?}, {:?} in all",
        gaps.len(),
        timer_gaps.iter().min().copied().unwrap_or_default(),
        timer_gaps.iter().max().copied().unwrap_or_default(),
        across_restarts.map(|g| g.1).max().unwrap_or_default(),
        started.elapsed()
    );
    assert_eq!(v.lost, 0, "ACKed messages lost");
    assert_eq!(v.unexpected, 0, "messages nobody produced");
}
