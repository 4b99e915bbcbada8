//! Fuzzing descriptor-chain handling: guest memory holding a random descriptor table and
//! available ring is popped through the virtio queue and every chain parsed and validated as
//! the device does (see the `fuzzkit` crate for the knobs:
//! `COWVM_FUZZ_SECS=3600 cargo test --release -p vmm --lib fuzz_virtio_chains`).
//!
//! An input describes up to 20 descriptors (addresses mostly inside guest memory, any flags,
//! next indices partly out of range), the available ring, and bytes filling the buffers. Any
//! refusal is fine; a panic or a hang is a bug.

use fuzzkit::arbitrary::{Result, Unstructured};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{parse, validate, Parsed};

const MEM_SIZE: u64 = 64 << 10;
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const DATA: u64 = 0x3000;
const CAPACITY: u64 = 32 << 10;

/// An address mostly inside guest memory, sometimes anywhere.
fn addr(u: &mut Unstructured<'_>) -> Result<u64> {
    let raw: u64 = u.arbitrary()?;
    Ok(if u.ratio(7, 8)? { raw % MEM_SIZE } else { raw })
}

fn write_queue(u: &mut Unstructured<'_>, mem: &GuestMemoryMmap) -> Result<()> {
    let descs = u.int_in_range(0..=20u16)?;
    for i in 0..descs {
        let len: u32 = if u.ratio(3, 4)? {
            u.int_in_range(0..=8192)?
        } else {
            u.arbitrary()?
        };
        let flags = u.int_in_range(0..=7u16)?;
        let next = u.int_in_range(0..=QUEUE_SIZE + 3)?;
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr(u)?.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let at = DESC_TABLE + u64::from(i % QUEUE_SIZE) * 16;
        mem.write_slice(&d, GuestAddress(at))
            .expect("inside memory");
    }
    let avail = u.int_in_range(0..=QUEUE_SIZE + 2)?;
    for i in 0..QUEUE_SIZE {
        let head = u.int_in_range(0..=QUEUE_SIZE + 1)?;
        let at = AVAIL_RING + 4 + u64::from(i) * 2;
        mem.write_obj(head, GuestAddress(at))
            .expect("inside memory");
    }
    mem.write_obj(avail, GuestAddress(AVAIL_RING + 2))
        .expect("inside memory");
    // Buffer contents: request headers (type, sector) and data.
    let rest = u.bytes(u.len())?;
    let n = rest.len().min((MEM_SIZE - DATA) as usize);
    mem.write_slice(&rest[..n], GuestAddress(DATA))
        .expect("inside memory");
    Ok(())
}

fn chains(data: &[u8]) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory");
    let mut u = Unstructured::new(data);
    if write_queue(&mut u, &mem).is_err() {
        return;
    }
    let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    let Ok(iter) = queue.iter(&mem) else {
        return;
    };
    for chain in iter {
        match parse(chain, 1) {
            Parsed::Request(req) => {
                if validate(&req, &mem, CAPACITY).is_ok() {
                    assert!(req.status_addr < MEM_SIZE, "{req:?}");
                }
            }
            Parsed::Fail { status_addr, .. } => {
                assert!(status_addr < MEM_SIZE, "status at {status_addr:#x}")
            }
            Parsed::Broken(_) => {}
        }
    }
}

#[test]
fn fuzz_virtio_chains() {
    let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/virtio-chains");
    let report = fuzzkit::run("virtio-chains", corpus, chains);
    assert!(report.seeds > 0, "the seed corpus is empty");
    assert!(report.iterations > report.seeds as u64);
}
