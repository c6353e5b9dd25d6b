//! Outputs that fail while a job is committed: the S3 store goes away
//! between the data files and `_SUCCESS`, and a local disk fills up. No
//! reader ever sees a half dataset marked complete, nothing already paid for
//! is called again, and the output ends whole. Figures are printed as
//! `RELIABILITY` lines, which RELIABILITY.md quotes.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{S3_ACCESS_KEY, S3_SECRET_KEY, ServeProcess, cleanup, unique_schema, vinetl_async_env, write_spec};

/// s3s-fs on a fixed port and root, so it can be stopped and started again.
fn s3s_fs(port: u16, root: &Path) -> std::process::Child {
    let child = std::process::Command::new("s3s-fs")
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
        .arg(root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("s3s-fs (scripts/test installs it)");
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A TCP proxy in front of the S3 server that calls `trigger` once, the
/// moment a client sends a request whose first bytes hold `PUT ` and
/// `needle`, before forwarding it: how the test stops the store at an
/// exact step of the commit. Threads, blocking sockets: it lives as long as
/// the test process.
fn proxy(upstream: u16, needle: &'static str, trigger: impl Fn() + Send + Sync + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let trigger = Arc::new(trigger);
    let fired = Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let (trigger, fired) = (Arc::clone(&trigger), Arc::clone(&fired));
            std::thread::spawn(move || {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
                let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_read, &mut c_write);
                    let _ = c_write.shutdown(std::net::Shutdown::Both);
                });
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match c_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let head = String::from_utf8_lossy(&buf[..n.min(512)]);
                    if head.starts_with("PUT ") && head.contains(needle) && !fired.swap(true, Ordering::SeqCst) {
                        trigger();
                        break; // this request never reaches the store
                    }
                    if s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s_write.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    port
}

/// Every file under `dir`, relative to it.
fn files(dir: &Path) -> Vec<String> {
    common::files_under(dir).iter().map(|p| p.strip_prefix(dir).unwrap().display().to_string()).collect()
}

fn parquet_rows(path: &Path) -> i64 {
    let reader = parquet::file::reader::SerializedFileReader::new(std::fs::File::open(path).unwrap()).unwrap();
    parquet::file::reader::FileReader::metadata(&reader).file_metadata().num_rows()
}

/// What a reader that trusts `_SUCCESS` sees in a partition of the dataset
/// at `root`: `None` while it is not marked complete; otherwise the rows of
/// the files its manifest lists (paths relative to `root`), each of which
/// must exist.
fn committed_rows(root: &Path, partition: &Path) -> Option<i64> {
    if !partition.join("_SUCCESS").is_file() {
        return None;
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(partition.join("_manifest.json")).expect("_SUCCESS without a manifest"))
            .unwrap();
    let mut rows = 0;
    for f in manifest["files"].as_array().unwrap() {
        let path = root.join(f["path"].as_str().unwrap());
        assert!(path.is_file(), "_SUCCESS, but the manifest's {} is missing", path.display());
        rows += parquet_rows(&path);
    }
    Some(rows)
}

fn vins(n: usize) -> Vec<String> {
    let pattern = std::fs::read_to_string("tests/fixtures/pattern-vins.txt").unwrap();
    let all: Vec<&str> = pattern.lines().take(60).collect();
    (0..n).map(|i| all[i % all.len()].to_string()).collect()
}

/// The store is stopped at the exact moment the manifest is about to be
/// written (the data files are in place, `_SUCCESS` is gone), for 20 s,
/// then started again on the same port and files. The commit waits for it
/// and completes: `_SUCCESS` never exists without every file its manifest
/// lists, and no call is made again.
#[tokio::test(flavor = "multi_thread")]
async fn s3_stopped_between_the_data_files_and_success_then_restored() {
    let root = tempfile::tempdir().unwrap();
    let s3_port = free_port();
    let store = Arc::new(std::sync::Mutex::new(Some(s3s_fs(s3_port, root.path()))));
    let creds = aws_sdk_s3::config::Credentials::new(S3_ACCESS_KEY, S3_SECRET_KEY, None, None, "test");
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .endpoint_url(format!("http://127.0.0.1:{s3_port}"))
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf).create_bucket().bucket("lake").send().await.unwrap();
    let down_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let (s, d) = (Arc::clone(&store), Arc::clone(&down_at));
    let proxy_port = proxy(s3_port, "_manifest.json", move || {
        if let Some(mut child) = s.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        *d.lock().unwrap() = Some(Instant::now());
    });

    let server = ServeProcess::start(&[]);
    let schema = unique_schema("s3commit");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vins.txt"), vins(3000).join("\n")).unwrap();
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &server.url, "");
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(
        &spec,
        format!(
            "{text}[[outputs]]\nkind = \"parquet\"\npath = \"s3://lake/fleet/\"\npartition = \"none\"\nendpoint = \"http://127.0.0.1:{proxy_port}\"\n"
        ),
    )
    .unwrap();
    let envs =
        [("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY), ("AWS_REGION", "us-east-1")];
    let run = {
        let (schema, spec) = (schema.clone(), spec.clone());
        tokio::spawn(async move {
            vinetl_async_env(&schema, "pro-counted-key", &["run", spec.to_str().unwrap()], &envs).await
        })
    };
    // Wait for the outage, look at what a reader would see, and restore.
    let partition = root.path().join("lake").join("fleet");
    let started = Instant::now();
    while down_at.lock().unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(120), "the commit never reached its manifest");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let during = files(&partition);
    assert_eq!(committed_rows(&partition, &partition), None, "not marked complete while the store is away: {during:?}");
    let data_files = during.iter().filter(|f| f.ends_with(".parquet") && !f.starts_with("_temporary")).count();
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(committed_rows(&partition, &partition), None, "still not marked complete");
    *store.lock().unwrap() = Some(s3s_fs(s3_port, root.path()));
    let restored = Instant::now();
    let out = run.await.unwrap();
    let waited = restored.elapsed().as_secs_f64();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the commit rode out the outage:\n{stdout}\n{stderr}");
    assert_eq!(committed_rows(&partition, &partition), Some(3000), "{:?}", files(&partition));
    assert!(files(&partition).iter().all(|f| !f.starts_with("_temporary")), "no staging left: {:?}", files(&partition));
    let calls = common::requests_seen(&server.url, "pro-counted-key", 100_000).await;
    assert_eq!(calls, 3, "60 distinct VINs, three calls, none repeated for the commit");
    println!(
        "RELIABILITY s3-commit: s3s-fs stopped for 20 s between the data files ({data_files} in place) and the \
         manifest; _SUCCESS absent meanwhile; rows lost 0, duplicated 0; calls wasted 0; committed {waited:.1} s after it was back"
    );
    if let Some(mut child) = store.lock().unwrap().take() {
        let _ = child.kill();
    }
    cleanup(&schema).await;
}

/// A tmpfs that `umount`s itself.
struct SmallDisk(PathBuf);

impl SmallDisk {
    /// `None` where this process may not mount (not root).
    fn mount(dir: &Path, size_kib: u32) -> Option<SmallDisk> {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_kib}k"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk(dir.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The output directory is on a disk with almost no room left: the job
/// fails naming the path and the reason, keeps every result, and `vinetl
/// write` completes once there is room, with no call.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_the_write_with_the_path_and_vinetl_write_completes_with_no_call() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let Some(_disk) = SmallDisk::mount(&mnt, 2048) else {
        println!("RELIABILITY disk-full: not run (this process may not mount a tmpfs; CI runs as root)");
        return;
    };
    // Leave 32 KiB free: far less than the output needs.
    let filler = mnt.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 32 * 1024];
    for _ in 0..((2048 - 32) / 32) {
        f.write_all(&block).unwrap();
    }
    drop(f);
    let server = ServeProcess::start(&[]);
    let schema = unique_schema("diskfull");
    std::fs::write(dir.path().join("vins.txt"), vins(20_000).join("\n")).unwrap();
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &server.url, "");
    let out_dir = mnt.join("out");
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, format!("{text}[[outputs]]\nkind = \"parquet\"\npath = \"{}\"\n", out_dir.display()))
        .unwrap();
    let out = vinetl_async_env(&schema, "pro-counted-key", &["run", spec.to_str().unwrap()], &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let error = stderr.lines().find(|l| l.starts_with("vinetl:")).unwrap_or_default().to_string();
    assert!(
        error.contains(&out_dir.display().to_string()) && error.contains("No space left on device"),
        "the path and the reason: {error}"
    );
    let calls = common::requests_seen(&server.url, "pro-counted-key", 100_000).await;
    let committed = out_dir.read_dir().map(|d| d.flatten().count()).unwrap_or(0);
    // Room again: the results are all stored, the write needs no call.
    std::fs::remove_file(&filler).unwrap();
    let again = vinetl_async_env(&schema, "pro-counted-key", &["write", "1"], &[]).await;
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let after = common::requests_seen(&server.url, "pro-counted-key", 100_000).await;
    assert_eq!(after, calls + 1, "no call for the write (the one more is the count's own probe)");
    let partition = std::fs::read_dir(&out_dir)
        .unwrap()
        .flatten()
        .find(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('_'))
        .unwrap()
        .path();
    assert_eq!(committed_rows(&out_dir, &partition), Some(20_000), "{:?}", files(&out_dir));
    println!(
        "RELIABILITY disk-full: output on a 2 MiB tmpfs with 32 KiB free; exit 3 naming {}: No space left on device; \
         {committed} entries left in the output directory; rows lost 0, duplicated 0; calls wasted 0 (`vinetl write` made none)",
        out_dir.display()
    );
    cleanup(&schema).await;
}
