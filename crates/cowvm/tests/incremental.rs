//! Incremental checkpoints end to end: the real binary checkpoints the deterministic test guest
//! through its API socket, fully then incrementally (CLI and API); each checkpoint restored in a
//! fresh process, cloned, or flattened prints exactly what the uninterrupted run printed after its
//! instant; a parent this VM did not take, or a missing one, is refused naming it; the periodic
//! trigger alternates full and incremental checkpoints and never prunes a needed parent.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::*;

const CMDLINE: &str = "compute mem=4M rounds=400 seed=3";

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
    let pid = vm.id().to_string();
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
