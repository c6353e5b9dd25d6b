//! Recall data for `vinetl serve`: NHTSA's flat file or recallsByVehicle JSON,
//! indexed by make, model and model year.
//!
//! `FLAT_RCL.txt` (NHTSA's RCL.txt data dictionary): one record per line,
//! tab-separated, no header, no quoting, CRLF line ends, dates `YYYYMMDD`,
//! 29 fields since May 2025 (older files have 23 to 27; missing trailing
//! fields read as empty). Only vehicle recalls (`RCLTYPECD` = `V`) are kept,
//! as NHTSA's recallsByVehicle answers only those.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use crate::api::Recall;

/// A sample of real NHTSA records, shipped so the server has recalls to
/// answer with out of the box (see jobs/recalls/README.md).
pub const SAMPLE_FLAT: &str = include_str!("../../jobs/recalls/FLAT_RCL_sample.txt");
pub const SAMPLE_JSON: &str = include_str!("../../jobs/recalls/recalls_sample.json");

/// Fields (1-based, as in RCL.txt) this server reads.
mod field {
    pub const CAMPNO: usize = 2;
    pub const MAKETXT: usize = 3;
    pub const MODELTXT: usize = 4;
    pub const YEARTXT: usize = 5;
    pub const COMPNAME: usize = 7;
    pub const MFGNAME: usize = 8;
    pub const RCLTYPECD: usize = 11;
    pub const RCDATE: usize = 16;
    pub const DESC_DEFECT: usize = 20;
    pub const CONEQUENCE_DEFECT: usize = 21;
    pub const CORRECTIVE_ACTION: usize = 22;
    pub const NOTES: usize = 23;
    pub const DO_NOT_DRIVE: usize = 28;
    pub const PARK_OUTSIDE: usize = 29;
}

/// NOTES (field 23) has been present since 2007; anything shorter is not a
/// recall record.
const MIN_FIELDS: usize = field::NOTES;

#[derive(Debug, thiserror::Error)]
pub enum RecallsError {
    #[error("{path}: cannot read recall data: {source}")]
    Read { path: String, source: std::io::Error },
    #[error(
        "{path} line {line}: expected at least {MIN_FIELDS} tab-separated fields (NHTSA FLAT_RCL layout), found {found}"
    )]
    Fields { path: String, line: usize, found: usize },
    #[error("{path}: not recallsByVehicle JSON: {message}")]
    Json { path: String, message: String },
}

/// Recalls by (make, model, year). Make and model match case-insensitively
/// and ignoring punctuation and spaces (`F-150` = `F150`, `Model S` = `MODEL S`).
#[derive(Debug, Default)]
pub struct RecallIndex {
    by_vehicle: HashMap<(String, String, u16), Vec<Recall>>,
    records: usize,
}

impl RecallIndex {
    /// The shipped sample (flat-file rows and JSON records).
    pub fn sample() -> RecallIndex {
        let mut index = RecallIndex::default();
        index.add_flat("FLAT_RCL_sample.txt", SAMPLE_FLAT).expect("the shipped flat sample parses");
        index.add_json("recalls_sample.json", SAMPLE_JSON).expect("the shipped JSON sample parses");
        index
    }

    /// Loads a file: JSON when it starts with `{` or `[`, the flat file otherwise.
    pub fn load(path: &Path) -> Result<RecallIndex, RecallsError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| RecallsError::Read { path: shown.clone(), source })?;
        // The flat file is mostly UTF-8 with some cp1252 bytes; keep the rest.
        let text = String::from_utf8_lossy(&bytes);
        let mut index = RecallIndex::default();
        if text.trim_start().starts_with(['{', '[']) {
            index.add_json(&shown, &text)?;
        } else {
            index.add_flat(&shown, &text)?;
        }
        Ok(index)
    }

    /// Number of recall records indexed (one per vehicle and campaign).
    pub fn len(&self) -> usize {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Recalls for a vehicle, oldest report first.
    pub fn lookup(&self, make: &str, model: &str, year: u16) -> &[Recall] {
        self.by_vehicle.get(&(fold(make), fold(model), year)).map(Vec::as_slice).unwrap_or_default()
    }

    fn insert(&mut self, recall: Recall) {
        let Ok(year) = recall.model_year.trim().parse::<u16>() else { return };
        let key = (fold(&recall.make), fold(&recall.model), year);
        let list = self.by_vehicle.entry(key).or_default();
        // One campaign can list a vehicle once per component; answer once.
        if list.iter().any(|r| r.campaign_number == recall.campaign_number) {
            return;
        }
        list.push(recall);
        list.sort_by_key(|r| sortable_date(&r.report_received_date));
        self.records += 1;
    }

    fn add_flat(&mut self, path: &str, text: &str) -> Result<(), RecallsError> {
        for (i, line) in text.split('\n').enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() < MIN_FIELDS {
                return Err(RecallsError::Fields { path: path.to_string(), line: i + 1, found: f.len() });
            }
            let get = |n: usize| f.get(n - 1).map(|s| s.trim_end()).unwrap_or("");
            if get(field::RCLTYPECD) != "V" {
                continue;
            }
            let notes = get(field::NOTES);
            self.insert(Recall {
                manufacturer: get(field::MFGNAME).to_string(),
                campaign_number: get(field::CAMPNO).to_string(),
                park_it: get(field::DO_NOT_DRIVE).eq_ignore_ascii_case("yes"),
                park_outside: get(field::PARK_OUTSIDE).eq_ignore_ascii_case("yes"),
                over_the_air_update: None,
                action_number: None,
                report_received_date: nhtsa_date(get(field::RCDATE)),
                component: get(field::COMPNAME).to_string(),
                summary: get(field::DESC_DEFECT).to_string(),
                consequence: get(field::CONEQUENCE_DEFECT).to_string(),
                remedy: get(field::CORRECTIVE_ACTION).to_string(),
                notes: (!notes.is_empty()).then(|| notes.to_string()),
                model_year: get(field::YEARTXT).to_string(),
                make: get(field::MAKETXT).to_string(),
                model: get(field::MODELTXT).to_string(),
            });
        }
        Ok(())
    }

    fn add_json(&mut self, path: &str, text: &str) -> Result<(), RecallsError> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Shape {
            Envelope { results: Vec<Recall> },
            List(Vec<Recall>),
        }
        let shape: Shape = serde_json::from_str(text)
            .map_err(|e| RecallsError::Json { path: path.to_string(), message: e.to_string() })?;
        let (Shape::Envelope { results: list } | Shape::List(list)) = shape;
        for r in list {
            self.insert(r);
        }
        Ok(())
    }
}

/// Upper case, letters and digits only.
fn fold(s: &str) -> String {
    s.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_uppercase()).collect()
}

/// `YYYYMMDD` → NHTSA's API form `DD/MM/YYYY`; anything else unchanged.
fn nhtsa_date(s: &str) -> String {
    if s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit()) {
        format!("{}/{}/{}", &s[6..8], &s[4..6], &s[0..4])
    } else {
        s.to_string()
    }
}

/// `DD/MM/YYYY` → `YYYYMMDD` for ordering.
fn sortable_date(s: &str) -> String {
    let p: Vec<&str> = s.split('/').collect();
    if p.len() == 3 { format!("{}{}{}", p[2], p[1], p[0]) } else { s.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_sample_loads_real_campaigns() {
        let index = RecallIndex::sample();
        assert!(index.len() >= 30, "{}", index.len());
        let camry = index.lookup("toyota", "Camry", 2018);
        assert!(camry.iter().any(|r| r.campaign_number == "18V108000"), "{camry:?}");
        let r = camry.iter().find(|r| r.campaign_number == "18V108000").unwrap();
        assert_eq!(r.report_received_date, "14/02/2018");
        assert!(r.component.starts_with("FUEL SYSTEM"));
    }

    #[test]
    fn matching_ignores_case_spaces_and_punctuation() {
        let index = RecallIndex::sample();
        assert_eq!(index.lookup("Ford", "F150", 2019), index.lookup("FORD", "f-150", 2019));
        assert!(!index.lookup("Tesla", "Model S", 2013).is_empty());
        assert!(index.lookup("Tesla", "Model S", 1999).is_empty());
    }

    #[test]
    fn equipment_recalls_are_not_vehicle_recalls() {
        // The sample's first row is a seat-cover (equipment) recall listed
        // against the 2010 Ford Escape.
        let index = RecallIndex::sample();
        assert!(index.lookup("FORD", "ESCAPE", 2010).iter().all(|r| r.campaign_number != "10E043000"));
    }

    #[test]
    fn flat_rows_map_to_nhtsas_json_fields() {
        let mut f = vec![""; 29];
        f[1] = "23V123000";
        f[2] = "ACME";
        f[3] = "ROADSTER";
        f[4] = "2023";
        f[6] = "BRAKES";
        f[7] = "Acme Motors";
        f[10] = "V";
        f[15] = "20230105";
        f[19] = "Brakes may fail.";
        f[20] = "Crash risk.";
        f[21] = "Dealers will fix.";
        f[27] = "Yes";
        f[28] = "No";
        let mut index = RecallIndex::default();
        index.add_flat("t", &format!("{}\r\n", f.join("\t"))).unwrap();
        let r = &index.lookup("acme", "roadster", 2023)[0];
        assert_eq!(
            (r.campaign_number.as_str(), r.report_received_date.as_str(), r.park_it, r.park_outside),
            ("23V123000", "05/01/2023", true, false)
        );
        assert_eq!(r.consequence, "Crash risk.");
    }

    #[test]
    fn a_short_line_is_an_error_naming_file_and_line() {
        let mut index = RecallIndex::default();
        let err = index.add_flat("FLAT_RCL.txt", "a\tb\n").unwrap_err().to_string();
        assert!(err.contains("FLAT_RCL.txt line 1") && err.contains("found 2"), "{err}");
    }
}
