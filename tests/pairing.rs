//! Installer pairing (docs/pairing.md): install mode over signed commands against a real
//! mosquitto with mutual TLS (tests/support), candidates reported through the `Scan` handle the
//! drivers get, adoption with a test provisioner, the registry across a restart and against the
//! config, expiry and stop, and the same flow through the control socket and the `gatehouse`
//! CLI.

#[path = "support/broker.rs"]
mod broker;
mod common;

use std::path::Path;
use std::process::Command as Process;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker::{Broker, Subscriber};
use chrono::Utc;
use common::gatehouse_bin;
use ed25519_dalek::SigningKey;
use futures::future::BoxFuture;
use gatehouse::cloud::commands::{CommandConfig, NoDevices, Router, sign};
use gatehouse::cloud::link::{CloudLink, Commands};
use gatehouse::cloud::messages::{Command as Cmd, Topics};
use gatehouse::config::{CloudConfig, Protocol, Transport};
use gatehouse::pairing::registry::InUse;
use gatehouse::pairing::{
    AdoptSpec, Candidate, Family, PairReason, Pairing, Provisioner, Registered, Scan, ScanOptions,
};
use gatehouse::store::Store;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// Simulates the RS-485 side's provisioning: an OSDP reader needs an entry; a Modbus device a
/// profile. Records what it was asked and the sets it was told to run.
#[derive(Default)]
struct TestProvisioner {
    adopted: Mutex<Vec<String>>,
    runs: Mutex<Vec<Vec<String>>>,
    fail_next: Mutex<Option<String>>,
}

impl Provisioner for TestProvisioner {
    fn families(&self) -> &'static [Family] {
        &[Family::OsdpReader, Family::ModbusDevice]
    }
    fn adopt<'a>(
        &'a self,
        candidate: &'a Candidate,
        spec: &'a AdoptSpec,
    ) -> BoxFuture<'a, Result<Registered, String>> {
        Box::pin(async move {
            if let Some(e) = self.fail_next.lock().unwrap().take() {
                return Err(e);
            }
            let address = spec.address.or(candidate.address);
            let settings = match candidate.family {
                Family::OsdpReader => {
                    let entry = spec.entry.clone().ok_or("an OSDP reader needs an entry")?;
                    json!({"address": address, "entry": entry,
                           "direction": spec.direction.clone().unwrap_or("in".into()),
                           "secure": "key"})
                }
                _ => {
                    let profile = spec
                        .profile
                        .clone()
                        .ok_or("a Modbus device needs a profile")?;
                    json!({"address": address, "profile": profile, "inputs": spec.inputs})
                }
            };
            self.adopted.lock().unwrap().push(candidate.id.clone());
            Ok(Registered {
                id: spec.device.clone().unwrap_or_default(),
                candidate: candidate.id.clone(),
                family: candidate.family,
                bus: candidate.bus.clone(),
                settings,
                adopted_at: Utc::now(),
                adopted_by: String::new(),
                replaces: None,
            })
        })
    }
    fn run(&self, registered: &[Registered]) -> Result<(), String> {
        self.runs
            .lock()
            .unwrap()
            .push(registered.iter().map(|r| r.id.clone()).collect());
        Ok(())
    }
}

impl TestProvisioner {
    fn last_run(&self) -> Vec<String> {
        self.runs
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

/// The config declares reader `r1` at address 1 on bus `bus-1`.
fn configured() -> Vec<InUse> {
    vec![InUse {
        id: "r1".into(),
        bus: Some("bus-1".into()),
        address: Some(1),
        mac: None,
        family: Some(Family::OsdpReader),
        place: "config `gatehouse.toml`, [[bus]] `bus-1`, [[bus.reader]] `r1`".into(),
    }]
}

fn osdp(bus: &str, address: u8) -> Candidate {
    Candidate {
        id: Candidate::osdp_id(bus, address),
        family: Family::OsdpReader,
        bus: Some(bus.into()),
        address: Some(address),
        baud: Some(9600),
        mac: None,
        rssi: None,
        identity: json!({"pdid": {"vendor": "0A0B0C", "serial": "0000BEEF"}}),
        first_seen: Utc::now(),
        last_seen: Utc::now(),
    }
}

fn modbus(bus: &str, unit: u8) -> Candidate {
    Candidate {
        id: Candidate::modbus_id(bus, unit),
        family: Family::ModbusDevice,
        bus: Some(bus.into()),
        address: Some(unit),
        baud: Some(9600),
        mac: None,
        rssi: None,
        identity: json!({"profiles": ["waveshare-relay-8"]}),
        first_seen: Utc::now(),
        last_seen: Utc::now(),
    }
}

/// The kinds and payloads of the events in the store's log.
fn logged(store: &Store) -> Vec<(String, Value)> {
    store
        .events()
        .read_raw_from(0, 100_000)
        .unwrap()
        .into_iter()
        .map(|(_, raw)| {
            let v: Value = serde_json::from_slice(&raw).unwrap();
            (v["kind"].as_str().unwrap_or_default().to_string(), v)
        })
        .collect()
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let end = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn cloud_config(b: &Broker, signer: &SigningKey) -> CloudConfig {
    let files = b.client("gw-1");
    CloudConfig {
        host: "127.0.0.1".into(),
        port: b.port(),
        transport: Transport::Tls {
            ca_file: Some(files.ca),
            use_system_roots: false,
            cert_file: files.cert,
            key_file: files.key,
        },
        protocol: Protocol::V311,
        client_id: "site-1-gw-1".into(),
        topic_prefix: "gatehouse".into(),
        keep_alive: Duration::from_secs(5),
        reconnect_min: Duration::from_millis(1500),
        reconnect_max: Duration::from_millis(3000),
        command_public: signer.verifying_key(),
        command_max_skew: Duration::from_secs(30),
        max_message_bytes: 16 * 1024,
        inflight: 50,
    }
}

fn command(name: &str, id: &str, args: Value, issued: i64) -> Cmd {
    let now = Utc::now();
    Cmd {
        v: 2,
        site: "site-1".into(),
        gateway: "gw-1".into(),
        id: id.into(),
        name: name.into(),
        issued_at: now + chrono::Duration::seconds(issued),
        expires_at: now + chrono::Duration::seconds(issued + 60),
        target: None,
        args,
    }
}

fn last_on(sub: &Subscriber, topic: &str) -> Option<Value> {
    sub.messages()
        .iter()
        .rev()
        .find(|m| m.topic == topic)
        .map(|m| m.json())
}

/// Validates `doc` against `docs/schemas/<schema>` with the test venv's jsonschema.
fn check_schema(schema: &str, doc: &Value) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "no venv at {}: run `make venv`",
        python.display()
    );
    let o = Process::new(python)
        .args([
            "-c",
            "import json, sys\n\
             from jsonschema import Draft202012Validator\n\
             Draft202012Validator(json.load(open(sys.argv[1]))).validate(json.loads(sys.argv[2]))",
        ])
        .arg(root.join("docs/schemas").join(schema))
        .arg(doc.to_string())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{schema}: {doc}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_install_mode_discovery_adoption_and_restart_over_mqtt() {
    let b = Broker::start();
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = Topics::new("gatehouse", "site-1", "gw-1");
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 100_000).unwrap());
    let prov = Arc::new(TestProvisioner::default());
    let pairing = Pairing::open(store.clone(), configured(), vec![prov.clone()]).unwrap();
    assert_eq!(prov.last_run(), Vec::<String>::new(), "run at start, empty");
    let stop = CancellationToken::new();
    let timer = tokio::spawn(pairing.clone().run(stop.child_token()));
    let commands = Arc::new(Commands {
        router: Arc::new(
            Router::new(Arc::new(NoDevices), Arc::new(NoDevices)).with_pairing(pairing.clone()),
        ),
        cfg: CommandConfig {
            public: signer.verifying_key(),
            site: "site-1".into(),
            gateway: "gw-1".into(),
            max_skew: chrono::Duration::seconds(30),
            max_bytes: 16 * 1024,
        },
    });
    let pair_sub = Subscriber::connect(&b, "cloud-p", &format!("{}/pairing/#", t.base())).await;
    let results = Subscriber::connect(&b, "cloud-r", &format!("{}/cmd/+/result", t.base())).await;
    let events = Subscriber::connect(&b, "cloud-e", &t.events()).await;
    let link = CloudLink::new(
        cloud_config(&b, &signer),
        "site-1",
        "gw-1",
        store.clone(),
        1,
        Some(commands),
    )
    .with_pairing(pairing.clone());
    let link_stop = CancellationToken::new();
    let link_task = tokio::spawn(link.run(link_stop.child_token()));
    let state_topic = t.pairing_state();
    let disc_topic = t.pairing_discovered();
    pair_sub
        .wait_for(|m| m.iter().any(|x| x.topic == state_topic), WAIT)
        .await;
    assert_eq!(last_on(&pair_sub, &state_topic).unwrap()["active"], false);

    let cloud = Subscriber::connect(&b, "cloud-pub", "none/#").await;
    let send = |name: &str, bytes: Vec<u8>| {
        cloud
            .client
            .try_publish(
                format!("{}/cmd/{name}", t.base()),
                rumqttc::QoS::AtLeastOnce,
                false,
                bytes,
            )
            .unwrap();
    };
    let result_of = |id: &str| {
        let id = id.to_string();
        let results = &results;
        async move {
            let m = results
                .wait_for(|m| m.iter().any(|x| x.json()["id"] == id.as_str()), WAIT)
                .await;
            m.iter()
                .find(|x| x.json()["id"] == id.as_str())
                .unwrap()
                .json()
        }
    };
    let adopt_args = json!({"candidate": "osdp:bus-1:5", "device": "keypad-2",
                            "entry": "gate-1", "direction": "out"});

    // Outside install mode: refused, nothing changed.
    send(
        "adopt",
        sign(&command("adopt", "a-0", adopt_args.clone(), 0), &signer),
    );
    let r = result_of("a-0").await;
    assert_eq!(
        (r["status"].as_str(), r["reason"].as_str()),
        (Some("refused"), Some("not_in_install_mode")),
        "{r}"
    );

    // Signed install_mode start: the state goes active (after install_mode_started is durable).
    send(
        "install_mode",
        sign(
            &command(
                "install_mode",
                "im-1",
                json!({"action": "start", "minutes": 30}),
                0,
            ),
            &signer,
        ),
    );
    assert_eq!(result_of("im-1").await["status"], "done");
    pair_sub
        .wait_for(
            |m| {
                m.iter()
                    .any(|x| x.topic == state_topic && x.json()["active"] == true)
            },
            WAIT,
        )
        .await;
    let st = last_on(&pair_sub, &state_topic).unwrap();
    assert_eq!(st["started_by"], "command:im-1");
    assert!(pairing.active().is_some(), "the drivers see install mode");

    // A driver reports candidates through its Scan handle.
    let scan: Arc<dyn Scan> = pairing.clone();
    scan.progress("osdp:bus-1@9600", 0, 126);
    scan.discovered(osdp("bus-1", 5));
    scan.discovered(osdp("bus-1", 5)); // the same device again: one candidate
    scan.discovered(modbus("bus-2", 7));
    pair_sub
        .wait_for(
            |m| {
                m.iter().any(|x| {
                    x.topic == disc_topic
                        && x.json()["candidates"].as_array().map_or(0, |a| a.len()) == 2
                })
            },
            WAIT,
        )
        .await;
    // What the gateway publishes matches the documented schemas.
    check_schema(
        "mqtt-pairing-state.schema.json",
        &last_on(&pair_sub, &state_topic).unwrap(),
    );
    check_schema(
        "mqtt-pairing-discovered.schema.json",
        &last_on(&pair_sub, &disc_topic).unwrap(),
    );
    let discovered = logged(&store)
        .into_iter()
        .filter(|(k, _)| k == "device_discovered")
        .count();
    assert!(discovered <= 2, "device_discovered once per candidate");

    // Refusals, each with its reason; nothing changes.
    let other = SigningKey::from_bytes(&[2; 32]);
    let cases = [
        (
            "a-1",
            sign(&command("adopt", "a-1", adopt_args.clone(), 0), &other),
            "bad_signature",
        ),
        (
            "a-2",
            sign(&command("adopt", "a-2", adopt_args.clone(), -120), &signer),
            "expired",
        ),
        (
            "a-3",
            sign(
                &command(
                    "adopt",
                    "a-3",
                    json!({"candidate": "osdp:bus-1:99", "entry": "gate-1"}),
                    0,
                ),
                &signer,
            ),
            "unknown_candidate",
        ),
        (
            "a-4",
            sign(
                &command(
                    "adopt",
                    "a-4",
                    json!({"candidate": "osdp:bus-1:5", "device": "r1", "entry": "gate-1"}),
                    0,
                ),
                &signer,
            ),
            "in_use",
        ),
        (
            "a-5",
            sign(
                &command(
                    "adopt",
                    "a-5",
                    json!({"candidate": "osdp:bus-1:5", "address": 1, "entry": "gate-1"}),
                    0,
                ),
                &signer,
            ),
            "in_use",
        ),
        (
            "a-6",
            sign(
                &command(
                    "adopt",
                    "a-6",
                    json!({"candidate": "osdp:bus-1:5", "pin": "1234"}),
                    0,
                ),
                &signer,
            ),
            "bad_args",
        ),
        (
            "a-7",
            sign(
                &command("adopt", "a-7", json!({"candidate": "osdp:bus-1:5"}), 0),
                &signer,
            ),
            "provisioning_failed",
        ),
    ];
    for (id, bytes, reason) in cases {
        send("adopt", bytes);
        let r = result_of(id).await;
        assert_eq!(r["reason"], reason, "{id}: {r}");
    }
    assert!(
        store.registry_list().unwrap().is_empty(),
        "nothing adopted by a refusal"
    );

    let a8 = sign(&command("adopt", "a-8", adopt_args.clone(), 0), &signer);
    // The adoption: done, in the registry (on disk), run, recorded with who asked.
    send("adopt", a8.clone());
    let r = result_of("a-8").await;
    assert_eq!(r["status"], "done", "{r}");
    // The same signed message again (a replay, a redelivery): answered with the stored result,
    // not executed twice.
    send("adopt", a8);
    results
        .wait_for(
            |m| m.iter().filter(|x| x.json()["id"] == "a-8").count() == 2,
            WAIT,
        )
        .await;
    assert_eq!(prov.adopted.lock().unwrap().len(), 1, "provisioned once");
    let reg = store.registry_list().unwrap();
    assert_eq!(reg.len(), 1);
    assert_eq!(reg[0].id, "keypad-2");
    assert_eq!(reg[0].adopted_by, "command:a-8");
    assert_eq!(reg[0].settings["entry"], "gate-1");
    assert_eq!(prov.last_run(), vec!["keypad-2".to_string()]);
    let adopted = events
        .wait_for(
            |m| m.iter().any(|x| x.json()["kind"] == "device_adopted"),
            WAIT,
        )
        .await;
    let ev = adopted
        .iter()
        .find(|x| x.json()["kind"] == "device_adopted")
        .unwrap()
        .json();
    assert_eq!(ev["payload"]["adopted_by"], "command:a-8", "{ev}");
    assert_eq!(ev["payload"]["device"], "keypad-2");

    // Twice: refused. The adopted candidate is no longer listed, nor taken again from a driver.
    send(
        "adopt",
        sign(&command("adopt", "a-9", adopt_args.clone(), 0), &signer),
    );
    assert_eq!(result_of("a-9").await["reason"], "already_adopted");
    scan.discovered(osdp("bus-1", 5));
    assert!(pairing.candidates().iter().all(|c| c.id != "osdp:bus-1:5"));

    // Replace: a new reader takes over keypad-2 (same id by default).
    scan.discovered(osdp("bus-1", 6));
    wait_until("candidate 6 recorded", || {
        pairing.candidates().iter().any(|c| c.id == "osdp:bus-1:6")
    })
    .await;
    send(
        "adopt",
        sign(
            &command(
                "adopt",
                "a-10",
                json!({"candidate": "osdp:bus-1:6", "entry": "gate-1", "replaces": "keypad-2"}),
                0,
            ),
            &signer,
        ),
    );
    let r = result_of("a-10").await;
    assert_eq!(r["status"], "done", "{r}");
    let reg = store.registry_list().unwrap();
    assert_eq!(
        (reg.len(), reg[0].id.as_str(), reg[0].candidate.as_str()),
        (1, "keypad-2", "osdp:bus-1:6")
    );

    // Stop: install mode ends, candidates are forgotten.
    send(
        "install_mode",
        sign(
            &command("install_mode", "im-2", json!({"action": "stop"}), 0),
            &signer,
        ),
    );
    assert_eq!(result_of("im-2").await["status"], "done");
    pair_sub
        .wait_for(
            |m| {
                m.iter()
                    .rev()
                    .find(|x| x.topic == disc_topic)
                    .is_some_and(|x| {
                        x.json()["active"] == false && x.json()["candidates"] == json!([])
                    })
            },
            WAIT,
        )
        .await;
    assert!(pairing.active().is_none());
    assert!(pairing.candidates().is_empty());
    let ended = events
        .wait_for(
            |m| m.iter().any(|x| x.json()["kind"] == "install_mode_ended"),
            WAIT,
        )
        .await;
    let ev = ended
        .iter()
        .find(|x| x.json()["kind"] == "install_mode_ended")
        .unwrap()
        .json();
    assert_eq!(ev["payload"]["reason"], "stopped");
    assert_eq!(ev["payload"]["stopped_by"], "command:im-2");
    // A driver's late report is ignored.
    scan.discovered(osdp("bus-1", 9));
    assert!(pairing.candidates().is_empty());

    // Remove, signed: unknown and configured devices refused.
    send(
        "remove",
        sign(
            &command("remove", "rm-1", json!({"device": "r1"}), 0),
            &signer,
        ),
    );
    assert_eq!(result_of("rm-1").await["reason"], "configured");
    send(
        "remove",
        sign(
            &command("remove", "rm-2", json!({"device": "nope"}), 0),
            &signer,
        ),
    );
    assert_eq!(result_of("rm-2").await["reason"], "unknown_device");

    link_stop.cancel();
    let _ = tokio::time::timeout(WAIT, link_task).await;
    stop.cancel();
    let _ = tokio::time::timeout(WAIT, timer).await;
    drop((pairing, scan));
    // The link's command threads let go of the store when they end.
    wait_until("the store released", || Arc::strong_count(&store) == 1).await;
    drop(store);

    // Restart: the registry is still there and merged (run with it at start); install mode off.
    let store = Arc::new(Store::open(dir.path(), 100_000).unwrap());
    let prov2 = Arc::new(TestProvisioner::default());
    let pairing = Pairing::open(store.clone(), configured(), vec![prov2.clone()]).unwrap();
    assert_eq!(prov2.last_run(), vec!["keypad-2".to_string()]);
    assert!(pairing.active().is_none());
    assert_eq!(pairing.documents().0["registered"], 1);
    drop(pairing);
    // A config that now declares `keypad-2` too: refused, naming both places.
    let mut clash = configured();
    clash.push(InUse {
        id: "keypad-2".into(),
        bus: Some("bus-3".into()),
        address: Some(4),
        mac: None,
        family: Some(Family::OsdpReader),
        place: "config `gatehouse.toml`, [[bus]] `bus-3`, [[bus.reader]] `keypad-2`".into(),
    });
    let e = Pairing::open(store.clone(), clash, vec![])
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("[[bus.reader]] `keypad-2`") && e.contains("registry (`keypad-2`"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn expiry_ends_install_mode_forgets_candidates_and_refuses_adoption() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 100_000).unwrap());
    let prov = Arc::new(TestProvisioner::default());
    let pairing = Pairing::open(store.clone(), configured(), vec![prov.clone()]).unwrap();
    let stop = CancellationToken::new();
    let timer = tokio::spawn(pairing.clone().run(stop.child_token()));
    // Out of range minutes: refused, nothing started.
    let e = pairing
        .start(0, "local:test", ScanOptions::default())
        .unwrap_err();
    assert_eq!(e.reason, PairReason::BadArgs);
    assert!(pairing.active().is_none());

    let p = pairing.clone();
    tokio::task::spawn_blocking(move || {
        p.start_for(Duration::from_secs(2), "local:test", ScanOptions::default())
    })
    .await
    .unwrap()
    .unwrap();
    pairing.discovered(modbus("bus-2", 7));
    wait_until("the candidate recorded", || {
        !pairing.candidates().is_empty()
    })
    .await;
    wait_until("install mode expired", || {
        logged(&store)
            .iter()
            .any(|(k, v)| k == "install_mode_ended" && v["payload"]["reason"] == "expired")
    })
    .await;
    assert!(pairing.active().is_none());
    assert!(
        pairing.candidates().is_empty(),
        "forgotten when install mode ends"
    );
    let p = pairing.clone();
    let e = tokio::task::spawn_blocking(move || {
        p.adopt(
            &AdoptSpec {
                candidate: "modbus:bus-2:7".into(),
                profile: Some("waveshare-relay-8".into()),
                ..Default::default()
            },
            "local:test",
        )
    })
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(e.reason, PairReason::NotInInstallMode);
    assert!(store.registry_list().unwrap().is_empty());

    // Shutdown ends a running install mode with reason `shutdown`.
    let p = pairing.clone();
    tokio::task::spawn_blocking(move || p.start(5, "local:test", ScanOptions::default()))
        .await
        .unwrap()
        .unwrap();
    stop.cancel();
    timer.await.unwrap();
    let kinds = logged(&store);
    assert!(
        kinds
            .iter()
            .any(|(k, v)| k == "install_mode_ended" && v["payload"]["reason"] == "shutdown"),
        "{kinds:?}"
    );
    assert!(pairing.active().is_none());
}

fn cli(args: &[&str]) -> std::process::Output {
    Process::new(gatehouse_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("gatehouse runs")
}

async fn cli_async(args: Vec<String>) -> (bool, i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = cli(&args);
        (
            o.status.success(),
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

fn args(list: &[&str], sock: &Path) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.push("--socket".into());
    v.push(sock.display().to_string());
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn the_control_socket_and_the_cli_do_the_same_flow() {
    use gatehouse::pairing::control;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("data"), 100_000).unwrap());
    let prov = Arc::new(TestProvisioner::default());
    let pairing = Pairing::open(store.clone(), configured(), vec![prov.clone()]).unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(pairing.clone().run(stop.child_token()));
    let sock = dir.path().join("control.sock");
    let listener = control::bind(&sock).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o660
    );
    // A second daemon cannot take a socket in use.
    assert!(
        control::bind(&sock)
            .unwrap_err()
            .to_string()
            .contains("in use")
    );
    let c = Arc::new(control::Control {
        pairing: pairing.clone(),
        store: store.clone(),
        site: "site-1".into(),
        gateway: "gw-1".into(),
    });
    tokio::spawn(control::serve(
        listener,
        sock.clone(),
        c,
        stop.child_token(),
    ));

    let (ok, _, out, err) = cli_async(args(&["status"], &sock)).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("site:          site-1") && out.contains("install mode:  off"),
        "{out}"
    );
    let (ok, _, _, err) = cli_async(args(
        &["pair", "adopt", "modbus:bus-2:7", "--profile", "p"],
        &sock,
    ))
    .await;
    assert!(!ok && err.contains("not_in_install_mode"), "{err}");

    let (ok, _, out, err) =
        cli_async(args(&["install-mode", "start", "--minutes", "5"], &sock)).await;
    assert!(
        ok && out.contains("install mode active until"),
        "{out} {err}"
    );
    let (ok, _, _, err) =
        cli_async(args(&["install-mode", "start", "--minutes", "999"], &sock)).await;
    assert!(!ok && err.contains("bad_args"), "{err}");
    pairing.progress("modbus:bus-2", 16, 247);
    pairing.discovered(modbus("bus-2", 7));
    wait_until("the candidate recorded", || {
        !pairing.candidates().is_empty()
    })
    .await;
    let (ok, _, out, _) = cli_async(args(&["pair", "list"], &sock)).await;
    assert!(
        ok && out.contains("modbus:bus-2:7") && out.contains("modbus_device"),
        "{out}"
    );
    assert!(
        out.contains("scan modbus:bus-2") && out.contains("16/247"),
        "{out}"
    );

    let (ok, _, out, err) = cli_async(args(
        &[
            "pair",
            "adopt",
            "modbus:bus-2:7",
            "--device",
            "board-7",
            "--profile",
            "waveshare-relay-8",
            "--input",
            r#"{"channel":1,"role":"door_contact","entry":"gate-1"}"#,
        ],
        &sock,
    ))
    .await;
    assert!(ok && out.contains("adopted `board-7`"), "{out} {err}");
    let reg = store.registry_list().unwrap();
    let user = control::user_name(rustix::process::getuid().as_raw());
    assert_eq!(reg[0].adopted_by, format!("local:{user}"));
    assert_eq!(reg[0].settings["inputs"][0]["role"], "door_contact");
    let ev = logged(&store);
    let adopted = ev
        .iter()
        .find(|(k, _)| k == "device_adopted")
        .expect("device_adopted");
    assert_eq!(adopted.1["payload"]["adopted_by"], format!("local:{user}"));
    let (ok, _, _, err) = cli_async(args(
        &["pair", "adopt", "modbus:bus-2:7", "--profile", "p"],
        &sock,
    ))
    .await;
    assert!(!ok && err.contains("already_adopted"), "{err}");

    let (ok, _, out, _) = cli_async(args(&["devices", "export"], &sock)).await;
    assert!(ok);
    let parsed: toml::Value = toml::from_str(&out).expect(&out);
    assert_eq!(parsed["bus"]["device"][0]["id"].as_str(), Some("board-7"));

    // Bad input on the socket: answered, nothing changes.
    let raw = |line: Vec<u8>| {
        let sock = sock.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::{BufRead as _, Write as _};
            let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
            s.write_all(&line).unwrap();
            let mut answer = String::new();
            std::io::BufReader::new(&s).read_line(&mut answer).unwrap();
            serde_json::from_str::<Value>(&answer).unwrap()
        })
    };
    let a = raw(b"not json\n".to_vec()).await.unwrap();
    assert_eq!(
        (a["ok"].as_bool(), a["status"].as_str()),
        (Some(false), Some("malformed"))
    );
    let a = raw(br#"{"op":"adopt","spec":{"candidate":"x","bind_key":7}}"#
        .iter()
        .chain(b"\n")
        .copied()
        .collect())
    .await
    .unwrap();
    assert_eq!(a["status"], "malformed", "{a}");
    let mut long = vec![b' '; control::MAX_LINE + 10];
    long.push(b'\n');
    let a = raw(long).await.unwrap();
    assert_eq!(a["status"], "malformed");

    let (ok, _, out, _) = cli_async(args(&["pair", "remove", "board-7"], &sock)).await;
    assert!(ok && out.contains("removed `board-7`"), "{out}");
    assert!(store.registry_list().unwrap().is_empty());
    assert_eq!(prov.last_run(), Vec::<String>::new());
    assert!(logged(&store).iter().any(|(k, _)| k == "device_removed"));
    let (ok, _, _, err) = cli_async(args(&["pair", "remove", "r1"], &sock)).await;
    assert!(!ok && err.contains("configured"), "{err}");
    let (ok, _, out, _) = cli_async(args(&["install-mode", "stop"], &sock)).await;
    assert!(ok && out.contains("install mode stopped"), "{out}");
    // The live table ends by itself once install mode is off.
    let (ok, _, out, _) = cli_async(args(&["pair", "list", "--watch"], &sock)).await;
    assert!(ok && out.contains("install mode:  off"), "{out}");
    stop.cancel();
}

#[test]
fn the_cli_without_a_daemon_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    for a in [
        vec!["status"],
        vec!["pair", "list"],
        vec!["install-mode", "stop"],
    ] {
        let mut a: Vec<&str> = a;
        a.extend(["--socket", missing.to_str().unwrap()]);
        let o = cli(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("the gatehouse daemon is not running"), "{err}");
        assert!(err.contains(missing.to_str().unwrap()), "{err}");
    }
    // A stale socket (a daemon that died): nobody listens.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let o = cli(&["status", "--socket", stale.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("daemon is not running"));
}

#[test]
fn a_registry_conflicting_with_the_config_stops_the_daemon_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let store = Store::open(&data, 100_000).unwrap();
        store
            .registry_put(&Registered {
                id: "r1".into(),
                candidate: "osdp:bus-1:5".into(),
                family: Family::OsdpReader,
                bus: Some("bus-1".into()),
                settings: json!({"address": 5, "entry": "gate-1"}),
                adopted_at: Utc::now(),
                adopted_by: "local:installer".into(),
                replaces: None,
            })
            .unwrap();
    }
    let cfg = dir.path().join("gatehouse.toml");
    std::fs::write(
        &cfg,
        format!(
            "[site]\nid = \"s1\"\ngateway_id = \"g1\"\n[storage]\ndata_dir = \"{}\"\n\
             [control]\nsocket = \"{}\"\n\
             [[bus]]\nid = \"bus-1\"\nport = \"{}\"\nprotocol = \"osdp\"\n\
             [[bus.reader]]\nid = \"r1\"\naddress = 1\nentry = \"gate-1\"\nsecure = \"none\"\n",
            data.display(),
            dir.path().join("c.sock").display(),
            dir.path().join("no-such-tty").display(),
        ),
    )
    .unwrap();
    let o = Process::new(gatehouse_bin())
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("device id `r1` is used twice"), "{err}");
    assert!(
        err.contains("[[bus.reader]] `r1`") && err.contains("registry (`r1`"),
        "{err}"
    );
    assert!(err.contains(&cfg.display().to_string()), "{err}");
}

/// The daemon itself: its control socket answers the CLI (`--config`), install mode started
/// there ends with reason `shutdown` when the daemon stops, and is off after a restart.
#[test]
fn the_daemon_serves_the_control_socket_and_ends_install_mode_at_stop() {
    use std::io::{BufRead as _, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sock = dir.path().join("control.sock");
    let cfg = dir.path().join("gatehouse.toml");
    std::fs::write(
        &cfg,
        format!(
            "[site]\nid = \"s1\"\ngateway_id = \"g1\"\n[storage]\ndata_dir = \"{}\"\n\
             [control]\nsocket = \"{}\"\n",
            data.display(),
            sock.display()
        ),
    )
    .unwrap();
    let config = cfg.to_str().unwrap();
    let run = || {
        let mut child = Process::new(gatehouse_bin())
            .args(["run", "--config", config])
            .env("RUST_LOG", "gatehouse=info")
            .env("NO_COLOR", "1")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        for line in lines.by_ref() {
            if line.unwrap().contains("waiting for SIGTERM") {
                break;
            }
        }
        // Keep reading its log so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        child
    };
    let stop = |child: &mut std::process::Child| {
        let kill = Process::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        assert!(child.wait().unwrap().success());
    };
    let mut daemon = run();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o660
    );
    let o = cli(&["status", "--config", config]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("gateway:       g1"),
        "{out}"
    );
    let o = cli(&[
        "install-mode",
        "start",
        "--minutes",
        "30",
        "--config",
        config,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    stop(&mut daemon);
    assert!(!sock.exists(), "the socket is removed at stop");
    let o = cli(&["status", "--config", config]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("daemon is not running"));

    let mut daemon = run();
    let o = cli(&["status", "--config", config]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("install mode:  off"),
        "not resumed after a restart: {out}"
    );
    stop(&mut daemon);
    let store = Store::open(&data, 100_000).unwrap();
    let ev = logged(&store);
    let started = ev
        .iter()
        .position(|(k, _)| k == "install_mode_started")
        .expect("started");
    let ended = ev
        .iter()
        .position(|(k, v)| k == "install_mode_ended" && v["payload"]["reason"] == "shutdown")
        .expect("ended at shutdown");
    let stopped = ev
        .iter()
        .position(|(k, _)| k == "gateway_stopped")
        .expect("stopped");
    assert!(started < ended && ended < stopped, "{ev:?}");
    assert!(
        ev[started].1["payload"]["started_by"]
            .as_str()
            .unwrap()
            .starts_with("local:")
    );
}
