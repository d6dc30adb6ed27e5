#![no_main]
//! See `fuzz/checks/frame_decode.rs` for the input format and what is checked.

#[path = "../checks/frame_decode.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::check(data));
