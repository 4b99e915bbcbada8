//! Boots real guests on /dev/kvm: our PVH test guest and hand-made PVH ELFs.

mod common;

use std::time::Duration;

use common::*;
use vmm::{Vm, VmError, VmExit};

const MEM: u64 = 128 << 20;

#[test]
fn hello_prints_its_greeting_and_exits_zero() {
    let (vm, console) = boot_guest("hello", MEM, 1);
    assert_eq!(vm.wait(), VmExit::Guest(0));
    assert!(
        console.text().contains("Hello from the cowvm test guest!"),
        "console: {}",
        console.text()
    );
}

#[test]
fn compute_is_deterministic() {
    let run = || {
        let (vm, console) = boot_guest("compute mem=8M rounds=3 seed=7", MEM, 1);
        assert_eq!(vm.wait(), VmExit::Guest(0));
        console.text()
    };
    let (a, b) = (run(), run());
    assert!(a.contains("compute checksum="), "console: {a}");
    assert_eq!(a, b);
    let (vm, console) = boot_guest("compute mem=8M rounds=3 seed=8", MEM, 1);
    assert_eq!(vm.wait(), VmExit::Guest(0));
    assert_ne!(
        console.text(),
        a,
        "a different seed must give a different checksum"
    );
}

#[test]
fn dirty_runs_its_passes_and_reports_a_checksum() {
    let (vm, console) = boot_guest("dirty mem=16M passes=20 every=5", MEM, 2);
    assert_eq!(vm.wait(), VmExit::Guest(0));
    let text = console.text();
    assert_eq!(text.matches("dirty pass=").count(), 4, "console: {text}");
    assert!(
        text.contains("dirty done passes=20 checksum="),
        "console: {text}"
    );
}

#[test]
fn a_bad_command_line_is_the_guests_status_2() {
    let (vm, console) = boot_guest("no-such-workload", MEM, 1);
    assert_eq!(vm.wait(), VmExit::Guest(2));
    assert!(
        console.text().contains("bad command line"),
        "console: {}",
        console.text()
    );
}

#[test]
fn a_foreign_pvh_elf_boots() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = tiny_pvh_elf(
        dir.path(),
        "foreign",
        0x20_0000,
        FOREIGN_PVH_CODE,
        FOREIGN_PVH_MESSAGE,
    );
    let console = Capture::default();
    let vm = Vm::boot(config(&kernel, "", 64 << 20, 1, console.console())).unwrap();
    assert_eq!(vm.wait(), VmExit::Guest(42), "console: {}", console.text());
    assert_eq!(console.text().as_bytes(), FOREIGN_PVH_MESSAGE);
}

#[test]
fn a_triple_fault_is_reported_with_registers() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = tiny_pvh_elf(dir.path(), "triple", 0x20_0000, TRIPLE_FAULT_CODE, &[0; 8]);
    let vm = Vm::boot(config(
        &kernel,
        "",
        64 << 20,
        1,
        Capture::default().console(),
    ))
    .unwrap();
    let exit = vm
        .wait_timeout(Duration::from_secs(20))
        .expect("the VM must stop, not hang");
    match &exit {
        VmExit::TripleFault { vcpu: 0, registers } => {
            assert!(registers.contains("rip=0x20000"), "{registers}");
        }
        other => panic!("expected a triple fault, got {other:?}"),
    }
    assert_ne!(exit.status(), 0);
}

#[test]
fn bad_input_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let err = |cfg| Vm::boot(cfg).expect_err("must fail").to_string();

    let missing = dir.path().join("missing");
    let msg = err(config(&missing, "", MEM, 1, Capture::default().console()));
    assert!(
        msg.contains("cannot read kernel") && msg.contains("missing"),
        "{msg}"
    );

    let text = dir.path().join("text");
    std::fs::write(&text, "not a kernel at all").unwrap();
    let msg = err(config(&text, "", MEM, 1, Capture::default().console()));
    assert!(msg.contains("not an ELF file nor a Linux bzImage"), "{msg}");

    let msg = err(config(
        guest(),
        "hello",
        1 << 20,
        1,
        Capture::default().console(),
    ));
    assert!(msg.contains("out of range"), "{msg}");

    let msg = err(config(
        guest(),
        "hello",
        MEM,
        0,
        Capture::default().console(),
    ));
    assert!(msg.contains("invalid vCPU count"), "{msg}");
    assert!(matches!(
        Vm::boot(config(
            guest(),
            "hello",
            MEM,
            0,
            Capture::default().console()
        )),
        Err(VmError::VcpuCount(0))
    ));
}

#[test]
fn a_guest_exception_is_reported_and_fails_the_run() {
    for (kind, name) in [("ud", "#UD"), ("pf", "#PF"), ("gp", "#GP"), ("de", "#DE")] {
        let (vm, console) = boot_guest(&format!("fault kind={kind}"), MEM, 1);
        let exit = vm
            .wait_timeout(Duration::from_secs(20))
            .expect("the VM must stop, not hang");
        assert_eq!(exit, VmExit::Guest(3), "{kind}: console {}", console.text());
        assert_ne!(exit.status(), 0);
        let text = console.text();
        assert!(
            text.contains(&format!("cowvm-guest: exception {name}")),
            "{kind}: console {text}"
        );
    }
}
