//! Fuzzing the checkpoint readers: the manifest, the device-state section, the page index, and
//! whole directory stores with one mutated file (see the `fuzzkit` crate for the knobs:
//! `COWVM_FUZZ_SECS=3600 cargo test --release -p ckpt-format --test fuzz`).
//!
//! Any `Err` is fine; a panic, a hang or an allocation that brings the process down is a bug.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ckpt_format::{
    checksum, decode_state, encode_state, Checkpoint, CheckpointWriter, Checksum, DirStore, Layout,
    Manifest, PageEntry, PageIndex, PageState, Section, VmConfig, PAGE_SIZE,
};
use serde::{Deserialize, Serialize};

const PAGES: u64 = 8;
const PAGE: u64 = PAGE_SIZE as u64;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// A device state shaped like the VMM's: nested structs, sequences, maps, options, enums with
/// data, byte arrays and defaulted fields, so the decoder's every path is taken.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct MachineState {
    vm: VmPart,
    vcpus: Vec<VcpuPart>,
    #[serde(default)]
    devices: Vec<DevicePart>,
    #[serde(default)]
    notes: BTreeMap<String, u64>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct VmPart {
    clock: u64,
    irqchip: Vec<u8>,
    pit: Option<[u32; 4]>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct VcpuPart {
    id: u32,
    regs: [u64; 18],
    msrs: Vec<(u32, u64)>,
    halted: bool,
    #[serde(default)]
    xsave: Vec<u8>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
enum DevicePart {
    Serial {
        lsr: u8,
        buffered: String,
    },
    Block {
        queues: Vec<(u16, u16, u64)>,
        delay_ms: Option<u32>,
    },
    Rtc(i64),
    None,
}

fn sample_state() -> MachineState {
    MachineState {
        vm: VmPart {
            clock: 123_456_789,
            irqchip: (0..40).collect(),
            pit: Some([1, 2, 3, 0xffff_ffff]),
        },
        vcpus: (0..2)
            .map(|id| VcpuPart {
                id,
                regs: [u64::from(id) << 40; 18],
                msrs: vec![(0x10, 99), (0xc000_0080, 0x500)],
                halted: id == 1,
                xsave: vec![0xaa; 64],
            })
            .collect(),
        devices: vec![
            DevicePart::Serial {
                lsr: 0x60,
                buffered: "login: ".into(),
            },
            DevicePart::Block {
                queues: vec![(256, 3, 0x1000)],
                delay_ms: None,
            },
            DevicePart::Rtc(-5),
            DevicePart::None,
        ],
        notes: BTreeMap::from([("a".into(), 1), ("bb".into(), u64::MAX)]),
    }
}

fn page_content(i: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    if i % 3 != 0 {
        for (k, b) in p.iter_mut().enumerate() {
            *b = (k as u64 * 31 + i * 7) as u8;
        }
    }
    p
}

/// A complete small checkpoint in `dir`.
fn make_checkpoint(dir: &Path) {
    let store = DirStore::new(dir);
    let mut w = CheckpointWriter::create(
        &store,
        &Layout {
            mem_size: PAGES * PAGE,
        },
    )
    .unwrap();
    for i in 0..PAGES {
        w.memory().write_page(i, &page_content(i)).unwrap();
    }
    w.write_state(&encode_state(&sample_state()).unwrap())
        .unwrap();
    w.set_vm_config(VmConfig {
        mem_size: PAGES * PAGE,
        vcpus: 2,
        ..VmConfig::default()
    });
    w.set_created_unix_ms(1_700_000_000_000);
    w.finish().unwrap();
}

/// The files of a directory store, in the order a store input's first byte selects them.
const FILES: [&str; 5] = [
    "manifest.json",
    "state.bin",
    "page-index.bin",
    "COMPLETE",
    "memory.img",
];

#[test]
fn fuzz_manifest() {
    let report = fuzzkit::run("manifest", corpus("manifest"), |data| {
        if let Ok(m) = Manifest::from_json(data) {
            let _ = m.section(Section::State);
            let json = m.to_json().expect("a parsed manifest serializes");
            let again = Manifest::from_json(&json).expect("a written manifest parses");
            assert_eq!(again, m, "manifest round trip");
        }
    });
    assert!(report.iterations > 0);
}

#[test]
fn fuzz_state() {
    let report = fuzzkit::run("state", corpus("state"), |data| {
        if let Ok(state) = decode_state::<MachineState>(data) {
            let bytes = encode_state(&state).expect("a decoded state encodes");
            let again: MachineState = decode_state(&bytes).expect("an encoded state decodes");
            assert_eq!(again, state, "state round trip");
        }
        let _ = decode_state::<ciborium::Value>(data);
        let _ = decode_state::<Vec<DevicePart>>(data);
    });
    assert!(report.iterations > 0);
}

#[test]
fn fuzz_page_index() {
    let report = fuzzkit::run("page-index", corpus("page-index"), |data| {
        // The page count the header claims, so that decoding gets past that check.
        let claimed = data
            .get(16..24)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        for expected in [claimed, PAGES] {
            let Ok(index) = PageIndex::decode(data, expected) else {
                continue;
            };
            assert_eq!(index.pages(), expected);
            let zero_in_runs: u64 = index.zero_runs().map(|r| r.end - r.start).sum();
            assert_eq!(zero_in_runs, index.zero_pages());
            for page in 0..index.pages().min(4096) {
                index.entry(page).expect("every page has an entry");
            }
            assert!(index.entry(index.pages()).is_none());
            let again = PageIndex::decode(&index.encode(), expected).expect("round trip");
            assert_eq!(again, index);
        }
    });
    assert!(report.iterations > 0);
}

/// Rebuilds what a forger would after changing one file: the page index from the memory
/// image, the manifest's lengths and checksums, the completion marker. (A checksum is not an
/// authenticator: the reader must survive whatever passes it.)
fn forge_checksums(dir: &Path, changed: usize) {
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap_or_default();
    let manifest_bytes = read("manifest.json");
    if FILES[changed] == "memory.img" {
        let memory = read("memory.img");
        let entries = (0..PAGES).map(|i| {
            let mut page = [0u8; PAGE_SIZE];
            let from = (i * PAGE) as usize;
            if from < memory.len() {
                let n = (memory.len() - from).min(PAGE_SIZE);
                page[..n].copy_from_slice(&memory[from..from + n]);
            }
            PageEntry {
                state: if page.iter().all(|&b| b == 0) {
                    PageState::Zero
                } else {
                    PageState::Present
                },
                hash: checksum(&page),
            }
        });
        std::fs::write(
            dir.join("page-index.bin"),
            PageIndex::from_entries(entries).encode(),
        )
        .unwrap();
    }
    let manifest_bytes = match (FILES[changed], Manifest::from_json(&manifest_bytes)) {
        ("manifest.json", _) | (_, Err(_)) => manifest_bytes,
        (_, Ok(mut m)) => {
            for entry in &mut m.sections {
                if let Some(file) = entry.file.clone().filter(|_| entry.name != "memory") {
                    let bytes = read(&file);
                    entry.length = bytes.len() as u64;
                    entry.checksum = Some(Checksum(checksum(&bytes)));
                }
            }
            let bytes = m.to_json().unwrap();
            std::fs::write(dir.join("manifest.json"), &bytes).unwrap();
            bytes
        }
    };
    if FILES[changed] != "COMPLETE" {
        let marker = format!(
            "cowvm-checkpoint complete\nmanifest manifest.json\nlength {}\nchecksum {}\n",
            manifest_bytes.len(),
            Checksum(checksum(&manifest_bytes))
        );
        std::fs::write(dir.join("COMPLETE"), marker).unwrap();
    }
}

/// Opens the checkpoint in `dir` and uses everything a restore or `inspect` would.
fn exercise_store(dir: &Path) {
    let store = DirStore::new(dir);
    let Ok(ckpt) = Checkpoint::open(&store) else {
        return;
    };
    let _ = ckpt.decode_state::<MachineState>();
    let _ = ckpt.memory_source();
    let pages = ckpt.pages();
    let _ = ckpt.verify_memory(2, &|_| {});
    let mut buf = [0u8; PAGE_SIZE];
    for page in 0..pages.min(64) {
        if ckpt.read_page(page, &mut buf).is_ok() {
            let _ = ckpt.verify_page(page, &buf);
        }
    }
    let mut run = vec![0u8; (pages.min(16) * PAGE) as usize];
    let _ = ckpt.read_pages(0, &mut run);
    let _ = ckpt.read_pages(pages.saturating_sub(1), &mut run);
    let deferred = Checkpoint::open_deferred(&store);
    if let Ok(d) = deferred {
        let _ = d.page_index();
    }
}

/// A store input: one byte choosing the file (low bits) and whether to forge the checksums
/// around it (high bit), then that file's new content.
#[test]
fn fuzz_dir_store() {
    // Not /dev/shm: directory stores refuse anything under /dev.
    let root = tempfile::tempdir().unwrap();
    let template = root.path().join("template");
    make_checkpoint(&template);
    let files: Vec<Vec<u8>> = FILES
        .iter()
        .map(|f| std::fs::read(template.join(f)).unwrap())
        .collect();
    let dir = root.path().join("ckpt");
    std::fs::create_dir(&dir).unwrap();
    let report = fuzzkit::run("dir-store", corpus("dir-store"), |data| {
        let Some((&selector, content)) = data.split_first() else {
            return;
        };
        let changed = usize::from(selector & 0x7f) % FILES.len();
        for (name, bytes) in FILES.iter().zip(&files) {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        std::fs::write(dir.join(FILES[changed]), content).unwrap();
        if selector & 0x80 != 0 {
            forge_checksums(&dir, changed);
        }
        exercise_store(&dir);
    });
    assert!(report.iterations > 0);
}

/// Writes the seed corpora from a checkpoint made here. Run by hand when a format changes:
/// `cargo test --release -p ckpt-format --test fuzz -- --ignored`.
#[test]
#[ignore = "regenerates the committed seed corpora"]
fn regenerate_corpora() {
    let root = tempfile::tempdir().unwrap();
    make_checkpoint(root.path());
    let read = |name: &str| std::fs::read(root.path().join(name)).unwrap();
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    write("manifest", "checkpoint", &read("manifest.json"));
    write("state", "machine", &read("state.bin"));
    write(
        "state",
        "devices",
        &encode_state(&sample_state().devices).unwrap(),
    );
    write("page-index", "checkpoint", &read("page-index.bin"));
    for (i, name) in FILES.iter().enumerate() {
        for forge in [0u8, 0x80] {
            let mut input = vec![i as u8 | forge];
            input.extend(read(name));
            write("dir-store", &format!("{name}-{forge:x}"), &input);
        }
    }
}
