//! One rate limit for every worker of an account, shared through the state
//! store (Postgres; or SQLite, for the processes of one machine).
//!
//! The `limiter` row of an account holds a GCRA schedule (rate and burst), a
//! push-back time set by 429s, an AIMD scale on the rate, and the day's quota.
//! `limiter_reserve` (a SQL function, see the migration) grants calls under
//! the row's lock, with the database's clock, so workers on many machines act
//! as one careful client and their clocks never matter. If Postgres cannot be
//! reached, nothing is granted: workers pause rather than exceed the limit.
//! [`Gcra`] is the same arithmetic in Rust, for the property tests.

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
    /// Slots granted for waiting callers, and when.
    bank: std::sync::Mutex<(usize, Option<Instant>)>,
    /// Reservation round trips made, for measurement.
    round_trips: std::sync::atomic::AtomicU64,
}

impl Local {
    fn take_banked(&self) -> bool {
        let mut bank = self.bank.lock().expect("bank lock");
        match *bank {
            (n, Some(at)) if n > 0 && at.elapsed() < BANKED_SLOT_TTL => {
                bank.0 -= 1;
                true
            }
            _ => {
                *bank = (0, None);
                false
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

    /// One reservation round trip for `k` slots: how many were granted, and
    /// their flight rows under a shared in-flight cap.
    pub async fn try_reserve(&self, k: usize) -> Result<Result<(usize, Vec<i64>), Denied>, StoreError> {
        self.shared.round_trips.fetch_add(1, Ordering::Relaxed);
        let (granted, wait, reason, flights): (i64, f64, Option<String>, Option<Vec<i64>>) = match &self.store {
            Store::Pg(s) => {
                let (granted, wait, reason, flights): (i32, f64, Option<String>, Option<Vec<i64>>) =
                    sqlx::query_as("SELECT granted, wait_secs, reason, flights FROM limiter_reserve($1, $2, $3)")
                        .bind(&self.account)
                        .bind(k.max(1) as i32)
                        .bind(self.lease_secs)
                        .fetch_one(&s.pool)
                        .await?;
                (i64::from(granted), wait, reason, flights)
            }
            Store::Lite(s) => {
                let (granted, wait, reason, flights) =
                    s.limiter_reserve(&self.account, k.max(1) as i64, self.lease_secs).await?;
                (granted, wait, reason, Some(flights))
            }
        };
        let wait = Duration::from_secs_f64(wait.max(0.0));
        Ok(match (granted, reason.as_deref()) {
            (n, _) if n > 0 => Ok((n as usize, flights.unwrap_or_default())),
            (_, Some("quota")) => Err(Denied::Quota { wait }),
            (_, r) => Err(Denied::Later { wait, reason: r.unwrap_or("rate").to_string() }),
        })
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

    async fn reserve_one(&self) -> Result<Result<Option<i64>, Denied>, StoreError> {
        let local = &self.shared;
        if local.take_banked() {
            return Ok(Ok(None));
        }
        // One caller at a time talks to the database, for everyone waiting;
        // the others queue here (fairly) and take banked slots.
        let _turn = local.reserving.lock().await;
        loop {
            if local.take_banked() {
                return Ok(Ok(None));
            }
            let want = local.waiting.load(Ordering::SeqCst).clamp(1, self.max_batch);
            match self.try_reserve(want).await? {
                Ok((n, flights)) => {
                    if n > 1 {
                        *local.bank.lock().expect("bank lock") = (n - 1, Some(Instant::now()));
                    }
                    return Ok(Ok(flights.first().copied()));
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

    /// A successful call: recover a little of a reduced rate.
    pub async fn succeeded(&self) -> Result<(), StoreError> {
        let pool = match &self.store {
            Store::Pg(s) => &s.pool,
            Store::Lite(s) => return s.limiter_succeeded(&self.account, RECOVERY_STEP).await,
        };
        sqlx::query("UPDATE limiter SET scale = least(1, scale + $2) WHERE account = $1 AND scale < 1")
            .bind(&self.account)
            .bind(RECOVERY_STEP)
            .execute(pool)
            .await?;
        Ok(())
    }
}

/// Slots one reservation may ask for: 20 ms worth of calls at the
/// configured rate, never above the burst (GCRA would refuse more) or the
/// in-flight cap. At low rates that is 1: a round trip per call costs nothing
/// there, and all-or-nothing batches would eat the burst's slack, which
/// absorbs timer jitter (BENCHMARKS.md). At 400 calls/s it is 8.
pub fn batch_size(rate: f64, burst: f64, cap: usize) -> usize {
    ((rate * 0.020).floor() as usize).min(burst.floor() as usize).clamp(1, cap.max(1))
}

/// The reservation arithmetic of `limiter_reserve`, in Rust, for property
/// tests: times are seconds on one clock (the database's).
#[derive(Debug, Clone)]
pub struct Gcra {
    pub rate: f64,
    pub burst: f64,
    pub scale: f64,
    pub tat: f64,
    pub blocked_until: f64,
    pub daily_quota: Option<u64>,
    pub day_start: f64,
    pub day_used: u64,
}

impl Gcra {
    pub fn new(rate: f64, burst: f64, daily_quota: Option<u64>) -> Gcra {
        Gcra {
            rate,
            burst,
            scale: 1.0,
            tat: f64::NEG_INFINITY,
            blocked_until: f64::NEG_INFINITY,
            daily_quota,
            day_start: f64::NEG_INFINITY,
            day_used: 0,
        }
    }

    /// Mirrors `limiter_reserve(account, k)` at time `t`: grants all `k`
    /// (fewer only when the quota has fewer left) or none.
    pub fn reserve(&mut self, t: f64, k: u64) -> Result<u64, Denied> {
        let em = 1.0 / (self.rate * self.scale);
        let day_start = (t / 86_400.0).floor() * 86_400.0;
        let used = if self.day_start < day_start { 0 } else { self.day_used };
        if t < self.blocked_until {
            return Err(Denied::Later { wait: secs(self.blocked_until - t), reason: "blocked".into() });
        }
        let mut n = k;
        if let Some(q) = self.daily_quota {
            n = n.min(q.saturating_sub(used));
            if n == 0 {
                self.day_start = day_start;
                self.day_used = used;
                return Err(Denied::Quota { wait: secs(day_start + 86_400.0 - t) });
            }
        }
        let base = self.tat.max(t);
        if base + n as f64 * em > t + self.burst * em {
            return Err(Denied::Later {
                wait: secs(base + n as f64 * em - (t + self.burst * em)),
                reason: "rate".into(),
            });
        }
        self.tat = base + n as f64 * em;
        self.day_start = day_start;
        self.day_used = used + n;
        Ok(n)
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any interleaving of reservations from several clients: no one-second
        /// window holds more than rate + burst grants, and no day more than
        /// the quota.
        #[test]
        fn grants_never_exceed_rate_plus_burst_per_second_or_the_daily_quota(
            rate in 1.0f64..50.0,
            burst in 1.0f64..20.0,
            quota in 1u64..400,
            // (slots asked, gap in ms): clients ask for one or several slots
            // at their own pace.
            steps in proptest::collection::vec((1u64..8, 0u32..300), 1..600),
        ) {
            let mut g = Gcra::new(rate, burst, Some(quota));
            let mut t = 86_400.0 * 20_000.0 + 86_000.0; // near a UTC midnight, to cross it
            let mut grants = Vec::new();
            for (k, gap) in steps {
                t += f64::from(gap) / 1000.0;
                if let Ok(n) = g.reserve(t, k) {
                    prop_assert!(n >= 1 && n <= k);
                    grants.extend(std::iter::repeat_n(t, n as usize));
                }
            }
            for (i, &start) in grants.iter().enumerate() {
                let in_window = grants[i..].iter().take_while(|&&u| u < start + 1.0).count() as f64;
                prop_assert!(in_window <= rate + burst, "{in_window} grants in 1 s at rate {rate} burst {burst}");
            }
            let mut per_day = std::collections::HashMap::new();
            for t in &grants {
                *per_day.entry((t / 86_400.0).floor() as i64).or_insert(0u64) += 1;
            }
            prop_assert!(per_day.values().all(|&n| n <= quota), "{per_day:?} over quota {quota}");
        }

        #[test]
        fn a_push_back_is_honoured_and_only_moves_later(rate in 1.0f64..50.0, a in 0.0f64..10.0, b in 0.0f64..10.0) {
            let mut g = Gcra::new(rate, 1.0, None);
            g.blocked_until = 100.0 + a.max(b);
            prop_assert!(g.reserve(100.0 + a.max(b) - 0.001, 1).is_err());
            prop_assert!(g.reserve(100.0 + a.max(b), 1).is_ok());
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
    fn a_used_up_quota_waits_for_the_next_day() {
        let mut g = Gcra::new(100.0, 100.0, Some(2));
        let noon = 86_400.0 * 20_000.0 + 43_200.0;
        assert!(g.reserve(noon, 1).is_ok());
        assert!(g.reserve(noon + 1.0, 1).is_ok());
        assert_eq!(g.reserve(noon + 2.0, 1), Err(Denied::Quota { wait: secs(43_198.0) }));
        assert!(g.reserve(noon + 43_200.0, 1).is_ok(), "midnight UTC resets it");
    }
}
