//! Real-time aids for the bus threads: their scheduling priority and a precise slot timer.
//!
//! **Priority** (`[rs485] realtime`, default on). A bus thread that must start a poll within a
//! millisecond or two of its slot cannot wait for the kernel's fair scheduler to give it a turn
//! among other busy processes (a log rotation, a package upgrade, a BLE storm): measured on a
//! loaded 2-core machine, that wait was most of the late polls (docs/rs485.md *Timing*). So each
//! bus thread asks for `SCHED_FIFO` at [`DEFAULT_PRIORITY`] (`realtime_priority`, 1–49: below
//! the kernel's interrupt threads at 50, so the serial port's own interrupt work still goes
//! first) as it starts, through the `thread-priority` crate. It is permitted as root, with
//! `CAP_SYS_NICE`, or under an `RLIMIT_RTPRIO` at least that high (the shipped unit sets
//! `LimitRTPRIO=`); when it is not, the bus runs at normal priority and one warning says why and
//! what to do. A bus thread sleeps between transactions, so it cannot take a core for itself;
//! the kernel's real-time throttling (5 % of each second left to other tasks by default) is the
//! backstop against a bug that would spin. Only bus threads are raised: the event log's group
//! commit, the cloud link and BLE stay at normal priority (a bus thread never waits for them).
//!
//! **Slot timer** ([`SlotTimer`]): tokio's timer has 1 ms ticks and rounds deadlines up, so a
//! poll waited for on it starts up to ~2 ms late. A `timerfd` (nanosecond deadlines, no slack
//! for a real-time thread) registered with the bus's runtime wakes the thread once, at the slot,
//! while relay jobs can still wake it earlier.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use toml::Spanned;

/// The `SCHED_FIFO` priority of bus threads unless `[rs485] realtime_priority` says otherwise.
pub const DEFAULT_PRIORITY: u8 = 20;
/// The highest priority accepted: below the kernel's threaded interrupt handlers (50).
pub const MAX_PRIORITY: u8 = 49;

/// `[rs485]`: settings shared by every bus.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRs485 {
    /// Bus threads at real-time priority where permitted (default true).
    #[serde(default)]
    pub realtime: Option<bool>,
    /// Their `SCHED_FIFO` priority, 1 to 49 (default 20).
    #[serde(default)]
    pub realtime_priority: Option<Spanned<i64>>,
}

/// How bus threads are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Realtime {
    /// Normal (fair) scheduling.
    Off,
    /// `SCHED_FIFO` at this priority (1..=[`MAX_PRIORITY`]) where permitted.
    Fifo(u8),
}

impl Default for Realtime {
    fn default() -> Self {
        Realtime::Fifo(DEFAULT_PRIORITY)
    }
}

/// Checks `[rs485]`.
pub(crate) fn check(
    raw: &RawRs485,
    err: &super::config::ErrFn,
) -> Result<Realtime, crate::config::ConfigError> {
    let priority = match &raw.realtime_priority {
        None => DEFAULT_PRIORITY,
        Some(p) => match u8::try_from(*p.get_ref()) {
            Ok(v @ 1..=MAX_PRIORITY) => v,
            _ => {
                return Err(err(
                    p.span(),
                    "rs485.realtime_priority",
                    format!(
                        "`{}` is out of range (expected 1 to {MAX_PRIORITY}: SCHED_FIFO \
                         priorities below the kernel's interrupt threads)",
                        p.get_ref()
                    ),
                ));
            }
        },
    };
    Ok(match raw.realtime {
        Some(false) => Realtime::Off,
        _ => Realtime::Fifo(priority),
    })
}

/// What [`raise`] did for the calling thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Raised {
    /// `[rs485] realtime = false`.
    Off,
    /// The thread now runs `SCHED_FIFO` at this priority.
    Fifo(u8),
    /// Not permitted (or not supported): the thread stays at normal priority.
    Refused(String),
}

/// One warning per process for refused real-time scheduling (every bus would say the same).
static WARNED: AtomicBool = AtomicBool::new(false);

/// Puts the calling thread (a bus thread, as it starts) at the configured priority, and logs
/// the outcome: `info` when raised, one `warn` per process when refused.
pub fn raise(bus: &str, rt: Realtime) -> Raised {
    let r = set_current(rt);
    match &r {
        Raised::Off => tracing::debug!(
            bus,
            "bus thread at normal priority ([rs485] realtime = false)"
        ),
        Raised::Fifo(p) => tracing::info!(
            bus,
            priority = p,
            "bus thread at real-time priority (SCHED_FIFO)"
        ),
        Raised::Refused(why) => {
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    bus,
                    "bus threads run at normal priority: real-time scheduling was refused ({why}); \
                     polls may start late when the CPU is busy. Run gatehouse with CAP_SYS_NICE or \
                     LimitRTPRIO= at least the priority (the shipped unit does), or set \
                     [rs485] realtime = false to silence this (docs/operations.md)"
                );
            } else {
                tracing::debug!(bus, why = why.as_str(), "bus thread at normal priority");
            }
        }
    }
    r
}

fn set_current(rt: Realtime) -> Raised {
    use thread_priority::{
        RealtimeThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
    };
    let Realtime::Fifo(p) = rt else {
        return Raised::Off;
    };
    let value = match ThreadPriorityValue::try_from(p) {
        Ok(v) => v,
        Err(e) => return Raised::Refused(e.to_string()),
    };
    match thread_priority::set_thread_priority_and_policy(
        thread_priority::thread_native_id(),
        ThreadPriority::Crossplatform(value),
        ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo),
    ) {
        Ok(()) => Raised::Fifo(p),
        Err(thread_priority::Error::OS(code)) => {
            Raised::Refused(std::io::Error::from_raw_os_error(code).to_string())
        }
        Err(e) => Raised::Refused(format!("{e:?}")),
    }
}

/// The calling thread's scheduling: `SCHED_FIFO` with its priority, or `None` for any other.
pub fn current_fifo_priority() -> Option<u8> {
    use thread_priority::{RealtimeThreadSchedulePolicy, ThreadSchedulePolicy};
    let (policy, params) =
        thread_priority::thread_schedule_policy_param(thread_priority::thread_native_id()).ok()?;
    match policy {
        ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo) => {
            u8::try_from(params.sched_priority).ok()
        }
        _ => None,
    }
}

/// A one-shot monotonic timer with nanosecond deadlines, waited for on the bus thread's tokio
/// runtime (a `timerfd` registered with it). Created inside that runtime.
pub struct SlotTimer {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl SlotTimer {
    /// Must be called within a tokio runtime with I/O enabled.
    pub fn new() -> std::io::Result<SlotTimer> {
        use rustix::time::{TimerfdClockId, TimerfdFlags, timerfd_create};
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        // Deprecated in tokio for I/O safety (a borrowed descriptor could be closed while
        // registered); this one is owned by the `AsyncFd` and closed only after it is
        // deregistered. The replacement is an `unsafe fn`, and the crate forbids `unsafe`.
        #[allow(deprecated)]
        let fd = tokio::io::unix::AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)?;
        Ok(SlotTimer { fd })
    }

    /// Waits until `at` (at once if it is past). Cancel-safe: dropping the future leaves the
    /// timer to be re-armed by the next call.
    pub async fn sleep_until(&mut self, at: Instant) -> std::io::Result<()> {
        use rustix::time::{Itimerspec, TimerfdTimerFlags, Timespec, timerfd_settime};
        let left = at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        // A zero value disarms a timerfd: at least a nanosecond.
        let left = left.max(Duration::from_nanos(1));
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: Timespec {
                tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(left.subsec_nanos()),
            },
        };
        timerfd_settime(self.fd.get_ref(), TimerfdTimerFlags::empty(), &spec)?;
        loop {
            let mut guard = self.fd.readable().await?;
            let mut count = [0u8; 8];
            match rustix::io::read(guard.get_inner(), &mut count) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
            // A readiness left over from an earlier arming (its expiry was read then): check
            // the deadline itself before waiting again.
            if Instant::now() >= at {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn the_slot_timer_never_wakes_before_its_deadline_and_can_be_rearmed() {
        rt().block_on(async {
            let mut t = SlotTimer::new().unwrap();
            for us in [0u64, 1, 300, 1500, 4000] {
                let at = Instant::now() + Duration::from_micros(us);
                t.sleep_until(at).await.unwrap();
                assert!(Instant::now() >= at, "woke before a {us} µs deadline");
            }
            // A past deadline returns at once.
            let past = Instant::now() - Duration::from_millis(5);
            t.sleep_until(past).await.unwrap();
            // Cancelled mid-wait (a job came first), then re-armed for a later deadline.
            let far = Instant::now() + Duration::from_secs(3600);
            let cancelled =
                tokio::time::timeout(Duration::from_millis(5), t.sleep_until(far)).await;
            assert!(cancelled.is_err());
            let at = Instant::now() + Duration::from_millis(2);
            t.sleep_until(at).await.unwrap();
            assert!(Instant::now() >= at);
        });
    }

    #[test]
    fn realtime_settings_are_checked() {
        let parse = |s: &str| -> Result<Realtime, String> {
            let raw: RawRs485 = toml::from_str(s).map_err(|e| e.to_string())?;
            let err = |_: std::ops::Range<usize>, key: &str, message: String| {
                crate::config::ConfigError {
                    file: "t.toml".into(),
                    line: 1,
                    key: Some(key.to_string()),
                    message,
                }
            };
            check(&raw, &err).map_err(|e| e.to_string())
        };
        assert_eq!(parse(""), Ok(Realtime::Fifo(DEFAULT_PRIORITY)));
        assert_eq!(parse("realtime = true"), Ok(Realtime::Fifo(20)));
        assert_eq!(parse("realtime = false"), Ok(Realtime::Off));
        assert_eq!(parse("realtime_priority = 30"), Ok(Realtime::Fifo(30)));
        for bad in ["0", "50", "99", "-1", "100000"] {
            let e = parse(&format!("realtime_priority = {bad}")).unwrap_err();
            assert!(
                e.contains("rs485.realtime_priority") && e.contains("1 to 49"),
                "{e}"
            );
        }
        assert!(parse("realtime = \"yes\"").is_err());
        assert!(parse("priority = 3").unwrap_err().contains("unknown field"));
    }

    #[test]
    fn a_thread_is_raised_where_permitted_and_refused_cleanly_otherwise() {
        // Off: nothing changes.
        let off = std::thread::spawn(|| (raise("t", Realtime::Off), current_fifo_priority()))
            .join()
            .unwrap();
        assert_eq!(off, (Raised::Off, None));
        // On: raised (root / CAP_SYS_NICE, as on the test machines) or refused with a reason;
        // either way the thread's real policy agrees with what was reported.
        let (r, now) =
            std::thread::spawn(|| (raise("t", Realtime::Fifo(3)), current_fifo_priority()))
                .join()
                .unwrap();
        match r {
            Raised::Fifo(p) => assert_eq!((p, now), (3, Some(3))),
            Raised::Refused(why) => {
                assert!(!why.is_empty());
                assert_eq!(now, None);
            }
            Raised::Off => panic!("asked for SCHED_FIFO"),
        }
    }
}
