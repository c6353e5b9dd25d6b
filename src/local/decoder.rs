//! Embedded NHTSA vPIC decoding, through the `corgi-rs` crate.
//!
//! corgi-rs was chosen over `vin-decode` by measurement (BENCHMARKS.md): it
//! decodes the model year, agrees with the published claims far more often,
//! returns vPIC's own strings, and is ~30× faster. Its pattern tables are
//! generated at build time into `$HOME/.corgi-rs-cache` and mapped at run
//! time from `$MAPS_DIR`; [`tables_dir`] says where a binary finds them when
//! `MAPS_DIR` is unset (a packaged binary carries them beside it).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use chrono::Datelike;
use corgi_rs::element::is_car_mpv_lt;
use corgi_rs::maps::{FstRkyvMap, MapError};
use corgi_rs::{CorgiError, VehicleInfo, VinDecoder, VinDecoderError, WmiEntry};

use crate::api::{VEHICLE_FIELDS, Vehicle, vpic_error};
use crate::vin::{Vin, YearReading};

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
    /// What the WMI alone says (make, manufacturer, country, vehicle type):
    /// a VIN whose patterns cannot be decoded still gets it, as from vPIC.
    wmis: FstRkyvMap<WmiEntry>,
    /// The latest model year a VIN may have: next year.
    latest_year: u16,
}

impl Decoder {
    pub fn new() -> Result<Decoder, DecoderUnavailable> {
        let unavailable = |e: MapError| DecoderUnavailable(e.to_string());
        let inner = VinDecoder::try_new().map_err(unavailable)?;
        let wmis = FstRkyvMap::open().map_err(unavailable)?;
        Ok(Decoder { inner, wmis, latest_year: u16::try_from(chrono::Utc::now().year() + 1).unwrap_or(u16::MAX) })
    }

    /// Pins the latest model year a VIN may have (next year by default): for
    /// tests, and to reproduce an earlier year's decode.
    pub fn with_latest_year(self, year: u16) -> Decoder {
        let Decoder { inner, wmis, .. } = self;
        Decoder { inner: inner.with_current_year(i32::from(year) - 1), wmis, latest_year: year }
    }

    /// Decodes one VIN into vPIC-style fields. Never fails for a parsed VIN:
    /// what the data cannot say is reported in `ErrorCode`/`ErrorText`, as
    /// vPIC does, and fields it does not know stay empty. Where the patterns
    /// cannot be used (no model year, or none that matches), the WMI's own
    /// fields are still given.
    pub fn decode(&self, vin: &Vin) -> Vehicle {
        // corgi refuses a position 9 that is not a digit or `X`, which most
        // European VINs have. Position 9 plays no part in vPIC's patterns, so
        // decode with the computed check digit and report the mismatch here.
        let mut probe = vin.as_str().to_string();
        probe.replace_range(8..9, &vin.expected_check_digit().to_string());
        let wmi = self.wmis.get(&probe[..3]).and_then(|entries| entries.into_iter().next());
        // vPIC's rule for the model year: position 7 counts for the cars,
        // MPVs and light trucks the WMI's entry names.
        let reading = wmi
            .as_ref()
            .and_then(|w| vin.year_reading(is_car_mpv_lt(w.vehicle_type_id, w.truck_type_id), self.latest_year));
        let mut codes = Vec::new();
        let mut notes = Vec::new();
        // How the year was chosen; first among the notes, once the newer
        // patterns below have had their say on it.
        let mut year_note = None;
        if !vin.check_digit_valid() {
            codes.push(vpic_error::CHECK_DIGIT);
        }
        let mut vehicle = match self.inner.decode(&probe) {
            Ok(info) => {
                if info.make.is_empty() || info.model.is_none() {
                    codes.push(vpic_error::NO_DETAIL);
                }
                let patterns_year = info.year;
                // corgi-rs reads position 10 by the same rule, so where the
                // rule allows both cycles its `year_conclusive` says whether
                // one cycle alone decoded the VIN.
                let decisive = info.year_conclusive;
                let mut vehicle = from_info(info);
                if let Some(reading) = reading {
                    let (year, note) = settle_year(reading, patterns_year, decisive);
                    year_note = note;
                    vehicle.model_year = year.to_string();
                }
                vehicle
            }
            Err(CorgiError::VinDecoder(_, VinDecoderError::UnreadableWmi { .. })) => match supplement(vin) {
                Some(known) => {
                    codes.push(vpic_error::NO_DETAIL);
                    let shared = if known.make.is_empty() { ", shared by several makes" } else { "" };
                    notes.push(format!(
                        "vPIC knows WMI {} ({}{shared}); the embedded tables have no patterns for it",
                        known.wmi, known.vehicle_type
                    ));
                    let car_lt = matches!(known.vehicle_type, "Passenger Car" | "Multipurpose Passenger Vehicle (MPV)");
                    let year = vin.year_reading(car_lt, self.latest_year).map(YearReading::default_year);
                    Vehicle {
                        model_year: year.map(|y| y.to_string()).unwrap_or_default(),
                        ..wmi_only(known.make, known.manufacturer, known.country, known.vehicle_type)
                    }
                }
                None => {
                    codes.push(vpic_error::NOT_REGISTERED);
                    Vehicle::default()
                }
            },
            Err(CorgiError::VinDecoder(_, e)) => {
                codes.push(match e {
                    VinDecoderError::UnreadableModelYear { .. } => vpic_error::MODEL_YEAR,
                    _ => vpic_error::NO_DETAIL,
                });
                wmi.as_ref().map(from_wmi).unwrap_or_default()
            }
        };
        let year: Option<u16> = vehicle.model_year.parse().ok();
        let mut named = vehicle.make.is_empty().then(|| newer_model(&probe, year)).flatten();
        if let (None, true, Some(YearReading::Either { earlier, later }), Some(year)) =
            (&named, vehicle.make.is_empty(), reading, year)
        {
            // vPIC keeps the cycle whose decode names a model, as corgi-rs
            // ranks its own: where only vPIC's newer patterns name one, and
            // in the other cycle, that year is stated. The rest of the
            // embedded decode was made for the other year, so only the
            // WMI's fields stay.
            let other = if year == later { earlier } else { later };
            if let Some(found) = newer_model(&probe, Some(other)) {
                // One sentence for the year: it replaces the note on how the
                // embedded patterns chose between the two cycles.
                year_note = Some(format!(
                    "model year {later} or {earlier} by position 10; the embedded patterns fit {year} best but name no model, and vPIC's newer patterns name one for {other}, so {other} is stated and the embedded tables' {year} fields are left out"
                ));
                vehicle = Vehicle { model_year: other.to_string(), ..wmi.as_ref().map(from_wmi).unwrap_or_default() };
                named = Some(found);
            }
        }
        if let Some(note) = year_note {
            notes.insert(0, note);
        }
        if let Some(found) = named {
            vehicle.make = found.make.to_uppercase();
            if let Some(model) = found.model.filter(|_| vehicle.model.is_empty()) {
                vehicle.model = model.to_string();
            }
            notes.push(format!(
                "make and model from vPIC's newer patterns (WMI {} shared by several makes, pattern {} for {}): the embedded tables name no make for this VIN",
                &probe[..3],
                found.keys,
                vehicle.model_year
            ));
        } else if let Some(w) = wmi.as_ref().filter(|w| w.make.is_empty() && vehicle.make.is_empty()) {
            // A WMI several makes share names none; only a model would.
            notes.push(format!(
                "WMI {} is shared by several makes of {} and no pattern names this VIN's model",
                &probe[..3],
                w.manufacturer
            ));
        }
        if codes.is_empty() {
            codes.push(vpic_error::CLEAN);
        }
        vehicle.vin = vin.to_string();
        vehicle.error_code = codes.iter().map(|c| c.0).collect::<Vec<_>>().join(",");
        vehicle.error_text = codes.iter().map(|c| c.1.to_string()).chain(notes).collect::<Vec<_>>().join("; ");
        vehicle
    }
}

/// The model year vPIC states, from its rule's reading of positions 10 and
/// 7, and the year corgi-rs decoded the VIN's patterns for (`decisive`:
/// one cycle's patterns resolve a model and the other's do not), with a
/// note where they differ or where the year stays in doubt.
///
/// Where the rule names one year, that year stands, whatever the patterns
/// say. Where it allows both cycles (not a car, MPV or light truck, and
/// neither year after next year), vPIC decodes the VIN in each and keeps
/// the better decode: fewer errors, then more decoded elements, then more
/// matched patterns, then the later year. corgi-rs's settling does the
/// same by the patterns each cycle matches, and the rest of the answer
/// (model, body, engine) comes from that decode, so its year is taken.
fn settle_year(reading: YearReading, patterns_year: i32, decisive: bool) -> (u16, Option<String>) {
    let matched = u16::try_from(patterns_year).ok().filter(|&y| reading.allows(y));
    match (reading, matched) {
        (YearReading::Conclusive(year), Some(_)) => (year, None),
        (YearReading::Conclusive(year), None) => (
            year,
            Some(format!(
                "model year {year} by vPIC's rule for positions 10 and 7; the VIN's patterns match model year {patterns_year}"
            )),
        ),
        (YearReading::Either { earlier, later }, Some(year)) => {
            let fit = if decisive {
                format!("the VIN's patterns fit {year} only")
            } else {
                format!("the VIN's patterns fit both and {year} best (the later on a tie)")
            };
            (year, Some(format!("model year {later} or {earlier} by position 10; {fit}")))
        }
        (YearReading::Either { earlier, later }, None) => (
            later,
            Some(format!("model year {later} or {earlier}: position 10 names both and no pattern tells them apart")),
        ),
    }
}

/// A WMI vPIC knows and the embedded tables lack (a motorcycle, bus,
/// low-speed or off-road maker, or one registered after their export).
struct KnownWmi {
    wmi: &'static str,
    make: &'static str,
    manufacturer: &'static str,
    country: &'static str,
    vehicle_type: &'static str,
}

/// vPIC's entries for the WMIs corgi-rs lacks, written by
/// `scripts/wmi-supplement` from NHTSA's data. A table of our own because
/// corgi-rs can take no extra rows, and these are a few thousand lines.
static SUPPLEMENT: LazyLock<HashMap<&'static str, KnownWmi>> = LazyLock::new(|| {
    include_str!("wmi-supplement.tsv")
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split('\t');
            let wmi = cols.next()?;
            let known = KnownWmi {
                wmi,
                make: cols.next()?,
                manufacturer: cols.next()?,
                country: cols.next()?,
                vehicle_type: cols.next()?,
            };
            Some((wmi, known))
        })
        .collect()
});

/// The supplement's entry for the VIN's WMI (six characters first, for
/// small manufacturers, then three).
fn supplement(vin: &Vin) -> Option<&'static KnownWmi> {
    SUPPLEMENT.get(vin.wmi().as_str()).or_else(|| SUPPLEMENT.get(&vin.as_str()[..3]))
}

/// A model pattern of a WMI several makes share, as vPIC has it now, for
/// VINs the embedded tables name no make for (their export predates it).
struct ModelPattern {
    year_from: u16,
    /// 0: open-ended.
    year_to: u16,
    keys: &'static str,
    make: &'static str,
    model: &'static str,
}

/// vPIC's model patterns of the WMIs several makes share, by WMI, written
/// by `scripts/wmi-supplement` (`scripts/model_supplement.py`) from NHTSA's
/// data: 93,982 rows, zstd-compressed, read on the first VIN that needs
/// them. Consulted only where the embedded tables name no make, so a row
/// they hold as well changes nothing. Ours for the same reason as
/// [`SUPPLEMENT`]; the keys are matched by corgi-rs's own matcher.
static MODEL_SUPPLEMENT: LazyLock<HashMap<&'static str, Vec<ModelPattern>>> = LazyLock::new(|| {
    let bytes = zstd::decode_all(&include_bytes!("model-supplement.tsv.zst")[..]).unwrap_or_default();
    // Kept for the process's life, as the table is.
    let text: &'static str = String::from_utf8(bytes).unwrap_or_default().leak();
    let mut by_wmi: HashMap<&'static str, Vec<ModelPattern>> = HashMap::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&'static str> = line.split('\t').collect();
        let [wmi, from, to, keys, make, model] = cols[..] else { continue };
        let (Ok(year_from), Ok(year_to)) = (from.parse(), to.parse()) else { continue };
        by_wmi.entry(wmi).or_default().push(ModelPattern { year_from, year_to, keys, make, model });
    }
    by_wmi
});

/// The make (and model) vPIC's newer patterns give `vin` (with its check
/// digit already computed) in model year `year`: the most specific matching
/// keys decide, as in vPIC, and only when they agree on one make.
fn newer_model(vin: &str, year: Option<u16>) -> Option<NewerModel> {
    best_model(MODEL_SUPPLEMENT.get(&vin[..3])?, vin, year?)
}

/// [`newer_model`] among `patterns`.
fn best_model(patterns: &[ModelPattern], vin: &str, year: u16) -> Option<NewerModel> {
    let key = corgi_rs::pattern::match_key(vin);
    let matching: Vec<&ModelPattern> = patterns
        .iter()
        .filter(|p| p.year_from <= year && (p.year_to == 0 || year <= p.year_to))
        .filter(|p| corgi_rs::pattern::keys_match(p.keys, &key))
        .collect();
    let best = matching.iter().map(|p| corgi_rs::pattern::literal_len(p.keys)).max()?;
    let top: Vec<&ModelPattern> =
        matching.into_iter().filter(|p| corgi_rs::pattern::literal_len(p.keys) == best).collect();
    let first = top[0];
    top.iter().all(|p| p.make == first.make).then(|| NewerModel {
        make: first.make,
        model: top.iter().all(|p| p.model == first.model).then_some(first.model),
        keys: first.keys,
    })
}

/// What [`newer_model`] found: the make, the model where the patterns
/// agree on one, and the keys that matched.
struct NewerModel {
    make: &'static str,
    model: Option<&'static str>,
    keys: &'static str,
}

/// What corgi-rs's WMI entry alone says, for a VIN whose patterns cannot
/// be decoded.
fn from_wmi(w: &WmiEntry) -> Vehicle {
    let vehicle_type = corgi_rs::element::vehicle_type_name(w.vehicle_type_id).unwrap_or_default();
    wmi_only(&w.make, &w.manufacturer, &w.country, vehicle_type)
}

/// A decode of the WMI alone, vPIC-style: make and country upper case.
fn wmi_only(make: &str, manufacturer: &str, country: &str, vehicle_type: &str) -> Vehicle {
    Vehicle {
        make: make.to_uppercase(),
        manufacturer: manufacturer.to_string(),
        plant_country: country.to_uppercase(),
        vehicle_type: vehicle_type.to_string(),
        ..Vehicle::default()
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
    fn an_unreadable_year_still_gives_what_the_wmi_says() {
        // Position 10 is `0`: no model year, so no pattern applies; vPIC
        // still names the make, the manufacturer and its country.
        for (vin, make) in [("WBAJR31050CE20846", "BMW"), ("JTNB23HK203029472", "TOYOTA")] {
            let v = decode(vin);
            assert_eq!(v.make, make, "{vin}");
            assert!(!v.manufacturer.is_empty() && !v.plant_country.is_empty(), "{vin}: {v:?}");
            assert!(!v.vehicle_type.is_empty(), "{vin}: {v:?}");
            assert!(v.error_code.split(',').any(|c| c == "11"), "{vin}: {}", v.error_code);
            assert_eq!(v.model_year, "", "{vin}");
        }
    }

    #[test]
    fn a_wmi_vpic_knows_but_the_tables_lack_still_names_the_make() {
        // LRW (Tesla Shanghai) was registered after corgi-rs's export.
        let v = decode("LRWYGDFD3PC939701");
        assert_eq!((v.make.as_str(), v.plant_country.as_str(), v.model_year.as_str()), ("TESLA", "CHINA", "2023"));
        assert_eq!(v.error_code, "8");
        assert!(v.error_text.contains("vPIC knows WMI LRW"), "{}", v.error_text);
    }

    #[test]
    fn a_shared_wmi_takes_its_make_from_the_model_vpics_newer_patterns_name() {
        // 5T4 is shared by Workhorse, Caterpillar, IC Bus and International;
        // its schema 3214 ends in 2013 in the embedded tables and is open in
        // vPIC's current data, where `JN` is a Caterpillar CR7AA.
        for (vin, make, model, year) in
            [("5T4JNEEH3R6510752", "CATERPILLAR", "CR7AA", "2024"), ("5T4XW3RV0EG147603", "IC BUS", "PC805", "2014")]
        {
            let v = decode(vin);
            assert_eq!((v.make.as_str(), v.model.as_str(), v.model_year.as_str()), (make, model, year), "{vin}");
            assert_eq!(v.manufacturer, "Workhorse Custom Chassis", "{vin}");
            assert!(v.error_text.contains("make and model from vPIC's newer patterns"), "{}", v.error_text);
        }
    }

    #[test]
    fn a_newer_pattern_in_the_other_cycle_moves_the_year_and_keeps_only_the_wmis_fields() {
        // 10T's `FJ` was `FJ**[A-M]` in the embedded export, so position 8
        // `N` matches no model there, and the 1994 patterns name none; vPIC's
        // current `FJ` (2024 on) is a Frontline Tractor.
        let v = decode("10TFJKFN8RS897281");
        assert_eq!((v.make.as_str(), v.model.as_str(), v.model_year.as_str()), ("FRONTLINE", "Tractor", "2024"));
        assert_eq!(v.manufacturer, "OSHKOSH CORPORATION");
        assert_eq!((v.series.as_str(), v.drive_type.as_str()), ("", ""), "the 1994 decode's fields are left out");
        assert!(
            v.error_text.contains(
                "model year 2024 or 1994 by position 10; the embedded patterns fit 1994 best but name no model, and vPIC's newer patterns name one for 2024, so 2024 is stated"
            ),
            "{}",
            v.error_text
        );
        assert_eq!(v.error_text.matches("model year").count(), 1, "one sentence for the year: {}", v.error_text);
        assert_eq!(v.error_code, "8");
    }

    #[test]
    fn the_most_specific_newer_pattern_decides_and_only_on_one_make() {
        let p = |year_from, year_to, keys, make, model| ModelPattern { year_from, year_to, keys, make, model };
        let vin = "5T4JNEEH3R6510752";
        let patterns = [p(2013, 0, "J", "IC Bus", "PB105"), p(2013, 0, "JN", "Caterpillar", "CR7AA")];
        let found = best_model(&patterns, vin, 2024).expect("JN matches");
        assert_eq!((found.make, found.model, found.keys), ("Caterpillar", Some("CR7AA"), "JN"));
        // Outside the schema's years, nothing.
        assert!(best_model(&patterns, vin, 2012).is_none());
        let closed = [p(2013, 2013, "JN", "Caterpillar", "CR7AA")];
        assert!(best_model(&closed, vin, 2024).is_none());
        // Two makes at the same specificity (the same keys in two
        // schemas): none is picked.
        let tied = [p(2013, 0, "JN", "Caterpillar", "CR7AA"), p(2020, 0, "JN", "IC Bus", "PB105")];
        assert!(best_model(&tied, vin, 2024).is_none());
        // One make, two models: the make, and no model.
        let models = [p(2013, 0, "JN", "Caterpillar", "CR7AA"), p(2020, 0, "JN", "Caterpillar", "CT660")];
        let found = best_model(&models, vin, 2024).expect("one make");
        assert_eq!((found.make, found.model), ("Caterpillar", None));
    }

    #[test]
    fn no_model_year_is_in_the_future() {
        // Position 10 `1` is 2001 or 2031; position 7 is a digit, so 2001,
        // though the 2031 block's patterns name a model.
        let v = decode("WDD2040081A167295");
        assert_eq!(v.model_year, "2001");
        assert!(v.error_text.contains("model year 2001 by vPIC's rule for positions 10 and 7"), "{}", v.error_text);
        // A heavy truck (no position-7 rule): `W` is 1998 or 2028; 2028 is after next year.
        let in_2026 = Decoder::new().unwrap().with_latest_year(2027);
        assert_eq!(in_2026.decode(&Vin::parse("1XKPM78LXW5057123").unwrap()).model_year, "1998");
    }

    #[test]
    fn the_rule_year_is_kept_where_corgi_picks_the_other_cycle() {
        // A Peugeot 508: position 7 is a letter, so 2012, though vPIC's
        // Peugeot patterns are from the 1980s.
        let v = decode("VF38DRHC8CL054898");
        assert_eq!(v.model_year, "2012");
        assert!(v.error_text.contains("patterns match model year 1982"), "{}", v.error_text);
    }

    #[test]
    fn a_heavy_truck_takes_the_year_whose_patterns_decode_it() {
        // Freightliner's WMI is a heavy-truck maker's: position 7 does not
        // bind, so `R` is 1994 or 2024 and vPIC keeps the better of the two
        // decodes. The model and the year come from the same one.
        let v = decode("1FUJHAK27R7246963");
        assert_eq!((v.model_year.as_str(), v.model.as_str()), ("1994", "FL70"), "{}", v.error_text);
        assert!(
            v.error_text.contains("model year 2024 or 1994 by position 10; the VIN's patterns fit both and 1994 best")
        );
        // Only the 1985 patterns decode this one.
        let v = decode("JPENY1ZC9FZ565621");
        assert_eq!(v.model_year, "1985");
        assert!(v.error_text.contains("the VIN's patterns fit 1985 only"), "{}", v.error_text);
    }

    #[test]
    fn an_unregistered_maker_is_error_7_with_empty_fields() {
        let v = decode("ZZZCM82633A004352");
        assert!(v.error_code.split(',').any(|c| c == "7"), "{}", v.error_code);
        assert_eq!(v.make, "");
        assert_eq!(v.model_year, "");
    }
}
