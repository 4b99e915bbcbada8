//! Helpers shared by the integration tests: a seeded PRNG, `qemu-img`/`qemu-io` wrappers.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// splitmix64: small, seeded, good enough for test patterns.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

pub fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e} (install qemu-utils)"))
}

pub fn qemu_img(args: &[&str]) -> std::process::Output {
    run("qemu-img", args)
}

/// `qemu-img check --output=json`: the parsed report and the exit code.
pub fn check(path: &Path) -> (serde_json::Value, i32) {
    let out = qemu_img(&["check", "--output=json", path.to_str().unwrap()]);
    let code = out.status.code().unwrap_or(-1);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check of {} gave no JSON ({e}): {} {}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, code)
}

/// Asserts `qemu-img check` is fully clean: no errors, corruptions or leaks.
pub fn assert_clean(path: &Path) {
    let (v, code) = check(path);
    assert_eq!(code, 0, "qemu-img check {}: {v}", path.display());
    assert_eq!(v["check-errors"], 0, "{v}");
    assert!(v.get("corruptions").is_none_or(|c| c == 0), "{v}");
    assert!(v.get("leaks").is_none_or(|c| c == 0), "{v}");
}

/// Asserts no corruption and no check errors (leaked clusters allowed, as after a crash).
pub fn assert_not_corrupt(path: &Path) -> serde_json::Value {
    let (v, code) = check(path);
    assert!(
        code == 0 || code == 3,
        "qemu-img check {} exit {code}: {v}",
        path.display()
    );
    assert_eq!(v["check-errors"], 0, "{v}");
    assert!(v.get("corruptions").is_none_or(|c| c == 0), "{v}");
    v
}

/// `qemu-img info --backing-chain --output=json`.
pub fn info_chain(path: &Path) -> serde_json::Value {
    let out = qemu_img(&[
        "info",
        "--backing-chain",
        "--output=json",
        path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The guest content of an image according to QEMU (`qemu-img convert -O raw`).
pub fn qemu_content(path: &Path, scratch: &Path) -> Vec<u8> {
    let out_path = scratch.join("qemu-view.raw");
    let _ = std::fs::remove_file(&out_path);
    let out = qemu_img(&[
        "convert",
        "-O",
        "raw",
        path.to_str().unwrap(),
        out_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = std::fs::read(&out_path).unwrap();
    std::fs::remove_file(&out_path).unwrap();
    data
}

/// Runs `qemu-io` commands on an image (`-f fmt`).
pub fn qemu_io(path: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(path.to_str().unwrap());
    let out = run("qemu-io", &args);
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("error"),
        "qemu-io {cmds:?}: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads a whole image through our code.
pub fn our_content(img: &mut disk::Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(0, &mut buf).unwrap();
    buf
}
