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
use std::sync::{Arc, LazyLock, Mutex, mpsc};
use std::time::Instant;

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::Serialize;

use crate::api::{ApiError, Vehicle, code};
use crate::io::output::{OutputRow, VEHICLE_COLUMNS, dataset};
use crate::io::source::{FileFormat, FileSource, InputRow, SourceError, TextEncoding};
use crate::local::decoder::Decoder;
use crate::vin::{Vin, VinError};

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
    /// One Parquet file (zstd): the CSV's columns, vehicle fields typed as
    /// in the job outputs.
    Parquet,
}

/// Where the writer puts encoded chunks.
enum Sink<W: Write + Send> {
    Bytes(W),
    Parquet(Box<ArrowWriter<W>>),
}

/// A decoded chunk, encoded by the decoder thread: bytes to write as they
/// are (JSON lines, CSV), or an Arrow batch for the Parquet writer.
enum Encoded {
    Bytes(Vec<u8>),
    Batch(RecordBatch),
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

impl From<parquet::errors::ParquetError> for DecodeFileError {
    fn from(e: parquet::errors::ParquetError) -> Self {
        match e {
            parquet::errors::ParquetError::External(e) => match e.downcast::<std::io::Error>() {
                Ok(io) => DecodeFileError::Write(*io),
                Err(e) => DecodeFileError::Write(std::io::Error::other(e)),
            },
            e => DecodeFileError::Write(std::io::Error::other(e)),
        }
    }
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

/// A row's VIN and its decode, or why it is not a VIN.
type Decoded = Result<(Vin, Vehicle), VinError>;

/// The job outputs' columns a decode has, for Parquet (`source_row` as
/// `row`): the schema, and each column's index in the job outputs' batch.
static PARQUET_COLUMNS: LazyLock<(SchemaRef, SchemaRef, Vec<usize>)> = LazyLock::new(|| {
    let job = dataset::schema(&[]);
    let mut fields = Vec::new();
    let mut indices = Vec::new();
    for name in csv_header() {
        let from = if name == "row" { "source_row" } else { name };
        let (i, field) = job.column_with_name(from).expect("the decode's columns are job output columns");
        fields.push(field.clone().with_name(name));
        indices.push(i);
    }
    (Arc::new(Schema::new(fields)), job, indices)
});

/// One chunk's rows as an Arrow batch of [`PARQUET_COLUMNS`], built as job
/// output rows so the columns are typed as the job outputs type them.
fn parquet_batch(rows: &[InputRow], decoded: &[Decoded]) -> RecordBatch {
    let out: Vec<OutputRow> = rows
        .iter()
        .zip(decoded)
        .map(|(row, d)| {
            let (vin, status, code, text, cdv, vehicle) = match d {
                Ok((vin, v)) => (
                    Some(vin.to_string()),
                    "decoded",
                    None,
                    None,
                    Some(vin.check_digit_valid()),
                    VEHICLE_COLUMNS.iter().map(|(_, f, _)| Some(v.field(f).to_string())).collect(),
                ),
                Err(e) => (
                    None,
                    "invalid",
                    Some(e.kind().to_string()),
                    Some(e.to_string()),
                    None,
                    vec![None; VEHICLE_COLUMNS.len()],
                ),
            };
            OutputRow {
                source: String::new(),
                source_row: row.row as i64,
                raw_vin: row.vin.clone(),
                vin,
                status: status.to_string(),
                error_code: code,
                error_text: text,
                decoded_at: None,
                check_digit_valid: cdv,
                vehicle,
                recall_campaigns: None,
                recall_error: None,
                carried: Default::default(),
            }
        })
        .collect();
    let (schema, job_schema, indices) = &*PARQUET_COLUMNS;
    let job = dataset::record_batch(job_schema, 0, &out, &[]).expect("decode rows fit the job schema");
    RecordBatch::try_new(Arc::clone(schema), indices.iter().map(|i| Arc::clone(job.column(*i))).collect())
        .expect("projected columns fit their schema")
}

/// One JSON line per row: `row`, `input`, then the batch-decode entry.
fn json_lines(rows: &[InputRow], decoded: &[Decoded]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * 600);
    for (row, d) in rows.iter().zip(decoded) {
        let entry = match d {
            Ok((_, v)) => Entry::Decoded(v),
            Err(e) => Entry::Failed {
                vin: &row.vin,
                error: ApiError { code: code::INVALID_VIN.into(), message: format!("row {}: {e}", row.row) },
            },
        };
        serde_json::to_writer(&mut out, &JsonLine { row: row.row, input: &row.vin, entry })
            .expect("writing JSON to memory cannot fail");
        out.push(b'\n');
    }
    out
}

/// One CSV record per row, in [`csv_header`]'s columns (no header).
fn csv_records(rows: &[InputRow], decoded: &[Decoded]) -> Vec<u8> {
    let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::with_capacity(rows.len() * 300));
    for (row, d) in rows.iter().zip(decoded) {
        let mut record: Vec<String> = vec![row.row.to_string(), row.vin.clone()];
        match d {
            Ok((vin, v)) => {
                record.extend([
                    vin.to_string(),
                    "decoded".into(),
                    String::new(),
                    String::new(),
                    vin.check_digit_valid().to_string(),
                ]);
                record.extend(VEHICLE_COLUMNS.iter().map(|(_, field, _)| v.field(field).to_string()));
            }
            Err(e) => {
                record.extend([String::new(), "invalid".into(), e.kind().into(), e.to_string(), String::new()]);
                record.extend(VEHICLE_COLUMNS.iter().map(|_| String::new()));
            }
        }
        w.write_record(&record).expect("writing CSV to memory cannot fail");
    }
    w.into_inner().expect("an in-memory CSV writer flushes")
}

/// Decodes one chunk, then encodes it for the output's format.
fn decode_chunk(decoder: &Decoder, rows: Vec<InputRow>, format: OutputFormat) -> (Encoded, Summary) {
    let decoded: Vec<Decoded> = rows
        .iter()
        .map(|row| {
            Vin::parse(&row.vin).map(|vin| {
                let vehicle = decoder.decode(&vin);
                (vin, vehicle)
            })
        })
        .collect();
    let mut counts = Summary { rows: rows.len() as u64, ..Summary::default() };
    for d in &decoded {
        match d {
            Ok((_, v)) => {
                counts.decoded += 1;
                counts.no_make += u64::from(v.make.is_empty());
            }
            Err(_) => counts.invalid += 1,
        }
    }
    let encoded = match format {
        OutputFormat::Jsonl => Encoded::Bytes(json_lines(&rows, &decoded)),
        OutputFormat::Csv => Encoded::Bytes(csv_records(&rows, &decoded)),
        OutputFormat::Parquet => Encoded::Batch(parquet_batch(&rows, &decoded)),
    };
    (encoded, counts)
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
    let (done_tx, done_rx) = mpsc::sync_channel::<(usize, Encoded, Summary)>(threads * 2);
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
        let writer = scope.spawn(move || -> Result<Summary, DecodeFileError> {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
            if output == OutputFormat::Csv {
                let mut w = csv::Writer::from_writer(Vec::new());
                w.write_record(csv_header()).expect("writing CSV to memory cannot fail");
                out.write_all(&w.into_inner().expect("an in-memory CSV writer flushes"))
                    .map_err(DecodeFileError::Write)?;
            }
            let mut sink = match output {
                OutputFormat::Parquet => {
                    let props =
                        WriterProperties::builder().set_compression(Compression::ZSTD(Default::default())).build();
                    Sink::Parquet(Box::new(ArrowWriter::try_new(out, Arc::clone(&PARQUET_COLUMNS.0), Some(props))?))
                }
                _ => Sink::Bytes(out),
            };
            let mut total = Summary::default();
            let mut pending = BTreeMap::new();
            let mut next = 0;
            for (i, encoded, counts) in done_rx {
                pending.insert(i, (encoded, counts));
                while let Some((encoded, counts)) = pending.remove(&next) {
                    match (encoded, &mut sink) {
                        (Encoded::Batch(batch), Sink::Parquet(w)) => w.write(&batch)?,
                        (Encoded::Bytes(bytes), Sink::Bytes(w)) => {
                            w.write_all(&bytes).map_err(DecodeFileError::Write)?
                        }
                        _ => unreachable!("chunks are encoded for the output's format"),
                    }
                    total.rows += counts.rows;
                    total.decoded += counts.decoded;
                    total.invalid += counts.invalid;
                    total.no_make += counts.no_make;
                    next += 1;
                }
            }
            let mut out = match sink {
                Sink::Parquet(w) => w.into_inner()?,
                Sink::Bytes(w) => w,
            };
            out.flush().map_err(DecodeFileError::Write)?;
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
        let written = writer.join().expect("the writer does not panic")?;
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
