//! Embedded NHTSA vPIC decoding, through the `corgi-rs` crate.
//!
//! corgi-rs was chosen over `vin-decode` by measurement (BENCHMARKS.md): it
//! decodes the model year, agrees with the published claims far more often,
//! returns vPIC's own strings, and is ~30× faster. Its pattern tables are
//! generated at build time into `$HOME/.corgi-rs-cache` and mapped at run
//! time from `$MAPS_DIR`; [`tables_dir`] says where a binary finds them when
//! `MAPS_DIR` is unset (a packaged binary carries them beside it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use corgi_rs::{CorgiError, VehicleInfo, VinDecoder, VinDecoderError};

use crate::api::{VEHICLE_FIELDS, Vehicle, vpic_error};
use crate::vin::Vin;

/// The decoder could not start.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot load the vPIC tables ({0}); `cargo build` writes them to $HOME/.corgi-rs-cache and `scripts/package` ships them in share/vinetl/vpic: set MAPS_DIR to a directory holding them"
)]
pub struct DecoderUnavailable(String);

/// One table stands for the set when a directory is probed (corgi-rs
/// reports any other missing one by name when it opens them).
const PROBE_TABLE: &str = "pattern.fst";

/// Where the vPIC tables are, when `MAPS_DIR` does not say:
/// 1. `share/vinetl/vpic` beside the binary's `bin/` (the layout of
///    `scripts/package`'s tarball and of the Docker image), or `vpic/` beside
///    the binary;
/// 2. `$HOME/.corgi-rs-cache`, where corgi-rs's build script writes them;
/// 3. the directory that build script used when this binary was built, so
///    a binary keeps working on its build machine under another `$HOME`.
///
/// `None` when `MAPS_DIR` is set (it wins) or no candidate holds them.
/// The first call's answer is kept for [`tables_in_use`].
pub fn tables_dir() -> Option<PathBuf> {
    match tables_in_use() {
        (Some(dir), why) if why != "MAPS_DIR" => Some(dir),
        _ => None,
    }
}

/// Where the tables in use are, and why (for `vinetl version`), as first
/// found in this process (before `main` points `MAPS_DIR` at them).
pub fn tables_in_use() -> (Option<PathBuf>, &'static str) {
    static FOUND: std::sync::OnceLock<(Option<PathBuf>, &'static str)> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Some(dir) = std::env::var_os("MAPS_DIR") {
                return (Some(PathBuf::from(dir)), "MAPS_DIR");
            }
            tables_candidates()
                .into_iter()
                .find(|(d, _)| d.join(PROBE_TABLE).is_file())
                .map_or((None, "not found"), |(d, why)| (Some(d), why))
        })
        .clone()
}

fn tables_candidates() -> Vec<(PathBuf, &'static str)> {
    let mut candidates = Vec::new();
    if let Some(bin) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        candidates.push((bin.join("../share/vinetl/vpic"), "packaged beside the binary"));
        candidates.push((bin.join("vpic"), "beside the binary"));
    }
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        candidates.push((PathBuf::from(home).join(".corgi-rs-cache"), "$HOME/.corgi-rs-cache"));
    }
    let built = env!("VINETL_BUILD_TABLES_DIR");
    if !built.is_empty() {
        candidates.push((PathBuf::from(built), "where this binary was built"));
    }
    candidates
}

/// Decodes VINs from the embedded vPIC data. Cheap to share (`Send + Sync`).
pub struct Decoder {
    inner: VinDecoder,
}

impl Decoder {
    pub fn new() -> Result<Decoder, DecoderUnavailable> {
        VinDecoder::try_new().map(|inner| Decoder { inner }).map_err(|e| DecoderUnavailable(e.to_string()))
    }

    /// Decodes one VIN into vPIC-style fields. Never fails for a parsed VIN:
    /// what the data cannot say is reported in `ErrorCode`/`ErrorText`, as
    /// vPIC does, and fields it does not know stay empty.
    pub fn decode(&self, vin: &Vin) -> Vehicle {
        // corgi refuses a position 9 that is not a digit or `X`, which most
        // European VINs have. Position 9 plays no part in vPIC's patterns, so
        // decode with the computed check digit and report the mismatch here.
        let mut probe = vin.as_str().to_string();
        probe.replace_range(8..9, &vin.expected_check_digit().to_string());
        let mut codes = Vec::new();
        if !vin.check_digit_valid() {
            codes.push(vpic_error::CHECK_DIGIT);
        }
        let mut vehicle = match self.inner.decode(&probe) {
            Ok(info) => {
                if info.make.is_empty() || info.model.is_none() {
                    codes.push(vpic_error::NO_DETAIL);
                }
                from_info(info)
            }
            Err(CorgiError::VinDecoder(_, e)) => {
                codes.push(match e {
                    VinDecoderError::UnreadableWmi { .. } => vpic_error::NOT_REGISTERED,
                    VinDecoderError::UnreadableModelYear { .. } => vpic_error::MODEL_YEAR,
                    _ => vpic_error::NO_DETAIL,
                });
                Vehicle::default()
            }
        };
        if codes.is_empty() {
            codes.push(vpic_error::CLEAN);
        }
        vehicle.vin = vin.to_string();
        vehicle.error_code = codes.iter().map(|c| c.0).collect::<Vec<_>>().join(",");
        vehicle.error_text = codes.iter().map(|c| c.1).collect::<Vec<_>>().join("; ");
        vehicle
    }
}

fn from_info(info: VehicleInfo) -> Vehicle {
    let attr = |code: &str| info.attributes.get(code).cloned().unwrap_or_default();
    let or_attr = |v: Option<String>, code: &str| v.unwrap_or_else(|| attr(code));
    let other: BTreeMap<String, String> = info
        .attributes
        .iter()
        .filter(|(k, v)| !VEHICLE_FIELDS.contains(k) && !v.is_empty())
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    Vehicle {
        vin: String::new(),
        // vPIC's Make names are upper case ("HONDA"), as the guide shows.
        make: info.make.to_uppercase(),
        model: info.model.clone().unwrap_or_default(),
        // A year is only worth stating when vPIC placed the VIN at all.
        model_year: if info.make.is_empty() { String::new() } else { info.year.to_string() },
        body_class: or_attr(info.body_class.clone(), "BodyClass"),
        drive_type: or_attr(info.drive_type.clone(), "DriveType"),
        fuel_type_primary: or_attr(info.fuel_type.clone(), "FuelTypePrimary"),
        engine_configuration: or_attr(info.engine_configuration.clone(), "EngineConfiguration"),
        engine_cylinders: attr("EngineCylinders"),
        displacement_l: attr("DisplacementL"),
        transmission_style: or_attr(info.transmission.clone(), "TransmissionStyle"),
        plant_city: or_attr(info.plant_city.clone(), "PlantCity"),
        plant_state: or_attr(info.plant_state.clone(), "PlantState"),
        plant_country: or_attr(info.plant_country.clone(), "PlantCountry"),
        manufacturer: or_attr(info.manufacturer.clone(), "Manufacturer"),
        series: or_attr(info.series.clone(), "Series"),
        trim: or_attr(info.trim.clone(), "Trim"),
        doors: attr("Doors"),
        vehicle_type: or_attr(info.vehicle_type.clone(), "VehicleType"),
        gvwr: or_attr(info.gvwr.clone(), "GVWR"),
        error_code: String::new(),
        error_text: String::new(),
        other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(vin: &str) -> Vehicle {
        Decoder::new().unwrap().decode(&Vin::parse(vin).unwrap())
    }

    #[test]
    fn the_guides_textbook_vin_is_a_1991_honda_with_no_model() {
        let v = decode("1HGBH41JXMN109186");
        assert_eq!(v.make, "HONDA");
        assert_eq!(v.model_year, "1991");
        assert_eq!(v.model, "", "vPIC has no model for it; none is invented");
        assert!(v.error_code.split(',').any(|c| c == "8"), "{}", v.error_code);
    }

    #[test]
    fn a_bad_check_digit_still_decodes_and_is_flagged() {
        let v = decode("WBAPH5C55BA218692");
        assert_eq!((v.make.as_str(), v.model.as_str(), v.model_year.as_str()), ("BMW", "328i", "2011"));
        assert!(v.error_code.starts_with('1'), "{}", v.error_code);
    }

    #[test]
    fn a_clean_decode_fills_the_guides_fields() {
        let v = decode("5YJSA1DG9DFP14705");
        assert_eq!((v.make.as_str(), v.model.as_str(), v.model_year.as_str()), ("TESLA", "Model S", "2013"));
        assert_eq!(v.error_code, "0");
        assert_eq!(v.fuel_type_primary, "Electric");
        assert_eq!(v.plant_city, "FREMONT");
        assert!(v.other.contains_key("BatteryKWh"), "{:?}", v.other.keys());
    }

    #[test]
    fn a_letter_in_position_nine_does_not_stop_the_decode() {
        // A European VW: corgi alone refuses the `Z` check position.
        let v = decode("WVGZZZ5NZEW069297");
        assert!(v.error_code.starts_with('1'), "{}", v.error_code);
        assert_eq!(v.vin, "WVGZZZ5NZEW069297");
    }

    #[test]
    fn an_unregistered_maker_is_error_7_with_empty_fields() {
        let v = decode("ZZZCM82633A004352");
        assert!(v.error_code.split(',').any(|c| c == "7"), "{}", v.error_code);
        assert_eq!(v.make, "");
        assert_eq!(v.model_year, "");
    }
}
