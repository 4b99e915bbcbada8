//! Images and checkpoints written by someone else cannot make cowvm open or create host files:
//! a backing file outside the image's directory is refused by `run` and by `disk create`, and
//! a manifest naming a disk outside the trusted directories is refused by `restore` before
//! anything is created.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use ckpt_format::Checksum;

const COWVM: &str = env!("CARGO_BIN_EXE_cowvm");

fn cowvm(args: &[&str]) -> Output {
    Command::new(COWVM).args(args).output().expect("run cowvm")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A `cowvm` process, killed (by its own pid) when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

#[test]
fn disk_create_refuses_a_backing_file_outside_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let evil = dir.path().join("evil.qcow2");
    let out = cowvm(&["disk", "create", "--backing", "/etc/shadow", s(&evil)]);
    assert!(
        !out.status.success(),
        "disk create --backing /etc/shadow succeeded"
    );
    assert!(stderr(&out).contains("/etc/shadow"), "{}", stderr(&out));
    assert!(!evil.exists(), "a refused image was still created");
}

#[test]
fn run_refuses_an_image_whose_backing_file_is_outside_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let evil = dir.path().join("evil.qcow2");
    // Made as an image from elsewhere would be (the directory allowed explicitly here).
    let made = cowvm(&[
        "disk",
        "create",
        "--backing",
        "/etc/shadow",
        "--allow-dir",
        "/etc",
        s(&evil),
    ]);
    assert!(made.status.success(), "{}", stderr(&made));
    let console = dir.path().join("console.txt");
    let out = Command::new(COWVM)
        .args(["run", "--kernel"])
        .arg(guests::pvh_guest())
        .args(["--cmdline", "compute mem=8M rounds=2", "--mem", "64M"])
        .arg("--console")
        .arg(&console)
        .arg("--disk")
        .arg(format!("{},readonly", s(&evil)))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the VM ran on /etc/shadow");
    assert!(stderr(&out).contains("/etc/shadow"), "{}", stderr(&out));
}

/// Rewrites the manifest of the directory checkpoint `dir` and its completion record, as
/// anyone able to write the directory could.
fn rewrite_manifest(dir: &Path, edit: &dyn Fn(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut manifest);
    let bytes = serde_json::to_vec_pretty(&manifest).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let marker = std::fs::read_to_string(dir.join("COMPLETE")).unwrap();
    let rewritten: Vec<String> = marker
        .lines()
        .map(|l| {
            if l.starts_with("length ") {
                format!("length {}", bytes.len())
            } else if l.starts_with("checksum ") {
                format!("checksum {}", Checksum::of(&bytes))
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(dir.join("COMPLETE"), rewritten.join("\n") + "\n").unwrap();
}

#[test]
fn restore_refuses_a_manifest_naming_a_disk_outside_the_trusted_directories() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(16 << 20))
        .unwrap();
    let sock = dir.path().join("api.sock");
    let vm = Process(
        Command::new(COWVM)
            .args(["run", "--kernel"])
            .arg(guests::pvh_guest())
            .args(["--cmdline", "compute mem=8M rounds=100000", "--mem", "64M"])
            .arg("--console")
            .arg(dir.path().join("console.txt"))
            .arg("--api-sock")
            .arg(&sock)
            .arg("--disk")
            .arg(&disk)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "the API socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    let ckpt = dir.path().join("ckpt");
    let taken = cowvm(&["checkpoint", "--api-sock", s(&sock), "--out", s(&ckpt)]);
    assert!(taken.status.success(), "{}", stderr(&taken));
    drop(vm);

    rewrite_manifest(&ckpt, &|m| {
        m["vm"]["disks"][0]["path"] = "/etc/hostname".into();
    });
    let out = cowvm(&["restore", s(&ckpt)]);
    assert!(!out.status.success(), "a restore used /etc/hostname");
    let msg = stderr(&out);
    assert!(
        msg.contains("/etc/hostname") && msg.contains("--allow-dir"),
        "{msg}"
    );
    let overlays: Vec<_> = ["/etc", s(dir.path()), s(&ckpt)]
        .into_iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap().flatten())
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains(".restore-"))
        .collect();
    assert!(
        overlays.is_empty(),
        "the refused restore created {overlays:?}"
    );
}

#[test]
fn store_init_makes_a_raw_store_and_keeps_user_data_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.img");
    let raw = format!("raw:{}", s(&store));
    let made = cowvm(&["store", "init", &raw, "--size", "8M"]);
    assert!(made.status.success(), "{}", stderr(&made));
    assert_eq!(std::fs::metadata(&store).unwrap().len(), 8 << 20);

    let data = dir.path().join("data.bin");
    std::fs::write(&data, vec![0x5a; 1 << 20]).unwrap();
    let raw_data = format!("raw:{}", s(&data));
    let refused = cowvm(&["store", "init", &raw_data]);
    assert!(!refused.status.success(), "store init overwrote user data");
    assert!(stderr(&refused).contains(s(&data)), "{}", stderr(&refused));
    assert_eq!(std::fs::read(&data).unwrap(), vec![0x5a; 1 << 20]);
    let forced = cowvm(&["store", "init", &raw_data, "--force", "--size", "8M"]);
    assert!(forced.status.success(), "{}", stderr(&forced));

    let dir_store = cowvm(&["store", "init", s(dir.path())]);
    assert!(!dir_store.status.success());
}
