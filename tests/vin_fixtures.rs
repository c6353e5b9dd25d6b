//! VIN rules against real published VINs and their sources' claims.

use vinetl::vin::Vin;

/// Every row its source marks `[INVALID:` is rejected or carries a flag (a
/// check-digit mismatch, or letters in the serial positions 14–17); no other
/// row is rejected.
#[test]
fn published_invalid_vins_are_rejected_or_flagged_and_no_others_rejected() {
    let text = std::fs::read_to_string("tests/fixtures/public-vins.tsv").unwrap();
    let mut invalid_seen = 0;
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        let (raw, source) = (cols[0], cols.get(4).copied().unwrap_or(""));
        let parsed = Vin::parse(raw);
        if source.contains("[INVALID:") {
            invalid_seen += 1;
            let caught = match &parsed {
                Err(_) => true,
                Ok(vin) => !vin.check_digit_valid() || !vin.serial_numeric(),
            };
            assert!(caught, "{raw} ({source}) passed every rule: {parsed:?}");
        } else {
            assert!(parsed.is_ok(), "{raw} ({source}) was rejected: {parsed:?}");
        }
    }
    assert_eq!(invalid_seen, 7, "the fixture's [INVALID: rows");
}

#[test]
fn the_non_numeric_serial_is_the_only_invalid_row_with_a_good_check_digit() {
    let vin = Vin::parse("PX0W9XD10RZL37HD7").unwrap();
    assert!(vin.check_digit_valid() && !vin.serial_numeric());
}

#[test]
fn every_pattern_vin_parses_with_its_check_digit() {
    let text = std::fs::read_to_string("tests/fixtures/pattern-vins.txt").unwrap();
    let vins: Vec<Vin> = text.lines().map(|l| Vin::parse(l).unwrap()).collect();
    assert_eq!(vins.len(), 1000);
    assert!(vins.iter().all(Vin::check_digit_valid));
}

#[test]
fn the_guides_sample_vins() {
    // The guide's decode example is the textbook Honda VIN: its check digit holds.
    assert!(Vin::parse("1HGBH41JXMN109186").unwrap().check_digit_valid());
    // Its BMW batch example (a 2011 328i) fails the check digit: a flag only.
    let bmw = Vin::parse("WBAPH5C55BA218692").unwrap();
    assert!(!bmw.check_digit_valid());
    assert_eq!(bmw.model_years().preferred, Some(2011));
}

/// Why a decode disagrees with a public VIN's claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// vPIC has no pattern for it: the field stays empty (or WMI-level only).
    NoPattern,
    /// The claim is looser or more detailed than vPIC's name for the same thing.
    LooseClaim,
    /// Not a North-American VIN: position 10 is not a model year, or vPIC
    /// knows the maker only from its US imports of other years.
    NotNorthAmerican,
    // No claim here is wrong by the VIN's own positions; a wrong one would
    // get a reason of its own.
}

/// Every disagreement between the embedded decoder and a claim of
/// tests/fixtures/public-vins.tsv, with its reason: (VIN, field, reason, what
/// vinetl says and why).
const MISSES: &[(&str, &str, Why, &str)] = &[
    // JN1 is shared by Nissan, Infiniti and Datsun; the Qashqai was never
    // sold in the US, so no pattern names it, and 2023's schemas match nothing.
    ("JN1BJ1AW5PW109661", "make", Why::NoPattern, "shared WMI JN1, no pattern for a Qashqai: make unknown"),
    ("JN1BJ1AW5PW109661", "model", Why::NoPattern, "no US pattern for the Qashqai"),
    ("1GTGK13U83F214071", "model", Why::LooseClaim, "vPIC's model is Sierra; 1500 is its series"),
    ("WVGZZZ5NZEW069297", "model", Why::NotNorthAmerican, "position 7 `5` gives 1984; no 1984 pattern names a Tiguan"),
    ("TMBNJ46Y964564271", "make", Why::NotNorthAmerican, "Skoda's WMI TMB is not registered with NHTSA (code 7)"),
    ("TMBNJ46Y964564271", "model", Why::NotNorthAmerican, "Skoda's WMI TMB is not registered with NHTSA (code 7)"),
    (
        "VF1HJD40367321336",
        "make",
        Why::NotNorthAmerican,
        "VF1 is shared by Renault and Eagle; no US pattern for a Duster",
    ),
    ("VF1HJD40367321336", "model", Why::NotNorthAmerican, "no US pattern for the Dacia Duster"),
    ("W0VZRHNS4L6041423", "model", Why::NotNorthAmerican, "Opel: no US pattern for the Grandland X"),
    (
        "XP7YGCEL1PB065727",
        "model",
        Why::NoPattern,
        "WMI XP7 (Tesla Berlin) came after the embedded export: WMI fields only",
    ),
    (
        "YV4A221K4L1609498",
        "year",
        Why::NotNorthAmerican,
        "position 7 `1` gives 1990 by vPIC's rule; the 2020 patterns match",
    ),
    ("TRUWT28N251018665", "model", Why::LooseClaim, "vPIC's model is TT; Coupe quattro is body and drive"),
    ("1JCMR7849JT185834", "model", Why::LooseClaim, "vPIC's model is Cherokee; Laredo is a trim"),
    // 1HD is shared by Harley-Davidson and LiveWire; the make and model
    // come from vPIC's newer patterns (src/local/model-supplement.tsv).
    (
        "1HD1MAM20DB857910",
        "model",
        Why::LooseClaim,
        "the claim is Harley's model code FLHTCUTG; vPIC names it Tri Glide Ultra Classic",
    ),
    ("XTAGFK330JY144213", "make", Why::NotNorthAmerican, "Lada's WMI XTA is not registered with NHTSA (code 7)"),
    ("XTAGFK330JY144213", "model", Why::NotNorthAmerican, "Lada's WMI XTA is not registered with NHTSA (code 7)"),
    ("XTAGFK330JY144213", "year", Why::NotNorthAmerican, "no WMI entry, so no year stated"),
    ("1HD1GP4558K319097", "model", Why::LooseClaim, "vPIC's model is Dyna Wide Glide; 105th Anniversary is an edition"),
    ("4P1BAAGF0RA026408", "make", Why::LooseClaim, "vPIC's make is PIERCE MANUFACTURING"),
    ("4P1BAAGF0RA026408", "model", Why::LooseClaim, "the claim names the kind of vehicle; vPIC's model is Pumper"),
    ("U5YH2519LKL016670", "make", Why::NotNorthAmerican, "U5Y is shared by Hyundai and Kia; no US pattern for a Ceed"),
    ("U5YH2519LKL016670", "model", Why::NotNorthAmerican, "no US pattern for the Ceed"),
    (
        "U5YH2519LKL016670",
        "year",
        Why::NotNorthAmerican,
        "position 7 `5` gives 1989; a European Kia need not follow 565.15(c)",
    ),
];

fn same(claim: &str, decoded: &str) -> bool {
    let norm = |s: &str| s.chars().filter(|c| c.is_alphanumeric()).collect::<String>().to_lowercase();
    norm(claim) == norm(decoded)
}

/// Each public VIN whose make, model or year differs from its claim has a
/// recorded reason, and each recorded reason still applies (a fix removes
/// its entry). Rows without a claim, and malformed VINs, are skipped.
#[test]
fn every_miss_against_the_public_claims_is_explained() {
    let decoder = vinetl::local::decoder::Decoder::new().expect("the vPIC tables (cargo build writes them)");
    let text = std::fs::read_to_string("tests/fixtures/public-vins.tsv").unwrap();
    let mut misses = Vec::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        let Ok(vin) = Vin::parse(cols[0]) else { continue };
        let v = decoder.decode(&vin);
        for (field, claim, decoded) in
            [("make", cols[1], &v.make), ("model", cols[2], &v.model), ("year", cols[3], &v.model_year)]
        {
            if !claim.is_empty() && !same(claim, decoded) {
                misses.push((cols[0].to_string(), field, claim.to_string(), decoded.clone(), v.error_text.clone()));
            }
        }
    }
    let unexplained: Vec<_> =
        misses.iter().filter(|(vin, field, ..)| !MISSES.iter().any(|(v, f, ..)| v == vin && f == field)).collect();
    let stale: Vec<_> =
        MISSES.iter().filter(|(v, f, ..)| !misses.iter().any(|(vin, field, ..)| vin == v && field == f)).collect();
    assert!(
        unexplained.is_empty() && stale.is_empty(),
        "unexplained misses (VIN, field, claim, decoded, ErrorText): {unexplained:#?}\nexplained but no longer missed: {stale:#?}"
    );
}
