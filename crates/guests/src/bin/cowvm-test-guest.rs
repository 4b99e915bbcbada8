//! Prints the path of the PVH test guest, for scripts: `cowvm run --kernel "$(cargo run -q -p guests)"`.

fn main() {
    println!("{}", guests::pvh_guest().display());
}
