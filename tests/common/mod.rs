//! Shared by the integration tests: the real Postgres every machine runs,
//! and a schema of each test's own so tests run in parallel.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

/// The test database; `.ci/run` makes sure it is up.
pub fn pg_url() -> String {
    std::env::var("VINETL_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A schema name no other test (or run) uses.
pub fn unique_schema(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("t_{prefix}_{}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed), nanos)
}

/// The `vinetl` binary Cargo built for these tests.
pub fn vinetl() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vinetl"));
    cmd.env_remove("DATABASE_URL").env_remove("VINETL_SCHEMA");
    cmd
}

/// Keys every server test uses: the guide's literal `YOUR_API_KEY` (pro, so
/// the guide's snippets run verbatim), a free key and a rate-limited pro key.
pub const KEYS_TOML: &str = r#"
[[keys]]
key = "YOUR_API_KEY"
tier = "pro"
name = "guide"

[[keys]]
key = "free-tier-key"
tier = "free"
name = "free"

[[keys]]
key = "pro-5-per-second"
tier = "pro"
per_day = 1000
per_second = 5
name = "slow"
"#;

/// `vinetl serve` in this process on a free loopback port.
pub async fn serve(faults: vinetl::serve::faults::Faults) -> (vinetl::serve::RunningServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, KEYS_TOML).unwrap();
    let opts = vinetl::serve::ServeOptions { bind: "127.0.0.1:0".into(), keys: Some(keys), recalls: None, faults };
    (vinetl::serve::spawn(opts).await.unwrap(), dir)
}

/// `vinetl serve` as its own process on a free loopback port; killed on drop.
pub struct ServeProcess {
    child: std::process::Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl ServeProcess {
    pub fn start(extra: &[&str]) -> ServeProcess {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys.toml");
        std::fs::write(&keys, KEYS_TOML).unwrap();
        let mut child = vinetl()
            .args(["serve", "--bind", "127.0.0.1:0", "--keys", keys.to_str().unwrap()])
            .args(extra)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let first = lines.next().expect("serve prints its address").unwrap();
        let url = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_string();
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        ServeProcess { child, url, _dir: dir }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
