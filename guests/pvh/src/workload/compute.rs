//! `compute [mem=SIZE] [rounds=R] [seed=S]`: a deterministic, memory-heavy computation whose
//! output depends only on its command line (no TSC, no addresses), so that a run that is
//! checkpointed and restored part-way must print exactly what an undisturbed run prints.

use core::fmt::Write;

use super::{FNV_OFFSET, FreeRam, checksum, fnv_step, mix64};
use crate::cmdline::{CmdlineError, Options, parse_mem_size, parse_u64};
use crate::console::Console;

/// splitmix64's state increment (2^64 / golden ratio).
pub(super) const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

pub fn run<'a>(
    console: &mut Console,
    ram: FreeRam,
    options: Options<'a>,
) -> Result<(), CmdlineError<'a>> {
    let mut bytes = 16 << 20;
    let mut rounds = 8;
    let mut seed = 1;
    for option in options {
        let (key, value) = option?;
        match key {
            "mem" => bytes = parse_mem_size(key, value)?,
            "rounds" => rounds = parse_u64(key, value)?,
            "seed" => seed = parse_u64(key, value)?,
            _ => {
                return Err(CmdlineError::UnknownOption {
                    workload: "compute",
                    key,
                });
            }
        }
    }
    let data = ram.working_set(bytes)?;

    fill(data, seed);
    for round in 1..=rounds {
        let round_checksum = mix_round(data, round);
        let _ = writeln!(
            console,
            "compute round={round} checksum={round_checksum:016x}"
        );
    }
    let _ = writeln!(console, "compute checksum={:016x}", checksum(data));
    Ok(())
}

/// Fills `data` with splitmix64's output sequence from `seed`.
pub(super) fn fill(data: &mut [u64], seed: u64) {
    let mut state = seed;
    for word in data.iter_mut() {
        state = state.wrapping_add(GOLDEN_GAMMA);
        *word = mix64(state);
    }
}

/// Replaces each element, in order, by a mix of itself and an element at an index derived from
/// its value (reads land anywhere in `data`, including on elements this round already changed).
/// Returns FNV-1a over the new values in the order they were produced.
pub(super) fn mix_round(data: &mut [u64], round: u64) -> u64 {
    let len = data.len() as u64;
    let mut hash = FNV_OFFSET;
    for index in 0..data.len() {
        let value = data[index];
        // Lemire's multiply-shift maps the value uniformly onto 0..len without a division.
        let partner = ((u128::from(value) * u128::from(len)) >> 64) as usize;
        let mixed = mix64(value ^ data[partner].rotate_left((round % 64) as u32) ^ round);
        data[index] = mixed;
        hash = fnv_step(hash, mixed);
    }
    hash
}
