//! Live migration between two `cowvm` processes over loopback TCP: each mode moves a guest
//! writing memory and disk with output and disk content equal to an uninterrupted run; a
//! destination that goes away before it takes over leaves the source running as if nothing
//! happened; a source that dies during post-copy stops the destination with a clear message;
//! streams that are not cowvm's, or newer, are refused before anything runs; with
//! `--copy-disks` a guest on a qcow2 chain moves to a destination that shares no storage with
//! the source. Over TLS, a guest
//! moves the same way, and a source with the wrong certificate, or one end without TLS, is
//! refused before the pause while the VM runs on.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    assert_same_output, cowvm, read, run_guest, s, text, wait_for_lines, Process, COWVM, LIMIT,
};

const COMPUTE: &str = "compute mem=4M rounds=200 seed=3";
const DISK: &str = "disk blocks=256 rounds=6 qd=8 mem=8M";
/// Long enough for several refused migrations while it runs.
const COMPUTE_LONG: &str = "compute mem=4M rounds=600 seed=3";

/// A free local port (bound, then released for `cowvm receive`).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Starts `cowvm receive` on `port`, its console in `dir/dst.txt` and its log in
/// `dir/receive.log`; returns once it listens.
fn receive(dir: &Path, port: u16, extra: &[&str]) -> (Process, PathBuf, PathBuf) {
    let console = dir.join("dst.txt");
    let log = dir.join("receive.log");
    let process = Process::spawn(
        Command::new(COWVM)
            .args(["receive", "--listen", &format!("tcp://127.0.0.1:{port}")])
            .args(["--console", s(&console), "--log-level", "info"])
            .args(extra)
            .stderr(std::fs::File::create(&log).expect("log file"))
            .current_dir(dir),
    );
    wait_for_log(&log, "waiting for a VM");
    (process, console, log)
}

fn wait_for_log(log: &Path, what: &str) {
    let deadline = Instant::now() + LIMIT;
    while !read(log).contains(what) {
        assert!(
            Instant::now() < deadline,
            "never logged {what:?}: {}",
            read(log)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The uninterrupted run of `cmdline` with `extra` arguments: its console.
fn reference(dir: &Path, cmdline: &str, mem: &str, extra: &[&str]) -> String {
    let console = dir.join("reference.txt");
    let out = Command::new(COWVM)
        .args(["run", "--kernel"])
        .arg(guests::pvh_guest())
        .args(["--cmdline", cmdline, "--mem", mem, "--console", s(&console)])
        .args(extra)
        .output()
        .expect("run cowvm");
    assert!(out.status.success(), "reference run: {}", text(&out.stderr));
    read(&console)
}

/// The source VM: `cmdline` with `mem` of memory, an API socket and its console in `dir`, its
/// log in `src.log`; returns it once its API answers, with its socket and console.
fn run_source(dir: &Path, cmdline: &str, mem: &str) -> (Process, PathBuf, PathBuf) {
    let sock = dir.join("api.sock");
    let console = dir.join("src.txt");
    let process = Process::spawn(
        Command::new(COWVM)
            .args(["run", "--kernel"])
            .arg(guests::pvh_guest())
            .args(["--cmdline", cmdline, "--mem", mem, "--console", s(&console)])
            .args(["--api-sock", s(&sock)])
            .stderr(std::fs::File::create(dir.join("src.log")).expect("log file")),
    );
    common::wait_for_socket(&sock);
    (process, sock, console)
}

fn zeroed(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(4 << 20))
        .expect("zeroed disk");
    path
}

/// The guest-visible content of the disk image `path` (any chain), through qemu-img.
fn disk_content(path: &Path) -> Vec<u8> {
    let raw = path.with_extension("flat");
    let out = Command::new("qemu-img")
        .args(["convert", "-O", "raw", s(path), s(&raw)])
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "qemu-img: {}", text(&out.stderr));
    std::fs::read(raw).expect("flat disk")
}

/// The uninterrupted output of the compute guest `cmdline` with a zeroed disk, and the same
/// guest started (with an API socket and a zeroed disk of its own) and 20 rounds in: (expected
/// output, the VM, its socket, its console).
fn compute_guest_with_disk(dir: &Path, cmdline: &str) -> (String, Process, PathBuf, PathBuf) {
    let expected = reference(
        dir,
        cmdline,
        "64M",
        &["--disk", s(&zeroed(dir, "reference.raw"))],
    );
    let disk = zeroed(dir, "disk.raw");
    let (src, sock, console) = run_guest(dir, cmdline, &["--disk", s(&disk)]);
    wait_for_lines(&console, "round", 20);
    (expected, src, sock, console)
}

fn migrate(sock: &Path, port: u16, mode: &str) -> std::process::Output {
    migrate_with(sock, port, mode, &[])
}

fn migrate_with(sock: &Path, port: u16, mode: &str, extra: &[&str]) -> std::process::Output {
    let to = format!("tcp://127.0.0.1:{port}");
    let mut args = vec!["migrate", "--api-sock", s(sock), "--to", &to];
    args.extend(["--mode", mode, "--json"]);
    args.extend(extra);
    cowvm(&args)
}

/// A self-signed certificate for localhost and 127.0.0.1 and its key, written as
/// `dir/NAME.pem` and `dir/NAME.key`.
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("a certificate");
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

#[test]
fn each_mode_moves_a_guest_with_its_memory_and_disk() {
    let dir = tempfile::tempdir().unwrap();
    let expected = reference(
        dir.path(),
        DISK,
        "64M",
        &["--disk", s(&zeroed(dir.path(), "reference.raw"))],
    );
    let expected_disk = std::fs::read(dir.path().join("reference.raw")).unwrap();
    for mode in ["postcopy", "precopy", "hybrid"] {
        let run = dir.path().join(mode);
        std::fs::create_dir(&run).unwrap();
        let port = free_port();
        let (mut dst, dst_console, _) = receive(&run, port, &["--allow-dir", s(&run)]);
        let disk = zeroed(&run, "disk.raw");
        let (mut src, sock, src_console) = run_guest(&run, DISK, &["--disk", s(&disk)]);
        wait_for_lines(&src_console, "disk round=", 1);
        let out = migrate(&sock, port, mode);
        assert!(out.status.success(), "{mode}: {}", text(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["mode"], mode);
        assert!(report["bytes_sent"].as_u64().unwrap() > 0);
        assert!(
            src.wait().success(),
            "{mode}: the source did not end cleanly"
        );
        assert!(
            dst.wait().success(),
            "{mode}: the destination's guest failed"
        );
        let output = read(&src_console) + &read(&dst_console);
        assert_same_output(&output, &expected, mode);
        // The destination wrote its own COW file over the source's disk; the source's
        // unused one is gone.
        let layers: Vec<PathBuf> = std::fs::read_dir(&run)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
            .collect();
        assert_eq!(layers.len(), 1, "{mode}: {layers:?}");
        assert!(
            disk_content(&layers[0]) == expected_disk,
            "{mode}: the final disk differs"
        );
    }
}

/// A disk of three layers in `dir`: a zeroed raw base with a stamp at 3 MiB, a qcow2 layer over
/// it with a stamp at 2 MiB, and an empty qcow2 top (all outside the guest's 1 MiB area).
fn chain(dir: &Path) -> PathBuf {
    let base = zeroed(dir, "base.raw");
    let mut f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(3 << 20)).unwrap();
    f.write_all(&[0xa5; 4096]).unwrap();
    let qemu = |args: &[&str]| {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .expect(args[0]);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    };
    let (mid, top) = (dir.join("mid.qcow2"), dir.join("top.qcow2"));
    qemu(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        "base.raw",
        s(&mid),
    ]);
    qemu(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x5a 2M 64k",
        s(&mid),
    ]);
    qemu(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        "mid.qcow2",
        s(&top),
    ]);
    top
}

#[test]
fn copy_disks_moves_a_guest_and_its_disk_chain_without_shared_storage() {
    let dir = tempfile::tempdir().unwrap();
    let (reference_dir, src_dir, dst_dir) = (
        dir.path().join("reference"),
        dir.path().join("source"),
        dir.path().join("destination"),
    );
    for d in [&reference_dir, &src_dir, &dst_dir] {
        std::fs::create_dir(d).unwrap();
    }
    let reference_top = chain(&reference_dir);
    let expected = reference(&reference_dir, DISK, "64M", &["--disk", s(&reference_top)]);
    let expected_disk = disk_content(&reference_top);
    let top = chain(&src_dir);
    let (mut src, sock, src_console) = run_guest(&src_dir, DISK, &["--disk", s(&top)]);
    wait_for_lines(&src_console, "disk round=", 1);
    let copy = |port: u16| {
        cowvm(&[
            "migrate",
            "--api-sock",
            s(&sock),
            "--to",
            &format!("tcp://127.0.0.1:{port}"),
            "--mode",
            "hybrid",
            "--copy-disks",
            "--json",
        ])
    };
    // A receiver without --disk-dir has nowhere to put the copies: refused, the VM runs on.
    let port = free_port();
    let nowhere = dst_dir.join("nowhere");
    std::fs::create_dir(&nowhere).unwrap();
    let (mut refusing, _, log) = receive(&nowhere, port, &[]);
    let out = copy(port);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("the VM runs on here"),
        "{}",
        text(&out.stderr)
    );
    assert!(!refusing.wait().success());
    assert!(read(&log).contains("--disk-dir"), "{}", read(&log));
    // The real move: the receiver trusts nothing of the source's directory.
    let port = free_port();
    let disk_dir = dst_dir.join("disks");
    let (mut dst, dst_console, _) = receive(&dst_dir, port, &["--disk-dir", s(&disk_dir)]);
    let out = copy(port);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["disk_bytes_precopied"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(src.wait().success(), "the source did not end cleanly");
    assert!(dst.wait().success(), "the destination's guest failed");
    let output = read(&src_console) + &read(&dst_console);
    assert_same_output(&output, &expected, "copy-disks");
    // The destination's copies, under names of its own, and its COW file over them.
    let copies: Vec<PathBuf> = std::fs::read_dir(&disk_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
    let mut files: Vec<String> = std::fs::read_dir(&copies[0])
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let own_top = files.pop().unwrap();
    assert_eq!(
        files,
        [
            "disk0-layer0.raw",
            "disk0-layer1.qcow2",
            "disk0-layer2.qcow2",
            "disk0-layer3.qcow2",
        ],
        "the copies (base, mid, top, the layer written during the pre-copy)"
    );
    assert!(own_top.starts_with("disk0-layer3.restore-"), "{own_top}");
    let own_top = copies[0].join(own_top);
    // No layer of its chain lies outside the destination's directory.
    let info = Command::new("qemu-img")
        .args([
            "info",
            "--backing-chain",
            "--output=json",
            "-U",
            s(&own_top),
        ])
        .output()
        .unwrap();
    assert!(info.status.success(), "{}", text(&info.stderr));
    let chain: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let names: Vec<&str> = chain
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["filename"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
    let src_dir = std::fs::canonicalize(&src_dir).unwrap();
    for name in &names {
        let real = std::fs::canonicalize(copies[0].join(name)).unwrap();
        assert!(
            real.starts_with(&copies[0]) && !real.starts_with(&src_dir),
            "{names:?}"
        );
    }
    assert!(
        disk_content(&own_top) == expected_disk,
        "the final disk differs"
    );
}

#[test]
fn a_destination_that_goes_away_before_taking_over_leaves_the_source_running() {
    let dir = tempfile::tempdir().unwrap();
    let (expected, mut src, sock, console) = compute_guest_with_disk(dir.path(), COMPUTE);
    // A destination that reads the start of the stream and dies.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dying = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = conn.read(&mut buf);
    });
    let out = migrate(&sock, port, "hybrid");
    dying.join().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("the VM runs on here"), "{err}");
    // A destination that refuses the VM after pre-copy (its disk is not trusted there).
    let port = free_port();
    let refusing = dir.path().join("refusing");
    std::fs::create_dir(&refusing).unwrap();
    let (mut dst, _, log) = receive(&refusing, port, &[]);
    let out = migrate(&sock, port, "hybrid");
    assert!(!out.status.success());
    assert!(!dst.wait().success());
    assert!(
        read(&log).contains("outside every directory this receiver trusts"),
        "{}",
        read(&log)
    );
    assert!(src.wait().success());
    assert_eq!(
        read(&console),
        expected,
        "the source's run differs after failed migrations"
    );
}

#[test]
fn a_source_that_dies_during_postcopy_stops_the_destination_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (mut dst, dst_console, log) = receive(dir.path(), port, &[]);
    let (mut src, sock, src_console) =
        run_source(dir.path(), "compute mem=16M rounds=100000 seed=3", "1G");
    wait_for_lines(&src_console, "round", 5);
    let mut migrating = Process::spawn(
        Command::new(COWVM)
            .args(["migrate", "--api-sock", s(&sock), "--mode", "postcopy"])
            .args(["--to", &format!("tcp://127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_for_log(&log, "received VM runs");
    // SIGKILL: nothing of the source survives to answer.
    let _ = Command::new("kill")
        .args(["-9", &src.id().to_string()])
        .status();
    let _ = src.wait();
    let _ = migrating.wait();
    let status = dst.wait();
    let logged = read(&log);
    if logged.contains("all memory is resident") && status.success() {
        // The destination had every page before the kill: it must have run the guest on.
        assert!(read(&dst_console).contains("round"), "{logged}");
    } else {
        assert!(!status.success());
        assert!(
            logged.contains("the source went away before all memory arrived"),
            "{logged}"
        );
    }
}

#[test]
fn streams_that_are_not_cowvm_migrations_or_are_newer_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (bytes, why) in [
        (
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            "not a cowvm migration stream",
        ),
        (&b"COWVMMIG\x63\x00\x00\x00"[..], "newer than this cowvm"),
    ] {
        let port = free_port();
        let (mut dst, _, log) = receive(dir.path(), port, &[]);
        let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.write_all(bytes).unwrap();
        assert!(!dst.wait().success());
        assert!(read(&log).contains(why), "{}", read(&log));
    }
}

/// A delay in `0..max_ms` milliseconds that differs from run to run (printed, to replay).
fn random_ms(max_ms: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    u64::from(nanos) % max_ms
}

#[test]
fn killing_either_side_at_a_random_instant_never_runs_the_vm_twice() {
    let dir = tempfile::tempdir().unwrap();
    let expected = reference(dir.path(), COMPUTE, "256M", &[]);
    for (round, kill_source) in [(0, false), (1, true), (2, false), (3, true)] {
        let run = dir.path().join(format!("run{round}"));
        std::fs::create_dir(&run).unwrap();
        let port = free_port();
        let (mut dst, dst_console, log) = receive(&run, port, &[]);
        let (mut src, sock, src_console) = run_source(&run, COMPUTE, "256M");
        wait_for_lines(&src_console, "round", 10);
        let mut migrating = Process::spawn(
            Command::new(COWVM)
                .args(["migrate", "--api-sock", s(&sock), "--mode", "hybrid"])
                .args(["--to", &format!("tcp://127.0.0.1:{port}")])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(run.join("migrate.log")).unwrap()),
        );
        let delay = random_ms(400);
        std::thread::sleep(Duration::from_millis(delay));
        let victim = if kill_source { src.id() } else { dst.id() };
        let _ = Command::new("kill")
            .args(["-9", &victim.to_string()])
            .status();
        let migrated = migrating.wait().success();
        let src_ok = src.wait().success();
        let dst_ok = dst.wait().success();
        let context = format!(
            "round {round} (kill {} after {delay} ms): migrate {migrated}, source {src_ok}, \
             destination {dst_ok}\n{}\n{}",
            if kill_source { "source" } else { "destination" },
            read(&run.join("migrate.log")),
            read(&log)
        );
        let src_out = read(&src_console);
        let dst_out = read(&dst_console);
        // Never both: a guest that ran on at the destination never ran on at the source too.
        let src_finished = src_out == expected;
        let dst_continued = !dst_out.is_empty();
        assert!(!(src_finished && dst_continued), "ran twice: {context}");
        if kill_source {
            // The destination either finished the guest (it had every page) or stopped.
            if dst_ok {
                assert_eq!(src_out + &dst_out, expected, "{context}");
            }
        } else if !migrated {
            let said = read(&run.join("migrate.log"));
            if said.contains("runs on here") {
                // The destination died before it took over: the source ran on, unharmed.
                assert!(src_ok, "{context}");
                assert_eq!(src_out, expected, "{context}");
            } else {
                // It died once told to run the VM: the source stays stopped, never resumed.
                assert!(said.contains("stays stopped"), "{context}");
                assert!(!src_finished, "{context}");
            }
        }
    }
}

#[test]
fn hybrid_over_tls_moves_a_guest_like_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path(), "dst");
    let port = free_port();
    let tls = ["--tls-cert", s(&cert), "--tls-key", s(&key)];
    let (mut dst, dst_console, _) = receive(
        dir.path(),
        port,
        &[&["--allow-dir", s(dir.path())], &tls[..]].concat(),
    );
    let (expected, mut src, sock, src_console) = compute_guest_with_disk(dir.path(), COMPUTE);
    let out = migrate_with(&sock, port, "hybrid", &["--tls-ca", s(&cert)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["mode"], "hybrid");
    assert!(src.wait().success(), "the source did not end cleanly");
    assert!(dst.wait().success(), "the destination's guest failed");
    assert_same_output(
        &(read(&src_console) + &read(&dst_console)),
        &expected,
        "hybrid over TLS",
    );
}

#[test]
fn tls_refusals_come_before_the_pause_and_the_source_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path(), "dst");
    let (other, _) = certificate(dir.path(), "other");
    let (expected, mut src, sock, console) = compute_guest_with_disk(dir.path(), COMPUTE_LONG);
    let tls = ["--tls-cert", s(&cert), "--tls-key", s(&key)];
    // (what the receiver serves, what the source says, the source's error, the receiver's)
    let cases: [(&[&str], &[&str], &str, &str); 3] = [
        (
            &tls,
            &["--tls-ca", s(&other)],
            "invalid peer certificate",
            "TLS handshake with",
        ),
        (&tls, &[], "serves TLS only", "speaks plain TCP"),
        (
            &[],
            &["--tls-ca", s(&cert)],
            "a cowvm receive without --tls-cert speaks plain TCP",
            "the source speaks TLS",
        ),
    ];
    for (i, (serves, says, src_err, dst_err)) in cases.into_iter().enumerate() {
        let run = dir.path().join(format!("case{i}"));
        std::fs::create_dir(&run).unwrap();
        let port = free_port();
        let (mut dst, _, log) = receive(
            &run,
            port,
            &[&["--allow-dir", s(dir.path())], serves].concat(),
        );
        let out = migrate_with(&sock, port, "hybrid", says);
        assert!(!out.status.success(), "case {i} migrated");
        let err = text(&out.stderr);
        assert!(err.contains("the VM runs on here"), "case {i}: {err}");
        assert!(err.contains(src_err), "case {i}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "case {i}: {err}");
        assert!(!dst.wait().success(), "case {i}: the receiver ran a VM");
        assert!(read(&log).contains(dst_err), "case {i}: {}", read(&log));
    }
    assert!(src.wait().success());
    assert_eq!(
        read(&console),
        expected,
        "the source's run differs after refused migrations"
    );
}
