//! What the end-to-end tests of the `cowvm` binary share: running it, a VM process killed if
//! a test fails, the console, the API socket, and what `inspect` says of a checkpoint.

// Each test binary uses its own share of these.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const COWVM: &str = env!("CARGO_BIN_EXE_cowvm");
/// How long a `cowvm` process may take to end: a hang detector, not a timing. Tests run side by
/// side, each with a reference VM and the VM under test, so on a two-core host a guest that
/// needs a minute alone can need several.
pub const LIMIT: Duration = Duration::from_secs(600);

/// A `cowvm` process; killed (by its own pid) if a test fails.
pub struct Process(Option<Child>);

impl Process {
    pub fn spawn(cmd: &mut Command) -> Process {
        Process(Some(cmd.stdin(Stdio::null()).spawn().expect("spawn cowvm")))
    }

    /// The process id, while it runs.
    pub fn id(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }

    pub fn wait(&mut self) -> ExitStatus {
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

pub fn cowvm(args: &[&str]) -> Output {
    Command::new(COWVM).args(args).output().expect("run cowvm")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
pub fn cowvm_ok(args: &[&str]) -> String {
    let out = cowvm(args);
    assert!(
        out.status.success(),
        "cowvm {args:?}: {}\n{}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `cowvm run` of the test guest with an API socket and a console file.
pub fn run_guest(dir: &Path, cmdline: &str, extra: &[&str]) -> (Process, PathBuf, PathBuf) {
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

pub fn wait_for_socket(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "the API socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until the console holds `n` lines containing `what`.
pub fn wait_for_lines(console: &Path, what: &str, n: usize) {
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
pub fn request(sock: &Path, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
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
pub fn console_bytes(ckpt: &Path) -> usize {
    let out = cowvm_ok(&["inspect", s(ckpt), "--json"]);
    let report: Value = serde_json::from_str(&out).expect("inspect --json");
    report["console_bytes"].as_u64().expect("console_bytes") as usize
}

/// The last line of a console.
pub fn last_line(output: &str) -> &str {
    output.lines().last().unwrap_or("")
}

/// Asserts that a console equals the uninterrupted run's, naming the first line that differs
/// (a whole console is too long for an assertion message to show).
pub fn assert_same_output(got: &str, expected: &str, what: &str) {
    if got == expected {
        return;
    }
    let (got_lines, expected_lines): (Vec<_>, Vec<_>) =
        (got.lines().collect(), expected.lines().collect());
    let at = got_lines
        .iter()
        .zip(&expected_lines)
        .position(|(a, b)| a != b)
        .unwrap_or(got_lines.len().min(expected_lines.len()));
    panic!(
        "{what}: output differs from the uninterrupted run at line {} of {} (expected {}): \
         got {:?}, expected {:?}",
        at + 1,
        got_lines.len(),
        expected_lines.len(),
        got_lines.get(at),
        expected_lines.get(at)
    );
}
