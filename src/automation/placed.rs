//! Sensors the site database does not list but the gateway was told where they are: BLE
//! devices adopted in install mode "to a unit or a zone" (docs/pairing.md) and `[[ble.device]]`
//! tables with a `unit` or `zone`. [`super::resolve_placed`] matches their facts as if the site
//! database listed them (a unit's sensor), or, in a zone, as a sensor of its own (zones have no
//! sensor rules) whose alerts name the zone.
//!
//! The site database wins: a device it names (a unit's `sensors`, or one of its `devices`) is
//! matched by it alone, whatever a placement says.
//!
//! [`Placements`] is the live handle: the BLE manager replaces the whole set when its devices
//! change (adoption, removal, a reload of `[[ble.device]]`), the runner reads a snapshot per
//! fact. Setting it takes a short mutex, never the fact queue, and never blocks on the runner.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Where a placed sensor is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A unit's id (the unit must be in the site database for its rules to apply).
    Unit(Arc<str>),
    /// A zone's id.
    Zone(Arc<str>),
}

/// Device id → place, for devices the site database does not list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placed {
    by_device: HashMap<String, Place>,
}

impl Placed {
    pub fn new(places: impl IntoIterator<Item = (String, Place)>) -> Placed {
        Placed {
            by_device: places.into_iter().collect(),
        }
    }

    pub fn get(&self, device: &str) -> Option<&Place> {
        self.by_device.get(device)
    }

    /// The zone a device is placed in.
    pub fn zone_of(&self, device: &str) -> Option<&Arc<str>> {
        match self.get(device)? {
            Place::Zone(z) => Some(z),
            Place::Unit(_) => None,
        }
    }

    pub fn len(&self) -> usize {
        self.by_device.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_device.is_empty()
    }
}

/// The placements in force, shared by the BLE manager (writer) and the runner (reader). One
/// per [`super::facts::FactSink`] (its clones share it).
#[derive(Debug, Default)]
pub struct Placements {
    inner: Mutex<Arc<Placed>>,
}

impl Placements {
    /// Replaces the whole set (the next fact the runner takes sees it).
    pub fn set(&self, placed: Placed) {
        *self.inner.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(placed);
    }

    /// The set in force now.
    pub fn snapshot(&self) -> Arc<Placed> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::automation::{Fact, RawFact, Subject, resolve, resolve_placed};
    use crate::site::{CodeKey, Site};
    use crate::sync::{self, SyncMessage};

    fn site() -> Site {
        let doc = json!({
            "schema_version": 1, "kind": "snapshot", "version": 1,
            "facility": {"time_zone": "UTC"},
            "zones": [{"id": "z-b"}],
            "users": [{"id": "alice", "role": "tenant"}],
            "units": [
                {"id": "A-1", "status": "occupied", "tenant": "alice",
                 "sensors": [{"device": "pir-1"}, {"device": "pir-1f", "front": true}]},
                {"id": "A-2", "status": "available", "alarm_enabled": false,
                 "monitor_temperature": false}
            ],
            "devices": [{"id": "thermo-hall", "kind": "sensor", "mac": "AA:BB:CC:DD:EE:01"}]
        });
        let SyncMessage::Snapshot(s) = sync::parse(doc.to_string().as_bytes()).unwrap() else {
            unreachable!()
        };
        Site::from_snapshot(&s, &CodeKey::from_bytes([7; 32])).unwrap()
    }

    fn placed() -> Placed {
        Placed::new([
            ("adopted-pir".to_string(), Place::Unit("A-1".into())),
            ("adopted-a2".to_string(), Place::Unit("A-2".into())),
            ("adopted-thermo".to_string(), Place::Zone("z-b".into())),
            ("lost".to_string(), Place::Unit("Z-999".into())),
            // Named by the site database: placements do not move them.
            ("pir-1f".to_string(), Place::Unit("A-2".into())),
            ("thermo-hall".to_string(), Place::Unit("A-1".into())),
        ])
    }

    fn motion(device: &str) -> RawFact<'_> {
        RawFact::Motion {
            device,
            channel: None,
        }
    }

    fn temp(device: &str, channel: Option<u16>) -> RawFact<'_> {
        RawFact::Temperature {
            device,
            channel,
            celsius: 31.5,
        }
    }

    #[test]
    fn a_sensor_placed_in_a_unit_is_that_units_sensor() {
        let s = site();
        let t = &s.tables;
        let p = placed();
        assert_eq!(
            resolve_placed(t, &p, &motion("adopted-pir")),
            Some(Fact::Motion {
                unit: "A-1".into(),
                front: false,
                alarm_enabled: true,
                front_motion: true,
                device: "adopted-pir".into(),
            })
        );
        // The unit's own settings come with it.
        let Some(Fact::Motion { alarm_enabled, .. }) = resolve_placed(t, &p, &motion("adopted-a2"))
        else {
            panic!("not matched to A-2")
        };
        assert!(!alarm_enabled);
        assert_eq!(
            resolve_placed(t, &p, &temp("adopted-pir", None)),
            Some(Fact::Temperature {
                subject: Subject::Unit("A-1".into()),
                celsius: 31.5,
                monitored: true,
            })
        );
        assert_eq!(
            resolve_placed(t, &p, &temp("adopted-a2", None)),
            Some(Fact::Temperature {
                subject: Subject::Unit("A-2".into()),
                celsius: 31.5,
                monitored: false,
            })
        );
        // Without the placements (as before): unknown.
        assert_eq!(resolve(t, &motion("adopted-pir")), None);
        assert_eq!(resolve(t, &temp("adopted-pir", None)), None);
        // A Modbus input is never matched by a placement (placements are BLE devices).
        assert_eq!(
            resolve_placed(
                t,
                &p,
                &RawFact::Motion {
                    device: "adopted-pir",
                    channel: Some(1)
                }
            ),
            None
        );
    }

    #[test]
    fn a_sensor_placed_in_a_zone_or_an_unknown_unit_is_its_own_temperature_subject() {
        let s = site();
        let t = &s.tables;
        let p = placed();
        for device in ["adopted-thermo", "lost"] {
            assert_eq!(
                resolve_placed(t, &p, &temp(device, None)),
                Some(Fact::Temperature {
                    subject: Subject::Device(device.into()),
                    celsius: 31.5,
                    monitored: true,
                }),
                "{device}"
            );
            // Zones have no motion rules; a unit the site does not have has none either.
            assert_eq!(resolve_placed(t, &p, &motion(device)), None, "{device}");
        }
        assert_eq!(p.zone_of("adopted-thermo").map(|z| &**z), Some("z-b"));
        assert_eq!(p.zone_of("adopted-pir"), None);
        let mut nan = temp("adopted-thermo", None);
        if let RawFact::Temperature { celsius, .. } = &mut nan {
            *celsius = f64::NAN;
        }
        assert_eq!(resolve_placed(t, &p, &nan), None);
    }

    #[test]
    fn the_site_database_wins_when_it_names_the_sensor() {
        let s = site();
        let t = &s.tables;
        let p = placed();
        // pir-1f is A-1's front sensor in the site database, whatever the placement says.
        let Some(Fact::Motion { unit, front, .. }) = resolve_placed(t, &p, &motion("pir-1f"))
        else {
            panic!("pir-1f not matched")
        };
        assert_eq!((&*unit, front), ("A-1", true));
        // thermo-hall is a device of the site database outside every unit: its own subject.
        assert_eq!(
            resolve_placed(t, &p, &temp("thermo-hall", None)),
            Some(Fact::Temperature {
                subject: Subject::Device("thermo-hall".into()),
                celsius: 31.5,
                monitored: true,
            })
        );
        assert_eq!(resolve_placed(t, &p, &motion("thermo-hall")), None);
    }

    #[test]
    fn the_handle_replaces_the_whole_set() {
        let h = Placements::default();
        assert!(h.snapshot().is_empty());
        h.set(placed());
        let before = h.snapshot();
        assert_eq!(before.len(), 6);
        h.set(Placed::new([(
            "adopted-pir".to_string(),
            Place::Zone("z-b".into()),
        )]));
        // A snapshot taken before keeps its set; the next one sees the new one.
        assert_eq!(before.len(), 6);
        assert_eq!(h.snapshot().len(), 1);
        assert_eq!(h.snapshot().get("adopted-thermo"), None);
    }
}
