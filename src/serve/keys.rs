//! API keys, tiers and quotas of `vinetl serve`.
//!
//! Keys come from a TOML file; the server compares them in constant time and
//! never logs them. Every caller has a daily quota that resets at midnight
//! UTC, and keys may also carry a per-second limit (a token bucket whose burst
//! is one second's worth). A batch of 20 VINs counts as one request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;

use serde::Deserialize;
use subtle::ConstantTimeEq;

/// The guide's tier table.
pub const ANONYMOUS_PER_DAY: u64 = 10;
pub const FREE_PER_DAY: u64 = 100;

const DAY_SECS: f64 = 86_400.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Free,
    Pro,
}

/// One `[[keys]]` entry of the keys file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    pub key: String,
    pub tier: Tier,
    /// Requests a day; free keys default to 100, pro keys to unlimited.
    pub per_day: Option<u64>,
    /// Requests a second (burst: one second's worth); unlimited when unset.
    pub per_second: Option<f64>,
    /// A label for logs, since keys are never logged.
    pub name: Option<String>,
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
    /// Index into the configured keys.
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

#[derive(Debug, Clone, Copy)]
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

/// Keys and live usage. Usage lives in memory: a restart forgets it, like
/// any single-node development server.
pub struct Accounts {
    keys: Vec<(Vec<u8>, Limits, String)>,
    usage: Mutex<HashMap<Caller, Usage>>,
    /// Wrong keys per client address.
    pub guesses: Guesses,
}

impl Accounts {
    pub fn new(specs: Vec<KeySpec>) -> Accounts {
        let keys = specs
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let per_day = match (s.tier, s.per_day) {
                    (_, Some(n)) => Some(n),
                    (Tier::Free, None) => Some(FREE_PER_DAY),
                    (Tier::Pro, None) => None,
                };
                let name = s.name.unwrap_or_else(|| format!("key #{}", i + 1));
                (s.key.into_bytes(), Limits { per_day, per_second: s.per_second }, name)
            })
            .collect();
        Accounts { keys, usage: Mutex::new(HashMap::new()), guesses: Guesses::default() }
    }

    /// Reads a keys file:
    ///
    /// ```toml
    /// [[keys]]
    /// key = "..."
    /// tier = "pro"       # or "free"
    /// per_day = 50000    # optional
    /// per_second = 20    # optional
    /// name = "nightly"   # optional label for logs
    /// ```
    pub fn load(path: &Path) -> Result<Accounts, KeysError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read { path: shown.clone(), source })?;
        let file: KeysFile =
            toml::from_str(&text).map_err(|e| KeysError::Parse { path: shown.clone(), message: e.to_string() })?;
        for (i, k) in file.keys.iter().enumerate() {
            let invalid =
                |message: &str| KeysError::Invalid { path: shown.clone(), index: i + 1, message: message.into() };
            if k.key.trim().len() < 8 || k.key.chars().any(char::is_whitespace) {
                return Err(invalid("a key needs at least 8 characters and no whitespace"));
            }
            if k.per_second.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                return Err(invalid("per_second must be a positive number"));
            }
            // One key for two accounts would bill and limit only the first.
            if let Some(j) = file.keys[..i].iter().position(|earlier| earlier.key.trim() == k.key.trim()) {
                return Err(invalid(&format!("its key is the same as key #{}'s; every key must be unique", j + 1)));
            }
        }
        Ok(Accounts::new(file.keys))
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// The label of a key, for logs.
    pub fn name(&self, caller: Caller) -> String {
        match caller {
            Caller::Anonymous(ip) => format!("anonymous {ip}"),
            Caller::Key(i) => self.keys[i].2.clone(),
        }
    }

    /// Requests counted against each quota today (the UTC day of `now`), by
    /// key label: every key, named ones summed by name, and every anonymous
    /// caller summed as `(anonymous)`. Labels only; never a key.
    pub fn used_today(&self, now: f64) -> std::collections::BTreeMap<String, u64> {
        let day = (now / DAY_SECS).floor() as i64;
        let mut used: std::collections::BTreeMap<String, u64> =
            self.keys.iter().map(|(_, _, name)| (name.clone(), 0)).collect();
        for (caller, u) in self.usage.lock().expect("usage lock").iter().filter(|(_, u)| u.day == day) {
            let label = match caller {
                Caller::Anonymous(_) => "(anonymous)".to_string(),
                Caller::Key(i) => self.keys[*i].2.clone(),
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
        let token = token.trim().as_bytes();
        // Compare with every key, without stopping early, so timing does
        // not tell which key (or how much of one) matched.
        let mut found = None;
        for (i, (key, _, _)) in self.keys.iter().enumerate() {
            if bool::from(key.as_slice().ct_eq(token)) {
                found = Some(i);
            }
        }
        found.map(Caller::Key).ok_or(BadKey("invalid API key"))
    }

    /// Counts one request against the caller's limits at `now` (Unix
    /// seconds), or says why not. A refused request costs nothing.
    pub fn admit(&self, caller: Caller, now: f64) -> Result<Quota, Limited> {
        let limits = match caller {
            Caller::Anonymous(_) => Limits { per_day: Some(ANONYMOUS_PER_DAY), per_second: None },
            Caller::Key(i) => self.keys[i].1,
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
                let wait = ((1.0 - u.tokens) / rate).ceil().max(1.0) as u64;
                let second = Quota {
                    limit: rate.ceil() as u64,
                    remaining: 0,
                    reset: (now + (1.0 - u.tokens) / rate).ceil() as u64,
                };
                return Err(Limited { retry_after_secs: wait, quota: second, per_second: true });
            }
            u.tokens -= 1.0;
        }
        u.used += 1;
        Ok(quota(u.used))
    }
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
            KeySpec { key: "free-key-1".into(), tier: Tier::Free, per_day: None, per_second: None, name: None },
            KeySpec {
                key: "pro-key-01".into(),
                tier: Tier::Pro,
                per_day: Some(1000),
                per_second: Some(5.0),
                name: None,
            },
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
