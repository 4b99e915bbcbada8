//! `dirty [mem=SIZE] [passes=N] [every=K] [fill=0|1] [rest=SIZE]`: write every 4 KiB page of a
//! working set, pass after pass — the guest that checkpoint benchmarks run against. `rest` fills
//! that much more memory (after the working set) once, before the first pass, so that a
//! benchmark can have a guest whose memory is all in use but only `mem` of it written over and
//! over (incremental checkpoints).
//!
//! Output (host-side benchmarks parse it, keep it exact):
//! `dirty pass=<n> tsc=<decimal>` after every K-th pass, and after N passes
//! `dirty done passes=<N> checksum=<16 hex digits>` (FNV-1a over every u64 of the working set).

use core::arch::x86_64::_rdtsc;
use core::fmt::Write;

use super::{FreeRam, WORDS_PER_PAGE, checksum, mix64};
use crate::cmdline::{CmdlineError, Options, parse_flag, parse_mem_size, parse_nonzero, parse_u64};
use crate::console::Console;

pub fn run<'a>(
    console: &mut Console,
    ram: FreeRam,
    options: Options<'a>,
) -> Result<(), CmdlineError<'a>> {
    let mut bytes = 64 << 20;
    let mut passes = 0;
    let mut every = 1;
    let mut fill = false;
    let mut rest = 0;
    for option in options {
        let (key, value) = option?;
        match key {
            "mem" => bytes = parse_mem_size(key, value)?,
            "passes" => passes = parse_u64(key, value)?,
            "every" => every = parse_nonzero(key, value)?,
            "fill" => fill = parse_flag(key, value)?,
            "rest" => rest = parse_mem_size(key, value)?,
            _ => {
                return Err(CmdlineError::UnknownOption {
                    workload: "dirty",
                    key,
                });
            }
        }
    }
    let mut ram = ram;
    let working_set = ram.take(bytes)?;
    if rest > 0 {
        write_pass(ram.take(rest)?, 0, true);
    }

    let mut pass = 0u64;
    while passes == 0 || pass < passes {
        pass += 1;
        write_pass(working_set, pass, fill);
        if pass.is_multiple_of(every) {
            // SAFETY: rdtsc has no preconditions; CR4.TSD is clear, so ring 3 may use it.
            let tsc = unsafe { _rdtsc() };
            let _ = writeln!(console, "dirty pass={pass} tsc={tsc}");
        }
    }
    let _ = writeln!(
        console,
        "dirty done passes={passes} checksum={:016x}",
        checksum(working_set)
    );
    Ok(())
}

/// Writes each page: its first u64 (fill=0) or all of its u64s (fill=1), with values derived
/// from the pass and the page index. Volatile, so that no pass can be optimized away.
fn write_pass(working_set: &mut [u64], pass: u64, fill: bool) {
    for (index, page) in working_set.chunks_exact_mut(WORDS_PER_PAGE).enumerate() {
        let value = mix64((pass << 32) ^ index as u64);
        let words = if fill { &mut page[..] } else { &mut page[..1] };
        for (offset, word) in words.iter_mut().enumerate() {
            // SAFETY: `word` is a valid, exclusive reference into the working set.
            unsafe { core::ptr::write_volatile(word, value.wrapping_add(offset as u64)) };
        }
    }
}
