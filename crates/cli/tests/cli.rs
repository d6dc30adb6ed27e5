//! End-to-end tests of the `tern` binary as a user runs it: real processes, sockets,
//! files and fsync; kill -9 and SIGTERM.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

#[test]
fn produce_n_consume_n_exactly_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = Server::start(dir.path(), &[]);
    let input: String = (0..500).map(|i| format!("line {i}\n")).collect();
    let out = run(
        &server.addr(),
        &["produce", "--queue", "q", "--json"],
        Some(&input),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let acks = json_lines(&out.stdout);
    assert_eq!(acks.len(), 500);
    for (i, a) in acks.iter().enumerate() {
        assert_eq!(a["seq"].as_u64(), Some(i as u64 + 1));
        assert_eq!(a["status"], "ok");
        assert_eq!(a["guid"].as_str().map(str::len), Some(32));
    }
    let out = run(
        &server.addr(),
        &["consume", "--queue", "q", "--count", "500", "--json"],
        None,
    );
    assert!(out.status.success());
    let msgs = json_lines(&out.stdout);
    let payloads: Vec<&str> = msgs
        .iter()
        .map(|m| m["payload"].as_str().expect("payload"))
        .collect();
    let expected: Vec<String> = (0..500).map(|i| format!("line {i}")).collect();
    assert_eq!(payloads, expected);
    let mut h = History::default();
    h.add_produce_output(
        &acks
            .iter()
            .map(|a| a.to_string() + "\n")
            .collect::<String>()
            .into_bytes(),
    );
    h.add_consume_output(&out.stdout);
    assert_eq!(
        h.check(),
        Verdict {
            lost: 0,
            unexpected: 0,
            duplicated: 0,
            recovered: 0
        }
    );
    // Nothing is left.
    let out = run(
        &server.addr(),
        &[
            "consume",
            "--queue",
            "q",
            "--idle-timeout",
            "500ms",
            "--json",
        ],
        None,
    );
    assert!(json_lines(&out.stdout).is_empty());
    // Binary payloads come back as payload_b64.
    let (code, body) = http_get(server.http_port, "/v1/queues/q").expect("http");
    assert_eq!(code, 200, "{body}");
}

#[test]
fn kill9_during_produce_loses_no_acked_message() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut server = Server::start(dir.path(), &[]);
    let producer = Command::new(tern())
        .args([
            "produce",
            "--queue",
            "crash",
            "--count",
            "30000",
            "--size",
            "200",
            "--json",
            "--max-in-flight",
            "2000",
        ])
        .arg("--server")
        .arg(server.addr())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("producer");
    std::thread::sleep(Duration::from_millis(700));
    server.kill9();
    std::thread::sleep(Duration::from_millis(300));
    server.spawn(); // same data dir and ports
    let out = producer.wait_with_output().expect("producer output");
    let mut h = History::default();
    h.add_produce_output(&out.stdout);
    assert_eq!(
        h.puts.len(),
        30000,
        "every PUT got exactly one ACK: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = h.puts.values().filter(|s| s.as_str() == "ok").count();
    let out = run(
        &server.addr(),
        &[
            "consume",
            "--queue",
            "crash",
            "--idle-timeout",
            "2s",
            "--max-unconfirmed",
            "5000",
            "--json",
        ],
        None,
    );
    h.add_consume_output(&out.stdout);
    let v = h.check();
    eprintln!("kill -9 during produce: {ok} ok of 30000, verdict {v:?}");
    assert_eq!(v.lost, 0, "ACKed messages lost");
    assert_eq!(v.unexpected, 0, "messages nobody produced");
    assert!(
        ok >= 29_000,
        "the client retransmits across the restart; only {ok} ok"
    );
}

#[test]
fn a_killed_consumers_unconfirmed_messages_are_redelivered() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = Server::start(dir.path(), &[]);
    let out = run(
        &server.addr(),
        &[
            "produce", "--queue", "work", "--count", "50", "--size", "10",
        ],
        None,
    );
    assert!(out.status.success());
    // This consumer prints 10 messages and never confirms them, then is killed -9.
    let mut first = Command::new(tern())
        .args([
            "consume",
            "--queue",
            "work",
            "--max-unconfirmed",
            "10",
            "--no-confirm",
            "--json",
            "--server",
        ])
        .arg(server.addr())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("consumer");
    let mut stdout = first.stdout.take().expect("stdout");
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while seen.lines().count() < 10 && Instant::now() < deadline {
        let n = std::io::Read::read(&mut stdout, &mut buf).expect("read");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let held: Vec<serde_json::Value> = json_lines(seen.as_bytes());
    assert_eq!(held.len(), 10);
    let _ = first.kill();
    let _ = first.wait();
    let out = run(
        &server.addr(),
        &[
            "consume",
            "--queue",
            "work",
            "--idle-timeout",
            "1s",
            "--json",
        ],
        None,
    );
    let all = json_lines(&out.stdout);
    assert_eq!(all.len(), 50, "every message arrives once more");
    for h in &held {
        let again = all
            .iter()
            .find(|m| m["guid"] == h["guid"])
            .expect("redelivered");
        assert_eq!(again["attempt"].as_u64(), Some(2), "attempt count raised");
    }
}

#[test]
fn sigterm_under_load_gives_no_failed_ack() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut server = Server::start(dir.path(), &["--stop-timeout-ms", "3000"]);
    let producer = Command::new(tern())
        .args([
            "produce", "--queue", "roll", "--count", "20000", "--size", "100", "--json", "--server",
        ])
        .arg(server.addr())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("producer");
    std::thread::sleep(Duration::from_millis(500));
    let status = server.sigterm();
    assert!(
        status.success(),
        "graceful stop exits 0: {status:?}\n{}",
        server.log()
    );
    server.spawn();
    let out = producer.wait_with_output().expect("producer");
    let mut h = History::default();
    h.add_produce_output(&out.stdout);
    assert_eq!(h.puts.len(), 20000);
    let failed = h.puts.values().filter(|s| s.as_str() != "ok").count();
    assert_eq!(failed, 0, "failed ACKs across a graceful restart");
    assert!(out.status.success());
    let out = run(
        &server.addr(),
        &[
            "consume",
            "--queue",
            "roll",
            "--idle-timeout",
            "2s",
            "--max-unconfirmed",
            "5000",
            "--json",
        ],
        None,
    );
    h.add_consume_output(&out.stdout);
    let v = h.check();
    assert_eq!((v.lost, v.unexpected, v.duplicated), (0, 0, 0), "{v:?}");
}

#[test]
fn bad_input_gets_clear_errors() {
    // Unknown flag.
    let out = Command::new(tern())
        .args(["produce", "--queue", "q", "--bogus"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus"));
    // Unreachable server: a clear error, quickly.
    let started = Instant::now();
    let out = run(
        &format!("127.0.0.1:{}", free_port()),
        &[
            "produce",
            "--queue",
            "q",
            "--count",
            "1",
            "--connect-timeout",
            "500ms",
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
    assert!(started.elapsed() < Duration::from_secs(5));
    // Invalid server config.
    let out = Command::new(tern())
        .args(["server", "--node-id", "0"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("node_id"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Unusable data dir.
    let file = tempfile::NamedTempFile::new().expect("file");
    let out = Command::new(tern())
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(file.path().join("sub"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("data"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Oversized message: an explicit status, exit 1; the server keeps serving.
    let dir = tempfile::tempdir().expect("tmp");
    let server = Server::start(dir.path(), &["--default-max-message-bytes", "1000"]);
    let big = "x".repeat(2000) + "\nsmall\n";
    let out = run(
        &server.addr(),
        &["produce", "--queue", "small", "--json"],
        Some(&big),
    );
    assert_eq!(out.status.code(), Some(1));
    let acks = json_lines(&out.stdout);
    assert_eq!(acks[0]["status"], "message_too_large");
    assert_eq!(acks[1]["status"], "ok");
}

#[test]
fn corrupt_segment_is_refused_loudly_naming_file_and_offset() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut server = Server::start(dir.path(), &[]);
    let out = run(
        &server.addr(),
        &["produce", "--queue", "c", "--count", "100", "--size", "100"],
        None,
    );
    assert!(out.status.success());
    server.sigterm();
    // Flip a byte inside the first record of the queue's partition log.
    let groups = dir.path().join("data").join("groups");
    let mut segments: Vec<_> = walk(&groups)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    let seg = segments
        .iter()
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.len() > 5000)
                .unwrap_or(false)
        })
        .expect("a data segment");
    let mut bytes = std::fs::read(seg).expect("read");
    bytes[40] ^= 0xFF;
    std::fs::write(seg, &bytes).expect("write");
    let out = Command::new(tern())
        .args(["server", "--min-free-disk-bytes", "0", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .output()
        .expect("run");
    assert!(!out.status.success(), "a corrupt log must not be served");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("corrupt")
            && err.contains(&seg.display().to_string())
            && err.contains("offset"),
        "{err}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn server_reads_a_toml_config_file_and_flags_win() {
    let dir = tempfile::tempdir().expect("tmp");
    let (port, http) = (free_port(), free_port());
    let cfg = dir.path().join("tern.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\nlisten = \"127.0.0.1:{port}\"\nhttp_listen = \"127.0.0.1:{http}\"\npeer_listen = \"127.0.0.1:0\"\nmin_free_disk_bytes = 0\n\n[queue_defaults]\nmax_message_bytes = 500\n",
            dir.path().join("data").display()
        ),
    )
    .expect("write config");
    let mut child = Command::new(tern())
        .args(["server", "--config"])
        .arg(&cfg)
        .env("TERN_DEFAULT_MAX_MESSAGE_BYTES", "700") // env beats the file
        .stderr(Stdio::null())
        .spawn()
        .expect("server");
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(http, "/ready").map(|(c, _)| c) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "server from config file never became ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let msgs = format!("{}\n{}\n", "y".repeat(600), "z".repeat(800));
    let out = run(
        &format!("127.0.0.1:{port}"),
        &["produce", "--queue", "cfg", "--json"],
        Some(&msgs),
    );
    let acks = json_lines(&out.stdout);
    assert_eq!(acks[0]["status"], "ok", "600 B fits the env limit of 700");
    assert_eq!(acks[1]["status"], "message_too_large");
    // A bad config file is a clear error.
    std::fs::write(&cfg, "no_such_setting = 1\n").expect("write");
    let out = Command::new(tern())
        .args(["server", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no_such_setting"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    signal(child.id(), "TERM");
    let _ = wait_timeout(&mut child, Duration::from_secs(20));
}

#[test]
fn below_the_disk_reserve_puts_get_storage_full_and_reads_continue() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut server = Server::start(dir.path(), &[]);
    let out = run(
        &server.addr(),
        &["produce", "--queue", "disk", "--count", "3"],
        None,
    );
    assert!(out.status.success());
    server.kill9();
    // Restart with a free-space reserve no disk can meet: the disk counts as full.
    server.extra = vec![
        "--min-free-disk-bytes".into(),
        "18000000000000000000".into(),
    ];
    server.spawn();
    let out = run(
        &server.addr(),
        &["produce", "--queue", "disk", "--json"],
        Some("one more\n"),
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json_lines(&out.stdout)[0]["status"], "storage_full");
    // What was stored before is still served and can be confirmed.
    let out = run(
        &server.addr(),
        &[
            "consume",
            "--queue",
            "disk",
            "--idle-timeout",
            "1s",
            "--json",
        ],
        None,
    );
    assert_eq!(json_lines(&out.stdout).len(), 3);
}
