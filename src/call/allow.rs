//! Which API hosts a worker calls and which environment variables it sends
//! as the key. A job's spec is read back from the database, and anyone who
//! can write the `jobs` table could otherwise make every worker send, say,
//! `DATABASE_URL` as a Bearer token to a host of their choosing. So a
//! worker takes these from its own configuration, never from the spec:
//!
//! - `VINETL_API_HOSTS`: hosts (`host` or `host:port`, comma-separated).
//!   Default: the Car Vin API (`www.carvinapi.com`, `carvinapi.com`) and
//!   loopback, where `vinetl serve` runs for development and tests.
//! - `VINETL_API_KEY_ENVS`: variable names. Default: `CARVIN_API_KEY`.
//! - `VINETL_API_KEY_FILES`: key files (`provider.api_key_file`), paths,
//!   comma-separated. Default: none.
//! - `VINETL_ALLOW_PLAIN_HTTP=1`: lets a worker send its key over plain
//!   `http://` to a host that is not loopback. Default: refused, as a
//!   typo'd `http://www.carvinapi.com` would send the production key in
//!   the clear with every call (a redirect to https comes too late).
//!
//! `vinetl run SPEC` also allows the host, variable and key file of the
//! spec it was handed: the person who ran it chose them.

use crate::spec::ProviderSpec;

/// The hosts allowed when `VINETL_API_HOSTS` is not set.
pub const DEFAULT_HOSTS: &[&str] = &["www.carvinapi.com", "carvinapi.com", "127.0.0.1", "localhost", "[::1]"];
/// The key variables allowed when `VINETL_API_KEY_ENVS` is not set.
pub const DEFAULT_KEY_ENVS: &[&str] = &["CARVIN_API_KEY"];

/// A worker's allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiAllow {
    /// Lowercase `host` or `host:port`.
    hosts: Vec<String>,
    key_envs: Vec<String>,
    key_files: Vec<String>,
    /// `http://` to a host that is not loopback is allowed.
    plain_http: bool,
}

impl ApiAllow {
    /// From `VINETL_API_HOSTS` and `VINETL_API_KEY_ENVS`, or the defaults.
    pub fn from_env() -> ApiAllow {
        let list = |var: &str, default: &[&str]| -> Vec<String> {
            match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => {
                    v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
                }
                _ => default.iter().map(|s| s.to_string()).collect(),
            }
        };
        ApiAllow {
            hosts: list("VINETL_API_HOSTS", DEFAULT_HOSTS).into_iter().map(|h| h.to_ascii_lowercase()).collect(),
            key_envs: list("VINETL_API_KEY_ENVS", DEFAULT_KEY_ENVS),
            key_files: list("VINETL_API_KEY_FILES", &[]),
            plain_http: std::env::var("VINETL_ALLOW_PLAIN_HTTP")
                .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes")),
        }
    }

    /// Also allows `p`'s host and key variable (`vinetl run` of a spec the
    /// user handed it).
    pub fn with(mut self, p: &ProviderSpec) -> ApiAllow {
        if let Some((host, port)) = host_port(&p.base_url) {
            self.hosts.push(format!("{host}:{port}"));
        }
        self.key_envs.push(p.api_key_env.clone());
        self.key_files.extend(p.api_key_file.clone());
        self
    }

    /// Whether a worker may call `p`: an error naming the setting to change if not.
    pub fn check(&self, p: &ProviderSpec) -> Result<(), String> {
        if let Some(file) = &p.api_key_file {
            if !self.key_files.contains(file) {
                return Err(format!(
                    "the spec reads the API key from the file {}, which this worker does not allow: \
                     set VINETL_API_KEY_FILES on the workers to allow it{}",
                    crate::columns::quoted(file),
                    if self.key_files.is_empty() {
                        String::new()
                    } else {
                        format!(" (allowed: {})", self.key_files.join(", "))
                    }
                ));
            }
        } else if !self.key_envs.contains(&p.api_key_env) {
            return Err(format!(
                "the spec sends the variable {} as the API key, which this worker does not allow: keys come from {} \
                 (set VINETL_API_KEY_ENVS on the workers to allow other names)",
                crate::columns::quoted(&p.api_key_env),
                self.key_envs.join(", ")
            ));
        }
        let Some((host, port)) = host_port(&p.base_url) else {
            return Err(format!("the spec's base_url {} is not an http(s) URL", crate::columns::quoted(&p.base_url)));
        };
        let with_port = format!("{host}:{port}");
        if !self.hosts.iter().any(|h| *h == host || *h == with_port) {
            return Err(format!(
                "the spec calls {}, a host this worker does not allow (allowed: {}); \
                 set VINETL_API_HOSTS on the workers to allow it",
                crate::columns::quoted(&with_port),
                self.hosts.join(", ")
            ));
        }
        if !self.plain_http && plain_to_remote(&p.base_url) {
            return Err(format!(
                "the spec's base_url {} would send the API key unencrypted to a host that is not loopback: \
                 use https://, or set VINETL_ALLOW_PLAIN_HTTP=1 on the workers if that network is yours",
                crate::columns::quoted(&p.base_url)
            ));
        }
        Ok(())
    }
}

/// Whether `base_url` is plain `http://` to a host other than loopback
/// (`localhost`, 127.0.0.0/8, `::1`).
fn plain_to_remote(base_url: &str) -> bool {
    let Ok(url) = url::Url::parse(base_url) else { return false };
    url.scheme() == "http"
        && match url.host() {
            Some(url::Host::Ipv4(a)) => !a.is_loopback(),
            Some(url::Host::Ipv6(a)) => !a.is_loopback(),
            Some(url::Host::Domain(d)) => !d.eq_ignore_ascii_case("localhost"),
            None => false,
        }
}

/// The URL's lowercase host (IPv6 in brackets) and port, for http(s) only.
fn host_port(base_url: &str) -> Option<(String, u16)> {
    let url = url::Url::parse(base_url).ok()?;
    if !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    let host = match url.host()? {
        url::Host::Ipv6(a) => format!("[{a}]"),
        other => other.to_string().to_ascii_lowercase(),
    };
    Some((host, url.port_or_known_default()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(base_url: &str, key_env: &str) -> ProviderSpec {
        let text = format!(
            "name = \"t\"\n[source]\nkind = \"file\"\npath = \"x\"\n[provider]\nbase_url = \"{base_url}\"\napi_key_env = \"{key_env}\"\nrequests_per_second = 1\n"
        );
        crate::spec::JobSpec::parse("t", &text).unwrap().provider
    }

    fn defaults() -> ApiAllow {
        ApiAllow {
            hosts: DEFAULT_HOSTS.iter().map(|s| s.to_string()).collect(),
            key_envs: DEFAULT_KEY_ENVS.iter().map(|s| s.to_string()).collect(),
            key_files: Vec::new(),
            plain_http: false,
        }
    }

    #[test]
    fn the_key_goes_over_plain_http_only_to_loopback_unless_allowed() {
        let allow = defaults();
        for local in ["http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080"] {
            assert_eq!(allow.check(&provider(local, "CARVIN_API_KEY")), Ok(()), "{local}");
        }
        let typo = provider("http://www.carvinapi.com", "CARVIN_API_KEY");
        let e = allow.check(&typo).unwrap_err();
        assert!(e.contains("unencrypted") && e.contains("VINETL_ALLOW_PLAIN_HTTP"), "{e}");
        let lan = provider("http://10.0.0.5:8080", "CARVIN_API_KEY");
        assert!(defaults().with(&lan).check(&lan).is_err(), "`vinetl run`'s own host too");
        let trusted = ApiAllow { plain_http: true, ..defaults() };
        assert_eq!(trusted.check(&typo), Ok(()));
        assert_eq!(trusted.with(&lan).check(&lan), Ok(()));
    }

    #[test]
    fn only_allowed_hosts_and_key_variables_are_called() {
        let allow = defaults();
        assert_eq!(allow.check(&provider("https://www.carvinapi.com", "CARVIN_API_KEY")), Ok(()));
        assert_eq!(allow.check(&provider("http://127.0.0.1:8080", "CARVIN_API_KEY")), Ok(()));
        assert_eq!(allow.check(&provider("http://[::1]:8080", "CARVIN_API_KEY")), Ok(()));
        let e = allow.check(&provider("https://evil.example", "CARVIN_API_KEY")).unwrap_err();
        assert!(e.contains("evil.example:443") && e.contains("VINETL_API_HOSTS"), "{e}");
        // A host allowed by name only in its user-info is still refused.
        let e = allow.check(&provider("https://www.carvinapi.com@evil.example", "CARVIN_API_KEY")).unwrap_err();
        assert!(e.contains("evil.example"), "{e}");
        let e = allow.check(&provider("https://www.carvinapi.com", "DATABASE_URL")).unwrap_err();
        assert!(e.contains("\"DATABASE_URL\"") && e.contains("VINETL_API_KEY_ENVS"), "{e}");
        // `vinetl run` allows the spec it was handed, port and all.
        let own = provider("https://api.example:8443", "MY_KEY");
        let allow = defaults().with(&own);
        assert_eq!(allow.check(&own), Ok(()));
        assert!(allow.check(&provider("https://api.example:9443", "MY_KEY")).is_err());
    }

    #[test]
    fn only_allowed_key_files_are_read() {
        let mut p = provider("https://www.carvinapi.com", "CARVIN_API_KEY");
        p.api_key_file = Some("/home/app/.ssh/id_ed25519".into());
        let e = defaults().check(&p).unwrap_err();
        assert!(e.contains("id_ed25519") && e.contains("VINETL_API_KEY_FILES"), "{e}");
        let mut allow = defaults();
        allow.key_files.push("/run/secrets/carvin".into());
        assert!(allow.check(&p).is_err());
        p.api_key_file = Some("/run/secrets/carvin".into());
        assert_eq!(allow.check(&p), Ok(()));
        assert_eq!(defaults().with(&p).check(&p), Ok(()), "`vinetl run` allows its own spec's file");
    }
}
