//! cowvm's bare-metal test guests, built from `guests/pvh` as part of the normal cargo build.
//!
//! The guest is a PVH ELF: a tiny ring-0 start-up, then a workload in ring 3 chosen by the kernel
//! command line (`hello`, `dirty`, `compute`, ...). See `guests/pvh/README.md`.

use std::path::Path;

/// Path of the PVH test guest ELF built by this crate's build script.
pub fn pvh_guest() -> &'static Path {
    Path::new(env!("COWVM_TEST_GUEST"))
}
