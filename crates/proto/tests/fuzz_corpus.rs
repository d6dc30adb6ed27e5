//! Replays the `frame_decode` fuzz corpus on stable, in the normal test suite (see
//! `fuzz/checks/replay.rs` and `fuzz/README.md`).

#[path = "../../../fuzz/checks/frame_decode.rs"]
mod check;
#[path = "../../../fuzz/checks/replay.rs"]
mod replay;

#[test]
fn replay_frame_decode_corpus() {
    replay::replay(env!("CARGO_MANIFEST_DIR"), "frame_decode", check::check);
}
