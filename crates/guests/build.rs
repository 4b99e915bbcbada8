//! Builds the bare-metal PVH test guest (guests/pvh) for `x86_64-unknown-none` with a nested
//! cargo, and tells the crate where the ELF is.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let guest_dir = manifest.join("../../guests/pvh");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let target_dir = out.join("guest-target");
    for watched in [
        "src",
        "Cargo.toml",
        "link.ld",
        "build.rs",
        ".cargo/config.toml",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            guest_dir.join(watched).display()
        );
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-none",
            "--target-dir",
        ])
        .arg(&target_dir);
    // The outer build's settings (profile, flags, target) must not leak into the guest build.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        let leaks = (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || matches!(
                key.as_str(),
                "RUSTFLAGS"
                    | "RUSTDOCFLAGS"
                    | "TARGET"
                    | "HOST"
                    | "OUT_DIR"
                    | "OPT_LEVEL"
                    | "PROFILE"
                    | "DEBUG"
            );
        if leaks {
            cmd.env_remove(&key);
        }
    }
    let status = cmd
        .status()
        .expect("cannot run cargo to build the test guest");
    if !status.success() {
        panic!(
            "building the test guest in {} failed; is the target installed? (rustup target add x86_64-unknown-none)",
            guest_dir.display()
        );
    }
    let elf = target_dir.join("x86_64-unknown-none/release/cowvm-guest");
    println!("cargo:rustc-env=COWVM_TEST_GUEST={}", elf.display());
}
