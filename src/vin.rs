//! Vehicle Identification Numbers: the one place a string becomes a [`Vin`].
//!
//! Rules come from 49 CFR 565 (VIN requirements): 17 characters from the
//! alphabet `0-9 A-Z` without `I`, `O` and `Q`; a check digit in position 9
//! (565.15); the model year in position 10; the manufacturer identifier (WMI)
//! in positions 1–3, or 1–3 plus 12–14 for small manufacturers whose
//! position 3 is `9`.
//!
//! A check-digit mismatch is a *flag*, not a rejection: manufacturers outside
//! North America are not bound by 565.15 and many of their VINs carry a
//! letter or an arbitrary digit there. Downstream code takes a [`Vin`] and can
//! never see an unparsed string.

use std::fmt;

/// Length of every modern (1981+) VIN.
pub const VIN_LEN: usize = 17;

/// Position weights of 49 CFR 565.15, table IV. Position 9 (index 8) is the
/// check digit itself and weighs zero.
const WEIGHTS: [u32; VIN_LEN] = [8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2];

/// Why a string is not a VIN. Positions are 1-based, as in the regulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum VinError {
    #[error("empty VIN")]
    Empty,
    #[error("wrong length: {len} characters, a VIN has 17")]
    WrongLength { len: usize },
    #[error("letter {ch:?} at position {position} is never used in a VIN (I, O and Q are excluded)")]
    IllegalLetter { position: usize, ch: char },
    #[error("character {ch:?} at position {position} is not a letter or digit")]
    InvalidCharacter { position: usize, ch: char },
}

impl VinError {
    /// Stable snake_case name of the error kind, used as `error_code` in
    /// outputs and as the key of the counts in `vinetl check --json`.
    pub fn kind(&self) -> &'static str {
        match self {
            VinError::Empty => "empty",
            VinError::WrongLength { .. } => "wrong_length",
            VinError::IllegalLetter { .. } => "illegal_letter",
            VinError::InvalidCharacter { .. } => "invalid_character",
        }
    }

    /// Every kind, in the order reports list them.
    pub const KINDS: [&'static str; 4] = ["empty", "wrong_length", "illegal_letter", "invalid_character"];
}

/// A syntactically valid, normalised VIN (uppercase, 17 legal characters).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vin([u8; VIN_LEN]);

impl Vin {
    /// Normalises `input` and parses it.
    ///
    /// Normalisation trims whitespace, drops a UTF-8 byte-order mark and one
    /// pair of surrounding quotes (`"` or `'`), and uppercases. Anything else
    /// wrong is an error naming the first offending position.
    ///
    /// ```
    /// use vinetl::vin::{Vin, VinError};
    ///
    /// let vin = Vin::parse(" \"1hgcm82633a004352\" ").unwrap();
    /// assert_eq!(vin.as_str(), "1HGCM82633A004352");
    /// assert!(vin.check_digit_valid());
    /// assert_eq!(vin.model_years().preferred, Some(2003));
    ///
    /// assert_eq!(Vin::parse("1HGCM82633A00435O"), Err(VinError::IllegalLetter { position: 17, ch: 'O' }));
    /// ```
    pub fn parse(input: &str) -> Result<Vin, VinError> {
        let s = normalise(input);
        if s.is_empty() {
            return Err(VinError::Empty);
        }
        let len = s.chars().count();
        if len != VIN_LEN {
            return Err(VinError::WrongLength { len });
        }
        let mut out = [0u8; VIN_LEN];
        for (i, ch) in s.chars().enumerate() {
            let up = ch.to_ascii_uppercase();
            match up {
                'I' | 'O' | 'Q' => return Err(VinError::IllegalLetter { position: i + 1, ch }),
                'A'..='Z' | '0'..='9' => out[i] = up as u8,
                _ => return Err(VinError::InvalidCharacter { position: i + 1, ch }),
            }
        }
        Ok(Vin(out))
    }

    /// Parses a VIN exactly as given, without normalising anything but case:
    /// the API's rule, where a client sends one VIN per field. A string with
    /// surrounding whitespace or quotes has the wrong length.
    pub fn parse_exact(input: &str) -> Result<Vin, VinError> {
        let len = input.chars().count();
        match len {
            0 => Err(VinError::Empty),
            VIN_LEN => Vin::parse(input),
            _ => Err(VinError::WrongLength { len }),
        }
    }

    /// The VIN as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII letters and digits are ever stored.
        std::str::from_utf8(&self.0).expect("VIN bytes are ASCII")
    }

    /// The character at a 1-based position.
    fn at(&self, position: usize) -> u8 {
        self.0[position - 1]
    }

    /// The check digit that 49 CFR 565.15 computes for positions 1–8 and 10–17.
    pub fn expected_check_digit(&self) -> char {
        let sum: u32 = self.0.iter().zip(WEIGHTS).map(|(&c, w)| transliterate(c) * w).sum();
        match sum % 11 {
            10 => 'X',
            d => char::from_digit(d, 10).expect("remainder below 10"),
        }
    }

    /// The character actually in position 9.
    pub fn check_digit(&self) -> char {
        self.at(9) as char
    }

    /// Whether position 9 holds the computed check digit. `false` is a flag:
    /// the VIN may still be real (see the module docs).
    pub fn check_digit_valid(&self) -> bool {
        self.check_digit() == self.expected_check_digit()
    }

    /// Whether the last four characters (positions 14–17) are digits, as both
    /// 49 CFR 565.15(d) and ISO 3779 require of the production sequence
    /// number. `false` is a flag, like a check-digit mismatch: the string is
    /// well formed, but no conforming manufacturer issued it.
    pub fn serial_numeric(&self) -> bool {
        self.0[13..].iter().all(u8::is_ascii_digit)
    }

    /// The first position of 14–17 that holds a letter, if any.
    pub fn first_non_numeric_serial(&self) -> Option<(usize, char)> {
        (14..=VIN_LEN).map(|p| (p, self.at(p))).find(|(_, c)| !c.is_ascii_digit()).map(|(p, c)| (p, c as char))
    }

    /// World manufacturer identifier: positions 1–3, or 1–3 plus 12–14 when
    /// position 3 is `9` (manufacturers of fewer than 1,000 vehicles a year).
    pub fn wmi(&self) -> String {
        let mut w = String::with_capacity(6);
        w.push_str(&self.as_str()[0..3]);
        if self.at(3) == b'9' {
            w.push_str(&self.as_str()[11..14]);
        }
        w
    }

    /// Model years that position 10 can stand for, oldest first, with the one
    /// the position-7 rule prefers were the VIN a car, MPV or light truck
    /// ([`Vin::year_reading`], with no year too late).
    pub fn model_years(&self) -> ModelYears {
        let Some(base) = year_code_offset(self.at(10)) else {
            return ModelYears { candidates: Vec::new(), preferred: None };
        };
        // The code alphabet repeats every 30 years from 1980.
        let candidates: Vec<u16> = vec![1980 + base, 2010 + base];
        let preferred = self.year_reading(true, u16::MAX).map(YearReading::default_year);
        ModelYears { candidates, preferred }
    }

    /// The model year by vPIC's rule (its `fVinModelYear2`), `None` where
    /// position 10 is not a year code. `car_lt` is what the WMI's entry
    /// says: a passenger car, an MPV or a light truck. For those, position 7
    /// picks the cycle (49 CFR 565.15(c)): a digit 1980-2009, a letter
    /// 2010-2039. A year after `latest` (next year) is read 30 years
    /// earlier. Anything else is [`YearReading::Either`]: vPIC decodes the
    /// VIN in both cycles and keeps the one whose patterns match better.
    pub fn year_reading(&self, car_lt: bool, latest: u16) -> Option<YearReading> {
        let base = year_code_offset(self.at(10))?;
        let (earlier, later) = (1980 + base, 2010 + base);
        Some(if later > latest || (car_lt && self.at(7).is_ascii_digit()) {
            YearReading::Conclusive(earlier)
        } else if car_lt && self.at(7).is_ascii_alphabetic() {
            YearReading::Conclusive(later)
        } else {
            YearReading::Either { earlier, later }
        })
    }
}

/// What vPIC's rule makes of position 10 (see [`Vin::year_reading`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YearReading {
    /// The rule names one year.
    Conclusive(u16),
    /// Both cycles are possible and neither is after next year; the
    /// VIN's patterns decide, and the later one when they fit both alike.
    Either { earlier: u16, later: u16 },
}

impl YearReading {
    /// The year that stands when the patterns cannot tell: the later one.
    pub fn default_year(self) -> u16 {
        match self {
            YearReading::Conclusive(y) | YearReading::Either { later: y, .. } => y,
        }
    }

    /// Whether `year` is one the rule allows.
    pub fn allows(self, year: u16) -> bool {
        match self {
            YearReading::Conclusive(y) => y == year,
            YearReading::Either { earlier, later } => year == earlier || year == later,
        }
    }
}

/// Model-year reading of position 10.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelYears {
    /// Every year the code can stand for, oldest first; empty when position 10
    /// is not a year code (`0`, `U`, `Z`).
    pub candidates: Vec<u16>,
    /// The candidate the position-7 rule picks for North-American light vehicles.
    pub preferred: Option<u16>,
}

impl fmt::Display for Vin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Vin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Vin({})", self.as_str())
    }
}

impl std::str::FromStr for Vin {
    type Err = VinError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Vin::parse(s)
    }
}

impl serde::Serialize for Vin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Vin {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Vin::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Trim, drop a BOM and one pair of matching surrounding quotes.
fn normalise(input: &str) -> &str {
    let s = input.trim().trim_start_matches('\u{feff}').trim();
    for q in ['"', '\''] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return s[1..s.len() - 1].trim();
        }
    }
    s
}

/// Numeric value of a VIN character for the check digit (565.15 table III).
fn transliterate(c: u8) -> u32 {
    match c {
        b'0'..=b'9' => u32::from(c - b'0'),
        b'A' | b'J' => 1,
        b'B' | b'K' | b'S' => 2,
        b'C' | b'L' | b'T' => 3,
        b'D' | b'M' | b'U' => 4,
        b'E' | b'N' | b'V' => 5,
        b'F' | b'W' => 6,
        b'G' | b'P' | b'X' => 7,
        b'H' | b'Y' => 8,
        b'R' | b'Z' => 9,
        _ => unreachable!("parse admits only legal VIN characters"),
    }
}

/// Years after 1980 that a position-10 code stands for (565.15 table VI).
fn year_code_offset(code: u8) -> Option<u16> {
    const CODES: &[u8; 30] = b"ABCDEFGHJKLMNPRSTVWXY123456789";
    CODES.iter().position(|&c| c == code).map(|i| i as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn computes_the_textbook_check_digit() {
        let vin = Vin::parse("1M8GDM9AXKP042788").unwrap();
        assert_eq!(vin.expected_check_digit(), 'X');
        assert!(vin.check_digit_valid());
        assert!(Vin::parse("1HGCM82633A004352").unwrap().check_digit_valid());
    }

    #[test]
    fn a_wrong_check_digit_is_a_flag_not_a_rejection() {
        let vin = Vin::parse("WBAPH5C55BA218692").unwrap();
        assert!(!vin.check_digit_valid());
        assert_eq!(vin.check_digit(), '5');
    }

    #[test]
    fn normalises_whitespace_bom_quotes_and_case() {
        let want = Vin::parse("1HGCM82633A004352").unwrap();
        for raw in
            ["  1hgcm82633a004352\t", "\u{feff}1HGCM82633A004352", "\"1HGCM82633A004352\"", "' 1HGCM82633A004352 '"]
        {
            assert_eq!(Vin::parse(raw).unwrap(), want, "{raw:?}");
        }
    }

    #[test]
    fn exact_parsing_refuses_what_normalising_would_forgive() {
        assert!(Vin::parse_exact("1hgcm82633a004352").is_ok());
        assert_eq!(Vin::parse_exact(" 1HGCM82633A004352"), Err(VinError::WrongLength { len: 18 }));
        assert_eq!(Vin::parse_exact("\"1HGCM82633A004352\""), Err(VinError::WrongLength { len: 19 }));
        assert_eq!(Vin::parse_exact(""), Err(VinError::Empty));
        assert_eq!(Vin::parse_exact("   "), Err(VinError::WrongLength { len: 3 }));
    }

    #[test]
    fn rejections_name_the_kind_position_and_character() {
        assert_eq!(Vin::parse("  "), Err(VinError::Empty));
        assert_eq!(Vin::parse("JM3KE4BY6G06"), Err(VinError::WrongLength { len: 12 }));
        assert_eq!(Vin::parse("1C6RR7LT2JS17957I"), Err(VinError::IllegalLetter { position: 17, ch: 'I' }));
        assert_eq!(Vin::parse("1C6RR7LT2JS1795o1"), Err(VinError::IllegalLetter { position: 16, ch: 'o' }));
        assert_eq!(Vin::parse("1C6RR7LT2-S179571"), Err(VinError::InvalidCharacter { position: 10, ch: '-' }));
        assert_eq!(Vin::parse("1C6RR7LT2ÉS179571"), Err(VinError::InvalidCharacter { position: 10, ch: 'É' }));
    }

    #[test]
    fn letters_in_the_serial_are_a_flag() {
        let vin = Vin::parse("PX0W9XD10RZL37HD7").unwrap();
        assert!(vin.check_digit_valid());
        assert!(!vin.serial_numeric());
        assert_eq!(vin.first_non_numeric_serial(), Some((15, 'H')));
        assert!(Vin::parse("1HGCM82633A004352").unwrap().serial_numeric());
    }

    #[test]
    fn six_character_wmi_for_small_manufacturers() {
        assert_eq!(Vin::parse("YT9NN1U14KA007175").unwrap().wmi(), "YT9007");
        assert_eq!(Vin::parse("1HGCM82633A004352").unwrap().wmi(), "1HG");
    }

    #[test]
    fn model_year_uses_position_seven_for_light_vehicles() {
        // Position 7 digit: the 1980–2009 cycle.
        let accord = Vin::parse("1HGCM82633A004352").unwrap().model_years();
        assert_eq!(accord.candidates, vec![2003, 2033]);
        assert_eq!(accord.preferred, Some(2003));
        // Position 7 letter: the 2010–2039 cycle.
        let ram = Vin::parse("1C6RR7LT2JS179571").unwrap().model_years();
        assert_eq!(ram.candidates, vec![1988, 2018]);
        assert_eq!(ram.preferred, Some(2018));
        // Position 10 `0` is not a year code.
        let bmw = Vin::parse("WBAUD910X0P379389").unwrap().model_years();
        assert!(bmw.candidates.is_empty());
        assert_eq!(bmw.preferred, None);
    }

    #[test]
    fn error_kinds_are_listed() {
        for e in [
            VinError::Empty,
            VinError::WrongLength { len: 1 },
            VinError::IllegalLetter { position: 1, ch: 'I' },
            VinError::InvalidCharacter { position: 1, ch: '-' },
        ] {
            assert!(VinError::KINDS.contains(&e.kind()));
        }
    }

    const LEGAL: &str = "[0-9A-HJ-NPR-Z]{17}";

    proptest! {
        #[test]
        fn the_rule_year_is_never_in_the_future(raw in "[A-HJ-NPR-Z0-9]{17}", car_lt in any::<bool>(), latest in 2020u16..2040) {
            let vin = Vin::parse(&raw).unwrap();
            let p7 = vin.at(7);
            match vin.year_reading(car_lt, latest) {
                Some(reading) => {
                    let years: Vec<u16> = vin.model_years().candidates.into_iter().filter(|&y| reading.allows(y)).collect();
                    prop_assert!(!years.is_empty(), "{raw}: {reading:?} allows no year position 10 names");
                    prop_assert!(years.iter().all(|y| (1980..=latest).contains(y)), "{raw}: {years:?} after {latest}");
                    prop_assert!((1980..=latest).contains(&reading.default_year()));
                    if car_lt && p7.is_ascii_digit() {
                        prop_assert!(reading.default_year() < 2010, "{raw}: a digit in position 7 is 1980-2009");
                    }
                    if car_lt && p7.is_ascii_alphabetic() && reading.default_year() + 30 <= latest {
                        prop_assert!(false, "{raw}: {reading:?} when the later cycle is not in the future");
                    }
                    if matches!(reading, YearReading::Either { .. }) {
                        prop_assert!(!car_lt, "{raw}: position 7 binds a car, MPV or light truck");
                    }
                }
                None => prop_assert!(vin.model_years().candidates.is_empty()),
            }
        }

        #[test]
        fn every_legal_string_of_length_17_parses(s in LEGAL) {
            prop_assert!(Vin::parse(&s).is_ok());
        }

        #[test]
        fn a_vin_with_its_computed_check_digit_passes(s in LEGAL) {
            let vin = Vin::parse(&s).unwrap();
            let mut fixed = s.into_bytes();
            fixed[8] = vin.expected_check_digit() as u8;
            let fixed = Vin::parse(std::str::from_utf8(&fixed).unwrap()).unwrap();
            prop_assert!(fixed.check_digit_valid());
        }

        #[test]
        fn parse_is_idempotent_on_its_own_output(s in "[ \"]{0,2}[0-9a-zA-Z]{17}[ \"]{0,2}") {
            if let Ok(vin) = Vin::parse(&s) {
                prop_assert_eq!(Vin::parse(vin.as_str()), Ok(vin));
            }
        }

        #[test]
        fn any_single_changed_character_breaks_the_check_digit(s in LEGAL, pos in 0usize..17, c in "[0-9A-HJ-NPR-Z]") {
            // 565.15's weights make every single substitution at a weighted
            // position detectable unless the transliterated values agree.
            let vin = Vin::parse(&s).unwrap();
            let mut fixed = s.clone().into_bytes();
            fixed[8] = vin.expected_check_digit() as u8;
            let orig = fixed.clone();
            fixed[pos] = c.as_bytes()[0];
            let changed = Vin::parse(std::str::from_utf8(&fixed).unwrap()).unwrap();
            let same_value = transliterate(orig[pos]) == transliterate(fixed[pos]);
            if pos != 8 && !same_value {
                prop_assert!(!changed.check_digit_valid());
            }
        }
    }
}
