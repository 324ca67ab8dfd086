//! The metrics endpoint and the `health` message, from the real daemon (a child process) with a
//! Modbus bus against a pymodbus peer on a PTY and a real mosquitto with mutual TLS: the scrape
//! is read over HTTP and parsed strictly as OpenMetrics text, and its figures are checked
//! against what the test did (two decisions, a device that answers then falls silent). A
//! metrics port already in use: a clear error, and the daemon goes on deciding access and
//! reporting its health to the cloud.

#[path = "support/broker.rs"]
mod broker;
mod common;
#[path = "support/peers.rs"]
mod peers;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use broker::{Broker, Received, Subscriber};
use ed25519_dalek::SigningKey;
use gatehouse::cloud::messages::{Health, Topics};
use peers::Peer;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The demo site open around the clock, written into `dir`.
fn snapshot(dir: &Path) -> PathBuf {
    let mut snap: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo-snapshot.json"),
        )
        .unwrap(),
    )
    .unwrap();
    snap["facility"]["default_schedule"] = Value::from("always");
    let file = dir.join("snapshot.json");
    std::fs::write(&file, serde_json::to_vec(&snap).unwrap()).unwrap();
    file
}

/// A free TCP port on 127.0.0.1 (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The daemon: one Modbus bus with `relay-board-1` (address 2 on the peer), two decisions made
/// at start (alice's code at the gate: granted; an unknown code: denied), metrics on `port`.
fn start_daemon(dir: &Path, b: &Broker, link: &Path, port: u16) -> Daemon {
    let signer = SigningKey::from_bytes(&[5; 32]);
    let snap = snapshot(dir);
    let cfg = b.write_gateway_config(
        dir,
        "data",
        &signer.verifying_key(),
        "reconnect_min_ms = 200\n",
        &format!(
            r#"[access]
initial_snapshot = "{}"
[metrics]
listen = "127.0.0.1:{port}"
[[demo.attempts]]
code = "123456"
entry = "gate-1"
[[demo.attempts]]
code = "909090"
entry = "gate-1"
[[bus]]
id = "rs485-io"
port = "{}"
protocol = "modbus"
timeout_ms = 100
[[bus.device]]
id = "relay-board-1"
profile = "waveshare-relay-8ch-d"
address = 2
poll_interval_ms = 100
"#,
            snap.display(),
            link.display()
        ),
    );
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    Daemon(
        Command::new(common::gatehouse_bin())
            .args(["run", "--config", cfg.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// One HTTP/1.1 request; the status line and the body.
fn http(port: u16, request: &str) -> Option<(String, String, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.lines().next()?.to_string();
    let ctype = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or_default()
        .to_string();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))?
        .parse()
        .ok()?;
    assert_eq!(len, body.len(), "Content-Length matches the body");
    Some((status, ctype, body.to_string()))
}

/// Samples of a scrape: `name{sorted labels}` -> value.
type Samples = BTreeMap<String, f64>;

/// A strict reader of the OpenMetrics text format (the parts the gateway uses): every sample
/// belongs to a family declared by `# TYPE` before it (each family with one `# HELP`), with a known suffix for its type; labels
/// are `name="value"` with escapes; values parse as floats; the text ends with `# EOF`; no
/// family is declared twice; counters end in `_total`, histograms have `_bucket` with `le`,
/// `_count` and `_sum`, and their buckets do not decrease.
fn parse_openmetrics(text: &str) -> Samples {
    assert!(text.ends_with("# EOF\n"), "ends with # EOF");
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut described = std::collections::BTreeSet::new();
    let mut samples = Samples::new();
    let mut last_bucket: Option<(String, f64)> = None;
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if *line == "# EOF" {
            assert_eq!(i, lines.len() - 1, "# EOF is the last line");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name) = (parts.next().unwrap(), parts.next().expect("a family name"));
            match kw {
                "TYPE" => {
                    let t = parts.next().expect("a type").to_string();
                    assert!(
                        ["counter", "gauge", "histogram", "info", "unknown"].contains(&t.as_str()),
                        "type {t}"
                    );
                    assert!(
                        types.insert(name.to_string(), t).is_none(),
                        "{name} declared once"
                    );
                }
                "HELP" | "UNIT" => {
                    assert!(
                        described.insert(format!("{kw} {name}")),
                        "one {kw} for {name}"
                    );
                }
                _ => panic!("unknown descriptor `{line}`"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value in `{line}`")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').expect("labels close")),
            None => (series, ""),
        };
        let mut parsed: Vec<(String, String)> = Vec::new();
        let mut rest = labels;
        while !rest.is_empty() {
            let (k, v) = rest.split_once("=\"").expect("label=\"value\"");
            assert!(
                k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "label name `{k}`"
            );
            let mut val = String::new();
            let mut chars = v.char_indices();
            let end = loop {
                match chars.next().expect("label value closes") {
                    (_, '\\') => match chars.next().unwrap().1 {
                        'n' => val.push('\n'),
                        c @ ('\\' | '"') => val.push(c),
                        c => panic!("bad escape \\{c}"),
                    },
                    (j, '"') => break j,
                    (_, c) => val.push(c),
                }
            };
            parsed.push((k.to_string(), val));
            rest = &v[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        let family = types
            .keys()
            .filter(|f| name.starts_with(f.as_str()))
            .max_by_key(|f| f.len())
            .unwrap_or_else(|| panic!("sample `{name}` without a TYPE"));
        let suffix = &name[family.len()..];
        let t = types[family].as_str();
        let ok = match t {
            "counter" => ["_total", "_created"].contains(&suffix),
            "gauge" | "unknown" => suffix.is_empty(),
            "info" => suffix == "_info",
            "histogram" => ["_bucket", "_count", "_sum", "_created"].contains(&suffix),
            _ => false,
        };
        assert!(ok, "`{name}` is not a sample name of {t} `{family}`");
        if suffix == "_bucket" {
            let le = parsed
                .iter()
                .find(|(k, _)| k == "le")
                .expect("a bucket has le");
            let others: Vec<_> = parsed.iter().filter(|(k, _)| k != "le").collect();
            let key = format!("{family}{others:?}");
            if let Some((k, prev)) = &last_bucket
                && *k == key
            {
                assert!(value >= *prev, "buckets do not decrease: {line}");
            }
            let _: f64 = if le.1 == "+Inf" {
                f64::INFINITY
            } else {
                le.1.parse().expect("le is a number")
            };
            last_bucket = Some((key, value));
        }
        parsed.sort();
        let labels: Vec<String> = parsed.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let key = if labels.is_empty() {
            name.to_string()
        } else {
            format!("{name}{{{}}}", labels.join(","))
        };
        assert!(
            samples.insert(key, value).is_none(),
            "one sample per series"
        );
    }
    for name in types.keys() {
        assert!(
            described.contains(&format!("HELP {name}")),
            "{name} has a HELP"
        );
    }
    samples
}

fn scrape(port: u16) -> Samples {
    let (status, ctype, body) =
        http(port, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("a scrape");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(ctype, gatehouse::metrics::CONTENT_TYPE);
    parse_openmetrics(&body)
}

fn get(s: &Samples, key: &str) -> f64 {
    *s.get(key)
        .unwrap_or_else(|| panic!("no `{key}` in the scrape: {:#?}", s.keys()))
}

/// Scrapes until `pred` holds.
fn scrape_until(port: u16, what: &str, pred: impl Fn(&Samples) -> bool) -> Samples {
    let end = Instant::now() + WAIT;
    loop {
        if let Some((_, _, body)) = http(port, "GET /metrics HTTP/1.1\r\n\r\n")
            && body.ends_with("# EOF\n")
        {
            let s = parse_openmetrics(&body);
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < end, "{what}: last scrape {s:#?}");
        }
        assert!(Instant::now() < end, "{what}: no scrape");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn scrape_counts_what_the_daemon_did() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttyMODBUS");
    let mut dev = Peer::start(
        "modbus_dev.py",
        &link,
        &["--device", "2:relay8d"].map(String::from),
    );
    let b = Broker::start();
    let t = Topics::new("gatehouse", "site-1", "gw-1");
    let sub = Subscriber::connect(&b, "cloud", &t.health()).await;
    let port = free_port();
    let _daemon = start_daemon(dir.path(), &b, &link, port);
    let bus = "bus=rs485-io,protocol=modbus";

    // The two decisions, the device polled and online, the events acknowledged by the broker.
    let s = scrape_until(port, "device online and events acknowledged", |s| {
        s.get("gatehouse_device_online{bus=rs485-io,device=relay-board-1}") == Some(&1.0)
            && s.get("gatehouse_events_acknowledged_total")
                .is_some_and(|v| *v >= 3.0)
            && s.get("gatehouse_outbox_events") == Some(&0.0)
    });
    assert_eq!(
        get(
            &s,
            "gatehouse_decisions_total{reason=tenant,result=granted}"
        ),
        1.0
    );
    assert_eq!(
        get(
            &s,
            "gatehouse_decisions_total{reason=unknown_credential,result=denied}"
        ),
        1.0
    );
    let decisions: f64 = s
        .iter()
        .filter(|(k, _)| k.starts_with("gatehouse_decisions_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(decisions, 2.0, "two decisions, nothing else");
    assert_eq!(get(&s, "gatehouse_decision_duration_seconds_count"), 2.0);
    assert_eq!(
        get(&s, "gatehouse_decision_duration_seconds_bucket{le=+Inf}"),
        2.0
    );
    assert!(get(&s, &format!("gatehouse_bus_transactions_total{{{bus}}}")) >= 1.0);
    assert_eq!(
        get(&s, &format!("gatehouse_bus_timeouts_total{{{bus}}}")),
        0.0
    );
    assert_eq!(
        get(&s, &format!("gatehouse_bus_crc_errors_total{{{bus}}}")),
        0.0
    );
    assert_eq!(
        get(&s, &format!("gatehouse_bus_transactions_total{{{bus}}}")),
        get(
            &s,
            &format!("gatehouse_bus_transaction_duration_seconds_count{{{bus}}}")
        ),
        "each transaction timed"
    );
    assert_eq!(get(&s, "gatehouse_cloud_connected"), 1.0);
    assert_eq!(get(&s, "gatehouse_cloud_reconnects_total"), 0.0);
    assert_eq!(get(&s, "gatehouse_store_ok"), 1.0);
    assert!(get(&s, "gatehouse_store_size_bytes") > 0.0);
    assert!(
        get(&s, "gatehouse_events_published_total")
            >= get(&s, "gatehouse_events_acknowledged_total")
    );
    assert_eq!(
        get(
            &s,
            &format!(
                "gatehouse_build_info{{version={}}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );

    // The device falls silent: timeouts counted, the device offline.
    dev.send(json!({"op": "silent", "addr": 2, "on": true}));
    let s = scrape_until(port, "device offline after timeouts", |s| {
        s.get("gatehouse_device_online{bus=rs485-io,device=relay-board-1}") == Some(&0.0)
    });
    assert!(get(&s, &format!("gatehouse_bus_timeouts_total{{{bus}}}")) >= 1.0);

    // The health message, retained on the broker: the same figures.
    let msgs = sub
        .wait_for(
            |m| {
                m.iter().any(|r| {
                    serde_json::from_slice::<Health>(&r.payload)
                        .is_ok_and(|h| h.buses.get("rs485-io").is_some_and(|b| b.online == 0))
                })
            },
            WAIT,
        )
        .await;
    let h: Health = msgs
        .iter()
        .rev()
        .find_map(|r| serde_json::from_slice(&r.payload).ok())
        .unwrap();
    assert_eq!((h.site.as_str(), h.gateway.as_str()), ("site-1", "gw-1"));
    assert_eq!((h.decisions.granted, h.decisions.denied), (1, 1));
    assert_eq!(h.gatehouse_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(h.storage.state, "ok");
    assert_eq!(
        (h.buses["rs485-io"].online, h.buses["rs485-io"].total),
        (0, 1)
    );

    // Anything but GET /metrics is refused plainly.
    let (status, _, _) = http(port, "GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _, _) = http(port, "POST /metrics HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    let (status, _, _) = http(port, "\r\n\r\n").unwrap();
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    // The endpoint still serves after them.
    let s = scrape(port);
    assert_eq!(get(&s, "gatehouse_cloud_connected"), 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_port_in_use_is_an_error_and_access_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttyMODBUS");
    let _dev = Peer::start(
        "modbus_dev.py",
        &link,
        &["--device", "2:relay8d"].map(String::from),
    );
    let b = Broker::start();
    let t = Topics::new("gatehouse", "site-1", "gw-1");
    let sub = Subscriber::connect(&b, "cloud", &format!("{}/#", t.base())).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut daemon = start_daemon(dir.path(), &b, &link, port);

    // The decisions reach the cloud, the health message says the device answers. Health counts
    // a decision when it is made and the event is published once it is durable, so either can
    // arrive first: wait for both.
    let is_granted = |r: &Received| {
        r.topic == t.events()
            && serde_json::from_slice::<Value>(&r.payload)
                .is_ok_and(|v| v["kind"] == "access_granted")
    };
    let msgs = sub
        .wait_for(
            |m| {
                m.iter().any(is_granted)
                    && m.iter().any(|r| {
                        r.topic == t.health()
                            && serde_json::from_slice::<Health>(&r.payload).is_ok_and(|h| {
                                h.decisions.granted == 1
                                    && h.buses.get("rs485-io").is_some_and(|b| b.online == 1)
                            })
                    })
            },
            WAIT,
        )
        .await;
    let granted = msgs.iter().filter(|r| is_granted(r)).count();
    assert_eq!(granted, 1);
    assert!(daemon.0.try_wait().unwrap().is_none(), "the daemon runs on");
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(
        log.contains(&format!(
            "metrics: cannot listen on 127.0.0.1:{port}: Address already in use"
        )) && log.contains("running without the metrics endpoint"),
        "a clear error: {log}"
    );
    // The port still belongs to its owner: nothing answers /metrics there.
    drop(taken);
}
