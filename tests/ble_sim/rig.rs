//! The simulated BLE rig of `tests/ble_sim.rs`: the demo site's store, a simulated radio with
//! its padlocks and controller, the manager and the command router, and a test cloud.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ed25519_dalek::SigningKey;
use serde_json::{Value, json};

use gatehouse::access::AccessEngine;
use gatehouse::ble::config::BleConfig;
use gatehouse::ble::rpc::{CloudRpc, UnlockRequest, UnlockResponse};
use gatehouse::ble::sim::{SimLock, SimRadio};
use gatehouse::ble::{Ble, Manager};
use gatehouse::cloud::commands::{
    CommandConfig, Execution, Online, RelayOp, Relays, Router, handle, sign,
};
use gatehouse::cloud::messages::{Command, CommandResult};
use gatehouse::devstate::DeviceStates;
use gatehouse::store::Store;

use crate::peers::{self, demo_store, logged};

/// The cloud's requests, each with the time it came.
pub type Asked = Arc<Mutex<Vec<(UnlockRequest, DateTime<Utc>)>>>;

pub const WAIT: Duration = Duration::from_secs(10);
// The demo site's BLE devices (config/demo-snapshot.json).
pub const LOCK_A101: &str = "D0:1F:A6:44:B3:01";
pub const LOCK_A102: &str = "D0:1F:A6:44:B3:02";
pub const KEY_A101: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
pub const KEY_A102: [u8; 16] = [15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0];
pub const CONTROLLER_B201: &str = "D0:1F:A6:44:B3:11";
pub const SENSOR_PLAIN: &str = "3C:2E:F5:00:00:A1";
pub const SENSOR_ENCRYPTED: &str = "3C:2E:F5:00:00:B2";
pub const SENSOR_KEY: &str = "231D39C1D7CC1AB1AEE224CD096DB932";
pub const FOB_EVE: &str = "C0:FF:EE:00:00:E1";

/// Relay operations the fob grants asked for.
#[derive(Default)]
pub struct RecordingRelays(pub Mutex<Vec<(String, u16, RelayOp)>>);

impl Relays for RecordingRelays {
    fn online(&self, _device: &str) -> Online {
        Online::Yes
    }
    fn execute(&self, device: &str, channel: u16, op: RelayOp) -> Execution {
        self.0.lock().unwrap().push((device.into(), channel, op));
        Execution::Done("pulsed".into())
    }
}

pub struct Rig {
    pub _dir: tempfile::TempDir,
    pub rt: tokio::runtime::Runtime,
    pub store: Arc<Store>,
    pub radio: SimRadio,
    pub manager: Arc<Manager<SimRadio>>,
    pub rpc: Arc<CloudRpc>,
    pub states: Arc<DeviceStates>,
    pub relays: Arc<RecordingRelays>,
    pub router: Router,
    pub signer: SigningKey,
    pub wakes: tokio::sync::mpsc::Receiver<String>,
    pub stop: tokio_util::sync::CancellationToken,
}

pub fn rig_with(cfg: BleConfig, edit: impl FnOnce(&mut Value)) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let store = demo_store(dir.path());
    let mut doc = serde_json::to_value(store.export()).unwrap();
    let before = doc.clone();
    edit(&mut doc);
    if doc != before {
        doc["version"] = json!(doc["version"].as_u64().unwrap() + 1);
        let file = dir.path().join("edited.json");
        std::fs::write(&file, serde_json::to_vec(&doc).unwrap()).unwrap();
        gatehouse::cli::import_file(&store, &file).unwrap();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let radio = SimRadio::new();
    radio.add_lock(LOCK_A101, SimLock::new("NOKE3P_D01FA644B301", KEY_A101));
    let mut sleeper = SimLock::new("NOKE1A_D01FA644B302", KEY_A102);
    sleeper.asleep = true;
    radio.add_lock(LOCK_A102, sleeper);
    radio.add_lock(
        CONTROLLER_B201,
        SimLock::new("NOKE3E_D01FA644B311", [0x10; 16]),
    );
    let rpc = Arc::new(CloudRpc::new());
    let states = Arc::new(DeviceStates::new());
    let engine = Arc::new(AccessEngine::new(store.clone(), None));
    let relays = Arc::new(RecordingRelays::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let (wake_tx, wakes) = tokio::sync::mpsc::channel(gatehouse::ble::WAKE_QUEUE);
    let manager = rt.block_on(async {
        let m = Manager::new(radio.clone(), cfg, engine, states.clone(), rpc.clone());
        m.set_relays(relays.clone());
        m.set_wakes(wake_tx);
        let _ble = Ble::start(m.clone(), stop.clone());
        m
    });
    let router = Router::new(manager.clone(), relays.clone());
    peers::eventually("the scanner listens", WAIT, || {
        radio.scanning().then_some(())
    });
    Rig {
        _dir: dir,
        rt,
        store,
        radio,
        manager,
        rpc,
        states,
        relays,
        router,
        signer: SigningKey::from_bytes(&[9; 32]),
        wakes,
        stop,
    }
}

pub fn rig() -> Rig {
    rig_with(fast(), |_| {})
}

/// Short cloud wait, so the offline fallback is quick.
pub fn fast() -> BleConfig {
    BleConfig {
        online_unlock_timeout: Duration::from_millis(300),
        fob_entries: vec!["gate-1".into()],
        fob_min_rssi: -70,
        ..BleConfig::default()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Rig {
    /// A signed command through the router, as the cloud link runs it (a blocking thread).
    pub fn command(
        &self,
        id: &str,
        name: &str,
        target: Value,
        ttl: chrono::Duration,
    ) -> CommandResult {
        let now = Utc::now();
        let cmd = Command {
            v: 2,
            site: "site".into(),
            gateway: "gw".into(),
            id: id.into(),
            name: name.into(),
            issued_at: now,
            expires_at: now + ttl,
            target: serde_json::from_value(target).unwrap(),
            args: Value::Null,
        };
        let ccfg = CommandConfig::new(self.signer.verifying_key(), "site", "gw");
        handle(
            &self.router,
            &self.store,
            &sign(&cmd, &self.signer),
            name,
            now,
            &ccfg,
        )
        .result
    }

    /// Plays the cloud: answers every unlock request with `answer(request)`.
    pub fn serve_cloud(&self, answer: impl Fn(&UnlockRequest) -> UnlockResponse + Send + 'static) {
        let mut rx = self.rpc.take_requests().unwrap();
        let rpc = self.rpc.clone();
        self.rt.spawn(async move {
            while let Some(bytes) = rx.recv().await {
                let req: UnlockRequest = serde_json::from_slice(&bytes).unwrap();
                let resp = serde_json::to_vec(&answer(&req)).unwrap();
                rpc.on_response(&resp);
            }
        });
    }

    /// Plays the cloud, recording each request with the time it came: answers with
    /// `answer(request)`, or never (`None`: the cloud is silent). The answer may take its time
    /// (it runs on its own thread).
    pub fn serve_cloud_recording(
        &self,
        answer: impl Fn(&UnlockRequest) -> Option<UnlockResponse> + Send + Sync + 'static,
    ) -> Asked {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let mut rx = self.rpc.take_requests().unwrap();
        let (rpc, log, answer) = (self.rpc.clone(), asked.clone(), Arc::new(answer));
        self.rt.spawn(async move {
            while let Some(bytes) = rx.recv().await {
                let req: UnlockRequest = serde_json::from_slice(&bytes).unwrap();
                log.lock().unwrap().push((req.clone(), Utc::now()));
                let (rpc, answer) = (rpc.clone(), answer.clone());
                tokio::task::spawn_blocking(move || {
                    if let Some(resp) = answer(&req) {
                        rpc.on_response(&serde_json::to_vec(&resp).unwrap());
                    }
                });
            }
        });
        asked
    }

    /// Has the padlock advertise (as an awake one does, again and again) until the manager
    /// reports `device` awake; other devices' reports are skipped.
    pub fn woken(&mut self, mac: &str, device: &str) -> String {
        let end = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < end, "{device} never reported awake");
            self.radio.advertise_lock(mac, -58);
            let got = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(100), self.wakes.recv()).await
            });
            if let Ok(Some(d)) = got
                && d == device
            {
                return d;
            }
        }
    }

    pub fn advertise_until_awake(&self, mac: &str, device: &str) {
        let end = Instant::now() + WAIT;
        while self.manager.online(device) != Online::Yes {
            assert!(Instant::now() < end, "{device} never seen awake");
            self.radio.advertise_lock(mac, -60);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn events(&self, kind: &str) -> Vec<Value> {
        logged(&self.store)
            .into_iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.payload)
            .collect()
    }
}

pub fn packet(tag: u8) -> [u8; 20] {
    let mut p = [tag; 20];
    p[0] = 0x7E;
    p[3] = tag;
    p
}
