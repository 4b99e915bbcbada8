//! `scan [mem=SIZE] [passes=N] [every=K]`: fill a working set once, then only read it, pass after
//! pass — the guest for clone-density benchmarks, whose clones must share every page they do
//! not write.
//!
//! Output: `scan filled` once the working set is written, then `scan pass=<n> sum=<16 hex>
//! tsc=<decimal>` after every K-th pass (the sum is the same every pass), and after N passes
//! `scan done passes=<N> sum=<16 hex>`.

use core::arch::x86_64::_rdtsc;
use core::fmt::Write;

use super::{FreeRam, WORDS_PER_PAGE, mix64};
use crate::cmdline::{CmdlineError, Options, parse_mem_size, parse_nonzero, parse_u64};
use crate::console::Console;

pub fn run<'a>(
    console: &mut Console,
    ram: FreeRam,
    options: Options<'a>,
) -> Result<(), CmdlineError<'a>> {
    let mut bytes = 64 << 20;
    let mut passes = 0;
    let mut every = 1;
    for option in options {
        let (key, value) = option?;
        match key {
            "mem" => bytes = parse_mem_size(key, value)?,
            "passes" => passes = parse_u64(key, value)?,
            "every" => every = parse_nonzero(key, value)?,
            _ => {
                return Err(CmdlineError::UnknownOption {
                    workload: "scan",
                    key,
                });
            }
        }
    }
    let working_set = ram.working_set(bytes)?;
    for (index, page) in working_set.chunks_exact_mut(WORDS_PER_PAGE).enumerate() {
        for (offset, word) in page.iter_mut().enumerate() {
            *word = mix64(((index as u64) << 9) ^ offset as u64);
        }
    }
    let _ = writeln!(console, "scan filled");
    let mut pass = 0u64;
    let mut sum = 0u64;
    while passes == 0 || pass < passes {
        pass += 1;
        sum = read_pass(working_set);
        if pass.is_multiple_of(every) {
            // SAFETY: rdtsc has no preconditions; CR4.TSD is clear, so ring 3 may use it.
            let tsc = unsafe { _rdtsc() };
            let _ = writeln!(console, "scan pass={pass} sum={sum:016x} tsc={tsc}");
        }
    }
    let _ = writeln!(console, "scan done passes={passes} sum={sum:016x}");
    Ok(())
}

/// Reads every u64 of the working set. Volatile, so that no pass can be optimized away.
fn read_pass(working_set: &[u64]) -> u64 {
    let mut sum = 0u64;
    for word in working_set {
        // SAFETY: `word` is a valid reference into the working set.
        sum = sum.wrapping_add(unsafe { core::ptr::read_volatile(word) });
    }
    sum
}
