//! Pause and resume a running guest on /dev/kvm: memory must freeze while paused and the guest
//! must go on afterwards.

mod common;

use std::time::Duration;

use common::*;

fn last_pass(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("dirty pass="))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

fn pause_freezes_memory(vcpus: u8) {
    let (vm, console) = boot_guest("dirty mem=32M every=20", 128 << 20, vcpus);
    console.wait_for("dirty pass=", 3, Duration::from_secs(30));
    for _ in 0..3 {
        let guard = vm.pause().expect("pause");
        assert!(vm.is_paused());
        let before = hash_memory(vm.memory());
        let pass_before = last_pass(&console.text());
        std::thread::sleep(Duration::from_millis(100));
        let after = hash_memory(vm.memory());
        assert_eq!(before, after, "guest memory changed while paused");
        assert_eq!(
            last_pass(&console.text()),
            pass_before,
            "guest printed while paused"
        );
        guard.resume();
        assert!(!vm.is_paused());
        console.wait_for(
            "dirty pass=",
            console.text().matches("dirty pass=").count() + 2,
            Duration::from_secs(30),
        );
        let guard = vm.pause().expect("pause");
        assert_ne!(
            hash_memory(vm.memory()),
            after,
            "guest did not run after resume"
        );
        drop(guard);
    }
    assert!(
        vm.exit_status().is_none(),
        "guest stopped: {:?}",
        vm.exit_status()
    );
    vm.stop();
}

#[test]
fn pause_freezes_memory_with_one_vcpu() {
    pause_freezes_memory(1);
}

#[test]
fn pause_freezes_memory_with_two_vcpus() {
    pause_freezes_memory(2);
}

#[test]
fn a_second_pause_is_refused_and_the_guard_resumes() {
    let (vm, console) = boot_guest("dirty mem=8M every=50", 64 << 20, 1);
    console.wait_for("dirty pass=", 1, Duration::from_secs(30));
    {
        let _guard = vm.pause().unwrap();
        assert!(vm.pause().is_err());
    }
    assert!(!vm.is_paused());
    let seen = console.text().matches("dirty pass=").count();
    console.wait_for("dirty pass=", seen + 1, Duration::from_secs(30));
}
