//! One rate limit for every worker of an account, shared through the state
//! store (Postgres; or SQLite, for the processes of one machine).
//!
//! The `limiter` row of an account holds a GCRA schedule (rate and burst), a
//! push-back time set by 429s, an AIMD scale on the rate, and the day's quota.
//! `limiter_reserve` (a SQL function, see the migration) grants calls under
//! the row's lock, with the database's clock, so workers on many machines act
//! as one careful client and their clocks never matter. If Postgres cannot be
//! reached, nothing is granted: workers pause rather than exceed the limit.
//! On SQLite the store runs the same arithmetic in Rust, in one `BEGIN
//! IMMEDIATE` transaction. Both take an optional clock, so the property
//! tests (tests/conformance.rs) drive the code that runs.

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
/// The longest back-off that bare 429s in a row add to the push-back (it
/// doubles with each: 0, 1, 3, 7 … seconds): an API that ends a day's
/// quota that way is asked every 10 minutes until its reset, not every few
/// seconds.
pub const MAX_THROTTLE_BACKOFF: Duration = Duration::from_secs(600);
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
    /// The store's time of the grant, to give its quota unit back.
    granted_at: f64,
}

impl Slot {
    /// The store's time of the grant (Unix seconds): a quota unit goes
    /// back only to the quota day it was granted in.
    pub fn granted_at(&self) -> f64 {
        self.granted_at
    }
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
    /// The banked slots' flight rows, one each, when the account's row has
    /// an in-flight cap. The row's settings are whichever process
    /// registered last, so a process that reserves several slots at a time
    /// can be granted flight rows too: each slot carries its own.
    flights: Vec<i64>,
}

/// What the bank had for a caller.
enum Banked {
    /// A slot, granted at this store time, with its flight row if any.
    Took(f64, Option<i64>),
    Empty,
    /// `n` slots were never used in time: their quota goes back, and
    /// their places in flight.
    Expired {
        n: usize,
        granted_at: f64,
        flights: Vec<i64>,
    },
}

impl Local {
    fn take_banked(&self) -> Banked {
        let mut bank = self.bank.lock().expect("bank lock");
        match bank.at {
            Some(at) if bank.slots > 0 && at.elapsed() < BANKED_SLOT_TTL => {
                bank.slots -= 1;
                Banked::Took(bank.granted_at, bank.flights.pop())
            }
            _ => {
                let expired = std::mem::take(&mut *bank);
                if expired.slots > 0 {
                    Banked::Expired { n: expired.slots, granted_at: expired.granted_at, flights: expired.flights }
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
        store.limiter_register(p).await?;
        Ok(SharedLimiter::new(store, p))
    }

    fn new(store: &Store, p: &ProviderSpec) -> SharedLimiter {
        let cap = p.max_in_flight.map(|n| n.max(1) as usize).unwrap_or(Semaphore::MAX_PERMITS);
        SharedLimiter {
            store: store.clone(),
            account: p.account(),
            in_flight: Arc::new(Semaphore::new(cap)),
            // As long as a batch's claim.
            lease_secs: p.call_lease_secs(),
            // Under a shared in-flight cap every slot carries its flight row,
            // so slots are reserved one by one.
            max_batch: if p.max_in_flight.is_some() { 1 } else { batch_size(p.requests_per_second, p.burst(), cap) },
            shared: Arc::new(Local::default()),
        }
    }

    /// The account this limiter shares.
    pub fn account(&self) -> &str {
        &self.account
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
        let (granted, wait, reason, at, flights) =
            self.store.limiter_reserve(&self.account, k, self.lease_secs, now).await?;
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
    /// Nothing is given back once the quota day granted in has ended. An
    /// open circuit's probe given back lets the next probe go at once.
    pub async fn refund(&self, n: usize, granted_at: f64) -> Result<(), StoreError> {
        self.store.limiter_refund(&self.account, n as i64, granted_at).await
    }

    /// A granted call that will not be made: its place is freed and its
    /// quota unit (an open circuit's probe, if it was one) goes back to the
    /// day it was granted in.
    pub async fn give_back(&self, slot: Slot) -> Result<(), StoreError> {
        let granted_at = slot.granted_at;
        self.release(slot).await;
        self.refund(1, granted_at).await
    }

    /// Ends a call: frees its place under the shared in-flight cap. It
    /// cannot fail its caller: a call has been made (and paid for) by then,
    /// and its answer matters more than the place, which a flight row the
    /// store could not delete gives back anyway when its lease runs out.
    pub async fn release(&self, slot: Slot) {
        self.release_flights(slot.flight.into_iter().collect()).await;
    }

    /// Frees these places in flight, or leaves them to their lease.
    async fn release_flights(&self, flights: Vec<i64>) {
        for id in flights {
            if let Err(e) = self.store.limiter_release(id).await {
                tracing::warn!(account = %self.account, flight = id, error = %e,
                    "could not free a place in flight; it frees itself when its lease runs out");
            }
        }
    }

    /// Waits for a call slot. Short waits are slept through; a long one (a
    /// big push-back, or the quota) comes back as `Denied` for the caller to
    /// reschedule. The permit holds an in-flight place until dropped.
    pub async fn acquire(&self) -> Result<Result<Slot, Denied>, StoreError> {
        let never = std::future::pending::<()>();
        Ok(self.acquire_unless(never).await?.expect("a pending future never stops the wait"))
    }

    /// [`acquire`](Self::acquire), unless `stop` completes first: then
    /// `None`, and nothing was granted. The wait ends only where it waits
    /// (for an in-flight place, for this process's turn to reserve, or
    /// for the time the database named), never mid-reservation, so a stop
    /// leaves no slot reserved and no flight row behind.
    pub async fn acquire_unless(
        &self,
        stop: impl Future<Output = ()>,
    ) -> Result<Option<Result<Slot, Denied>>, StoreError> {
        let mut stop = std::pin::pin!(stop);
        let permit = tokio::select! {
            biased;
            () = &mut stop => return Ok(None),
            permit = Arc::clone(&self.in_flight).acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let local = &self.shared;
        local.waiting.fetch_add(1, Ordering::SeqCst);
        let outcome = self.reserve_one(stop).await;
        if local.waiting.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Nobody else waits here. A reservation may have counted a
            // caller that a banked slot served meanwhile: slots left over
            // go back to the quota now, not at some later call (at the end
            // of a run there is none, and the quota would lose them).
            let left = std::mem::take(&mut *local.bank.lock().expect("bank lock"));
            if left.slots > 0 {
                self.release_flights(left.flights).await;
                if let Err(e) = self.refund(left.slots, left.granted_at).await {
                    tracing::warn!(error = %e, slots = left.slots, "could not give unused slots back to the quota");
                }
            }
        }
        Ok(outcome?.map(|granted| granted.map(|(flight, granted_at)| Slot { _permit: permit, flight, granted_at })))
    }

    /// A banked slot's grant time if one is fresh; expired ones go back to
    /// the quota.
    async fn take_banked(&self) -> Result<Option<(Option<i64>, f64)>, StoreError> {
        match self.shared.take_banked() {
            Banked::Took(at, flight) => Ok(Some((flight, at))),
            Banked::Empty => Ok(None),
            Banked::Expired { n, granted_at, flights } => {
                self.release_flights(flights).await;
                self.refund(n, granted_at).await?;
                Ok(None)
            }
        }
    }

    /// One slot (with its flight row, under a shared in-flight cap), or
    /// `None` once `stop` completes while this waits.
    async fn reserve_one(
        &self,
        mut stop: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Option<Result<(Option<i64>, f64), Denied>>, StoreError> {
        let local = &self.shared;
        if let Some(banked) = self.take_banked().await? {
            return Ok(Some(Ok(banked)));
        }
        // One caller at a time talks to the database, for everyone waiting;
        // the others queue here (fairly) and take banked slots.
        let _turn = tokio::select! {
            biased;
            () = &mut stop => return Ok(None),
            turn = local.reserving.lock() => turn,
        };
        loop {
            if let Some(banked) = self.take_banked().await? {
                return Ok(Some(Ok(banked)));
            }
            let want = local.waiting.load(Ordering::SeqCst).clamp(1, self.max_batch);
            match self.try_reserve(want).await? {
                Ok(mut granted) => {
                    let flight = granted.flights.pop();
                    if granted.n > 1 {
                        *local.bank.lock().expect("bank lock") = Bank {
                            slots: granted.n - 1,
                            at: Some(Instant::now()),
                            granted_at: granted.at,
                            flights: granted.flights,
                        };
                    }
                    return Ok(Some(Ok((flight, granted.at))));
                }
                // Sleep holding the turn: nobody else here would get another
                // answer from the database before then. The millisecond's
                // margin keeps a rounding refusal from costing a round trip.
                Err(Denied::Later { wait, .. }) if wait <= MAX_INLINE_WAIT => tokio::select! {
                    biased;
                    () = &mut stop => return Ok(None),
                    () = tokio::time::sleep(wait + Duration::from_millis(1)) => {}
                },
                Err(denied) => return Ok(Some(Err(denied))),
            }
        }
    }

    /// A 429 to the call granted at `granted_at` ([`Slot::granted_at`]): no
    /// worker anywhere calls before `retry_after` has passed (the push-back
    /// only moves later). Without `Retry-After`, the shared rate is halved
    /// (AIMD), once for the calls that were in flight together, and
    /// everyone waits one new interval plus a back-off that doubles with
    /// each such 429 in a row (up to [`MAX_THROTTLE_BACKOFF`]). Returns how
    /// long until calls may start again.
    pub async fn push_back(&self, retry_after: Option<Duration>, granted_at: f64) -> Result<Duration, StoreError> {
        let limits = (MIN_SCALE, MAX_THROTTLE_BACKOFF.as_secs_f64());
        let secs = self
            .store
            .limiter_push_back(&self.account, retry_after.map(|d| d.as_secs_f64()), limits, granted_at)
            .await?;
        Ok(Duration::try_from_secs_f64(secs).unwrap_or(Duration::ZERO))
    }

    /// The API answered (any status but a 5xx): the circuit closes, and a
    /// success recovers a little of a reduced rate. One statement, and none
    /// at all in the usual case (full rate, circuit closed).
    pub async fn answered(&self, success: bool) -> Result<(), StoreError> {
        self.store.limiter_answered(&self.account, success, RECOVERY_STEP).await
    }

    /// `n` calls succeeded, told at once (a group of stored answers): the
    /// circuit closes and the rate recovers `n` steps, as `n` single
    /// [`answered`](Self::answered)s would.
    pub async fn succeeded(&self, n: usize) -> Result<(), StoreError> {
        self.store.limiter_answered(&self.account, true, RECOVERY_STEP * n as f64).await
    }

    /// The API could not be reached (connection refused, DNS, TLS): the
    /// circuit opens (or stays open) and the next probe backs off. The call
    /// never reached the API, so its quota unit comes back to the quota day
    /// it was granted in (`granted_at`, [`Slot::granted_at`]), if that day
    /// is still the store's.
    pub async fn unreachable(&self, reason: &str, granted_at: f64) -> Result<(), StoreError> {
        self.trip(reason, 1, granted_at).await
    }

    /// A 5xx answer or a timeout to the call granted at `granted_at`: after
    /// [`SERVER_ERRORS_TO_OPEN`] in a row, across the account, the circuit
    /// opens. Returns whether it is open. The call reached the API, so its
    /// quota unit is spent.
    pub async fn server_error(&self, reason: &str, granted_at: f64) -> Result<bool, StoreError> {
        let run = self.store.limiter_server_error(&self.account).await?;
        if run >= SERVER_ERRORS_TO_OPEN {
            self.trip(reason, 0, granted_at).await?;
        }
        Ok(run >= SERVER_ERRORS_TO_OPEN)
    }

    async fn trip(&self, reason: &str, refund: i64, granted_at: f64) -> Result<(), StoreError> {
        self.store.limiter_trip(&self.account, reason, MAX_PROBE_GAP_SECS, refund, granted_at).await
    }

    /// The account's circuit, if it is open.
    pub async fn circuit(&self) -> Result<Option<Circuit>, StoreError> {
        let open = self.store.limiter_circuit(&self.account).await?;
        Ok(open.map(|(since, probe_at, reason)| Circuit { since, probe_at, reason }))
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
/// configured rate, below the burst (GCRA would refuse more, and the whole
/// burst only once the schedule has caught up) and never above the
/// in-flight cap. At low rates that is 1: a round trip per call costs nothing
/// there, and all-or-nothing batches would eat the burst's slack, which
/// absorbs timer jitter (BENCHMARKS.md). At 400 calls/s it is 8.
pub fn batch_size(rate: f64, burst: f64, cap: usize) -> usize {
    // One below the burst: a reservation of the whole burst is granted only
    // once the schedule has fully caught up, so every millisecond it came
    // late was lost (R = 100, burst 2: 88 % of R with batches of 2).
    let below_burst = (burst.floor() as usize).saturating_sub(1).max(1);
    ((rate * 0.020).floor() as usize).min(below_burst).clamp(1, cap.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_batch_only_at_high_rates() {
        assert_eq!(batch_size(20.0, 2.0, 8), 1);
        assert_eq!(batch_size(400.0, 16.0, 16), 8);
        assert_eq!(batch_size(400.0, 4.0, 16), 3, "below the burst, which keeps its slack");
        assert_eq!(batch_size(100.0, 2.0, 16), 1);
        assert_eq!(batch_size(5000.0, 200.0, 16), 16, "never above the in-flight cap");
    }
}
