//! `cowvm restore`, `cowvm clone` and `cowvm rollback` end to end: the real binary runs the
//! deterministic test guest, is checkpointed through its API socket mid-run, and the restored,
//! cloned or rolled-back VMs must print exactly what the uninterrupted run printed after the
//! checkpoint instant (`cowvm inspect --json` gives the console bytes at that instant).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

mod common;

use common::*;

/// Starts the uninterrupted reference run of `cmdline` (with `extra` arguments), whose console
/// goes to `reference.txt` in `dir`; returns the process and that file.
fn run_reference(dir: &Path, cmdline: &str, extra: &[&str]) -> (Process, PathBuf) {
    let reference = dir.join("reference.txt");
    let process = Process::spawn(
        Command::new(COWVM)
            .args(["run", "--kernel"])
            .arg(guests::pvh_guest())
            .args(["--cmdline", cmdline, "--mem", "64M", "--console"])
            .arg(&reference)
            .args(extra),
    );
    (process, reference)
}

/// Runs `cmdline` to its end with a checkpoint taken through the CLI once the console holds
/// `after` lines containing `what`. Returns the whole output and the checkpoint.
fn checkpointed_run(dir: &Path, cmdline: &str, (what, after): (&str, usize)) -> (String, PathBuf) {
    let (mut vm, sock, console) = run_guest(dir, cmdline, &[]);
    wait_for_lines(&console, what, after);
    let ckpt = dir.join("ckpt");
    cowvm_ok(&["checkpoint", "--api-sock", s(&sock), "--out", s(&ckpt)]);
    assert!(vm.wait().success());
    (read(&console), ckpt)
}

#[test]
fn restore_and_clones_continue_exactly_after_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (full, ckpt) = checkpointed_run(
        dir.path(),
        "compute mem=4M rounds=200 seed=3",
        ("round=", 3),
    );
    assert!(last_line(&full).starts_with("compute checksum="), "{full}");
    let at = console_bytes(&ckpt);
    assert!(at > 0 && at < full.len(), "{at} of {}", full.len());
    let suffix = &full[at..];

    // Restore, with the API: it serves the restored VM, and the process ends with the guest.
    let restored = dir.path().join("restored.txt");
    let sock = dir.path().join("restored.sock");
    let mut process = Process::spawn(
        Command::new(COWVM)
            .arg("restore")
            .arg(&ckpt)
            .arg("--console")
            .arg(&restored)
            .arg("--api-sock")
            .arg(&sock),
    );
    wait_for_socket(&sock);
    let (status, vm) = request(&sock, "GET", "/vm", None);
    assert_eq!(status, 200, "{vm}");
    assert_eq!(vm["restored_from"], s(&ckpt), "{vm}");
    assert_eq!(vm["config"]["cmdline"], "compute mem=4M rounds=200 seed=3");
    assert_eq!(process.wait().code(), Some(0));
    assert_eq!(read(&restored), suffix, "restored output");

    // Three clones in one process: each prints the same continuation into its own console.
    let consoles = dir.path().join("consoles");
    let out = cowvm_ok(&[
        "clone",
        s(&ckpt),
        "--count",
        "3",
        "--console-dir",
        s(&consoles),
        "--json",
    ]);
    let report: Value = serde_json::from_str(&out).expect("clone --json");
    let clones = report["clones"].as_array().expect("clones");
    assert_eq!(clones.len(), 3, "{report}");
    for (i, clone) in clones.iter().enumerate() {
        assert_eq!(clone["clone"], i, "{report}");
        assert_eq!(clone["status"], 0, "{report}");
        let console = consoles.join(format!("clone-{i}.log"));
        assert_eq!(clone["console"], s(&console), "{report}");
        assert!(clone["start_us"].as_u64().is_some(), "{report}");
        assert_eq!(read(&console), suffix, "clone {i}");
    }

    // The table says the same.
    let table = cowvm_ok(&[
        "clone",
        s(&ckpt),
        "--count",
        "1",
        "--console-dir",
        s(&consoles),
    ]);
    assert!(table.starts_with("CLONE"), "{table}");
    assert!(table.contains("clone-0.log"), "{table}");

    // A standby VM: one of another size refuses the checkpoint and stays ready; one of its
    // size restores it in its own process, which then serves the VM's API on the same socket
    // and ends with the guest.
    let standby = |name: &str, mem: &str| {
        let sock = dir.path().join(format!("{name}.sock"));
        let console = dir.path().join(format!("{name}.txt"));
        let process = Process::spawn(
            Command::new(COWVM)
                .args(["standby", "--mem", mem, "--console"])
                .arg(&console)
                .arg("--api-sock")
                .arg(&sock),
        );
        wait_for_socket(&sock);
        (process, sock, console)
    };
    let (mut other, other_sock, _) = standby("other", "128M");
    let out = cowvm(&["restore", "--standby", s(&other_sock), s(&ckpt)]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("the standby VM has 134217728 bytes of memory"),
        "{stderr}"
    );
    let (status, health) = request(&other_sock, "GET", "/health", None);
    assert_eq!(
        (status, &health["status"]),
        (200, &json!("standby")),
        "{health}"
    );
    // SIGTERM ends an unused standby, and its socket goes with it.
    let pid = i32::try_from(other.id()).expect("pid");
    // SAFETY: signalling a child process this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(other.wait().code(), Some(128 + libc::SIGTERM));
    assert!(
        !other_sock.exists(),
        "the socket of a stopped standby remains"
    );
    let (mut process, sock, console) = standby("standby", "64M");
    let (status, answer) = request(&sock, "PUT", "/restore", Some(&json!({"from": "ckpt"})));
    assert_eq!(
        (status, &answer["field"]),
        (400, &json!("from")),
        "{answer}"
    );
    let out = cowvm_ok(&["restore", "--standby", s(&sock), s(&ckpt), "--json"]);
    let done: Value = serde_json::from_str(&out).expect("restore --standby --json");
    assert_eq!(done["from"], s(&ckpt), "{done}");
    assert!(done["first_instruction_us"].as_u64().is_some(), "{done}");
    let (status, vm) = request(&sock, "GET", "/vm", None);
    assert_eq!(status, 200, "{vm}");
    assert_eq!(vm["restored_from"], s(&ckpt), "{vm}");
    assert_eq!(process.wait().code(), Some(0));
    assert_eq!(read(&console), suffix, "output restored on the standby VM");

    // Nothing is restored from a checkpoint without its completion marker.
    std::fs::remove_file(ckpt.join("COMPLETE")).unwrap();
    for command in ["restore", "clone"] {
        let mut args = vec![command, s(&ckpt)];
        if command == "clone" {
            args.extend(["--count", "2", "--console-dir", s(&consoles)]);
        }
        let out = cowvm(&args);
        assert_eq!(out.status.code(), Some(1), "{command}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains("incomplete"), "{command}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{command}: one line: {stderr}");
    }
}

#[test]
fn restored_disks_get_their_own_cow_files() {
    const CMDLINE: &str = "disk blocks=256 rounds=6 qd=8 mem=8M";
    let dir = tempfile::tempdir().unwrap();
    let zeroed = |name: &str| {
        let path = dir.path().join(name);
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(32 << 20))
            .unwrap();
        format!("{},delay_ms=5", s(&path))
    };
    // The uninterrupted output (deterministic on a zeroed disk), for comparison.
    let (mut uninterrupted, reference) =
        run_reference(dir.path(), CMDLINE, &["--disk", &zeroed("reference.raw")]);
    let disk = dir.path().join("disk.raw");
    let (mut vm, sock, console) = run_guest(dir.path(), CMDLINE, &["--disk", &zeroed("disk.raw")]);
    wait_for_lines(&console, "disk round=", 1);
    let ckpt = dir.path().join("ckpt");
    cowvm_ok(&["checkpoint", "--api-sock", s(&sock), "--out", s(&ckpt)]);

    // Restored at once, while the original runs on: the guest times its disk requests with
    // the TSC, which on this host moves on by the time the checkpoint spent on disk.
    let cow = dir.path().join("cow");
    let consoles = dir.path().join("consoles");
    let restored = dir.path().join("restored.txt");
    let mut eager = Process::spawn(
        Command::new(COWVM)
            .arg("restore")
            .arg(&ckpt)
            .arg("--console")
            .arg(&restored)
            .arg("--disk-dir")
            .arg(&cow)
            .arg("--allow-dir")
            .arg(dir.path())
            .arg("--eager"),
    );
    let clones = Command::new(COWVM)
        .arg("clone")
        .arg(&ckpt)
        .args(["--count", "2", "--json", "--console-dir"])
        .arg(&consoles)
        .arg("--disk-dir")
        .arg(&cow)
        .arg("--allow-dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn cowvm clone");

    assert!(vm.wait().success());
    let checkpoint_disk = std::fs::read(&disk).unwrap();
    let out = clones.wait_with_output().expect("cowvm clone");
    assert!(out.status.success(), "clone: {}", out.status);
    assert_eq!(eager.wait().code(), Some(0), "{}", read(&restored));
    assert!(uninterrupted.wait().success());
    let full = read(&reference);
    assert_eq!(last_line(&full), "disk done", "{full}");
    let suffix = &full[console_bytes(&ckpt)..];
    assert_eq!(read(&console), full, "the original VM");
    assert_eq!(read(&restored), suffix, "eagerly restored output");

    let report: Value = serde_json::from_str(&text(&out.stdout)).expect("clone --json");
    let mut images = Vec::new();
    for (i, clone) in report["clones"]
        .as_array()
        .expect("clones")
        .iter()
        .enumerate()
    {
        assert_eq!(clone["status"], 0, "{report}");
        assert_eq!(read(&consoles.join(format!("clone-{i}.log"))), suffix);
        let image = clone["disks"][0].as_str().expect("a disk").to_string();
        assert!(Path::new(&image).starts_with(&cow), "{image}");
        images.push(image);
    }
    images.dedup();
    assert_eq!(images.len(), 2, "each clone has its own COW file");
    // 1 restore + 2 clones, each with its own file in --disk-dir.
    assert_eq!(std::fs::read_dir(&cow).unwrap().count(), 3);
    assert!(
        std::fs::read(&disk).unwrap() == checkpoint_disk,
        "the checkpoint's disk is left as it was"
    );
}

#[test]
fn rollback_returns_the_running_vm_to_its_checkpoint() {
    const CMDLINE: &str = "compute mem=4M rounds=600 seed=3";
    let dir = tempfile::tempdir().unwrap();
    // The uninterrupted output, for comparison.
    let (mut uninterrupted, reference) = run_reference(dir.path(), CMDLINE, &[]);

    let (mut vm, sock, console) = run_guest(dir.path(), CMDLINE, &[]);
    wait_for_lines(&console, "round=", 3);
    let ckpt = dir.path().join("ckpt");
    cowvm_ok(&["checkpoint", "--api-sock", s(&sock), "--out", s(&ckpt)]);
    let at = console_bytes(&ckpt);

    // Refusals leave the VM running untouched: a corrupt checkpoint, an incomplete one, bad
    // paths, unknown fields, a rollback during a checkpoint or a client's pause.
    let corrupt = dir.path().join("corrupt");
    let incomplete = dir.path().join("incomplete");
    for copy in [&corrupt, &incomplete] {
        std::fs::create_dir(copy).unwrap();
        for entry in std::fs::read_dir(&ckpt).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
    }
    let mut state = std::fs::read(corrupt.join("state.bin")).unwrap();
    let middle = state.len() / 2;
    state[middle] ^= 0x40;
    std::fs::write(corrupt.join("state.bin"), state).unwrap();
    std::fs::remove_file(incomplete.join("COMPLETE")).unwrap();
    for (body, status, field) in [
        (json!({ "from": s(&corrupt) }), 400, "from"),
        (json!({ "from": s(&incomplete) }), 400, "from"),
        (
            json!({ "from": s(&dir.path().join("missing")) }),
            400,
            "from",
        ),
        (json!({ "from": "ckpt" }), 400, "from"),
        (
            json!({ "from": format!("{}/../ckpt", s(dir.path())) }),
            400,
            "from",
        ),
        (json!({ "from": s(&ckpt), "colour": 1 }), 400, "colour"),
    ] {
        let (got, answer) = request(&sock, "PUT", "/rollback", Some(&body));
        assert_eq!(got, status, "{body}: {answer}");
        assert_eq!(answer["field"], field, "{body}: {answer}");
        assert!(answer["message"].is_string(), "{answer}");
    }
    let out = cowvm(&["rollback", "--api-sock", s(&sock), s(&incomplete)]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("incomplete"),
        "{}",
        text(&out.stderr)
    );

    let (_, job) = request(
        &sock,
        "PUT",
        "/checkpoints",
        Some(&json!({ "out": s(&dir.path().join("busy")) })),
    );
    // From the incomplete checkpoint: refused for the conflict while the checkpoint runs, for
    // the checkpoint otherwise; either way the VM is not touched.
    let (got, answer) = request(
        &sock,
        "PUT",
        "/rollback",
        Some(&json!({ "from": s(&incomplete) })),
    );
    let job_path = format!("/checkpoints/{}", job["id"].as_str().expect("id"));
    let (_, now) = request(&sock, "GET", &job_path, None);
    if now["status"] == "running" {
        assert_eq!(got, 409, "rollback during checkpoint {job}: {answer}");
    } else {
        eprintln!("the checkpoint ended too fast to test the conflict");
        assert!(got == 409 || got == 400, "{got}: {answer}");
    }
    let (_, job) = request(&sock, "GET", &format!("{job_path}?wait=true"), None);
    assert_eq!(job["status"], "complete", "{job}");
    cowvm_ok(&["pause", "--api-sock", s(&sock)]);
    let (got, answer) = request(
        &sock,
        "PUT",
        "/rollback",
        Some(&json!({ "from": s(&ckpt) })),
    );
    assert_eq!(got, 409, "rollback while paused: {answer}");
    cowvm_ok(&["resume", "--api-sock", s(&sock)]);
    let (_, info) = request(&sock, "GET", "/vm", None);
    assert_eq!(info["state"], "Running", "{info}");
    assert_eq!(info["restored_from"], Value::Null, "{info}");

    // The VM runs on past the checkpoint, then goes back to it.
    let rounds = read(&console).matches("round=").count();
    wait_for_lines(&console, "round=", rounds + 3);
    let out = cowvm_ok(&["rollback", "--api-sock", s(&sock), s(&ckpt), "--json"]);
    let done: Value = serde_json::from_str(&out).expect("rollback --json");
    assert_eq!(done["from"], s(&ckpt), "{done}");
    assert!(done["restore_us"].as_u64().is_some(), "{done}");
    let (_, info) = request(&sock, "GET", "/vm", None);
    assert_eq!(info["restored_from"], s(&ckpt), "{info}");
    assert_eq!(info["state"], "Running", "{info}");
    assert_eq!(request(&sock, "GET", "/health", None).0, 200);

    // The process follows the restored VM and exits with its status, at its end.
    assert_eq!(vm.wait().code(), Some(0));
    assert!(uninterrupted.wait().success());
    let full = read(&reference);
    let suffix = &full[at..];
    let output = read(&console);
    assert!(
        output.ends_with(suffix),
        "the rolled-back VM goes on from the checkpoint"
    );
    let before = output.len() - suffix.len();
    assert!(
        before > at,
        "the VM ran on past the checkpoint before the rollback"
    );
    assert_eq!(
        &output[..before],
        &full[..before],
        "the output before the rollback"
    );
    assert!(
        last_line(&output).starts_with("compute checksum="),
        "{output}"
    );
}

/// A checkpoint into RAM (`mem:NAME`) inside the VM's process, and a rollback to it: the
/// guest's rounds go back to the checkpoint and on to the same end as an uninterrupted run.
#[test]
fn rollback_to_a_ram_checkpoint() {
    const CMDLINE: &str = "compute mem=4M rounds=600 seed=3";
    let dir = tempfile::tempdir().unwrap();
    let (mut uninterrupted, reference) = run_reference(dir.path(), CMDLINE, &[]);
    let (mut vm, sock, console) = run_guest(dir.path(), CMDLINE, &[]);
    wait_for_lines(&console, "round=", 3);
    cowvm_ok(&["checkpoint", "--api-sock", s(&sock), "--out", "mem:first"]);

    // Refusals: a bad name, an unknown RAM checkpoint, a name already holding a checkpoint,
    // and commands of other processes, which cannot see this process's RAM.
    for (method, path, body, status, field) in [
        (
            "PUT",
            "/checkpoints",
            json!({ "out": "mem:a/b" }),
            400,
            "out",
        ),
        ("PUT", "/checkpoints", json!({ "out": "mem:" }), 400, "out"),
        (
            "PUT",
            "/checkpoints",
            json!({ "out": "mem:first" }),
            409,
            "out",
        ),
        (
            "PUT",
            "/checkpoints",
            json!({ "out": "mem:copy", "disk": "copy-commit" }),
            400,
            "disk",
        ),
        (
            "PUT",
            "/rollback",
            json!({ "from": "mem:other" }),
            400,
            "from",
        ),
    ] {
        let (got, answer) = request(&sock, method, path, Some(&body));
        assert_eq!(got, status, "{body}: {answer}");
        assert_eq!(answer["field"], field, "{body}: {answer}");
    }
    // A second request for a name while its checkpoint is being written does not take the
    // name from it: afterwards the name holds that complete checkpoint.
    let second = json!({ "out": "mem:second" });
    let (got, job) = request(&sock, "PUT", "/checkpoints", Some(&second));
    assert!(got == 200 || got == 202, "{got}: {job}");
    let (got, answer) = request(&sock, "PUT", "/checkpoints", Some(&second));
    assert_eq!(got, 409, "{answer}");
    let id = job["id"].as_str().expect("id");
    let (_, job) = request(&sock, "GET", &format!("/checkpoints/{id}?wait=true"), None);
    assert_eq!(job["status"], "complete", "{job}");
    let (got, answer) = request(&sock, "PUT", "/checkpoints", Some(&second));
    assert_eq!(got, 409, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("complete checkpoint")),
        "{answer}"
    );
    for command in [&["inspect", "mem:first"][..], &["restore", "mem:first"]] {
        let out = cowvm(command);
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("RAM checkpoint"),
            "{command:?}: {}",
            text(&out.stderr)
        );
    }

    let rounds = read(&console).matches("round=").count();
    wait_for_lines(&console, "round=", rounds + 3);
    let out = cowvm_ok(&["rollback", "--api-sock", s(&sock), "mem:first", "--json"]);
    let done: Value = serde_json::from_str(&out).expect("rollback --json");
    assert_eq!(done["from"], "mem:first", "{done}");
    let (_, info) = request(&sock, "GET", "/vm", None);
    assert_eq!(info["restored_from"], "mem:first", "{info}");

    assert_eq!(vm.wait().code(), Some(0));
    assert!(uninterrupted.wait().success());
    // The output is the reference up to the rollback (which may cut a line), then the
    // reference again from the earlier checkpoint instant to its end.
    let full = read(&reference);
    let output = read(&console);
    let before = output
        .bytes()
        .zip(full.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    let rest = &output[before..];
    assert!(
        full.ends_with(rest),
        "after the rollback the VM goes on as the reference does:\n{output}"
    );
    let at = full.len() - rest.len();
    assert!(at < before, "the rollback went back:\n{output}");
    assert_eq!(last_line(&output), last_line(&full));
}
