//! The outside world's data: job inputs ([`source`]: local files, S3
//! objects, Postgres tables and queries), job outputs ([`output`]: Parquet
//! datasets, Postgres tables) and the one S3 client both use ([`s3`]).
//!
//! Formats, paths and commit protocols live here; what a row means (its
//! columns) is [`crate::columns`]'s, and which rows a job has is
//! [`crate::store`]'s.

pub mod output;
pub mod s3;
pub mod source;
