//! Helpers shared by the integration tests: console capture, guest memory hashing, and tiny
//! hand-assembled PVH ELF images.

#![allow(dead_code)]

use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm::{Console, HugePages, Vm, VmConfig};

/// A console that tests can read while the VM runs.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    pub fn console(&self) -> Console {
        Console::Writer(Box::new(self.clone()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits until the console holds `needle` `count` times, or panics after `timeout`.
    pub fn wait_for(&self, needle: &str, count: usize, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let text = self.text();
            if text.matches(needle).count() >= count {
                return text;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {count} x {needle:?}; console so far:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn guest() -> &'static Path {
    guests::pvh_guest()
}

pub fn config(kernel: &Path, cmdline: &str, mem: u64, vcpus: u8, console: Console) -> VmConfig {
    VmConfig {
        mem_size: mem,
        vcpus,
        hugepages: HugePages::None,
        kernel: kernel.to_path_buf(),
        initrd: None,
        cmdline: cmdline.to_string(),
        console,
        disks: Vec::new(),
    }
}

/// Boots the test guest with `cmdline` and returns the VM and its console.
pub fn boot_guest(cmdline: &str, mem: u64, vcpus: u8) -> (Vm, Capture) {
    let capture = Capture::default();
    let vm = Vm::boot(config(guest(), cmdline, mem, vcpus, capture.console())).expect("boot");
    (vm, capture)
}

/// A hash of all guest RAM, read through the VMM's own mapping.
pub fn hash_memory(mem: &GuestMemoryMmap) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for region in mem.iter() {
        let (start, len) = (region.start_addr().0, region.len());
        let mut off = 0;
        while off < len {
            let n = buf.len().min((len - off) as usize);
            mem.read_slice(&mut buf[..n], GuestAddress(start + off))
                .unwrap();
            h.write(&buf[..n]);
            off += n as u64;
        }
    }
    h.finish()
}

/// Builds a minimal ELF64 PVH kernel: one PT_LOAD of `code` at `load` (entry there), `data` at
/// `load + 0x100`, and a PT_NOTE with the Xen PHYS32_ENTRY note. Written to `dir/name`.
pub fn tiny_pvh_elf(dir: &Path, name: &str, load: u64, code: &[u8], data: &[u8]) -> PathBuf {
    assert!(code.len() <= 0x100);
    let mut image = vec![0u8; 0x100 + data.len()];
    image[..code.len()].copy_from_slice(code);
    image[0x100..].copy_from_slice(data);

    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(load as u32).to_le_bytes());

    let phoff = 64u64;
    let note_off = phoff + 2 * 56;
    let load_off = 0x1000u64;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&load.to_le_bytes()); // e_entry
    f.extend_from_slice(&phoff.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    let phdr =
        |f: &mut Vec<u8>, ty: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
            f.extend_from_slice(&ty.to_le_bytes());
            f.extend_from_slice(&flags.to_le_bytes());
            f.extend_from_slice(&off.to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes()); // vaddr
            f.extend_from_slice(&addr.to_le_bytes()); // paddr
            f.extend_from_slice(&size.to_le_bytes()); // filesz
            f.extend_from_slice(&size.to_le_bytes()); // memsz
            f.extend_from_slice(&align.to_le_bytes());
        };
    phdr(&mut f, 1, 7, load_off, load, image.len() as u64, 0x1000);
    phdr(&mut f, 4, 4, note_off, 0, note.len() as u64, 4);
    f.extend_from_slice(&note);
    f.resize(load_off as usize, 0);
    f.extend_from_slice(&image);
    let path = dir.join(name);
    std::fs::write(&path, f).unwrap();
    path
}

/// 32-bit code: checks the `hvm_start_info` magic and memory map in EBX, writes the 29-byte
/// message at 0x200100 to COM1 with one `rep outsb`, then writes 42 to the debug-exit port
/// (7 if the start info is wrong).
pub const FOREIGN_PVH_CODE: &[u8] = &[
    0x8b, 0x03, // mov (%ebx),%eax
    0x3d, 0x78, 0xc5, 0x6e, 0x33, // cmp $0x336ec578,%eax
    0x75, 0x24, // jne fail
    0x8b, 0x43, 0x30, // mov 0x30(%ebx),%eax   (memmap_entries)
    0x85, 0xc0, // test %eax,%eax
    0x74, 0x1d, // je fail
    0xbe, 0x00, 0x01, 0x20, 0x00, // mov $0x200100,%esi
    0xb9, 0x1d, 0x00, 0x00, 0x00, // mov $29,%ecx
    0x66, 0xba, 0xf8, 0x03, // mov $0x3f8,%dx
    0xf3, 0x6e, // rep outsb
    0x66, 0xba, 0xf4, 0x00, // mov $0xf4,%dx
    0xb8, 0x2a, 0x00, 0x00, 0x00, // mov $42,%eax
    0xef, // out %eax,(%dx)
    0xf4, // hlt
    0xeb, 0xfd, // jmp hlt
    0x66, 0xba, 0xf4, 0x00, // fail: mov $0xf4,%dx
    0xb8, 0x07, 0x00, 0x00, 0x00, // mov $7,%eax
    0xef, // out %eax,(%dx)
    0xeb, 0xf1, // jmp hlt
];

/// The message `FOREIGN_PVH_CODE` prints.
pub const FOREIGN_PVH_MESSAGE: &[u8; 29] = b"hello from a foreign PVH ELF\n";

/// 32-bit code that loads an empty IDT and raises #UD: the CPU cannot deliver it and shuts down.
pub const TRIPLE_FAULT_CODE: &[u8] = &[
    0x0f, 0x01, 0x1d, 0x00, 0x01, 0x20, 0x00, // lidt 0x200100 (limit 0, base 0)
    0x0f, 0x0b, // ud2
];

/// Waits for the guest to end; a guest still running after `limit` fails the test with what
/// tells a hang from a slow machine: the console's tail, whether the vCPUs still exit to the
/// VMM, where they are, and the disks' in-flight requests.
pub fn wait_or_explain(vm: &Vm, console: &Capture, limit: Duration) -> vmm::VmExit {
    if let Some(exit) = vm.wait_timeout(limit) {
        return exit;
    }
    let before = vm.exit_counts();
    std::thread::sleep(Duration::from_secs(1));
    let after = vm.exit_counts();
    let mut report = format!(
        "the guest did not finish within {limit:?}\nexits: {before:?} then, a second later, {after:?}\n"
    );
    match vm.pause() {
        Ok(pause) => {
            for (i, vcpu) in pause.vcpus().enumerate() {
                match (vcpu.get_regs(), vcpu.get_sregs()) {
                    (Ok(r), Ok(s)) => report.push_str(&format!(
                        "vCPU {i}: rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} cs={:#x} cr2={:#x}\n",
                        r.rip, r.rsp, r.rflags, r.rax, s.cs.selector, s.cr2
                    )),
                    (r, s) => report.push_str(&format!("vCPU {i}: {r:?} {s:?}\n")),
                }
            }
        }
        Err(e) => report.push_str(&format!("cannot pause: {e}\n")),
    }
    for disk in vm.disks() {
        report.push_str(&format!(
            "disk {}: in flight {:?}\n",
            disk.index(),
            disk.inflight()
        ));
    }
    let text = console.text();
    let tail = text.get(text.len().saturating_sub(2000)..).unwrap_or(&text);
    panic!("{report}console tail:\n{tail}");
}

/// A fresh zeroed raw disk of `size` bytes in `dir`.
pub fn new_raw_disk(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(size))
        .unwrap();
    path
}

/// Boots the test guest running `cmdline` with `mem` bytes and one vCPU on `disk` (requests
/// delayed 1 ms, so that some are in flight at any instant).
pub fn boot_with_disk(cmdline: &str, mem: u64, disk: &Path) -> (Vm, Capture) {
    let capture = Capture::default();
    let mut cfg = config(guest(), cmdline, mem, 1, capture.console());
    cfg.disks = vec![vmm::DiskConfig {
        allow_dirs: Vec::new(),
        path: disk.to_path_buf(),
        readonly: false,
        delay_ms: 1,
    }];
    (Vm::boot(cfg).expect("boot"), capture)
}

/// The whole guest-visible content of the disk image `top` (and its chain).
pub fn disk_content(top: &Path) -> Vec<u8> {
    // A restored disk's COW file lies in a directory beside the checkpoint's disk: allow the
    // test's whole work directory for its backing files.
    let work = top.parent().and_then(Path::parent).unwrap();
    let opts = disk::OpenOptions {
        read_only: true,
        backing_policy: disk::PathPolicy::same_dir().allow_dir(work),
        ..disk::OpenOptions::default()
    };
    let mut image = disk::Image::open_with(top, &opts).unwrap();
    let mut out = vec![0; image.size() as usize];
    image.read_at(0, &mut out).unwrap();
    out
}

/// Runs the VM to its end (within `limit`), which must be the guest's status 0; returns its
/// console and the final content of its disk.
pub fn run_to_end(vm: Vm, console: &Capture, limit: Duration) -> (String, Vec<u8>) {
    let exit = wait_or_explain(&vm, console, limit);
    assert_eq!(exit, vmm::VmExit::Guest(0), "console: {}", console.text());
    let top = vm.disks()[0].image_info().unwrap().path;
    drop(vm);
    (console.text(), disk_content(&top))
}

/// Rewrites the manifest of the checkpoint in `dir` with `edit`, and its completion marker to
/// match (a checkpoint that is well formed but says something else).
pub fn rewrite_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut manifest);
    let bytes = serde_json::to_vec_pretty(&manifest).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let marker = std::fs::read_to_string(dir.join("COMPLETE")).unwrap();
    let rewritten: Vec<String> = marker
        .lines()
        .map(|l| {
            if l.starts_with("length ") {
                format!("length {}", bytes.len())
            } else if l.starts_with("checksum ") {
                format!("checksum {}", ckpt_format::Checksum::of(&bytes))
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(dir.join("COMPLETE"), rewritten.join("\n") + "\n").unwrap();
}
