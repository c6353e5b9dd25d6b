//! The keyed hash of the VIN an output writes with `vin_hash`: lowercase hex
//! HMAC-SHA-256 of the normalised VIN (the output's `vin`), keyed by the
//! bytes of an environment variable (`vin_hash_key_env`, default
//! `VINETL_VIN_HASH_KEY`). The same VIN and key give the same `vin_hmac` in
//! every output and job, so hashed outputs still join; without the key the
//! VIN cannot be computed back from it.
//!
//! The key is read when an output is opened for writing (on the worker or
//! the command that writes), held in a [`SecretSlice`] (no printing
//! `Debug`, wiped when dropped) and never logged.

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::Sha256;

use super::OutputError;
use crate::columns::VinHash;
use crate::spec::OutputSpec;

/// A shorter key is refused: HMAC-SHA-256 keys should carry at least 128
/// bits.
pub const MIN_KEY_BYTES: usize = 16;

/// Lowercase hex HMAC-SHA-256 of `data` under `key`: the `vin_hmac` of a VIN.
pub fn hmac_sha256_hex(key: &[u8], data: &[u8]) -> String {
    Keyed::new(key).hash(data)
}

/// The HMAC state prepared from a key, cloned for each value (half the work
/// of keying it again). Short-lived: made per chunk of rows, never printed.
pub struct Keyed(Hmac<Sha256>);

impl Keyed {
    fn new(key: &[u8]) -> Keyed {
        Keyed(Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length"))
    }

    pub fn hash(&self, data: &[u8]) -> String {
        let mut mac = self.0.clone();
        mac.update(data);
        hex::encode(mac.finalize().into_bytes())
    }

    /// `vin_hmac` of a row: the hash of its `vin`, null where `vin` is null
    /// (a rejected row keeps no VIN to hash).
    pub fn vin(&self, vin: Option<&str>) -> Option<String> {
        vin.map(|v| self.hash(v.as_bytes()))
    }
}

/// An output's `vin_hash` and its key.
pub struct VinHasher {
    mode: VinHash,
    key: SecretSlice<u8>,
}

impl std::fmt::Debug for VinHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VinHasher").field("mode", &self.mode).field("key", &"[redacted]").finish()
    }
}

impl VinHasher {
    /// A hasher with a key at hand (tests, tools); the key must be at
    /// least [`MIN_KEY_BYTES`] long.
    pub fn new(mode: VinHash, key: Vec<u8>) -> Result<VinHasher, String> {
        let key = SecretSlice::from(key);
        if key.expose_secret().len() < MIN_KEY_BYTES {
            return Err(format!("the key must be at least {MIN_KEY_BYTES} bytes"));
        }
        Ok(VinHasher { mode, key })
    }

    /// The hasher an output asks for, its key read from the output's
    /// variable now; `None` when the output has no `vin_hash`. `shown` names
    /// the output in the error (`outputs[1] (parquet s3://...)`). A missing,
    /// empty or short key fails without writing anything; the key itself is
    /// never in a message.
    pub fn for_output(output: &OutputSpec, shown: &str) -> Result<Option<VinHasher>, OutputError> {
        let Some(mode) = output.vin_hash() else { return Ok(None) };
        let var = output.vin_hash_key_env();
        let key =
            SecretSlice::from(std::env::var_os(var).map(std::ffi::OsString::into_encoded_bytes).unwrap_or_default());
        let bytes = key.expose_secret();
        if bytes.len() >= MIN_KEY_BYTES && !bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Some(VinHasher { mode, key }));
        }
        let held = if bytes.iter().all(u8::is_ascii_whitespace) {
            "it is unset or blank".to_string()
        } else {
            format!("it holds {}", bytes.len())
        };
        Err(OutputError::write(
            shown,
            format!(
                "vin_hash needs a key in {var} (at least {MIN_KEY_BYTES} bytes; {held}); set it on every worker \
                 and wherever `vinetl run`, `write` or `reprocess` writes this output"
            ),
        ))
    }

    pub fn mode(&self) -> VinHash {
        self.mode
    }

    /// The key prepared for hashing a chunk of rows.
    pub fn keyed(&self) -> Keyed {
        Keyed::new(self.key.expose_secret())
    }
}

/// How an output is named in a key error: `outputs[I] (parquet PATH)` or
/// `outputs[I] (postgres SCHEMA.TABLE)`.
pub fn shown(index: usize, output: &OutputSpec) -> String {
    format!("outputs[{index}] ({})", described(output))
}

/// `parquet PATH` or `postgres SCHEMA.TABLE`.
pub fn described(output: &OutputSpec) -> String {
    match output {
        OutputSpec::Parquet { path, .. } => format!("parquet {path}"),
        OutputSpec::Postgres { schema, results_table, .. } => format!("postgres {schema}.{results_table}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_4231_test_case_2() {
        assert_eq!(
            hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_row_without_a_vin_has_no_hash_and_a_short_key_is_refused() {
        let h = VinHasher::new(VinHash::Beside, b"0123456789abcdef".to_vec()).unwrap();
        let keyed = h.keyed();
        assert_eq!(keyed.vin(None), None);
        let hash = keyed.vin(Some("1HGCM82633A004352")).unwrap();
        assert_eq!(hash, hmac_sha256_hex(b"0123456789abcdef", b"1HGCM82633A004352"));
        assert_eq!(hash.len(), 64);
        assert!(hash.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert!(VinHasher::new(VinHash::Beside, b"0123456789abcde".to_vec()).is_err());
        let shown = format!("{h:?}");
        assert!(!shown.contains("0123456789abcdef") && shown.contains("redacted"), "{shown}");
    }
}
