//! Records where corgi-rs's build script put the vPIC tables, so a binary run
//! on the machine that built it finds them even when `$HOME` has changed
//! since (a new shell, a CI user, `sudo`). `MAPS_DIR` and the packaged layout
//! come first; see `decoder::tables_dir`.

fn main() {
    // corgi-rs 0.4.0's build.rs writes to $CORGI_CACHE_DIR, else
    // $HOME/.corgi-rs-cache; this mirrors that choice.
    let dir = std::env::var("CORGI_CACHE_DIR")
        .ok()
        .filter(|d| !d.is_empty())
        .or_else(|| std::env::var("HOME").ok().map(|h| format!("{h}/.corgi-rs-cache")))
        .unwrap_or_default();
    println!("cargo:rustc-env=VINETL_BUILD_TABLES_DIR={dir}");
    println!("cargo:rerun-if-env-changed=CORGI_CACHE_DIR");
    println!("cargo:rerun-if-env-changed=HOME");
    println!("cargo:rerun-if-changed=src/build.rs");
    // sqlx::migrate! embeds the migrations at compile time but cannot tell
    // cargo to watch them: a migration added alone would not be embedded
    // by an incremental build.
    println!("cargo:rerun-if-changed=migrations");
}
