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
    /// Read by the runner only: a batch answer's entry whose `error` is a
    /// string, not an error object; its text is the message.
    pub const API_ERROR: &str = "API_ERROR";
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
/// VIN follows in `other`, keyed by its vPIC variable name. Read by
/// [`EntryVisitor`], not serde's `flatten`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
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

/// The vehicle's named fields by their vPIC names, written once for the
/// reader ([`Vehicle::field`]) and the writer ([`Vehicle::named_mut`]).
macro_rules! named_fields {
    ($($name:literal => $field:ident),* $(,)?) => {
        impl Vehicle {
            /// Their names.
            const NAMED: &[&str] = &[$($name),*];

            /// The named field called `name`, if it is one.
            fn named(&self, name: &str) -> Option<&String> {
                match name {
                    $($name => Some(&self.$field),)*
                    _ => None,
                }
            }

            /// The named field called `name`, to set, if it is one; every
            /// other name goes in `other`.
            fn named_mut(&mut self, name: &str) -> Option<&mut String> {
                match name {
                    $($name => Some(&mut self.$field),)*
                    _ => None,
                }
            }
        }
    };
}

named_fields! {
    "VIN" => vin,
    "Make" => make,
    "Model" => model,
    "ModelYear" => model_year,
    "BodyClass" => body_class,
    "DriveType" => drive_type,
    "FuelTypePrimary" => fuel_type_primary,
    "EngineConfiguration" => engine_configuration,
    "EngineCylinders" => engine_cylinders,
    "DisplacementL" => displacement_l,
    "TransmissionStyle" => transmission_style,
    "PlantCity" => plant_city,
    "PlantState" => plant_state,
    "PlantCountry" => plant_country,
    "Manufacturer" => manufacturer,
    "Series" => series,
    "Trim" => trim,
    "Doors" => doors,
    "VehicleType" => vehicle_type,
    "GVWR" => gvwr,
    "ErrorCode" => error_code,
    "ErrorText" => error_text,
}

impl Vehicle {
    /// A field by its vPIC name (`"Make"`, `"ModelYear"`, any of `other`);
    /// empty when the decode has no value.
    pub fn field(&self, name: &str) -> &str {
        self.named(name).or_else(|| self.other.get(name)).map_or("", String::as_str)
    }
}

/// Reads a vehicle object, or a batch entry's failure, in one pass.
///
/// Hand-written because serde's `flatten` (for `other`) and `untagged` (for
/// [`BatchEntry`]) first copy every entry into an intermediate tree of
/// owned keys and values and then read that tree: on the runner, which
/// reads 20 such objects per call, this was most of an answer's reading and
/// its allocations. Here each key is matched as it is read, and only the
/// values kept are allocated.
struct EntryVisitor;

/// What [`EntryVisitor`] read: the vehicle's fields, the entry's `error`
/// (an object, or a string that says something), whether `VIN` came, and
/// the first key whose value was not a string.
struct Entry {
    vehicle: Vehicle,
    error: Option<ApiError>,
    text_error: Option<String>,
    vin: bool,
    not_text: Option<String>,
}

impl<'de> serde::de::Visitor<'de> for EntryVisitor {
    type Value = Entry;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a vehicle object, every value a string")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Entry, A::Error> {
        use serde::de::Error;
        let mut e = Entry { vehicle: Vehicle::default(), error: None, text_error: None, vin: false, not_text: None };
        // The named fields seen, by their place in [`Key::named`]: a second
        // one is refused, as the derived reader refused it.
        let mut seen = 0u32;
        while let Some(key) = map.next_key::<Key>()? {
            let (key, value) = match key {
                Key::Error => match map.next_value()? {
                    ErrorValue::Api(error) if e.error.is_none() => {
                        e.error = Some(error);
                        continue;
                    }
                    ErrorValue::Api(_) => return Err(A::Error::duplicate_field("error")),
                    // Not an error object: on a vehicle, one more variable;
                    // in a batch answer, a failure if it says anything.
                    ErrorValue::Text(text) => {
                        if !text.trim().is_empty() {
                            e.text_error = Some(text.clone());
                        }
                        (Key::Other("error".to_string()), Some(text))
                    }
                },
                key => (key, map.next_value::<Text>()?.0),
            };
            match (key, value) {
                (Key::Named(i, name), value) => {
                    if seen & (1 << i) != 0 {
                        return Err(A::Error::duplicate_field(name));
                    }
                    seen |= 1 << i;
                    match value {
                        Some(value) => *e.vehicle.named_mut(name).expect("a named field") = value,
                        None => {
                            e.not_text.get_or_insert_with(|| name.to_string());
                        }
                    }
                    e.vin |= name == "VIN";
                }
                (Key::Other(name), Some(value)) => {
                    e.vehicle.other.insert(name, value);
                }
                (Key::Other(name), None) => {
                    e.not_text.get_or_insert(name);
                }
                (Key::Error, _) => unreachable!("read above"),
            }
        }
        // `Year`, the name the integration guide's example reads, is the
        // model year again (`vinetl serve` sends both): it fills an empty
        // `ModelYear`, and is kept as a variable of its own only when it
        // says something else.
        if let Some(year) = e.vehicle.other.remove("Year") {
            if e.vehicle.model_year.trim().is_empty() {
                e.vehicle.model_year = year;
            } else if year.trim() != e.vehicle.model_year.trim() {
                e.vehicle.other.insert("Year".to_string(), year);
            }
        }
        Ok(e)
    }
}

/// An entry's `error`: the failure's object, or (on a vehicle) a string
/// like any other variable's. Rare enough to be read through `untagged`.
#[derive(Deserialize)]
#[serde(untagged)]
enum ErrorValue {
    Api(ApiError),
    Text(String),
}

/// An entry's key: `error`, a field [`Vehicle`] names (its place in
/// [`Key::named`] and its name, not allocated), or another vPIC variable.
enum Key {
    Error,
    Named(usize, &'static str),
    Other(String),
}

impl Key {
    /// The fields [`Vehicle`] names (22, within the reader's 32-bit set).
    fn named() -> impl Iterator<Item = &'static str> {
        Vehicle::NAMED.iter().copied()
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, s: &str) -> Result<Key, E> {
                Ok(match Key::named().enumerate().find(|(_, f)| *f == s) {
                    _ if s == "error" => Key::Error,
                    Some((i, f)) => Key::Named(i, f),
                    None => Key::Other(s.to_string()),
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// A value that is kept if it is a string and skipped (whatever it holds)
/// if not: a failure's entry may carry anything beside its `error`.
struct Text(Option<String>);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any value")
            }
            fn visit_str<E>(self, s: &str) -> Result<Text, E> {
                Ok(Text(Some(s.to_string())))
            }
            fn visit_string<E>(self, s: String) -> Result<Text, E> {
                Ok(Text(Some(s)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_unit<E>(self) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Text, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Text, A::Error> {
                while a.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
        }
        d.deserialize_any(V)
    }
}

impl Entry {
    /// The entry as a vehicle: `VIN` and every value a string, no `error`.
    fn vehicle<E: serde::de::Error>(self) -> Result<Vehicle, E> {
        if let Some(key) = self.not_text {
            return Err(E::custom(format!("the value of {key:?} is not a string")));
        }
        if self.error.is_some() {
            return Err(E::custom("a vehicle carries an `error`"));
        }
        if !self.vin {
            return Err(E::missing_field("VIN"));
        }
        Ok(self.vehicle)
    }
}

impl<'de> Deserialize<'de> for Vehicle {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(EntryVisitor)?.vehicle()
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
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum BatchEntry {
    /// Only failures carry `error` (with `VIN`, and anything else beside).
    Failed {
        #[serde(rename = "VIN")]
        vin: String,
        error: ApiError,
    },
    Decoded(Box<Vehicle>),
}

impl<'de> Deserialize<'de> for BatchEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let e = d.deserialize_map(EntryVisitor)?;
        // The guide shows no failed entry, only that invalid VINs "return
        // errors": an entry with an `error` that says something and no
        // decoded field is a failure, whatever its shape. Stored as a
        // vehicle, it would be cached as one, with empty fields. A vehicle
        // with fields keeps a string `error` as a variable (a warning
        // passed through, say).
        let decoded =
            || Vehicle::NAMED.iter().any(|n| *n != "VIN" && e.vehicle.named(n).is_some_and(|v| !v.trim().is_empty()));
        let text = || {
            let message = e.text_error.clone().filter(|_| !decoded())?;
            Some(ApiError { code: code::API_ERROR.to_string(), message })
        };
        match e.error.clone().or_else(text) {
            Some(error) if e.vin => Ok(BatchEntry::Failed { vin: e.vehicle.vin, error }),
            _ => Ok(BatchEntry::Decoded(Box::new(e.vehicle()?))),
        }
    }
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
        // The reader's table names the same fields, each its own.
        let mut listed: Vec<&str> =
            ["VIN", "ErrorCode", "ErrorText"].into_iter().chain(VEHICLE_FIELDS.to_vec()).collect();
        let mut named = Vehicle::NAMED.to_vec();
        listed.sort();
        named.sort();
        assert_eq!(named, listed);
        let mut v = Vehicle::default();
        for (i, name) in Vehicle::NAMED.iter().enumerate() {
            *v.named_mut(name).unwrap() = i.to_string();
        }
        for (i, name) in Vehicle::NAMED.iter().enumerate() {
            assert_eq!(v.field(name), i.to_string(), "{name}");
            assert_eq!(serde_json::to_value(&v).unwrap()[name], i.to_string(), "{name}");
        }
    }

    #[test]
    fn batch_entries_read_back_as_what_they_are() {
        let failed = json!({"VIN": "BAD", "error": {"code": "INVALID_VIN", "message": "wrong length"}});
        assert!(matches!(serde_json::from_value(failed).unwrap(), BatchEntry::Failed { .. }));
        let decoded = json!({"VIN": "1HGCM82633A004352", "Make": "HONDA"});
        assert!(matches!(serde_json::from_value(decoded).unwrap(), BatchEntry::Decoded(_)));
    }

    /// The hand-written reader (no `flatten`, no `untagged`) reads what the
    /// derived one read, from text as the client gets it, and refuses what
    /// it refused.
    #[test]
    fn entries_read_in_one_pass_as_the_derived_reader_read_them() {
        let text = r#"[{"VIN": "1HGCM82633A004352", "Make": "HON\u0044A", "ModelYear": "2003", "EngineHP": "160",
                        "Doors": "4", "ErrorCode": "0", "Note": "a \"quoted\" word"},
                       {"VIN": "BAD", "error": {"code": "INVALID_VIN", "message": "wrong length"}, "Make": 7, "x": [1, {"y": null}]}]"#;
        let got: Vec<BatchEntry> = serde_json::from_str(text).unwrap();
        let BatchEntry::Decoded(v) = &got[0] else { panic!("{got:?}") };
        assert_eq!((v.vin.as_str(), v.make.as_str(), v.model_year.as_str()), ("1HGCM82633A004352", "HONDA", "2003"));
        assert_eq!((v.doors.as_str(), v.error_code.as_str(), v.model.as_str()), ("4", "0", ""));
        let other: Vec<(&str, &str)> = v.other.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(other, [("EngineHP", "160"), ("Note", "a \"quoted\" word")]);
        // A failure may carry anything beside its error.
        let BatchEntry::Failed { vin, error } = &got[1] else { panic!("{got:?}") };
        assert_eq!((vin.as_str(), error.code.as_str()), ("BAD", "INVALID_VIN"));
        // Written and read back, a vehicle is itself.
        let again: Vehicle = serde_json::from_str(&serde_json::to_string(v).unwrap()).unwrap();
        assert_eq!(&again, &**v);
        // A vehicle's values are strings, and it names its VIN.
        for bad in [r#"{"VIN": "X", "Make": 7}"#, r#"{"VIN": "X", "EngineHP": null}"#, r#"{"Make": "HONDA"}"#, "[]"] {
            assert!(serde_json::from_str::<BatchEntry>(bad).is_err(), "{bad}");
            assert!(serde_json::from_str::<Vehicle>(bad).is_err(), "{bad}");
        }
        // A named field twice is refused, as the derived reader refused it
        // (another variable twice keeps the last).
        for bad in [r#"{"VIN": "A", "VIN": "B"}"#, r#"{"VIN": "A", "Make": "X", "Make": "Y"}"#] {
            assert!(serde_json::from_str::<BatchEntry>(bad).is_err(), "{bad}");
        }
        let twice = r#"{"VIN": "A", "error": {"code": "X", "message": "y"}, "error": {"code": "X", "message": "y"}}"#;
        assert!(serde_json::from_str::<BatchEntry>(twice).is_err());
        let v: Vehicle = serde_json::from_str(r#"{"VIN": "A", "EngineHP": "1", "EngineHP": "2"}"#).unwrap();
        assert_eq!(v.other["EngineHP"], "2");
        // An empty string `error` on a vehicle is one more variable.
        let v: BatchEntry = serde_json::from_str(r#"{"VIN": "A", "error": ""}"#).unwrap();
        let BatchEntry::Decoded(v) = v else { panic!("{v:?}") };
        assert_eq!(v.other["error"], "");
        // One that says something is the VIN's failure, not a vehicle.
        let v: BatchEntry = serde_json::from_str(r#"{"VIN": "A", "Make": "", "error": "Invalid VIN"}"#).unwrap();
        let error = ApiError { code: code::API_ERROR.to_string(), message: "Invalid VIN".to_string() };
        assert_eq!(v, BatchEntry::Failed { vin: "A".to_string(), error });
        // On a vehicle with decoded fields, it stays a variable.
        let v: BatchEntry =
            serde_json::from_str(r#"{"VIN": "A", "Make": "HONDA", "error": "1 - Check Digit"}"#).unwrap();
        let BatchEntry::Decoded(v) = v else { panic!("{v:?}") };
        assert_eq!((v.make.as_str(), v.other["error"].as_str()), ("HONDA", "1 - Check Digit"));
        // An error with no VIN is no failure, and no vehicle.
        assert!(serde_json::from_str::<BatchEntry>(r#"{"error": {"code": "X", "message": "y"}}"#).is_err());
        assert!(serde_json::from_str::<Vehicle>(r#"{"VIN": "X", "error": {"code": "X", "message": "y"}}"#).is_err());
    }

    /// `Year` (as `vinetl serve` sends it beside `ModelYear`, and as the
    /// guide's example reads it) is the model year, not one more variable.
    #[test]
    fn year_is_the_model_year_under_the_guides_name() {
        let both: Vehicle = serde_json::from_str(r#"{"VIN": "A", "ModelYear": "2003", "Year": "2003"}"#).unwrap();
        assert_eq!((both.model_year.as_str(), both.other.len()), ("2003", 0));
        let only: Vehicle = serde_json::from_str(r#"{"VIN": "A", "Year": "2011"}"#).unwrap();
        assert_eq!((only.model_year.as_str(), only.other.len()), ("2011", 0));
        let other: Vehicle = serde_json::from_str(r#"{"VIN": "A", "ModelYear": "2003", "Year": "2004"}"#).unwrap();
        assert_eq!((other.model_year.as_str(), other.other["Year"].as_str()), ("2003", "2004"));
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
