//! `disk [blocks=N] [rounds=R] [qd=Q] [seed=S] [mem=SIZE] [area=SIZE] [dev=N]`: disk and
//! memory activity through the ring-3 virtio-blk driver (virtio.rs), deterministic for a given
//! command line and a zeroed disk, and verified as it goes.
//!
//! A block is 4 KiB (8 sectors); the area is the first `area` bytes of the disk. Each round
//! writes `blocks` distinct blocks chosen by a keyed permutation of the area (qd in flight),
//! flushes, reads them back and verifies their stamps, then mixes the memory working set. Every
//! written sector starts with {sector u64, sequence u64, round u32, check u32} (little-endian),
//! followed by 61 u64s of filler; `check` folds FNV-1a (per u64) over the filler to 32 bits.
//! The sequence number counts block writes from 1; the guest keeps the last one per block.
//!
//! Output (README.md): `disk device=… capacity=… ro=… flush=… qd=… queue=…`, `disk id=…`,
//! `disk round=<r> writes=<total> checksum=<16 hex>` per round, then `disk checksum=<16 hex>`
//! and `disk done`.

use core::fmt::Write;

use super::compute::{GOLDEN_GAMMA, fill, mix_round};
use super::virtio::{
    BLOCK_SIZE, BlockDevice, FEATURE_FLUSH, FEATURE_RO, MAX_SLOTS, MIN_TRANSPORT_SIZE, Mmio,
    REQ_FLUSH, REQ_GET_ID, REQ_IN, REQ_OUT, Request, STATUS_OK, STATUS_UNSUPP, dma_bytes, fail,
};
use super::{FNV_OFFSET, FreeRam, PAGE_SIZE, fnv_step, mix64};
use crate::cmdline::{
    CmdlineError, Options, VirtioMmioDevice, VirtioMmioDevices, parse_mem_size, parse_nonzero,
    parse_u64,
};
use crate::console::{Console, Status, exit};

const SECTOR_SIZE: u64 = 512;
const SECTORS_PER_BLOCK: u64 = BLOCK_SIZE / SECTOR_SIZE;
const WORDS_PER_SECTOR: usize = SECTOR_SIZE as usize / 8;
const WORDS_PER_BLOCK: usize = BLOCK_SIZE as usize / 8;
/// Words 0..3 of a sector are the stamp, the rest is filler.
const STAMP_WORDS: usize = 3;
const VIRTIO_MAGIC: u32 = 0x7472_6976;
const VIRTIO_ID_BLOCK: u32 = 2;
/// The identity map (boot.rs) covers the first 16 GiB: device registers must lie below.
const IDENTITY_LIMIT: u64 = 16 << 30;

struct Config {
    blocks: u64,
    rounds: u64,
    qd: usize,
    seed: u64,
    mem: u64,
    area: Option<u64>,
    dev: Option<usize>,
}

pub fn run<'a>(
    console: &mut Console,
    mut ram: FreeRam,
    options: Options<'a>,
    devices: &VirtioMmioDevices,
) -> Result<(), CmdlineError<'a>> {
    let mut config = Config {
        blocks: 256,
        rounds: 4,
        qd: 8,
        seed: 1,
        mem: 8 << 20,
        area: None,
        dev: None,
    };
    for option in options {
        let (key, value) = option?;
        match key {
            "blocks" => config.blocks = parse_nonzero(key, value)?,
            "rounds" => config.rounds = parse_u64(key, value)?,
            "qd" => {
                config.qd = parse_nonzero(key, value)
                    .ok()
                    .and_then(|qd| usize::try_from(qd).ok())
                    .filter(|&qd| qd <= MAX_SLOTS)
                    .ok_or(CmdlineError::BadValue {
                        key,
                        value,
                        expected: "1 to 32",
                    })?;
            }
            "seed" => config.seed = parse_u64(key, value)?,
            "mem" => config.mem = parse_mem_size(key, value)?,
            "area" => config.area = Some(parse_mem_size(key, value)?),
            "dev" => {
                config.dev = Some(
                    parse_u64(key, value)?
                        .try_into()
                        .expect("usize is 64 bits on x86_64"),
                );
            }
            _ => {
                return Err(CmdlineError::UnknownOption {
                    workload: "disk",
                    key,
                });
            }
        }
    }
    let area_blocks = match config.area {
        Some(bytes) => bytes / BLOCK_SIZE,
        None => config.blocks,
    };
    if config.blocks > area_blocks {
        usage_error(
            console,
            format_args!(
                "blocks={} does not fit in an area of {area_blocks} blocks",
                config.blocks
            ),
        );
    }

    let (index, mmio) = find_device(console, &ram, devices, config.dev);
    let transport = devices.as_slice()[index];

    // Memory: the working set first (at the usual place), then the driver's DMA region, then
    // the per-block tables (last sequence number written, hash of the last read).
    let mem = ram.take(config.mem)?;
    let dma = ram.take(dma_bytes(config.qd))?;
    let table_bytes = (area_blocks * 8).next_multiple_of(PAGE_SIZE);
    let sequences = &mut ram.take(table_bytes)?[..area_blocks as usize];
    let hashes = &mut ram.take(table_bytes)?[..area_blocks as usize];
    sequences.fill(0);
    hashes.fill(0);
    fill(mem, config.seed);

    // SAFETY: `dma` is page-aligned RAM from FreeRam, of dma_bytes(config.qd) bytes, used by
    // nothing else from here on (the slice is not touched again).
    let mut device =
        unsafe { BlockDevice::init(console, mmio, dma.as_mut_ptr() as u64, config.qd) };
    let read_only = device.features & FEATURE_RO != 0;
    let can_flush = device.features & FEATURE_FLUSH != 0;
    let _ = writeln!(
        console,
        "disk device={index} base={:#x} irq={} capacity={} ro={} flush={} qd={} queue={}",
        transport.base,
        transport.irq,
        device.capacity,
        u8::from(read_only),
        u8::from(can_flush),
        device.slots,
        device.queue_size,
    );
    if area_blocks * SECTORS_PER_BLOCK > device.capacity {
        usage_error(
            console,
            format_args!(
                "area of {area_blocks} blocks ({} sectors) exceeds the disk capacity of {} sectors",
                area_blocks * SECTORS_PER_BLOCK,
                device.capacity
            ),
        );
    }
    if read_only {
        let _ = writeln!(console, "disk: read-only device: reads only, no writes");
    }

    get_id(console, &mut device);

    let mut writes = 0;
    for round in 1..=config.rounds {
        let permutation = Permutation::new(area_blocks, mix64(config.seed ^ mix64(round)));
        if !read_only {
            write_blocks(
                console,
                &mut device,
                &permutation,
                config.blocks,
                round,
                config.seed,
                sequences,
                &mut writes,
            );
            if can_flush {
                let slot = device.take_slot();
                device.submit(slot, Request::Flush);
                let completion = device.wait(console);
                check_status(console, completion.request, completion.status);
            }
        }
        read_blocks(
            console,
            &mut device,
            config.blocks,
            |index| permutation.apply(index),
            sequences,
            hashes,
        );
        let mut checksum = (0..config.blocks).fold(FNV_OFFSET, |hash, index| {
            fnv_step(hash, hashes[permutation.apply(index) as usize])
        });
        checksum = fnv_step(checksum, mix_round(mem, round));
        let _ = writeln!(
            console,
            "disk round={round} writes={writes} checksum={checksum:016x}"
        );
    }

    read_blocks(
        console,
        &mut device,
        area_blocks,
        |block| block,
        sequences,
        hashes,
    );
    let checksum = hashes
        .iter()
        .fold(FNV_OFFSET, |hash, &block_hash| fnv_step(hash, block_hash));
    let _ = writeln!(console, "disk checksum={checksum:016x}");
    let _ = writeln!(console, "disk done");
    Ok(())
}

/// Prints `disk: <message>` and exits 2 (a command line that does not fit the device).
fn usage_error(console: &mut Console, message: core::fmt::Arguments) -> ! {
    let _ = writeln!(console, "disk: {message}");
    exit(Status::BadCommandLine)
}

/// The transport to use: `dev=N` (0-based, in command-line order), else the first one whose
/// DeviceID is 2 (block).
fn find_device(
    console: &mut Console,
    ram: &FreeRam,
    devices: &VirtioMmioDevices,
    dev: Option<usize>,
) -> (usize, Mmio) {
    let devices = devices.as_slice();
    let transport = |console: &mut Console, index: usize| {
        let VirtioMmioDevice { base, size, .. } = devices[index];
        let end = base.saturating_add(size);
        if !base.is_multiple_of(4)
            || size < MIN_TRANSPORT_SIZE
            || end > IDENTITY_LIMIT
            || ram.overlaps_ram(base, end)
        {
            usage_error(
                console,
                format_args!(
                    "virtio-mmio device {index} ({size:#x} bytes at {base:#x}) is not MMIO \
                     below 16 GiB (unaligned, smaller than {MIN_TRANSPORT_SIZE:#x} bytes, \
                     in RAM or not identity-mapped)"
                ),
            );
        }
        // SAFETY: `base` is an aligned address below the identity-map limit with no RAM there
        // (memory map), given by the VMM as a virtio-mmio transport.
        unsafe { Mmio::new(base) }
    };
    if let Some(index) = dev {
        if index >= devices.len() {
            usage_error(
                console,
                format_args!(
                    "dev={index}, but the command line has {} virtio_mmio.device tokens",
                    devices.len()
                ),
            );
        }
        let mmio = transport(console, index);
        let (magic, device_id) = mmio.identify();
        if magic == VIRTIO_MAGIC && device_id != VIRTIO_ID_BLOCK {
            usage_error(
                console,
                format_args!(
                    "dev={index} is virtio device id {device_id}, not a block device \
                     ({VIRTIO_ID_BLOCK})"
                ),
            );
        }
        return (index, mmio);
    }
    for index in 0..devices.len() {
        let mmio = transport(console, index);
        if mmio.identify() == (VIRTIO_MAGIC, VIRTIO_ID_BLOCK) {
            return (index, mmio);
        }
    }
    usage_error(
        console,
        format_args!(
            "no virtio-blk device among {} virtio_mmio.device tokens",
            devices.len()
        ),
    )
}

/// GET_ID; prints `disk id=<string>` (NULs trimmed, unprintable bytes as `?`), or
/// `disk id=(unsupported)` if the device answers UNSUPP.
fn get_id(console: &mut Console, device: &mut BlockDevice) {
    let slot = device.take_slot();
    device.submit(slot, Request::GetId);
    let completion = device.wait(console);
    if completion.status == STATUS_UNSUPP {
        let _ = writeln!(console, "disk id=(unsupported)");
        return;
    }
    check_status(console, completion.request, completion.status);
    let id = device.id();
    let len = id.iter().position(|&byte| byte == 0).unwrap_or(id.len());
    let _ = write!(console, "disk id=");
    for &byte in &id[..len] {
        let shown = if byte.is_ascii_graphic() || byte == b' ' {
            byte
        } else {
            b'?'
        };
        let _ = console.write_char(char::from(shown));
    }
    let _ = writeln!(console);
}

/// Fails the workload if a request did not complete with VIRTIO_BLK_S_OK.
fn check_status(console: &mut Console, request: Request, status: u8) {
    if status == STATUS_OK {
        return;
    }
    let (kind, sector) = match request {
        Request::Write { block } => (REQ_OUT, block * SECTORS_PER_BLOCK),
        Request::Read { block } => (REQ_IN, block * SECTORS_PER_BLOCK),
        Request::Flush => (REQ_FLUSH, 0),
        Request::GetId => (REQ_GET_ID, 0),
        Request::Free => unreachable!("completions are never free slots"),
    };
    fail(
        console,
        format_args!("request failed: type={kind} sector={sector} status={status}"),
    );
}

/// Writes `count` blocks, `permutation.apply(0..count)`, each stamped with the next sequence
/// number, keeping up to `device.slots` writes in flight.
#[allow(clippy::too_many_arguments)]
fn write_blocks(
    console: &mut Console,
    device: &mut BlockDevice,
    permutation: &Permutation,
    count: u64,
    round: u64,
    seed: u64,
    sequences: &mut [u64],
    writes: &mut u64,
) {
    let mut next = 0;
    let mut done = 0;
    while done < count {
        while next < count && device.has_free_slot() {
            let block = permutation.apply(next);
            *writes += 1;
            sequences[block as usize] = *writes;
            let slot = device.take_slot();
            stamp_block(device.data(slot), block, *writes, round, seed);
            device.submit(slot, Request::Write { block });
            next += 1;
        }
        let completion = device.wait(console);
        check_status(console, completion.request, completion.status);
        done += 1;
    }
}

/// Reads `count` blocks, `block_of(0..count)`, up to `device.slots` in flight; verifies each
/// block written in this run against `sequences` and records its hash in `hashes`.
fn read_blocks(
    console: &mut Console,
    device: &mut BlockDevice,
    count: u64,
    block_of: impl Fn(u64) -> u64,
    sequences: &[u64],
    hashes: &mut [u64],
) {
    let mut next = 0;
    let mut done = 0;
    while done < count {
        while next < count && device.has_free_slot() {
            let slot = device.take_slot();
            device.submit(
                slot,
                Request::Read {
                    block: block_of(next),
                },
            );
            next += 1;
        }
        let completion = device.wait(console);
        check_status(console, completion.request, completion.status);
        let Request::Read { block } = completion.request else {
            unreachable!("only reads are in flight");
        };
        let expected = sequences[block as usize];
        hashes[block as usize] =
            verify_block(console, device.data(completion.slot), block, expected);
        done += 1;
    }
}

/// Fills the block at `data` with its stamped sectors.
fn stamp_block(data: *mut u64, block: u64, sequence: u64, round: u64, seed: u64) {
    for index in 0..SECTORS_PER_BLOCK {
        let sector = block * SECTORS_PER_BLOCK + index;
        let mut state = mix64(seed ^ mix64(sequence)) ^ sector;
        let mut check = FNV_OFFSET;
        let words = WORDS_PER_SECTOR * index as usize;
        for word in STAMP_WORDS..WORDS_PER_SECTOR {
            state = state.wrapping_add(GOLDEN_GAMMA);
            let value = mix64(state);
            check = fnv_step(check, value);
            write_word(data, words + word, value);
        }
        write_word(data, words, sector);
        write_word(data, words + 1, sequence);
        write_word(
            data,
            words + 2,
            (round & 0xffff_ffff) | u64::from(fold32(check)) << 32,
        );
    }
}

/// Returns FNV-1a (per u64) over the block at `data`; if `sequence` is not 0 (the block was
/// written in this run), first checks every sector's stamp and fails the workload on a mismatch.
fn verify_block(console: &mut Console, data: *const u64, block: u64, sequence: u64) -> u64 {
    let mut hash = FNV_OFFSET;
    for index in 0..SECTORS_PER_BLOCK {
        let sector = block * SECTORS_PER_BLOCK + index;
        let words = WORDS_PER_SECTOR * index as usize;
        let mut check = FNV_OFFSET;
        for word in 0..WORDS_PER_SECTOR {
            let value = read_word(data, words + word);
            hash = fnv_step(hash, value);
            if word >= STAMP_WORDS {
                check = fnv_step(check, value);
            }
        }
        if sequence == 0 {
            continue;
        }
        let found_sector = read_word(data, words);
        let found_sequence = read_word(data, words + 1);
        let found_check = (read_word(data, words + 2) >> 32) as u32;
        let what = if found_sector != sector {
            Some(("sector number", found_sector, sector))
        } else if found_check != fold32(check) {
            Some(("checksum", u64::from(found_check), u64::from(fold32(check))))
        } else if found_sequence != sequence {
            Some(("sequence number", found_sequence, sequence))
        } else {
            None
        };
        if let Some((what, found, expected)) = what {
            fail(
                console,
                format_args!(
                    "verify failed at sector {sector}: {what} is {found:#x}, expected {expected:#x}"
                ),
            );
        }
    }
    debug_assert_eq!(
        WORDS_PER_BLOCK,
        WORDS_PER_SECTOR * SECTORS_PER_BLOCK as usize
    );
    hash
}

fn fold32(hash: u64) -> u32 {
    (hash ^ (hash >> 32)) as u32
}

fn write_word(data: *mut u64, index: usize, value: u64) {
    debug_assert!(index < WORDS_PER_BLOCK);
    // SAFETY: `data` is a slot's 4 KiB data buffer in the driver's DMA region and index < 512;
    // volatile because the device reads it behind the compiler's back.
    unsafe { data.add(index).write_volatile(value) }
}

fn read_word(data: *const u64, index: usize) -> u64 {
    debug_assert!(index < WORDS_PER_BLOCK);
    // SAFETY: as in write_word; the device wrote the buffer before the completion was seen.
    unsafe { data.add(index).read_volatile() }
}

/// A keyed bijection of 0..n: a bijection of 0..2^bits (xor, odd multiplications, xorshifts,
/// all modulo 2^bits), cycle-walked until the value falls below n.
struct Permutation {
    n: u64,
    mask: u64,
    shift: u32,
    key: u64,
}

impl Permutation {
    fn new(n: u64, key: u64) -> Self {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        Self {
            n,
            mask: if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            },
            shift: bits / 2 + 1,
            key,
        }
    }

    fn apply(&self, index: u64) -> u64 {
        let mut value = index;
        loop {
            value = self.step(value);
            if value < self.n {
                return value;
            }
        }
    }

    fn step(&self, mut value: u64) -> u64 {
        value = (value ^ self.key) & self.mask;
        value = value.wrapping_mul(self.key | 1) & self.mask;
        value ^= value >> self.shift;
        value = value.wrapping_mul(0x9e37_79b9_7f4a_7c15) & self.mask;
        value ^= value >> self.shift;
        value
    }
}
