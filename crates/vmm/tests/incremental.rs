//! Incremental checkpoints on /dev/kvm: a full checkpoint and a chain of incremental ones of a
//! VM that uses memory and a disk heavily (requests held back a millisecond, so some are in
//! flight at most instants), each restored lazily or eagerly, continue exactly as the
//! uninterrupted run, disk included; an incremental checkpoint of a guest that writes little is
//! small; a parent this VM did not take, or a missing one, is refused.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ckpt_format::{Checkpoint, CheckpointOptions, DirStore, IoPolicy, Manifest, Strategy};
use common::*;
use vmm::{CheckpointError, CheckpointRequest, ParentSpec, Progress, Refusal, StoreSpec};
use vmm::{MachineState, RestoreError, RestoreOptions, Vm};

const WORKLOAD: &str = "disk blocks=256 rounds=12 qd=8 mem=8M seed=5";
const MEM: u64 = 96 << 20;
const DISK_SIZE: u64 = 32 << 20;
const RUN_LIMIT: Duration = Duration::from_secs(180);

fn checkpoint(
    vm: &Vm,
    dir: &Path,
    strategy: Strategy,
    parent: Option<&Path>,
) -> Result<Manifest, CheckpointError> {
    let request = CheckpointRequest {
        store: StoreSpec::Dir(dir.to_path_buf()),
        options: CheckpointOptions {
            strategy,
            io: IoPolicy::Live,
            ..Default::default()
        },
        pause_probe: None,
        parent: parent.map(|p| ParentSpec {
            address: p.display().to_string(),
            store: StoreSpec::Dir(p.to_path_buf()),
        }),
    };
    vm.checkpoint(&request, &Progress::default())
}

fn restore(dir: &Path, eager: bool) -> Result<(Vm, Capture), RestoreError> {
    let console = Capture::default();
    let disk_dir = dir.with_extension(format!("disks-{eager}"));
    std::fs::create_dir_all(&disk_dir).unwrap();
    let vm = Vm::restore(
        &StoreSpec::Dir(dir.to_path_buf()),
        RestoreOptions {
            allow_dirs: vec![dir.parent().unwrap().to_path_buf()],
            console: console.console(),
            eager,
            disk_dir: Some(disk_dir),
        },
    )?;
    Ok((vm, console))
}

fn bytes_emitted_at_checkpoint(dir: &Path) -> usize {
    let ckpt = Checkpoint::open(&DirStore::new(dir.to_path_buf())).unwrap();
    let snapshot: MachineState = ckpt.decode_state().unwrap();
    snapshot.devices.serial.bytes_emitted as usize
}

/// A full checkpoint, then ten incremental ones each naming the one before, with every
/// strategy: each restores (lazily and eagerly in turn) into a VM that continues exactly as the
/// uninterrupted run.
#[test]
fn a_chain_of_ten_incremental_checkpoints_restores_without_divergence() {
    let work = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let (vm, console) = boot_with_disk(
        WORKLOAD,
        MEM,
        &new_raw_disk(work.path(), "reference.raw", DISK_SIZE),
    );
    let (expected, expected_disk) = run_to_end(vm, &console, RUN_LIMIT);
    let took = start.elapsed();

    let (vm, console) = boot_with_disk(
        WORKLOAD,
        MEM,
        &new_raw_disk(work.path(), "chain.raw", DISK_SIZE),
    );
    console.wait_for("disk round=", 1, RUN_LIMIT);
    let strategies = [Strategy::Uffd, Strategy::Fork, Strategy::Stop];
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut manifests = Vec::new();
    for i in 0..11 {
        let dir = work.path().join(format!("ckpt{i}"));
        let m = checkpoint(
            &vm,
            &dir,
            strategies[i % 3],
            dirs.last().map(PathBuf::as_path),
        )
        .unwrap_or_else(|e| panic!("checkpoint {i}: {e:?}"));
        assert_eq!(m.parent.is_some(), i > 0);
        eprintln!(
            "checkpoint {i} ({:?}): {} bytes, {} pages in parent, pause {} us, phases {:?}",
            strategies[i % 3],
            m.metrics.bytes_written,
            m.metrics.pages_in_parent,
            m.metrics.pause_us,
            m.metrics.phases_us
        );
        dirs.push(dir);
        manifests.push(m);
        std::thread::sleep(took / 60);
    }
    let (out, disk) = run_to_end(vm, &console, RUN_LIMIT);
    assert_eq!(out, expected, "checkpointing changed what the VM computed");
    assert!(disk == expected_disk, "the running VM's disk differs");
    assert!(
        manifests[1..].iter().all(|m| m.metrics.pages_in_parent > 0),
        "every incremental checkpoint leaves pages in its parent"
    );

    for (i, dir) in dirs.iter().enumerate() {
        if ![0, 1, 2, 3, 5, 10].contains(&i) {
            continue;
        }
        let eager = i % 2 == 1;
        let at = bytes_emitted_at_checkpoint(dir);
        let (restored, restored_console) = restore(dir, eager).expect("restore");
        let (rest, disk) = run_to_end(restored, &restored_console, RUN_LIMIT);
        assert_eq!(
            format!("{}{rest}", &expected[..at]),
            expected,
            "checkpoint {i} (eager={eager}): the restored VM diverged"
        );
        assert!(
            disk == expected_disk,
            "checkpoint {i}: the restored VM's disk differs"
        );
    }

    // A missing parent refuses the restore, naming it.
    std::fs::rename(&dirs[4], work.path().join("moved")).unwrap();
    let err = restore(&dirs[10], false)
        .err()
        .expect("a missing parent refused");
    let text = format!("{:#}", anyhow_chain(&err));
    assert!(
        text.contains(&dirs[4].display().to_string()),
        "the refusal names the missing parent: {text}"
    );
}

fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A guest that fills its working set once and then only reads it: its incremental checkpoint
/// writes a small fraction of a full one, and restores lazily to the same computation.
#[test]
fn an_incremental_checkpoint_of_a_quiet_guest_is_small() {
    let work = tempfile::tempdir().unwrap();
    let (vm, console) = boot_guest("scan mem=32M passes=0 every=50", 128 << 20, 1);
    console.wait_for("scan pass=", 1, RUN_LIMIT);
    let full_dir = work.path().join("full");
    let full = checkpoint(&vm, &full_dir, Strategy::Uffd, None).expect("full checkpoint");
    console.wait_for("scan pass=", 2, RUN_LIMIT);
    let incr_dir = work.path().join("incr");
    let incr = checkpoint(&vm, &incr_dir, Strategy::Uffd, Some(&full_dir)).expect("incremental");
    eprintln!(
        "full: {} bytes, {:?}; incremental: {} bytes, {} pages in parent, {:?}",
        full.metrics.bytes_written,
        full.metrics.phases_us,
        incr.metrics.bytes_written,
        incr.metrics.pages_in_parent,
        incr.metrics.phases_us
    );
    assert!(
        incr.metrics.bytes_written < full.metrics.bytes_written / 4,
        "incremental {} bytes against full {}",
        incr.metrics.bytes_written,
        full.metrics.bytes_written
    );
    // The log was off until this first incremental checkpoint asked for it: it read every page
    // and compared it with the parent. The next one reads only the pages the log reports: the
    // 32 MiB the guest reads count too (KVM remaps them after a live checkpoint with the guest's
    // dirty bit set), a quarter of memory.
    let pages = (128u64 << 20) / 4096;
    let read = |m: &Manifest| m.metrics.pages_saved_by_fault + m.metrics.pages_saved_in_background;
    assert_eq!(
        read(&incr),
        pages,
        "the first incremental reads all of memory"
    );
    console.wait_for("scan pass=", 3, RUN_LIMIT);
    let next = checkpoint(
        &vm,
        &work.path().join("next"),
        Strategy::Uffd,
        Some(&incr_dir),
    )
    .expect("second incremental");
    assert!(
        read(&next) < pages / 2,
        "with the log on, {} pages read of {pages}",
        read(&next)
    );
    let sum = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("scan pass="))
            .and_then(|l| l.split(" sum=").nth(1))
            .map(|l| l[..16].to_string())
            .unwrap_or_else(|| panic!("no complete scan line in:\n{text}"))
    };
    let expected = sum(&console.text());

    // A parent this VM did not take is refused before anything is written.
    let (other, _other_console) = boot_guest("scan mem=4M passes=0 every=50", 128 << 20, 1);
    let err = checkpoint(
        &other,
        &work.path().join("foreign"),
        Strategy::Uffd,
        Some(&full_dir),
    )
    .expect_err("a foreign parent is refused");
    assert!(
        matches!(err, CheckpointError::Refused(Refusal::Parent { .. })),
        "{err:?}"
    );
    other.stop();
    vm.stop();
    drop(vm);

    let (restored, restored_console) = restore_plain(&incr_dir);
    // The second line's start proves the first one complete.
    let text = restored_console.wait_for("scan pass=", 2, RUN_LIMIT);
    assert_eq!(
        sum(&text),
        expected,
        "the restored guest reads other memory"
    );
    restored.stop();
}

fn restore_plain(dir: &Path) -> (Vm, Capture) {
    let console = Capture::default();
    let vm = Vm::restore(
        &StoreSpec::Dir(dir.to_path_buf()),
        RestoreOptions {
            allow_dirs: Vec::new(),
            console: console.console(),
            eager: false,
            disk_dir: None,
        },
    )
    .expect("restore");
    (vm, console)
}
