//! Calling the Car Vin API: the [`client`] (one place where every answer is
//! classified: use it, retry, wait, give up, stop the job) and the shared
//! rate [`limiter`] (one token bucket, daily quota, in-flight cap and
//! circuit breaker per account, across every worker of every machine).
//!
//! It decides when a call may go and what its answer means; it does not
//! decide what happens to a batch afterwards (that is [`crate::job`]'s), and
//! its shared state lives in [`crate::store`], whose dialects supply the
//! arithmetic.

pub mod allow;
pub mod client;
pub mod limiter;
