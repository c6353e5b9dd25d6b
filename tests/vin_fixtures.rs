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
