//! The node loop's clocks and hashing: the only places it reads time or randomness
//! of its own, so the deterministic simulator can replace both.
//!
//! Contract:
//! - [`now`] is monotonic: Raft ticks, resend and liveness timers use it.
//! - [`now_ms`] is wall-clock time for the queue timers carried in Raft entries
//!   (visibility deadlines, delays, TTLs). It is read from the system clock ONCE, at
//!   the first call, and moves with the monotonic clock after that. A wall-clock jump
//!   (NTP step, an operator's `date -s`, a VM resumed) therefore moves no timer of a
//!   running node. Nodes started with skewed clocks propose skewed times; the queue
//!   state machine only ever moves its time forward (see `tern_queue::state`).
//! - On a thread that entered the simulator's virtual time ([`sim::enter`], feature
//!   `sim`), both clocks read the virtual time instead, and [`NodeHasher`] maps and
//!   sets iterate in a fixed order, so a seed replays exactly. Other threads of the
//!   same process are unaffected.

use std::collections::hash_map::{DefaultHasher, RandomState};
use std::hash::BuildHasher;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Monotonic time: [`Instant::now`], or the simulator's virtual time.
pub fn now() -> Instant {
    #[cfg(feature = "sim")]
    if let Some(t) = sim::virtual_now() {
        return t;
    }
    Instant::now()
}

/// Wall-clock milliseconds since the Unix epoch, anchored once per process and then
/// advanced by the monotonic clock (see the module contract).
pub fn now_ms() -> u64 {
    #[cfg(feature = "sim")]
    if let Some(ms) = sim::virtual_ms() {
        return ms;
    }
    static ANCHOR: OnceLock<(Instant, u64)> = OnceLock::new();
    let (at, wall_ms) = ANCHOR.get_or_init(|| {
        let wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        (Instant::now(), wall_ms)
    });
    wall_ms.saturating_add(at.elapsed().as_millis() as u64)
}

/// Whether this thread runs on the simulator's virtual time.
pub fn simulated() -> bool {
    #[cfg(feature = "sim")]
    if sim::active() {
        return true;
    }
    false
}

/// The hasher of the node loop's maps: randomly keyed (as std's default, against
/// collisions forced by client-chosen keys such as GUIDs), except on a simulator
/// thread, where it is fixed so that iteration order replays.
#[derive(Clone, Debug)]
pub struct NodeHasher(Option<RandomState>);

impl Default for NodeHasher {
    fn default() -> Self {
        #[cfg(feature = "sim")]
        if sim::active() {
            return NodeHasher(None);
        }
        NodeHasher(Some(RandomState::new()))
    }
}

impl BuildHasher for NodeHasher {
    type Hasher = DefaultHasher;

    fn build_hasher(&self) -> DefaultHasher {
        match &self.0 {
            Some(random) => random.build_hasher(),
            None => DefaultHasher::new(),
        }
    }
}

/// A hash map of the node loop (see [`NodeHasher`]).
pub type Map<K, V> = std::collections::HashMap<K, V, NodeHasher>;
/// A hash set of the node loop (see [`NodeHasher`]).
pub type Set<T> = std::collections::HashSet<T, NodeHasher>;

/// Virtual time for the deterministic simulator: per thread, so tests that run
/// simulations side by side do not share a clock.
#[cfg(feature = "sim")]
pub mod sim {
    use std::cell::Cell;
    use std::time::{Duration, Instant};

    /// Wall time the virtual clock starts at (2026-01-01T00:00:00Z): any fixed value
    /// works; a realistic one keeps ids and logs readable.
    const VIRTUAL_EPOCH_MS: u64 = 1_767_225_600_000;

    thread_local! {
        /// (a real instant taken at `enter`, virtual ms elapsed since)
        static VIRTUAL: Cell<Option<(Instant, u64)>> = const { Cell::new(None) };
    }

    /// This thread now runs on virtual time, starting at 0 ms.
    pub fn enter() {
        VIRTUAL.with(|v| v.set(Some((Instant::now(), 0))));
    }

    /// Back to the real clocks.
    pub fn leave() {
        VIRTUAL.with(|v| v.set(None));
    }

    /// Moves virtual time forward by `ms`.
    pub fn advance(ms: u64) {
        VIRTUAL.with(|v| {
            if let Some((base, now)) = v.get() {
                v.set(Some((base, now + ms)));
            }
        });
    }

    /// Virtual milliseconds since [`enter`].
    pub fn elapsed_ms() -> Option<u64> {
        VIRTUAL.with(|v| v.get().map(|(_, ms)| ms))
    }

    pub(crate) fn active() -> bool {
        elapsed_ms().is_some()
    }

    pub(super) fn virtual_now() -> Option<Instant> {
        VIRTUAL.with(|v| v.get().map(|(base, ms)| base + Duration::from_millis(ms)))
    }

    pub(super) fn virtual_ms() -> Option<u64> {
        elapsed_ms().map(|ms| VIRTUAL_EPOCH_MS + ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_time_moves_with_the_monotonic_clock() {
        let a = now_ms();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = now_ms();
        assert!(b >= a + 20, "{a} then {b}");
        assert!(b < a + 5_000, "{a} then {b}");
    }

    #[cfg(feature = "sim")]
    #[test]
    fn virtual_time_and_fixed_hashing_on_a_simulator_thread_only() {
        sim::enter();
        let t0 = now();
        let w0 = now_ms();
        sim::advance(1_500);
        assert_eq!(now() - t0, std::time::Duration::from_millis(1_500));
        assert_eq!(now_ms() - w0, 1_500);
        let order = |m: &Map<u64, ()>| m.keys().copied().collect::<Vec<_>>();
        let a: Map<u64, ()> = (0..100).map(|k| (k, ())).collect();
        let b: Map<u64, ()> = (0..100).map(|k| (k, ())).collect();
        assert_eq!(order(&a), order(&b));
        std::thread::spawn(|| assert!(!sim::active()))
            .join()
            .expect("other thread");
        sim::leave();
        assert!(!sim::active());
    }
}
