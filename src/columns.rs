//! The output's columns and rows: the vocabulary the state store, the
//! outputs and the specs share. It imports nothing of vinetl's, so anything
//! may import it.

use sqlx::types::chrono::{DateTime, Utc};

/// How a vehicle column is typed in the outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Int,
    Float,
}

impl Kind {
    /// The column's Postgres type in the outputs' tables.
    pub fn pg_type(self) -> &'static str {
        match self {
            Kind::Text => "TEXT",
            Kind::Int => "INTEGER",
            Kind::Float => "DOUBLE PRECISION",
        }
    }
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

/// The keyed hash of the VIN an output may add (`vin_hash`): lowercase hex
/// HMAC-SHA-256 of `vin`, placed right after it (or where `raw_vin` and
/// `vin` were, with [`VinHash::Instead`]).
pub const VIN_HMAC: &str = "vin_hmac";

/// The VIN columns an output with a keyed hash of the VIN leaves out or keeps
/// (`raw_vin` holds the VIN as read, so it goes too).
const VIN_COLUMNS: &[&str] = &["raw_vin", "vin"];

/// An output's `vin_hash`: a `vin_hmac` column beside the VIN columns, or
/// instead of them (for outputs that leave the secure zone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VinHash {
    /// `raw_vin` and `vin` stay; `vin_hmac` follows `vin`.
    Beside,
    /// `raw_vin` and `vin` are left out; `vin_hmac` takes their place.
    Instead,
}

impl VinHash {
    pub fn as_str(self) -> &'static str {
        match self {
            VinHash::Beside => "beside",
            VinHash::Instead => "instead",
        }
    }
}

/// Places the `vin_hmac` item in a list laid out like [`ROW_COLUMNS`] (names,
/// fields or arrays), the rest of the list following: after `vin` with
/// `beside`; with `instead`, in place of `raw_vin` and `vin`, which are
/// removed. The one place that decides the order, so a schema and its
/// batches cannot disagree.
pub fn place_vin_hmac<T>(items: &mut Vec<T>, vin_hmac: T, mode: VinHash) {
    let at = |name: &str| ROW_COLUMNS.iter().position(|c| *c == name).expect("a row column");
    let (raw_vin, vin) = (at(VIN_COLUMNS[0]), at(VIN_COLUMNS[1]));
    debug_assert_eq!(raw_vin + 1, vin, "raw_vin and vin are adjacent");
    match mode {
        VinHash::Beside => items.insert(vin + 1, vin_hmac),
        VinHash::Instead => {
            items.splice(raw_vin..=vin, [vin_hmac]);
        }
    }
}

/// The row columns an output writes before the vehicle columns.
pub fn row_columns(vin_hash: Option<VinHash>) -> Vec<&'static str> {
    let mut names = ROW_COLUMNS.to_vec();
    if let Some(mode) = vin_hash {
        place_vin_hmac(&mut names, VIN_HMAC, mode);
    }
    names
}

/// The columns after the vehicle columns (before the carried ones), each
/// with its Postgres type in the outputs' tables.
pub const RECALL_COLUMNS: &[(&str, &str)] = &[
    ("recall_count", "INTEGER"),
    ("has_recalls", "BOOLEAN"),
    ("recall_campaigns", "TEXT[]"),
    ("recall_error", "TEXT"),
];

/// Column definitions (`name TYPE`, comma-separated) of the vehicle and
/// recall columns, as the outputs' tables type them.
pub fn vehicle_and_recall_ddl() -> String {
    let vehicle = VEHICLE_COLUMNS.iter().map(|(name, _, kind)| (*name, kind.pg_type()));
    let cols: Vec<String> = vehicle.chain(RECALL_COLUMNS.iter().copied()).map(|(n, t)| format!("{n} {t}")).collect();
    cols.join(", ")
}

/// Every fixed column name: a carried input column may not take one.
pub fn reserved_names() -> impl Iterator<Item = &'static str> {
    ROW_COLUMNS
        .iter()
        .copied()
        .chain([VIN_HMAC])
        .chain(VEHICLE_COLUMNS.iter().map(|c| c.0))
        .chain(RECALL_COLUMNS.iter().map(|c| c.0))
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
        vehicle_text(&self.vehicle, i)
    }

    pub fn int(&self, i: usize) -> Option<i32> {
        vehicle_int(&self.vehicle, i)
    }

    pub fn float(&self, i: usize) -> Option<f64> {
        vehicle_float(&self.vehicle, i)
    }

    pub fn recall_count(&self) -> Option<i32> {
        self.recall_campaigns.as_ref().map(|c| c.len() as i32)
    }
}

/// Vehicle value `i` of `vehicle` (in [`VEHICLE_COLUMNS`] order), trimmed,
/// empty text read as missing: how every output reads a text column.
pub fn vehicle_text(vehicle: &[Option<String>], i: usize) -> Option<&str> {
    vehicle.get(i)?.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// Vehicle value `i` as an integer column reads it: an integer, or a
/// number with no fraction (saturated to `i32`); anything else is missing.
pub fn vehicle_int(vehicle: &[Option<String>], i: usize) -> Option<i32> {
    let s = vehicle_text(vehicle, i)?;
    s.parse().ok().or_else(|| s.parse::<f64>().ok().filter(|f| f.fract() == 0.0).map(|f| f as i32))
}

/// Vehicle value `i` as a float column reads it: a finite number, else missing.
pub fn vehicle_float(vehicle: &[Option<String>], i: usize) -> Option<f64> {
    vehicle_text(vehicle, i)?.parse().ok().filter(|f: &f64| f.is_finite())
}

/// Postgres COPY text, for the outputs' tables and the store's server-side
/// results write (one encoding, so both paths write the same values).
pub mod copy_text {
    use super::{Kind, VEHICLE_COLUMNS, vehicle_float, vehicle_int, vehicle_text};

    /// A column and its tab: `\N` for null, else the text escaped for COPY.
    pub fn field(buf: &mut String, v: Option<&str>) {
        match v {
            None => buf.push_str("\\N"),
            Some(s) => escape(buf, s),
        }
        buf.push('\t');
    }

    /// COPY's text escapes: backslash, tab, newline and carriage return.
    pub fn escape(buf: &mut String, s: &str) {
        if !s.contains(['\\', '\t', '\n', '\r']) {
            buf.push_str(s);
            return;
        }
        for c in s.chars() {
            match c {
                '\\' => buf.push_str("\\\\"),
                '\t' => buf.push_str("\\t"),
                '\n' => buf.push_str("\\n"),
                '\r' => buf.push_str("\\r"),
                c => buf.push(c),
            }
        }
    }

    /// A `text[]` literal: every element quoted, `"` and `\` escaped.
    pub fn array_literal(items: &[String]) -> String {
        let quoted: Vec<String> =
            items.iter().map(|s| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))).collect();
        format!("{{{}}}", quoted.join(","))
    }

    /// The vehicle columns, each with its tab, typed as [`VEHICLE_COLUMNS`] says.
    pub fn vehicle(buf: &mut String, vehicle: &[Option<String>]) {
        for (i, (_, _, kind)) in VEHICLE_COLUMNS.iter().enumerate() {
            match kind {
                Kind::Text => field(buf, vehicle_text(vehicle, i)),
                Kind::Int => field(buf, vehicle_int(vehicle, i).map(|n| n.to_string()).as_deref()),
                Kind::Float => field(buf, vehicle_float(vehicle, i).map(|f| f.to_string()).as_deref()),
            }
        }
    }

    /// The recall columns (`recall_count`, `has_recalls`, `recall_campaigns`),
    /// each with its tab; `recall_error` is the caller's.
    pub fn recalls(buf: &mut String, campaigns: Option<&[String]>) {
        let count = campaigns.map(<[String]>::len);
        field(buf, count.map(|n| n.to_string()).as_deref());
        field(buf, count.map(|n| if n > 0 { "t" } else { "f" }));
        field(buf, campaigns.map(array_literal).as_deref());
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn copy_text_escapes_and_nulls() {
            let mut buf = String::new();
            field(&mut buf, Some("a\tb\\c\nd"));
            field(&mut buf, None);
            assert_eq!(buf, "a\\tb\\\\c\\nd\t\\N\t");
            assert_eq!(array_literal(&["24V1".into(), "x\"y".into()]), "{\"24V1\",\"x\\\"y\"}");
            assert_eq!(array_literal(&[]), "{}");
        }
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

/// What [`CarriedType::infer`] reads of each carried column: the JSON
/// types its values have had, and whether its numbers were all integers.
/// Gathered as rows are planned (the store keeps it per source), so an
/// output need not scan every row for it.
/// The largest carried integer typed as an integer (18 digits: what a
/// BIGINT column holds); a larger one is typed as a float. The record below
/// and both stores' scans of the rows (`CARRIED_TYPES`) decide by it.
pub const CARRIED_INT_MAX: i64 = 999_999_999_999_999_999;

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CarriedSeen(std::collections::BTreeMap<String, SeenTypes>);

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SeenTypes {
    pub types: std::collections::BTreeSet<String>,
    pub ints: bool,
}

impl CarriedSeen {
    /// Adds a row's carried object.
    pub fn add(&mut self, carried: &serde_json::Value) {
        use serde_json::Value;
        let Value::Object(columns) = carried else { return };
        for (name, value) in columns {
            let kind = match value {
                Value::Null => "null",
                Value::Bool(_) => "boolean",
                Value::Number(_) => "number",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            };
            let seen = match self.0.get_mut(name.as_str()) {
                Some(seen) => seen,
                None => self.0.entry(name.clone()).or_insert(SeenTypes { types: Default::default(), ints: true }),
            };
            if !seen.types.contains(kind) {
                seen.types.insert(kind.to_string());
            }
            if let Value::Number(n) = value
                && seen.ints
            {
                seen.ints = n.as_i64().is_some_and(|i| (-CARRIED_INT_MAX..=CARRIED_INT_MAX).contains(&i));
            }
        }
    }

    /// Both sets of rows together.
    pub fn merge(&mut self, other: &CarriedSeen) {
        for (name, theirs) in &other.0 {
            match self.0.get_mut(name) {
                Some(ours) => {
                    ours.types.extend(theirs.types.iter().cloned());
                    ours.ints &= theirs.ints;
                }
                None => {
                    self.0.insert(name.clone(), theirs.clone());
                }
            }
        }
    }

    /// The Parquet type of column `name` (text if it was never seen).
    pub fn infer(&self, name: &str) -> CarriedType {
        match self.0.get(name) {
            Some(seen) => CarriedType::infer(&seen.types.iter().cloned().collect::<Vec<_>>(), seen.ints),
            None => CarriedType::Text,
        }
    }
}

/// Lowercase letters, digits and `_`, starting with a letter or `_`, at
/// most 63 long: a schema, table or partition name that is spliced into DDL
/// (identifiers cannot be bound), so it is checked first.
pub fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Text from outside (an API's error message) fit for a message or a log
/// line: control characters escaped (`\u{1b}`), cut after `max_chars`.
/// Unlike [`quoted`], plain text stays as it is, without quotes.
pub fn escaped(s: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_chars + 8));
    for (i, c) in s.chars().enumerate() {
        if i == max_chars {
            out.push('…');
            break;
        }
        if c.is_control() { out.extend(c.escape_debug()) } else { out.push(c) }
    }
    out
}

/// Input quoted for a message: cut to 80 characters and escaped as a Rust
/// string literal (`"…"`, control characters as `\u{1b}`), so a header,
/// a cell or an API's error text can neither run on for pages nor drive the
/// terminal it is printed on.
pub fn quoted(s: &str) -> String {
    const MAX_CHARS: usize = 80;
    let cut: String = s.chars().take(MAX_CHARS).collect();
    if cut.len() < s.len() { format!("{cut:?}…") } else { format!("{cut:?}") }
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

    #[test]
    fn vin_hmac_goes_beside_vin_or_replaces_both_vin_columns() {
        assert_eq!(row_columns(None), ROW_COLUMNS);
        let beside = row_columns(Some(VinHash::Beside));
        assert_eq!(&beside[..6], ["job_id", "source", "source_row", "raw_vin", "vin", "vin_hmac"]);
        assert_eq!(beside.len(), ROW_COLUMNS.len() + 1);
        let instead = row_columns(Some(VinHash::Instead));
        assert_eq!(&instead[..5], ["job_id", "source", "source_row", "vin_hmac", "status"]);
        assert!(!instead.iter().any(|c| c.contains("vin") && *c != VIN_HMAC), "{instead:?}");
        assert_eq!(instead.len(), ROW_COLUMNS.len() - 1);
    }

    #[test]
    fn quoted_input_cannot_drive_a_terminal_or_run_on() {
        assert_eq!(quoted("vin"), "\"vin\"");
        let q = quoted("\u{1b}]0;owned\u{7}\u{1b}[31mred");
        assert!(!q.chars().any(|c| c.is_control()), "{q}");
        assert!(q.contains("\\u{1b}"), "{q}");
        let long = "x".repeat(500);
        assert!(quoted(&long).chars().count() < 90);
        assert_eq!(escaped("invalid API key", 200), "invalid API key");
        assert_eq!(escaped("a\u{1b}[2Jb\n", 200), "a\\u{1b}[2Jb\\n");
        assert_eq!(escaped(&long, 10), format!("{}…", "x".repeat(10)));
    }
}
