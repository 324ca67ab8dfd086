//! Fault campaign: the wall clock stepped forwards and backwards (issue "make faults"). A signed
//! command executes at most once whatever the clock does: ids are pruned only when expired by
//! the wall clock *and* by lived (monotonic) time, and pruning raises a durable
//! `pruned_through` below which commands are refused `expired`. The clocks are injected:
//! [`handle_at`] and [`prune`] take the wall time and the lived milliseconds.

#[path = "support/broker.rs"]
mod broker;
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};

use chrono::{DateTime, Duration, Utc};
use ed25519_dalek::SigningKey;
use gatehouse::cloud::commands::*;
use gatehouse::cloud::messages::Command;
use gatehouse::store::Store;
use serde_json::json;

fn scale() -> usize {
    std::env::var("GATEHOUSE_FAULT_SCALE")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|n| *n > 1)
        .unwrap_or(1)
}

struct Fx {
    _dir: tempfile::TempDir,
    store: Store,
    router: Router,
    cfg: CommandConfig,
    key: SigningKey,
}

fn fx() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 10_000).unwrap();
    let router = Router::new(
        Arc::new(SimulatedUnits::new(["lock-a101"])),
        Arc::new(SimulatedRelays::new(["relay-board-1"])),
    );
    let key = SigningKey::from_bytes(&[11; 32]);
    let cfg = CommandConfig::new(key.verifying_key(), "site-1", "gw-1");
    Fx {
        _dir: dir,
        store,
        router,
        cfg,
        key,
    }
}

fn t0() -> DateTime<Utc> {
    "2026-03-01T12:00:00Z".parse().unwrap()
}

const LIFETIME_MIN: i64 = 5;

/// A `ping` issued by the cloud at `issued` (the cloud's clock is right).
fn ping(id: &str, issued: DateTime<Utc>) -> Command {
    Command {
        v: 2,
        site: "site-1".into(),
        gateway: "gw-1".into(),
        id: id.into(),
        name: "ping".into(),
        issued_at: issued,
        expires_at: issued + Duration::minutes(LIFETIME_MIN),
        target: None,
        args: json!({}),
    }
}

impl Fx {
    /// Delivers signed bytes with the gateway's wall clock at `wall` and `lived` ms lived.
    fn deliver(&self, bytes: &[u8], wall: DateTime<Utc>, lived: u64) -> Outcome {
        handle_at(
            &self.router,
            &self.store,
            bytes,
            "ping",
            wall,
            lived,
            &self.cfg,
        )
    }
    fn prune(&self, wall: DateTime<Utc>, lived: u64) -> usize {
        prune(&self.store, wall, lived, &self.cfg).unwrap()
    }
}

fn executed(o: &Outcome) -> bool {
    !o.duplicate && o.result.status == "done"
}

const MIN_MS: u64 = 60_000;

#[test]
fn a_forward_step_past_expiry_does_not_prune_and_a_replay_after_the_step_back_is_refused() {
    let f = fx();
    let cmd = sign(&ping("c-1", t0()), &f.key);
    let lived0 = 1_000;
    assert!(executed(&f.deliver(&cmd, t0(), lived0)));
    // The clock jumps a day ahead one second later; pruning runs.
    assert_eq!(f.prune(t0() + Duration::days(1), lived0 + 1_000), 0);
    assert!(f.store.commands().get("c-1").unwrap().is_some());
    // Stepped back: the replay is recognised.
    let r = f.deliver(&cmd, t0() + Duration::seconds(2), lived0 + 2_000);
    assert!(r.duplicate && !executed(&r), "{:?}", r.result);
    // Still ahead for long enough (lived time too): now it is pruned, and a replay after the
    // clock is set back is refused as expired.
    let lived = lived0 + (LIFETIME_MIN as u64 + 2) * MIN_MS;
    assert_eq!(f.prune(t0() + Duration::days(1), lived), 1);
    let r = f.deliver(&cmd, t0() + Duration::minutes(1), lived + 1);
    assert_eq!(
        (r.result.status.as_str(), r.result.reason.as_deref()),
        ("refused", Some("expired")),
        "{:?}",
        r.result
    );
    assert!(!executed(&r));
    println!(
        "faults: clock forward past expiry + prune + back: the id is kept until lived time \
         covers its lifetime; replays answered duplicate, then expired; executed once"
    );
}

#[test]
fn an_expired_pruned_command_replayed_after_the_clock_steps_back_is_refused() {
    let f = fx();
    let cmd = sign(&ping("c-2", t0()), &f.key);
    assert!(executed(&f.deliver(&cmd, t0(), 0)));
    // Time passes normally beyond the expiry and the skew: pruned.
    let later = LIFETIME_MIN as u64 * MIN_MS + 2 * MIN_MS;
    assert_eq!(f.prune(t0() + Duration::minutes(7), later), 1);
    assert!(f.store.commands().is_empty());
    assert_eq!(
        f.store.commands().pruned_through().unwrap(),
        Some(t0() + Duration::minutes(LIFETIME_MIN))
    );
    // The clock steps back to before the expiry: the replay passes the expiry check but is
    // refused because its id may have been forgotten.
    for back in [0, 1, 4] {
        let r = f.deliver(&cmd, t0() + Duration::minutes(back), later + 1);
        assert_eq!(
            (r.result.status.as_str(), r.result.reason.as_deref()),
            ("refused", Some("expired")),
            "{:?}",
            r.result
        );
        assert!(!executed(&r));
    }
    // Survives a restart: `pruned_through` is durable.
    let dir = f._dir;
    drop(f.store);
    let store = Store::open(dir.path(), 10_000).unwrap();
    assert_eq!(
        store.commands().pruned_through().unwrap(),
        Some(t0() + Duration::minutes(LIFETIME_MIN))
    );
    println!("faults: expired, pruned, clock back x3 (+restart): refused expired, never twice");
}

#[test]
fn pruning_still_happens_with_a_steady_clock() {
    let f = fx();
    let n = 50 * scale();
    for i in 0..n {
        let at = t0() + Duration::seconds(i as i64);
        let o = f.deliver(
            &sign(&ping(&format!("n-{i}"), at), &f.key),
            at,
            i as u64 * 1000,
        );
        assert!(executed(&o), "{:?}", o.result);
    }
    assert_eq!(f.store.commands().len(), n);
    // Not yet: within the lifetime.
    assert_eq!(f.prune(t0() + Duration::minutes(1), 60_000), 0);
    let end = t0() + Duration::seconds(n as i64) + Duration::minutes(LIFETIME_MIN + 2);
    let lived = (n as u64) * 1000 + (LIFETIME_MIN as u64 + 2) * MIN_MS;
    assert_eq!(f.prune(end, lived), n);
    assert!(f.store.commands().is_empty());
    // A new command is accepted.
    let o = f.deliver(&sign(&ping("fresh", end), &f.key), end, lived);
    assert!(executed(&o), "{:?}", o.result);
    println!("faults: steady clock: {n} expired ids pruned; a new command runs");
}

/// A small xorshift generator (deterministic, no dependency).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random walks: real time advances, the gateway's wall clock is stepped by random amounts
/// (minutes to a year, either way) and corrected, commands are sent and replayed, pruning runs.
/// No id ever executes twice; with the clock right, a fresh command always runs.
#[test]
fn random_clock_steps_never_execute_a_command_twice() {
    let walks = 10 * scale();
    let (mut total_exec, mut total_replays, mut total_pruned) = (0usize, 0usize, 0usize);
    for w in 0..walks {
        let f = fx();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1));
        let (mut real_ms, mut offset_ms) = (0u64, 0i64);
        let mut sent: Vec<Vec<u8>> = Vec::new();
        let mut runs: HashMap<usize, usize> = HashMap::new();
        for step in 0..300 {
            real_ms += rng.below(30_000);
            let wall = |off: i64| t0() + Duration::milliseconds(real_ms as i64 + off);
            match rng.below(10) {
                // Step the wall clock.
                0 => {
                    offset_ms = match rng.below(4) {
                        0 => 0,
                        1 => rng.below(365 * 24 * 60) as i64 * MIN_MS as i64,
                        2 => -(rng.below(365 * 24 * 60) as i64) * MIN_MS as i64,
                        _ => (rng.below(20) as i64 - 10) * MIN_MS as i64,
                    }
                }
                1 | 2 => total_pruned += f.prune(wall(offset_ms), real_ms),
                3..=5 => {
                    let i = sent.len();
                    let bytes = sign(&ping(&format!("w{w}-{i}"), wall(0)), &f.key);
                    let o = f.deliver(&bytes, wall(offset_ms), real_ms);
                    if offset_ms == 0 {
                        assert!(
                            executed(&o),
                            "walk {w} step {step}: a fresh command with the clock right: {:?}",
                            o.result
                        );
                    }
                    if executed(&o) {
                        *runs.entry(i).or_default() += 1;
                    }
                    sent.push(bytes);
                }
                _ if !sent.is_empty() => {
                    // Mostly a recent one (still valid by the right clock).
                    let n = sent.len() as u64;
                    let i = if rng.below(4) == 0 {
                        rng.below(n)
                    } else {
                        n - 1 - rng.below(n.min(4))
                    } as usize;
                    let o = f.deliver(&sent[i], wall(offset_ms), real_ms);
                    total_replays += 1;
                    if executed(&o) {
                        *runs.entry(i).or_default() += 1;
                    }
                }
                _ => {}
            }
            if let Some((i, n)) = runs.iter().find(|(_, n)| **n > 1) {
                panic!("walk {w} step {step}: command {i} executed {n} times");
            }
        }
        total_exec += runs.len();
    }
    println!(
        "faults: clock steps x{walks} walks of 300 steps: {total_exec} commands executed, \
         {total_replays} replays, {total_pruned} ids pruned; none executed twice; fresh commands \
         always ran with the clock right"
    );
}

// ---------------------------------------------------------------------------------------------
// The daemon as a process, its clock stepped by libfaketime (Debian package `faketime`).

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
const WAIT: StdDuration = StdDuration::from_secs(60);

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_daemon_config(dir: &Path, b: &broker::Broker, signer: &SigningKey) -> PathBuf {
    b.write_gateway_config(
        dir,
        "data",
        &signer.verifying_key(),
        "reconnect_min_ms = 200\n",
        "",
    )
}

/// Sends signed bytes on `cmd/ping` and waits for the `n`-th result for `id`.
async fn send(
    b: &broker::Broker,
    sub: &broker::Subscriber,
    bytes: Vec<u8>,
    id: &str,
    n: usize,
) -> serde_json::Value {
    let t = gatehouse::cloud::messages::Topics::new("gatehouse", "site-1", "gw-1");
    let results = |m: &[broker::Received]| -> Vec<serde_json::Value> {
        m.iter()
            .filter(|x| x.topic == t.command_result("ping"))
            .filter_map(|x| serde_json::from_slice::<serde_json::Value>(&x.payload).ok())
            .filter(|v| v["id"] == id)
            .collect()
    };
    let client = format!("cloud-{id}-{n}");
    broker::publish_qos1(
        b.mqtt_options_as("cloud", &client),
        &format!("{}/cmd/ping", t.base()),
        bytes,
        false,
    )
    .await
    .unwrap();
    let msgs = sub.wait_for(|m| results(m).len() >= n, WAIT).await;
    results(&msgs).remove(n - 1)
}

/// Waits until the daemon's log has `n` more lines containing `needle` than it had at `from`.
fn wait_log(log: &Path, needle: &str, from: usize, n: usize) -> usize {
    let start = Instant::now();
    loop {
        let count = std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches(needle)
            .count();
        if count >= from + n {
            return count;
        }
        assert!(start.elapsed() < WAIT, "no `{needle}` in the daemon's log");
        std::thread::sleep(StdDuration::from_millis(100));
    }
}

/// The daemon's wall clock jumps two days ahead (pruning runs), then back: the replay of a
/// command it executed before the jump is answered with the first result, not executed again.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_steps_forward_prunes_steps_back_and_does_not_run_a_replay() {
    if !Path::new(LIBFAKETIME).exists() {
        let root = Process::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        assert!(!root, "{LIBFAKETIME} missing (apt-get install faketime)");
        println!("faults: clock (daemon): SKIPPED, {LIBFAKETIME} missing");
        return;
    }
    let b = broker::Broker::start();
    let signer = SigningKey::from_bytes(&[1; 32]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_daemon_config(dir.path(), &b, &signer);
    let offset = dir.path().join("faketime");
    std::fs::write(&offset, "+0\n").unwrap();
    let log = dir.path().join("daemon.log");
    let sub = broker::Subscriber::connect(&b, "cloud", "gatehouse/site-1/gw-1/cmd/+/result").await;
    sub.wait_subscribed(1, WAIT).await;
    let _daemon = Daemon(
        Process::new(common::gatehouse_bin())
            .args(["run", "--config", cfg.to_str().unwrap()])
            .env("LD_PRELOAD", LIBFAKETIME)
            .env("FAKETIME_TIMESTAMP_FILE", &offset)
            .env("FAKETIME_NO_CACHE", "1")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env("RUST_LOG", "gatehouse=debug,warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let status = broker::Subscriber::connect(&b, "watch", "gatehouse/site-1/gw-1/status").await;
    status
        .wait_for(
            |m| {
                m.iter().any(|x| {
                    serde_json::from_slice::<serde_json::Value>(&x.payload)
                        .is_ok_and(|v| v["online"] == true)
                })
            },
            WAIT,
        )
        .await;
    let rounds = scale().min(5);
    for r in 0..rounds {
        let id = format!("x{r}");
        let first_cmd = sign(&ping(&id, Utc::now()), &signer);
        let first = send(&b, &sub, first_cmd.clone(), &id, 1).await;
        assert_eq!(first["status"], "done", "{first}");
        // Two days ahead: a fresh command now looks expired to the daemon.
        std::fs::write(&offset, "+2d\n").unwrap();
        let probe = format!("ahead{r}");
        let p = send(
            &b,
            &sub,
            sign(&ping(&probe, Utc::now()), &signer),
            &probe,
            1,
        )
        .await;
        assert_eq!(p["reason"], "expired", "the daemon's clock is ahead: {p}");
        // Pruning runs (twice, to be sure one ran entirely with the clock ahead).
        let before = wait_log(&log, "command ids pruned", 0, 0);
        wait_log(&log, "command ids pruned", before, 2);
        // Back to the right time: the replay is recognised.
        std::fs::write(&offset, "+0\n").unwrap();
        let back = format!("back{r}");
        let p = send(&b, &sub, sign(&ping(&back, Utc::now()), &signer), &back, 1).await;
        assert_eq!(
            p["status"], "done",
            "the daemon's clock is right again: {p}"
        );
        let replay = send(&b, &sub, first_cmd, &id, 2).await;
        assert_eq!(
            replay, first,
            "the replay is answered with the first result (not executed again)"
        );
    }
    println!(
        "faults: clock (daemon, libfaketime) x{rounds}: +2 days, prune ran, back: the replay \
         was answered with the first result, not executed again"
    );
}
