//! The harness itself: seeds then mutations run, a panic saves its input and names it.

use std::sync::atomic::{AtomicU64, Ordering};

#[test]
fn runs_seeds_then_mutations() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a"), b"first seed").unwrap();
    std::fs::write(dir.path().join("b"), b"second").unwrap();
    let seen_seed = AtomicU64::new(0);
    let report = fuzzkit::run("harness-ok", dir.path(), |data| {
        if data == b"first seed" || data == b"second" {
            seen_seed.fetch_add(1, Ordering::Relaxed);
        }
    });
    assert_eq!(report.seeds, 2);
    assert!(seen_seed.load(Ordering::Relaxed) >= 2);
    assert!(report.iterations > 2, "{report}");
}

#[test]
fn a_panic_saves_the_input_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("seed"), b"boom").unwrap();
    let outcome = std::panic::catch_unwind(|| {
        fuzzkit::run("harness-crash", dir.path(), |data| {
            assert!(!data.starts_with(b"boom"), "found the bug");
        })
    });
    let payload = outcome.expect_err("the target panicked");
    let message = payload.downcast_ref::<String>().unwrap();
    assert!(message.contains("found the bug"), "{message}");
    let path = message.rsplit("input saved to ").next().unwrap();
    assert_eq!(std::fs::read(path).unwrap(), b"boom");
    assert!(path.contains("fuzz-crashes/harness-crash/crash-"), "{path}");
    std::fs::remove_file(path).unwrap();
}
