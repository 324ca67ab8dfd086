//! Liveness: named heartbeats ("beats") that the daemon's long-running loops tick at every turn,
//! so that a supervisor can tell a loop that still turns from one that is stuck (a blocked
//! serial read, a dead lock, a runtime that no longer polls its task).
//!
//! - A loop registers a [`Beat`] when it starts (`liveness::register("bus rs485-readers")`) and
//!   calls [`Beat::tick`] at each turn, and at least once a second while it waits (backoff,
//!   reconnection). A tick is one atomic store of the monotonic time; it never blocks.
//! - [`Liveness::stale`] lists the beats not ticked within a given age, measured on the
//!   monotonic clock ([`Instant`]): a wall-clock step never makes a beat stale or fresh.
//! - A beat dropped normally (the loop ended: the daemon stops, a bus is removed) leaves the
//!   registry. A beat dropped while its thread panics stays, and goes stale: a loop that died
//!   is as unhealthy as one that is stuck.
//!
//! The registry is process-wide ([`global`]), like the process's watchdog it feeds
//! (`supervise`): loops register without being handed a registry, so no driver's constructor
//! changes for it. Tests of this module use their own [`Liveness`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

struct Inner {
    name: String,
    /// Milliseconds since the registry's origin, at the last tick.
    last_ms: AtomicU64,
}

/// A registry of beats.
pub struct Liveness {
    origin: Instant,
    beats: Mutex<Vec<Arc<Inner>>>,
}

/// One loop's heartbeat. Not `Clone`: one loop, one beat.
pub struct Beat {
    inner: Arc<Inner>,
    registry: &'static Liveness,
}

/// A beat not ticked recently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    pub name: String,
    /// Time since its last tick.
    pub age: Duration,
}

impl Liveness {
    pub fn new() -> Liveness {
        Liveness {
            origin: Instant::now(),
            beats: Mutex::new(Vec::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Inner>>> {
        self.beats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a beat named `name`, ticked now. The registry must live for the whole process
    /// (a `static`, or leaked in tests).
    pub fn register(&'static self, name: impl Into<String>) -> Beat {
        let inner = Arc::new(Inner {
            name: name.into(),
            last_ms: AtomicU64::new(self.now_ms()),
        });
        self.list().push(inner.clone());
        Beat {
            inner,
            registry: self,
        }
    }

    /// The beats whose last tick is older than `max_age`, oldest first.
    pub fn stale(&self, max_age: Duration) -> Vec<Stale> {
        let now = self.now_ms();
        let max = max_age.as_millis() as u64;
        let mut out: Vec<Stale> = self
            .list()
            .iter()
            .filter_map(|b| {
                let age = now.saturating_sub(b.last_ms.load(Ordering::Relaxed));
                (age > max).then(|| Stale {
                    name: b.name.clone(),
                    age: Duration::from_millis(age),
                })
            })
            .collect();
        out.sort_by_key(|s| std::cmp::Reverse(s.age));
        out
    }

    /// The names of the registered beats, in registration order.
    pub fn names(&self) -> Vec<String> {
        self.list().iter().map(|b| b.name.clone()).collect()
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Self::new()
    }
}

impl Beat {
    /// The loop made progress.
    pub fn tick(&self) {
        self.inner
            .last_ms
            .store(self.registry.now_ms(), Ordering::Relaxed);
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }
}

impl Drop for Beat {
    fn drop(&mut self) {
        // A loop that panicked keeps its beat registered: it goes stale and the watchdog stops.
        if !std::thread::panicking() {
            self.registry
                .list()
                .retain(|b| !Arc::ptr_eq(b, &self.inner));
        }
    }
}

/// The process's registry.
pub fn global() -> &'static Liveness {
    static GLOBAL: OnceLock<Liveness> = OnceLock::new();
    GLOBAL.get_or_init(Liveness::new)
}

/// Registers a beat in the process's registry.
pub fn register(name: impl Into<String>) -> Beat {
    global().register(name)
}

/// Awaits `fut`, ticking `beat` every second meanwhile: for the waits of an async loop (a
/// reconnection backoff, a handshake). The ticks come from the same runtime as the loop, so a
/// runtime that stops polling stops them too.
pub async fn ticking<F: std::future::Future>(beat: &Beat, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = every.tick() => beat.tick(),
        }
    }
}

/// Test hook: `GATEHOUSE_STALL=<beat name>[@N]` (read once) makes the loop of that beat stop at
/// its N-th turn (default 1), as if blocked in a system call, until the process ends (e.g.
/// `GATEHOUSE_STALL="bus io@200"`). It lets `tests/supervise.rs` check that the watchdog pings
/// stop when a loop is stuck. Not for production. Unset, a turn costs one atomic load.
pub fn stall_if_asked(beat: &Beat) {
    static STALL: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static TURNS: AtomicU64 = AtomicU64::new(0);
    let asked = STALL.get_or_init(|| {
        let v = std::env::var("GATEHOUSE_STALL").ok()?;
        match v.rsplit_once('@') {
            Some((name, n)) => Some((name.to_string(), n.parse().ok()?)),
            None => Some((v, 1)),
        }
    });
    if let Some((name, n)) = asked
        && name == beat.name()
        && TURNS.fetch_add(1, Ordering::Relaxed) + 1 >= *n
    {
        tracing::warn!(
            beat = beat.name(),
            "GATEHOUSE_STALL: this loop stops turning"
        );
        loop {
            std::thread::park();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> &'static Liveness {
        Box::leak(Box::new(Liveness::new()))
    }

    #[test]
    fn a_beat_not_ticked_goes_stale_and_a_tick_makes_it_fresh() {
        let r = registry();
        let a = r.register("a");
        let b = r.register("b");
        assert!(r.stale(Duration::from_millis(200)).is_empty());
        std::thread::sleep(Duration::from_millis(300));
        a.tick();
        let stale = r.stale(Duration::from_millis(200));
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].name, "b");
        assert!(stale[0].age >= Duration::from_millis(300));
        b.tick();
        assert!(r.stale(Duration::from_millis(200)).is_empty());
    }

    #[test]
    fn a_beat_dropped_normally_leaves_the_registry() {
        let r = registry();
        let a = r.register("a");
        let _b = r.register("b");
        drop(a);
        assert_eq!(r.names(), vec!["b".to_string()]);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(r.stale(Duration::from_millis(10)).len(), 1);
    }

    #[test]
    fn a_beat_dropped_by_a_panic_stays_and_goes_stale() {
        let r = registry();
        let t = std::thread::spawn(move || {
            let _beat = r.register("dies");
            panic!("the loop dies");
        });
        assert!(t.join().is_err());
        assert_eq!(r.names(), vec!["dies".to_string()]);
        std::thread::sleep(Duration::from_millis(50));
        let stale = r.stale(Duration::from_millis(10));
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].name, "dies");
    }
}
