//! Retention under kill -9: `cowvm run --checkpoint-every 50ms --keep 3` of a guest that keeps
//! writing its qcow2 disk deletes a checkpoint and merges a disk layer every 50 ms; it is killed
//! (SIGKILL) at random instants. Afterwards `qemu-img check` finds no corruption in any disk
//! file, and every complete checkpoint left restores and runs to exactly the end of the
//! uninterrupted run (whose last line is a checksum of the whole disk area).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

const COWVM: &str = env!("CARGO_BIN_EXE_cowvm");
/// Every request is held 2 ms, so a round takes at least 32 ms: the guest runs for at least
/// 3 s, past the kill instants, while a restore has at most that much left to run.
const WORKLOAD: &str = "disk blocks=32 rounds=100 qd=4 mem=4M seed=9 area=2M";
const TRIALS: usize = 3;
/// A hang detector, not a timing: the restores of a trial run side by side on shared cores.
const LIMIT: Duration = Duration::from_secs(600);

/// A `cowvm` process whose log goes to a file, killed (by its own pid) if the test fails.
struct Process(Option<Child>, PathBuf);

impl Process {
    fn spawn(cmd: &mut Command, log: PathBuf) -> Process {
        let file = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn cowvm");
        Process(Some(child), log)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }

    fn exited(&mut self) -> bool {
        let child = self.0.as_mut().expect("running");
        child.try_wait().expect("wait").is_some()
    }

    fn kill(&mut self) {
        let mut child = self.0.take().expect("running");
        child.kill().expect("kill -9");
        child.wait().expect("wait");
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

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[track_caller]
fn cowvm_ok(args: &[&str]) -> String {
    let out = Command::new(COWVM).args(args).output().expect("run cowvm");
    assert!(
        out.status.success(),
        "cowvm {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn new_disk(path: &Path) {
    cowvm_ok(&["disk", "create", "--size", "2M", s(path)]);
}

fn run_guest(disk: &Path, console: &Path, extra: &[&str]) -> Process {
    let disk_arg = format!("{},delay_ms=2", s(disk));
    Process::spawn(
        Command::new(COWVM)
            .args(["run", "--kernel"])
            .arg(guests::pvh_guest())
            .args(["--cmdline", WORKLOAD, "--mem", "32M", "--disk", &disk_arg])
            .arg("--console")
            .arg(console)
            .args(extra),
        console.with_extension("log"),
    )
}

/// The complete checkpoints in `dir`.
fn complete(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    out.retain(|p| p.join("COMPLETE").is_file());
    out.sort();
    out
}

/// Bytes the guest had written to its console at the checkpoint instant.
fn console_bytes(ckpt: &Path) -> usize {
    let out = cowvm_ok(&["inspect", s(ckpt), "--json"]);
    let report: Value = serde_json::from_str(&out).expect("inspect --json");
    report["console_bytes"].as_u64().expect("console_bytes") as usize
}

/// The files of a checkpoint's disk: the one its manifest names and its backing files.
fn disk_chain(ckpt: &Path) -> Vec<PathBuf> {
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("manifest.json")).unwrap())
            .expect("manifest");
    let disk = manifest["vm"]["disks"][0]["path"]
        .as_str()
        .expect("disk path");
    let out = Command::new("qemu-img")
        .args(["info", "--backing-chain", "--output=json", disk])
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chain: Value = serde_json::from_slice(&out.stdout).expect("qemu-img info");
    let files: Vec<PathBuf> = chain
        .as_array()
        .expect("a chain")
        .iter()
        .map(|i| PathBuf::from(i["filename"].as_str().expect("filename")))
        .collect();
    assert!(files.len() <= 5, "{} is {} images deep", disk, files.len());
    files
}

/// `qemu-img check`: no corruption (leaked clusters, from a kill in the middle of an
/// allocation, are allowed: exit status 3).
fn not_corrupt(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img");
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small PRNG for the kill instants.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[test]
fn kill_9_during_retention_leaves_every_complete_checkpoint_restorable() {
    let work = tempfile::tempdir().unwrap();
    let reference_disk = work.path().join("reference.qcow2");
    new_disk(&reference_disk);
    let reference_console = work.path().join("reference.txt");
    let mut reference = run_guest(&reference_disk, &reference_console, &[]);

    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("kill instants from seed {seed:#x}");
    let mut rng = Rng(seed);
    let mut trials = Vec::new();
    for t in 0..TRIALS {
        let dir = work.path().join(format!("trial{t}"));
        let disks = dir.join("disks");
        let ckpts = dir.join("ckpts");
        std::fs::create_dir_all(&disks).unwrap();
        std::fs::create_dir_all(&ckpts).unwrap();
        let base = disks.join("base.qcow2");
        new_disk(&base);
        let mut vm = run_guest(
            &base,
            &dir.join("console.txt"),
            &[
                "--checkpoint-every",
                "50ms",
                "--checkpoint-dir",
                s(&ckpts),
                "--keep",
                "3",
            ],
        );
        // Once retention has begun deleting and merging, a random instant.
        let start = Instant::now();
        while complete(&ckpts).len() < 3 {
            assert!(
                !vm.exited(),
                "trial {t}: the VM ended before 3 checkpoints\n{}",
                vm.log()
            );
            assert!(start.elapsed() < LIMIT, "trial {t}: no checkpoints");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.below(600)));
        assert!(
            !vm.exited(),
            "trial {t}: the VM ended before the kill\n{}",
            vm.log()
        );
        vm.kill();
        let left = complete(&ckpts);
        eprintln!(
            "trial {t}: killed after {:?}; complete checkpoints {left:?}; disk files {:?}",
            start.elapsed(),
            std::fs::read_dir(&disks).unwrap().count()
        );
        assert!(!left.is_empty(), "trial {t}: no complete checkpoint left");
        // The files of every complete checkpoint's disk chain (the running top at the kill is
        // no checkpoint's: its new clusters may point past the end of the file, the device's
        // writes to them lost with the process).
        for ckpt in &left {
            for f in disk_chain(ckpt) {
                not_corrupt(&f);
            }
        }
        trials.push((dir, disks, left));
    }

    let status = reference.wait();
    assert!(status.success(), "reference: {status}\n{}", reference.log());
    let expected = std::fs::read_to_string(&reference_console).unwrap();
    assert!(expected.contains("disk checksum="), "{expected}");

    for (dir, disks, left) in trials {
        let restores: Vec<(PathBuf, usize, PathBuf, Process)> = left
            .into_iter()
            .enumerate()
            .map(|(n, ckpt)| {
                let at = console_bytes(&ckpt);
                let console = dir.join(format!("restored{n}.txt"));
                let disk_dir = dir.join(format!("restored{n}"));
                std::fs::create_dir_all(&disk_dir).unwrap();
                let process = Process::spawn(
                    Command::new(COWVM)
                        .arg("restore")
                        .arg(&ckpt)
                        .arg("--console")
                        .arg(&console)
                        .arg("--disk-dir")
                        .arg(&disk_dir)
                        .arg("--allow-dir")
                        .arg(&disks),
                    console.with_extension("log"),
                );
                (ckpt, at, console, process)
            })
            .collect();
        for (ckpt, at, console, mut process) in restores {
            let status = process.wait();
            assert!(
                status.success(),
                "restore {}: {status}\n{}",
                ckpt.display(),
                process.log()
            );
            let rest = std::fs::read_to_string(&console).unwrap();
            assert_eq!(
                format!("{}{rest}", &expected[..at]),
                expected,
                "{} diverged (checkpoint after {at} bytes)",
                ckpt.display()
            );
        }
    }
}
