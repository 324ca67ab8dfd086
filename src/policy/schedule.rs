//! Schedules in the facility's local time. A window is wall-clock time: on the day clocks go
//! forward a window 02:30–04:00 opens at 03:00 (02:30 never happens); on the day they go back a
//! window that ends at 01:30 is open through both 01:00–01:30 hours.

use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc,
};
use chrono_tz::Tz;

use crate::site::CompiledSchedule;

/// Is the schedule open at `at`?
pub fn is_open(s: &CompiledSchedule, tz: Tz, at: DateTime<Utc>) -> bool {
    if s.always_open {
        return true;
    }
    let local = at.with_timezone(&tz);
    let wd = local.weekday().num_days_from_monday() as usize;
    let minute = (local.hour() * 60 + local.minute()) as u16;
    s.days[wd].iter().any(|&(a, b)| a <= minute && minute < b)
}

/// The instants a local wall-clock time happens: one; two in a fold (clocks back); in a gap
/// (clocks forward) the first instant after it.
fn resolve(tz: Tz, t: NaiveDateTime) -> Vec<DateTime<Utc>> {
    match tz.from_local_datetime(&t) {
        LocalResult::Single(x) => vec![x.with_timezone(&Utc)],
        LocalResult::Ambiguous(a, b) => vec![a.with_timezone(&Utc), b.with_timezone(&Utc)],
        LocalResult::None => {
            // Gaps are at most a few hours; step forward a minute at a time to the first valid
            // minute (bounded loop).
            let mut probe = t;
            for _ in 0..(4 * 60) {
                probe += Duration::minutes(1);
                if let Some(x) = tz.from_local_datetime(&probe).earliest() {
                    return vec![x.with_timezone(&Utc)];
                }
            }
            vec![Utc.from_utc_datetime(&t)]
        }
    }
}

/// Did a window of the schedule close at most `grace_minutes` before `at` (and is it closed now)?
/// Used for exits after hours.
pub fn closed_within(s: &CompiledSchedule, tz: Tz, at: DateTime<Utc>, grace_minutes: u32) -> bool {
    if grace_minutes == 0 || s.always_open {
        return false;
    }
    let grace = Duration::minutes(grace_minutes as i64);
    let today = at.with_timezone(&tz).date_naive();
    let days_back = (grace_minutes / 1440) as i64 + 1;
    for back in 0..=days_back {
        let Some(date) = today.checked_sub_signed(Duration::days(back)) else {
            continue;
        };
        let wd = date.weekday().num_days_from_monday() as usize;
        for &(_, end) in &s.days[wd] {
            // In a fold a window closes twice (wall time passes its end twice); the grace
            // period follows each closing.
            let Some(end_local) = local_at(date, end) else {
                continue;
            };
            for end_at in resolve(tz, end_local) {
                let until = end_at.checked_add_signed(grace).unwrap_or(end_at);
                if end_at <= at && at < until && !is_open(s, tz, at) {
                    return true;
                }
            }
        }
    }
    false
}

fn local_at(date: NaiveDate, minute_of_day: u16) -> Option<NaiveDateTime> {
    date.and_hms_opt(0, 0, 0)?
        .checked_add_signed(Duration::minutes(minute_of_day as i64))
}
