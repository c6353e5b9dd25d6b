//! The Car Vin API wire format: paths, request and response bodies, error
//! codes. `vinetl serve` produces exactly these types and the runner's client
//! consumes them, so the two cannot drift apart.
//!
//! Field names follow the integration guide (vPIC's `PascalCase` names for
//! vehicle data, NHTSA's names for recalls); every vehicle value is a string,
//! as vPIC sends it, and a field with no value is an empty string.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const DECODE_PATH: &str = "/api/v1/decode";
pub const BATCH_DECODE_PATH: &str = "/api/v1/batch-decode";
pub const RECALLS_PATH: &str = "/api/v1/recalls";
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

/// The guide: "Maximum 20 VINs per request".
pub const MAX_BATCH: usize = 20;

/// The key of the server `vinetl run` embeds for `provider.embedded` (it
/// listens on loopback only, and only that process knows its port).
pub const EMBEDDED_KEY: &str = "vinetl-embedded";

/// `POST /api/v1/decode`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DecodeRequest {
    pub vin: String,
}

/// `POST /api/v1/batch-decode`: 1 to 20 VINs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BatchDecodeRequest {
    pub vins: Vec<String>,
}

/// `POST /api/v1/recalls`: a VIN, or make, model and year.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RecallsRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub make: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The guide sends `"2020"`; a bare number is accepted too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub year: Option<YearValue>,
}

/// A model year as a JSON string or number.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum YearValue {
    Number(i64),
    Text(String),
    /// Anything else (a float, a number past i64, an object): no year, which
    /// the server answers in its own words rather than serde's.
    Other(serde_json::Value),
}

impl YearValue {
    /// The year, if it is exactly four digits (as a number: 1000 to 9999).
    pub fn year(&self) -> Option<u16> {
        let n = match self {
            YearValue::Number(n) => *n,
            YearValue::Text(s) if s.len() == 4 && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok()?,
            YearValue::Text(_) | YearValue::Other(_) => return None,
        };
        (1000..=9999).contains(&n).then_some(n as u16)
    }
}

/// `{"success": true, "data": ...}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataResponse<T> {
    pub success: bool,
    pub data: T,
}

/// `{"success": true, "recalls": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecallsResponse {
    pub success: bool,
    pub recalls: Vec<Recall>,
}

/// Every error body: `{"success": false, "error": {"code", "message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorResponse {
    pub success: bool,
    pub error: ApiError,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    pub code: String,
    pub message: String,
}

/// Error codes, stable strings clients can branch on.
pub mod code {
    pub const INVALID_VIN: &str = "INVALID_VIN";
    pub const INVALID_JSON: &str = "INVALID_JSON";
    pub const INVALID_REQUEST: &str = "INVALID_REQUEST";
    pub const BATCH_TOO_LARGE: &str = "BATCH_TOO_LARGE";
    pub const UNAUTHORIZED: &str = "UNAUTHORIZED";
    pub const RATE_LIMITED: &str = "RATE_LIMITED";
    pub const NOT_FOUND: &str = "NOT_FOUND";
    pub const METHOD_NOT_ALLOWED: &str = "METHOD_NOT_ALLOWED";
    pub const PAYLOAD_TOO_LARGE: &str = "PAYLOAD_TOO_LARGE";
    pub const INTERNAL_ERROR: &str = "INTERNAL_ERROR";
    /// 408: the request body did not arrive within the server's deadline.
    pub const REQUEST_TIMEOUT: &str = "REQUEST_TIMEOUT";
    /// 503: the server is at its connection cap.
    pub const OVERLOADED: &str = "OVERLOADED";
}

/// The vPIC variables [`Vehicle`] names itself, in the guide's order (the
/// guide's fields, then the other common ones); every other variable goes in
/// `Vehicle::other`.
pub const VEHICLE_FIELDS: &[&str] = &[
    "Make",
    "Model",
    "ModelYear",
    "BodyClass",
    "DriveType",
    "FuelTypePrimary",
    "EngineConfiguration",
    "EngineCylinders",
    "DisplacementL",
    "TransmissionStyle",
    "PlantCity",
    "PlantState",
    "PlantCountry",
    "Manufacturer",
    "Series",
    "Trim",
    "Doors",
    "VehicleType",
    "GVWR",
];

/// Decoded vehicle data, vPIC style. The guide's fields come first and are
/// always present (empty when unknown); everything else vPIC holds for the
/// VIN follows in `other`, keyed by its vPIC variable name.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Vehicle {
    #[serde(rename = "VIN")]
    pub vin: String,
    #[serde(default)]
    pub make: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub model_year: String,
    #[serde(default)]
    pub body_class: String,
    #[serde(default)]
    pub drive_type: String,
    #[serde(default)]
    pub fuel_type_primary: String,
    #[serde(default)]
    pub engine_configuration: String,
    #[serde(default)]
    pub engine_cylinders: String,
    #[serde(default)]
    pub displacement_l: String,
    #[serde(default)]
    pub transmission_style: String,
    #[serde(default)]
    pub plant_city: String,
    #[serde(default)]
    pub plant_state: String,
    #[serde(default)]
    pub plant_country: String,
    #[serde(default)]
    pub manufacturer: String,
    #[serde(default)]
    pub series: String,
    #[serde(default)]
    pub trim: String,
    #[serde(default)]
    pub doors: String,
    #[serde(default)]
    pub vehicle_type: String,
    #[serde(default, rename = "GVWR")]
    pub gvwr: String,
    /// vPIC error codes for this decode, comma-separated (`"0"` = clean,
    /// `"1"` = check digit does not calculate, ...). See [`vpic_error`].
    #[serde(default)]
    pub error_code: String,
    #[serde(default)]
    pub error_text: String,
    /// Every other vPIC variable decoded for this VIN.
    #[serde(flatten)]
    pub other: BTreeMap<String, String>,
}

impl Vehicle {
    /// A field by its vPIC name (`"Make"`, `"ModelYear"`, any of `other`);
    /// empty when the decode has no value.
    pub fn field(&self, name: &str) -> &str {
        match name {
            "VIN" => &self.vin,
            "Make" => &self.make,
            "Model" => &self.model,
            "ModelYear" => &self.model_year,
            "BodyClass" => &self.body_class,
            "DriveType" => &self.drive_type,
            "FuelTypePrimary" => &self.fuel_type_primary,
            "EngineConfiguration" => &self.engine_configuration,
            "EngineCylinders" => &self.engine_cylinders,
            "DisplacementL" => &self.displacement_l,
            "TransmissionStyle" => &self.transmission_style,
            "PlantCity" => &self.plant_city,
            "PlantState" => &self.plant_state,
            "PlantCountry" => &self.plant_country,
            "Manufacturer" => &self.manufacturer,
            "Series" => &self.series,
            "Trim" => &self.trim,
            "Doors" => &self.doors,
            "VehicleType" => &self.vehicle_type,
            "GVWR" => &self.gvwr,
            "ErrorCode" => &self.error_code,
            "ErrorText" => &self.error_text,
            other => self.other.get(other).map_or("", String::as_str),
        }
    }
}

/// vPIC's error codes, with its wording, for the cases the embedded decoder
/// can tell apart.
pub mod vpic_error {
    pub const CLEAN: (&str, &str) = ("0", "0 - VIN decoded clean. Check Digit (9th position) is correct");
    pub const CHECK_DIGIT: (&str, &str) = ("1", "1 - Check Digit (9th position) does not calculate properly");
    pub const NOT_REGISTERED: (&str, &str) = (
        "7",
        "7 - Manufacturer is not registered with NHTSA for sale or importation in the U.S. for use on U.S roads; Please contact the manufacturer directly for more information",
    );
    pub const NO_DETAIL: (&str, &str) = ("8", "8 - No detailed data available currently");
    pub const MODEL_YEAR: (&str, &str) = ("11", "11 - Incorrect Model Year, decoded data may not be accurate!");
}

/// One entry of a batch-decode answer, in request order: the vehicle, or the
/// reason this one VIN could not be decoded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum BatchEntry {
    /// Tried first when reading: only failures carry `error`.
    Failed {
        #[serde(rename = "VIN")]
        vin: String,
        error: ApiError,
    },
    Decoded(Box<Vehicle>),
}

/// A safety recall, in the shape of NHTSA's recallsByVehicle results.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Recall {
    #[serde(rename = "Manufacturer", default, deserialize_with = "null_as_default")]
    pub manufacturer: String,
    #[serde(rename = "NHTSACampaignNumber")]
    pub campaign_number: String,
    /// NHTSA's "do not drive" advisory.
    #[serde(rename = "parkIt", default, deserialize_with = "null_as_default")]
    pub park_it: bool,
    /// NHTSA's "park outside" advisory (fire risk).
    #[serde(rename = "parkOutSide", default, deserialize_with = "null_as_default")]
    pub park_outside: bool,
    #[serde(rename = "overTheAirUpdate", default, skip_serializing_if = "Option::is_none")]
    pub over_the_air_update: Option<bool>,
    #[serde(rename = "NHTSAActionNumber", default, skip_serializing_if = "Option::is_none")]
    pub action_number: Option<String>,
    /// `DD/MM/YYYY`, as NHTSA's API writes it.
    #[serde(rename = "ReportReceivedDate", default, deserialize_with = "null_as_default")]
    pub report_received_date: String,
    #[serde(rename = "Component", default, deserialize_with = "null_as_default")]
    pub component: String,
    #[serde(rename = "Summary", default, deserialize_with = "null_as_default")]
    pub summary: String,
    /// Older NHTSA responses spell it `Conequence`, like the flat file.
    #[serde(rename = "Consequence", alias = "Conequence", default, deserialize_with = "null_as_default")]
    pub consequence: String,
    #[serde(rename = "Remedy", default, deserialize_with = "null_as_default")]
    pub remedy: String,
    #[serde(rename = "Notes", default, deserialize_with = "null_as_default")]
    pub notes: Option<String>,
    #[serde(rename = "ModelYear", default, deserialize_with = "null_as_default")]
    pub model_year: String,
    #[serde(rename = "Make", default, deserialize_with = "null_as_default")]
    pub make: String,
    #[serde(rename = "Model", default, deserialize_with = "null_as_default")]
    pub model: String,
}

/// NHTSA sends `null` for missing recall fields; read it as the empty value.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vehicle_fields_serialise_in_the_guides_names_with_extras_after() {
        let mut v =
            Vehicle { vin: "X".into(), make: "HONDA".into(), displacement_l: "2.0".into(), ..Default::default() };
        v.other.insert("EngineHP".into(), "158".into());
        let j = serde_json::to_value(&v).unwrap();
        assert_eq!(j["VIN"], "X");
        assert_eq!(j["Make"], "HONDA");
        assert_eq!(j["DisplacementL"], "2.0");
        assert_eq!(j["GVWR"], "");
        assert_eq!(j["EngineHP"], "158");
        assert_eq!(serde_json::from_value::<Vehicle>(j.clone()).unwrap(), v);
        // The named fields are exactly the listed ones (plus VIN and the error pair).
        let named = j.as_object().unwrap().keys().filter(|k| *k != "EngineHP").count();
        assert_eq!(named, VEHICLE_FIELDS.len() + 3);
        assert!(VEHICLE_FIELDS.iter().all(|f| j.get(*f).is_some()));
    }

    #[test]
    fn batch_entries_read_back_as_what_they_are() {
        let failed = json!({"VIN": "BAD", "error": {"code": "INVALID_VIN", "message": "wrong length"}});
        assert!(matches!(serde_json::from_value(failed).unwrap(), BatchEntry::Failed { .. }));
        let decoded = json!({"VIN": "1HGCM82633A004352", "Make": "HONDA"});
        assert!(matches!(serde_json::from_value(decoded).unwrap(), BatchEntry::Decoded(_)));
    }

    #[test]
    fn years_come_as_strings_or_numbers() {
        let r: RecallsRequest =
            serde_json::from_value(json!({"make": "Honda", "model": "Civic", "year": "2020"})).unwrap();
        assert_eq!(r.year.unwrap().year(), Some(2020));
        let r: RecallsRequest = serde_json::from_value(json!({"year": 2020})).unwrap();
        assert_eq!(r.year.unwrap().year(), Some(2020));
        assert_eq!(YearValue::Text("20".into()).year(), None);
        assert_eq!(YearValue::Text(" 2020".into()).year(), None);
    }

    #[test]
    fn recalls_accept_nhtsas_old_spelling() {
        let r: Recall = serde_json::from_value(json!({"NHTSACampaignNumber": "1", "Conequence": "fire"})).unwrap();
        assert_eq!(r.consequence, "fire");
        let r: Recall =
            serde_json::from_value(json!({"NHTSACampaignNumber": "1", "parkIt": null, "Component": null})).unwrap();
        assert!(!r.park_it);
        assert_eq!(r.component, "");
    }
}
