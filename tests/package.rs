//! The deployable build: `scripts/package`'s tarball, unpacked somewhere
//! else, runs with an empty HOME and no MAPS_DIR (the Docker image is built
//! from the same layout). The binary packed is this test build's.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The packed binary, alone: no inherited environment but PATH and HOME.
fn packed(root: &Path, home: &Path) -> Command {
    let mut cmd = Command::new(root.join("bin/vinetl"));
    cmd.env_clear().env("PATH", "/usr/bin:/bin").env("HOME", home).current_dir(root);
    cmd
}

#[test]
fn the_tarball_decodes_and_runs_the_demo_from_anywhere_with_an_empty_home() {
    let dist = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .args(["scripts/package", "--bin", env!("CARGO_BIN_EXE_vinetl"), "--out"])
        .arg(dist.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tarball = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(tarball.is_file(), "{}", tarball.display());

    let elsewhere = tempfile::tempdir().unwrap();
    let unpacked = Command::new("tar").arg("-C").arg(elsewhere.path()).arg("-xzf").arg(&tarball).status().unwrap();
    assert!(unpacked.success());
    let root = std::fs::read_dir(elsewhere.path()).unwrap().next().unwrap().unwrap().path();
    assert!(root.join("share/vinetl/vpic/pattern.fst").is_file(), "the tables travel with the binary");
    let home = tempfile::tempdir().unwrap();

    // It maps the tables it carries, not the build machine's.
    let version = packed(&root, home.path()).arg("version").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout);
    let carried = std::fs::canonicalize(root.join("share/vinetl/vpic")).unwrap();
    assert!(version.contains(&format!("vPIC tables: {} (packaged", carried.display())), "{version}");

    let decoded = packed(&root, home.path()).args(["decode", "1HGCM82633A004352"]).output().unwrap();
    assert!(decoded.status.success(), "{}", String::from_utf8_lossy(&decoded.stderr));
    let entries: serde_json::Value = serde_json::from_slice(&decoded.stdout).unwrap();
    assert_eq!(entries[0]["Make"], "HONDA");

    let demo = packed(&root, home.path()).args(["run", "jobs/demo.toml"]).output().unwrap();
    let summary = String::from_utf8_lossy(&demo.stdout);
    assert!(demo.status.success(), "{summary}{}", String::from_utf8_lossy(&demo.stderr));
    assert!(summary.contains("job 1 (demo): done"), "{summary}");
    let decoded_rows = summary.lines().find(|l| l.trim_start().starts_with("decoded")).unwrap();
    assert!(decoded_rows.ends_with(" 281"), "{summary}");
    assert!(root.join("out/demo").is_dir() && root.join("vinetl.db").is_file());
    assert_eq!(std::fs::read_dir(home.path()).unwrap().count(), 0, "nothing is written to HOME");
}
