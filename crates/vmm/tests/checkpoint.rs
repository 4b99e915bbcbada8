//! Live checkpoints on /dev/kvm: a guest dirties memory at full speed while it is checkpointed;
//! the store must hold exactly the pages of the pause instant, for every strategy.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ckpt_format::{Checkpoint, CheckpointOptions, DirStore, Strategy, PAGE_SIZE};
use common::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm::{CheckpointRequest, Progress, StoreSpec};

/// xxh3 of every page of guest RAM in image order, and how many pages had never been
/// populated. Those are not read (reading would map them) but taken as zero, so that a `uffd`
/// checkpoint (its write-out follows the pause) still finds them unpopulated and must record
/// them as zero without reading them.
/// A page counts as never populated when the page map shows nothing there, or only
/// userfaultfd's write-protect marker (swap type 31, offset 1: shown only to a process with
/// CAP_SYS_ADMIN).
fn page_hashes(mem: &GuestMemoryMmap) -> (Vec<u64>, u64) {
    const PRESENT: u64 = 1 << 63;
    const SWAP: u64 = 1 << 62;
    const FRAME: u64 = (1 << 55) - 1;
    let map = std::fs::File::open("/proc/self/pagemap").unwrap();
    let zero = ckpt_format::checksum(&[0u8; PAGE_SIZE]);
    let mut hashes = Vec::new();
    let mut unpopulated = 0;
    let mut page = [0u8; PAGE_SIZE];
    for region in mem.iter() {
        let start = region.start_addr().0;
        let mut entries = vec![0u8; (region.len() / PAGE_SIZE as u64 * 8) as usize];
        map.read_exact_at(&mut entries, region.as_ptr() as u64 / PAGE_SIZE as u64 * 8)
            .unwrap();
        for (i, entry) in entries.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(entry.try_into().unwrap());
            if e & PRESENT == 0 && (e & SWAP == 0 || e & FRAME == 31 | 1 << 5) {
                unpopulated += 1;
                hashes.push(zero);
                continue;
            }
            mem.read_slice(&mut page, GuestAddress(start + (i * PAGE_SIZE) as u64))
                .unwrap();
            hashes.push(ckpt_format::checksum(&page));
        }
    }
    (hashes, unpopulated)
}

/// Whether this process has CAP_SYS_ADMIN, which the page map asks before it shows what a swap
/// entry is.
fn may_see_swap_entries() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|caps| u64::from_str_radix(caps.trim(), 16).ok())
        .is_some_and(|caps| caps >> CAP_SYS_ADMIN & 1 == 1)
}

fn passes(text: &str) -> usize {
    text.matches("dirty pass=").count()
}

fn checkpoint_while_dirtying(strategy: Strategy) {
    checkpoint_while_dirtying_with_budget(strategy, None);
}

/// As [`checkpoint_while_dirtying`], with a copy-aside budget of `cow_budget` bytes (for `uffd`
/// the copies waiting for the store, for `stop` its arena).
fn checkpoint_while_dirtying_with_budget(strategy: Strategy, cow_budget: Option<u64>) {
    let (vm, console) = boot_guest("dirty mem=96M fill=1 every=4", 160 << 20, 1);
    vm.set_cow_budget(cow_budget);
    console.wait_for("dirty pass=", 2, Duration::from_secs(30));
    let dir = tempfile::tempdir().unwrap();
    let at_pause: Arc<Mutex<(Vec<u64>, u64)>> = Arc::default();
    let recorded = at_pause.clone();
    let request = CheckpointRequest {
        store: StoreSpec::Dir(dir.path().join("ckpt")),
        options: CheckpointOptions {
            strategy,
            ..Default::default()
        },
        pause_probe: Some(Arc::new(move |mem| {
            *recorded.lock().unwrap() = page_hashes(mem)
        })),
        parent: None,
    };
    let before = passes(&console.text());
    let manifest = vm
        .checkpoint(&request, &Progress::default())
        .expect("checkpoint");
    console.wait_for("dirty pass=", before + 3, Duration::from_secs(30));
    assert!(
        vm.exit_status().is_none(),
        "guest stopped: {:?}",
        vm.exit_status()
    );

    let m = &manifest.metrics;
    let pages = (160u64 << 20) / PAGE_SIZE as u64;
    assert_eq!(
        m.pages_saved_by_fault + m.pages_saved_in_background,
        pages,
        "{m:?}"
    );
    assert!(m.pause_us > 0 && m.total_us >= m.pause_us, "{m:?}");
    assert!(
        m.write_out_us > 0 && m.total_us >= m.pause_us + m.write_out_us,
        "{m:?}"
    );
    // The stalls are measured where the VMM serves the faults, and are part of what the
    // guest lost.
    match strategy {
        Strategy::Fork => assert_eq!((m.stall_us, m.max_stall_us), (None, None), "{m:?}"),
        Strategy::Stop => assert_eq!((m.stall_us, m.max_stall_us), (Some(0), Some(0)), "{m:?}"),
        Strategy::Uffd => {
            let (sum, max) = (m.stall_us.unwrap(), m.max_stall_us.unwrap());
            assert!(max <= sum, "{m:?}");
            assert!(m.pages_saved_by_fault == 0 || sum > 0, "{m:?}");
        }
    }
    assert_eq!(
        m.guest_lost_us,
        m.pause_us + m.stall_us.unwrap_or(0),
        "{m:?}"
    );
    // The store's manifest was written before the completion marker: it holds less.
    let stored = Checkpoint::open(&DirStore::new(dir.path().join("ckpt"))).expect("open");
    assert!(stored.manifest().metrics.total_us <= m.total_us);

    let ckpt = Checkpoint::open(&DirStore::new(dir.path().join("ckpt"))).expect("open");
    let (expected, unpopulated) = at_pause.lock().unwrap().clone();
    assert_eq!(expected.len() as u64, pages);
    // The guest never touches the top 64 MiB but for its page tables, and no strategy reads
    // what was never populated: `stop` copied memory before the probe ran, yet the pages stay
    // unpopulated. (Without CAP_SYS_ADMIN the page map hides `uffd`'s write-protect marker: the
    // probe cannot tell those pages, and `uffd` reads them.)
    if strategy != Strategy::Uffd || may_see_swap_entries() {
        assert!(
            unpopulated > (32 << 20) / PAGE_SIZE as u64,
            "{strategy:?}: {unpopulated}"
        );
    }
    let mut page = [0u8; PAGE_SIZE];
    let mut differing = Vec::new();
    for (i, want) in expected.iter().enumerate() {
        ckpt.read_page(i as u64, &mut page).unwrap();
        if ckpt_format::checksum(&page) != *want {
            differing.push(i);
        }
    }
    assert!(
        differing.is_empty(),
        "{strategy:?}: {} pages differ from the pause instant, first {:?}",
        differing.len(),
        &differing[..differing.len().min(8)]
    );
    ckpt.verify_memory(2, &|_| {}).expect("page hashes");
    eprintln!("{strategy:?}: {m:?}");
    vm.stop();
}

#[test]
fn uffd_checkpoint_holds_the_pause_instant() {
    checkpoint_while_dirtying(Strategy::Uffd);
}

/// A copy-aside budget of one block: the guest waits for the store at almost every fault, and
/// the checkpoint still holds the pause instant.
#[test]
fn uffd_checkpoint_with_a_tiny_cow_budget_holds_the_pause_instant() {
    checkpoint_while_dirtying_with_budget(Strategy::Uffd, Some(4096));
}

#[test]
fn fork_checkpoint_holds_the_pause_instant() {
    checkpoint_while_dirtying(Strategy::Fork);
}

#[test]
fn stop_checkpoint_holds_the_pause_instant() {
    checkpoint_while_dirtying(Strategy::Stop);
}

/// An arena smaller than what the guest populated: the pause copies what fits into it and
/// writes the rest to the store itself, and the arena's copies follow after the resume; the
/// checkpoint holds the pause instant all the same.
#[test]
fn stop_checkpoint_past_its_arena_holds_the_pause_instant() {
    checkpoint_while_dirtying_with_budget(Strategy::Stop, Some(16 << 20));
}

/// Boots `cmdline` with an 8 MiB zeroed raw disk `disk.raw` in `dir`.
fn boot_with_disk(dir: &std::path::Path, cmdline: &str) -> vmm::Vm {
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(8 << 20))
        .unwrap();
    let mut cfg = config(guest(), cmdline, 64 << 20, 1, Capture::default().console());
    cfg.disks = vec![vmm::DiskConfig {
        allow_dirs: Vec::new(),
        path: disk,
        readonly: false,
        delay_ms: 0,
    }];
    vmm::Vm::boot(cfg).expect("boot")
}

/// The names of the disk image files in `dir` (the disk and any COW files over it), sorted.
fn disk_files(dir: &std::path::Path) -> Vec<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("disk"))
        .collect();
    files.sort();
    files
}

/// A VM whose guest has ended has no instant left to capture: the checkpoint is refused with
/// the guest's exit, and the COW file it had prepared next to the disk is removed.
#[test]
fn a_vm_that_has_ended_is_not_checkpointed() {
    let work = tempfile::tempdir().unwrap();
    let vm = boot_with_disk(work.path(), "hello");
    assert_eq!(
        vm.wait_timeout(Duration::from_secs(30)),
        Some(vmm::VmExit::Guest(0))
    );
    for strategy in [Strategy::Uffd, Strategy::Fork, Strategy::Stop] {
        let store = work.path().join(format!("ckpt-{strategy:?}"));
        let request = CheckpointRequest {
            store: StoreSpec::Dir(store.clone()),
            options: CheckpointOptions {
                strategy,
                ..Default::default()
            },
            pause_probe: None,
            parent: None,
        };
        match vm.checkpoint(&request, &Progress::default()) {
            Err(vmm::CheckpointError::Exited(exit)) => {
                assert_eq!(exit, vmm::VmExit::Guest(0))
            }
            other => panic!("{strategy:?}: expected a refusal, got {other:?}"),
        }
        assert!(
            Checkpoint::open(&DirStore::new(store)).is_err(),
            "{strategy:?}: no checkpoint may exist"
        );
    }
    assert_eq!(
        disk_files(work.path()),
        ["disk.raw"],
        "a failed checkpoint left files behind"
    );
}

/// A checkpoint the store refuses (it holds a checkpoint already) leaves the running VM and its
/// disk chain as they were: the COW file prepared for it is removed.
#[test]
fn a_refused_checkpoint_leaves_no_cow_file() {
    let work = tempfile::tempdir().unwrap();
    let vm = boot_with_disk(work.path(), "dirty mem=8M");
    let request = CheckpointRequest {
        store: StoreSpec::Dir(work.path().join("ckpt")),
        options: CheckpointOptions::default(),
        pause_probe: None,
        parent: None,
    };
    vm.checkpoint(&request, &Progress::default())
        .expect("first checkpoint");
    let before = disk_files(work.path());
    assert_eq!(
        before.len(),
        2,
        "the disk and the VM's COW file: {before:?}"
    );
    match vm.checkpoint(&request, &Progress::default()) {
        Err(vmm::CheckpointError::Store { .. }) => {}
        other => panic!("expected the store to refuse, got {other:?}"),
    }
    assert_eq!(
        disk_files(work.path()),
        before,
        "the refused checkpoint left a COW file"
    );
    assert!(vm.exit_status().is_none());
    assert_eq!(vm.disks()[0].image_info().unwrap().chain.len(), 2);
}
