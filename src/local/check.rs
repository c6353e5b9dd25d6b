//! `vinetl check`: what a VIN file holds, before any API call is spent on it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Serialize;

use crate::io::source::{FileFormat, FileSource, SourceError, TextEncoding};
use crate::local::distinct::DistinctVins;
use crate::vin::{Vin, VinError};

/// How many rejected rows a report quotes, so a person can find them.
const EXAMPLES: usize = 10;

/// Counts for one file. `valid + sum(invalid) == rows` always holds.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckReport {
    pub file: String,
    pub rows: u64,
    pub valid: u64,
    /// Rejected rows by kind (every kind listed, zero included).
    pub invalid: BTreeMap<&'static str, u64>,
    /// Valid VINs whose position 9 is not the 565.15 check digit.
    pub check_digit_mismatches: u64,
    /// Valid VINs with a letter in positions 14–17 (565.15 and ISO 3779
    /// want digits there).
    pub serial_not_numeric: u64,
    /// Valid rows whose VIN appeared on an earlier row.
    pub duplicates: u64,
    pub distinct_valid: u64,
    /// The first rejected rows, with their reasons.
    pub examples: Vec<RejectedRow>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RejectedRow {
    pub row: u64,
    pub value: String,
    pub kind: &'static str,
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{path}: temporary storage for duplicate counting failed: {source}")]
    Spill { path: String, source: std::io::Error },
}

/// Reads `path` as a stream and counts what it holds.
pub fn check_file(path: &Path, format: FileFormat, encoding: TextEncoding) -> Result<CheckReport, CheckError> {
    let shown = path.display().to_string();
    let spill = |source| CheckError::Spill { path: shown.clone(), source };
    let mut report = CheckReport {
        file: shown.clone(),
        rows: 0,
        valid: 0,
        invalid: VinError::KINDS.iter().map(|k| (*k, 0)).collect(),
        check_digit_mismatches: 0,
        serial_not_numeric: 0,
        duplicates: 0,
        distinct_valid: 0,
        examples: Vec::new(),
    };
    let mut distinct = DistinctVins::default();
    for row in FileSource::open_encoded(path, &shown, format, encoding)? {
        let row = row?;
        report.rows += 1;
        match Vin::parse(&row.vin) {
            Ok(vin) => {
                report.valid += 1;
                if !vin.check_digit_valid() {
                    report.check_digit_mismatches += 1;
                }
                if !vin.serial_numeric() {
                    report.serial_not_numeric += 1;
                }
                distinct.insert(&vin).map_err(spill)?;
            }
            Err(e) => {
                *report.invalid.get_mut(e.kind()).expect("every kind is listed") += 1;
                if report.examples.len() < EXAMPLES {
                    report.examples.push(RejectedRow {
                        row: row.row,
                        value: row.vin,
                        kind: e.kind(),
                        error: e.to_string(),
                    });
                }
            }
        }
    }
    report.distinct_valid = distinct.finish().map_err(spill)?;
    report.duplicates = report.valid - report.distinct_valid;
    Ok(report)
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.file)?;
        writeln!(f, "  rows                    {:>12}", self.rows)?;
        writeln!(f, "  valid                   {:>12}", self.valid)?;
        for (kind, n) in &self.invalid {
            writeln!(f, "  invalid: {kind:<17} {n:>9}")?;
        }
        writeln!(f, "  check-digit mismatches  {:>12}", self.check_digit_mismatches)?;
        writeln!(f, "  serial not numeric      {:>12}", self.serial_not_numeric)?;
        writeln!(f, "  duplicates              {:>12}", self.duplicates)?;
        writeln!(f, "  distinct valid          {:>12}", self.distinct_valid)?;
        for ex in &self.examples {
            writeln!(f, "  row {}: {:?}: {}", ex.row, ex.value, ex.error)?;
        }
        Ok(())
    }
}
