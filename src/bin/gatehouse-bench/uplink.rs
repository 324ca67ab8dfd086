//! `gatehouse-bench uplink`: the cloud link against a mosquitto this benchmark starts (plain TCP
//! on a free port; the figures compare like with like, TLS costs both sides the same).
//!
//! - raw: N QoS 1 publishes from a bare rumqttc client, until the last PUBACK;
//! - durable: N events appended to the durable log (in flushed batches) while the link drains
//!   them at QoS 1, until the outbox is empty;
//! - drain: the broker is killed, BACKLOG events are appended, the broker comes back; the time
//!   until the outbox is empty again;
//! - lost: events appended in the two phases above that a subscriber never received;
//! - command_rtt: a signed `unlock` published by a cloud client until its result arrives, with a
//!   simulated target behind the command router.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chrono::Utc;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use gatehouse::cloud::commands::{CommandConfig, Router, SimulatedRelays, SimulatedUnits, sign};
use gatehouse::cloud::link::{CloudLink, Commands};
use gatehouse::cloud::messages::Topics;
use gatehouse::cloud::messages::{Command as Cmd, CommandTarget};
use gatehouse::config::{CloudConfig, Protocol, Transport};
use gatehouse::events::EventKind;
use gatehouse::store::{LogLimits, NewEvent, Store};

const N: u64 = 100_000;
const BACKLOG: u64 = 1_000_000;

pub(crate) struct Mosquitto {
    child: Option<Child>,
    conf: PathBuf,
    pub(crate) port: u16,
}

impl Mosquitto {
    pub(crate) fn start(dir: &Path) -> anyhow::Result<Mosquitto> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let conf = dir.join("mosquitto.conf");
        let mut text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_queued_messages 0\nmax_inflight_messages 0\nlog_dest none\nset_tcp_nodelay true\n"
        );
        // As root, mosquitto drops to its own user, which cannot read our private temp dir.
        if std::env::var("USER").as_deref() == Ok("root") || is_root() {
            text.push_str("user root\n");
        }
        std::fs::write(&conf, text)?;
        let mut m = Mosquitto {
            child: None,
            conf,
            port,
        };
        m.restart()?;
        Ok(m)
    }

    pub(crate) fn restart(&mut self) -> anyhow::Result<()> {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mosquitto (is it installed?)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                bail!("mosquitto did not start on port {}", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

pub(crate) fn options(id: &str, port: u16) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(100);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

/// Counts the distinct event sequence numbers received on the events topic.
struct Counter {
    seen: std::sync::Mutex<Vec<bool>>,
    distinct: AtomicU64,
    subscribed: AtomicU64,
}

fn spawn_subscriber(port: u16, topic: String, max_seq: usize) -> Arc<Counter> {
    let counter = Arc::new(Counter {
        seen: std::sync::Mutex::new(vec![false; max_seq + 1]),
        distinct: AtomicU64::new(0),
        subscribed: AtomicU64::new(0),
    });
    let c = counter.clone();
    tokio::spawn(async move {
        loop {
            let (client, mut el) =
                rumqttc::AsyncClient::new(options("bench-subscriber", port), 100);
            let _ = client.subscribe(&topic, rumqttc::QoS::AtLeastOnce).await;
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        c.subscribed.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload)
                            && let Some(seq) = v["seq"].as_u64()
                        {
                            let mut seen = c.seen.lock().unwrap();
                            if let Some(slot) = seen.get_mut(seq as usize)
                                && !*slot
                            {
                                *slot = true;
                                c.distinct.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    counter
}

fn event(i: u64) -> NewEvent {
    let at = Utc::now();
    NewEvent {
        at,
        local: at.to_rfc3339(),
        kind: EventKind::AccessGranted,
        payload: json!({"reason": "tenant", "credential": "code", "entry": "gate-1",
                        "direction": "in", "units": [format!("U{}", i % 1000)],
                        "user": format!("u{}", i % 5000), "device": "keypad-gate-1"}),
    }
}

/// Appends `n` events in flushed batches of `batch`.
fn append(store: &Store, n: u64, batch: u64) -> anyhow::Result<()> {
    let mut i = 0;
    while i < n {
        let k = batch.min(n - i);
        let events: Vec<NewEvent> = (i..i + k).map(event).collect();
        store.events().append(&events)?;
        i += k;
    }
    Ok(())
}

async fn wait_empty(store: &Store, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !store.events().is_empty() {
        if Instant::now() > deadline {
            bail!("outbox still holds {} events", store.events().len());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The same number of QoS 1 publishes from a bare rumqttc client, on the same topic the counting
/// subscriber receives (so the broker and the subscriber do the same work as for the durable
/// events; the payloads carry no `seq` and are not counted).
async fn raw(port: u16, topic: String) -> anyhow::Result<f64> {
    let (client, mut el) = rumqttc::AsyncClient::new(options("bench-raw", port), 1000);
    let payload = serde_json::to_vec(
        &json!({"id": "0123456789abcdef-1", "raw": 1, "kind": "access_granted",
        "at": Utc::now(), "local": Utc::now().to_rfc3339(), "historical": false, "payload": event(1).payload}),
    )?;
    let started = Instant::now();
    let publisher = tokio::spawn(async move {
        for _ in 0..N {
            client
                .publish(
                    topic.clone(),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    payload.clone(),
                )
                .await?;
        }
        anyhow::Ok(client)
    });
    let mut acks = 0;
    while acks < N {
        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = el.poll().await? {
            acks += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let _client = publisher.await??;
    Ok(N as f64 / secs)
}

/// Signed unlocks from a cloud client, each timed from publish until its result arrives.
async fn command_rtt(
    port: u16,
    topics: &Topics,
    signer: &ed25519_dalek::SigningKey,
) -> anyhow::Result<f64> {
    let (client, mut el) = rumqttc::AsyncClient::new(options("bench-cloud", port), 100);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    el.set_network_options(net);
    client
        .subscribe(
            format!("{}/cmd/+/result", topics.base()),
            rumqttc::QoS::AtLeastOnce,
        )
        .await?;
    loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) = el.poll().await? {
            break;
        }
    }
    let mut samples = Vec::with_capacity(200);
    for i in 0..220 {
        let now = Utc::now();
        let cmd = Cmd {
            v: 2,
            site: "site".into(),
            gateway: "gw".into(),
            id: format!("rtt-{i}"),
            name: "unlock".into(),
            issued_at: now,
            expires_at: now + chrono::Duration::minutes(1),
            target: Some(CommandTarget {
                unit: Some("U1".into()),
                entry: None,
                device: None,
                channel: None,
            }),
            args: serde_json::Value::Null,
        };
        let bytes = sign(&cmd, signer);
        let started = Instant::now();
        client
            .publish(
                format!("{}/cmd/unlock", topics.base()),
                rumqttc::QoS::AtLeastOnce,
                false,
                bytes,
            )
            .await?;
        let id = cmd.id.clone();
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = el.poll().await? {
                    let v: serde_json::Value = serde_json::from_slice(&p.payload)?;
                    if v["id"] == id.as_str() {
                        anyhow::ensure!(v["status"] == "done", "unlock result: {v}");
                        return anyhow::Ok(());
                    }
                }
            }
        })
        .await;
        got.context("no result within 10 s")??;
        // The first few warm the path (connections, caches); they are not counted.
        if i >= 20 {
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok(samples[((samples.len() as f64 * 0.99) as usize).min(samples.len() - 1)])
}

pub fn run() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async())
}

async fn run_async() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = Mosquitto::start(dir.path())?;

    let limits = LogLimits {
        max_events: 4_000_000,
        max_bytes: 4 << 30,
        max_age: chrono::Duration::days(30),
    };
    let store = Arc::new(Store::open_with(&dir.path().join("data"), limits)?);
    // A site with one unit whose lock is simulated: commands reach it through the router.
    store.apply(&gatehouse::sync::parse(&serde_json::to_vec(&json!({
        "schema_version": 1, "kind": "snapshot", "version": 1,
        "facility": {"time_zone": "America/New_York"},
        "units": [{"id": "U1", "status": "occupied", "controller": "lock-1"}]
    }))?)?)?;
    let signer = ed25519_dalek::SigningKey::from_bytes(&[21; 32]);
    let cfg = CloudConfig {
        host: "127.0.0.1".into(),
        port: broker.port,
        transport: Transport::Tcp,
        protocol: Protocol::V311,
        client_id: "bench-gateway".into(),
        topic_prefix: "bench".into(),
        keep_alive: Duration::from_secs(30),
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_millis(500),
        command_public: signer.verifying_key(),
        command_max_skew: Duration::from_secs(30),
        max_message_bytes: 64 * 1024,
        inflight: 100,
    };
    let topics = Topics::new("bench", "site", "gw");
    let counter = spawn_subscriber(broker.port, topics.events(), (N + BACKLOG + 1000) as usize);
    while counter.subscribed.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let raw_events_per_s = raw(broker.port, topics.events()).await?;
    let shutdown = CancellationToken::new();
    let commands = Arc::new(Commands {
        router: Arc::new(Router::new(
            Arc::new(SimulatedUnits::new(["lock-1"])),
            Arc::new(SimulatedRelays::new(Vec::<String>::new())),
        )),
        cfg: CommandConfig {
            public: signer.verifying_key(),
            site: "site".into(),
            gateway: "gw".into(),
            max_skew: chrono::Duration::seconds(30),
            max_bytes: 64 * 1024,
        },
    });
    let link = CloudLink::new(cfg, "site", "gw", store.clone(), 1, Some(commands));
    let link_task = tokio::spawn(link.run(shutdown.child_token()));

    // Durable: appends in flushed batches while the link drains.
    let started = Instant::now();
    let producer = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || append(&store, N, 100))
    };
    producer.await??;
    wait_empty(&store, Duration::from_secs(300)).await?;
    let durable_events_per_s = N as f64 / started.elapsed().as_secs_f64();

    // Backlog: the broker goes away, a million events pile up, the broker comes back.
    broker.kill();
    {
        let store = store.clone();
        tokio::task::spawn_blocking(move || append(&store, BACKLOG, 10_000)).await??;
    }
    let subscribed = counter.subscribed.load(Ordering::SeqCst);
    broker.restart()?;
    let back = Instant::now();
    // The counting subscriber re-subscribes first (it retries every 50 ms; the link backs off).
    while counter.subscribed.load(Ordering::SeqCst) == subscribed {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_empty(&store, Duration::from_secs(900)).await?;
    let drain_events_per_s = BACKLOG as f64 / back.elapsed().as_secs_f64();

    // Everything appended (plus the link's own status traffic, not counted) must have arrived.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lost = (N + BACKLOG).saturating_sub(counter.distinct.load(Ordering::SeqCst));

    let command_rtt_p99_ms = command_rtt(broker.port, &topics, &signer).await?;

    shutdown.cancel();
    let _ = link_task.await;
    println!(
        "{}",
        json!({
            "durable_events_per_s": durable_events_per_s.round(),
            "raw_events_per_s": raw_events_per_s.round(),
            "ratio": ((durable_events_per_s / raw_events_per_s) * 1000.0).round() / 1000.0,
            "backlog": BACKLOG,
            "drain_events_per_s": drain_events_per_s.round(),
            "lost": lost,
            "command_rtt_p99_ms": (command_rtt_p99_ms * 1000.0).round() / 1000.0,
        })
    );
    Ok(())
}
