//! Links the guest with `link.ld`, which fixes the PVH load address and the boot-table layout.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo always sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-arg-bins=-T{dir}/link.ld");
    println!("cargo:rerun-if-changed=link.ld");
}
