//! Zone triggers: while the facility's `zone_triggers` is ON, a grant into a zone (an entry of
//! the zone, not leaving) switches the zone's triggers: `pulse_ms` pulses the relay,
//! `on_seconds` switches it on and off again that long after the *last* grant (a second grant
//! extends it: `RelayOn` again with the new off time). Pending offs are state the edge stores ([`ZoneTriggers::pending`]), so a
//! restart switches the relay off on time.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Action, Fact, Millis, SECOND, Settings};
use crate::sync::Trigger;

#[derive(Debug, Default)]
pub struct ZoneTriggers {
    /// (device, channel) → off at.
    off_at: BTreeMap<(Arc<str>, u16), Millis>,
}

impl ZoneTriggers {
    /// Relays on with their off time, in order.
    pub fn pending(&self) -> impl Iterator<Item = (&Arc<str>, u16, Millis)> {
        self.off_at.iter().map(|((d, c), t)| (d, *c, *t))
    }

    /// Restores a stored pending off (after a restart).
    pub fn restore(&mut self, device: Arc<str>, channel: u16, off_at: Millis) {
        self.off_at.insert((device, channel), off_at);
    }

    pub fn step<'t>(
        &mut self,
        fact: &Fact,
        s: &Settings,
        triggers: impl Fn(&str) -> &'t [Trigger],
        now: Millis,
        out: &mut Vec<Action>,
    ) {
        let Fact::Granted {
            zone: Some(zone),
            leaving: false,
            ..
        } = fact
        else {
            return;
        };
        if !s.zone_triggers {
            return;
        }
        for t in triggers(zone) {
            let device: Arc<str> = Arc::from(t.device.as_str());
            match (t.on_seconds, t.pulse_ms) {
                (Some(secs), _) => {
                    let off_at = now + Millis::from(secs) * SECOND;
                    self.off_at.insert((device.clone(), t.channel), off_at);
                    // Again on an extension: the edge stores the new off time.
                    out.push(Action::RelayOn {
                        device,
                        channel: t.channel,
                        off_at,
                    });
                }
                (None, Some(ms)) => out.push(Action::RelayPulse {
                    device,
                    channel: t.channel,
                    ms,
                }),
                (None, None) => {}
            }
        }
    }

    pub fn tick(&mut self, now: Millis, out: &mut Vec<Action>) {
        self.off_at.retain(|(device, channel), until| {
            let due = *until <= now;
            if due {
                out.push(Action::RelayOff {
                    device: device.clone(),
                    channel: *channel,
                });
            }
            !due
        });
    }
}
