//! The destination side of a migration: memory and the KVM VM made ahead, pre-copied pages
//! written straight into memory, then the VM built from the switchover and run on `Go`, its
//! missing pages served by the page service from the source.

use std::io::{BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, info_span, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::disks::Incoming;
use super::peer_pages::PeerPages;
use super::send::{Hello, Switch};
use super::transport::{self, TlsServer};
use super::wire::{self, Kind, WireError, DATA, ZERO};
use super::{MigrationError, MigrationMode};
use crate::builder::{self, Console, Machine, MachineState, Parts, Start, VmSummary, MAX_VCPUS};
use crate::checkpoint::dirty::PageBits;
use crate::checkpoint::memory_cow;
use crate::checkpoint::restore::{disk_overlays, RestoreRecord};
use crate::exit::ExitNotifier;
use crate::kvm::state::restore_vm;
use crate::kvm::{KvmError, KvmVm};
use crate::memory::{self, HugePages, RamRegion, PAGE_SIZE};
use crate::page_service::{PageService, Reservoir, ServiceSpec, BLOCK_PAGES};

/// How long a read polls before it blocks once the switchover is next (post-copy: after
/// `Prepared`; else after `Synced`).
const SPIN_BEFORE_SWITCHOVER: Duration = Duration::from_millis(2);
/// How long a read polls before it blocks while `Go` is awaited.
const SPIN_HANDOVER: Duration = Duration::from_millis(20);

/// How the destination runs the incoming VM.
#[derive(Debug)]
pub struct ReceiveOptions {
    /// Where its console goes.
    pub console: Console,
    /// Where the disks' COW files go (default: next to the source's frozen layers), and the
    /// copies of disks the source copies (required for those).
    pub disk_dir: Option<PathBuf>,
    /// Directories trusted to hold the disks the source names (and their backing files),
    /// besides `disk_dir`. A disk anywhere else is refused.
    pub allow_dirs: Vec<PathBuf>,
    /// Serve TLS with this certificate: a source speaking plain TCP is refused. Plain TCP
    /// without it.
    pub tls: Option<TlsServer>,
    /// Whether the VM's memory asks the host for transparent huge pages.
    pub hugepages: HugePages,
}

/// Writes one pre-copied page into guest memory.
fn write_page(
    memory: &GuestMemoryMmap,
    regions: &[RamRegion],
    page: u64,
    bytes: &[u8],
) -> Result<(), MigrationError> {
    let region = regions
        .iter()
        .find(|r| page >= r.first_page() && page < r.first_page() + r.pages())
        .ok_or_else(|| MigrationError::GuestMemory(format!("page {page} is not guest memory")))?;
    let gpa = region.gpa + (page - region.first_page()) * PAGE_SIZE;
    memory
        .write_slice(bytes, GuestAddress(gpa))
        .map_err(|e| MigrationError::GuestMemory(e.to_string()))
}

/// What [`advise`] asks of the kernel for a run of guest memory.
#[derive(Clone, Copy)]
enum Advice {
    /// Drop the pages: they read as missing afterwards (zero, or a userfault once registered).
    Drop,
    /// Map zeroed pages where none are.
    Map,
}

/// Asks the kernel to `advice` `count` pages of `region` from image page `first`.
fn advise(region: &RamRegion, first: u64, count: u64, advice: Advice) -> std::io::Result<()> {
    let advice = match advice {
        Advice::Drop => libc::MADV_DONTNEED,
        Advice::Map => libc::MADV_POPULATE_WRITE,
    };
    // SAFETY: the range lies inside guest memory this process mapped (anonymous, private),
    // and nothing runs on it yet; dropping pages only makes them read as missing, and
    // populating only maps zeroed pages where none are.
    let rc = unsafe {
        libc::madvise(
            region.host_of_page(first) as *mut libc::c_void,
            (count * PAGE_SIZE) as usize,
            advice,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Drops the pages of `stale`: they read as missing afterwards (zero, or a userfault once
/// registered).
fn forget_pages(regions: &[RamRegion], stale: &PageBits) -> Result<(), MigrationError> {
    for r in regions {
        for (first, count) in stale.runs(r.first_page(), r.first_page() + r.pages(), true) {
            advise(r, first, count, Advice::Drop).map_err(|e| {
                MigrationError::GuestMemory(format!("cannot drop stale pages: {e}"))
            })?;
        }
    }
    Ok(())
}

/// Keeps in `pages` only those that may be present in memory here: pages in a huge page span
/// (of host addresses) where pre-copy wrote some page (`written`). A span with none was never
/// touched, so none of its pages can be present.
fn keep_possibly_present(pages: &mut PageBits, written: &PageBits, regions: &[RamRegion]) {
    let span_pages = memory::HUGE_SPAN / PAGE_SIZE;
    for r in regions {
        let region_end = r.first_page() + r.pages();
        let mut first = r.first_page();
        while first < region_end {
            let in_span = (r.host_of_page(first) as u64 % memory::HUGE_SPAN) / PAGE_SIZE;
            let end = (first + span_pages - in_span).min(region_end);
            if !written.any(first, end) {
                pages.clear_range(first, end);
            }
            first = end;
        }
    }
}

/// The most memory mapped ahead of the pages a source says will come: half of what the host
/// has available. The source only names the pages; it must not make this host commit memory
/// it lacks in one frame (what is not mapped ahead is mapped as the pages arrive).
fn map_ahead_limit() -> u64 {
    memory_cow::host_available_memory().map_or(0, |available| available / 2)
}

/// Maps the pages of `pages` in guest memory now, one kernel call per run, rather than one
/// page fault each when pre-copy writes them, up to `limit` bytes. Best effort: a kernel that
/// cannot (before Linux 5.14) or a host short of memory leaves the rest to those faults.
fn map_ahead(regions: &[RamRegion], pages: &PageBits, limit: u64) {
    let mut left = limit / PAGE_SIZE;
    for r in regions {
        for (first, count) in pages.runs(r.first_page(), r.first_page() + r.pages(), true) {
            if left == 0 {
                debug!("guest memory mapped ahead up to half of the host's available memory");
                return;
            }
            let count = count.min(left);
            left -= count;
            if let Err(e) = advise(r, first, count, Advice::Map) {
                debug!("guest memory is not mapped ahead of pre-copy: {e}");
                return;
            }
        }
    }
}

/// How many blocks of the page service's (`BLOCK_PAGES` pages each) `test` holds for in `bits`.
fn blocks_where(bits: &PageBits, test: impl Fn(&PageBits, u64, u64) -> bool) -> u64 {
    let pages = bits.len();
    (0..pages.div_ceil(BLOCK_PAGES))
        .filter(|b| test(bits, b * BLOCK_PAGES, ((b + 1) * BLOCK_PAGES).min(pages)))
        .count() as u64
}

/// What pre-copy put into memory here, and which of those pages are known missing again.
struct Precopied {
    /// Every page pre-copy wrote.
    written: PageBits,
    /// Every page that may be mapped here: those pre-copy wrote and those mapped ahead of it.
    mapped: PageBits,
    /// Pages dropped since huge pages stopped (and not written since): missing for sure.
    dropped: PageBits,
    /// Scratch for the pages to drop; like the others, mapped before the pause writes it.
    stale: PageBits,
    /// Whether huge pages are stopped in guest memory.
    huge_stopped: bool,
}

impl Precopied {
    fn new(pages: u64) -> Precopied {
        Precopied {
            written: PageBits::new_mapped(pages),
            mapped: PageBits::new_mapped(pages),
            dropped: PageBits::new_mapped(pages),
            stale: PageBits::new_mapped(pages),
            huge_stopped: false,
        }
    }

    fn wrote(&mut self, page: u64) {
        self.written.set(page);
        self.mapped.set(page);
        self.dropped.clear(page);
    }

    /// Makes every page of `lacking` missing, so that the page service installs its final
    /// content on first touch. Pre-copy's copies of those pages are stale; and pages it never
    /// wrote may be present too, as zeros, where a huge page covers them. Huge pages stop
    /// first, so that nothing fills in a span after its pages are dropped. Whole blocks go
    /// into `keep`, if given and while it has room, instead of being freed: their memory then
    /// serves the pages that replace them.
    fn drop_lacking(
        &mut self,
        memory: &GuestMemoryMmap,
        regions: &[RamRegion],
        lacking: &PageBits,
        keep: Option<&mut Reservoir>,
    ) -> Result<(), MigrationError> {
        if !self.huge_stopped {
            memory::stop_huge_pages(memory)?;
            self.huge_stopped = true;
        }
        self.stale.copy_from(lacking);
        self.stale.and_not(&self.dropped);
        keep_possibly_present(&mut self.stale, &self.mapped, regions);
        if let Some(keep) = keep {
            for r in regions {
                let end = r.first_page() + r.pages();
                let mut first = r.first_page();
                while first + BLOCK_PAGES <= end {
                    if !self.stale.any_clear(first, first + BLOCK_PAGES)
                        && keep.adopt(r.host_of_page(first))
                    {
                        self.stale.clear_range(first, first + BLOCK_PAGES);
                    }
                    first += BLOCK_PAGES;
                }
            }
        }
        forget_pages(regions, &self.stale)?;
        self.dropped.or(lacking);
        Ok(())
    }
}

/// What the switchover frame carries.
struct Switchover {
    switch: Switch,
    state: MachineState,
    lacking: PageBits,
}

/// A bitmap of `pages` pages as the wire carries it (little-endian words).
fn decode_bitmap(bytes: &[u8], pages: u64) -> Result<PageBits, &'static str> {
    let words: Vec<u64> = bytes
        .chunks(8)
        .map(|c| c.try_into().map(u64::from_le_bytes))
        .collect::<Result<_, _>>()
        .map_err(|_| "a partial bitmap word")?;
    PageBits::from_words(words, pages).ok_or("a bitmap of the wrong size")
}

fn decode_switchover(payload: &[u8], pages: u64) -> Result<Switchover, MigrationError> {
    let bad = |why: &str| WireError::malformed(Kind::Switchover, why);
    let mut rest = payload;
    let mut take = |n: usize| -> Result<&[u8], WireError> {
        if rest.len() < n {
            return Err(bad("truncated"));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let len = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
    let switch: Switch =
        serde_json::from_slice(take(len)?).map_err(|e| bad(&format!("disks: {e}")))?;
    let len = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
    let state: MachineState =
        ckpt_format::decode_state(take(len)?).map_err(MigrationError::State)?;
    let lacking = decode_bitmap(rest, pages).map_err(bad)?;
    Ok(Switchover {
        switch,
        state,
        lacking,
    })
}

/// Checks every disk the source names against the trusted directories.
fn trusted(
    disks: &[ckpt_format::DiskConfig],
    options: &ReceiveOptions,
) -> Result<Vec<PathBuf>, MigrationError> {
    let mut dirs: Vec<PathBuf> = options
        .disk_dir
        .iter()
        .chain(&options.allow_dirs)
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .collect();
    dirs.dedup();
    for (index, d) in disks.iter().enumerate() {
        let ok = std::fs::canonicalize(&d.path)
            .is_ok_and(|real| dirs.iter().any(|dir| real.starts_with(dir)));
        if !ok {
            return Err(MigrationError::UntrustedDisk {
                index,
                path: d.path.clone(),
            });
        }
    }
    Ok(dirs)
}

/// Tells the source why the VM is refused (best effort) and returns the error.
fn refuse(w: &mut impl Write, e: MigrationError) -> MigrationError {
    let mut why = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        why.push_str(": ");
        why.push_str(&c.to_string());
        cause = c.source();
    }
    if wire::write_frame(w, Kind::Abort, &[why.as_bytes()])
        .and_then(|()| w.flush())
        .is_err()
    {
        warn!("cannot tell the source why the VM is refused");
    }
    e
}

/// Receives one VM on `stream` and starts it.
pub(crate) fn receive(
    mut stream: TcpStream,
    options: ReceiveOptions,
) -> Result<(Machine, RestoreRecord), MigrationError> {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "the migration source".to_string(), |a| a.to_string());
    let span = info_span!("receive", from = %peer);
    let _enter = span.enter();
    let io = |e: std::io::Error| MigrationError::Wire(WireError::Io(e));
    stream.set_nodelay(true).map_err(io)?;
    let tls = match &options.tls {
        Some(server) => Some(server.handshake(&mut stream, &peer)?),
        None => None,
    };
    let (r, w) = transport::split(stream, tls).map_err(io)?;
    // Small: a block of pages is read past it, without a copy.
    let mut r = BufReader::with_capacity(64 << 10, r);
    let mut w = BufWriter::new(w);
    let version = wire::read_preamble(&mut r)?;
    let hello: Hello = serde_json::from_slice(&wire::expect_frame(&mut r, Kind::Hello, "hello")?)
        .map_err(|e| WireError::malformed(Kind::Hello, e.to_string()))?;
    if let Err(e) = memory::validate_size(hello.mem_size) {
        return Err(refuse(&mut w, MigrationError::Config(e.to_string())));
    }
    if !(1..=MAX_VCPUS).contains(&hello.vcpus) {
        let e = MigrationError::Config(format!(
            "{} vCPUs (1 to {MAX_VCPUS} supported)",
            hello.vcpus
        ));
        return Err(refuse(&mut w, e));
    }
    let mut copies = match (hello.copy_disks, &options.disk_dir) {
        (false, _) => None,
        (true, None) => return Err(refuse(&mut w, MigrationError::NoDiskDir)),
        (true, Some(dir)) => match Incoming::new(dir) {
            Ok(copies) => Some(copies),
            Err(e) => return Err(refuse(&mut w, e)),
        },
    };
    // Memory, the KVM VM and its vCPUs before any page arrives: creating the VM costs
    // milliseconds per GiB, and each vCPU a fraction of one, which must not fall in the pause.
    let memory = memory::create_guest_memory(hello.mem_size, options.hugepages)?;
    let vm = KvmVm::new(&memory).map_err(|e| MigrationError::Vm(e.into()))?;
    let vcpus = builder::create_vcpus(&vm, hello.vcpus)?;
    let regions = memory::ram_regions(&memory);
    let pages: u64 = regions.iter().map(RamRegion::pages).sum();
    let mut precopied = Precopied::new(pages);
    // An older source does not say which pages it populated: nothing is mapped ahead.
    let populated = if version >= wire::POPULATED_SINCE {
        let bitmap = wire::expect_frame(&mut r, Kind::Populated, "the populated pages")?;
        decode_bitmap(&bitmap, pages).map_err(|why| WireError::malformed(Kind::Populated, why))?
    } else {
        PageBits::new(pages)
    };
    // Memory for the pages to come, mapped while the guest still runs at the source: guest
    // memory itself for a pre-copy, which writes into it; a reservoir for a post-copy, whose
    // pages must stay missing until they arrive.
    let mapping = Instant::now();
    let mut reservoir = None;
    if hello.mode == MigrationMode::Postcopy {
        let blocks = blocks_where(&populated, PageBits::any)
            .min(map_ahead_limit() / (BLOCK_PAGES * PAGE_SIZE));
        reservoir = Reservoir::mapped(blocks).map(Arc::new);
    } else {
        map_ahead(&regions, &populated, map_ahead_limit());
        precopied.mapped.or(&populated);
    }
    debug!(
        pages = populated.count(),
        reservoir = reservoir.is_some(),
        us = mapping.elapsed().as_micros() as u64,
        "memory mapped ahead of the pages"
    );
    wire::write_frame(&mut w, Kind::Prepared, &[]).map_err(io)?;
    w.flush().map_err(io)?;
    if hello.mode == MigrationMode::Postcopy {
        r.get_mut().spin_waits(SPIN_BEFORE_SWITCHOVER);
    }
    info!(mem = hello.mem_size, vcpus = hello.vcpus, mode = %hello.mode, "receiving a VM");

    let zeros = vec![0u8; PAGE_SIZE as usize];
    let mut payload = Vec::new();
    loop {
        match wire::read_frame_into(&mut r, &mut payload)? {
            Kind::Pages => {
                let frame = wire::decode_pages(&payload, pages)?;
                for (page, kind, data) in frame.iter() {
                    match (kind, data) {
                        (DATA, Some(bytes)) => write_page(&memory, &regions, page, bytes)?,
                        (ZERO, _) => write_page(&memory, &regions, page, &zeros)?,
                        _ => continue,
                    }
                    precopied.wrote(page);
                }
            }
            kind @ (Kind::DiskLayer | Kind::DiskData) => {
                let Some(copies) = copies.as_mut() else {
                    return Err(WireError::Unexpected {
                        got: kind,
                        expected: "pages or the switchover (the disks are not copied)",
                    }
                    .into());
                };
                let done = if kind == Kind::DiskLayer {
                    copies.start(&payload)
                } else {
                    copies.data(&payload)
                };
                done.map_err(|e| refuse(&mut w, e))?;
            }
            Kind::Discard => {
                let discard = decode_bitmap(&payload, pages)
                    .map_err(|why| WireError::malformed(Kind::Discard, why))?;
                // The blocks dropped whole come again after the hand-over: their memory is
                // kept for them, in a reservoir.
                let mut keep = match &reservoir {
                    None => Reservoir::empty(blocks_where(&discard, |bits, first, end| {
                        !bits.any_clear(first, end)
                    })),
                    Some(_) => None,
                };
                precopied.drop_lacking(&memory, &regions, &discard, keep.as_mut())?;
                if let Some(keep) = keep {
                    reservoir = Some(Arc::new(keep));
                }
            }
            Kind::Sync => {
                wire::write_frame(&mut w, Kind::Synced, &[])
                    .and_then(|()| w.flush())
                    .map_err(io)?;
                r.get_mut().spin_waits(SPIN_BEFORE_SWITCHOVER);
            }
            Kind::Switchover => break,
            got => {
                return Err(WireError::Unexpected {
                    got,
                    expected: "pages or the switchover",
                }
                .into())
            }
        }
    }
    let started = Instant::now();
    // What the path to the first instruction costs, phase by phase (RUST_LOG=debug).
    let phase = |done: &'static str| debug!(done, us = started.elapsed().as_micros() as u64);
    let built = (|| {
        let Switchover {
            switch,
            state,
            lacking,
        } = decode_switchover(&payload, pages)?;
        if state.vcpus.len() != usize::from(hello.vcpus) {
            return Err(MigrationError::Config(format!(
                "{} vCPU states for {} vCPUs",
                state.vcpus.len(),
                hello.vcpus
            )));
        }
        let disks = match copies.as_mut() {
            Some(copies) if switch.copied => {
                // Only the copies made here: no path the source names is opened.
                let (tops, dir) = copies.tops(&switch.disks)?;
                disk_overlays(&tops, &state, Some(&dir), std::slice::from_ref(&dir))
            }
            None if !switch.copied => {
                let dirs = trusted(&switch.disks, &options)?;
                disk_overlays(&switch.disks, &state, options.disk_dir.as_deref(), &dirs)
            }
            _ => {
                return Err(WireError::malformed(
                    Kind::Switchover,
                    "disks copied or not, against what the hello said",
                )
                .into())
            }
        }
        .map_err(MigrationError::Disks)?;
        phase("disks");
        restore_vm(&vm.fd, &state.vm).map_err(|e: KvmError| MigrationError::Vm(e.into()))?;
        if precopied.mapped.any(0, pages) {
            precopied.drop_lacking(&memory, &regions, &lacking, None)?;
        }
        // What pre-copy left in place.
        let mut held = precopied.written;
        held.and_not(&lacking);
        phase("state");
        Ok((state, lacking, held, disks))
    })();
    let (state, lacking, held, disks) = match built {
        Ok(b) => b,
        Err(e) => return Err(refuse(&mut w, e)),
    };
    let remove_overlays = || {
        for d in &disks {
            if let Err(e) = std::fs::remove_file(&d.path) {
                warn!(path = %d.path.display(), "cannot remove the COW file of a VM not received: {e}");
            }
        }
    };
    r.get_mut().spin_waits(SPIN_HANDOVER);
    let ready_at = Instant::now();
    let go = wire::write_frame(&mut w, Kind::Ready, &[])
        .and_then(|()| w.flush())
        .map_err(io)
        .and_then(|()| Ok(wire::expect_frame(&mut r, Kind::Go, "go")?));
    if let Err(e) = go {
        remove_overlays();
        return Err(e);
    }
    r.get_mut().spin_waits(Duration::ZERO);
    if let Some(copies) = copies.as_mut() {
        copies.keep();
    }
    phase("go");
    // The VM is ours from here on.
    let exit = Arc::new(ExitNotifier::default());
    let lacking_pages = lacking.count();
    let (peer_pages, service, plain) = if lacking_pages > 0 {
        let source = Arc::new(
            PeerPages::start(peer.clone(), lacking, held, regions.clone(), r, w).map_err(io)?,
        );
        let service = PageService::start(ServiceSpec {
            regions: regions.clone(),
            source: source.clone(),
            role: "migrated VM",
            hot_pages: Vec::new(),
            exit: exit.clone(),
            reservoir: reservoir.take(),
        })?;
        (Some(source), Some(Arc::new(service)), None)
    } else {
        (None, None, Some(w))
    };
    phase("page service");
    let parts = Parts {
        summary: VmSummary {
            mem_size: hello.mem_size,
            vcpus: hello.vcpus,
            kernel: hello.kernel,
            cmdline: hello.cmdline,
        },
        memory,
        vm,
        exit,
        console: options.console,
        disks: &disks,
        vcpus: Some(vcpus),
    };
    let machine = builder::assemble(parts, Start::Restore(&state))?;
    let first_instruction_us = started.elapsed().as_micros() as u64;
    // The VM runs whatever happens to the connection now: with every page here it needs
    // nothing more from the source, and without them the page service stops it.
    let took_us = ready_at.elapsed().as_micros() as u64;
    let took = took_us.to_le_bytes();
    let told = match (&peer_pages, plain) {
        (Some(p), _) => p.running(took_us),
        (None, Some(mut w)) => wire::write_frame(&mut w, Kind::Running, &[&took])
            .and_then(|()| wire::write_frame(&mut w, Kind::Resident, &[]))
            .and_then(|()| w.flush())
            .map_err(WireError::Io),
        (None, None) => Ok(()),
    };
    if let Err(e) = told {
        warn!("cannot tell the migration source that the VM runs: {e}");
    }
    // Once the vCPUs run: until then it would compete with their start.
    if let Some(service) = &service {
        service.prefetch()?;
    }
    info!(
        first_instruction_us,
        lacking_pages, "VM received and running"
    );
    Ok((machine, RestoreRecord::new(first_instruction_us, service)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether each page of `memory` is present, from this process's page map.
    fn present(memory: &GuestMemoryMmap, pages: &[u64]) -> Vec<bool> {
        let map = std::fs::File::open("/proc/self/pagemap").unwrap();
        let regions = memory::ram_regions(memory);
        pages
            .iter()
            .map(|&p| memory::populated(&map, regions[0].host_of_page(p), 1).unwrap()[0])
            .collect()
    }

    #[test]
    fn lacking_pages_are_missing_after_the_drop_even_where_a_huge_page_covered_them() {
        let memory = memory::create_guest_memory(16 << 20, HugePages::Thp).unwrap();
        let regions = memory::ram_regions(&memory);
        let pages = regions[0].pages();
        let span = memory::HUGE_SPAN / PAGE_SIZE;
        // The first page of a whole huge page span.
        let start = (0..pages)
            .find(|&p| regions[0].host_of_page(p) as u64 % memory::HUGE_SPAN == 0)
            .unwrap();
        let (kept, stale, zero_filled, untouched) = (start, start + 1, start + 2, start + span);
        let mut precopied = Precopied::new(pages);
        for page in [kept, stale] {
            write_page(&memory, &regions, page, &[0x5a; PAGE_SIZE as usize]).unwrap();
            precopied.wrote(page);
        }
        let mut lacking = PageBits::new(pages);
        for page in [stale, zero_filled, untouched] {
            lacking.set(page);
        }
        precopied
            .drop_lacking(&memory, &regions, &lacking, None)
            .unwrap();
        assert_eq!(
            present(&memory, &[kept, stale, zero_filled, untouched]),
            [true, false, false, false]
        );
        let mut byte = [0u8; 1];
        memory
            .read_slice(&mut byte, GuestAddress(kept * PAGE_SIZE + 7))
            .unwrap();
        assert_eq!(byte, [0x5a]);
        // Written again after the drop, a page is present and no longer counted missing.
        write_page(&memory, &regions, stale, &[0x33; PAGE_SIZE as usize]).unwrap();
        precopied.wrote(stale);
        assert!(!precopied.dropped.get(stale) && precopied.dropped.get(zero_filled));
    }

    #[test]
    fn a_source_of_the_version_before_the_populated_pages_is_prepared_for() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let source = std::thread::spawn(move || {
            let mut conn = TcpStream::connect(addr).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut preamble = wire::MAGIC.to_vec();
            preamble.extend_from_slice(&(wire::POPULATED_SINCE - 1).to_le_bytes());
            conn.write_all(&preamble).unwrap();
            let hello = serde_json::to_vec(&Hello {
                mem_size: 16 << 20,
                vcpus: 1,
                mode: MigrationMode::Precopy,
                kernel: None,
                cmdline: None,
                copy_disks: false,
            })
            .unwrap();
            wire::write_frame(&mut conn, Kind::Hello, &[&hello]).unwrap();
            // No `Populated` follows: the destination must answer all the same.
            wire::read_frame(&mut conn).unwrap().0
        });
        let (stream, _) = listener.accept().unwrap();
        let options = ReceiveOptions {
            console: Console::Stdout,
            disk_dir: None,
            allow_dirs: Vec::new(),
            tls: None,
            hugepages: HugePages::Thp,
        };
        let destination = std::thread::spawn(move || receive(stream, options).map(|_| ()));
        assert_eq!(source.join().unwrap(), Kind::Prepared);
        // The source is gone: the destination gives up.
        assert!(destination.join().unwrap().is_err());
    }

    #[test]
    fn mapping_ahead_stops_at_its_limit() {
        let memory = memory::create_guest_memory(16 << 20, HugePages::None).unwrap();
        // Small pages even where the host hands out huge ones unasked.
        memory::stop_huge_pages(&memory).unwrap();
        let regions = memory::ram_regions(&memory);
        let mut ahead = PageBits::new(regions[0].pages());
        for page in [1, 2, 3, 10, 11, 12] {
            ahead.set(page);
        }
        map_ahead(&regions, &ahead, 4 * PAGE_SIZE);
        assert_eq!(
            present(&memory, &[0, 1, 2, 3, 10, 11, 12]),
            [false, true, true, true, true, false, false]
        );
    }

    #[test]
    fn pages_mapped_ahead_and_never_sent_are_missing_after_the_drop() {
        let memory = memory::create_guest_memory(16 << 20, HugePages::None).unwrap();
        let regions = memory::ram_regions(&memory);
        let pages = regions[0].pages();
        let mut ahead = PageBits::new(pages);
        for page in 0..pages / 2 {
            ahead.set(page);
        }
        let mut precopied = Precopied::new(pages);
        map_ahead(&regions, &ahead, u64::MAX);
        precopied.mapped.or(&ahead);
        let (sent, never_sent) = (3, 700);
        write_page(&memory, &regions, sent, &[0x5a; PAGE_SIZE as usize]).unwrap();
        precopied.wrote(sent);
        assert_eq!(present(&memory, &[sent, never_sent]), [true, true]);
        let mut lacking = PageBits::new(pages);
        lacking.set(never_sent);
        precopied
            .drop_lacking(&memory, &regions, &lacking, None)
            .unwrap();
        assert_eq!(present(&memory, &[sent, never_sent]), [true, false]);
    }
}
