//! Replays the `command_decode` fuzz corpus on stable, in the normal test suite (see
//! `fuzz/checks/replay.rs` and `fuzz/README.md`).

#[path = "../../../fuzz/checks/command_decode.rs"]
mod check;
#[path = "../../../fuzz/checks/replay.rs"]
mod replay;

#[test]
fn replay_command_decode_corpus() {
    replay::replay(env!("CARGO_MANIFEST_DIR"), "command_decode", check::check);
}
