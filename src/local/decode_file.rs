//! `vinetl decode --file`: offline enrichment with the embedded vPIC data,
//! for users who need only vPIC's fields and have no API account. It reads
//! what the sources read (lines, CSV, Parquet; gzip and zstd), decodes on
//! every core, and writes one line per input row, in input order, as JSON
//! lines or CSV.
//!
//! The pipeline is three stages joined by bounded channels, so memory stays
//! flat at any size: one reader, `threads` decoders, one writer that puts
//! chunks back in order.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use serde::Serialize;

use crate::api::{ApiError, Vehicle, code};
use crate::io::output::VEHICLE_COLUMNS;
use crate::io::source::{FileFormat, FileSource, InputRow, SourceError, TextEncoding};
use crate::local::decoder::Decoder;
use crate::vin::Vin;

/// Rows per unit of work: large enough that channel hops cost nothing per
/// row, small enough that a few chunks in flight per thread stay small.
const CHUNK: usize = 2_048;

/// How decoded rows are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// One JSON object per row: `row`, `input`, then batch-decode's entry.
    Jsonl,
    /// A header, then one record per row: the Parquet outputs' column names.
    Csv,
}

/// What a run read and decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub rows: u64,
    pub decoded: u64,
    pub invalid: u64,
    /// Valid VINs vPIC could not place (no make).
    pub no_make: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeFileError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Decoder(#[from] crate::local::decoder::DecoderUnavailable),
    #[error("writing the output failed: {0}")]
    Write(std::io::Error),
}

/// A JSON line: the row, what it held, and the batch-decode entry.
#[derive(Serialize)]
struct JsonLine<'a> {
    row: u64,
    input: &'a str,
    #[serde(flatten)]
    entry: Entry<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Entry<'a> {
    Decoded(&'a Vehicle),
    Failed {
        #[serde(rename = "VIN")]
        vin: &'a str,
        error: ApiError,
    },
}

/// The CSV columns, in order.
fn csv_header() -> Vec<&'static str> {
    let mut h = vec!["row", "raw_vin", "vin", "status", "error_code", "error_text", "check_digit_valid"];
    h.extend(VEHICLE_COLUMNS.iter().map(|c| c.0));
    h
}

/// Decodes one chunk into its encoded output and its counts.
fn decode_chunk(decoder: &Decoder, rows: Vec<InputRow>, format: OutputFormat) -> (Vec<u8>, Summary) {
    let mut out = Vec::with_capacity(rows.len() * 600);
    let mut counts = Summary::default();
    let mut csv =
        (format == OutputFormat::Csv).then(|| csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new()));
    for row in rows {
        counts.rows += 1;
        let parsed = Vin::parse(&row.vin);
        let vehicle = parsed.as_ref().ok().map(|vin| decoder.decode(vin));
        match &vehicle {
            Some(v) if v.make.is_empty() => counts.no_make += 1,
            Some(_) => {}
            None => counts.invalid += 1,
        }
        if vehicle.is_some() {
            counts.decoded += 1;
        }
        match &mut csv {
            None => {
                let entry = match (&vehicle, &parsed) {
                    (Some(v), _) => Entry::Decoded(v),
                    (None, Err(e)) => Entry::Failed {
                        vin: &row.vin,
                        error: ApiError { code: code::INVALID_VIN.into(), message: format!("row {}: {e}", row.row) },
                    },
                    (None, Ok(_)) => unreachable!("a parsed VIN is decoded"),
                };
                serde_json::to_writer(&mut out, &JsonLine { row: row.row, input: &row.vin, entry })
                    .expect("writing JSON to memory cannot fail");
                out.push(b'\n');
            }
            Some(w) => {
                let row_no = row.row.to_string();
                let mut record: Vec<String> = vec![row_no, row.vin.clone()];
                match (&vehicle, &parsed) {
                    (Some(v), Ok(vin)) => {
                        record.extend([
                            vin.to_string(),
                            "decoded".into(),
                            String::new(),
                            String::new(),
                            vin.check_digit_valid().to_string(),
                        ]);
                        record.extend(VEHICLE_COLUMNS.iter().map(|(_, field, _)| v.field(field).to_string()));
                    }
                    (_, Err(e)) => {
                        record.extend([String::new(), "invalid".into(), e.kind().into(), e.to_string(), String::new()]);
                        record.extend(VEHICLE_COLUMNS.iter().map(|_| String::new()));
                    }
                    (None, Ok(_)) => unreachable!("a parsed VIN is decoded"),
                }
                w.write_record(&record).expect("writing CSV to memory cannot fail");
            }
        }
    }
    if let Some(w) = csv {
        out = w.into_inner().expect("an in-memory CSV writer flushes");
    }
    (out, counts)
}

/// Decodes every row of `path` (`-`: standard input) with `threads`
/// decoders, writing to `out` in input order.
pub fn decode_file(
    path: &Path,
    format: FileFormat,
    encoding: TextEncoding,
    output: OutputFormat,
    threads: usize,
    out: impl Write + Send,
) -> Result<Summary, DecodeFileError> {
    let stdin = path == Path::new("-");
    let (open, shown) =
        if stdin { (Path::new("/dev/stdin"), "stdin".to_string()) } else { (path, path.display().to_string()) };
    let source = FileSource::open_encoded(open, &shown, format, encoding)?;
    let decoder = Decoder::new()?;
    let threads = threads.max(1);
    let (work_tx, work_rx) = mpsc::sync_channel::<(usize, Vec<InputRow>)>(threads * 2);
    let work_rx = Arc::new(Mutex::new(work_rx));
    let (done_tx, done_rx) = mpsc::sync_channel::<(usize, Vec<u8>, Summary)>(threads * 2);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (rx, tx, decoder) = (Arc::clone(&work_rx), done_tx.clone(), &decoder);
            scope.spawn(move || {
                loop {
                    let next = rx.lock().expect("work queue lock").recv();
                    let Ok((i, rows)) = next else { return };
                    let (bytes, counts) = decode_chunk(decoder, rows, output);
                    if tx.send((i, bytes, counts)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        let writer = scope.spawn(move || -> Result<Summary, std::io::Error> {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
            if output == OutputFormat::Csv {
                let mut w = csv::Writer::from_writer(Vec::new());
                w.write_record(csv_header()).expect("writing CSV to memory cannot fail");
                out.write_all(&w.into_inner().expect("an in-memory CSV writer flushes"))?;
            }
            let mut total = Summary::default();
            let mut pending = BTreeMap::new();
            let mut next = 0;
            for (i, bytes, counts) in done_rx {
                pending.insert(i, (bytes, counts));
                while let Some((bytes, counts)) = pending.remove(&next) {
                    out.write_all(&bytes)?;
                    total.rows += counts.rows;
                    total.decoded += counts.decoded;
                    total.invalid += counts.invalid;
                    total.no_make += counts.no_make;
                    next += 1;
                }
            }
            out.flush()?;
            Ok(total)
        });
        let mut read_error = None;
        let mut chunk = Vec::with_capacity(CHUNK);
        let mut index = 0;
        for row in source {
            match row {
                Ok(row) => chunk.push(row),
                Err(e) => {
                    read_error = Some(e);
                    break;
                }
            }
            if chunk.len() == CHUNK {
                if work_tx.send((index, std::mem::take(&mut chunk))).is_err() {
                    break;
                }
                index += 1;
            }
        }
        if !chunk.is_empty() {
            let _ = work_tx.send((index, chunk));
        }
        drop(work_tx);
        let written = writer.join().expect("the writer does not panic").map_err(DecodeFileError::Write)?;
        // Rows before a read error are written; the error names the file and row.
        match read_error {
            Some(e) => Err(e.into()),
            None => Ok(written),
        }
    })
}

/// The stderr summary: counts and throughput.
pub fn describe(s: &Summary, threads: usize, started: Instant) -> String {
    let secs = started.elapsed().as_secs_f64();
    format!(
        "vinetl decode: {} rows, {} decoded ({} with no make), {} invalid, in {secs:.2} s on {threads} thread{}: {:.0} rows/s",
        s.rows,
        s.decoded,
        s.no_make,
        s.invalid,
        if threads == 1 { "" } else { "s" },
        s.rows as f64 / secs.max(1e-9)
    )
}
