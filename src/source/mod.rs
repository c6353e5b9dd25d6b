//! Where input rows come from.
//!
//! Every source yields [`InputRow`]s in order, as a stream: nothing reads a
//! whole input into memory. Local files live in [`file`]; S3 objects and
//! Postgres queries are added by the runner.

pub mod file;
pub mod parquet;
pub mod postgres;

pub use file::{FileFormat, FileSource};

/// One row of input, before its VIN is parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRow {
    /// 1-based data row number within its file or object (a CSV header is
    /// not a row; a record spanning several lines is one row).
    pub row: u64,
    /// The raw VIN cell, exactly as read (lossily decoded if not UTF-8).
    pub vin: String,
    /// Values of the carried columns, in the order the spec names them
    /// (strings from CSV; typed JSON values from Parquet and Postgres).
    pub carried: Vec<serde_json::Value>,
}

/// A source could not be read. Always names the file and, where one is
/// known, the row.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: cannot open: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("{path}: read failed after row {row}: {source}")]
    Read { path: String, row: u64, source: std::io::Error },
    #[error("{path}: CSV has no column {column:?}; its header has: {header}")]
    MissingColumn { path: String, column: String, header: String },
    #[error("{path}: CSV error at row {row}: {message}")]
    Csv { path: String, row: u64, message: String },
    #[error("{path}: query failed at row {row}: {message}")]
    Query { path: String, row: u64, message: String },
    #[error("{path}: {name:?} is not a valid identifier (letters, digits and _ only; schema.table at most)")]
    BadIdentifier { path: String, name: String },
    #[error("{path}: Parquet error: {message}")]
    Parquet { path: String, message: String },
    #[error("{path}: column {column:?} has type {found}, but a VIN column must hold text")]
    NotText { path: String, column: String, found: String },
    #[error("{path}: a file of one VIN per line has no columns to carry ({columns}); use CSV or Parquet")]
    NoColumns { path: String, columns: String },
}
