//! Disk I/O pending at the checkpoint instant (SPEC §3), on real KVM with a disk that holds
//! every request back, so requests are reliably in flight when the checkpoint is taken.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ckpt_format::{Checkpoint, CheckpointOptions, DirStore, IoPolicy, Strategy};
use common::*;
use vmm::testing::RequestKind;
use vmm::DiskConfig;
use vmm::MachineState;
use vmm::RestoreOptions;
use vmm::{CheckpointRequest, Progress, StoreSpec};
use vmm::{Vm, VmExit};

const WORKLOAD: &str = "disk blocks=128 rounds=6 qd=8 mem=4M seed=5";
const MEM: u64 = 64 << 20;
/// Every request stays in flight this long before its I/O is issued.
const DELAY_MS: u64 = 40;

fn boot(dir: &Path) -> (Vm, Capture, PathBuf) {
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(16 << 20))
        .unwrap();
    let capture = Capture::default();
    let mut cfg = config(guest(), WORKLOAD, MEM, 1, capture.console());
    cfg.disks = vec![DiskConfig {
        allow_dirs: Vec::new(),
        path: disk.clone(),
        readonly: false,
        delay_ms: DELAY_MS,
    }];
    let vm = Vm::boot(cfg).unwrap();
    capture.wait_for("disk round=", 1, Duration::from_secs(60));
    (vm, capture, disk)
}

fn checkpoint(
    vm: &Vm,
    dir: &Path,
    strategy: Strategy,
    io: IoPolicy,
) -> (ckpt_format::Manifest, MachineState) {
    let manifest = vm
        .checkpoint(
            &CheckpointRequest {
                store: StoreSpec::Dir(dir.to_path_buf()),
                options: CheckpointOptions {
                    strategy,
                    io,
                    ..Default::default()
                },
                pause_probe: None,
                parent: None,
            },
            &Progress::default(),
        )
        .expect("checkpoint");
    let snapshot = Checkpoint::open(&DirStore::new(dir.to_path_buf()))
        .unwrap()
        .decode_state()
        .unwrap();
    (manifest, snapshot)
}

fn finish(vm: Vm, console: &Capture) -> String {
    let exit = vm
        .wait_timeout(Duration::from_secs(120))
        .expect("the guest must finish");
    assert_eq!(exit, VmExit::Guest(0), "console: {}", console.text());
    console.text()
}

/// M12: under `drain` the pause waits for pending requests, so none is recorded; under `live`
/// the VM resumes at once and the requests in flight are recorded (and re-issued by a restore,
/// M13: without the re-issue the restored guest would wait for them forever).
#[test]
fn drain_waits_live_records_and_restore_reissues() {
    let work = tempfile::tempdir().unwrap();
    let (vm, console, _) = boot(work.path());
    // Several drained instants, none with a request in flight (while live instants with
    // requests in flight are easy to find below).
    for i in 0..5 {
        let (_, snap) = checkpoint(
            &vm,
            &work.path().join(format!("drain{i}")),
            Strategy::Uffd,
            IoPolicy::Drain,
        );
        assert!(
            snap.devices.blocks[0].inflight.is_empty(),
            "{:?}",
            snap.devices.blocks[0].inflight
        );
    }
    // The guest also mixes memory between its disk phases: retry until the instant catches
    // requests in flight.
    let live_dir = (0..20)
        .map(|i| {
            let d = work.path().join(format!("live{i}"));
            let (_, s) = checkpoint(&vm, &d, Strategy::Uffd, IoPolicy::Live);
            (d, s)
        })
        .find(|(_, s)| !s.devices.blocks[0].inflight.is_empty())
        .map(|(d, _)| d)
        .expect("a delayed disk has requests in flight at some instant");
    let expected = finish(vm, &console);

    let restored_console = Capture::default();
    let restored = Vm::restore(
        &StoreSpec::Dir(live_dir),
        RestoreOptions {
            allow_dirs: vec![work.path().to_path_buf()],
            console: restored_console.console(),
            eager: false,
            disk_dir: Some(work.path().to_path_buf()),
        },
    )
    .unwrap();
    let rest = finish(restored, &restored_console);
    assert!(
        expected.ends_with(&rest),
        "restored: {rest}\nexpected: {expected}"
    );
    assert!(rest.contains("disk done"));
}

/// M15: a write pending at the instant lands in the parent image — the checkpoint's disk —
/// before the checkpoint is complete; writes issued after the instant go to the COW file only.
#[test]
fn pending_writes_reach_the_checkpoint_disk_and_new_writes_do_not() {
    let work = tempfile::tempdir().unwrap();
    let (vm, console, _) = boot(work.path());
    // Retry until the instant catches writes in flight (the workload alternates writes and reads).
    let (ckpt_dir, manifest, snap) = (0..20)
        .map(|i| {
            let d = work.path().join(format!("ckpt{i}"));
            let (m, s) = checkpoint(&vm, &d, Strategy::Fork, IoPolicy::Live);
            (d, m, s)
        })
        .find(|(_, _, s)| {
            s.devices.blocks[0]
                .inflight
                .iter()
                .any(|r| r.kind == RequestKind::Write)
        })
        .expect("some checkpoint catches writes in flight");
    let disk_path = &manifest.vm.disks[0].path;
    let ckpt = Checkpoint::open(&DirStore::new(ckpt_dir)).unwrap();
    let mut image = disk::Image::open_read_only(disk_path).unwrap();
    for req in snap.devices.blocks[0]
        .inflight
        .iter()
        .filter(|r| r.kind == RequestKind::Write)
    {
        let mut offset = req.sector * 512;
        for &(gpa, len) in &req.segments {
            // The bytes the guest asked to write, as they were in memory at the instant.
            let mut want = vec![0u8; len as usize];
            let first = gpa / 4096;
            let mut pages =
                vec![0u8; ((gpa + u64::from(len)).div_ceil(4096) - first) as usize * 4096];
            ckpt.read_pages(first, &mut pages).unwrap();
            want.copy_from_slice(&pages[(gpa % 4096) as usize..][..len as usize]);
            let mut got = vec![0u8; len as usize];
            image.read_at(offset, &mut got).unwrap();
            assert!(
                got == want,
                "write of sector {} is not in the checkpoint's disk",
                req.sector
            );
            offset += u64::from(len);
        }
    }
    let hash = |p: &Path| ckpt_format::checksum(&std::fs::read(p).unwrap());
    let before = hash(disk_path);
    finish(vm, &console);
    assert_eq!(
        hash(disk_path),
        before,
        "the checkpoint's disk changed after the checkpoint"
    );
}
