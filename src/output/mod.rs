//! Outputs: every input row of a job, decoded or carrying its error, written
//! as a Parquet dataset ([`dataset`]) and to Postgres tables ([`tables`]).
//!
//! Both read the same rows ([`OutputRow`], streamed in source order by the
//! state store) and share one column list, documented in the README.

pub mod dataset;
pub mod tables;

use sqlx::types::chrono::{DateTime, Utc};

use crate::spec::{JobSpec, OutputSpec, RecallSpec};

/// How a vehicle column is typed in the outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Int,
    Float,
}

/// The vehicle columns: output name, the API's (vPIC) field, type.
pub const VEHICLE_COLUMNS: &[(&str, &str, Kind)] = &[
    ("make", "Make", Kind::Text),
    ("model", "Model", Kind::Text),
    ("model_year", "ModelYear", Kind::Int),
    ("manufacturer", "Manufacturer", Kind::Text),
    ("series", "Series", Kind::Text),
    ("trim", "Trim", Kind::Text),
    ("vehicle_type", "VehicleType", Kind::Text),
    ("body_class", "BodyClass", Kind::Text),
    ("doors", "Doors", Kind::Int),
    ("drive_type", "DriveType", Kind::Text),
    ("fuel_type_primary", "FuelTypePrimary", Kind::Text),
    ("engine_configuration", "EngineConfiguration", Kind::Text),
    ("engine_cylinders", "EngineCylinders", Kind::Int),
    ("displacement_l", "DisplacementL", Kind::Float),
    ("transmission_style", "TransmissionStyle", Kind::Text),
    ("gvwr", "GVWR", Kind::Text),
    ("plant_city", "PlantCity", Kind::Text),
    ("plant_state", "PlantState", Kind::Text),
    ("plant_country", "PlantCountry", Kind::Text),
    ("vpic_error_code", "ErrorCode", Kind::Text),
];

/// The columns before the vehicle columns, in order.
pub const ROW_COLUMNS: &[&str] = &[
    "job_id",
    "source",
    "source_row",
    "raw_vin",
    "vin",
    "status",
    "error_code",
    "error_text",
    "decoded_at",
    "check_digit_valid",
];

/// The columns after the vehicle columns (before the carried ones).
pub const RECALL_COLUMNS: &[&str] = &["recall_count", "has_recalls", "recall_campaigns", "recall_error"];

/// Every fixed column name: a carried input column may not take one.
pub fn reserved_names() -> impl Iterator<Item = &'static str> {
    ROW_COLUMNS.iter().copied().chain(VEHICLE_COLUMNS.iter().map(|c| c.0)).chain(RECALL_COLUMNS.iter().copied())
}

/// One output row, as the state store reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputRow {
    pub source: String,
    pub source_row: i64,
    pub raw_vin: String,
    pub vin: Option<String>,
    /// `decoded`, `failed` or `invalid` (`pending` only if written early).
    pub status: String,
    pub error_code: Option<String>,
    pub error_text: Option<String>,
    pub decoded_at: Option<DateTime<Utc>>,
    pub check_digit_valid: Option<bool>,
    /// The API's values for [`VEHICLE_COLUMNS`], as text, in that order.
    pub vehicle: Vec<Option<String>>,
    /// Campaign numbers, sorted; `None` when recalls are unknown or off.
    pub recall_campaigns: Option<Vec<String>>,
    /// Why recalls are unknown for a decoded row.
    pub recall_error: Option<String>,
    /// The carried input columns, by name.
    pub carried: serde_json::Map<String, serde_json::Value>,
}

impl OutputRow {
    /// A vehicle value, empty text read as missing.
    pub fn text(&self, i: usize) -> Option<&str> {
        self.vehicle.get(i)?.as_deref().map(str::trim).filter(|s| !s.is_empty())
    }

    pub fn int(&self, i: usize) -> Option<i32> {
        let s = self.text(i)?;
        s.parse().ok().or_else(|| s.parse::<f64>().ok().filter(|f| f.fract() == 0.0).map(|f| f as i32))
    }

    pub fn float(&self, i: usize) -> Option<f64> {
        self.text(i)?.parse().ok().filter(|f: &f64| f.is_finite())
    }

    pub fn recall_count(&self) -> Option<i32> {
        self.recall_campaigns.as_ref().map(|c| c.len() as i32)
    }
}

/// How a job looks recalls up, which decides each row's recall key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecallMode {
    Off,
    ByModel,
    ByVin,
}

impl RecallMode {
    pub fn of(spec: &RecallSpec) -> RecallMode {
        match (spec.enabled, spec.per_vin) {
            (false, _) => RecallMode::Off,
            (true, false) => RecallMode::ByModel,
            (true, true) => RecallMode::ByVin,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RecallMode::Off => "off",
            RecallMode::ByModel => "model",
            RecallMode::ByVin => "vin",
        }
    }
}

/// The type a carried column gets in Parquet, from the values it holds
/// (CSV values are text; Parquet and Postgres sources keep numbers and
/// booleans).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CarriedType {
    Text,
    Int,
    Float,
    Bool,
}

impl CarriedType {
    /// From the JSON types seen in a column (`null` ignored).
    pub fn infer(json_types: &[String], all_integers: bool) -> CarriedType {
        let seen: Vec<&str> = json_types.iter().map(String::as_str).filter(|t| *t != "null").collect();
        match seen.as_slice() {
            ["number"] if all_integers => CarriedType::Int,
            ["number"] => CarriedType::Float,
            ["boolean"] => CarriedType::Bool,
            _ => CarriedType::Text,
        }
    }
}

/// What a job writes, and where, for `status` and the run summary.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq, Eq)]
pub struct Written {
    pub rows: u64,
    pub outputs: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{output}: {message}")]
    Write { output: String, message: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl OutputError {
    pub fn write(output: impl std::fmt::Display, message: impl std::fmt::Display) -> OutputError {
        OutputError::Write { output: output.to_string(), message: message.to_string() }
    }
}

/// Writes every output the spec names, one after the other. Each replaces
/// this job's earlier output wholesale; a dataset partition another, earlier
/// job wrote is replaced too, and that job's status says so.
pub async fn write_all(
    store: &crate::store::Store,
    job_id: i64,
    spec: &JobSpec,
    replace_newer: bool,
) -> Result<Written, OutputError> {
    let mut written = Written::default();
    for output in &spec.outputs {
        let (rows, place) = match output {
            OutputSpec::Parquet { .. } => {
                let done = dataset::write(store, job_id, spec, output, replace_newer).await?;
                if let Some(earlier) = done.replaced {
                    mark_superseded(store, earlier, &done.place, job_id).await?;
                }
                (done.rows, done.place)
            }
            OutputSpec::Postgres { .. } => tables::write(store, job_id, spec, output).await?,
        };
        written.rows = rows;
        written.outputs.push(place);
    }
    Ok(written)
}

/// The note an output line carries once a later job has replaced it.
const SUPERSEDED: &str = " (superseded by job ";

/// Marks `place` in job `earlier`'s outputs as replaced by job `by`.
async fn mark_superseded(store: &crate::store::Store, earlier: i64, place: &str, by: i64) -> Result<(), OutputError> {
    let Some(outputs) = store.job_outputs(earlier).await? else { return Ok(()) };
    let marked: Vec<String> =
        outputs.into_iter().map(|o| if o == place { format!("{o}{SUPERSEDED}{by})") } else { o }).collect();
    store.set_outputs(earlier, &marked).await?;
    Ok(())
}

/// Checks that an output can be written, before any call is paid for.
pub async fn probe(store_pool: Option<&sqlx::PgPool>, output: &OutputSpec) -> Result<(), OutputError> {
    match output {
        OutputSpec::Parquet { .. } => dataset::probe(output).await,
        OutputSpec::Postgres { .. } => tables::probe(store_pool, output).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(vehicle: &[&str]) -> OutputRow {
        OutputRow {
            source: "f".into(),
            source_row: 1,
            raw_vin: "x".into(),
            vin: None,
            status: "decoded".into(),
            error_code: None,
            error_text: None,
            decoded_at: None,
            check_digit_valid: None,
            vehicle: vehicle.iter().map(|s| Some(s.to_string())).collect(),
            recall_campaigns: None,
            recall_error: None,
            carried: Default::default(),
        }
    }

    #[test]
    fn vehicle_values_are_typed_and_empty_text_is_missing() {
        let r = row(&["HONDA", "", "2020", "6.0", "3.5", "V6 "]);
        assert_eq!(r.text(0), Some("HONDA"));
        assert_eq!(r.text(1), None);
        assert_eq!(r.int(2), Some(2020));
        assert_eq!(r.int(3), Some(6));
        assert_eq!(r.float(4), Some(3.5));
        assert_eq!(r.int(5), None);
        assert_eq!(r.text(5), Some("V6"));
        assert_eq!(r.int(40), None);
    }

    #[test]
    fn carried_types_come_from_the_values_seen() {
        let t = |v: &[&str], ints| CarriedType::infer(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>(), ints);
        assert_eq!(t(&["number", "null"], true), CarriedType::Int);
        assert_eq!(t(&["number"], false), CarriedType::Float);
        assert_eq!(t(&["boolean"], true), CarriedType::Bool);
        assert_eq!(t(&["string", "number"], true), CarriedType::Text);
        assert_eq!(t(&[], true), CarriedType::Text);
    }

    #[test]
    fn column_names_are_snake_case_and_unique() {
        let names: Vec<&str> = reserved_names().collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        assert!(names.iter().all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')));
    }
}
