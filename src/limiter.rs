//! Rate limiting of API calls.
//!
//! This is the per-process limiter: a token bucket at the spec's rate and
//! burst, a cap on calls in flight, and a pause that every call in the
//! process honours after a 429's `Retry-After`. Workers in other processes do
//! not see it; the shared Postgres limiter (issue #5) replaces it for fleets
//! of workers.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// When no `Retry-After` comes with a 429, wait this long before the next call.
pub const DEFAULT_429_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    paused_until: Instant,
}

/// A token bucket plus an in-flight cap, shared by every task of a process
/// calling one account.
#[derive(Debug, Clone)]
pub struct LocalLimiter {
    rate: f64,
    burst: f64,
    bucket: Arc<Mutex<Bucket>>,
    in_flight: Arc<Semaphore>,
}

impl LocalLimiter {
    pub fn new(rate: f64, burst: f64, max_in_flight: Option<u32>) -> LocalLimiter {
        let now = Instant::now();
        LocalLimiter {
            rate,
            burst: burst.max(1.0),
            bucket: Arc::new(Mutex::new(Bucket { tokens: burst.max(1.0), at: now, paused_until: now })),
            in_flight: Arc::new(Semaphore::new(
                max_in_flight.map(|n| n.max(1) as usize).unwrap_or(Semaphore::MAX_PERMITS),
            )),
        }
    }

    /// Waits for a slot; the permit holds an in-flight place until dropped.
    pub async fn acquire(&self) -> OwnedSemaphorePermit {
        let permit = Arc::clone(&self.in_flight).acquire_owned().await.expect("the semaphore is never closed");
        loop {
            let wait = {
                let mut b = self.bucket.lock().await;
                let now = Instant::now();
                if now < b.paused_until {
                    b.paused_until - now
                } else {
                    b.tokens = (b.tokens + (now - b.at).as_secs_f64() * self.rate).min(self.burst);
                    b.at = now;
                    if b.tokens >= 1.0 {
                        b.tokens -= 1.0;
                        return permit;
                    }
                    Duration::from_secs_f64((1.0 - b.tokens) / self.rate)
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// A 429: nobody in this process calls again before `after` has passed.
    /// The pause only ever moves later.
    pub async fn pause(&self, after: Duration) {
        let mut b = self.bucket.lock().await;
        let until = Instant::now() + after;
        if until > b.paused_until {
            b.paused_until = until;
            b.tokens = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn grants_follow_rate_and_burst() {
        let l = LocalLimiter::new(4.0, 2.0, None);
        let start = Instant::now();
        let mut at = Vec::new();
        for _ in 0..6 {
            drop(l.acquire().await);
            at.push((Instant::now() - start).as_secs_f64());
        }
        // Two at once (the burst), then one every 1/4 s.
        let want = [0.0, 0.0, 0.25, 0.5, 0.75, 1.0];
        for (got, want) in at.iter().zip(want) {
            assert!((got - want).abs() < 0.01, "{at:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_everyone_and_only_moves_later() {
        let l = LocalLimiter::new(100.0, 100.0, None);
        let start = Instant::now();
        l.pause(Duration::from_secs(3)).await;
        l.pause(Duration::from_secs(1)).await;
        drop(l.acquire().await);
        assert!(Instant::now() - start >= Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_is_capped() {
        let l = LocalLimiter::new(1000.0, 1000.0, Some(2));
        let a = l.acquire().await;
        let _b = l.acquire().await;
        let third = tokio::time::timeout(Duration::from_secs(1), l.acquire()).await;
        assert!(third.is_err(), "a third call waits while two are in flight");
        drop(a);
        assert!(tokio::time::timeout(Duration::from_secs(1), l.acquire()).await.is_ok());
    }
}
