//! The real bluer code path: the `gatehouse` daemon with `[ble] adapter = "hci0"` talks to a
//! mock BlueZ (`tests/peers/bluez_mock.py`: python-dbusmock's bluez5 template plus GATT
//! objects, on a private D-Bus system bus that the daemon reaches through
//! `DBUS_SYSTEM_BUS_ADDRESS`), and to a real mosquitto with mutual TLS where this test plays
//! the cloud: it sends signed commands, answers the gateway's unlock requests, and reads the
//! events. Discovery, connections, GATT reads, writes and notifications all go through bluer.

#[path = "support/broker.rs"]
mod broker;
mod common;
#[path = "support/peers.rs"]
mod peers;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use broker::{Broker, Received, Subscriber};
use chrono::Utc;
use ed25519_dalek::SigningKey;
use gatehouse::ble::noke;
use gatehouse::cloud::commands::sign;
use gatehouse::cloud::messages::{Command as Cmd, CommandTarget, Topics};
use peers::Peer;
use rumqttc::QoS;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
const LOCK_A101: &str = "D0:1F:A6:44:B3:01";
const LOCK_A102: &str = "D0:1F:A6:44:B3:02";
const SENSOR: &str = "3C:2E:F5:00:00:A1";
const FOB_EVE: &str = "C0:FF:EE:00:00:E1";

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_config(dir: &Path, b: &Broker, signer: &SigningKey) -> PathBuf {
    write_config_with(dir, b, signer, "")
}

/// The test config, with `ble_extra` at the end of its `[ble]` section.
fn write_config_with(dir: &Path, b: &Broker, signer: &SigningKey, ble_extra: &str) -> PathBuf {
    let snapshot = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo-snapshot.json");
    b.write_gateway_config(
        dir,
        "data",
        &signer.verifying_key(),
        "reconnect_min_ms = 200\n",
        &format!(
            "[access]\ninitial_snapshot = \"{}\"\n[log]\nlevel = \"debug\"\n[ble]\n\
             adapter = \"hci0\"\nfob_entries = [\"gate-1\"]\nfob_min_rssi = -80\n\
             online_unlock_timeout_ms = 2000\n{ble_extra}",
            snapshot.display()
        ),
    )
}

fn json_of(m: &Received) -> Value {
    serde_json::from_slice(&m.payload).unwrap_or(Value::Null)
}

/// The cloud's view: everything under the gateway's topics.
struct Cloud {
    sub: Subscriber,
    t: Topics,
    signer: SigningKey,
}

impl Cloud {
    async fn wait(&self, what: &str, pred: impl Fn(&Received) -> bool) -> Received {
        let found = self
            .sub
            .try_wait_for(|m| m.iter().any(&pred), WAIT)
            .await
            .unwrap_or_else(|| {
                let tail: Vec<String> = self
                    .sub
                    .messages()
                    .iter()
                    .rev()
                    .take(25)
                    .map(|m| format!("{} {}", m.topic, m.text()))
                    .collect();
                panic!(
                    "no {what} within {WAIT:?}; last messages:\n{}",
                    tail.join("\n")
                )
            });
        found.into_iter().find(|m| pred(m)).unwrap()
    }

    async fn event(&self, kind: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let topic = self.t.events();
        let m = self
            .wait(&format!("`{kind}` event"), |m| {
                m.topic == topic && {
                    let v = json_of(m);
                    v["kind"] == kind && pred(&v["payload"])
                }
            })
            .await;
        json_of(&m)
    }

    async fn command(&self, name: &str, id: &str, unit: &str, ttl_s: i64) {
        let now = Utc::now();
        let cmd = Cmd {
            v: 2,
            site: "site-1".into(),
            gateway: "gw-1".into(),
            id: id.into(),
            name: name.into(),
            issued_at: now,
            expires_at: now + chrono::Duration::seconds(ttl_s),
            target: Some(CommandTarget {
                unit: Some(unit.into()),
                entry: None,
                device: None,
                channel: None,
            }),
            args: Value::Null,
        };
        self.sub
            .client
            .publish(
                format!("{}/cmd/{name}", self.t.base()),
                QoS::AtLeastOnce,
                false,
                sign(&cmd, &self.signer),
            )
            .await
            .unwrap();
    }

    async fn result(&self, name: &str, id: &str, status: &str) -> Value {
        let topic = self.t.command_result(name);
        let m = self
            .wait(&format!("`{status}` result of {id}"), |m| {
                m.topic == topic && {
                    let v = json_of(m);
                    v["id"] == id && v["status"] == status
                }
            })
            .await;
        json_of(&m)
    }

    /// The `n`-th unlock request (0-based) the gateway sent.
    /// The `n`-th unlock request (from 0) for `device`: a command that was queued and run again
    /// (a padlock that dropped the link while the cloud was asked) adds requests of its own.
    async fn request_for(&self, device: &str, n: usize) -> Value {
        let topic = self.t.ble_unlock_request();
        let of = |m: &[Received]| {
            m.iter()
                .filter(|x| x.topic == topic)
                .map(json_of)
                .filter(|r| r["device"] == device)
                .collect::<Vec<_>>()
        };
        let found = self
            .sub
            .try_wait_for(|m| of(m).len() > n, WAIT)
            .await
            .unwrap_or_else(|| panic!("no unlock request #{n} for {device}"));
        of(&found).swap_remove(n)
    }

    async fn request(&self, n: usize) -> Value {
        let topic = self.t.ble_unlock_request();
        let found = self
            .sub
            .try_wait_for(|m| m.iter().filter(|x| x.topic == topic).count() > n, WAIT)
            .await
            .unwrap_or_else(|| panic!("no unlock request #{n}"));
        json_of(found.iter().filter(|x| x.topic == topic).nth(n).unwrap())
    }

    async fn answer(&self, request: &Value, commands: &str) {
        let resp = json!({"request_id": request["request_id"], "commands": commands});
        self.sub
            .client
            .publish(
                self.t.ble_unlock_response(),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&resp).unwrap(),
            )
            .await
            .unwrap();
    }
}

/// A command result's `at`.
fn at(r: &Value) -> chrono::DateTime<Utc> {
    serde_json::from_value(r["at"].clone()).unwrap()
}

fn packet(tag: u8) -> [u8; 20] {
    let mut p = [tag; 20];
    p[0] = 0x7E;
    p[3] = tag;
    p
}

/// The mock BlueZ with these devices, a broker, the cloud's subscriber and the daemon.
struct Site {
    bluez: Peer,
    cloud: Cloud,
    _daemon: Daemon,
    _broker: Broker,
    _dir: tempfile::TempDir,
}

async fn start(devices: &[String]) -> Site {
    let mut args = devices.to_vec();
    args.extend([
        "--adv-interval-ms=500".to_string(),
        "--connect-timeout-ms=2000".to_string(),
    ]);
    let bluez = Peer::start_with("bluez_mock.py", &args);
    let address = bluez.events()[0]["address"].as_str().unwrap().to_string();
    let b = Broker::start();
    let signer = SigningKey::from_bytes(&[5; 32]);
    let t = Topics::new("gatehouse", "site-1", "gw-1");
    let sub = Subscriber::connect(&b, "cloud", &format!("{}/#", t.base())).await;
    let cloud = Cloud { sub, t, signer };
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &b, &cloud.signer);
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let daemon = Daemon(
        Command::new(common::gatehouse_bin())
            .args(["run", "--config", cfg.to_str().unwrap()])
            .env("DBUS_SYSTEM_BUS_ADDRESS", &address)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    Site {
        bluez,
        cloud,
        _daemon: daemon,
        _broker: b,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn padlocks_sensors_and_fobs_through_bluer_and_a_mock_bluez() {
    let site = start(&[
        format!("--padlock={LOCK_A101}::000102030405060708090A0B0C0D0E0F"),
        format!("--padlock={LOCK_A102}::0F0E0D0C0B0A09080706050403020100"),
        format!("--sensor={SENSOR}"),
        format!("--fob={FOB_EVE}"),
    ])
    .await;
    let (mut bluez, cloud) = (site.bluez, site.cloud);
    // lock-a102 sleeps: not advertising, not connectable.
    bluez.send(json!({"op": "sleep", "mac": LOCK_A102, "shutdown": false}));

    // Discovery through bluer: the padlock, the BTHome sensor (its reading) and the fob (a
    // decision at the gate) are heard.
    cloud
        .event("device_online", |p| p["device"] == "lock-a101")
        .await;
    cloud
        .event("sensor_reading", |p| {
            p["device"] == "sensor-hall-a" && p["reading"] == "temperature" && p["value"] == 21.5
        })
        .await;
    cloud
        .event("access_granted", |p| p["credential_id"] == "c-eve-blefob")
        .await;
    let state_topic = cloud.t.device_state("lock-a101");
    cloud
        .wait("lock-a101's retained state", |m| {
            m.topic == state_topic && json_of(m)["online"] == true
        })
        .await;

    // Online unlock: the session goes to the cloud; its packets are written one by one.
    let (p1, p2) = (packet(0xA1), packet(0xA2));
    let server = noke::server_packet(&[0x42; 19]);
    bluez.send(json!({"op": "accept_packets", "mac": LOCK_A101,
        "packets": [hex::encode(p1), hex::encode(p2)], "server_packet": hex::encode(server)}));
    cloud.command("unlock", "u-online", "A-101", 60).await;
    let req = cloud.request(0).await;
    assert_eq!(req["device"], "lock-a101");
    assert_eq!(req["mac"], LOCK_A101);
    assert_eq!(req["action"], "unlock");
    // The session the gateway read over GATT is the one the lock made for this connection.
    let connected = bluez.wait_for("connected", WAIT, |e| {
        e["ev"] == "connected" && e["mac"] == LOCK_A101
    });
    assert_eq!(
        req["session"].as_str().unwrap().to_lowercase(),
        connected["session"].as_str().unwrap().to_lowercase()
    );
    let asked = Utc::now();
    cloud
        .answer(&req, &noke::format_command_packets(&[p1, p2]))
        .await;
    let r = cloud.result("unlock", "u-online", "done").await;
    assert!(r["detail"].as_str().unwrap().contains("online"), "{r}");
    // Stamped when the lock took the last packet, not when the command arrived.
    assert!(
        at(&r) >= asked,
        "{r} stamped before the cloud answered ({asked})"
    );
    bluez.wait_for("online unlock", WAIT, |e| {
        e["ev"] == "unlocked" && e["mac"] == LOCK_A101 && e["via"] == "online"
    });
    let writes: Vec<String> = bluez
        .events()
        .iter()
        .filter(|e| e["ev"] == "write" && e["mac"] == LOCK_A101)
        .map(|e| e["hex"].as_str().unwrap().to_lowercase())
        .collect();
    assert_eq!(writes, vec![hex::encode(p1), hex::encode(p2)]);
    let up = cloud
        .event("lock_upload", |p| p["device"] == "lock-a101")
        .await;
    assert_eq!(
        up["payload"]["packet"].as_str().unwrap().to_lowercase(),
        hex::encode(server)
    );

    // The cloud does not answer: the offline unlock, checked by the lock (key, checksum,
    // time).
    cloud.command("unlock", "u-offline", "A-101", 60).await;
    cloud.request(1).await;
    let r = cloud.result("unlock", "u-offline", "done").await;
    assert!(r["detail"].as_str().unwrap().contains("offline"), "{r}");
    bluez.wait_for("offline unlock", WAIT, |e| {
        e["ev"] == "unlocked" && e["mac"] == LOCK_A101 && e["via"] == "offline"
    });

    // A sleeping padlock: the unlock is queued, and delivered when the padlock wakes.
    cloud.command("unlock", "u-sleeper", "A-102", 120).await;
    cloud.result("unlock", "u-sleeper", "queued").await;
    bluez.send(json!({"op": "wake", "mac": LOCK_A102}));
    let req = cloud.request_for("lock-a102", 0).await;
    assert_eq!(req["device"], "lock-a102");
    // This time the cloud answers with nothing useful: the lock gets the offline unlock.
    let r = cloud.result("unlock", "u-sleeper", "done").await;
    assert!(r["detail"].as_str().unwrap().contains("offline"), "{r}");
    bluez.wait_for("sleeper unlocked", WAIT, |e| {
        e["ev"] == "unlocked" && e["mac"] == LOCK_A102
    });

    // The adapter is power-cycled (as `bluetoothctl power off/on` or a reset): discovery ends,
    // and the gateway starts it again by itself; new data flows.
    bluez.send(json!({"op": "power", "on": false}));
    bluez.wait_for("discovery stopped", WAIT, |e| {
        e["ev"] == "discovery" && e["state"] == "stopped"
    });
    bluez.send(json!({"op": "power", "on": true}));
    peers::eventually("discovery started again", WAIT, || {
        let starts = bluez
            .events()
            .iter()
            .filter(|e| e["ev"] == "discovery" && e["state"] == "started")
            .count();
        (starts >= 2).then_some(())
    });
    // Packet 2: 23.00 °C.
    bluez.send(json!({"op": "sensor", "mac": SENSOR, "hex": "400002016402FC08"}));
    cloud
        .event("sensor_reading", |p| {
            p["device"] == "sensor-hall-a" && p["value"] == 23.0
        })
        .await;

    // bluetoothd restarts: org.bluez leaves the bus with every object it exported, and comes
    // back with a fresh adapter. The gateway's scan ends, discovery is started again by
    // itself, and both advertisements and connections work through the new bluetoothd.
    bluez.send(json!({"op": "restart", "down_ms": 300}));
    bluez.wait_for("bluetoothd back", WAIT, |e| {
        e["ev"] == "restarted" && e["phase"] == "up"
    });
    let restarted_at = bluez.len();
    peers::eventually("discovery started after the restart", WAIT, || {
        let starts = bluez
            .events()
            .iter()
            .filter(|e| e["ev"] == "discovery" && e["state"] == "started")
            .count();
        (starts >= 3).then_some(())
    });
    // Packet 3: 25.20 °C.
    bluez.send(json!({"op": "sensor", "mac": SENSOR, "hex": "400003016402D809"}));
    cloud
        .event("sensor_reading", |p| {
            p["device"] == "sensor-hall-a" && p["value"] == 25.2
        })
        .await;
    // The cloud does not answer: an offline unlock over a connection to the new bluetoothd.
    cloud
        .command("unlock", "u-after-restart", "A-101", 60)
        .await;
    let r = cloud.result("unlock", "u-after-restart", "done").await;
    assert!(r["detail"].as_str().unwrap().contains("offline"), "{r}");
    peers::eventually("offline unlock after the restart", WAIT, || {
        let n = bluez.count_since(restarted_at, |e| {
            e["ev"] == "unlocked" && e["mac"] == LOCK_A101 && e["via"] == "offline"
        });
        (n >= 1).then_some(())
    });
    bluez.send(json!({"op": "quit"}));
}

/// A padlock that refuses the cloud's packets but takes the offline unlock; one that goes to
/// sleep while the gateway waits for the cloud's packets; one whose clock was reset.
#[tokio::test(flavor = "multi_thread")]
async fn padlock_faults_through_bluer_and_a_mock_bluez() {
    let site = start(&[format!(
        "--padlock={LOCK_A101}::000102030405060708090A0B0C0D0E0F"
    )])
    .await;
    let (mut bluez, cloud) = (site.bluez, site.cloud);
    cloud
        .event("device_online", |p| p["device"] == "lock-a101")
        .await;

    // The lock refuses the cloud's list (0x61): the offline unlock follows on the same link,
    // and the result says both.
    let (p1, p2) = (packet(0xD1), packet(0xD2));
    bluez.send(json!({"op": "config", "mac": LOCK_A101, "refuse_packets": [hex::encode(p1)]}));
    cloud.command("unlock", "u-refused", "A-101", 60).await;
    let req = cloud.request(0).await;
    let asked = Utc::now();
    cloud
        .answer(&req, &noke::format_command_packets(&[p1, p2]))
        .await;
    let r = cloud.result("unlock", "u-refused", "done").await;
    let detail = r["detail"].as_str().unwrap();
    assert!(detail.starts_with("unlocked (offline"), "{r}");
    assert!(
        detail.contains("the lock refused the cloud's packets (invalid_key to packet 1 of 2)"),
        "{r}"
    );
    assert!(at(&r) >= asked, "{r}");
    bluez.wait_for("refused, then the offline unlock", WAIT, |e| {
        e["ev"] == "unlocked" && e["mac"] == LOCK_A101 && e["via"] == "offline"
    });
    assert!(
        bluez
            .events()
            .iter()
            .any(|e| e["ev"] == "invalid_packet" && e["reason"] == "refused"),
        "the cloud's packet was written and refused"
    );

    // It goes to sleep (0x64, its idle timeout) after the session read, before anything is
    // written, while the gateway waits for the cloud: the command is queued at once, and
    // carried out when it wakes. It says so at once, before BlueZ answers StartNotify: in the
    // gap before bluer listens, so the gateway must catch it up from the `Value` property.
    bluez.send(
        json!({"op": "config", "mac": LOCK_A101, "falls_asleep": {"shutdown": true, "ms": 0}}),
    );
    let writes_before = bluez.events().iter().filter(|e| e["ev"] == "write").count();
    cloud.command("unlock", "u-sleepy", "A-101", 120).await;
    cloud.request(1).await;
    cloud.result("unlock", "u-sleepy", "queued").await;
    let shutdown = cloud
        .event("lock_result", |p| p["result"] == "shutdown")
        .await;
    assert_eq!(shutdown["payload"]["via"], "waiting", "{shutdown}");
    assert_eq!(
        bluez.events().iter().filter(|e| e["ev"] == "write").count(),
        writes_before,
        "nothing written to the sleeping lock"
    );
    bluez.send(json!({"op": "wake", "mac": LOCK_A101}));
    cloud.request(2).await;
    let r = cloud.result("unlock", "u-sleepy", "done").await;
    assert!(r["detail"].as_str().unwrap().contains("offline"), "{r}");

    // Its battery was changed: its clock restarted two hours behind. The site database's key
    // opened it before; now the offline unlock is refused, and the event says the clock is
    // suspect.
    bluez.send(json!({"op": "config", "mac": LOCK_A101, "clock_offset_s": -7200}));
    cloud.command("unlock", "u-clock", "A-101", 60).await;
    cloud.request(3).await;
    let r = cloud.result("unlock", "u-clock", "failed").await;
    assert!(r["detail"].as_str().unwrap().contains("clock"), "{r}");
    let refused = cloud
        .event("lock_result", |p| {
            p["result"] == "invalid_key" && p["via"] == "offline"
        })
        .await;
    let p = &refused["payload"];
    assert_eq!(p["clock_suspect"], true, "{refused}");
    assert_eq!(p["key"], "site_database", "{refused}");
    assert!(p["key_worked_at"].is_string(), "{refused}");
    bluez.wait_for("refused for its time", WAIT, |e| {
        e["ev"] == "invalid_packet" && e["reason"] == "time"
    });
    bluez.send(json!({"op": "quit"}));
}

/// SIGHUP to the daemon: the `[[ble.device]]` of the new file run at once (no restart, the
/// scanner untouched), an invalid one refused with nothing changed.
#[tokio::test(flavor = "multi_thread")]
async fn a_sighup_applies_ble_devices_live() {
    const PORCH: &str = "3C:2E:F5:00:00:C1";
    let site = start(&[format!("--sensor={PORCH}")]).await;
    let (mut bluez, cloud) = (site.bluez, site.cloud);
    let dir = site._dir.path().to_path_buf();
    let pid = site._daemon.0.id();
    bluez.wait_for("discovery", WAIT, |e| {
        e["ev"] == "discovery" && e["state"] == "started"
    });
    let hup = || {
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        )
    };
    let device = format!(
        "[[ble.device]]\nid = \"porch\"\nkind = \"sensor\"\nmac = \"{PORCH}\"\nzone = \"zone-a\"\n"
    );
    write_config_with(&dir, &site._broker, &cloud.signer, &device);
    hup();
    let reloaded = cloud
        .event("config_reloaded", |p| {
            p["changed"]
                .as_array()
                .is_some_and(|c| c.iter().any(|x| x == "ble.device"))
        })
        .await;
    assert_eq!(
        reloaded["payload"]["restart_needed"],
        json!([]),
        "{reloaded}"
    );
    // Packet 2: 23.00 °C, now the configured sensor's.
    bluez.send(json!({"op": "sensor", "mac": PORCH, "hex": "400002016402FC08"}));
    let r = cloud
        .event("sensor_reading", |p| {
            p["device"] == "porch" && p["value"] == 23.0
        })
        .await;
    assert_eq!(r["payload"]["zone"], "zone-a", "{r}");

    // A bad MAC: refused, and the sensor goes on.
    write_config_with(
        &dir,
        &site._broker,
        &cloud.signer,
        &device.replace(PORCH, "3C:2E:F5:00:00"),
    );
    hup();
    let refused = cloud.event("config_reload_refused", |_| true).await;
    assert!(
        refused["payload"]["reason"]
            .as_str()
            .unwrap()
            .contains("not a MAC address"),
        "{refused}"
    );
    // Packet 3: 25.20 °C.
    bluez.send(json!({"op": "sensor", "mac": PORCH, "hex": "400003016402D809"}));
    cloud
        .event("sensor_reading", |p| {
            p["device"] == "porch" && p["value"] == 25.2
        })
        .await;
    bluez.send(json!({"op": "quit"}));
}
