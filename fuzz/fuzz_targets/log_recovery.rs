#![no_main]
//! See `fuzz/checks/log_recovery.rs` for the input format and what is checked.

#[path = "../checks/log_recovery.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::check(data));
