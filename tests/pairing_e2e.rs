//! Installer pairing end to end (docs/pairing.md, issue 12) through the real daemon process
//! (`gatehouse run`) and real peers: a mosquitto over mutual TLS playing the cloud
//! (tests/support/broker.rs), the LibOSDP PD peer and the pymodbus peer on PTYs
//! (tests/peers/osdp_pd.py, modbus_dev.py) and the mock BlueZ on a private D-Bus
//! (tests/peers/bluez_mock.py).
//!
//! - Over MQTT with signed commands: install mode finds an unconfigured OSDP reader, an
//!   unconfigured Modbus sensor and an unknown BTHome sensor; each is adopted (the reader moved
//!   to a new address and keyed, then a code typed on it opens the gate; the sensor board moved
//!   to a new unit id and polled; the BTHome sensor reporting for its unit); refusals (outside
//!   install mode, unknown candidate, adopted twice) answer once with their reason; after a
//!   restart all three still run (and the configured devices neither go offline nor come
//!   online twice: the buses start with the adopted devices), no candidate survives and
//!   install mode is not resumed; a
//!   SIGHUP reload keeps them running; what `gatehouse devices export` prints, pasted into a
//!   config, loads; the published documents, events and results match their schemas.
//! - The same core flow through the `gatehouse` CLI on the daemon's control socket.

#[path = "support/broker.rs"]
mod broker;
mod common;
#[path = "support/daemon_e2e.rs"]
mod daemon_e2e;
#[path = "support/peers.rs"]
mod peers;

use std::path::Path;
use std::process::Command as Process;
use std::time::{Duration, Instant};

use broker::{Broker, Received, Subscriber};
use chrono::Utc;
use daemon_e2e::*;
use ed25519_dalek::SigningKey;
use gatehouse::cloud::commands::sign;
use gatehouse::cloud::messages::{Command as Cmd, Topics};
use peers::Peer;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
/// A full scan may have to run before a candidate shows (the machine is loaded).
const SCAN_WAIT: Duration = Duration::from_secs(120);

const KNOWN_SENSOR: &str = "3C:2E:F5:00:00:A1";
const NEW_SENSOR: &str = "3C:2E:F5:00:00:C1";

/// The cloud's side: signs and sends commands, reads their results.
struct Cloud<'a> {
    sub: &'a Subscriber,
    t: &'a Topics,
    signer: SigningKey,
}

impl Cloud<'_> {
    fn send(&self, name: &str, id: &str, args: Value) {
        let now = Utc::now();
        let cmd = Cmd {
            v: 2,
            site: "site-1".into(),
            gateway: "gw-1".into(),
            id: id.into(),
            name: name.into(),
            issued_at: now,
            expires_at: now + chrono::Duration::seconds(120),
            target: None,
            args,
        };
        self.sub
            .client
            .try_publish(
                format!("{}/cmd/{name}", self.t.base()),
                rumqttc::QoS::AtLeastOnce,
                false,
                sign(&cmd, &self.signer),
            )
            .unwrap();
    }

    /// The first result of command `id` (that there is exactly one is checked later, with
    /// [`Cloud::results_of`], once more messages have arrived).
    async fn result(&self, name: &str, id: &str, timeout: Duration) -> Value {
        let topic = format!("{}/cmd/{name}/result", self.t.base());
        let of = |m: &[Received]| -> Vec<Value> {
            m.iter()
                .filter(|x| x.topic == topic)
                .map(|x| x.json())
                .filter(|v| v["id"] == id)
                .collect()
        };
        wait_msgs(self.sub, &format!("the result of `{id}`"), timeout, |m| {
            of(m).into_iter().next()
        })
        .await
    }

    async fn run(&self, name: &str, id: &str, args: Value, timeout: Duration) -> Value {
        self.send(name, id, args);
        self.result(name, id, timeout).await
    }

    fn results_of(&self, id: &str) -> usize {
        let suffix = "/result";
        self.sub
            .messages()
            .iter()
            .filter(|x| x.topic.ends_with(suffix) && x.json()["id"] == id)
            .count()
    }
}

fn refused(r: &Value, reason: &str) {
    assert_eq!(
        (r["status"].as_str(), r["reason"].as_str()),
        (Some("refused"), Some(reason)),
        "{r}"
    );
}

fn done(r: &Value) {
    assert_eq!(r["status"], "done", "{r}");
}

fn coil_on(addr: u64, ch: u64) -> impl Fn(&Value) -> bool {
    move |e: &Value| e["ev"] == "coil" && e["addr"] == addr && e["index"] == ch && e["on"] == true
}

/// A code typed on PD `pd` (the peer's id) opens the gate: granted for `device` at gate-1,
/// and the gate relay (relay-board-1, channel 0) switches on.
async fn code_opens_the_gate(
    sub: &Subscriber,
    t: &Topics,
    osdp: &mut Peer,
    pd: u64,
    board: &Peer,
    device: &str,
) {
    let from = sub.messages().len();
    let b0 = board.len();
    let end = Instant::now() + WAIT;
    // Typed again every few seconds until granted: the reader may still be bringing its
    // secure channel up (its bus restarts when the adopted set runs).
    let mut typed = Instant::now() - Duration::from_secs(10);
    let granted = loop {
        if let Some(g) = events_of(&sub.messages(), t, from, "access_granted")
            .into_iter()
            .find(|e| e["payload"]["device"] == device)
        {
            break g;
        }
        assert!(
            Instant::now() < end,
            "no grant for `{device}` within {WAIT:?}"
        );
        if typed.elapsed() > Duration::from_secs(5) {
            osdp.send(json!({"op": "keys", "pd": pd, "digits": "123456#"}));
            typed = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(granted["payload"]["entry"], "gate-1", "{granted}");
    let end = Instant::now() + WAIT;
    while board.count_since(b0, coil_on(1, 0)) == 0 {
        if Instant::now() > end {
            let msgs = sub.messages();
            let events: Vec<&Received> = msgs.iter().filter(|m| m.topic == t.events()).collect();
            let seen: Vec<String> = events[events.len().saturating_sub(30)..]
                .iter()
                .map(|m| {
                    let v = m.json();
                    format!("{} {}", v["kind"], v["payload"])
                })
                .collect();
            panic!(
                "granted for `{device}`, but the gate relay did not switch within {WAIT:?}; \
                 the last events:\n{}",
                seen.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The pulse ends (so that the next grant is seen switching it on again).
    let off =
        |e: &Value| e["ev"] == "coil" && e["addr"] == 1 && e["index"] == 0 && e["on"] == false;
    peers::eventually("the gate relay off", WAIT, || {
        (board.count_since(b0, off) > 0).then_some(())
    });
}

/// `[[name]]` tables for `items` (TOML tables), each pasted as the config wants them.
fn tables(name: &str, items: Option<&toml::Value>) -> String {
    let mut out = String::new();
    for t in items.and_then(|v| v.as_array()).into_iter().flatten() {
        out += &format!("[[{name}]]\n{}\n", toml::to_string(t).unwrap());
    }
    out
}

/// Pastes what `gatehouse devices export` printed under the config's `[[bus]]` and `[ble]`
/// tables (as docs/pairing.md tells the installer) and checks that the config loads with them.
fn exported_config_loads(dir: &Path, export: &str, osdp: &Path, modbus: &Path) {
    let v: toml::Value = toml::from_str(export).unwrap_or_else(|e| panic!("{e}\n{export}"));
    let readers = tables("bus.reader", v.get("bus").and_then(|b| b.get("reader")));
    let devices = tables("bus.device", v.get("bus").and_then(|b| b.get("device")));
    let ble = tables("ble.device", v.get("ble").and_then(|b| b.get("device")));
    assert!(readers.contains("keypad-2"), "{export}");
    assert!(devices.contains("climate-1"), "{export}");
    assert!(ble.contains("temp-a103"), "{export}");
    let body = format!(
        "[site]\nid = \"site-1\"\ngateway_id = \"gw-1\"\n[storage]\ndata_dir = \"other\"\n\
         [ble]\nadapter = \"hci0\"\n{ble}{}{readers}{}{devices}",
        osdp_bus(osdp),
        modbus_bus(modbus)
    );
    let file = dir.join("pasted.toml");
    std::fs::write(&file, &body).unwrap();
    let c = gatehouse::config::Config::load(&file)
        .unwrap_or_else(|e| panic!("the exported devices do not load: {e}\n{body}"));
    assert_eq!(c.buses.len(), 2);
}

/// The pairing documents' candidate ids (the last `pairing/discovered` from index `from` on).
fn candidates(msgs: &[Received], t: &Topics, from: usize) -> Vec<String> {
    last_on(msgs, from, &t.pairing_discovered())
        .and_then(|d| {
            d["candidates"].as_array().map(|a| {
                a.iter()
                    .filter_map(|c| c["id"].as_str().map(String::from))
                    .collect()
            })
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_install_mode_finds_adopts_and_runs_a_reader_a_board_and_a_sensor_across_a_restart()
{
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = Topics::new("gatehouse", "site-1", "gw-1");
    let sub = Subscriber::connect(&broker, "cloud", "gatehouse/site-1/gw-1/#").await;
    let cloud = Cloud {
        sub: &sub,
        t: &t,
        signer: signer.clone(),
    };
    // The configured keypad at 0 and an unconfigured one at 5; the gate's relay board at 1 and
    // an unconfigured XY-MD02 at 7; the site's sensor and an unknown BTHome sensor.
    let (osdp_link, modbus_link) = (dir.path().join("osdp"), dir.path().join("modbus"));
    let mut osdp = Peer::start(
        "osdp_pd.py",
        &osdp_link,
        &["--pd", "0:install", "--pd", "5:install"].map(String::from),
    );
    let mut board = Peer::start(
        "modbus_dev.py",
        &modbus_link,
        &["--device", "1:relay8", "--device", "7:xymd02"].map(String::from),
    );
    let mut bluez = Peer::start_with(
        "bluez_mock.py",
        &[
            format!("--sensor={KNOWN_SENSOR}"),
            format!("--sensor={NEW_SENSOR}"),
            "--adv-interval-ms=500".into(),
        ],
    );
    let dbus = bluez.events()[0]["address"].as_str().unwrap().to_string();
    let cfg = write_config(
        dir.path(),
        &broker,
        &signer,
        &format!(
            "[ble]\nadapter = \"hci0\"\n{}{}",
            osdp_bus(&osdp_link),
            modbus_bus(&modbus_link)
        ),
    );
    let mut gw = daemon(&cfg, Some(&dbus));
    for d in ["keypad-gate-1", "relay-board-1"] {
        wait_event(&sub, &t, 0, "device_online", |p| p["device"] == d).await;
    }
    wait_msgs(&sub, "pairing/state (off)", WAIT, |m| {
        last_on(m, 0, &t.pairing_state()).filter(|s| s["active"] == false)
    })
    .await;
    code_opens_the_gate(&sub, &t, &mut osdp, 0, &board, "keypad-gate-1").await;

    // Outside install mode: refused, once, with the reason.
    let reader = json!({"candidate": "osdp:readers:5", "device": "keypad-2",
                        "entry": "gate-1", "direction": "in", "address": 6});
    refused(
        &cloud.run("adopt", "a-early", reader.clone(), WAIT).await,
        "not_in_install_mode",
    );

    // Signed install mode: active (retained), and the three candidates found and published.
    done(
        &cloud
            .run(
                "install_mode",
                "im-1",
                json!({"action": "start", "minutes": 30}),
                WAIT,
            )
            .await,
    );
    let state = wait_msgs(&sub, "pairing/state active", WAIT, |m| {
        last_on(m, 0, &t.pairing_state()).filter(|s| s["active"] == true)
    })
    .await;
    assert_eq!(state["started_by"], "command:im-1", "{state}");
    let wanted = [
        "osdp:readers:5",
        "modbus:io:7",
        &format!("ble:{NEW_SENSOR}"),
    ];
    wait_msgs(
        &sub,
        "the three candidates on pairing/discovered",
        SCAN_WAIT,
        |m| {
            let c = candidates(m, &t, 0);
            wanted
                .iter()
                .all(|w| c.iter().any(|x| x == w))
                .then_some(())
        },
    )
    .await;
    let found = candidates(&sub.messages(), &t, 0);
    for configured in [
        "osdp:readers:0",
        "modbus:io:1",
        &format!("ble:{KNOWN_SENSOR}"),
    ] {
        assert!(!found.iter().any(|c| c == configured), "{found:?}");
    }
    for w in wanted {
        let d = wait_event(&sub, &t, 0, "device_discovered", |p| p["id"] == w).await;
        assert!(d["payload"]["family"].is_string(), "{d}");
    }
    let disc = events_of(&sub.messages(), &t, 0, "device_discovered");
    let r5 = disc
        .iter()
        .find(|e| e["payload"]["id"] == "osdp:readers:5")
        .unwrap();
    assert_eq!(r5["payload"]["family"], "osdp_reader");
    assert_eq!(
        r5["payload"]["identity"]["pdid"]["serial"], "47480005",
        "{r5}"
    );

    // Recorded once each; the published documents and events match their schemas.
    for w in wanted {
        let n = events_of(&sub.messages(), &t, 0, "device_discovered")
            .iter()
            .filter(|e| e["payload"]["id"] == w)
            .count();
        assert_eq!(n, 1, "`{w}` recorded {n} times");
    }
    let msgs = sub.messages();
    check_schema(
        "mqtt-pairing-state.schema.json",
        &last_on(&msgs, 0, &t.pairing_state()).unwrap(),
    );
    check_schema(
        "mqtt-pairing-discovered.schema.json",
        &last_on(&msgs, 0, &t.pairing_discovered()).unwrap(),
    );
    for e in &disc {
        check_schema("mqtt-event.schema.json", e);
    }

    // Unknown candidate: refused.
    refused(
        &cloud
            .run(
                "adopt",
                "a-unknown",
                json!({"candidate": "osdp:readers:99",
                 "entry": "gate-1"}),
                WAIT,
            )
            .await,
        "unknown_candidate",
    );

    // The reader: moved to 6, keyed, adopted; its code opens the gate.
    let r = cloud
        .run("adopt", "a-reader", reader.clone(), SCAN_WAIT)
        .await;
    done(&r);
    let adopted = wait_event(&sub, &t, 0, "device_adopted", |p| p["device"] == "keypad-2").await;
    assert_eq!(
        adopted["payload"]["adopted_by"], "command:a-reader",
        "{adopted}"
    );
    assert_eq!(adopted["payload"]["settings"]["address"], 6, "{adopted}");
    osdp.wait_for("COMSET to 6", WAIT, |e| {
        e["ev"] == "comset_done" && e["pd"] == 5 && e["address"] == 6
    });
    osdp.wait_for("KEYSET", WAIT, |e| e["ev"] == "keyset" && e["pd"] == 5);
    code_opens_the_gate(&sub, &t, &mut osdp, 5, &board, "keypad-2").await;
    // Adopted twice: refused.
    refused(
        &cloud.run("adopt", "a-again", reader.clone(), WAIT).await,
        "already_adopted",
    );

    // The XY-MD02: moved to unit 30 and polled (online, readings).
    let from = sub.messages().len();
    let r = cloud
        .run(
            "adopt",
            "a-board",
            json!({"candidate": "modbus:io:7", "device": "climate-1",
             "profile": "xy-md02", "address": 30}),
            SCAN_WAIT,
        )
        .await;
    done(&r);
    board.wait_for("moved to 30", WAIT, |e| {
        e["ev"] == "address" && e["addr"] == 7 && e["to"] == 30
    });
    wait_event(&sub, &t, from, "device_online", |p| {
        p["device"] == "climate-1"
    })
    .await;
    wait_event(&sub, &t, from, "sensor_reading", |p| {
        p["device"] == "climate-1"
    })
    .await;

    // The BTHome sensor, to unit A-103: its readings arrive as events. 25.20 °C, packet 3.
    let from = sub.messages().len();
    let r = cloud
        .run(
            "adopt",
            "a-sensor",
            json!({"candidate": format!("ble:{NEW_SENSOR}"),
             "device": "temp-a103", "unit": "A-103"}),
            SCAN_WAIT,
        )
        .await;
    done(&r);
    bluez.send(json!({"op": "sensor", "mac": NEW_SENSOR, "hex": "400003016402D809"}));
    let reading = wait_event(&sub, &t, from, "sensor_reading", |p| {
        p["device"] == "temp-a103"
    })
    .await;
    assert_eq!(reading["payload"]["unit_id"], "A-103", "{reading}");
    let msgs = sub.messages();
    let adopted = events_of(&msgs, &t, 0, "device_adopted");
    assert_eq!(adopted.len(), 3, "{adopted:?}");
    for e in &adopted {
        check_schema("mqtt-event.schema.json", e);
    }
    for r in msgs.iter().filter(|m| m.topic.ends_with("/result")) {
        check_schema("mqtt-command-result.schema.json", &r.json());
    }
    // Exported as TOML and pasted under their tables, the adopted devices make a valid config.
    let (ok, export, err) = cli(&cfg, &["devices", "export"]).await;
    assert!(ok, "{err}");
    exported_config_loads(dir.path(), &export, &osdp_link, &modbus_link);
    for id in [
        "a-early",
        "a-unknown",
        "a-reader",
        "a-again",
        "a-board",
        "a-sensor",
    ] {
        assert_eq!(cloud.results_of(id), 1, "one result for `{id}`");
    }

    // Restart: install mode ends (shutdown), is not resumed; the three adopted devices run.
    stop(&mut gw);
    let from = sub.messages().len();
    let gw_from = from;
    let mut gw = daemon(&cfg, Some(&dbus));
    wait_event(&sub, &t, 0, "install_mode_ended", |p| {
        p["reason"] == "shutdown"
    })
    .await;
    for d in ["keypad-2", "climate-1", "keypad-gate-1", "relay-board-1"] {
        wait_event(&sub, &t, from, "device_online", |p| p["device"] == d).await;
    }
    wait_event(&sub, &t, from, "sensor_reading", |p| {
        p["device"] == "climate-1"
    })
    .await;
    code_opens_the_gate(&sub, &t, &mut osdp, 5, &board, "keypad-2").await;
    code_opens_the_gate(&sub, &t, &mut osdp, 0, &board, "keypad-gate-1").await;
    // The buses started with the adopted devices: the configured ones came online once and
    // never went offline (registering the provisioner restarted no bus).
    let msgs = sub.messages();
    for d in ["keypad-gate-1", "relay-board-1"] {
        let of = |kind| {
            events_of(&msgs, &t, from, kind)
                .iter()
                .filter(|e| e["payload"]["device"] == d)
                .count()
        };
        assert_eq!(
            (of("device_offline"), of("device_online")),
            (0, 1),
            "`{d}` after the restart: (offline, online) events"
        );
    }
    // The sensor: advertised (new packet ids) until heard by the new daemon.
    let end = Instant::now() + WAIT;
    let mut pid = 10u8;
    loop {
        if events_of(&sub.messages(), &t, from, "sensor_reading")
            .iter()
            .any(|e| e["payload"]["device"] == "temp-a103")
        {
            break;
        }
        assert!(
            Instant::now() < end,
            "no reading from temp-a103 after the restart"
        );
        bluez.send(json!({"op": "sensor", "mac": NEW_SENSOR,
                          "hex": format!("4000{pid:02x}016402D809")}));
        pid += 1;
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let state = wait_msgs(&sub, "pairing/state after the restart", WAIT, |m| {
        last_on(m, gw_from, &t.pairing_state())
    })
    .await;
    assert_eq!(state["active"], false, "install mode resumed: {state}");
    assert_eq!(state["registered"], 3, "{state}");
    let disc = wait_msgs(&sub, "pairing/discovered after the restart", WAIT, |m| {
        last_on(m, gw_from, &t.pairing_discovered())
    })
    .await;
    assert_eq!(
        disc["candidates"],
        json!([]),
        "a candidate survived: {disc}"
    );
    assert!(
        events_of(&sub.messages(), &t, from, "install_mode_started").is_empty(),
        "install mode started again"
    );
    // A configuration reload (SIGHUP, the file unchanged) keeps the adopted devices running.
    let from = sub.messages().len();
    let hup = Process::new("kill")
        .args(["-HUP", &gw.0.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_event(&sub, &t, from, "config_reloaded", |_| true).await;
    code_opens_the_gate(&sub, &t, &mut osdp, 5, &board, "keypad-2").await;
    // A new temperature (the peer knows the sensor by its first address).
    board.send(json!({"op": "temp", "addr": 7, "celsius": 26.0}));
    wait_event(&sub, &t, from, "sensor_reading", |p| {
        p["device"] == "climate-1" && p["value"] == 26.0
    })
    .await;
    // A new temperature too (an unchanged one is not reported again): 26.00 °C.
    bluez.send(json!({"op": "sensor", "mac": NEW_SENSOR, "hex": "4000F0016402280A"}));
    wait_event(&sub, &t, from, "sensor_reading", |p| {
        p["device"] == "temp-a103" && p["value"] == 26.0
    })
    .await;
    assert!(
        events_of(&sub.messages(), &t, from, "device_offline")
            .iter()
            .all(|e| e["payload"]["device"] != "keypad-2" && e["payload"]["device"] != "climate-1"),
        "an adopted device went offline at the reload"
    );
    // The registry survived (the reader is adopted already), and install mode is off: any
    // other adoption is refused as such.
    let again = json!({"candidate": "osdp:readers:5", "entry": "gate-1"});
    refused(
        &cloud.run("adopt", "a-late-1", again, WAIT).await,
        "already_adopted",
    );
    let other = json!({"candidate": "osdp:readers:9", "entry": "gate-1"});
    refused(
        &cloud.run("adopt", "a-late-2", other, WAIT).await,
        "not_in_install_mode",
    );
    for id in ["a-late-1", "a-late-2"] {
        assert_eq!(cloud.results_of(id), 1, "one result for `{id}`");
    }
    stop(&mut gw);
    bluez.send(json!({"op": "quit"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_on_the_daemons_control_socket_starts_install_mode_adopts_and_removes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = Topics::new("gatehouse", "site-1", "gw-1");
    let sub = Subscriber::connect(&broker, "cloud", "gatehouse/site-1/gw-1/#").await;
    let modbus_link = dir.path().join("modbus");
    let board = Peer::start(
        "modbus_dev.py",
        &modbus_link,
        &["--device", "1:relay8", "--device", "7:xymd02"].map(String::from),
    );
    let cfg = write_config(dir.path(), &broker, &signer, &modbus_bus(&modbus_link));
    let mut gw = daemon(&cfg, None);
    wait_event(&sub, &t, 0, "device_online", |p| {
        p["device"] == "relay-board-1"
    })
    .await;
    let end = Instant::now() + WAIT;
    loop {
        let (ok, out, err) = cli(&cfg, &["status"]).await;
        if ok {
            assert!(out.contains("install mode:  off"), "{out}");
            break;
        }
        assert!(
            Instant::now() < end,
            "the control socket never answered: {err}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, _, err) = cli(
        &cfg,
        &["pair", "adopt", "modbus:io:7", "--profile", "xy-md02"],
    )
    .await;
    assert!(!ok && err.contains("not_in_install_mode"), "{err}");

    let (ok, out, err) = cli(&cfg, &["install-mode", "start", "--minutes", "5"]).await;
    assert!(
        ok && out.contains("install mode active until"),
        "{out} {err}"
    );
    let end = Instant::now() + SCAN_WAIT;
    let listed = loop {
        let (ok, out, err) = cli(&cfg, &["pair", "list"]).await;
        assert!(ok, "{err}");
        if out.contains("modbus:io:7") {
            break out;
        }
        assert!(Instant::now() < end, "modbus:io:7 never listed: {out}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(listed.contains("modbus_device"), "{listed}");
    assert!(!listed.contains("modbus:io:1 "), "{listed}");

    let from = sub.messages().len();
    let (ok, out, err) = cli(
        &cfg,
        &[
            "pair",
            "adopt",
            "modbus:io:7",
            "--device",
            "climate-2",
            "--profile",
            "xy-md02",
            "--address",
            "31",
        ],
    )
    .await;
    assert!(ok && out.contains("adopted `climate-2`"), "{out} {err}");
    board.wait_for("moved to 31", WAIT, |e| {
        e["ev"] == "address" && e["addr"] == 7 && e["to"] == 31
    });
    let adopted = wait_event(&sub, &t, from, "device_adopted", |p| {
        p["device"] == "climate-2"
    })
    .await;
    assert!(
        adopted["payload"]["adopted_by"]
            .as_str()
            .is_some_and(|b| b.starts_with("local:")),
        "{adopted}"
    );
    wait_event(&sub, &t, from, "device_online", |p| {
        p["device"] == "climate-2"
    })
    .await;
    wait_event(&sub, &t, from, "sensor_reading", |p| {
        p["device"] == "climate-2"
    })
    .await;
    let (ok, out, _) = cli(&cfg, &["pair", "list"]).await;
    assert!(ok && out.contains("adopted climate-2"), "{out}");
    let (ok, _, err) = cli(
        &cfg,
        &["pair", "adopt", "modbus:io:7", "--profile", "xy-md02"],
    )
    .await;
    assert!(!ok && err.contains("already_adopted"), "{err}");
    let (ok, _, err) = cli(
        &cfg,
        &["pair", "adopt", "modbus:io:99", "--profile", "xy-md02"],
    )
    .await;
    assert!(!ok && err.contains("unknown_candidate"), "{err}");

    let (ok, out, err) = cli(&cfg, &["pair", "remove", "climate-2"]).await;
    assert!(ok && out.contains("removed `climate-2`"), "{out} {err}");
    wait_event(&sub, &t, from, "device_removed", |p| {
        p["device"] == "climate-2"
    })
    .await;
    let (ok, out, _) = cli(&cfg, &["pair", "list"]).await;
    assert!(ok && !out.contains("adopted climate-2"), "{out}");
    let (ok, _, err) = cli(&cfg, &["pair", "remove", "relay-board-1"]).await;
    assert!(!ok && err.contains("configured"), "{err}");
    let (ok, out, _) = cli(&cfg, &["install-mode", "stop"]).await;
    assert!(ok && out.contains("install mode stopped"), "{out}");
    wait_event(&sub, &t, from, "install_mode_ended", |p| {
        p["reason"] == "stopped"
    })
    .await;
    stop(&mut gw);
}
