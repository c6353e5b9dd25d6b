//! The Parquet dataset: a local directory or an S3 prefix, Hive-partitioned
//! (`dt=YYYY-MM-DD/`, the job's date, by default), zstd-compressed, with row
//! groups of tens of MB.
//!
//! Commit protocol, the same for both destinations:
//! 1. remove leftovers of this job's earlier attempts (`_temporary/job-N-*`),
//!    if there are any, under the partition's commit lock (see 3);
//! 2. write the data files under `_temporary/job-N-ATTEMPT/` (readers skip
//!    `_`-prefixed paths); the partition's current output stays readable
//!    and marked complete meanwhile;
//! 3. take the partition's commit lock in the state store (one writer at a
//!    time: another job's, or another writer's of this job, waits; its
//!    lease is renewed while held), check again that no later job's output
//!    is there and that this writer's staged files still are (a writer that
//!    took the job's write over removed them in its step 1: this one then
//!    stops and leaves the job to it); then remove the partition's
//!    `_SUCCESS`, then its old data files and manifest;
//! 4. move the new files into the partition (a rename, or an S3 copy), write
//!    `_manifest.json` listing them, then `_SUCCESS`;
//! 5. remove the staging directory, and release the lock.
//!
//! A crash before 3 leaves the previous output whole and marked; a crash in
//! 3 or 4 leaves no `_SUCCESS`, so readers can tell; the next attempt cleans
//! up either way. A partition belongs to one job at a time: writing replaces
//! whatever the partition held, so a reprocess never duplicates rows.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, ListBuilder, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use super::OutputError;
use super::vin_hash::VinHasher;
use crate::columns::{CarriedType, Kind, OutputRow, VEHICLE_COLUMNS, VIN_HMAC, VinHash, place_vin_hmac};
use crate::io::s3::{S3, S3Url};
use crate::spec::{JobSpec, OutputSpec};
use crate::store::Store;

/// Rows per Arrow batch handed to the Parquet encoder.
/// Row groups close at this estimated size (or at [`ROW_GROUP_ROWS`]).
const ROW_GROUP_BYTES: usize = 64 * 1024 * 1024;
const ROW_GROUP_ROWS: usize = 1_000_000;
/// Files close at this many rows unless the spec says otherwise.
pub const DEFAULT_ROWS_PER_FILE: u64 = 2_000_000;

pub const SUCCESS: &str = "_SUCCESS";
pub const MANIFEST: &str = "_manifest.json";
const STAGING: &str = "_temporary";

/// `_manifest.json`: what the committed output holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub job_id: i64,
    pub job_name: String,
    /// The partition directory, relative to the dataset root (`dt=...` or empty).
    pub partition: String,
    pub rows: u64,
    pub files: Vec<ManifestFile>,
    pub columns: Vec<ManifestColumn>,
    pub written_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestFile {
    /// Relative to the dataset root.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestColumn {
    pub name: String,
    pub r#type: String,
}

/// Where a dataset lives.
enum Dest {
    Local(PathBuf),
    S3 { s3: S3, root: S3Url },
}

impl Dest {
    /// `patient`: S3 requests ride out an outage of a minute or two (the
    /// commit of a paid-for output); otherwise they fail fast (a check).
    async fn open(
        path: &str,
        endpoint: Option<&str>,
        region: Option<&str>,
        patient: bool,
    ) -> Result<Dest, OutputError> {
        if path.starts_with("s3://") {
            let mut root = S3Url::parse(path).map_err(|e| OutputError::write(path, e))?;
            if !root.key.is_empty() && !root.key.ends_with('/') {
                root.key.push('/');
            }
            let s3 =
                if patient { S3::connect_patient(endpoint, region).await } else { S3::connect(endpoint, region).await };
            Ok(Dest::S3 { s3, root })
        } else {
            let root = PathBuf::from(path);
            std::fs::create_dir_all(&root).map_err(|e| OutputError::write(path, format!("cannot create: {e}")))?;
            Ok(Dest::Local(root))
        }
    }

    fn shown(&self) -> String {
        match self {
            Dest::Local(root) => root.display().to_string(),
            Dest::S3 { root, .. } => root.to_string(),
        }
    }

    /// `partition_dir` as the job's outputs name it.
    fn place(&self, partition_dir: &str) -> String {
        format!("{}/{partition_dir}", self.shown().trim_end_matches('/'))
    }

    /// The name of `partition_dir`'s commit lock: for a local directory its
    /// canonical path, so `out`, `./out` and a link to it share one lock.
    fn lock_key(&self, partition_dir: &str) -> String {
        match self {
            Dest::Local(root) => match std::fs::canonicalize(root) {
                Ok(root) => Dest::Local(root).place(partition_dir),
                Err(_) => self.place(partition_dir),
            },
            Dest::S3 { .. } => self.place(partition_dir),
        }
    }

    fn err(&self, e: impl std::fmt::Display) -> OutputError {
        OutputError::write(self.shown(), e)
    }

    fn url(root: &S3Url, rel: &str) -> S3Url {
        S3Url { bucket: root.bucket.clone(), key: format!("{}{rel}", root.key) }
    }

    /// Files under `rel` (relative paths), recursively.
    async fn list(&self, rel: &str) -> Result<Vec<String>, OutputError> {
        match self {
            Dest::Local(root) => {
                let mut out = Vec::new();
                let mut dirs = vec![root.join(rel)];
                while let Some(dir) = dirs.pop() {
                    let Ok(entries) = std::fs::read_dir(&dir) else { continue };
                    for entry in entries.flatten() {
                        let path = entry.path();
                        if path.is_dir() {
                            dirs.push(path);
                        } else if let Ok(r) = path.strip_prefix(root) {
                            out.push(r.to_string_lossy().replace('\\', "/"));
                        }
                    }
                }
                out.sort();
                Ok(out)
            }
            Dest::S3 { s3, root } => {
                let keys = s3.keys_under(&Dest::url(root, rel)).await.map_err(|e| self.err(e))?;
                Ok(keys.into_iter().filter_map(|k| k.strip_prefix(&root.key).map(str::to_string)).collect())
            }
        }
    }

    async fn delete(&self, rel: &str) -> Result<(), OutputError> {
        match self {
            Dest::Local(root) => match std::fs::remove_file(root.join(rel)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.err(format!("removing {rel}: {e}"))),
                _ => Ok(()),
            },
            Dest::S3 { s3, root } => s3.delete(&Dest::url(root, rel)).await.map_err(|e| self.err(e)),
        }
    }

    /// Writes a small file whole (a temporary file renamed into place locally).
    async fn put(&self, rel: &str, body: Vec<u8>) -> Result<(), OutputError> {
        match self {
            Dest::Local(root) => {
                let to = root.join(rel);
                let tmp = to.with_extension("tmp");
                std::fs::create_dir_all(to.parent().unwrap_or(root))
                    .and_then(|()| std::fs::write(&tmp, body))
                    .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
                    .and_then(|()| std::fs::rename(&tmp, &to))
                    .and_then(|()| sync_dirs(root, &to))
                    .map_err(|e| self.err(format!("writing {rel}: {e}")))
            }
            Dest::S3 { s3, root } => s3.put_bytes(&Dest::url(root, rel), body).await.map_err(|e| self.err(e)),
        }
    }

    /// A small file's bytes, or `None` if it does not exist.
    async fn get(&self, rel: &str) -> Result<Option<Vec<u8>>, OutputError> {
        match self {
            Dest::Local(root) => match std::fs::read(root.join(rel)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(self.err(format!("reading {rel}: {e}"))),
            },
            Dest::S3 { s3, root } => s3.get_bytes(&Dest::url(root, rel)).await.map_err(|e| self.err(e)),
        }
    }

    /// Moves a staged file into place.
    async fn promote(&self, from: &str, to: &str) -> Result<(), OutputError> {
        match self {
            Dest::Local(root) => {
                let target = root.join(to);
                // Its bytes on disk before its name: the directory's sync
                // in the `put`s of the manifest and the marker after it
                // makes the name durable.
                std::fs::File::open(root.join(from))
                    .and_then(|f| f.sync_all())
                    .and_then(|()| std::fs::create_dir_all(target.parent().unwrap_or(root)))
                    .and_then(|()| std::fs::rename(root.join(from), &target))
                    .map_err(|e| self.err(format!("moving {from} to {to}: {e}")))
            }
            Dest::S3 { s3, root } => {
                s3.copy(&Dest::url(root, from), &Dest::url(root, to)).await.map_err(|e| self.err(e))?;
                s3.delete(&Dest::url(root, from)).await.map_err(|e| self.err(e))
            }
        }
    }

    /// Removes a staging directory and everything under it.
    async fn remove_tree(&self, rel: &str) -> Result<(), OutputError> {
        match self {
            Dest::Local(root) => match std::fs::remove_dir_all(root.join(rel)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.err(format!("removing {rel}: {e}"))),
                _ => Ok(()),
            },
            Dest::S3 { .. } => {
                for key in self.list(rel).await? {
                    self.delete(&key).await?;
                }
                Ok(())
            }
        }
    }
}

/// The Arrow schema of a job's output.
pub fn schema(carried: &[(String, CarriedType)]) -> SchemaRef {
    schema_for(carried, None)
}

/// The Arrow schema of an output with `vin_hash` (`None`: without), with
/// `vin_hmac` where [`place_vin_hmac`] puts it.
pub fn schema_for(carried: &[(String, CarriedType)], vin_hash: Option<VinHash>) -> SchemaRef {
    let text = |n: &str| Field::new(n, DataType::Utf8, true);
    let mut fields = vec![
        Field::new("job_id", DataType::Int64, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("source_row", DataType::Int64, false),
        Field::new("raw_vin", DataType::Utf8, false),
        text("vin"),
        Field::new("status", DataType::Utf8, false),
        text("error_code"),
        text("error_text"),
        Field::new("decoded_at", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
        Field::new("check_digit_valid", DataType::Boolean, true),
    ];
    if let Some(mode) = vin_hash {
        place_vin_hmac(&mut fields, text(VIN_HMAC), mode);
    }
    for (name, _, kind) in VEHICLE_COLUMNS {
        fields.push(Field::new(*name, arrow_type(*kind), true));
    }
    fields.push(Field::new("recall_count", DataType::Int32, true));
    fields.push(Field::new("has_recalls", DataType::Boolean, true));
    fields.push(Field::new(
        "recall_campaigns",
        DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true))),
        true,
    ));
    fields.push(text("recall_error"));
    for (name, t) in carried {
        let dt = match t {
            CarriedType::Text => DataType::Utf8,
            CarriedType::Int => DataType::Int64,
            CarriedType::Float => DataType::Float64,
            CarriedType::Bool => DataType::Boolean,
        };
        fields.push(Field::new(name, dt, true));
    }
    Arc::new(Schema::new(fields))
}

fn arrow_type(kind: Kind) -> DataType {
    match kind {
        Kind::Text => DataType::Utf8,
        Kind::Int => DataType::Int32,
        Kind::Float => DataType::Float64,
    }
}

/// One Arrow batch of output rows.
pub fn record_batch(
    schema: &SchemaRef,
    job_id: i64,
    rows: &[OutputRow],
    carried: &[(String, CarriedType)],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    record_batch_hashed(schema, job_id, rows, carried, None)
}

/// One Arrow batch of an output with `vin_hash` (its schema from
/// [`schema_for`] with the hasher's mode): `vin_hmac` is the hash of `vin`,
/// null where `vin` is.
pub fn record_batch_hashed(
    schema: &SchemaRef,
    job_id: i64,
    rows: &[OutputRow],
    carried: &[(String, CarriedType)],
    hasher: Option<&VinHasher>,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let n = rows.len();
    let strings = |f: &dyn Fn(&OutputRow) -> Option<&str>| -> ArrayRef {
        let mut b = StringBuilder::with_capacity(n, n * 16);
        rows.iter().for_each(|r| b.append_option(f(r)));
        Arc::new(b.finish())
    };
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Builder::with_capacity(n).tap(|b| b.append_value_n(job_id, n)).finish()),
        strings(&|r| Some(&r.source)),
        Arc::new(
            Int64Builder::with_capacity(n).tap(|b| rows.iter().for_each(|r| b.append_value(r.source_row))).finish(),
        ),
        strings(&|r| Some(&r.raw_vin)),
        strings(&|r| r.vin.as_deref()),
        strings(&|r| Some(&r.status)),
        strings(&|r| r.error_code.as_deref()),
        strings(&|r| r.error_text.as_deref()),
        Arc::new(
            TimestampMicrosecondBuilder::with_capacity(n)
                .with_timezone("UTC")
                .tap(|b| rows.iter().for_each(|r| b.append_option(r.decoded_at.map(|t| t.timestamp_micros()))))
                .finish(),
        ),
        Arc::new(
            BooleanBuilder::with_capacity(n)
                .tap(|b| rows.iter().for_each(|r| b.append_option(r.check_digit_valid)))
                .finish(),
        ),
    ];
    if let Some(hasher) = hasher {
        let keyed = hasher.keyed();
        let mut b = StringBuilder::with_capacity(n, n * 64);
        rows.iter().for_each(|r| b.append_option(keyed.vin(r.vin.as_deref())));
        place_vin_hmac(&mut columns, Arc::new(b.finish()) as ArrayRef, hasher.mode());
    }
    for (i, (_, _, kind)) in VEHICLE_COLUMNS.iter().enumerate() {
        columns.push(match kind {
            Kind::Text => strings(&|r| r.text(i)),
            Kind::Int => Arc::new(
                Int32Builder::with_capacity(n).tap(|b| rows.iter().for_each(|r| b.append_option(r.int(i)))).finish(),
            ),
            Kind::Float => Arc::new(
                Float64Builder::with_capacity(n)
                    .tap(|b| rows.iter().for_each(|r| b.append_option(r.float(i))))
                    .finish(),
            ),
        });
    }
    columns.push(Arc::new(
        Int32Builder::with_capacity(n).tap(|b| rows.iter().for_each(|r| b.append_option(r.recall_count()))).finish(),
    ));
    columns.push(Arc::new(
        BooleanBuilder::with_capacity(n)
            .tap(|b| rows.iter().for_each(|r| b.append_option(r.recall_count().map(|c| c > 0))))
            .finish(),
    ));
    let mut lists = ListBuilder::new(StringBuilder::new());
    for r in rows {
        match &r.recall_campaigns {
            Some(c) => {
                c.iter().for_each(|s| lists.values().append_value(s));
                lists.append(true);
            }
            None => lists.append(false),
        }
    }
    columns.push(Arc::new(lists.finish()));
    columns.push(strings(&|r| r.recall_error.as_deref()));
    for (name, t) in carried {
        let get = |r| carried_value(r, name);
        columns.push(match t {
            CarriedType::Int => Arc::new(
                Int64Builder::with_capacity(n)
                    .tap(|b| rows.iter().for_each(|r| b.append_option(get(r).and_then(|v| v.as_i64()))))
                    .finish(),
            ),
            CarriedType::Float => Arc::new(
                Float64Builder::with_capacity(n)
                    .tap(|b| rows.iter().for_each(|r| b.append_option(get(r).and_then(|v| v.as_f64()))))
                    .finish(),
            ),
            CarriedType::Bool => Arc::new(
                BooleanBuilder::with_capacity(n)
                    .tap(|b| rows.iter().for_each(|r| b.append_option(get(r).and_then(|v| v.as_bool()))))
                    .finish(),
            ),
            CarriedType::Text => {
                let mut b = StringBuilder::with_capacity(n, n * 8);
                for r in rows {
                    match get(r) {
                        Some(serde_json::Value::String(s)) => b.append_value(s),
                        Some(other) => b.append_value(other.to_string()),
                        None => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
        });
    }
    RecordBatch::try_new(Arc::clone(schema), columns)
}

fn carried_value<'a>(r: &'a OutputRow, name: &str) -> Option<&'a serde_json::Value> {
    r.carried.get(name).filter(|v| !v.is_null())
}

/// `f(&mut x); x`, to fill a builder in an expression.
trait Tap: Sized {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}
impl<T> Tap for T {}

fn properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("a valid zstd level")))
        .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_created_by(concat!("vinetl ", env!("CARGO_PKG_VERSION")).to_string())
        .build()
}

/// Syncs every directory from `file`'s up to `root`, so that a renamed file's
/// name, and the partition directories made for it, survive a crash of the
/// machine: `_SUCCESS` on disk means the files it vouches for are too. (A
/// rename alone is ordered by no file system's promise; an output written
/// without any sync could come back after a power loss with its marker and
/// an empty data file.)
fn sync_dirs(root: &Path, file: &Path) -> std::io::Result<()> {
    let mut dir = file.parent();
    while let Some(d) = dir {
        std::fs::File::open(d)?.sync_all()?;
        if d == root || !d.starts_with(root) {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

/// A finished data file, written locally.
struct Finished {
    local: PathBuf,
    name: String,
    rows: u64,
    bytes: u64,
}

/// What the encoder writes: the columns, the carried ones and the VIN hash.
struct Layout {
    schema: SchemaRef,
    carried: Vec<(String, CarriedType)>,
    hasher: Option<VinHasher>,
}

/// The encoder: runs on a blocking thread, takes chunks of rows, cuts files
/// at `rows_per_file`, and reports each finished file.
fn encode(
    dir: PathBuf,
    layout: Layout,
    job_id: i64,
    rows_per_file: u64,
    mut chunks: tokio::sync::mpsc::Receiver<Arc<Vec<OutputRow>>>,
    finished: tokio::sync::mpsc::UnboundedSender<Finished>,
) -> Result<u64, String> {
    let Layout { schema, carried, hasher } = layout;
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut total = 0u64;
    let mut current: Option<(ArrowWriter<std::fs::File>, PathBuf, String, u64)> = None;
    let mut files = 0usize;
    let close =
        |(writer, local, name, rows): (ArrowWriter<std::fs::File>, PathBuf, String, u64)| -> Result<Finished, String> {
            writer.close().map_err(|e| format!("finishing {name}: {e}"))?;
            let bytes = std::fs::metadata(&local).map(|m| m.len()).unwrap_or(0);
            Ok(Finished { local, name, rows, bytes })
        };
    while let Some(chunk) = chunks.blocking_recv() {
        let batch =
            record_batch_hashed(&schema, job_id, &chunk, &carried, hasher.as_ref()).map_err(|e| e.to_string())?;
        if current.is_none() {
            let name = format!("part-{files:05}.parquet");
            files += 1;
            let local = dir.join(&name);
            let file = std::fs::File::create(&local).map_err(|e| format!("cannot create {}: {e}", local.display()))?;
            let writer =
                ArrowWriter::try_new(file, Arc::clone(&schema), Some(properties())).map_err(|e| e.to_string())?;
            current = Some((writer, local, name, 0));
        }
        let (writer, _, name, rows) = current.as_mut().expect("a file is open");
        writer.write(&batch).map_err(|e| format!("writing {name}: {e}"))?;
        *rows += chunk.len() as u64;
        total += chunk.len() as u64;
        if *rows >= rows_per_file {
            let done = close(current.take().expect("a file is open"))?;
            finished.send(done).map_err(|_| "the uploader stopped".to_string())?;
        }
    }
    // An empty job still gets one (empty) file, so its schema is on record.
    if current.is_none() && files == 0 {
        let name = "part-00000.parquet".to_string();
        let local = dir.join(&name);
        let file = std::fs::File::create(&local).map_err(|e| format!("cannot create {}: {e}", local.display()))?;
        let writer = ArrowWriter::try_new(file, Arc::clone(&schema), Some(properties())).map_err(|e| e.to_string())?;
        current = Some((writer, local, name, 0));
    }
    if let Some(open) = current.take() {
        finished.send(close(open)?).map_err(|_| "the uploader stopped".to_string())?;
    }
    Ok(total)
}

/// Checks, before any call is paid for, that the dataset's location can be
/// written: creates and removes a probe file (or object) there.
pub async fn probe(output: &OutputSpec) -> Result<(), OutputError> {
    let OutputSpec::Parquet { path, endpoint, region, .. } = output else {
        unreachable!("dataset::probe takes parquet outputs")
    };
    let dest = Dest::open(path, endpoint.as_deref(), region.as_deref(), false).await?;
    let probe = format!("_vinetl_probe_{:016x}", fastrand::u64(..));
    dest.put(&probe, b"vinetl preflight".to_vec()).await?;
    dest.delete(&probe).await
}

/// What a dataset write did.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    pub rows: u64,
    /// The partition written.
    pub place: String,
    /// The earlier job whose output this replaced, if another one's.
    pub replaced: Option<i64>,
}

/// Writes the job's dataset and commits it. A partition belongs to the
/// latest job that wrote it: writing replaces an earlier job's output (the
/// caller marks that job's output superseded), but a later job's output is
/// only replaced with `replace_newer` (`vinetl write --force`).
pub async fn write(
    store: &Store,
    job_id: i64,
    spec: &JobSpec,
    output: &OutputSpec,
    replace_newer: bool,
    rows: super::RowsRx,
) -> Result<Committed, OutputError> {
    let hasher = VinHasher::for_output(output, &super::vin_hash::described(output))?;
    write_hashed(store, job_id, spec, output, replace_newer, hasher, rows).await
}

/// [`write`] with the output's `vin_hash` key already read (`hasher`, from
/// [`VinHasher::for_output`]).
pub async fn write_hashed(
    store: &Store,
    job_id: i64,
    spec: &JobSpec,
    output: &OutputSpec,
    replace_newer: bool,
    hasher: Option<VinHasher>,
    mut rows: super::RowsRx,
) -> Result<Committed, OutputError> {
    let OutputSpec::Parquet { path, partition, endpoint, region, rows_per_file, .. } = output else {
        unreachable!("dataset::write takes parquet outputs")
    };
    if hasher.as_ref().map(VinHasher::mode) != output.vin_hash() {
        return Err(OutputError::write(path, "the output's vin_hash key was not read; nothing was written"));
    }
    let dest = Dest::open(path, endpoint.as_deref(), region.as_deref(), true).await?;
    let partition_dir = match partition.as_deref().unwrap_or("dt") {
        "none" => String::new(),
        key => format!("{key}={}/", store.job_date(job_id).await?.format("%Y-%m-%d")),
    };
    // 0. Whose output the partition holds now: a later job's is refused
    // before anything is staged (and again when committing).
    holder(&dest, &partition_dir, job_id, replace_newer).await?;
    let carried = store.carried_types(job_id, spec.carry()).await?;
    let schema = schema_for(&carried, hasher.as_ref().map(VinHasher::mode));

    // 1. Leftovers of earlier attempts of this job, if any, removed under
    // the partition's commit lock: a writer of this job that outlived its
    // lease may be committing them.
    let place = dest.place(&partition_dir);
    let lock_key = dest.lock_key(&partition_dir);
    let leftovers = || async {
        let ours = format!("{STAGING}/job-{job_id}-");
        let mut dirs: Vec<String> = dest
            .list(&format!("{STAGING}/"))
            .await?
            .into_iter()
            .filter(|p| p.starts_with(&ours))
            .map(|p| p.split('/').take(2).collect::<Vec<_>>().join("/"))
            .collect();
        dirs.dedup();
        Ok::<_, OutputError>(dirs)
    };
    if !leftovers().await?.is_empty() {
        let lock = CommitLock::take(store, &lock_key, job_id).await?;
        let cleared = lock
            .hold(async {
                for dir in leftovers().await? {
                    dest.remove_tree(&dir).await?;
                }
                Ok(())
            })
            .await;
        lock.release().await?;
        cleared?;
    }

    // 2. Stage the data files.
    let attempt = format!("{STAGING}/job-{job_id}-{:016x}", fastrand::u64(..));
    let staged_dir = format!("{attempt}/{partition_dir}");
    let local_dir = match &dest {
        Dest::Local(root) => root.join(&staged_dir),
        Dest::S3 { .. } => std::env::temp_dir().join(format!("vinetl-{}", attempt.replace('/', "-"))),
    };
    let (chunk_tx, chunk_rx) = tokio::sync::mpsc::channel::<Arc<Vec<OutputRow>>>(2);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Finished>();
    let encoder = {
        let (dir, layout) = (local_dir.clone(), Layout { schema: Arc::clone(&schema), carried, hasher });
        let rows_per_file = rows_per_file.unwrap_or(DEFAULT_ROWS_PER_FILE).max(1);
        tokio::task::spawn_blocking(move || encode(dir, layout, job_id, rows_per_file, chunk_rx, done_tx))
    };
    let shown = &dest;
    let producer = async move {
        while let Some(chunk) = super::next_chunk(&mut rows).await.map_err(|e| shown.err(e))? {
            if chunk_tx.send(chunk).await.is_err() {
                break; // the encoder failed; its error is reported below
            }
        }
        Ok::<(), OutputError>(())
    };
    let stager = async {
        let mut files = Vec::new();
        while let Some(f) = done_rx.recv().await {
            let rel = format!("{staged_dir}{}", f.name);
            if let Dest::S3 { s3, root } = &dest {
                let uploaded = s3.upload_file(&f.local, &Dest::url(root, &rel)).await;
                let _ = std::fs::remove_file(&f.local);
                uploaded.map_err(|e| dest.err(e))?;
            }
            files.push(f);
        }
        Ok::<Vec<Finished>, OutputError>(files)
    };
    let (produced, staged, encoded) = tokio::join!(producer, stager, encoder);
    if let Dest::S3 { .. } = &dest {
        let _ = std::fs::remove_dir_all(&local_dir);
    }
    let encoded = encoded.map_err(|e| dest.err(format!("the encoder died: {e}")))?;
    produced?;
    let rows = encoded.map_err(|e| dest.err(e))?;
    let files = staged?;

    // 3–5, the commit, one writer at a time per partition.
    let lock = CommitLock::take(store, &lock_key, job_id).await?;
    let staged = Staged { dir: staged_dir, attempt, files, rows };
    let committed = lock.hold(commit(&dest, &lock, job_id, spec, &partition_dir, &schema, staged, replace_newer)).await;
    lock.release().await?;
    let replaced = committed?;
    Ok(Committed { rows, place, replaced: replaced.filter(|&h| h != job_id) })
}

/// The job whose output `partition_dir` holds now (its manifest's), if any;
/// refused if it is a later job than `job_id`, unless `replace_newer`.
async fn holder(
    dest: &Dest,
    partition_dir: &str,
    job_id: i64,
    replace_newer: bool,
) -> Result<Option<i64>, OutputError> {
    let holder = match dest.get(&format!("{partition_dir}{MANIFEST}")).await? {
        Some(bytes) => serde_json::from_slice::<Manifest>(&bytes).ok().map(|m| m.job_id),
        None => None,
    };
    if let Some(newer) = holder.filter(|&h| h > job_id)
        && !replace_newer
    {
        return Err(dest.err(format!(
            "{partition_dir} holds job {newer}'s output, written after this job's; `vinetl write {job_id} --force` replaces it"
        )));
    }
    Ok(holder)
}

/// What a write staged: its files and their rows, in `dir` of `attempt`.
struct Staged {
    dir: String,
    attempt: String,
    files: Vec<Finished>,
    rows: u64,
}

/// The largest object S3's CopyObject copies (5 GiB).
const S3_COPY_MAX: u64 = 5 * 1024 * 1024 * 1024;

/// A partition's commit lock lasts this long from its last renewal (every
/// [`COMMIT_RENEW`] while held): a writer that died holding it keeps the
/// partition's other writers waiting at most this long.
const COMMIT_LEASE_SECS: f64 = crate::job::advance::WRITE_LEASE_SECS;
const COMMIT_RENEW: std::time::Duration = std::time::Duration::from_secs(10);

/// A partition's commit lock, held in the state store (see
/// [`Store::lock_output`]). Dropped unreleased (the write's future dropped
/// mid-commit: a failed heartbeat, a stopping process), it is released in
/// the background.
struct CommitLock {
    store: Store,
    place: String,
    holder: String,
    released: bool,
}

impl CommitLock {
    /// Waits until this writer holds `place`'s lock.
    async fn take(store: &Store, place: &str, job_id: i64) -> Result<CommitLock, OutputError> {
        let holder = format!("job-{job_id}-{:016x}", fastrand::u64(..));
        let mut said = false;
        while !store.lock_output(place, &holder, job_id, COMMIT_LEASE_SECS).await? {
            if !said {
                tracing::info!(job = job_id, %place, "another writer is committing into this partition; waiting");
                said = true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        Ok(CommitLock { store: store.clone(), place: place.to_string(), holder, released: false })
    }

    /// Runs `work` under the lock, renewing its lease as it goes. A renewal
    /// that finds the lock gone (this writer stalled past its lease and
    /// another took it) stops the work: another writer is committing.
    async fn hold<T>(&self, work: impl std::future::Future<Output = Result<T, OutputError>>) -> Result<T, OutputError> {
        let renew = async {
            loop {
                tokio::time::sleep(COMMIT_RENEW).await;
                match self.store.renew_output(&self.place, &self.holder, COMMIT_LEASE_SECS).await {
                    Ok(true) => {}
                    Ok(false) => {
                        return OutputError::TakenOver(format!(
                            "{}: this writer's commit lock lapsed and another writer took it",
                            self.place
                        ));
                    }
                    Err(e) => return e.into(),
                }
            }
        };
        tokio::select! {
            done = work => done,
            stopped = renew => Err(stopped),
        }
    }

    /// Renews the lease at once: `TakenOver` if another writer took the
    /// lock while this one stalled (between two renewals of [`hold`]).
    /// Asked before each step that changes what readers see.
    async fn still_held(&self) -> Result<(), OutputError> {
        if self.store.renew_output(&self.place, &self.holder, COMMIT_LEASE_SECS).await? {
            return Ok(());
        }
        Err(OutputError::TakenOver(format!(
            "{}: this writer's commit lock lapsed and another writer took it; this writer stops",
            self.place
        )))
    }

    async fn release(mut self) -> Result<(), OutputError> {
        self.released = true;
        Ok(self.store.unlock_output(&self.place, &self.holder).await?)
    }
}

impl Drop for CommitLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (store, place, holder) =
                (self.store.clone(), std::mem::take(&mut self.place), std::mem::take(&mut self.holder));
            rt.spawn(async move {
                if let Err(e) = store.unlock_output(&place, &holder).await {
                    tracing::warn!(%place, error = %e, "releasing a commit lock failed; its lease frees it");
                }
            });
        }
    }
}

/// Steps 3 to 5 of a write, under the partition's lock: checks again whose
/// output it holds and that this writer's staged files are still there (a
/// writer that took this job's write over, its lease run out, removed
/// them), then retires the current output, moves the new files in, then
/// the manifest, then the marker. Returns the job whose output it replaced.
#[allow(clippy::too_many_arguments)]
async fn commit(
    dest: &Dest,
    lock: &CommitLock,
    job_id: i64,
    spec: &JobSpec,
    partition_dir: &str,
    schema: &arrow::datatypes::Schema,
    staged: Staged,
    replace_newer: bool,
) -> Result<Option<i64>, OutputError> {
    let Staged { dir: staged_dir, attempt, files, rows } = staged;
    let holder = holder(dest, partition_dir, job_id, replace_newer).await?;
    let present: std::collections::HashSet<String> = dest.list(&staged_dir).await?.into_iter().collect();
    if let Some(gone) = files.iter().find(|f| !present.contains(&format!("{staged_dir}{}", f.name))) {
        return Err(OutputError::TakenOver(format!(
            "{}: {staged_dir}{} is gone: another writer took this job's write over; nothing was committed",
            dest.shown(),
            gone.name
        )));
    }
    // S3 copies an object of up to 5 GiB in one request (`S3::copy`): a
    // larger file is refused here, before the partition's output is
    // retired, not after.
    if let Dest::S3 { .. } = dest
        && let Some(big) = files.iter().find(|f| f.bytes > S3_COPY_MAX)
    {
        return Err(dest.err(format!(
            "{} is {} bytes, more than S3 copies in one request (5 GiB); lower outputs.rows_per_file; \
             nothing was committed",
            big.name, big.bytes
        )));
    }
    // 3. Retire the partition's current output (still this writer's to
    // retire: a stall since the last renewal may have lost the lock).
    lock.still_held().await?;
    dest.delete(&format!("{partition_dir}{SUCCESS}")).await?;
    for old in dest.list(partition_dir).await? {
        let direct = old.strip_prefix(partition_dir).is_some_and(|rest| !rest.contains('/'));
        if direct && (old.ends_with(".parquet") || old.ends_with(MANIFEST)) {
            dest.delete(&old).await?;
        }
    }
    // 4. Move the new files in, then the manifest, then the marker.
    let mut listed = Vec::new();
    for f in &files {
        let to = format!("{partition_dir}{}", f.name);
        dest.promote(&format!("{staged_dir}{}", f.name), &to).await?;
        listed.push(ManifestFile { path: to, rows: f.rows, bytes: f.bytes });
    }
    let manifest = Manifest {
        job_id,
        job_name: spec.name.clone(),
        partition: partition_dir.trim_end_matches('/').to_string(),
        rows,
        files: listed,
        columns: schema
            .fields()
            .iter()
            .map(|f| ManifestColumn { name: f.name().clone(), r#type: f.data_type().to_string() })
            .collect(),
        written_at: sqlx::types::chrono::Utc::now().to_rfc3339(),
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
    dest.put(&format!("{partition_dir}{MANIFEST}"), json).await?;
    // The marker vouches for these files: only while they are this
    // writer's to vouch for.
    lock.still_held().await?;
    let marker = serde_json::json!({"job_id": job_id, "rows": rows, "files": manifest.files.len()});
    dest.put(&format!("{partition_dir}{SUCCESS}"), marker.to_string().into_bytes()).await?;
    // 5. Staging is empty now; remove what is left of it.
    dest.remove_tree(&attempt).await?;
    if let Dest::Local(root) = dest {
        let _ = std::fs::remove_dir(root.join(STAGING));
    }
    Ok(holder)
}

/// Whether a dataset partition is committed: its `_SUCCESS` and manifest
/// exist. Readers that cannot check should read the manifest's files.
pub fn is_committed(dir: &Path) -> bool {
    dir.join(SUCCESS).is_file() && dir.join(MANIFEST).is_file()
}
