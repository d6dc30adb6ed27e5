//! `tern`: the server and the command-line client, one binary.
//!
//! `tern server` runs a node; every other command is a client that talks to any node
//! given by `--server` (failing over among several).

mod bench;
mod chaos;
mod consume;
mod dur;
mod ports;
mod produce;
mod queue;
mod server;

use clap::{Args, Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "tern",
    version,
    about = "Tern: a durable, fault-tolerant message queue"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a broker node (single-node cluster with no flags).
    Server(Box<server::ServerArgs>),
    /// PUT messages: one per stdin line, or --count generated ones.
    Produce(produce::ProduceArgs),
    /// Receive messages, print each and CONFIRM it after printing.
    Consume(consume::ConsumeArgs),
    /// Create, list, inspect, purge or delete queues.
    Queue(queue::QueueArgs),
    /// Cluster membership and partition status.
    Cluster(queue::ClusterArgs),
    /// Measure throughput and latency (ACK and end to end) with HDR histograms.
    Bench(bench::BenchArgs),
    /// Fault-injection run: a local cluster under load, faults from a seed, then a
    /// history check (exit 1 if an ACKed message was lost or a delivery was made up).
    Chaos(chaos::ChaosArgs),
}

/// Options every client command takes.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Nodes to connect to (any of them; the client fails over among them).
    #[arg(
        long,
        global = true,
        env = "TERN_SERVER",
        default_value = "127.0.0.1:7450",
        value_delimiter = ','
    )]
    pub server: Vec<String>,
    /// One JSON object per line on stdout instead of human-readable text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Give up connecting after this long (e.g. 5s, 500ms).
    #[arg(long, global = true, default_value = "5s", value_parser = dur::parse_ms)]
    pub connect_timeout: u64,
    /// Every PUT is answered within this bound (then its status is `timeout`).
    #[arg(long, global = true, default_value = "30s", value_parser = dur::parse_ms)]
    pub put_timeout: u64,
}

impl ClientArgs {
    pub fn config(&self) -> tern_client::ClientConfig {
        tern_client::ClientConfig {
            connect_timeout_ms: self.connect_timeout,
            put_timeout_ms: self.put_timeout,
            request_timeout_ms: self.put_timeout,
            ..tern_client::ClientConfig::new(self.server.clone())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Server(_)) {
        // A client command piped into `head` should end quietly, as Unix tools do,
        // not panic on a closed stdout. (The server keeps Rust's ignored SIGPIPE.)
        // SAFETY: called before any thread starts; resets one signal's disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Server(args) => server::run(*args).map(|()| ExitCode::SUCCESS),
        Command::Produce(args) => client_runtime(produce::run(args)),
        Command::Consume(args) => client_runtime(consume::run(args)),
        Command::Queue(args) => client_runtime(queue::run(args)),
        Command::Cluster(args) => client_runtime(queue::cluster(args)),
        Command::Bench(args) => client_runtime(bench::run(args)),
        Command::Chaos(args) => client_runtime(chaos::run(args)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tern: error: {}", error_text(&e));
            ExitCode::from(2)
        }
    }
}

/// An error and its causes on one line, each cause once: library errors often repeat
/// their source in their own message, and `{:#}` would print it again.
pub(crate) fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

fn client_runtime(
    fut: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(fut)
}
