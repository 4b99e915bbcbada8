//! cowvm-guest: the bare-metal PVH test guest of cowvm.
//!
//! A tiny ring-0 shim (boot.rs, trap.rs) enters long mode and drops to ring 3, where the
//! workloads run (workload/). See README.md for the boot ABI, the workloads and exit statuses.

#![no_std]
#![no_main]

mod boot;
mod cmdline;
mod console;
mod start_info;
mod trap;
mod workload;

use core::fmt::Write;
use core::panic::PanicInfo;

use console::{Console, Status, exit};
use start_info::StartInfo;
use workload::FreeRam;

/// Ring-3 entry, reached by `iretq` from boot.rs with the loader's `hvm_start_info` address
/// and the end of the guest image.
extern "C" fn guest_main(start_info: u64, image_end: u64) -> ! {
    // SAFETY: boot.rs passes the start info the loader gave it, after checking its magic; the
    // guest never writes the loader's structures (they lie below or inside the image, or in
    // memory the loader reserved).
    let boot = unsafe { StartInfo::read(start_info) };
    // SAFETY: boot.rs passes the linker's end of the image; this is the only FreeRam.
    let ram = unsafe { FreeRam::new(image_end, boot.memory_map) };
    let mut console = Console::new();
    let result = boot
        .cmdline()
        .and_then(|cmdline| workload::run(&mut console, ram, cmdline));
    match result {
        Ok(()) => exit(Status::Success),
        Err(error) => {
            let _ = writeln!(console, "cowvm-guest: bad command line: {error}");
            exit(Status::BadCommandLine)
        }
    }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    let mut console = Console::new();
    let _ = writeln!(console, "cowvm-guest: panic: {info}");
    exit(Status::Fault)
}
