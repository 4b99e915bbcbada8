//! The restore page service on /dev/kvm: a lazily restored guest runs on anonymous memory whose
//! pages arrive verified on first touch or by prefetch. Guests that rewrite or only read their
//! memory finish exactly as the uninterrupted run; a corrupt page stops the VM before the guest
//! reads it; zero pages and later writes to the image never reach the guest; a restored VM is
//! checkpointed with `uffd`, and its checkpoint records the guest's hot set.

mod common;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use ckpt_format::{Checkpoint, CheckpointOptions, DirStore, IoPolicy, PageState, Strategy};
use common::*;
use vm_memory::{Bytes, GuestAddress};
use vmm::{
    CheckpointRequest, MachineState, Progress, RestoreError, RestoreOptions, RestoreStats, Standby,
    StoreSpec,
};
use vmm::{Vm, VmExit};

const MEM: u64 = 64 << 20;
const LIMIT: Duration = Duration::from_secs(120);

fn checkpoint(vm: &Vm, dir: &Path, strategy: Strategy) -> ckpt_format::Manifest {
    vm.checkpoint(
        &CheckpointRequest {
            store: StoreSpec::Dir(dir.to_path_buf()),
            options: CheckpointOptions {
                strategy,
                io: IoPolicy::Live,
                ..Default::default()
            },
            pause_probe: None,
            parent: None,
        },
        &Progress::default(),
    )
    .expect("checkpoint")
}

/// A lazy restore's options, its console captured in `console`.
fn lazy(console: &Capture) -> RestoreOptions {
    RestoreOptions {
        console: console.console(),
        eager: false,
        disk_dir: None,
        allow_dirs: Vec::new(),
    }
}

fn restore(dir: &Path) -> (Vm, Capture) {
    let console = Capture::default();
    let vm = Vm::restore(&StoreSpec::Dir(dir.to_path_buf()), lazy(&console)).expect("restore");
    (vm, console)
}

fn bytes_emitted_at_checkpoint(dir: &Path) -> usize {
    let ckpt = Checkpoint::open(&DirStore::new(dir.to_path_buf())).unwrap();
    let state: MachineState = ckpt.decode_state().unwrap();
    state.devices.serial.bytes_emitted as usize
}

/// The console without its timestamps (`tsc=<n>`), which differ from run to run.
fn without_tsc(text: &str) -> String {
    text.lines()
        .map(|l| match l.find(" tsc=") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until the page service has made all memory resident; returns its report.
fn wait_resident(vm: &Vm) -> RestoreStats {
    let start = Instant::now();
    loop {
        let stats = vm.restore_stats().expect("a restored VM");
        if stats.pages.resident_after_us.is_some() {
            return stats;
        }
        assert!(
            start.elapsed() < LIMIT,
            "memory not resident: {stats:?} (exit {:?})",
            vm.exit_status()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `sum=` values of the complete lines the console printed.
fn sums(text: &str) -> Vec<String> {
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("sum="))
        .map(str::to_string)
        .collect()
}

#[test]
fn lazy_restores_of_a_writer_and_a_reader_finish_as_the_uninterrupted_run() {
    let work = tempfile::tempdir().unwrap();
    for (i, workload) in [
        "dirty mem=32M passes=2000 every=50",
        "scan mem=32M passes=2000 every=50",
    ]
    .into_iter()
    .enumerate()
    {
        let (reference, console) = boot_guest(workload, MEM, 1);
        assert_eq!(
            wait_or_explain(&reference, &console, LIMIT),
            VmExit::Guest(0)
        );
        let expected = without_tsc(&console.text());
        drop(reference);

        let (vm, console) = boot_guest(workload, MEM, 1);
        console.wait_for(" pass=", 1, LIMIT);
        let dir = work.path().join(format!("ckpt{i}"));
        checkpoint(&vm, &dir, Strategy::Uffd);
        assert_eq!(wait_or_explain(&vm, &console, LIMIT), VmExit::Guest(0));
        let before = console.text();
        drop(vm);

        let at = bytes_emitted_at_checkpoint(&dir);
        // A plain restore, and one on a standby VM made before the checkpoint was chosen.
        let mut standby = Standby::new(MEM, 1).expect("standby");
        for on_standby in [false, true] {
            let (restored, restored_console) = if on_standby {
                restore_on(&mut standby, &dir).expect("restore on the standby")
            } else {
                restore(&dir)
            };
            assert_eq!(
                wait_or_explain(&restored, &restored_console, LIMIT),
                VmExit::Guest(0)
            );
            let out = format!("{}{}", &before[..at], restored_console.text());
            assert_eq!(
                without_tsc(&out),
                expected,
                "{workload} (standby: {on_standby}): the restored VM diverged"
            );
            let stats = wait_resident(&restored);
            assert!(stats.lazy, "{stats:?}");
            assert_eq!(
                stats.pages.bytes_by_fault + stats.pages.bytes_prefetched,
                MEM,
                "every byte is installed once: {stats:?}"
            );
            eprintln!("{workload} (standby: {on_standby}): {stats:?}");
        }
        assert!(standby.is_used());
    }
}

fn restore_on(standby: &mut Standby, dir: &Path) -> Result<(Vm, Capture), RestoreError> {
    let console = Capture::default();
    let vm = Vm::restore_standby(standby, &StoreSpec::Dir(dir.to_path_buf()), lazy(&console))?;
    Ok((vm, console))
}

/// A standby VM takes only a checkpoint of its own shape, and one only: a refused checkpoint
/// leaves it ready for the next.
#[test]
fn a_standby_vm_refuses_another_shape_and_serves_one_restore() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("ckpt");
    let good = scan_checkpoint(&dir);
    for (mem, vcpus) in [(MEM * 2, 1), (MEM, 2)] {
        let mut other = Standby::new(mem, vcpus).expect("standby");
        let Err(err) = restore_on(&mut other, &dir) else {
            panic!("a standby of {mem} bytes and {vcpus} vCPUs took a checkpoint of {MEM} and 1");
        };
        assert!(
            matches!(&err, RestoreError::Config { reason, .. } if reason.contains("standby")),
            "{err:?}"
        );
        assert!(!other.is_used());
    }

    let mut standby = Standby::new(MEM, 1).expect("standby");
    let Err(err) = restore_on(&mut standby, &work.path().join("missing")) else {
        panic!("a missing checkpoint restored");
    };
    assert!(matches!(err, RestoreError::Open { .. }), "{err:?}");
    assert!(!standby.is_used());
    let (vm, console) = restore_on(&mut standby, &dir).expect("restore on the standby");
    console.wait_for("scan pass=", 2, LIMIT);
    wait_resident(&vm);
    assert_eq!(vm.exit_status(), None);
    for sum in sums(&console.text()) {
        assert_eq!(sum, good[0], "the guest reads other memory");
    }
    assert!(standby.is_used());
    let Err(err) = restore_on(&mut standby, &dir) else {
        panic!("a standby served two restores");
    };
    assert!(err.to_string().contains("already been used"), "{err}");
    drop(vm);
}

/// A checkpoint of a `scan` guest that has filled its working set.
fn scan_checkpoint(dir: &Path) -> Vec<String> {
    let (vm, console) = boot_guest("scan mem=24M every=1", MEM, 1);
    console.wait_for("scan pass=", 2, LIMIT);
    checkpoint(&vm, dir, Strategy::Stop);
    vm.stop();
    sums(&console.text())
}

#[test]
fn a_corrupt_page_stops_the_vm_before_the_guest_reads_it() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("ckpt");
    let good = scan_checkpoint(&dir);
    // The last present page: inside the working set the guest reads on every pass.
    let image = dir.join("memory.img");
    let mut bytes = fs::read(&image).unwrap();
    let at = bytes.iter().rposition(|&b| b != 0).unwrap();
    bytes[at] ^= 0x40;
    fs::write(&image, bytes).unwrap();
    let page = at / 4096;

    let (vm, console) = restore(&dir);
    match vm.wait_timeout(LIMIT) {
        Some(VmExit::Fatal(msg)) => assert!(
            msg.contains(&format!("page {page} ")) && msg.contains("corrupt"),
            "{msg}"
        ),
        other => panic!("a corrupt page must stop the VM, got {other:?}"),
    }
    for sum in sums(&console.text()) {
        assert_eq!(sum, good[0], "the guest read a corrupt page");
    }
}

#[test]
fn a_corrupt_index_segment_stops_the_vm_and_an_index_without_segments_still_restores() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("ckpt");
    let good = scan_checkpoint(&dir);
    let ckpt = Checkpoint::open(&DirStore::new(dir.clone())).unwrap();
    assert!(ckpt.has_index_segments());
    let index = ckpt.page_index().unwrap();
    // The last present page: inside the working set the guest reads on every pass.
    let page = (0..ckpt.pages())
        .rev()
        .find(|&p| index.entry(p).unwrap().state == PageState::Present)
        .unwrap();
    let hashes_at = 32 + ckpt.pages().div_ceil(8) * 8;
    drop(ckpt);

    // An older writer's checkpoint: no checksums of the index's segments. Its whole index is
    // read before the VM starts, and the guest runs on as before.
    let old = work.path().join("old");
    fs::create_dir(&old).unwrap();
    for entry in fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), old.join(entry.file_name())).unwrap();
    }
    rewrite_manifest(&old, |m| {
        m["memory"]
            .as_object_mut()
            .unwrap()
            .remove("index_segments")
            .expect("the writer records segment checksums");
    });
    let (vm, console) = restore(&old);
    console.wait_for("scan pass=", 2, LIMIT);
    wait_resident(&vm);
    assert_eq!(vm.exit_status(), None);
    for sum in sums(&console.text()) {
        assert_eq!(sum, good[0]);
    }
    drop(vm);

    // A flipped bit in the hash of that page: its segment does not verify, so no page of its
    // block is installed, and the VM stops naming the index.
    let path = dir.join("page-index.bin");
    let mut bytes = fs::read(&path).unwrap();
    bytes[(hashes_at + 8 * page) as usize] ^= 0x40;
    fs::write(&path, bytes).unwrap();
    let (vm, console) = restore(&dir);
    match vm.wait_timeout(LIMIT) {
        Some(VmExit::Fatal(msg)) => assert!(
            msg.contains("page-index") && msg.contains("checksum"),
            "{msg}"
        ),
        other => panic!("a corrupt index segment must stop the VM, got {other:?}"),
    }
    for sum in sums(&console.text()) {
        assert_eq!(sum, good[0], "the guest read an unverified page");
    }
}

#[test]
fn zero_pages_and_later_writes_to_the_image_never_reach_the_guest() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("ckpt");
    let good = scan_checkpoint(&dir);
    let ckpt = Checkpoint::open(&DirStore::new(dir.clone())).unwrap();
    let index = ckpt.page_index().unwrap();
    let zero = (0..ckpt.pages())
        .rev()
        .find(|&p| index.entry(p).unwrap().state == PageState::Zero)
        .expect("a 64 MiB VM with 24 MiB of working set has zero pages");
    let present = (0..ckpt.pages())
        .rev()
        .find(|&p| index.entry(p).unwrap().state == PageState::Present)
        .unwrap();
    let mut saved = vec![0u8; 4096];
    ckpt.read_pages(present, &mut saved).unwrap();
    drop(ckpt);

    // Junk in a zero page's slot of the image: a restore must not read it.
    let image = dir.join("memory.img");
    let mut file = fs::OpenOptions::new().write(true).open(&image).unwrap();
    file.seek(SeekFrom::Start(zero * 4096)).unwrap();
    file.write_all(&[0xa5; 4096]).unwrap();
    drop(file);

    let (vm, console) = restore(&dir);
    let stats = wait_resident(&vm);
    let mut page = vec![0u8; 4096];
    vm.memory()
        .read_slice(&mut page, GuestAddress(zero * 4096))
        .unwrap();
    assert!(page.iter().all(|&b| b == 0), "zero page {zero} was read");

    // Everything the image holds now changes nothing in the running guest.
    let len = fs::metadata(&image).unwrap().len();
    fs::write(&image, vec![0x5a; len as usize]).unwrap();
    let passes = console.text().matches("scan pass=").count();
    console.wait_for("scan pass=", passes + 3, LIMIT);
    assert_eq!(vm.exit_status(), None, "{stats:?}");
    vm.memory()
        .read_slice(&mut page, GuestAddress(present * 4096))
        .unwrap();
    assert_eq!(page, saved, "page {present} changed with the image");
    for sum in sums(&console.text()) {
        assert_eq!(sum, good[0]);
    }
}

#[test]
fn a_restored_vm_is_checkpointed_with_uffd_and_its_hot_set_is_recorded() {
    let work = tempfile::tempdir().unwrap();
    // Long enough (over a second) that the restored guest still runs when the second
    // checkpoint, which first waits for its memory to become resident, pauses it, even on a
    // loaded host.
    let workload = "dirty mem=32M passes=12000 every=200";
    let (reference, console) = boot_guest(workload, MEM, 1);
    assert_eq!(
        wait_or_explain(&reference, &console, LIMIT),
        VmExit::Guest(0)
    );
    let done = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("dirty done"))
            .map(str::to_string)
    };
    let expected = done(&console.text()).expect("the reference finishes");
    drop(reference);

    let (vm, console) = boot_guest(workload, MEM, 1);
    console.wait_for("dirty pass=", 1, LIMIT);
    let first = work.path().join("first");
    let m = checkpoint(&vm, &first, Strategy::Uffd);
    assert!(
        !m.memory.hot_pages.is_empty() || m.metrics.pages_saved_by_fault == 0,
        "pages saved by fault make the hot set: {:?}",
        m.metrics
    );
    drop(vm);

    // At once, while the page service may still be prefetching.
    let (restored, console) = restore(&first);
    let second = work.path().join("second");
    let m = checkpoint(&restored, &second, Strategy::Uffd);
    assert_eq!(m.options.strategy, Strategy::Uffd);
    drop(restored);
    drop(console);

    let (again, console) = restore(&second);
    assert_eq!(wait_or_explain(&again, &console, LIMIT), VmExit::Guest(0));
    assert_eq!(done(&console.text()), Some(expected));
}
