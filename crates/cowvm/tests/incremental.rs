//! Incremental checkpoints end to end: the real binary checkpoints the deterministic test guest
//! through its API socket, fully then incrementally (CLI and API); each checkpoint restored in a
//! fresh process, cloned, or flattened prints exactly what the uninterrupted run printed after its
//! instant; a parent this VM did not take, or a missing one, is refused naming it; the periodic
//! trigger alternates full and incremental checkpoints and never prunes a needed parent.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const COWVM: &str = env!("CARGO_BIN_EXE_cowvm");
/// How long a `cowvm` process may take to end: a hang detector, not a timing. The tests of this
/// file run side by side, each with a reference VM and the VM under test, so on a two-core host
/// a guest that needs a minute alone can need several.
const LIMIT: Duration = Duration::from_secs(600);

/// A `cowvm` process; killed (by its own pid) if a test fails.
struct Process(Option<Child>);

impl Process {
    fn spawn(cmd: &mut Command) -> Process {
        Process(Some(cmd.stdin(Stdio::null()).spawn().expect("spawn cowvm")))
    }

    fn wait(&mut self) -> ExitStatus {
        let child = self.0.as_mut().expect("running");
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.0 = None;
                return status;
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

fn cowvm(args: &[&str]) -> Output {
    Command::new(COWVM).args(args).output().expect("run cowvm")
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

/// `cowvm run` of the test guest with an API socket and a console file.
fn run_guest(dir: &Path, cmdline: &str, extra: &[&str]) -> (Process, PathBuf, PathBuf) {
    let sock = dir.join("api.sock");
    let console = dir.join("console.txt");
    let process = Process::spawn(
        Command::new(COWVM)
            .args(["run", "--kernel"])
            .arg(guests::pvh_guest())
            .args(["--cmdline", cmdline, "--mem", "64M", "--console"])
            .arg(&console)
            .arg("--api-sock")
            .arg(&sock)
            .args(extra)
            .current_dir(dir),
    );
    wait_for_socket(&sock);
    (process, sock, console)
}

fn wait_for_socket(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "the API socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until the console holds `n` lines containing `what`.
fn wait_for_lines(console: &Path, what: &str, n: usize) {
    let deadline = Instant::now() + LIMIT;
    while read(console).matches(what).count() < n {
        assert!(
            Instant::now() < deadline,
            "never saw {n} {what:?}: {}",
            read(console)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One HTTP/1.1 request over the socket: (status, JSON body).
fn request(sock: &Path, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut conn = UnixStream::connect(sock).expect("connect");
    conn.set_read_timeout(Some(LIMIT)).expect("timeout");
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).expect("write");
    conn.write_all(body.as_bytes()).expect("write");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("read");
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let json = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

/// Bytes the guest had written to its console at the checkpoint instant.
fn console_bytes(ckpt: &Path) -> usize {
    let out = cowvm_ok(&["inspect", s(ckpt), "--json"]);
    let report: Value = serde_json::from_str(&out).expect("inspect --json");
    report["console_bytes"].as_u64().expect("console_bytes") as usize
}

const CMDLINE: &str = "compute mem=4M rounds=900 seed=3";

#[test]
fn incremental_checkpoints_restore_clone_and_flatten() {
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, sock, console) = run_guest(dir.path(), CMDLINE, &[]);
    wait_for_lines(&console, "round=", 3);
    let full = dir.path().join("full");
    cowvm_ok(&["checkpoint", "--api-sock", s(&sock), "--out", s(&full)]);
    wait_for_lines(&console, "round=", 6);
    let incr = dir.path().join("incr");
    let out = cowvm_ok(&[
        "checkpoint",
        "--api-sock",
        s(&sock),
        "--out",
        s(&incr),
        "--parent",
        s(&full),
        "--json",
    ]);
    let report: Value = serde_json::from_str(&out).expect("checkpoint --json");
    assert!(report["pages_in_parent"].as_u64().unwrap() > 0, "{report}");

    // Through the API, naming the incremental one as parent, with the fork strategy.
    wait_for_lines(&console, "round=", 9);
    let incr2 = dir.path().join("incr2");
    let (status, job) = request(
        &sock,
        "PUT",
        "/checkpoints?wait=true",
        Some(&json!({"out": s(&incr2), "parent": s(&incr), "strategy": "fork"})),
    );
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["status"], "complete", "{job}");

    // A parent this VM did not take is refused, naming it.
    let other = dir.path().join("other");
    let (status, answer) = request(
        &sock,
        "PUT",
        "/checkpoints?wait=true",
        Some(&json!({"out": s(&other), "parent": s(&dir.path().join("nowhere"))})),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(answer.to_string().contains("nowhere"), "{answer}");
    assert!(vm.wait().success());
    let whole = read(&console);
    assert!(
        whole
            .lines()
            .last()
            .unwrap()
            .starts_with("compute checksum="),
        "{whole}"
    );

    // Each restores in a fresh process and continues exactly.
    for ckpt in [&full, &incr, &incr2] {
        let restored = dir.path().join(format!(
            "{}.txt",
            ckpt.file_name().unwrap().to_str().unwrap()
        ));
        let mut process = Process::spawn(
            Command::new(COWVM)
                .arg("restore")
                .arg(ckpt)
                .arg("--console")
                .arg(&restored),
        );
        assert_eq!(process.wait().code(), Some(0), "{}", ckpt.display());
        assert_eq!(
            read(&restored),
            &whole[console_bytes(ckpt)..],
            "{} restored",
            ckpt.display()
        );
    }
    // Clones of the newest.
    let consoles = dir.path().join("consoles");
    cowvm_ok(&[
        "clone",
        s(&incr2),
        "--count",
        "2",
        "--console-dir",
        s(&consoles),
        "--json",
    ]);
    let suffix = &whole[console_bytes(&incr2)..];
    for i in 0..2 {
        assert_eq!(
            read(&consoles.join(format!("clone-{i}.log"))),
            suffix,
            "clone {i}"
        );
    }

    // Flattened: a full checkpoint that restores the same, without the chain.
    let flat = dir.path().join("flat");
    cowvm_ok(&["checkpoint", "flatten", s(&incr2), "--out", s(&flat)]);
    let inspected: Value =
        serde_json::from_str(&cowvm_ok(&["inspect", s(&flat), "--json", "--verify"])).unwrap();
    assert!(inspected["manifest"]["parent"].is_null(), "{inspected}");
    std::fs::rename(&full, dir.path().join("full.moved")).unwrap();
    let restored = dir.path().join("flat.txt");
    let mut process = Process::spawn(
        Command::new(COWVM)
            .arg("restore")
            .arg(&flat)
            .arg("--console")
            .arg(&restored),
    );
    assert_eq!(process.wait().code(), Some(0));
    assert_eq!(read(&restored), suffix, "flattened restore");

    // The chain without its full checkpoint is refused, naming it, in one line.
    for command in ["restore", "inspect"] {
        let out = cowvm(&[command, s(&incr2)]);
        assert_eq!(out.status.code(), Some(1), "{command}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(s(&full)), "{command}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{command}: one line: {stderr}");
    }
}

#[test]
fn periodic_checkpoints_alternate_and_keep_needed_parents() {
    let dir = tempfile::tempdir().unwrap();
    let ckpts = dir.path().join("periodic");
    let (mut vm, _sock, console) = run_guest(
        dir.path(),
        "scan mem=8M passes=0 every=20",
        &[
            "--checkpoint-every",
            "300ms",
            "--checkpoint-dir",
            s(&ckpts),
            "--keep",
            "2",
            "--full-every",
            "3",
        ],
    );
    wait_for_lines(&console, "scan pass=", 1);
    // Until a checkpoint has been pruned past at least one full cycle.
    let deadline = Instant::now() + LIMIT;
    let complete = || -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&ckpts)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        dirs.retain(|d| d.join("COMPLETE").exists());
        dirs.sort();
        dirs
    };
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 8 {
        assert!(Instant::now() < deadline, "only {} checkpoints", seen.len());
        seen.extend(complete());
        std::thread::sleep(Duration::from_millis(50));
    }
    // SIGTERM: the VM stops, a checkpoint or pruning in progress finishes.
    let pid = vm.0.as_ref().expect("running").id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    vm.wait();
    let left = complete();
    let mut incremental = 0;
    for d in &left {
        let report: Value =
            serde_json::from_str(&cowvm_ok(&["inspect", s(d), "--json", "--verify"])).unwrap();
        if !report["manifest"]["parent"].is_null() {
            incremental += 1;
        }
    }
    assert!(incremental > 0, "no incremental checkpoint among {left:?}");
    assert!(left.len() < seen.len(), "nothing was pruned: {left:?}");
}
