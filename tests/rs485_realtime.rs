//! `[rs485] realtime` against the real daemon (`gatehouse run`) and pymodbus devices on PTYs
//! (`tests/peers/modbus_dev.py`): the bus threads run at `SCHED_FIFO` where permitted (read back
//! from `/proc`), a refusal (no `CAP_SYS_NICE`, `RLIMIT_RTPRIO` 0: the daemon started under
//! `setpriv --bounding-set=-sys_nice`) is one clear warning for all buses and the buses work at
//! normal priority, `realtime = false` keeps them normal without a word, and a bad priority is
//! refused by `check-config` naming the key.

mod common;
#[path = "support/peers.rs"]
mod peers;

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use peers::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

struct Daemon {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// `gatehouse run` on `cfg`, through `wrap` (a command and its arguments) if given; JSON
    /// log lines collected from stderr.
    fn start(cfg: &Path, wrap: &[&str]) -> Daemon {
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(common::gatehouse_bin());
                c
            }
            None => Command::new(common::gatehouse_bin()),
        };
        let mut child = cmd
            .args(["run", "--config"])
            .arg(cfg)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().unwrap();
        let l = lines.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(err);
            let mut buf = Vec::new();
            while r.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
                l.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf).into_owned());
                buf.clear();
            }
        });
        Daemon { child, lines }
    }

    /// The log lines so far, parsed.
    fn logged(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for a line whose message starts with `msg` and that `pred` accepts.
    fn wait(&self, msg: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + WAIT;
        loop {
            if let Some(v) = self.logged().into_iter().find(|v| {
                v["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(msg))
                    && pred(v)
            }) {
                return v;
            }
            assert!(
                Instant::now() < end,
                "no `{msg}` line; the log:\n{}",
                self.lines.lock().unwrap().join("")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The names of the daemon's threads that run at a policy other than normal, sorted.
    fn raised_threads(&self) -> Vec<String> {
        let pid = self.child.id();
        let mut out: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .filter_map(|t| {
                let (name, policy, _) = task_sched(&t.path())?;
                (policy != 0).then_some(name)
            })
            .collect();
        out.sort();
        out
    }

    /// Scheduling policy (0 normal, 1 FIFO) and real-time priority of the thread named `name`.
    fn thread_sched(&self, name: &str) -> (u32, u32) {
        let pid = self.child.id();
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .find_map(|t| {
                let (n, policy, prio) = task_sched(&t.path())?;
                (n == name).then_some((policy, prio))
            })
            .unwrap_or_else(|| panic!("no thread `{name}` in the daemon"))
    }
}

/// A thread's name, scheduling policy and real-time priority, from `/proc/<pid>/task/<tid>`.
fn task_sched(task: &Path) -> Option<(String, u32, u32)> {
    let comm = std::fs::read_to_string(task.join("comm")).ok()?;
    let stat = std::fs::read_to_string(task.join("stat")).ok()?;
    // Fields after the name (which may hold spaces) start after the last ')': the first is
    // field 3; rt_priority is field 40, policy field 41.
    let rest: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    Some((
        comm.trim().to_string(),
        rest.get(38)?.parse().ok()?,
        rest.get(37)?.parse().ok()?,
    ))
}

fn climate(link: &Path) -> Peer {
    Peer::start(
        "modbus_dev.py",
        link,
        &["--device", "4:xymd02"].map(String::from),
    )
}

fn bus(id: &str, link: &Path) -> String {
    format!(
        "[[bus]]\nid = \"{id}\"\nport = \"{}\"\nprotocol = \"modbus\"\ntimeout_ms = 500\n\
         [[bus.device]]\nid = \"climate-{id}\"\nprofile = \"xy-md02\"\naddress = 4\n\
         poll_interval_ms = 100\n",
        link.display()
    )
}

/// Whether this process could give a thread SCHED_FIFO 20: CAP_SYS_NICE, or RLIMIT_RTPRIO >= 20.
fn permitted_here() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let cap_sys_nice = cap_eff & (1 << 23) != 0;
    cap_sys_nice || rtprio_limit() >= 20
}

fn rtprio_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max realtime priority"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn online(v: &Value, device: &str) -> bool {
    v["fields"]["device"] == device && v["fields"]["online"] == true
}

#[test]
fn bus_threads_run_at_sched_fifo_where_permitted_and_a_refusal_is_one_clear_warning() {
    let dir = tempfile::tempdir().unwrap();
    drop(demo_store(dir.path()));
    let (link_a, link_b) = (dir.path().join("modbus-a"), dir.path().join("modbus-b"));
    let _a = climate(&link_a);
    let _b = climate(&link_b);
    let cfg = dir.path().join("gatehouse.toml");
    let write = |extra: &str| {
        std::fs::write(
            &cfg,
            format!(
                "[site]\nid = \"test-site\"\ngateway_id = \"gw\"\n[storage]\ndata_dir = \"data\"\n\
                 [log]\nlevel = \"info\"\nformat = \"json\"\n{extra}{}{}",
                bus("a", &link_a),
                bus("b", &link_b)
            ),
        )
        .unwrap();
    };
    const REFUSED: &str = "bus threads run at normal priority: real-time scheduling was refused";

    // Default: SCHED_FIFO 20 where permitted (root or CAP_SYS_NICE on the test machines).
    write("");
    {
        let d = Daemon::start(&cfg, &[]);
        d.wait("device state", |v| online(v, "climate-a"));
        d.wait("device state", |v| online(v, "climate-b"));
        if permitted_here() {
            d.wait("bus thread at real-time priority (SCHED_FIFO)", |v| {
                v["fields"]["bus"] == "a" && v["fields"]["priority"] == 20
            });
            assert_eq!(d.thread_sched("bus-a"), (1, 20));
            assert_eq!(d.thread_sched("bus-b"), (1, 20));
            // Nothing else is raised (the group commit's thread included: it must not inherit a
            // bus thread's priority).
            let raised = d.raised_threads();
            assert_eq!(raised, ["bus-a", "bus-b"], "threads at a real-time policy");
        } else {
            d.wait(REFUSED, |_| true);
            assert_eq!(d.thread_sched("bus-a"), (0, 0));
        }
    }

    // Refused: no CAP_SYS_NICE and no RLIMIT_RTPRIO. One warning for both buses, naming the
    // error and what to do; the buses work at normal priority.
    if rtprio_limit() < 20 && Path::new("/usr/bin/setpriv").exists() {
        let d = Daemon::start(&cfg, &["setpriv", "--bounding-set=-sys_nice"]);
        d.wait("device state", |v| online(v, "climate-a"));
        d.wait("device state", |v| online(v, "climate-b"));
        let w = d.wait(REFUSED, |_| true);
        assert_eq!(w["level"], "WARN");
        let msg = w["fields"]["message"].as_str().unwrap();
        assert!(
            msg.contains("not permitted") || msg.contains("Operation"),
            "{msg}"
        );
        assert!(
            msg.contains("LimitRTPRIO") && msg.contains("realtime = false"),
            "{msg}"
        );
        assert_eq!(
            d.logged()
                .iter()
                .filter(|v| v["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(REFUSED)))
                .count(),
            1,
            "one warning for two buses"
        );
        assert_eq!(d.thread_sched("bus-a"), (0, 0));
        assert_eq!(d.thread_sched("bus-b"), (0, 0));
    }

    // realtime = false: normal priority, no warning.
    write("[rs485]\nrealtime = false\n");
    {
        let d = Daemon::start(&cfg, &[]);
        d.wait("device state", |v| online(v, "climate-a"));
        d.wait("device state", |v| online(v, "climate-b"));
        assert_eq!(d.thread_sched("bus-a"), (0, 0));
        assert!(
            !d.logged().iter().any(|v| v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(REFUSED) || m.contains("real-time priority"))),
            "{:?}",
            d.lines.lock().unwrap()
        );
    }

    // A priority out of range: refused before anything starts, naming the key and the range.
    write("[rs485]\nrealtime_priority = 80\n");
    let out = Command::new(common::gatehouse_bin())
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rs485.realtime_priority") && err.contains("1 to 49") && err.contains(":10:"),
        "{err}"
    );
}
