//! The virtio-blk device driven directly from the test: descriptor chains built in guest
//! memory through the VMM's own mapping, registers and QueueNotify written through the MMIO
//! bus. Malformed chains on a running VM (real KVM); M14, drain, save/restore and commit on
//! real images and io_uring.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::testing::Bus;
use vmm::testing::{mmio_base, DmaObserver};
use vmm::testing::{reg, status as dev_status};
use vmm::testing::{BlockState, DiskArgs, DiskSet, Persist, RequestKind};
use vmm::{commit_and_rebase, DiskConfig};
use vmm::{Vm, VmConfig};

const RINGS: u64 = 0x800_0000;
const QSIZE: u16 = 16;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// A minimal virtio-blk driver living in guest memory at `RINGS`.
struct Driver<'a> {
    bus: &'a Bus,
    mem: &'a GuestMemoryMmap,
    base: u64,
    avail_idx: u16,
}

impl<'a> Driver<'a> {
    fn desc(&self) -> u64 {
        RINGS
    }
    fn avail(&self) -> u64 {
        RINGS + 0x1000
    }
    fn used(&self) -> u64 {
        RINGS + 0x2000
    }
    /// Header of slot s.
    fn hdr(s: u64) -> u64 {
        RINGS + 0x3000 + s * 32
    }
    /// Status byte of slot s.
    fn st(s: u64) -> u64 {
        RINGS + 0x3000 + s * 32 + 16
    }
    /// 64 KiB data buffer of slot s.
    fn data(s: u64) -> u64 {
        RINGS + 0x10000 + s * 0x10000
    }

    fn w(&self, off: u64, v: u32) {
        self.bus.write(self.base + off, &v.to_le_bytes());
    }
    fn r(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.bus.read(self.base + off, &mut b);
        u32::from_le_bytes(b)
    }

    fn new(bus: &'a Bus, mem: &'a GuestMemoryMmap, index: usize) -> Self {
        let d = Driver {
            bus,
            mem,
            base: mmio_base(index),
            avail_idx: 0,
        };
        d.init();
        d
    }

    fn init(&self) {
        assert_eq!(self.r(reg::MAGIC), 0x7472_6976);
        assert_eq!(self.r(reg::VERSION), 2);
        assert_eq!(self.r(reg::DEVICE_ID), 2);
        self.mem
            .write_slice(&[0u8; 0x3000], GuestAddress(RINGS))
            .unwrap();
        self.w(reg::STATUS, 0);
        self.w(reg::STATUS, 1);
        self.w(reg::STATUS, 3);
        self.w(reg::DRIVER_FEATURES_SEL, 1);
        self.w(reg::DRIVER_FEATURES, 1); // VERSION_1
        self.w(reg::DRIVER_FEATURES_SEL, 0);
        self.w(reg::DEVICE_FEATURES_SEL, 0);
        let dev = self.r(reg::DEVICE_FEATURES);
        self.w(reg::DRIVER_FEATURES, dev & (1 << 9 | 1 << 5));
        self.w(reg::STATUS, 0xb);
        assert_eq!(self.r(reg::STATUS) & 8, 8, "FEATURES_OK accepted");
        self.w(reg::QUEUE_SEL, 0);
        assert!(self.r(reg::QUEUE_NUM_MAX) >= u32::from(QSIZE));
        self.w(reg::QUEUE_NUM, u32::from(QSIZE));
        self.w(reg::QUEUE_DESC_LOW, self.desc() as u32);
        self.w(reg::QUEUE_DRIVER_LOW, self.avail() as u32);
        self.w(reg::QUEUE_DEVICE_LOW, self.used() as u32);
        self.w(reg::QUEUE_READY, 1);
        self.w(reg::STATUS, 0xf);
        assert_eq!(self.r(reg::STATUS), 0xf);
    }

    fn put_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc() + u64::from(i) * 16;
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&b, GuestAddress(at)).unwrap();
    }

    /// Offers the chain at `head` and notifies.
    fn offer(&mut self, head: u16) {
        let slot = self.avail() + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail() + 2))
            .unwrap();
        self.w(reg::QUEUE_NOTIFY, 0);
    }

    /// A standard 3-descriptor request in slot `s` (descriptors 3s..3s+2).
    fn request(&mut self, s: u16, kind: u32, sector: u64, len: u32) -> u16 {
        let s64 = u64::from(s);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem
            .write_slice(&h, GuestAddress(Self::hdr(s64)))
            .unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(Self::st(s64)))
            .unwrap();
        let head = 3 * s;
        let data_flags = if kind == 0 || kind == 8 { WRITE } else { 0 };
        if len == 0 {
            self.put_desc(head, Self::hdr(s64), 16, NEXT, head + 2);
        } else {
            self.put_desc(head, Self::hdr(s64), 16, NEXT, head + 1);
            self.put_desc(head + 1, Self::data(s64), len, data_flags | NEXT, head + 2);
        }
        self.put_desc(head + 2, Self::st(s64), 1, WRITE, 0);
        self.offer(head);
        head
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used() + 2)).unwrap()
    }

    fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used() + 4 + u64::from(i % QSIZE) * 8;
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    fn wait_used(&self, n: u16, timeout: Duration) {
        let start = Instant::now();
        while self.used_idx() < n {
            assert!(
                start.elapsed() < timeout,
                "only {} of {n} used",
                self.used_idx()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn status(&self, s: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(Self::st(u64::from(s))))
            .unwrap()
    }

    fn fill(&self, s: u16, byte: u8, len: usize) {
        self.mem
            .write_slice(&vec![byte; len], GuestAddress(Self::data(u64::from(s))))
            .unwrap();
    }

    fn read_data(&self, s: u16, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem
            .read_slice(&mut b, GuestAddress(Self::data(u64::from(s))))
            .unwrap();
        b
    }
}

fn idle_vm(disks: Vec<DiskConfig>) -> Vm {
    let mut cfg: VmConfig = common::config(
        common::guest(),
        "dirty mem=16M passes=0 every=100000",
        256 << 20,
        1,
        vmm::Console::Writer(Box::new(std::io::sink())),
    );
    cfg.disks = disks;
    Vm::boot(cfg).expect("boot")
}

fn raw_disk(dir: &Path, name: &str, size: u64) -> DiskConfig {
    let path = dir.join(name);
    disk::create_raw(&path, size, false).unwrap();
    DiskConfig {
        path,
        ..DiskConfig::default()
    }
}

/// A log sink the test reads back.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_driver_that_errs_in_a_loop_is_logged_within_a_limit() {
    let dir = tempfile::tempdir().unwrap();
    let vm = idle_vm(vec![raw_disk(dir.path(), "d.raw", 1 << 20)]);
    let log = Log::default();
    let sink = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    // The MMIO writes run the device's register handler on this thread, under this subscriber.
    tracing::subscriber::with_default(subscriber, || {
        let bus = vm.mmio_bus();
        for _ in 0..1000 {
            // Not a power of two, and no driver has acknowledged the device: refused each time.
            bus.write(mmio_base(0) + reg::QUEUE_NUM, &3u32.to_le_bytes());
        }
    });
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let refused = text.lines().filter(|l| l.contains("queue size")).count();
    assert_eq!(refused, 10, "{text}");
    assert!(text.contains("counted, not logged"), "{text}");
    // The device still answers.
    let mut magic = [0u8; 4];
    vm.mmio_bus().read(mmio_base(0) + reg::MAGIC, &mut magic);
    assert_eq!(u32::from_le_bytes(magic), 0x7472_6976);
}

#[test]
fn malformed_chains_fail_cleanly_and_the_vmm_survives() {
    let dir = tempfile::tempdir().unwrap();
    let ro = DiskConfig {
        readonly: true,
        ..raw_disk(dir.path(), "ro.raw", 1 << 20)
    };
    let rw = raw_disk(dir.path(), "rw.raw", 1 << 20);
    let vm = idle_vm(vec![rw.clone(), ro.clone()]);
    let bus = vm.mmio_bus();
    let mem = vm.memory();
    let mut d = Driver::new(bus, mem, 0);
    let mut n = 0u16;
    let mut expect = |d: &mut Driver, head: u16, st: u8, what: &str| {
        n += 1;
        d.wait_used(n, Duration::from_secs(30));
        assert_eq!(d.used_elem(n - 1).0, u32::from(head), "{what}: used id");
        assert_eq!(d.status(head / 3), st, "{what}: status");
    };
    // A good write, read back.
    d.fill(0, 0x5a, 4096);
    let h = d.request(0, 1, 8, 4096);
    expect(&mut d, h, S_OK, "good write");
    d.fill(1, 0, 4096);
    let h = d.request(1, 0, 8, 4096);
    expect(&mut d, h, S_OK, "good read");
    assert_eq!(d.read_data(1, 4096), vec![0x5a; 4096]);
    // GET_ID.
    let h = d.request(2, 8, 0, 20);
    expect(&mut d, h, S_OK, "get id");
    assert_eq!(&d.read_data(2, 11), b"cowvm-disk0");
    // Out-of-range sector, and a range that straddles the end.
    let h = d.request(3, 0, 1 << 40, 512);
    expect(&mut d, h, S_IOERR, "sector far out of range");
    let h = d.request(3, 0, 2047, 1024);
    expect(&mut d, h, S_IOERR, "range past the end");
    let h = d.request(3, 1, u64::MAX / 256, 512);
    expect(&mut d, h, S_IOERR, "sector overflow");
    // Not a multiple of 512.
    let h = d.request(4, 0, 0, 100);
    expect(&mut d, h, S_IOERR, "odd length");
    // Unknown request type.
    let h = d.request(4, 77, 0, 0);
    expect(&mut d, h, S_UNSUPP, "unknown type");
    // Data buffer outside guest memory, and a huge length.
    let s = 4u16;
    let h = d.request(s, 0, 0, 512);
    expect(&mut d, h, S_OK, "a good read in slot 4");
    d.put_desc(3 * s + 1, 0x7_0000_0000, 4096, WRITE | NEXT, 3 * s + 2);
    d.offer(3 * s);
    expect(&mut d, 3 * s, S_IOERR, "buffer outside RAM");
    d.put_desc(3 * s + 1, Driver::data(4), !511, WRITE | NEXT, 3 * s + 2);
    d.offer(3 * s);
    expect(&mut d, 3 * s, S_IOERR, "huge length");
    d.put_desc(3 * s + 1, 0xbfff_f000, 0x2000, WRITE | NEXT, 3 * s + 2);
    d.offer(3 * s);
    expect(&mut d, 3 * s, S_IOERR, "buffer across the end of RAM");
    // Readable data after a writable buffer.
    d.put_desc(3 * s + 1, Driver::data(4), 512, WRITE | NEXT, 3 * s + 2);
    d.put_desc(3 * s + 2, Driver::st(4), 1, NEXT, 15);
    d.put_desc(15, Driver::st(4), 1, WRITE, 0);
    d.offer(3 * s);
    n += 1;
    d.wait_used(n, Duration::from_secs(30));
    // A write to the read-only disk: IOERR and the image untouched.
    let before = std::fs::read(&ro.path).unwrap();
    let mut d1 = Driver {
        bus,
        mem,
        base: mmio_base(1),
        avail_idx: 0,
    };
    d1.init();
    assert_ne!(d1.r(reg::DEVICE_FEATURES) & (1 << 5), 0, "RO offered");
    d1.fill(0, 0x77, 4096);
    let h = d1.request(0, 1, 0, 4096);
    d1.wait_used(1, Duration::from_secs(30));
    assert_eq!(d1.status(h / 3), S_IOERR, "write to read-only disk");
    assert_eq!(std::fs::read(&ro.path).unwrap(), before);
    // Back on disk 0 (its rings were overwritten by disk 1's init: re-init).
    let mut d = Driver::new(bus, mem, 0);
    // A loop in the chain: the device must not spin or panic; it asks for a reset.
    d.put_desc(0, Driver::hdr(0), 16, NEXT, 1);
    d.put_desc(1, Driver::data(0), 512, WRITE | NEXT, 0);
    d.offer(0);
    let start = Instant::now();
    while d.r(reg::STATUS) & dev_status::DEVICE_NEEDS_RESET == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "loop not detected"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // A bad descriptor index, after a reset.
    let mut d = Driver::new(bus, mem, 0);
    d.put_desc(0, Driver::hdr(0), 16, NEXT, 999);
    d.offer(0);
    let start = Instant::now();
    while d.r(reg::STATUS) & dev_status::DEVICE_NEEDS_RESET == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "bad index not detected"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // An available index far ahead of the queue size.
    let d = Driver::new(bus, mem, 0);
    mem.write_obj(500u16, GuestAddress(d.avail() + 2)).unwrap();
    d.w(reg::QUEUE_NOTIFY, 0);
    let start = Instant::now();
    while d.r(reg::STATUS) & dev_status::DEVICE_NEEDS_RESET == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "bad avail idx not detected"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Queue set-up errors: rings outside RAM at DRIVER_OK mark the device broken.
    d.w(reg::STATUS, 0);
    d.w(reg::STATUS, 1);
    d.w(reg::STATUS, 3);
    d.w(reg::DRIVER_FEATURES_SEL, 1);
    d.w(reg::DRIVER_FEATURES, 1);
    d.w(reg::STATUS, 0xb);
    d.w(reg::QUEUE_NUM, 3); // not a power of two: ignored
    d.w(reg::QUEUE_DESC_LOW, 0);
    d.w(reg::QUEUE_DESC_HIGH, 0x70);
    d.w(reg::QUEUE_READY, 1);
    d.w(reg::STATUS, 0xf);
    assert_ne!(d.r(reg::STATUS) & dev_status::DEVICE_NEEDS_RESET, 0);
    // Feature negotiation without VERSION_1 fails.
    d.w(reg::STATUS, 0);
    d.w(reg::STATUS, 1);
    d.w(reg::STATUS, 3);
    d.w(reg::STATUS, 0xb);
    assert_eq!(
        d.r(reg::STATUS) & 8,
        0,
        "FEATURES_OK refused without VERSION_1"
    );
    // After all that, a reset device works again and the VM still runs.
    let mut d = Driver::new(bus, mem, 0);
    d.fill(0, 0, 4096);
    let h = d.request(0, 0, 8, 4096);
    d.wait_used(1, Duration::from_secs(30));
    assert_eq!(d.status(h / 3), S_OK);
    assert_eq!(d.read_data(0, 4096), vec![0x5a; 4096]);
    assert!(vm.exit_status().is_none(), "the VM keeps running");
}

/// Opens a disk outside any VM: real memory, real images, real io_uring.
fn device(
    mem: &GuestMemoryMmap,
    config: &DiskConfig,
    state: Option<&BlockState>,
) -> (DiskSet, Arc<Bus>) {
    let configs = std::slice::from_ref(config);
    let mut disks = match state {
        Some(s) => DiskSet::restore(DiskArgs { configs, mem }, &vec![s.clone()]).unwrap(),
        None => DiskSet::open(configs, mem).unwrap(),
    };
    let mut bus = Bus::default();
    disks.insert_windows(&mut bus).unwrap();
    disks.start(mem).unwrap();
    (disks, Arc::new(bus))
}

fn restore_one(
    config: &DiskConfig,
    state: &BlockState,
    mem: &GuestMemoryMmap,
) -> Result<DiskSet, vmm::testing::DiskError> {
    let configs = std::slice::from_ref(config);
    DiskSet::restore(DiskArgs { configs, mem }, &vec![state.clone()])
}

fn memory() -> GuestMemoryMmap {
    vmm::testing::create_guest_memory(256 << 20, vmm::HugePages::None).unwrap()
}

fn qcow2_over(path: &Path, backing: &Path, format: disk::Format) {
    disk::create_qcow2(
        path,
        &disk::CreateOptions {
            backing: Some((backing, format)),
            ..disk::CreateOptions::default()
        },
    )
    .unwrap();
}

#[test]
fn m14_new_write_waits_for_an_older_write_to_the_same_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let base = raw_disk(dir.path(), "base.raw", 4 << 20);
    let t1 = dir.path().join("t1.qcow2");
    qcow2_over(&t1, &base.path, disk::Format::Raw);
    let cfg = DiskConfig {
        path: t1.clone(),
        delay_ms: 1000,
        ..DiskConfig::default()
    };
    let mem = memory();
    let (disks, bus) = device(&mem, &cfg, None);
    let h = &disks.handles()[0];
    let mut d = Driver::new(&bus, &mem, 0);
    let t2 = dir.path().join("t2.qcow2");
    qcow2_over(&t2, &t1, disk::Format::Qcow2);
    d.fill(0, 0xaa, 4096);
    d.request(0, 1, 0, 4096); // W1: sector 0 of cluster 0, held a second
    let start = Instant::now();
    while h.inflight().unwrap().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(h.switch_image(disk::Image::open(&t2).unwrap()).unwrap(), 1);
    d.fill(1, 0xbb, 4096);
    d.request(1, 1, 8, 4096); // W2: same 64 KiB cluster, against T2: must copy up after W1
                              // The device thread pops W2 when it sees the notification; W1 is still held then.
    let start = Instant::now();
    let inflight = loop {
        let inflight = h.inflight().unwrap();
        if inflight.len() == 2 || start.elapsed() > Duration::from_millis(800) {
            break inflight;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(inflight.len(), 2);
    assert_eq!(inflight[0].image_generation, 0);
    assert_eq!(inflight[1].image_generation, 1);
    d.wait_used(2, Duration::from_secs(30));
    assert_eq!((d.status(0), d.status(1)), (S_OK, S_OK));
    let mut top = disk::Image::open_read_only(&t2).unwrap();
    let mut buf = vec![0u8; 8192];
    top.read_at(0, &mut buf).unwrap();
    assert_eq!(&buf[..4096], &[0xaa; 4096][..], "W1 survived W2's copy-up");
    assert_eq!(&buf[4096..], &[0xbb; 4096][..]);
    // W1 went to T1 only (it was issued before the switch).
    let mut old = disk::Image::open_read_only(&t1).unwrap();
    old.read_at(4096, &mut buf[..4096]).unwrap();
    assert_eq!(&buf[..4096], &[0u8; 4096][..]);
}

#[derive(Default)]
struct Recorder(Mutex<Vec<(u64, u64)>>);

impl DmaObserver for Recorder {
    fn before_device_write(&self, gpa: u64, len: u64) {
        self.0.lock().unwrap().push((gpa, len));
    }
}

#[test]
fn save_restore_resubmits_inflight_requests_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = raw_disk(dir.path(), "d.raw", 4 << 20);
    std::fs::write(&cfg.path, vec![0x33u8; 4 << 20]).unwrap();
    let mem = memory();
    // One request completes before the save; three are held (delay) at the save.
    let (mut disks, bus) = device(&mem, &cfg, None);
    let mut d = Driver::new(&bus, &mem, 0);
    d.fill(0, 0, 4096);
    d.request(0, 0, 0, 4096);
    d.wait_used(1, Duration::from_secs(30));
    let h = disks.handles()[0].clone();
    let obs = Arc::new(Recorder::default());
    h.set_dma_observer(Some(obs.clone())).unwrap();
    let slow = DiskConfig {
        delay_ms: 10_000,
        ..cfg.clone()
    };
    disks.stop();
    drop(disks);
    let (mut disks, bus) = device(&mem, &slow, None);
    let h = disks.handles()[0].clone();
    h.set_dma_observer(Some(obs.clone())).unwrap();
    let mut d = Driver::new(&bus, &mem, 0);
    d.fill(1, 0, 4096);
    d.fill(2, 0x44, 4096);
    d.request(1, 0, 8, 4096); // read
    d.request(2, 1, 16, 4096); // write
    d.request(3, 4, 0, 0); // flush
    let start = Instant::now();
    while h.inflight().unwrap().len() < 3 {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        obs.0.lock().unwrap().contains(&(Driver::data(1), 4096)),
        "the observer heard of the read's buffer before the I/O"
    );
    h.freeze(true).unwrap();
    let state = h.save().unwrap();
    assert_eq!(state.inflight.len(), 3);
    assert_eq!(
        state.inflight.iter().map(|r| r.kind).collect::<Vec<_>>(),
        [RequestKind::Read, RequestKind::Write, RequestKind::Flush]
    );
    // Plain data: through JSON and back, then saved again identically.
    let json = serde_json::to_string(&state).unwrap();
    let state: BlockState = serde_json::from_str(&json).unwrap();
    disks.stop(); // held requests are abandoned: nothing was submitted
    drop(disks);
    assert_eq!(d.used_idx(), 0);
    assert_eq!(
        &std::fs::read(&cfg.path).unwrap()[16 * 512..17 * 512],
        &[0x33; 512]
    );
    // Untrusted state is checked.
    let mut bad = state.clone();
    bad.transport.queues[0].0.size = 3;
    assert!(restore_one(&cfg, &bad, &mem).is_err());
    let mut bad = state.clone();
    bad.transport.driver_features |= 1 << 50;
    assert!(restore_one(&cfg, &bad, &mem).is_err());
    // Restore: every request re-submitted, each completed once.
    let (disks, _bus) = device(&mem, &cfg, Some(&state));
    let h = disks.handles()[0].clone();
    h.drain(Duration::from_secs(30)).unwrap();
    d.wait_used(3, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.used_idx(), 3, "no request completed twice");
    let heads: Vec<u32> = (0..3).map(|i| d.used_elem(i).0).collect();
    assert_eq!(
        heads
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3
    );
    assert_eq!((d.status(1), d.status(2), d.status(3)), (S_OK, S_OK, S_OK));
    assert_eq!(d.read_data(1, 4096), vec![0x33; 4096]);
    assert_eq!(
        &std::fs::read(&cfg.path).unwrap()[16 * 512..24 * 512],
        &[0x44; 4096][..]
    );
    let again = h.save().unwrap();
    assert!(again.inflight.is_empty());
    assert_eq!(again.transport.queues[0].0.next_used, 3);
    // A restored request pointing outside guest memory completes with IOERR.
    let mut bad = state.clone();
    bad.inflight.truncate(1);
    bad.inflight[0].segments = vec![(0x7_0000_0000, 4096)];
    drop(disks);
    let (disks, _bus) = device(&mem, &cfg, Some(&bad));
    disks.handles()[0].drain(Duration::from_secs(30)).unwrap();
    assert_eq!(d.status(1), S_IOERR);
}

#[test]
fn drain_switch_rebase_and_commit() {
    let dir = tempfile::tempdir().unwrap();
    let p = raw_disk(dir.path(), "p.raw", 4 << 20);
    let t1 = dir.path().join("t1.qcow2");
    qcow2_over(&t1, &p.path, disk::Format::Raw);
    let cfg = DiskConfig {
        path: t1.clone(),
        delay_ms: 100,
        ..DiskConfig::default()
    };
    let mem = memory();
    let (disks, bus) = device(&mem, &cfg, None);
    let h = disks.handles()[0].clone();
    let mut d = Driver::new(&bus, &mem, 0);
    d.fill(0, 0x11, 4096);
    let issued = Instant::now();
    d.request(0, 1, 0, 4096);
    match h.drain(Duration::from_millis(10)) {
        Err(vmm::BlockError::Timeout(_)) => {}
        // Only a test thread descheduled for the whole delay may see the request done.
        Ok(()) => assert!(issued.elapsed() >= Duration::from_millis(100)),
        Err(e) => panic!("drain: {e}"),
    }
    h.drain(Duration::from_secs(30)).unwrap();
    assert!(h.inflight().unwrap().is_empty());
    // Commit T1 into P while a write to the new top is in flight.
    d.fill(1, 0x22, 4096);
    let t2 = dir.path().join("t2.qcow2");
    let mut calls = 0;
    let report = commit_and_rebase(&h, &t2, &mut |_, _| calls += 1).unwrap();
    d.request(1, 1, 8, 4096);
    assert!(calls > 0);
    assert_eq!(report.base, p.path);
    assert!(!t1.exists(), "T1 deleted");
    let info = h.image_info().unwrap();
    assert_eq!(info.path, t2);
    assert_eq!(info.chain.len(), 2);
    assert_eq!(info.chain[1].path, p.path);
    d.wait_used(2, Duration::from_secs(30));
    let raw = std::fs::read(&p.path).unwrap();
    assert_eq!(
        &raw[..4096],
        &[0x11; 4096][..],
        "T1's write committed into P"
    );
    assert_eq!(
        &raw[4096..8192],
        &[0; 4096][..],
        "the new write stayed in T2"
    );
    drop(disks);
    let out = std::process::Command::new("qemu-img")
        .args(["check", t2.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut top = disk::Image::open_read_only(&t2).unwrap();
    let mut buf = vec![0u8; 8192];
    top.read_at(0, &mut buf).unwrap();
    assert_eq!(&buf[..4096], &[0x11; 4096][..]);
    assert_eq!(&buf[4096..], &[0x22; 4096][..]);
}
