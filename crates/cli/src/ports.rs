//! Ports for local servers (`tern chaos` and the tests, which include this file),
//! taken BELOW the kernel's ephemeral range. A port found free with `bind(0)` lies
//! inside that range, and between the check and the server's own bind any outgoing
//! connection on the machine may take it as its local port ("Address already in
//! use" at start: a flake seen in CI). Ports below the range are never handed out
//! that way; a per-process start keeps processes that run side by side apart, and
//! each port is still checked by binding it.

use std::sync::atomic::{AtomicU32, Ordering};

const LOWEST: u32 = 10_000;

/// A port nobody listens on right now, outside the ephemeral range if one is free.
pub fn find_free_port() -> std::io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let top = ephemeral_low().max(LOWEST + 1_000);
    let span = top - LOWEST;
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOWEST + (start + n) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return Ok(port as u16);
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
}

/// The first port of the kernel's ephemeral range (32768 when unknown).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
        .min(65_535)
}
