//! Checkpoints in an S3 bucket end to end, against a real SeaweedFS server: a running VM is
//! checkpointed to `s3://` through the CLI and its API, inspected, restored and cloned from
//! there, with output identical to the uninterrupted run; a store that cannot be used fails the
//! checkpoint with one clear line while the VM runs on.

#[path = "../../ckpt-format/tests/s3_server/mod.rs"]
mod s3_server;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use s3_server::{Weed, ACCESS_KEY, BUCKET, SECRET_KEY};

const COWVM: &str = env!("CARGO_BIN_EXE_cowvm");
/// How long a `cowvm` process may take: a hang detector, not a timing (the tests of this file
/// run side by side with a SeaweedFS server on a two-core host).
const LIMIT: Duration = Duration::from_secs(600);
const CMDLINE: &str = "compute mem=4M rounds=600 seed=3";

/// A `cowvm` process; killed (by its own pid) if a test fails.
struct Process(Option<Child>);

impl Process {
    fn wait_success(&mut self) -> bool {
        let child = self.0.as_mut().expect("running");
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.0 = None;
                return status.success();
            }
            assert!(Instant::now() < deadline, "cowvm did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `cowvm` command with the test identity's credentials in its environment.
fn command(secret: &str) -> Command {
    let mut cmd = Command::new(COWVM);
    cmd.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_REGION", "us-east-1")
        .env_remove("AWS_ENDPOINT_URL")
        .stdin(Stdio::null());
    cmd
}

fn cowvm(args: &[&str]) -> Output {
    command(SECRET_KEY).args(args).output().expect("run cowvm")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn cowvm_ok(args: &[&str]) -> String {
    let out = cowvm(args);
    assert!(
        out.status.success(),
        "cowvm {args:?}: {}\n{}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `cowvm run` of the test guest with an API socket and a console file; `secret` is the
/// secret key in its environment (it writes the checkpoints).
fn run_guest(dir: &Path, secret: &str) -> (Process, PathBuf, PathBuf) {
    let sock = dir.join("api.sock");
    let console = dir.join("console.txt");
    let child = command(secret)
        .args(["run", "--kernel"])
        .arg(guests::pvh_guest())
        .args(["--cmdline", CMDLINE, "--mem", "64M", "--console"])
        .arg(&console)
        .arg("--api-sock")
        .arg(&sock)
        .spawn()
        .expect("spawn cowvm");
    let deadline = Instant::now() + Duration::from_secs(60);
    while UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "the API socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    (Process(Some(child)), sock, console)
}

/// Waits until the console holds `n` lines containing `what`.
fn wait_for_lines(console: &Path, what: &str, n: usize) {
    let deadline = Instant::now() + LIMIT;
    while read(console).matches(what).count() < n {
        assert!(Instant::now() < deadline, "never saw {n} {what:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `GET /vm` over the socket: the JSON body.
fn get_vm(sock: &Path) -> Value {
    let mut conn = UnixStream::connect(sock).expect("connect");
    conn.write_all(b"GET /vm HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("read");
    let json = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(json).unwrap_or(Value::Null)
}

fn last_line(output: &str) -> &str {
    output.lines().last().unwrap_or("")
}

#[test]
fn checkpoint_to_s3_then_inspect_restore_and_clone_from_it() {
    let weed = Weed::shared();
    let endpoint = weed.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("s3://{BUCKET}/vm/first");

    let (mut vm, sock, console) = run_guest(dir.path(), SECRET_KEY);
    wait_for_lines(&console, "round=", 3);
    cowvm_ok(&[
        "checkpoint",
        "--api-sock",
        s(&sock),
        "--out",
        &url,
        "--s3-endpoint",
        &endpoint,
    ]);
    assert!(vm.wait_success());
    let full = read(&console);
    assert!(last_line(&full).starts_with("compute checksum="), "{full}");

    let out = cowvm_ok(&["inspect", &url, "--s3-endpoint", &endpoint, "--json"]);
    let report: Value = serde_json::from_str(&out).expect("inspect --json");
    let at = report["console_bytes"].as_u64().expect("console_bytes") as usize;
    assert!(at > 0 && at < full.len(), "{at} of {}", full.len());
    let suffix = &full[at..];
    cowvm_ok(&["inspect", &url, "--s3-endpoint", &endpoint, "--verify"]);

    let restored = dir.path().join("restored.txt");
    cowvm_ok(&[
        "restore",
        &url,
        "--s3-endpoint",
        &endpoint,
        "--console",
        s(&restored),
    ]);
    assert_eq!(read(&restored), suffix, "restored output");

    let consoles = dir.path().join("consoles");
    let out = cowvm_ok(&[
        "clone",
        &url,
        "--s3-endpoint",
        &endpoint,
        "--count",
        "2",
        "--console-dir",
        s(&consoles),
        "--json",
    ]);
    let report: Value = serde_json::from_str(&out).expect("clone --json");
    let clones = report["clones"].as_array().expect("clones");
    assert_eq!(clones.len(), 2, "{report}");
    for (i, clone) in clones.iter().enumerate() {
        assert_eq!(clone["status"], 0, "{report}");
        assert_eq!(
            read(&consoles.join(format!("clone-{i}.log"))),
            suffix,
            "clone {i}"
        );
    }

    // The environment names the endpoint as well as the option does.
    let out = command(SECRET_KEY)
        .env("AWS_ENDPOINT_URL", &endpoint)
        .args(["inspect", &url])
        .output()
        .expect("run cowvm");
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A restore through a cache directory, then one from the cache alone: the chunk the guest
    // starts in is gone from the bucket, yet the output is the same.
    let cache = dir.path().join("cache");
    let cached_args = |console: &Path| {
        vec![
            "restore".to_string(),
            url.clone(),
            "--s3-endpoint".into(),
            endpoint.clone(),
            "--cache".into(),
            s(&cache).into(),
            "--console".into(),
            s(console).into(),
        ]
    };
    let first = dir.path().join("cached-1.txt");
    let args = cached_args(&first);
    cowvm_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(read(&first), suffix, "restored through the cache");
    let chunk = "vm/first/memory/00000000";
    let saved = weed.get_object(chunk);
    weed.delete_object(chunk);
    let second = dir.path().join("cached-2.txt");
    let args = cached_args(&second);
    cowvm_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(read(&second), suffix, "restored from the cache");

    // Without the cache, the missing chunk stops the restored VM before the guest runs on it,
    // naming the chunk.
    let lost = dir.path().join("lost.txt");
    let out = cowvm(&[
        "restore",
        &url,
        "--s3-endpoint",
        &endpoint,
        "--console",
        s(&lost),
    ]);
    assert!(!out.status.success(), "restored without its memory");
    let err = text(&out.stderr);
    assert!(
        err.contains("memory chunk s3://ckpt/vm/first/memory/00000000 is missing"),
        "{err}"
    );
    assert!(
        !read(&lost).contains("compute"),
        "the guest ran without its memory"
    );
    weed.put_object(chunk, &saved);
}

/// An incremental checkpoint in the bucket, naming a full one there: restored, cloned and
/// flattened from S3, with output identical to the uninterrupted run.
#[test]
fn incremental_checkpoints_in_s3_restore_clone_and_flatten() {
    let weed = Weed::shared();
    let endpoint = weed.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let full_url = format!("s3://{BUCKET}/chain/full");
    let incr_url = format!("s3://{BUCKET}/chain/incr");
    let flat_url = format!("s3://{BUCKET}/chain/flat");

    let (mut vm, sock, console) = run_guest(dir.path(), SECRET_KEY);
    let take = |out: &str, parent: Option<&str>| {
        let mut args = vec![
            "checkpoint",
            "--api-sock",
            s(&sock),
            "--out",
            out,
            "--s3-endpoint",
            &endpoint,
            "--json",
        ];
        if let Some(p) = parent {
            args.extend(["--parent", p]);
        }
        let report: Value = serde_json::from_str(&cowvm_ok(&args)).expect("checkpoint --json");
        report
    };
    wait_for_lines(&console, "round=", 3);
    take(&full_url, None);
    wait_for_lines(&console, "round=", 5);
    let incr = take(&incr_url, Some(&full_url));
    assert!(incr["pages_in_parent"].as_u64().unwrap() > 0, "{incr}");
    assert!(vm.wait_success());
    let whole = read(&console);
    let out = cowvm_ok(&[
        "inspect",
        &incr_url,
        "--s3-endpoint",
        &endpoint,
        "--json",
        "--verify",
    ]);
    let report: Value = serde_json::from_str(&out).expect("inspect --json");
    assert_eq!(
        report["manifest"]["parent"]["address"],
        full_url.as_str(),
        "{report}"
    );
    let suffix = &whole[report["console_bytes"].as_u64().unwrap() as usize..];

    let restored = dir.path().join("restored.txt");
    cowvm_ok(&[
        "restore",
        &incr_url,
        "--s3-endpoint",
        &endpoint,
        "--console",
        s(&restored),
    ]);
    assert_eq!(read(&restored), suffix, "restored output");
    let consoles = dir.path().join("consoles");
    cowvm_ok(&[
        "clone",
        &incr_url,
        "--s3-endpoint",
        &endpoint,
        "--count",
        "2",
        "--console-dir",
        s(&consoles),
    ]);
    for i in 0..2 {
        assert_eq!(
            read(&consoles.join(format!("clone-{i}.log"))),
            suffix,
            "clone {i}"
        );
    }
    cowvm_ok(&[
        "checkpoint",
        "flatten",
        &incr_url,
        "--out",
        &flat_url,
        "--s3-endpoint",
        &endpoint,
    ]);
    let flat = dir.path().join("flat.txt");
    cowvm_ok(&[
        "restore",
        &flat_url,
        "--s3-endpoint",
        &endpoint,
        "--console",
        s(&flat),
    ]);
    assert_eq!(read(&flat), suffix, "flattened restore");
}

/// A loopback URL where nothing listens.
fn dead_endpoint() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    format!("http://127.0.0.1:{port}")
}

/// Asks the VM at `sock` for a checkpoint to `url` at `endpoint`, which must fail with one
/// line of error containing `expected`.
fn failed_checkpoint(sock: &Path, url: &str, endpoint: &str, expected: &str) {
    let out = cowvm(&[
        "checkpoint",
        "--api-sock",
        s(sock),
        "--out",
        url,
        "--s3-endpoint",
        endpoint,
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{url} at {endpoint}: {stderr}");
    assert!(stderr.contains(expected), "{url}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    let vm = get_vm(sock);
    assert_eq!(vm["state"], "Running", "{vm}");
}

#[test]
fn an_unusable_store_fails_the_checkpoint_clearly_and_the_vm_runs_on() {
    let weed = Weed::shared();
    let endpoint = weed.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, sock, console) = run_guest(dir.path(), SECRET_KEY);
    wait_for_lines(&console, "round=", 1);
    let url = format!("s3://{BUCKET}/vm/faults");
    failed_checkpoint(&sock, &url, &dead_endpoint(), "cannot reach S3 endpoint");
    failed_checkpoint(
        &sock,
        "s3://no-such-bucket/vm",
        &endpoint,
        "bucket no-such-bucket does not exist",
    );
    assert!(vm.wait_success());
    assert!(last_line(&read(&console)).starts_with("compute checksum="));

    // Wrong credentials in the environment of the VM's process.
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, sock, console) = run_guest(dir.path(), "not-the-secret");
    wait_for_lines(&console, "round=", 1);
    failed_checkpoint(&sock, &url, &endpoint, "access denied");
    assert!(vm.wait_success());
    assert!(last_line(&read(&console)).starts_with("compute checksum="));
}
