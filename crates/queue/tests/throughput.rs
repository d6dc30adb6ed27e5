//! A rough throughput check of the hot path (ignored by default; run with
//! `cargo test --release -p tern-queue --test throughput -- --ignored --nocapture`).

mod common;

use common::*;
use std::time::Instant;
use tern_queue::*;

#[test]
#[ignore]
fn put_poll_confirm_throughput() {
    let total: u32 = 500_000;
    let batch: u32 = 100;
    let mut r = Replica::new(QueueConfig::default());
    let mut d = Dispatcher::new();
    d.add_consumer(1, limits(10_000, u64::MAX));
    let start = Instant::now();
    let mut delivered = Vec::new();
    for b in 0..total / batch {
        let ids: Vec<u32> = (b * batch..(b + 1) * batch).collect();
        let applied = r.apply(&put(u64::from(b), &ids, 64));
        d.on_applied(&r.state, &applied);
        delivered.extend(
            d.poll(&r.state, u64::from(b), 1_000)
                .into_iter()
                .map(|x| x.guid),
        );
        if delivered.len() >= 1_000 {
            let cmd = Command::Confirm {
                now_ms: u64::from(b),
                subscription: String::new(),
                guids: std::mem::take(&mut delivered),
            };
            let applied = r.apply(&cmd);
            d.on_applied(&r.state, &applied);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{total} messages put+dispatched+confirmed in {secs:.2}s: {:.0} msg/s; depth {}",
        f64::from(total) / secs,
        r.state.stats().depth
    );
}
