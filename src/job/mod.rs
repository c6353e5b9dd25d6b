//! A job's path from spec to outputs: the checks made before anything is
//! paid for ([`preflight`]), planning ([`plan`]: read, parse, dedupe, cache,
//! batch), the queue of batch tasks ([`queue`]), the workers that make the
//! calls ([`worker`]), and the steps after the last call ([`advance`]:
//! recall lookups, outputs, done), retention once it has ended
//! ([`prune`]), and the runs of scheduled specs ([`scheduler`]).
//!
//! This layer owns the order of things and the job's state machine. It
//! holds no SQL (that is [`crate::store`]'s), no HTTP (that is
//! [`crate::call`]'s) and no file format (that is [`crate::io`]'s).

pub mod advance;
pub mod forget;
pub mod plan;
pub mod preflight;
pub mod prune;
pub mod queue;
pub mod scheduler;
pub mod worker;
