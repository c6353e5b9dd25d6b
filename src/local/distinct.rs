//! Counting distinct VINs in bounded memory.
//!
//! Each VIN packs exactly into 102 bits (17 characters × 6 bits), so the set
//! is exact, with no hash collisions. Keys collect in a fixed-size buffer;
//! a full buffer is sorted, deduplicated and spilled to a temporary file as a
//! sorted run, and the runs are merged at the end. Memory is the buffer plus
//! one read buffer per run, whatever the input size.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};

use crate::vin::Vin;

/// Keys held in memory before a run is spilled: 4 Mi keys × 16 bytes = 64 MiB.
/// Ten million VINs make three runs.
pub const DEFAULT_RUN_KEYS: usize = 4 * 1024 * 1024;

/// Counts VINs and how many of them are distinct.
pub struct DistinctVins {
    run_keys: usize,
    buf: Vec<u128>,
    runs: Vec<std::fs::File>,
    seen: u64,
}

impl Default for DistinctVins {
    fn default() -> Self {
        DistinctVins::with_run_keys(DEFAULT_RUN_KEYS)
    }
}

impl DistinctVins {
    /// A counter that spills after `run_keys` keys (tests use tiny runs).
    pub fn with_run_keys(run_keys: usize) -> Self {
        DistinctVins { run_keys: run_keys.max(1), buf: Vec::new(), runs: Vec::new(), seen: 0 }
    }

    pub fn insert(&mut self, vin: &Vin) -> std::io::Result<()> {
        self.seen += 1;
        self.buf.push(pack(vin));
        if self.buf.len() >= self.run_keys {
            self.spill()?;
        }
        Ok(())
    }

    /// Number of distinct VINs inserted. Consumes the counter.
    pub fn finish(self) -> std::io::Result<u64> {
        self.finish_with(|_| {})
    }

    /// Number of distinct VINs inserted, visiting each once, in sorted
    /// order (the packed order). Consumes the counter.
    pub fn finish_with(mut self, mut visit: impl FnMut(&str)) -> std::io::Result<u64> {
        self.buf.sort_unstable();
        self.buf.dedup();
        if self.runs.is_empty() {
            for &k in &self.buf {
                visit(&unpack(k));
            }
            return Ok(self.buf.len() as u64);
        }
        let mut sources: Vec<Box<dyn Iterator<Item = std::io::Result<u128>>>> = Vec::new();
        for mut f in self.runs.drain(..) {
            f.seek(SeekFrom::Start(0))?;
            sources.push(Box::new(RunReader(BufReader::with_capacity(64 * 1024, f))));
        }
        sources.push(Box::new(std::mem::take(&mut self.buf).into_iter().map(Ok)));
        let mut heap = BinaryHeap::new();
        for (i, s) in sources.iter_mut().enumerate() {
            if let Some(k) = s.next() {
                heap.push(Reverse((k?, i)));
            }
        }
        let (mut distinct, mut last) = (0u64, None);
        while let Some(Reverse((k, i))) = heap.pop() {
            if last != Some(k) {
                distinct += 1;
                last = Some(k);
                visit(&unpack(k));
            }
            if let Some(next) = sources[i].next() {
                heap.push(Reverse((next?, i)));
            }
        }
        Ok(distinct)
    }

    /// VINs inserted so far, duplicates included.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    fn spill(&mut self) -> std::io::Result<()> {
        self.buf.sort_unstable();
        self.buf.dedup();
        let mut w = BufWriter::with_capacity(64 * 1024, tempfile::tempfile()?);
        for k in &self.buf {
            w.write_all(&k.to_le_bytes())?;
        }
        self.runs.push(w.into_inner().map_err(|e| e.into_error())?);
        self.buf.clear();
        Ok(())
    }
}

struct RunReader(BufReader<std::fs::File>);

impl Iterator for RunReader {
    type Item = std::io::Result<u128>;
    fn next(&mut self) -> Option<Self::Item> {
        let mut b = [0u8; 16];
        match self.0.read_exact(&mut b) {
            Ok(()) => Some(Ok(u128::from_le_bytes(b))),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// 6 bits a character: VIN bytes are `0-9A-Z`, all below 0x5B, and `c - b'0'`
/// fits in 6 bits.
fn pack(vin: &Vin) -> u128 {
    vin.as_str().bytes().fold(0u128, |acc, c| (acc << 6) | u128::from(c - b'0'))
}

fn unpack(k: u128) -> String {
    (0..17).rev().map(|i| char::from(((k >> (6 * i)) & 0x3f) as u8 + b'0')).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    proptest! {
        #[test]
        fn counts_exactly_like_a_hash_set_whatever_the_run_size(
            picks in proptest::collection::vec(0usize..40, 0..300),
            run_keys in 1usize..50,
        ) {
            let pool: Vec<Vin> = (0..40).map(|i| Vin::parse(&format!("1HGCM826{:09}", i * 7919)).unwrap()).collect();
            let mut counter = DistinctVins::with_run_keys(run_keys);
            let mut set = HashSet::new();
            for &i in &picks {
                counter.insert(&pool[i]).unwrap();
                set.insert(pool[i]);
            }
            prop_assert_eq!(counter.seen(), picks.len() as u64);
            let mut visited = Vec::new();
            prop_assert_eq!(counter.finish_with(|v| visited.push(v.to_string())).unwrap(), set.len() as u64);
            let mut want: Vec<String> = set.iter().map(Vin::to_string).collect();
            want.sort();
            prop_assert_eq!(visited, want, "each distinct VIN visited once, in order");
        }
    }

    #[test]
    fn packing_is_injective_on_neighbours() {
        let a = Vin::parse("1HGCM82633A004352").unwrap();
        let b = Vin::parse("1HGCM82633A004353").unwrap();
        let c = Vin::parse("HGCM82633A0043521").unwrap();
        assert_ne!(pack(&a), pack(&b));
        assert_ne!(pack(&a), pack(&c));
    }
}
