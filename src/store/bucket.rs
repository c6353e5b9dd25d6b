//! The shared limiter's arithmetic as SQLite runs it, inside one `BEGIN
//! IMMEDIATE` transaction: GCRA for rate and burst, the daily quota, the
//! in-flight cap and the circuit. Postgres runs the same rules as the SQL
//! function `limiter_reserve` (migrations/postgres/0016); the property tests
//! in tests/conformance.rs check both on a synthetic clock.

/// An account's row of the `limiter` table, as the SQLite store keeps it:
/// times are seconds on the store's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    pub rate: f64,
    pub burst: f64,
    /// AIMD factor on the rate (1 = the configured rate).
    pub scale: f64,
    /// GCRA's theoretical arrival time of the next call.
    pub tat: f64,
    /// No grants before this (a 429's push-back).
    pub blocked_until: f64,
    pub daily_quota: Option<i64>,
    /// Seconds after UTC midnight at which the quota day starts.
    pub quota_reset: f64,
    pub quota_day_start: f64,
    pub day_used: i64,
    pub max_in_flight: Option<i64>,
    /// The circuit: open since then (`None`: closed), and when the next
    /// probe may go.
    pub circuit_since: Option<f64>,
    pub circuit_probe_at: f64,
}

/// What one reservation decided, and the row to store after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    /// Calls granted: all asked for (fewer only when the quota has fewer
    /// left, the in-flight cap fewer places, or the burst is smaller), or 0.
    pub granted: i64,
    /// When nothing was granted: how long to wait, and why (`circuit`,
    /// `blocked`, `quota`, `in_flight` or `rate`).
    pub wait: f64,
    pub reason: Option<&'static str>,
    /// The row to write back; `None` leaves it as it was.
    pub row: Option<Bucket>,
}

impl Bucket {
    /// Reserves `k` calls at time `t` with `in_flight` calls of the account
    /// still in flight (unexpired); a probe through an open circuit holds
    /// the next probe back for `lease` seconds. The same arithmetic as the
    /// Postgres function `limiter_reserve` (migrations/postgres/0016): the
    /// SQLite store runs this inside one `BEGIN IMMEDIATE` transaction, and
    /// the property tests check both against the same rules.
    pub fn reserve(&self, t: f64, k: i64, in_flight: i64, lease: f64) -> Reservation {
        let deny = |wait: f64, reason, row| Reservation { granted: 0, wait: wait.max(0.0), reason: Some(reason), row };
        // Never more than the burst, which GCRA would refuse for as long as
        // it is asked: the row's burst is the last registration's, not
        // necessarily the one the caller sized its request by.
        let mut k = k.min((self.burst.floor() as i64).max(1));
        if self.circuit_since.is_some() {
            if t < self.circuit_probe_at {
                return deny(self.circuit_probe_at - t, "circuit", None);
            }
            // One probe, alone.
            k = 1;
        }
        let em = 1.0 / (self.rate * self.scale);
        let today = ((t - self.quota_reset) / 86_400.0).floor() * 86_400.0 + self.quota_reset;
        let used = if self.quota_day_start < today { 0 } else { self.day_used };
        // A clock read earlier than the row's day (a step back) counts in
        // the row's day and never moves it back: the next reservation
        // would take the day for a new one and reset its count. (The wait
        // for the quota still runs to the end of today, which a changed
        // reset time may place before the row's day ends.)
        let day_start = today.max(self.quota_day_start);
        if t < self.blocked_until {
            return deny(self.blocked_until - t, "blocked", None);
        }
        let mut n = k;
        if let Some(quota) = self.daily_quota {
            n = n.min(quota - used);
            if n < 1 {
                let row = Bucket { quota_day_start: day_start, day_used: used, ..self.clone() };
                return deny(today + 86_400.0 - t, "quota", Some(row));
            }
        }
        if let Some(cap) = self.max_in_flight {
            n = n.min(cap - in_flight);
            if n < 1 {
                // Calls end in milliseconds to seconds: look again shortly.
                return deny(0.02, "in_flight", None);
            }
        }
        // GCRA: the schedule may run at most `burst` calls ahead of now.
        let base = self.tat.max(t);
        if base + n as f64 * em > t + self.burst * em {
            return deny(base + n as f64 * em - (t + self.burst * em), "rate", None);
        }
        let probe_at = if self.circuit_since.is_some() { t + lease } else { self.circuit_probe_at };
        let row = Bucket {
            tat: base + n as f64 * em,
            quota_day_start: day_start,
            day_used: used + n,
            circuit_probe_at: probe_at,
            ..self.clone()
        };
        Reservation { granted: n, wait: 0.0, reason: None, row: Some(row) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(rate: f64, burst: f64, quota: Option<i64>) -> Bucket {
        Bucket {
            rate,
            burst,
            scale: 1.0,
            tat: 0.0,
            blocked_until: 0.0,
            daily_quota: quota,
            quota_reset: 0.0,
            quota_day_start: 0.0,
            day_used: 0,
            max_in_flight: None,
            circuit_since: None,
            circuit_probe_at: 0.0,
        }
    }

    #[test]
    fn a_used_up_quota_waits_for_the_next_quota_day() {
        let noon = 86_400.0 * 20_000.0 + 43_200.0;
        for (reset, wait) in [(0.0, 43_198.0), (3_600.0, 46_798.0)] {
            let mut b = Bucket { quota_reset: reset, ..bucket(100.0, 100.0, Some(2)) };
            for t in [noon, noon + 1.0] {
                let r = b.reserve(t, 1, 0, 60.0);
                assert_eq!(r.granted, 1);
                b = r.row.unwrap();
            }
            let r = b.reserve(noon + 2.0, 1, 0, 60.0);
            assert_eq!((r.granted, r.reason, r.wait), (0, Some("quota"), wait), "reset at {reset}");
            let midnight = b.reserve(noon + 43_200.0, 1, 0, 60.0).granted;
            assert_eq!(midnight, if reset == 0.0 { 1 } else { 0 }, "the quota day starts at the reset, UTC");
            assert_eq!(b.reserve(noon + 2.0 + wait, 1, 0, 60.0).granted, 1);
        }
    }

    #[test]
    fn an_open_circuit_lets_one_probe_through_when_due_and_holds_the_next() {
        let b = Bucket { circuit_since: Some(5.0), circuit_probe_at: 12.0, ..bucket(100.0, 100.0, None) };
        let early = b.reserve(10.0, 4, 0, 30.0);
        assert_eq!((early.granted, early.reason, early.wait), (0, Some("circuit"), 2.0));
        let probe = b.reserve(12.0, 4, 0, 30.0);
        assert_eq!(probe.granted, 1, "one probe, however many were asked for");
        let after = probe.row.unwrap();
        assert_eq!(after.circuit_probe_at, 42.0, "the next probe waits for this one's lease");
        assert_eq!(after.reserve(13.0, 1, 0, 30.0).reason, Some("circuit"));
    }

    #[test]
    fn a_reservation_is_cut_to_the_burst_and_its_day_never_moves_back() {
        let b = bucket(400.0, 4.5, None);
        assert_eq!(b.reserve(10.0, 8, 0, 60.0).granted, 4, "at most the burst, never refused for ever");
        let b = bucket(400.0, 4.5, Some(3));
        let midnight = 86_400.0 * 20_001.0;
        let first = b.reserve(midnight + 0.0005, 1, 0, 60.0).row.unwrap();
        let back = first.reserve(midnight - 0.0005, 1, 0, 60.0);
        assert_eq!(back.granted, 1);
        let back = back.row.unwrap();
        assert_eq!((back.quota_day_start, back.day_used), (midnight, 2), "counted in the newer day");
        assert_eq!(back.reserve(midnight + 1.0, 3, 0, 60.0).granted, 1, "one left of 3");
        // The reset moved from 08:00 to midnight, the quota used up at
        // 10:00: the wait runs to midnight, not to 08:00 tomorrow.
        let used_up = Bucket { quota_day_start: midnight + 8.0 * 3_600.0, day_used: 3, ..b };
        let r = used_up.reserve(midnight + 10.0 * 3_600.0, 1, 0, 60.0);
        assert_eq!((r.reason, r.wait), (Some("quota"), 14.0 * 3_600.0));
    }

    #[test]
    fn the_in_flight_cap_counts_what_is_still_in_flight() {
        let b = Bucket { max_in_flight: Some(3), ..bucket(100.0, 100.0, None) };
        assert_eq!(b.reserve(10.0, 5, 1, 60.0).granted, 2, "two places left");
        let full = b.reserve(10.0, 1, 3, 60.0);
        assert_eq!((full.granted, full.reason), (0, Some("in_flight")));
    }
}
