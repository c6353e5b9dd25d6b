//! Where input rows come from.
//!
//! Every source yields [`InputRow`]s in order, as a stream: nothing reads a
//! whole input into memory. Local files live in [`file`]; S3 objects and
//! Postgres queries are added by the runner.

pub mod file;
pub mod parquet;
pub mod postgres;

pub use file::{FileFormat, FileSource};

/// How a text file's bytes become characters: strict UTF-8 (the default,
/// where a byte sequence that is not UTF-8 is an error naming file and row),
/// or a legacy encoding named by its WHATWG label (`latin1`, `windows-1252`,
/// `shift_jis`, ...), decoded by `encoding_rs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TextEncoding(Option<&'static encoding_rs::Encoding>);

impl TextEncoding {
    pub const UTF8: TextEncoding = TextEncoding(None);

    /// `utf-8`/`utf8` is strict UTF-8; any other WHATWG label is that encoding.
    pub fn from_label(label: &str) -> Option<TextEncoding> {
        let e = encoding_rs::Encoding::for_label(label.trim().as_bytes())?;
        Some(if e == encoding_rs::UTF_8 { TextEncoding::UTF8 } else { TextEncoding(Some(e)) })
    }

    /// The encoding a spec names (a label the spec's check accepted), or
    /// strict UTF-8.
    pub fn of(label: Option<&str>) -> TextEncoding {
        label.and_then(TextEncoding::from_label).unwrap_or_default()
    }

    /// Decodes one cell or line of row `row` of `path`.
    pub fn decode(&self, bytes: &[u8], path: &str, row: u64) -> Result<String, SourceError> {
        match self.0 {
            None => match std::str::from_utf8(bytes) {
                Ok(s) => Ok(s.to_string()),
                Err(e) => Err(SourceError::NotUtf8 {
                    path: path.to_string(),
                    row,
                    byte: bytes[e.valid_up_to()],
                    at: e.valid_up_to() + 1,
                }),
            },
            Some(enc) => Ok(enc.decode_without_bom_handling(bytes).0.into_owned()),
        }
    }
}

/// One row of input, before its VIN is parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRow {
    /// 1-based data row number within its file or object (a CSV header is
    /// not a row; a record spanning several lines is one row).
    pub row: u64,
    /// The raw VIN cell, exactly as read (decoded with the source's encoding).
    pub vin: String,
    /// Values of the carried columns, in the order the spec names them
    /// (strings from CSV; typed JSON values from Parquet and Postgres).
    pub carried: Vec<serde_json::Value>,
    /// What is wrong with the row itself, whatever its VIN (a CSV record
    /// with more or fewer fields than its header): it becomes an error row.
    pub problem: Option<String>,
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
    #[error(
        "{path} row {row}: not valid UTF-8 (byte 0x{byte:02x} at byte {at} of the cell); if the file is Latin-1, set source.encoding = \"latin1\" (or --encoding latin1)"
    )]
    NotUtf8 { path: String, row: u64, byte: u8, at: usize },
}
impl SourceError {
    /// A missing column, with the names the input has, each quoted (a
    /// header is input, and may hold anything) and at most 40 of them.
    pub fn missing_column<'a>(path: &str, column: &str, names: impl ExactSizeIterator<Item = &'a str>) -> SourceError {
        const SHOWN: usize = 40;
        let more = names.len().saturating_sub(SHOWN);
        let mut header: Vec<String> = names.take(SHOWN).map(crate::columns::quoted).collect();
        if more > 0 {
            header.push(format!("and {more} more"));
        }
        SourceError::MissingColumn { path: path.to_string(), column: column.to_string(), header: header.join(", ") }
    }
}
