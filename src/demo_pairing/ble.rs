//! The demo's BLE pairing (docs/pairing.md, *The demo*): an unadopted padlock and an encrypted
//! BTHome thermometer on the simulated radio (`ble::sim::PairSims`) are discovered in the same
//! install mode as the keypad and the board, then adopted through [`Pairing`]: the padlock to
//! unit `A-104` with an offline test unlock, the thermometer to zone `zone-b` with its bind key.
//! Then the script waits for the adopted thermometer's first reading (its live device state).
//!
//! A BLE lock is a candidate only while the site database does not name its MAC, and it is
//! adopted only to the unit whose site-database lock has that MAC (the cloud assigns locks and
//! gives their keys; docs/ble.md, *Pairing*). So between the two the demo stands in for the
//! cloud: it applies the site-database delta that assigns the padlock to `A-104` (recorded as
//! `sync_applied` with `source: "demo"`). Keys are never logged.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::ble::sim::PairSims;
use crate::events::EventKind;
use crate::pairing::{AdoptSpec, Candidate};
use crate::store::Store;

/// The ids the adopted BLE devices get, and where they go.
pub const LOCK_ID: &str = "lock-a104";
pub const LOCK_UNIT: &str = "A-104";
pub const SENSOR_ID: &str = "sensor-hall-b";
pub const SENSOR_ZONE: &str = "zone-b";
/// How long the script waits for the adopted sensor's first reading.
const READING_TIMEOUT: Duration = Duration::from_secs(60);

/// What the script adopts on BLE.
pub(super) struct BlePlan {
    sims: PairSims,
    store: Arc<Store>,
    /// The devices' live state (where the sensor's readings show, whether or not the cloud link
    /// has already delivered, and so deleted, their events).
    states: Arc<crate::devstate::DeviceStates>,
    pub lock: AdoptSpec,
    pub sensor: AdoptSpec,
}

impl BlePlan {
    pub fn new(
        sims: PairSims,
        store: Arc<Store>,
        states: Arc<crate::devstate::DeviceStates>,
    ) -> BlePlan {
        BlePlan {
            lock: AdoptSpec {
                candidate: Candidate::ble_id(&sims.lock_mac),
                // The site database's id for the lock (checked by the BLE provisioner).
                device: Some(LOCK_ID.into()),
                unit: Some(LOCK_UNIT.into()),
                test_unlock: true,
                ..AdoptSpec::default()
            },
            sensor: AdoptSpec {
                candidate: Candidate::ble_id(&sims.sensor_mac),
                device: Some(SENSOR_ID.into()),
                zone: Some(SENSOR_ZONE.into()),
                bind_key: Some(sims.bind_key_hex()),
                ..AdoptSpec::default()
            },
            sims,
            store,
            states,
        }
    }

    /// Whether the site database names the padlock's MAC already.
    fn lock_known(&self) -> bool {
        self.store
            .site()
            .tables
            .devices
            .values()
            .any(|d| d.mac.eq_ignore_ascii_case(&self.sims.lock_mac))
    }

    /// Refuses to start when the padlock is in the site database but not adopted (a run stopped
    /// between the cloud's assignment and the adoption): a known lock is never a candidate.
    pub fn check(&self, lock_adopted: bool) -> Result<(), String> {
        if !lock_adopted && self.lock_known() {
            return Err(format!(
                "the new padlock ({}) is in the site database but not adopted (an earlier run \
                 stopped half-way): a lock the site database names is never a candidate; delete \
                 the demo's data dir to see the pairing again",
                self.sims.lock_mac
            ));
        }
        Ok(())
    }

    /// The cloud's part, played by the demo: a site-database delta that gives unit `A-104` the
    /// discovered padlock (its record, with its offline key), applied as a sync message is.
    pub fn assign_lock(&self) -> Result<(), String> {
        if self.lock_known() {
            return Ok(());
        }
        let site = self.store.site();
        let mut unit = site
            .tables
            .units
            .get(LOCK_UNIT)
            .map(|u| serde_json::to_value(u).unwrap_or_default())
            .ok_or_else(|| format!("unit `{LOCK_UNIT}` is not in the site database"))?;
        unit["controller"] = json!(LOCK_ID);
        let v = site.version;
        drop(site);
        let doc = json!({
            "schema_version": 1, "kind": "delta", "base_version": v, "version": v + 1,
            "upsert": {
                "devices": [{"id": LOCK_ID, "kind": "padlock", "mac": self.sims.lock_mac,
                    "offline_key": self.sims.lock_key_hex(),
                    "unlock_command": "7E100230A230000000001122334455667788990D"}],
                "units": [unit],
            }
        });
        let msg = crate::sync::parse_for_apply(doc.to_string().as_bytes())
            .map_err(|e| format!("the demo's site-database delta: {e}"))?;
        let a = self
            .store
            .apply_incoming(msg)
            .map_err(|e| format!("the demo's site-database delta was refused: {e}"))?;
        self.store
            .record_flushed(
                EventKind::SyncApplied,
                json!({"kind": a.kind, "version": a.version,
                    "previous_version": a.previous_version, "source": "demo"}),
            )
            .map_err(|e| format!("recording the delta: {e:#}"))?;
        tracing::info!(
            device = LOCK_ID,
            unit = LOCK_UNIT,
            mac = %self.sims.lock_mac,
            version = a.version,
            "demo pairing: the cloud assigns the discovered padlock to its unit (site-database delta, played by the demo)"
        );
        Ok(())
    }

    /// After the adoption: the padlock's test unlock as the simulated padlock counted it.
    pub fn lock_adopted(&self) {
        tracing::info!(
            device = LOCK_ID,
            unlocks = self.sims.lock_unlocks(),
            "demo pairing: the simulated padlock opened for the test unlock"
        );
    }

    /// Waits for the adopted sensor's first reading (its live state; its `sensor_reading`
    /// events go to the cloud, which deletes them from the log once delivered) and logs it.
    pub fn show_reading(&self, stop: &CancellationToken) -> Result<(), String> {
        let mut found = None;
        super::wait(stop, READING_TIMEOUT, || {
            found = self
                .states
                .get(SENSOR_ID)
                .and_then(|s| s.get("temperature").and_then(serde_json::Value::as_f64));
            found.is_some()
        });
        let Some(celsius) = found else {
            return Err(format!(
                "no reading of the adopted sensor `{SENSOR_ID}` within {} s",
                READING_TIMEOUT.as_secs()
            ));
        };
        tracing::info!(
            device = SENSOR_ID,
            zone = SENSOR_ZONE,
            reading = "temperature",
            value = celsius,
            unit = "celsius",
            "demo pairing: the adopted sensor reports"
        );
        Ok(())
    }
}
