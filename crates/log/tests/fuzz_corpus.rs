//! Replays the `log_recovery` fuzz corpus on stable, in the normal test suite (see
//! `fuzz/checks/replay.rs` and `fuzz/README.md`).

#[path = "../../../fuzz/checks/log_recovery.rs"]
mod check;
#[path = "../../../fuzz/checks/replay.rs"]
mod replay;

#[test]
fn replay_log_recovery_corpus() {
    replay::replay(env!("CARGO_MANIFEST_DIR"), "log_recovery", check::check);
}
