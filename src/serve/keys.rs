//! API keys, tiers and quotas of `vinetl serve`.
//!
//! Keys come from a TOML file, stored as their SHA-256 (`key_sha256`, what
//! `vinetl serve keys add` writes) or, in development files, in plain text
//! (`key`); either way the server holds only hashes, compares them in
//! constant time and never logs a key. Keys that share a `name` are one
//! account: one quota, one rate, so a key is rotated by adding the new one,
//! moving clients to it, and revoking the old, with no downtime. The file
//! is read again when it changes. Every caller has a daily quota that resets
//! at midnight UTC, and accounts may also carry a per-second limit (a token
//! bucket whose burst is one second's worth). A batch of 20 VINs counts as
//! one request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The guide's tier table.
pub const ANONYMOUS_PER_DAY: u64 = 10;
pub const FREE_PER_DAY: u64 = 100;

const DAY_SECS: f64 = 86_400.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Free,
    Pro,
}

/// One `[[keys]]` entry of the keys file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// The key in plain text: development files only.
    #[serde(default)]
    pub key: Option<String>,
    /// The key's SHA-256, in hex: what `vinetl serve keys add` writes.
    #[serde(default)]
    pub key_sha256: Option<String>,
    /// The key's first characters, to tell keys apart (`keys list`, `revoke`).
    #[serde(default)]
    pub prefix: Option<String>,
    /// When it was added (RFC 3339).
    #[serde(default)]
    pub added: Option<String>,
    pub tier: Tier,
    /// Requests a day; free keys default to 100, pro keys to unlimited.
    pub per_day: Option<u64>,
    /// Requests a second (burst: one second's worth); unlimited when unset.
    pub per_second: Option<f64>,
    /// The account: keys with one name share its quota and rate. Also the
    /// label in logs, since keys are never logged.
    pub name: Option<String>,
}

impl KeySpec {
    /// A plain-text key (tests and development files).
    pub fn plain(key: &str, tier: Tier, name: Option<&str>) -> KeySpec {
        KeySpec {
            key: Some(key.into()),
            key_sha256: None,
            prefix: None,
            added: None,
            tier,
            per_day: None,
            per_second: None,
            name: name.map(str::to_string),
        }
    }

    fn hash(&self) -> Option<[u8; 32]> {
        match (&self.key, &self.key_sha256) {
            (Some(k), None) => Some(sha256(k.trim())),
            (None, Some(h)) => {
                let bytes: Vec<u8> = (0..h.len())
                    .step_by(2)
                    .map(|i| h.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
                    .collect::<Option<_>>()?;
                bytes.try_into().ok()
            }
            _ => None,
        }
    }
}

/// SHA-256 of a key.
pub fn sha256(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeySpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{path}: cannot read keys file: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: not a valid keys file: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: key #{index} is invalid: {message}")]
    Invalid { path: String, index: usize, message: String },
}

/// Who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Caller {
    Anonymous(IpAddr),
    /// An account, by its index (stable while the server runs: reloading
    /// the keys file keeps every name's index).
    Key(usize),
}

/// The `Authorization` header was present but not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadKey(pub &'static str);

/// Quota state reported in the `X-RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    pub limit: u64,
    pub remaining: u64,
    /// Unix seconds at which `remaining` goes back to `limit`.
    pub reset: u64,
}

/// A refused request: how long to wait, and the limit that was hit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limited {
    pub retry_after_secs: u64,
    pub quota: Quota,
    pub per_second: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Limits {
    per_day: Option<u64>,
    per_second: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
struct Usage {
    day: i64,
    used: u64,
    tokens: f64,
    refilled_at: f64,
}

/// The keys (their hashes, each with its account) and the accounts, in
/// the order their names were first seen.
#[derive(Debug, Default)]
struct Table {
    keys: Vec<([u8; 32], usize)>,
    accounts: Vec<(Limits, String)>,
}

impl Table {
    /// From checked entries; `before`'s accounts keep their indices (an
    /// account whose keys are all gone stays, with no key to reach it).
    fn build(specs: &[KeySpec], before: Option<&Table>) -> Table {
        let mut t = Table { keys: Vec::new(), accounts: before.map(|b| b.accounts.clone()).unwrap_or_default() };
        for (i, s) in specs.iter().enumerate() {
            let per_day = match (s.tier, s.per_day) {
                (_, Some(n)) => Some(n),
                (Tier::Free, None) => Some(FREE_PER_DAY),
                (Tier::Pro, None) => None,
            };
            let limits = Limits { per_day, per_second: s.per_second };
            let name = s.name.clone().unwrap_or_else(|| format!("key #{}", i + 1));
            let account = match t.accounts.iter().position(|(_, n)| *n == name) {
                Some(a) => {
                    t.accounts[a].0 = limits;
                    a
                }
                None => {
                    t.accounts.push((limits, name));
                    t.accounts.len() - 1
                }
            };
            if let Some(hash) = s.hash() {
                t.keys.push((hash, account));
            }
        }
        t
    }
}

/// Keys and live usage. Usage lives in memory: a restart forgets it, like
/// any single-node development server.
pub struct Accounts {
    table: RwLock<Table>,
    usage: Mutex<HashMap<Caller, Usage>>,
    /// Wrong keys per client address.
    pub guesses: Guesses,
    /// The keys file and its time when last read, to read it again when it changes.
    file: Option<(PathBuf, Mutex<Stamp>)>,
}

impl Accounts {
    pub fn new(specs: Vec<KeySpec>) -> Accounts {
        Accounts {
            table: RwLock::new(Table::build(&specs, None)),
            usage: Mutex::new(HashMap::new()),
            guesses: Guesses::default(),
            file: None,
        }
    }

    /// Reads a keys file:
    ///
    /// ```toml
    /// [[keys]]
    /// key_sha256 = "..."  # or, in development files, key = "..."
    /// prefix = "cva_1a2b3c4d"
    /// tier = "pro"       # or "free"
    /// per_day = 50000    # optional
    /// per_second = 20    # optional
    /// name = "nightly"   # the account; also the label in logs
    /// ```
    pub fn load(path: &Path) -> Result<Accounts, KeysError> {
        let when = stamp(path);
        let specs = read_specs(path)?;
        let mut accounts = Accounts::new(specs);
        accounts.file = Some((path.to_path_buf(), Mutex::new(when)));
        Ok(accounts)
    }

    /// Reads the keys file again if it changed since: new keys work and
    /// revoked ones stop at once; usage is kept. A file that does not read
    /// (caught mid-edit, or broken) keeps the keys read before, logged.
    fn refresh(&self) {
        let Some((path, seen)) = &self.file else { return };
        let now = stamp(path);
        let mut seen = seen.lock().expect("keys file lock");
        let changed = now != *seen;
        if !changed && !recent(now) {
            return;
        }
        *seen = now;
        match read_specs(path) {
            Ok(specs) => {
                let mut table = self.table.write().expect("keys lock");
                *table = Table::build(&specs, Some(&table));
                if changed {
                    tracing::info!(keys = table.keys.len(), accounts = table.accounts.len(), "keys file read again");
                }
            }
            Err(e) if changed => {
                tracing::error!(error = %e, "keys file changed but does not read; keeping the keys read before")
            }
            Err(e) => tracing::debug!(error = %e, "keys file (changed in the last 2 s) does not read"),
        }
    }

    pub fn key_count(&self) -> usize {
        self.refresh();
        self.table.read().expect("keys lock").keys.len()
    }

    /// The label of a key, for logs.
    pub fn name(&self, caller: Caller) -> String {
        match caller {
            Caller::Anonymous(ip) => format!("anonymous {ip}"),
            Caller::Key(i) => self.table.read().expect("keys lock").accounts[i].1.clone(),
        }
    }

    /// Requests counted against each quota today (the UTC day of `now`), by
    /// key label: every key, named ones summed by name, and every anonymous
    /// caller summed as `(anonymous)`. Labels only; never a key.
    pub fn used_today(&self, now: f64) -> std::collections::BTreeMap<String, u64> {
        let day = (now / DAY_SECS).floor() as i64;
        let table = self.table.read().expect("keys lock");
        let mut used: std::collections::BTreeMap<String, u64> =
            table.accounts.iter().map(|(_, name)| (name.clone(), 0)).collect();
        for (caller, u) in self.usage.lock().expect("usage lock").iter().filter(|(_, u)| u.day == day) {
            let label = match caller {
                Caller::Anonymous(_) => "(anonymous)".to_string(),
                Caller::Key(i) => table.accounts[*i].1.clone(),
            };
            *used.entry(label).or_default() += u.used;
        }
        used
    }

    /// Resolves the `Authorization` header. No header is an anonymous
    /// caller; a header that is present must hold a known `Bearer` key.
    pub fn authenticate(&self, header: Option<&[u8]>, peer: IpAddr) -> Result<Caller, BadKey> {
        let Some(header) = header else { return Ok(Caller::Anonymous(peer)) };
        let header = std::str::from_utf8(header).map_err(|_| BadKey("Authorization header is not text"))?;
        let (scheme, token) = header.trim().split_once(' ').ok_or(BadKey("use Authorization: Bearer YOUR_API_KEY"))?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(BadKey("use Authorization: Bearer YOUR_API_KEY"));
        }
        let token = sha256(token.trim());
        self.refresh();
        // Compare with every key, without stopping early, so timing does
        // not tell which key matched.
        let mut found = None;
        for (hash, account) in &self.table.read().expect("keys lock").keys {
            if bool::from(hash.as_slice().ct_eq(&token)) {
                found = Some(*account);
            }
        }
        found.map(Caller::Key).ok_or(BadKey("invalid API key"))
    }

    /// Counts one request against the caller's limits at `now` (Unix
    /// seconds), or says why not. A refused request costs nothing.
    pub fn admit(&self, caller: Caller, now: f64) -> Result<Quota, Limited> {
        let limits = match caller {
            Caller::Anonymous(_) => Limits { per_day: Some(ANONYMOUS_PER_DAY), per_second: None },
            Caller::Key(i) => self.table.read().expect("keys lock").accounts[i].0,
        };
        let day = (now / DAY_SECS).floor() as i64;
        let reset = ((day + 1) as f64 * DAY_SECS) as u64;
        let mut usage = self.usage.lock().expect("usage lock");
        if usage.len() > 100_000 {
            // Forget yesterday's anonymous callers rather than grow forever.
            usage.retain(|c, u| matches!(c, Caller::Key(_)) || u.day == day);
        }
        let u = usage.entry(caller).or_insert(Usage {
            day,
            used: 0,
            tokens: limits.per_second.unwrap_or(0.0),
            refilled_at: now,
        });
        if u.day != day {
            u.day = day;
            u.used = 0;
        }
        let per_day = limits.per_day.unwrap_or(u64::MAX);
        let quota = |used: u64| Quota { limit: per_day, remaining: per_day.saturating_sub(used), reset };
        if u.used >= per_day {
            let wait = (reset as f64 - now).ceil().max(1.0) as u64;
            return Err(Limited { retry_after_secs: wait, quota: quota(u.used), per_second: false });
        }
        if let Some(rate) = limits.per_second {
            u.tokens = (u.tokens + (now - u.refilled_at).max(0.0) * rate).min(rate.max(1.0));
            u.refilled_at = now;
            if u.tokens < 1.0 {
                // `Retry-After` says when; the `X-RateLimit-*` headers keep
                // meaning the day's quota, so a client that reads them
                // sees quota left and can tell this 429 from the day's.
                let wait = ((1.0 - u.tokens) / rate).ceil().max(1.0) as u64;
                return Err(Limited { retry_after_secs: wait, quota: quota(u.used), per_second: true });
            }
            u.tokens -= 1.0;
        }
        u.used += 1;
        Ok(quota(u.used))
    }
}

/// What tells a keys file's versions apart: its modification time, size
/// and inode. The time alone does not: two writes within one tick of the
/// file system's clock (a truncation, then the new text; two `keys
/// revoke`s) share it, and the second would never be read.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// A file changed within the last 2 s may change again within the same
/// tick, size and all: it is read again on every request until then.
fn recent(stamp: Stamp) -> bool {
    stamp.is_some_and(|(t, _, _)| SystemTime::now().duration_since(t).map_or(true, |age| age.as_secs_f64() < 2.0))
}

/// Reads and checks a keys file's entries.
fn read_specs(path: &Path) -> Result<Vec<KeySpec>, KeysError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read { path: shown.clone(), source })?;
    let file: KeysFile =
        toml::from_str(&text).map_err(|e| KeysError::Parse { path: shown.clone(), message: e.to_string() })?;
    for (i, k) in file.keys.iter().enumerate() {
        let invalid = |message: &str| KeysError::Invalid { path: shown.clone(), index: i + 1, message: message.into() };
        match (&k.key, &k.key_sha256) {
            (Some(key), None) if key.trim().len() < 8 || key.trim().chars().any(char::is_whitespace) => {
                return Err(invalid("a key needs at least 8 characters and no whitespace"));
            }
            (None, Some(_)) if k.hash().is_none() => {
                return Err(invalid("key_sha256 must be 64 hex digits (the key's SHA-256)"));
            }
            (Some(_), None) | (None, Some(_)) => {}
            _ => return Err(invalid("give exactly one of key (plain text) and key_sha256")),
        }
        if k.per_second.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            return Err(invalid("per_second must be a positive number"));
        }
        // One key for two accounts would bill and limit only the first.
        if let Some(j) = file.keys[..i].iter().position(|earlier| earlier.hash() == k.hash()) {
            return Err(invalid(&format!("its key is the same as key #{}'s; every key must be unique", j + 1)));
        }
        // Keys of one account share its limits, so they must agree on them.
        if let Some(name) = &k.name
            && let Some(j) = file.keys[..i].iter().position(|e| e.name.as_ref() == Some(name))
        {
            let e = &file.keys[j];
            if (e.tier, e.per_day, e.per_second) != (k.tier, k.per_day, k.per_second) {
                return Err(invalid(&format!(
                    "account {name:?} has other limits in key #{} (tier, per_day, per_second must agree)",
                    j + 1
                )));
            }
        }
    }
    Ok(file.keys)
}

/// A key as `vinetl serve keys list` shows it: never the key, nor its hash.
#[derive(Debug, Clone, Serialize)]
pub struct ListedKey {
    pub name: String,
    pub prefix: String,
    pub tier: Tier,
    pub per_day: Option<u64>,
    pub per_second: Option<f64>,
    pub added: Option<String>,
    /// Whether the file holds it hashed (a plain-text key is for development).
    pub hashed: bool,
}

/// The first characters of a key `keys add` makes: enough to tell keys
/// apart, far too few to guess the rest (32 random bytes).
const PREFIX_LEN: usize = 12;

/// `vinetl serve keys add`: makes a key (`cva_` and 32 random bytes in
/// hex), appends its SHA-256 to the keys file (created if missing), and
/// returns the key: the only time it is shown. The file is replaced
/// whole (written beside it, then renamed), so a running server never
/// reads half of it; comments and layout are kept.
pub fn add_key(
    path: &Path,
    name: &str,
    tier: Tier,
    per_day: Option<u64>,
    per_second: Option<f64>,
) -> anyhow::Result<(String, String)> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for a key: {e}"))?;
    let key = format!("cva_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let prefix = key[..PREFIX_LEN].to_string();
    let mut doc = edit(path)?;
    let mut entry = toml_edit::Table::new();
    entry["name"] = toml_edit::value(name);
    entry["key_sha256"] = toml_edit::value(sha256(&key).iter().map(|b| format!("{b:02x}")).collect::<String>());
    entry["prefix"] = toml_edit::value(&prefix);
    entry["tier"] = toml_edit::value(match tier {
        Tier::Free => "free",
        Tier::Pro => "pro",
    });
    if let Some(n) = per_day {
        entry["per_day"] = toml_edit::value(n as i64);
    }
    if let Some(r) = per_second {
        entry["per_second"] = toml_edit::value(r);
    }
    entry["added"] = toml_edit::value(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    let keys = doc.entry("keys").or_insert(toml_edit::Item::ArrayOfTables(Default::default()));
    keys.as_array_of_tables_mut()
        .ok_or_else(|| anyhow::anyhow!("{}: `keys` is not [[keys]] entries", path.display()))?
        .push(entry);
    save(path, &doc.to_string())?;
    Ok((key, prefix))
}

/// `vinetl serve keys revoke PREFIX`: removes the keys whose prefix (or
/// plain-text key) starts with PREFIX. Refuses a PREFIX that is shorter
/// than 8 characters or matches keys of more than one account.
pub fn revoke_key(path: &Path, prefix: &str) -> anyhow::Result<Vec<ListedKey>> {
    if prefix.len() < 8 {
        anyhow::bail!("give at least 8 characters of the key's prefix (`vinetl serve keys list` shows them)");
    }
    let listed = list_keys(path)?;
    let gone: Vec<ListedKey> = listed.into_iter().filter(|k| k.prefix.starts_with(prefix)).collect();
    let mut names: Vec<&str> = gone.iter().map(|k| k.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    match names.len() {
        0 => anyhow::bail!(
            "{}: no key starts with {prefix:?} (`vinetl serve keys list` shows the prefixes)",
            path.display()
        ),
        1 => {}
        _ => anyhow::bail!("{prefix:?} matches keys of several accounts ({}); give more of it", names.join(", ")),
    }
    let mut doc = edit(path)?;
    if let Some(keys) = doc.get_mut("keys").and_then(toml_edit::Item::as_array_of_tables_mut) {
        keys.retain(|t| !entry_prefix(t).starts_with(prefix));
    }
    save(path, &doc.to_string())?;
    Ok(gone)
}

/// `vinetl serve keys list`: each key's account, prefix and limits.
pub fn list_keys(path: &Path) -> anyhow::Result<Vec<ListedKey>> {
    let specs = read_specs(path)?;
    Ok(specs
        .iter()
        .enumerate()
        .map(|(i, s)| ListedKey {
            name: s.name.clone().unwrap_or_else(|| format!("key #{}", i + 1)),
            prefix: s.prefix.clone().or_else(|| s.key.as_deref().map(plain_prefix)).unwrap_or_default(),
            tier: s.tier,
            per_day: s.per_day,
            per_second: s.per_second,
            added: s.added.clone(),
            hashed: s.key_sha256.is_some(),
        })
        .collect())
}

fn entry_prefix(t: &toml_edit::Table) -> String {
    let text = |k: &str| t.get(k).and_then(|v| v.as_str()).map(str::to_string);
    text("prefix").or_else(|| text("key").map(|k| plain_prefix(&k))).unwrap_or_default()
}

/// What stands for a plain `key = "…"` entry in `keys list` and `keys
/// revoke`: the start of its SHA-256, never of the key (a short key's first
/// characters are most of it).
fn plain_prefix(key: &str) -> String {
    let hash = sha256(key);
    format!("sha256:{}", hash[..4].iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn edit(path: &Path) -> anyhow::Result<toml_edit::DocumentMut> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => anyhow::bail!("{}: cannot read keys file: {e}", path.display()),
    };
    text.parse().map_err(|e| anyhow::anyhow!("{}: not a valid keys file: {e}", path.display()))
}

/// Writes beside `path` and renames over it: a reader sees the old file or
/// the new, never half. Owner-only permissions, as for any secret.
fn save(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o600))?;
    tmp.persist(path).map_err(|e| anyhow::anyhow!("{}: cannot write keys file: {e}", path.display()))?;
    Ok(())
}

/// Wrong keys from one address: a token bucket per address. The first
/// [`GUESS_BURST`] wrong keys cost nothing; then one more is allowed every
/// [`GUESS_EVERY_SECS`], and any key from that address is refused with a 429
/// until then. A client with a typo notices after its first 401; a guesser
/// gets about one try in that time rather than thousands a second.
#[derive(Debug, Default)]
pub struct Guesses {
    by_ip: Mutex<HashMap<IpAddr, (f64, f64)>>,
}

/// Room for a few honest mistakes (a rotated key, a typo, a test of each).
pub const GUESS_BURST: f64 = 10.0;
/// One guess every 2 s: 200 guesses take over six minutes instead of 0.03 s.
pub const GUESS_EVERY_SECS: f64 = 2.0;
/// Addresses remembered at most; the fully refilled ones go first.
const GUESS_ADDRESSES: usize = 100_000;

impl Guesses {
    /// Whether `ip` may present a key at `now`, or how many seconds to wait.
    pub fn check(&self, ip: IpAddr, now: f64) -> Result<(), u64> {
        let by_ip = self.by_ip.lock().expect("guesses lock");
        match by_ip.get(&ip) {
            Some(&(tokens, at)) => {
                let tokens = (tokens + (now - at).max(0.0) / GUESS_EVERY_SECS).min(GUESS_BURST);
                if tokens >= 1.0 { Ok(()) } else { Err(((1.0 - tokens) * GUESS_EVERY_SECS).ceil().max(1.0) as u64) }
            }
            None => Ok(()),
        }
    }

    /// Counts a wrong key from `ip` at `now`.
    pub fn wrong(&self, ip: IpAddr, now: f64) {
        let mut by_ip = self.by_ip.lock().expect("guesses lock");
        if by_ip.len() >= GUESS_ADDRESSES {
            by_ip.retain(|_, &mut (tokens, at)| tokens + (now - at) / GUESS_EVERY_SECS < GUESS_BURST);
        }
        let (tokens, at) = by_ip.entry(ip).or_insert((GUESS_BURST, now));
        *tokens = (*tokens + (now - *at).max(0.0) / GUESS_EVERY_SECS).min(GUESS_BURST) - 1.0;
        *at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    /// 2026-11-30T12:00:00Z.
    const NOON: f64 = 1_796_040_000.0;

    fn accounts() -> Accounts {
        Accounts::new(vec![
            KeySpec::plain("free-key-1", Tier::Free, None),
            KeySpec { per_day: Some(1000), per_second: Some(5.0), ..KeySpec::plain("pro-key-01", Tier::Pro, None) },
        ])
    }

    #[test]
    fn keys_are_bearer_tokens_and_a_bad_one_is_refused_not_downgraded() {
        let a = accounts();
        assert_eq!(a.authenticate(None, IP), Ok(Caller::Anonymous(IP)));
        assert_eq!(a.authenticate(Some(b"Bearer pro-key-01"), IP), Ok(Caller::Key(1)));
        assert_eq!(a.authenticate(Some(b"bearer  free-key-1 "), IP), Ok(Caller::Key(0)));
        assert!(a.authenticate(Some(b"Bearer nope"), IP).is_err());
        assert!(a.authenticate(Some(b"Basic free-key-1"), IP).is_err());
        assert!(a.authenticate(Some(b"free-key-1"), IP).is_err());
    }

    #[test]
    fn anonymous_callers_get_ten_a_day_and_midnight_resets_it() {
        let a = accounts();
        let me = Caller::Anonymous(IP);
        for i in 0..10 {
            assert_eq!(a.admit(me, NOON + i as f64).unwrap().remaining, 9 - i);
        }
        let refused = a.admit(me, NOON + 20.0).unwrap_err();
        assert_eq!(refused.quota.limit, 10);
        assert_eq!(refused.retry_after_secs, 12 * 3600 - 20);
        assert_eq!(refused.quota.reset, (NOON + 12.0 * 3600.0) as u64);
        // The next UTC day starts afresh.
        assert_eq!(a.admit(me, NOON + 12.0 * 3600.0).unwrap().remaining, 9);
    }

    #[test]
    fn quota_used_today_is_reported_by_label_and_yesterday_counts_nothing() {
        let a = accounts();
        for _ in 0..3 {
            a.admit(Caller::Key(0), NOON).unwrap();
        }
        a.admit(Caller::Anonymous(IP), NOON).unwrap();
        a.admit(Caller::Anonymous(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2))), NOON).unwrap();
        let used = a.used_today(NOON);
        assert_eq!(used["key #1"], 3);
        assert_eq!(used["key #2"], 0, "a key that made no request is reported too");
        assert_eq!(used["(anonymous)"], 2, "anonymous callers are summed, never labelled by address");
        assert!(used.keys().all(|label| !label.contains("key-")), "labels, never keys: {used:?}");
        let tomorrow = a.used_today(NOON + 12.0 * 3600.0);
        assert_eq!((tomorrow["key #1"], tomorrow.get("(anonymous)")), (0, None));
    }

    #[test]
    fn free_keys_get_a_hundred_a_day() {
        let a = accounts();
        for _ in 0..100 {
            a.admit(Caller::Key(0), NOON).unwrap();
        }
        assert!(a.admit(Caller::Key(0), NOON).is_err());
    }

    #[test]
    fn per_second_limits_refuse_with_a_short_wait_and_cost_no_quota() {
        let a = accounts();
        for _ in 0..5 {
            a.admit(Caller::Key(1), NOON).unwrap();
        }
        let refused = a.admit(Caller::Key(1), NOON).unwrap_err();
        assert!(refused.per_second);
        assert_eq!(refused.retry_after_secs, 1);
        // Its quota is the day's, as on every other answer.
        assert_eq!((refused.quota.limit, refused.quota.remaining), (1000, 1000 - 5));
        // 0.2 s later one token is back; the refused call cost no quota.
        assert_eq!(a.admit(Caller::Key(1), NOON + 0.2).unwrap().remaining, 1000 - 6);
    }

    #[test]
    fn wrong_keys_from_one_address_are_throttled_after_a_few() {
        let g = Guesses::default();
        let other = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
        for _ in 0..GUESS_BURST as usize {
            assert_eq!(g.check(IP, NOON), Ok(()));
            g.wrong(IP, NOON);
        }
        assert_eq!(g.check(IP, NOON), Err(GUESS_EVERY_SECS as u64));
        assert_eq!(g.check(other, NOON), Ok(()), "another address is not held back");
        assert_eq!(g.check(IP, NOON + GUESS_EVERY_SECS), Ok(()), "one more guess after the wait");
    }

    #[test]
    fn a_keys_file_with_a_key_twice_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let entry = |name: &str| format!("[[keys]]\nkey = \"same-key-123\"\ntier = \"pro\"\nname = \"{name}\"\n");
        std::fs::write(&path, format!("{}{}", entry("a"), entry("b"))).unwrap();
        let err = Accounts::load(&path).err().expect("refused").to_string();
        assert!(err.contains("key #2") && err.contains("key #1") && err.contains("unique"), "{err}");
    }

    /// A keys file edited within one tick of its clock (the same
    /// modification time) is still read again when its size says it changed.
    #[test]
    fn a_keys_file_changed_within_one_tick_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let entry = |key: &str| format!("[[keys]]\nkey = \"{key}\"\ntier = \"pro\"\n");
        let tick = SystemTime::now() - std::time::Duration::from_secs(3600);
        let write = |text: String| {
            std::fs::write(&path, text).unwrap();
            std::fs::File::options().write(true).open(&path).unwrap().set_modified(tick).unwrap();
        };
        write(entry("first-key-1"));
        let a = Accounts::load(&path).unwrap();
        assert_eq!(a.key_count(), 1);
        write(format!("{}{}", entry("first-key-1"), entry("second-key-2")));
        assert_eq!(a.key_count(), 2, "the second key is read though the time did not move");
    }

    /// A plain-text key is listed, and revoked, by the start of its hash:
    /// its own first characters could be most of it (8 is the shortest).
    #[test]
    fn a_plain_key_is_listed_by_its_hash_never_by_its_characters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let entry = |key: &str, name: &str| format!("[[keys]]\nkey = \"{key}\"\ntier = \"pro\"\nname = \"{name}\"\n");
        std::fs::write(&path, format!("{}{}", entry("k8secret", "short"), entry("another-key-1", "other"))).unwrap();
        let listed = list_keys(&path).unwrap();
        let shown = serde_json::to_string(&listed).unwrap();
        assert!(!shown.contains("k8secr") && !shown.contains("another"), "{shown}");
        assert!(listed.iter().all(|k| k.prefix.starts_with("sha256:") && k.prefix.len() == 15), "{shown}");
        let gone = revoke_key(&path, &listed[0].prefix).unwrap();
        assert_eq!(gone.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(), ["short"]);
        assert_eq!(list_keys(&path).unwrap().len(), 1);
    }

    proptest! {
        #[test]
        fn grants_in_any_second_never_exceed_rate_plus_burst(gaps in proptest::collection::vec(0u32..400, 1..300)) {
            let a = accounts();
            let mut now = NOON;
            let mut grants = Vec::new();
            for g in gaps {
                now += f64::from(g) / 1000.0;
                if a.admit(Caller::Key(1), now).is_ok() {
                    grants.push(now);
                }
            }
            for (i, &t) in grants.iter().enumerate() {
                let in_window = grants[i..].iter().take_while(|&&u| u < t + 1.0).count();
                prop_assert!(in_window <= 10, "{in_window} grants in one second");
            }
        }
    }
}
