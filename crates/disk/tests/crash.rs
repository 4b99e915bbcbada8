//! Crash safety: a child process writes and flushes in a loop and is killed with SIGKILL at a
//! random moment. Afterwards `qemu-img check` finds no corruption (leaks are allowed) and every
//! write the child saw flushed is present.
//!
//! The child is this test binary re-executed with `DISK_CRASH_CHILD` set, running the
//! `crash_child` test, which does nothing in a normal run.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use disk::{create_qcow2, CreateOptions, Extent, Format, Image, OpenOptions};

const CHILD_ENV: &str = "DISK_CRASH_CHILD";
const SIZE: u64 = 4 << 20;

/// Write number `i` of the child's deterministic sequence.
fn write_op(seed: u64, i: u64, cluster: u64) -> (u64, Vec<u8>) {
    let mut rng = Rng(seed ^ i.wrapping_mul(0x9e37_79b9));
    let len = 1 + rng.below(3 * cluster);
    let off = rng.below(SIZE - len);
    let mut data = vec![0u8; len as usize];
    rng.fill(&mut data);
    (off, data)
}

/// Entry point of the child process.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let path = Path::new(parts[0]);
    let seed: u64 = parts[1].parse().unwrap();
    let ordered_sync = parts[2] == "1";
    let mut img = Image::open_with(
        path,
        &OpenOptions {
            ordered_sync,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let cs = img.cluster_size();
    let mut out = std::io::stdout().lock();
    for i in 0.. {
        let (off, data) = write_op(seed, i, cs);
        if i % 3 == 0 {
            // The asynchronous path: prepare (allocate + copy up), then write the extents.
            let mut at = 0usize;
            for e in img.prepare_write(off, data.len() as u64).unwrap() {
                let Extent::Data {
                    file,
                    file_offset,
                    len,
                } = e
                else {
                    panic!("zero extent from prepare_write");
                };
                std::os::unix::fs::FileExt::write_all_at(
                    &*file,
                    &data[at..at + len as usize],
                    file_offset,
                )
                .unwrap();
                at += len as usize;
            }
        } else {
            img.write_at(off, &data).unwrap();
        }
        img.flush().unwrap();
        writeln!(out, "flushed {i}").unwrap();
        out.flush().unwrap();
    }
}

fn one_crash(dir: &Path, round: u64, bits: u32, ordered_sync: bool, delay_ms: u64) {
    let base = dir.join(format!("base{round}.raw"));
    let mut rng = Rng(round + 1000);
    let mut model = vec![0u8; SIZE as usize];
    rng.fill(&mut model);
    std::fs::write(&base, &model).unwrap();
    let top = dir.join(format!("top{round}.qcow2"));
    create_qcow2(
        &top,
        &CreateOptions {
            backing: Some((&base, Format::Raw)),
            cluster_bits: bits,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let seed = 0xc0ffee + round;

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(
            CHILD_ENV,
            format!("{}|{seed}|{}", top.display(), u8::from(ordered_sync)),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let last = Arc::new(Mutex::new(None::<u64>));
    let reader = {
        let last = Arc::clone(&last);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("flushed ") {
                    *last.lock().unwrap() = Some(n.parse().unwrap());
                }
            }
        })
    };
    // Let it get going, then kill it at a random moment.
    let start = Instant::now();
    while last.lock().unwrap().is_none_or(|n| n < 3) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "child made no progress"
        );
        assert!(child.try_wait().unwrap().is_none(), "child exited early");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(delay_ms));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    let flushed = last.lock().unwrap().expect("some writes were flushed");

    let report = assert_not_corrupt(&top);
    let cs = 1u64 << bits;
    for i in 0..=flushed {
        let (off, data) = write_op(seed, i, cs);
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    // Write `flushed + 1` may have landed in full, in part or not at all.
    let (next_off, next_data) = write_op(seed, flushed + 1, cs);
    let mut img = Image::open_read_only(&top).unwrap();
    let actual = our_content(&mut img);
    for (b, (&got, &want)) in actual.iter().zip(&model).enumerate() {
        if got != want {
            let b = b as u64;
            let in_next = b >= next_off && b < next_off + next_data.len() as u64;
            assert!(
                in_next && got == next_data[(b - next_off) as usize],
                "round {round}: byte {b:#x} is {got:#x}, flushed content is {want:#x} \
                 (after {flushed} flushed writes)"
            );
        }
    }
    assert_eq!(
        qemu_content(&top, dir),
        actual,
        "round {round}: QEMU sees other bytes"
    );
    // The image stays usable: reopen writable, write, and check again.
    drop(img);
    let mut img = Image::open(&top).unwrap();
    img.write_at(12345, &[1u8; 70_000]).unwrap();
    img.flush().unwrap();
    drop(img);
    assert_not_corrupt(&top);
    eprintln!(
        "round {round}: cluster {cs}, ordered_sync {ordered_sync}, killed after {flushed} \
         flushed writes, check: leaks {}",
        report.get("leaks").cloned().unwrap_or_default()
    );
}

#[test]
fn sigkill_during_writes_leaves_consistent_image_with_flushed_data() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64);
    let configs = [
        (9, false),
        (12, false),
        (16, false),
        (9, true),
        (16, true),
        (12, false),
    ];
    for (round, &(bits, ordered_sync)) in configs.iter().enumerate() {
        let delay = rng.below(250);
        one_crash(dir.path(), round as u64, bits, ordered_sync, delay);
    }
}
