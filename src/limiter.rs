//! One rate limit for every worker of an account, shared through the state
//! store (Postgres; or SQLite, for the processes of one machine).
//!
//! The `limiter` row of an account holds a GCRA schedule (rate and burst), a
//! push-back time set by 429s, an AIMD scale on the rate, and the day's quota.
//! `limiter_reserve` (a SQL function, see the migration) grants calls under
//! the row's lock, with the database's clock, so workers on many machines act
//! as one careful client and their clocks never matter. If Postgres cannot be
//! reached, nothing is granted: workers pause rather than exceed the limit.
//! On SQLite the same arithmetic is [`Bucket::reserve`], run in one
//! `BEGIN IMMEDIATE` transaction. Both take an optional clock, so the
//! property tests (tests/limiter.rs) drive the code that runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::spec::ProviderSpec;
use crate::store::{Store, StoreError};

/// Without `Retry-After`, a 429 halves the shared rate (down to this share
/// of the configured one) and pushes every worker back by one new interval.
pub const MIN_SCALE: f64 = 0.05;
/// Each successful call gives back this much of the configured rate: from
/// the floor to full speed takes ~100 successes, so a wrong rate cannot storm.
pub const RECOVERY_STEP: f64 = 0.01;
/// Waits longer than this are not slept through in a worker: the batch is
/// rescheduled instead, freeing the worker.
pub const MAX_INLINE_WAIT: Duration = Duration::from_secs(30);
/// Slots reserved for callers already waiting in this process must be taken
/// within this long, or they are dropped unused: a slot is never spent late,
/// so calls start when the database granted them.
pub const BANKED_SLOT_TTL: Duration = Duration::from_millis(50);

/// Why no call may be made now.
#[derive(Debug, Clone, PartialEq)]
pub enum Denied {
    /// Rate, or a 429's push-back: retry after `wait`.
    Later { wait: Duration, reason: String },
    /// The day's quota is used up until it resets, `wait` from now.
    Quota { wait: Duration },
    /// The API is unreachable (the account's circuit is open): the next
    /// probe is due `wait` from now.
    Circuit { wait: Duration },
}

/// What one reservation granted.
#[derive(Debug, Clone, PartialEq)]
pub struct Granted {
    pub n: usize,
    /// The store's time of the grant (Unix seconds).
    pub at: f64,
    /// Flight rows, one per slot, under a shared in-flight cap.
    pub flights: Vec<i64>,
}

/// A granted call: holds its place in flight until released.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    flight: Option<i64>,
}

/// The shared limiter of one account, plus this process's in-flight cap.
///
/// When several calls of a process wait at once, one round trip reserves
/// slots for all of them (up to the burst), so high rates cost far fewer
/// round trips than calls.
#[derive(Debug, Clone)]
pub struct SharedLimiter {
    store: Store,
    account: String,
    in_flight: Arc<Semaphore>,
    /// How long a flight row holds a place under the shared in-flight cap
    /// if its worker dies mid-call.
    lease_secs: f64,
    /// Most slots one reservation asks for (see [`batch_size`]).
    max_batch: usize,
    shared: Arc<Local>,
}

#[derive(Debug, Default)]
struct Local {
    /// Callers of `acquire` waiting for a slot right now.
    waiting: AtomicUsize,
    /// One reservation round trip at a time per process.
    reserving: Mutex<()>,
    /// Slots granted for waiting callers: how many, when (here), and the
    /// store's time of the grant (to give unused ones back to the quota).
    bank: std::sync::Mutex<Bank>,
    /// Reservation round trips made, for measurement.
    round_trips: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct Bank {
    slots: usize,
    at: Option<Instant>,
    granted_at: f64,
}

/// What the bank had for a caller.
enum Banked {
    Took,
    Empty,
    /// `n` slots were never used in time: their quota goes back.
    Expired {
        n: usize,
        granted_at: f64,
    },
}

impl Local {
    fn take_banked(&self) -> Banked {
        let mut bank = self.bank.lock().expect("bank lock");
        match bank.at {
            Some(at) if bank.slots > 0 && at.elapsed() < BANKED_SLOT_TTL => {
                bank.slots -= 1;
                Banked::Took
            }
            _ => {
                let expired = std::mem::take(&mut *bank);
                if expired.slots > 0 {
                    Banked::Expired { n: expired.slots, granted_at: expired.granted_at }
                } else {
                    Banked::Empty
                }
            }
        }
    }
}

impl SharedLimiter {
    /// Creates or updates the account's row from the spec (a changed rate
    /// or quota applies from the next reservation on).
    pub async fn register(store: &Store, p: &ProviderSpec) -> Result<SharedLimiter, StoreError> {
        let pool = match store {
            Store::Pg(s) => &s.pool,
            Store::Lite(s) => {
                s.limiter_register(p).await?;
                return Ok(SharedLimiter::new(store, p));
            }
        };
        sqlx::query(
            "INSERT INTO limiter (account, rate, burst, daily_quota, quota_reset, max_in_flight)
             VALUES ($1, $2, $3, $4, make_interval(mins => $5), $6)
             ON CONFLICT (account) DO UPDATE SET rate = EXCLUDED.rate, burst = EXCLUDED.burst,
                 daily_quota = EXCLUDED.daily_quota, quota_reset = EXCLUDED.quota_reset,
                 max_in_flight = EXCLUDED.max_in_flight, updated_at = now()",
        )
        .bind(p.account())
        .bind(p.requests_per_second)
        .bind(p.burst())
        .bind(p.daily_quota.map(|q| q as i64))
        .bind(p.quota_reset_minutes() as i32)
        .bind(p.max_in_flight.map(|n| n.max(1) as i32))
        .execute(pool)
        .await?;
        Ok(SharedLimiter::new(store, p))
    }

    fn new(store: &Store, p: &ProviderSpec) -> SharedLimiter {
        let cap = p.max_in_flight.map(|n| n.max(1) as usize).unwrap_or(Semaphore::MAX_PERMITS);
        SharedLimiter {
            store: store.clone(),
            account: p.account(),
            in_flight: Arc::new(Semaphore::new(cap)),
            // Two call timeouts and some slack, like a batch's claim.
            lease_secs: 2.0 * p.timeout_secs as f64 + 30.0,
            // Under a shared in-flight cap every slot carries its flight row,
            // so slots are reserved one by one.
            max_batch: if p.max_in_flight.is_some() { 1 } else { batch_size(p.requests_per_second, p.burst(), cap) },
            shared: Arc::new(Local::default()),
        }
    }

    /// Reservation round trips this process has made to the database.
    pub fn round_trips(&self) -> u64 {
        self.shared.round_trips.load(Ordering::Relaxed)
    }

    /// One reservation round trip for `k` slots on the store's clock.
    pub async fn try_reserve(&self, k: usize) -> Result<Result<Granted, Denied>, StoreError> {
        self.try_reserve_at(k, None).await
    }

    /// One reservation round trip for `k` slots at time `now` (Unix
    /// seconds; `None`: the store's clock, as every worker does). A given
    /// clock lets the property tests replay any interleaving on the code
    /// that runs.
    pub async fn try_reserve_at(&self, k: usize, now: Option<f64>) -> Result<Result<Granted, Denied>, StoreError> {
        self.shared.round_trips.fetch_add(1, Ordering::Relaxed);
        let k = k.max(1) as i64;
        let (granted, wait, reason, at, flights): (i64, f64, Option<String>, f64, Vec<i64>) = match &self.store {
            Store::Pg(s) => {
                type Row = (i32, f64, Option<String>, f64, Option<Vec<i64>>);
                let (granted, wait, reason, at, flights): Row = sqlx::query_as(
                    "SELECT granted, wait_secs, reason, extract(epoch FROM at)::float8, flights
                     FROM limiter_reserve($1, $2, $3, to_timestamp($4))",
                )
                .bind(&self.account)
                .bind(k as i32)
                .bind(self.lease_secs)
                .bind(now)
                .fetch_one(&s.pool)
                .await?;
                (i64::from(granted), wait, reason, at, flights.unwrap_or_default())
            }
            Store::Lite(s) => {
                let (r, at, flights) = s.limiter_reserve(&self.account, k, self.lease_secs, now).await?;
                (r.granted, r.wait, r.reason.map(str::to_string), at, flights)
            }
        };
        let wait = Duration::from_secs_f64(wait.max(0.0));
        Ok(match (granted, reason.as_deref()) {
            (n, _) if n > 0 => Ok(Granted { n: n as usize, at, flights }),
            (_, Some("quota")) => Err(Denied::Quota { wait }),
            (_, Some("circuit")) => Err(Denied::Circuit { wait }),
            (_, r) => Err(Denied::Later { wait, reason: r.unwrap_or("rate").to_string() }),
        })
    }

    /// Gives `n` reserved but unused calls back to the day's quota (not to
    /// the rate: a call made later than its slot never breaks the rate).
    /// Nothing is given back once the quota day granted in has ended.
    pub async fn refund(&self, n: usize, granted_at: f64) -> Result<(), StoreError> {
        match &self.store {
            Store::Pg(s) => {
                sqlx::query(
                    "UPDATE limiter SET day_used = greatest(0, day_used - $2)
                     WHERE account = $1 AND quota_day_start <= to_timestamp($3)",
                )
                .bind(&self.account)
                .bind(n as i64)
                .bind(granted_at)
                .execute(&s.pool)
                .await?;
            }
            Store::Lite(s) => s.limiter_refund(&self.account, n as i64, granted_at).await?,
        }
        Ok(())
    }

    /// Ends a call: frees its place under the shared in-flight cap.
    pub async fn release(&self, slot: Slot) -> Result<(), StoreError> {
        match (slot.flight, &self.store) {
            (Some(id), Store::Pg(s)) => {
                sqlx::query("DELETE FROM limiter_flights WHERE flight_id = $1").bind(id).execute(&s.pool).await?;
            }
            (Some(id), Store::Lite(s)) => s.limiter_release(id).await?,
            (None, _) => {}
        }
        Ok(())
    }

    /// Waits for a call slot. Short waits are slept through; a long one (a
    /// big push-back, or the quota) comes back as `Denied` for the caller to
    /// reschedule. The permit holds an in-flight place until dropped.
    pub async fn acquire(&self) -> Result<Result<Slot, Denied>, StoreError> {
        let permit = Arc::clone(&self.in_flight).acquire_owned().await.expect("the semaphore is never closed");
        let local = &self.shared;
        local.waiting.fetch_add(1, Ordering::SeqCst);
        let outcome = self.reserve_one().await;
        local.waiting.fetch_sub(1, Ordering::SeqCst);
        Ok(outcome?.map(|flight| Slot { _permit: permit, flight }))
    }

    /// A banked slot if one is fresh; expired ones go back to the quota.
    async fn take_banked(&self) -> Result<bool, StoreError> {
        match self.shared.take_banked() {
            Banked::Took => Ok(true),
            Banked::Empty => Ok(false),
            Banked::Expired { n, granted_at } => {
                self.refund(n, granted_at).await?;
                Ok(false)
            }
        }
    }

    async fn reserve_one(&self) -> Result<Result<Option<i64>, Denied>, StoreError> {
        let local = &self.shared;
        if self.take_banked().await? {
            return Ok(Ok(None));
        }
        // One caller at a time talks to the database, for everyone waiting;
        // the others queue here (fairly) and take banked slots.
        let _turn = local.reserving.lock().await;
        loop {
            if self.take_banked().await? {
                return Ok(Ok(None));
            }
            let want = local.waiting.load(Ordering::SeqCst).clamp(1, self.max_batch);
            match self.try_reserve(want).await? {
                Ok(granted) => {
                    if granted.n > 1 {
                        *local.bank.lock().expect("bank lock") =
                            Bank { slots: granted.n - 1, at: Some(Instant::now()), granted_at: granted.at };
                    }
                    return Ok(Ok(granted.flights.first().copied()));
                }
                // Sleep holding the turn: nobody else here would get another
                // answer from the database before then. The millisecond's
                // margin keeps a rounding refusal from costing a round trip.
                Err(Denied::Later { wait, .. }) if wait <= MAX_INLINE_WAIT => {
                    tokio::time::sleep(wait + Duration::from_millis(1)).await
                }
                Err(denied) => return Ok(Err(denied)),
            }
        }
    }

    /// A 429: no worker anywhere calls before `retry_after` has passed (the
    /// push-back only moves later). Without `Retry-After`, the shared rate is
    /// halved too (AIMD), and everyone waits one new interval.
    pub async fn push_back(&self, retry_after: Option<Duration>) -> Result<(), StoreError> {
        let pool = match &self.store {
            Store::Pg(s) => &s.pool,
            Store::Lite(s) => {
                return s.limiter_push_back(&self.account, retry_after.map(|d| d.as_secs_f64()), MIN_SCALE).await;
            }
        };
        match retry_after {
            Some(d) => {
                sqlx::query(
                    "UPDATE limiter SET blocked_until = greatest(blocked_until, clock_timestamp() + make_interval(secs => $2)),
                         updated_at = now()
                     WHERE account = $1",
                )
                .bind(&self.account)
                .bind(d.as_secs_f64())
                .execute(pool)
                .await?;
            }
            None => {
                sqlx::query(
                    "UPDATE limiter SET scale = greatest($2, scale / 2),
                         blocked_until = greatest(blocked_until,
                             clock_timestamp() + make_interval(secs => 1.0 / (rate * greatest($2, scale / 2)))),
                         updated_at = now()
                     WHERE account = $1",
                )
                .bind(&self.account)
                .bind(MIN_SCALE)
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// The API answered (any status but a 5xx): the circuit closes, and a
    /// success recovers a little of a reduced rate. One statement, and none
    /// at all in the usual case (full rate, circuit closed).
    pub async fn answered(&self, success: bool) -> Result<(), StoreError> {
        match &self.store {
            Store::Pg(s) => {
                sqlx::query(
                    "UPDATE limiter SET scale = CASE WHEN $2 THEN least(1, scale + $3) ELSE scale END,
                         circuit_since = NULL, circuit_failures = 0, circuit_reason = NULL, server_errors = 0
                     WHERE account = $1 AND (($2 AND scale < 1) OR circuit_since IS NOT NULL OR server_errors > 0)",
                )
                .bind(&self.account)
                .bind(success)
                .bind(RECOVERY_STEP)
                .execute(&s.pool)
                .await?;
            }
            Store::Lite(s) => s.limiter_answered(&self.account, success, RECOVERY_STEP).await?,
        }
        Ok(())
    }

    /// The API could not be reached (connection refused, DNS, TLS): the
    /// circuit opens (or stays open) and the next probe backs off. The call
    /// never reached the API, so its quota unit comes back.
    pub async fn unreachable(&self, reason: &str) -> Result<(), StoreError> {
        self.trip(reason, 1).await
    }

    /// A 5xx answer or a timeout: after [`SERVER_ERRORS_TO_OPEN`] in a row,
    /// across the account, the circuit opens. Returns whether it is open.
    pub async fn server_error(&self, reason: &str) -> Result<bool, StoreError> {
        let run: i64 = match &self.store {
            Store::Pg(s) => {
                sqlx::query_scalar(
                    "UPDATE limiter SET server_errors = server_errors + 1 WHERE account = $1 RETURNING server_errors::bigint",
                )
                .bind(&self.account)
                .fetch_one(&s.pool)
                .await?
            }
            Store::Lite(s) => s.limiter_server_error(&self.account).await?,
        };
        if run >= SERVER_ERRORS_TO_OPEN {
            self.trip(reason, 0).await?;
        }
        Ok(run >= SERVER_ERRORS_TO_OPEN)
    }

    async fn trip(&self, reason: &str, refund: i64) -> Result<(), StoreError> {
        match &self.store {
            Store::Pg(s) => {
                sqlx::query(
                    "UPDATE limiter SET circuit_since = coalesce(circuit_since, clock_timestamp()),
                         circuit_probe_at = clock_timestamp()
                             + make_interval(secs => least($3, 1 << least(circuit_failures, 10))),
                         circuit_failures = circuit_failures + 1, circuit_reason = $2, server_errors = 0,
                         day_used = greatest(0, day_used - $4)
                     WHERE account = $1",
                )
                .bind(&self.account)
                .bind(reason)
                .bind(MAX_PROBE_GAP_SECS)
                .bind(refund)
                .execute(&s.pool)
                .await?;
            }
            Store::Lite(s) => s.limiter_trip(&self.account, reason, MAX_PROBE_GAP_SECS, refund).await?,
        }
        Ok(())
    }

    /// The account's circuit, if it is open.
    pub async fn circuit(&self) -> Result<Option<Circuit>, StoreError> {
        let row: Option<(Option<f64>, f64, Option<String>)> = match &self.store {
            Store::Pg(s) => {
                sqlx::query_as(
                    "SELECT extract(epoch FROM circuit_since)::float8, extract(epoch FROM circuit_probe_at)::float8,
                            circuit_reason
                     FROM limiter WHERE account = $1",
                )
                .bind(&self.account)
                .fetch_optional(&s.pool)
                .await?
            }
            Store::Lite(s) => {
                sqlx::query_as("SELECT circuit_since, circuit_probe_at, circuit_reason FROM limiter WHERE account = ?")
                    .bind(&self.account)
                    .fetch_optional(&s.pool)
                    .await?
            }
        };
        Ok(row.and_then(|(since, probe_at, reason)| {
            Some(Circuit { since: since?, probe_at, reason: reason.unwrap_or_default() })
        }))
    }
}

/// 5xx answers (or timeouts) in a row, across the account, that open the
/// circuit: one can be a bad node; five mean the API is down.
pub const SERVER_ERRORS_TO_OPEN: i64 = 5;
/// Probes back off 1 s, 2 s, 4 s … up to this: an outage ends within a
/// minute of being over, and a long one costs one call a minute.
pub const MAX_PROBE_GAP_SECS: i64 = 60;

/// An open circuit: since when (Unix seconds), when the next probe may go,
/// and the last failure.
#[derive(Debug, Clone, PartialEq)]
pub struct Circuit {
    pub since: f64,
    pub probe_at: f64,
    pub reason: String,
}

/// Slots one reservation may ask for: 20 ms worth of calls at the
/// configured rate, never above the burst (GCRA would refuse more) or the
/// in-flight cap. At low rates that is 1: a round trip per call costs nothing
/// there, and all-or-nothing batches would eat the burst's slack, which
/// absorbs timer jitter (BENCHMARKS.md). At 400 calls/s it is 8.
pub fn batch_size(rate: f64, burst: f64, cap: usize) -> usize {
    ((rate * 0.020).floor() as usize).min(burst.floor() as usize).clamp(1, cap.max(1))
}

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
    /// left, or the in-flight cap fewer places), or 0.
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
    /// Postgres function `limiter_reserve` (migrations/postgres/0003): the
    /// SQLite store runs this inside one `BEGIN IMMEDIATE` transaction, and
    /// the property tests check both against the same rules.
    pub fn reserve(&self, t: f64, k: i64, in_flight: i64, lease: f64) -> Reservation {
        let deny = |wait: f64, reason, row| Reservation { granted: 0, wait: wait.max(0.0), reason: Some(reason), row };
        let mut k = k;
        if self.circuit_since.is_some() {
            if t < self.circuit_probe_at {
                return deny(self.circuit_probe_at - t, "circuit", None);
            }
            // One probe, alone.
            k = 1;
        }
        let em = 1.0 / (self.rate * self.scale);
        let day_start = ((t - self.quota_reset) / 86_400.0).floor() * 86_400.0 + self.quota_reset;
        let used = if self.quota_day_start < day_start { 0 } else { self.day_used };
        if t < self.blocked_until {
            return deny(self.blocked_until - t, "blocked", None);
        }
        let mut n = k;
        if let Some(quota) = self.daily_quota {
            n = n.min(quota - used);
            if n < 1 {
                let row = Bucket { quota_day_start: day_start, day_used: used, ..self.clone() };
                return deny(day_start + 86_400.0 - t, "quota", Some(row));
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
    fn reservations_batch_only_at_high_rates() {
        assert_eq!(batch_size(20.0, 2.0, 8), 1);
        assert_eq!(batch_size(400.0, 16.0, 16), 8);
        assert_eq!(batch_size(400.0, 4.0, 16), 4, "never above the burst");
        assert_eq!(batch_size(5000.0, 200.0, 16), 16, "never above the in-flight cap");
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
    fn the_in_flight_cap_counts_what_is_still_in_flight() {
        let b = Bucket { max_in_flight: Some(3), ..bucket(100.0, 100.0, None) };
        assert_eq!(b.reserve(10.0, 5, 1, 60.0).granted, 2, "two places left");
        let full = b.reserve(10.0, 1, 3, 60.0);
        assert_eq!((full.granted, full.reason), (0, Some("in_flight")));
    }
}
