//! Time for scheduled specs: cron expressions in a time zone, the logical
//! date of a run, and the `{date}` templates of dated paths. A leaf: it
//! imports nothing of vinetl's, so the spec (which checks schedules) and
//! the scheduler (which runs them) can both use it.
//!
//! Cron parsing and matching are croner's; time zones are chrono-tz's
//! (IANA names, daylight saving included). What is ours is the template
//! filler below, see [`fill`].

use std::str::FromStr;

use chrono::{DateTime, Days, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;

/// A spec's schedule: when its runs are due, in which zone.
#[derive(Debug, Clone)]
pub struct Calendar {
    cron: Cron,
    tz: Tz,
}

/// Fire times one decision looks at, at most. An every-second cron after a
/// week down would otherwise list 600,000 of them; the oldest beyond this
/// are passed over with a warning in the log, recorded nowhere.
pub const MAX_FIRES: usize = 1_000;

impl Calendar {
    /// `cron`: five fields (minute hour day-of-month month day-of-week), or
    /// six with seconds first; `tz`: an IANA name such as `Europe/Berlin`
    /// (default `UTC`).
    pub fn new(cron: &str, tz: Option<&str>) -> Result<Calendar, String> {
        let parsed = Cron::from_str(cron).map_err(|e| format!("{cron:?} is not a cron expression: {e}"))?;
        let tz = match tz {
            None => Tz::UTC,
            Some(name) => Tz::from_str(name)
                .map_err(|_| format!("{name:?} is not an IANA time zone (e.g. \"UTC\", \"Europe/Berlin\")"))?,
        };
        Ok(Calendar { cron: parsed, tz })
    }

    pub fn zone(&self) -> &str {
        self.tz.name()
    }

    /// The first fire time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&t.with_timezone(&self.tz), false).ok().map(|d| d.with_timezone(&Utc))
    }

    /// Fire times in `(after, upto]`, oldest first: at most [`MAX_FIRES`],
    /// the newest ones, and how many older ones were left out.
    pub fn fires_between(&self, after: DateTime<Utc>, upto: DateTime<Utc>) -> (Vec<DateTime<Utc>>, u64) {
        let mut fires = std::collections::VecDeque::new();
        let mut left_out = 0u64;
        for t in self.cron.iter_after(after.with_timezone(&self.tz)) {
            let t = t.with_timezone(&Utc);
            if t > upto {
                break;
            }
            if fires.len() == MAX_FIRES {
                fires.pop_front();
                left_out += 1;
            }
            fires.push_back(t);
        }
        (fires.into(), left_out)
    }

    /// The run's logical date: the calendar date of its fire time in the
    /// schedule's zone (a 02:00 run on 5 December has the date 2026-12-05,
    /// whenever it really starts).
    pub fn logical_date(&self, fire: DateTime<Utc>) -> NaiveDate {
        fire.with_timezone(&self.tz).date_naive()
    }

    /// Fire times whose logical date is in `from..=to`.
    pub fn fires_on_dates(&self, from: NaiveDate, to: NaiveDate) -> Vec<DateTime<Utc>> {
        let start = from.and_hms_opt(0, 0, 0).expect("midnight exists");
        // The instant before local midnight of `from` (the earliest offset of
        // the day, so nothing on `from` is skipped).
        let before = self.tz.from_local_datetime(&start).earliest().map_or_else(
            || Utc.from_utc_datetime(&start) - chrono::Duration::hours(24),
            |d| d.with_timezone(&Utc) - chrono::Duration::seconds(1),
        );
        self.cron
            .iter_after(before.with_timezone(&self.tz))
            .map(|t| t.with_timezone(&Utc))
            .take_while(|t| self.logical_date(*t) <= to)
            .filter(|t| self.logical_date(*t) >= from)
            .collect()
    }

    /// Today's date in the schedule's zone.
    pub fn today(&self, now: DateTime<Utc>) -> NaiveDate {
        self.logical_date(now)
    }
}

/// Fills the date templates of a path or query with `date`:
///
/// - `{date}`: `2026-12-05`;
/// - `{date:FORMAT}`: chrono's strftime, e.g. `{date:%Y/%m/%d}`;
/// - `{date-1}`, `{date+2:%Y%m%d}`: so many days before or after.
///
/// Other braces are left as they are (a query's `'{a,b}'` array literal);
/// a `{date…}` that does not parse is an error naming it. Why not a
/// template crate: the one variable is a date, the formatting is chrono's,
/// and a general engine would claim every brace in a SQL query.
pub fn fill(text: &str, date: NaiveDate) -> Result<String, String> {
    let mut out = String::with_capacity(text.len() + 16);
    let mut rest = text;
    while let Some(open) = rest.find("{date") {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').ok_or_else(|| format!("{text:?}: a `{{date` is not closed"))? + open;
        let inner = &rest[open + 1..close];
        out.push_str(&one_template(inner, date).map_err(|why| format!("{text:?}: {{{inner}}}: {why}"))?);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether `text` holds a template (so a one-off run needs a date).
pub fn has_template(text: &str) -> bool {
    text.contains("{date")
}

fn one_template(inner: &str, date: NaiveDate) -> Result<String, String> {
    let (head, format) = inner.split_once(':').unwrap_or((inner, "%Y-%m-%d"));
    let offset = head.strip_prefix("date").expect("a {date template");
    let date = match offset {
        "" => Some(date),
        o if o.starts_with('-') => o[1..].parse().ok().and_then(|n| date.checked_sub_days(Days::new(n))),
        o if o.starts_with('+') => o[1..].parse().ok().and_then(|n| date.checked_add_days(Days::new(n))),
        _ => None,
    }
    .ok_or("a date template is {date}, {date:FORMAT}, or {date-N} / {date+N} (days)")?;
    let items: Vec<chrono::format::Item> = chrono::format::StrftimeItems::new(format).collect();
    if items.iter().any(|i| matches!(i, chrono::format::Item::Error)) {
        return Err(format!("{format:?} is not a strftime format"));
    }
    let mut s = String::new();
    std::fmt::Write::write_fmt(&mut s, format_args!("{}", date.format_with_items(items.into_iter())))
        .map_err(|_| format!("{format:?} cannot format a date (it asks for a time of day)"))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }
    fn day(s: &str) -> NaiveDate {
        NaiveDate::from_str(s).unwrap()
    }

    #[test]
    fn templates_fill_from_the_logical_date() {
        let d = day("2026-12-05");
        assert_eq!(fill("s3://drop/{date}/vins.csv", d).unwrap(), "s3://drop/2026-12-05/vins.csv");
        assert_eq!(fill("out/dt={date-1}/", d).unwrap(), "out/dt=2026-12-04/");
        assert_eq!(fill("{date+30:%Y%m%d}", d).unwrap(), "20270104");
        assert_eq!(fill("{date:%Y/%m/%d}/x", d).unwrap(), "2026/12/05/x");
        assert_eq!(fill("no template", d).unwrap(), "no template");
        assert_eq!(
            fill("WHERE tags && '{a,b}' AND day = '{date}'", d).unwrap(),
            "WHERE tags && '{a,b}' AND day = '2026-12-05'"
        );
        assert!(fill("{dated}", d).unwrap_err().contains("{dated}"));
        assert!(fill("{date", d).is_err());
        assert!(fill("{date-x}", d).is_err());
        assert!(fill("{date:%H}", d).is_err(), "a date has no hour");
    }

    #[test]
    fn fire_times_follow_the_zone() {
        let c = Calendar::new("0 2 * * *", Some("America/New_York")).unwrap();
        // 02:00 in New York is 07:00 UTC in winter.
        assert_eq!(c.next_after(utc("2026-12-04T12:00:00Z")), Some(utc("2026-12-05T07:00:00Z")));
        let (fires, left_out) = c.fires_between(utc("2026-12-01T00:00:00Z"), utc("2026-12-04T07:00:00Z"));
        assert_eq!(fires.len(), 4, "{fires:?}");
        assert_eq!(left_out, 0);
        assert_eq!(c.logical_date(fires[0]), day("2026-12-01"));
        let on = c.fires_on_dates(day("2026-12-02"), day("2026-12-03"));
        assert_eq!(on, vec![utc("2026-12-02T07:00:00Z"), utc("2026-12-03T07:00:00Z")]);
        assert!(Calendar::new("0 2 * *", None).is_err());
        assert!(Calendar::new("0 2 * * *", Some("Mars/Olympus")).is_err());
    }

    #[test]
    fn daylight_saving_neither_skips_nor_doubles_a_nightly_run() {
        let c = Calendar::new("30 2 * * *", Some("America/New_York")).unwrap();
        // 8 March 2026: 02:00 jumps to 03:00, so 02:30 does not exist that night.
        let spring = c.fires_on_dates(day("2026-03-07"), day("2026-03-09"));
        let dates: Vec<NaiveDate> = spring.iter().map(|t| c.logical_date(*t)).collect();
        assert_eq!(dates, [day("2026-03-07"), day("2026-03-08"), day("2026-03-09")], "{spring:?}");
        // 1 November 2026: 01:00–02:00 happens twice; 02:30 once.
        let fall = c.fires_on_dates(day("2026-10-31"), day("2026-11-02"));
        assert_eq!(fall.len(), 3, "{fall:?}");
        assert_eq!(fall[1], utc("2026-11-01T07:30:00Z"), "02:30 EST");
    }

    #[test]
    fn a_long_outage_lists_only_the_newest_fires() {
        let c = Calendar::new("* * * * * *", None).unwrap();
        let (fires, left_out) = c.fires_between(utc("2026-12-04T00:00:00Z"), utc("2026-12-04T01:00:00Z"));
        assert_eq!(fires.len(), MAX_FIRES);
        assert_eq!(left_out, 3600 - MAX_FIRES as u64);
        assert_eq!(*fires.last().unwrap(), utc("2026-12-04T01:00:00Z"));
    }
}
