//! The embedded-vPIC decoder comparison that chose corgi-rs.
//!
//!   cargo bench --bench decoders --features compare-decoders
//!
//! Agreement with the published claims in tests/fixtures/public-vins.tsv
//! (make, model, year), and single-thread speed over the 1,000 pattern VINs,
//! for corgi-rs alone, vinetl's decoder (corgi-rs plus the position-9
//! workaround) and vin-decode, side by side in one run.

use std::collections::BTreeMap;
use std::time::Instant;

use vinetl::vin::Vin;

struct Outcome {
    make: String,
    model: String,
    year: String,
}

type DecodeFn<'a> = Box<dyn Fn(&str) -> Option<Outcome> + 'a>;

/// Letters and digits only, lower case: "Harley-Davidson" ~ "HARLEY DAVIDSON".
fn fold(s: &str) -> String {
    s.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect()
}

fn agrees(claim: &str, got: &str) -> (bool, bool) {
    let (c, g) = (fold(claim), fold(got));
    let exact = !c.is_empty() && c == g;
    let loose = exact || (!c.is_empty() && !g.is_empty() && (c.contains(&g) || g.contains(&c)));
    (exact, loose)
}

fn main() {
    let corgi = corgi_rs::VinDecoder::try_new().expect("corgi tables");
    let ours = vinetl::local::decoder::Decoder::new().expect("corgi tables");
    let vd = vin_decode::Decoder::new().expect("vin-decode data");
    let candidates: Vec<(&str, DecodeFn)> = vec![
        (
            "corgi-rs 0.4.0 (decode)",
            Box::new(|v: &str| {
                corgi.decode(v).ok().map(|i| Outcome {
                    make: i.make,
                    model: i.model.unwrap_or_default(),
                    year: i.year.to_string(),
                })
            }),
        ),
        (
            "vinetl decoder (corgi-rs + pos-9 workaround)",
            Box::new(|v: &str| {
                let vin = Vin::parse(v).ok()?;
                let d = ours.decode(&vin);
                (!d.make.is_empty()).then_some(Outcome { make: d.make, model: d.model, year: d.model_year })
            }),
        ),
        (
            "vin-decode 0.3.5 (decode_unchecked)",
            Box::new(|v: &str| {
                vd.decode_unchecked(v).ok().map(|d| Outcome {
                    make: d.make.unwrap_or_default(),
                    model: d.model.unwrap_or_default(),
                    year: d.model_year.map(|y| y.to_string()).unwrap_or_default(),
                })
            }),
        ),
    ];

    let tsv = std::fs::read_to_string("tests/fixtures/public-vins.tsv").unwrap();
    let rows: Vec<Vec<&str>> = tsv.lines().skip(1).map(|l| l.split('\t').collect()).collect();
    let pattern: Vec<String> =
        std::fs::read_to_string("tests/fixtures/pattern-vins.txt").unwrap().lines().map(String::from).collect();

    println!(
        "| decoder | decoded | make exact | make loose | model exact | model loose | year exact | VINs/s (1 thread) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, decode) in &candidates {
        let mut n: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
        let mut decoded = 0;
        for r in &rows {
            let got = decode(r[0]);
            decoded += u32::from(got.is_some());
            let got = got.unwrap_or(Outcome { make: String::new(), model: String::new(), year: String::new() });
            for (field, claim, value) in
                [("make", r[1], &got.make), ("model", r[2], &got.model), ("year", r[3], &got.year)]
            {
                if claim.is_empty() {
                    continue;
                }
                let (exact, loose) = agrees(claim, value);
                let e = n.entry(field).or_default();
                e.0 += u32::from(exact);
                e.1 += u32::from(loose);
            }
        }
        let claims = |f: usize| rows.iter().filter(|r| !r[f].is_empty()).count();
        // Speed: three passes over the 1,000 pattern VINs, best pass.
        let mut best = 0.0f64;
        for _ in 0..3 {
            let t = Instant::now();
            let ok = pattern.iter().filter(|v| decode(v).is_some()).count();
            assert!(ok > 900, "{name} decoded {ok} of 1000 pattern VINs");
            best = best.max(pattern.len() as f64 / t.elapsed().as_secs_f64());
        }
        println!(
            "| {name} | {decoded}/{} | {}/{} | {}/{} | {}/{} | {}/{} | {}/{} | {best:.0} |",
            rows.len(),
            n["make"].0,
            claims(1),
            n["make"].1,
            claims(1),
            n["model"].0,
            claims(2),
            n["model"].1,
            claims(2),
            n["year"].0,
            claims(3),
        );
    }
}
