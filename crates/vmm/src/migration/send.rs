//! The source side of a migration: pre-copy rounds, the pause, the hand-over, then serving the
//! pages the destination still lacks.

use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ckpt_format::{page_is_zero, IoPolicy};
use tracing::{debug, info, info_span, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::disks::Outgoing;
use super::transport::{self, ReadHalf, TlsClient, TlsError, WriteHalf};
use super::wire::{self, Kind, WireError, DATA, UNCHANGED, ZERO};
use super::{MigrateOptions, MigrationError, MigrationMode, MigrationReport};
use crate::builder::Machine;
use crate::checkpoint::dirty::{DirtyLog, PageBits};
use crate::checkpoint::disk_chain::ChainLayers;
use crate::checkpoint::{self, disk_cow, CheckpointError};
use crate::exit::VmExit;
use crate::memory::{ram_regions, RamRegion, PAGE_SIZE};
use crate::page_service::{PageService, BLOCK_PAGES};

/// How long a lazily restored VM's memory may take to become resident before it migrates.
const RESIDENCY_WAIT: Duration = Duration::from_secs(120);
/// How long a read polls before it blocks while the destination builds the VM in the pause.
const SPIN_HANDOVER: Duration = Duration::from_millis(20);
/// The connection's write buffer: frames' headers and small frames gather in it, while a
/// block of pages, larger, goes to the socket directly.
const WRITE_BUFFER: usize = 64 << 10;
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the source needs of its VM.
pub(crate) struct SendContext<'a> {
    pub machine: &'a Machine,
    pub dirty: &'a DirtyLog,
    pub layers: &'a mut ChainLayers,
    pub page_service: Option<&'a PageService>,
}

/// The VM as the destination must build it.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Hello {
    pub mem_size: u64,
    pub vcpus: u8,
    pub mode: MigrationMode,
    pub kernel: Option<std::path::PathBuf>,
    pub cmdline: Option<String>,
    /// The disks' layers follow, to be copied (the destination needs somewhere to write them).
    #[serde(default)]
    pub copy_disks: bool,
}

/// The switchover's description (its state and bitmap follow it in the frame).
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Switch {
    /// Each disk's frozen layer, which the destination puts a COW file of its own over (with
    /// copied disks, only its format and read-only flag are used: the destination has a copy).
    pub disks: Vec<ckpt_format::DiskConfig>,
    /// The disks were copied.
    #[serde(default)]
    pub copied: bool,
}

/// A writer that counts what it writes.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

pub(super) struct Conn {
    r: BufReader<ReadHalf>,
    w: Counting<BufWriter<WriteHalf>>,
}

impl Conn {
    pub(super) fn send(&mut self, kind: Kind, parts: &[&[u8]]) -> Result<(), WireError> {
        wire::write_frame(&mut self.w, kind, parts)?;
        Ok(())
    }

    pub(super) fn flush(&mut self) -> Result<(), WireError> {
        self.w.flush()?;
        Ok(())
    }
}

/// Connects to `options.to`, with TLS if `options.tls_ca` says so (its files are read before
/// anything is sent).
fn connect(options: &MigrateOptions) -> Result<Conn, MigrationError> {
    let to = options.to.as_str();
    let addr = to
        .strip_prefix("tcp://")
        .filter(|a| !a.is_empty())
        .ok_or_else(|| MigrationError::Address(to.to_string()))?;
    let tls = match (&options.tls_ca, &options.tls_server_name) {
        (Some(ca), name) => {
            let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            Some(TlsClient::load(ca, name.as_deref().unwrap_or(host))?)
        }
        (None, Some(_)) => return Err(TlsError::NameWithoutCa.into()),
        (None, None) => None,
    };
    let connect_err = |source| MigrationError::Connect {
        to: to.to_string(),
        source,
    };
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|_| MigrationError::Address(to.to_string()))?
        .collect();
    let mut last = std::io::Error::other("the address resolves to nothing");
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(mut stream) => {
                stream.set_nodelay(true).map_err(connect_err)?;
                let tls = match &tls {
                    Some(client) => Some(client.handshake(&mut stream, addr)?),
                    None => None,
                };
                let (r, w) = transport::split(stream, tls).map_err(connect_err)?;
                return Ok(Conn {
                    r: BufReader::with_capacity(1 << 16, r),
                    w: Counting {
                        // Small: a block of pages is written past it, without a copy.
                        inner: BufWriter::with_capacity(WRITE_BUFFER, w),
                        bytes: 0,
                    },
                });
            }
            Err(e) => last = e,
        }
    }
    Err(connect_err(last))
}

/// Reads pages `first..end` of `memory` that are in `set` into one pages frame; pages not in
/// `set` (and, with `zero_unchanged`, zero pages: the destination's memory starts zeroed) are
/// marked unchanged. Returns the pages carried.
fn send_block(
    w: &mut impl Write,
    memory: &GuestMemoryMmap,
    region: &RamRegion,
    (first, end): (u64, u64),
    set: &PageBits,
    zero_unchanged: bool,
    buf: &mut [u8],
) -> Result<u64, MigrationError> {
    let mut kinds = Vec::with_capacity((end - first) as usize);
    let mut data = 0usize;
    for page in first..end {
        if !set.get(page) {
            kinds.push(UNCHANGED);
            continue;
        }
        let bytes = &mut buf[data..data + PAGE_SIZE as usize];
        let gpa = region.gpa + (page - region.first_page()) * PAGE_SIZE;
        memory
            .read_slice(bytes, GuestAddress(gpa))
            .map_err(|e| MigrationError::GuestMemory(e.to_string()))?;
        if !page_is_zero(bytes) {
            kinds.push(DATA);
            data += PAGE_SIZE as usize;
        } else if zero_unchanged {
            kinds.push(UNCHANGED);
        } else {
            kinds.push(ZERO);
        }
    }
    let carried = kinds.iter().filter(|&&k| k != UNCHANGED).count() as u64;
    wire::write_frame(
        w,
        Kind::Pages,
        &[&wire::pages_header(first, &kinds), &buf[..data]],
    )
    .map_err(WireError::Io)?;
    Ok(carried)
}

/// As [`send_block`] (zero pages sent as zero), for a VM that never runs again here (after the
/// hand-over): the pages go from guest memory to the connection without a copy, since nothing
/// writes them between their checksum and their sending.
fn send_stopped_block(
    w: &mut impl Write,
    memory: &GuestMemoryMmap,
    region: &RamRegion,
    (first, end): (u64, u64),
    set: &PageBits,
) -> Result<(), MigrationError> {
    let len = ((end - first) * PAGE_SIZE) as usize;
    let gpa = region.gpa + (first - region.first_page()) * PAGE_SIZE;
    let slice = memory
        .get_slice(GuestAddress(gpa), len)
        .map_err(|e| MigrationError::GuestMemory(e.to_string()))?;
    let guard = slice.ptr_guard();
    // SAFETY: `get_slice` checked that the `len` bytes lie in one mapping of `memory`, which
    // is borrowed (so mapped) for this whole call. The vCPUs are stopped for good and the
    // devices with them, so nothing writes these bytes while they are read as a slice.
    let block = unsafe { std::slice::from_raw_parts(guard.as_ptr(), len) };
    let mut kinds = Vec::with_capacity((end - first) as usize);
    // Byte ranges of `block` holding consecutive data pages.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, page) in (first..end).enumerate() {
        let at = i * PAGE_SIZE as usize;
        let bytes = &block[at..at + PAGE_SIZE as usize];
        let kind = if !set.get(page) {
            UNCHANGED
        } else if page_is_zero(bytes) {
            ZERO
        } else {
            DATA
        };
        kinds.push(kind);
        if kind == DATA {
            match runs.last_mut() {
                Some((_, run_end)) if *run_end == at => *run_end += PAGE_SIZE as usize,
                _ => runs.push((at, at + PAGE_SIZE as usize)),
            }
        }
    }
    let header = wire::pages_header(first, &kinds);
    let mut parts: Vec<&[u8]> = Vec::with_capacity(1 + runs.len());
    parts.push(&header);
    parts.extend(runs.iter().map(|&(from, to)| &block[from..to]));
    wire::write_frame(w, Kind::Pages, &parts).map_err(WireError::Io)?;
    Ok(())
}

/// Pages carried between two looks at whether a hybrid round should stop early (64 MiB).
const CHECK_EVERY_PAGES: u64 = 16 << 10;

/// Asked every [`CHECK_EVERY_PAGES`] pages carried, with the first page not yet looked at and
/// the pages carried so far: whether to stop the round there.
type StopEarly<'a> = &'a mut dyn FnMut(u64, u64) -> Result<bool, MigrationError>;

/// Sends every page of `set`, block by block (blocks with nothing to carry are skipped).
/// Returns the pages carried, and the page where `stop_early` stopped the round, if it did.
fn send_pages(
    conn: &mut Conn,
    memory: &GuestMemoryMmap,
    regions: &[RamRegion],
    set: &PageBits,
    zero_unchanged: bool,
    mut stop_early: Option<StopEarly<'_>>,
) -> Result<(u64, Option<u64>), MigrationError> {
    let mut buf = vec![0u8; (BLOCK_PAGES * PAGE_SIZE) as usize];
    let mut sent = 0;
    let mut next_check = CHECK_EVERY_PAGES;
    for region in regions {
        let region_end = region.first_page() + region.pages();
        let mut first = region.first_page();
        while first < region_end {
            let end = (first + BLOCK_PAGES).min(region_end);
            if set.any(first, end) {
                sent += send_block(
                    &mut conn.w,
                    memory,
                    region,
                    (first, end),
                    set,
                    zero_unchanged,
                    &mut buf,
                )?;
            }
            first = end;
            if sent >= next_check {
                next_check = sent + CHECK_EVERY_PAGES;
                if let Some(stop) = stop_early.as_mut() {
                    if stop(first, sent)? {
                        conn.flush()?;
                        return Ok((sent, Some(first)));
                    }
                }
            }
        }
    }
    conn.flush()?;
    Ok((sent, None))
}

fn region_of(regions: &[RamRegion], page: u64) -> Option<&RamRegion> {
    regions
        .iter()
        .find(|r| page >= r.first_page() && page < r.first_page() + r.pages())
}

/// Moves the VM of `ctx` to `options.to`. On success the VM has ended here
/// ([`VmExit::Migrated`]); on an error returned as [`MigrationError::Resumed`] it runs on as if
/// nothing happened; on [`MigrationError::HandedOver`] it has ended too (the destination may
/// own it).
pub(crate) fn migrate(
    ctx: SendContext<'_>,
    options: &MigrateOptions,
) -> Result<MigrationReport, MigrationError> {
    let span = info_span!("migrate", to = %options.to, mode = %options.mode);
    let _enter = span.enter();
    let started = Instant::now();
    let machine = ctx.machine;
    let resumed = |source: MigrationError| MigrationError::Resumed {
        to: options.to.clone(),
        source: Box::new(source),
    };
    if let Some(exit) = machine.exit.get() {
        return Err(MigrationError::Exited(exit));
    }
    // A lazily restored VM's memory is registered with its page service until it is resident.
    if let Some(service) = ctx.page_service {
        service
            .wait_resident(RESIDENCY_WAIT)
            .map_err(|e| resumed(CheckpointError::NotResident(e).into()))?;
    }
    let mut conn = connect(options).map_err(resumed)?;
    let regions = ram_regions(&machine.memory);
    let pages: u64 = regions.iter().map(RamRegion::pages).sum();
    let mut report = MigrationReport {
        mode: options.mode,
        to: options.to.clone(),
        ..MigrationReport::default()
    };
    let disks = machine.devices.disks();
    let tag = format!(
        "migrate-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros())
    );
    let copy_disks = options.copy_disks && !disks.is_empty();
    handshake(&ctx, options, copy_disks, &regions, &mut conn).map_err(resumed)?;
    let mut copies = if copy_disks {
        let copies = Outgoing::send_frozen(&mut conn, disks, ctx.layers, &format!("{tag}-copy"))
            .map_err(resumed)?;
        report.disk_bytes_precopied = copies.bytes;
        Some(copies)
    } else {
        None
    };
    let lacking = precopy(&ctx, options, &mut conn, &regions, pages, &mut report).map_err(|e| {
        ctx.dirty.end_rounds();
        resumed(e)
    })?;

    // What was sent may still be on its way (socket buffers hold megabytes): the pause starts
    // once the destination has it all in place, so that the switchover does not wait behind it.
    // A hybrid migration leaves the pages written during its last round to post-copy: the
    // destination drops its stale copies of them first, while the guest still runs here.
    if options.mode != MigrationMode::Postcopy {
        if options.mode == MigrationMode::Hybrid {
            conn.send(Kind::Discard, &[&bitmap_bytes(&lacking)])
                .map_err(|e| {
                    ctx.dirty.end_rounds();
                    resumed(e.into())
                })?;
        }
        sync(&mut conn).map_err(|e| {
            ctx.dirty.end_rounds();
            resumed(e)
        })?;
    }

    // The pause.
    let mut preps = disk_cow::prepare_disks(disks, &tag).map_err(|e| resumed(e.into()))?;
    // One more read of the dirty log just before the pause, so that the one in the pause (a
    // cost that grows with the pages written since the last read) finds little.
    let mut lacking = lacking;
    // The switchover's bitmap, written now so that its memory is mapped when the pause
    // rewrites it.
    let mut lacking_bytes = bitmap_bytes(&lacking);
    if options.mode != MigrationMode::Postcopy {
        let recent = ctx
            .dirty
            .next_round(&machine.vm)
            .map_err(|e| resumed(e.into()))?;
        lacking.or(&recent);
    }
    let pause_start = Instant::now();
    let guard = machine
        .control
        .pause()
        .map_err(|e| resumed(CheckpointError::Pause(e.into()).into()))?;
    if let Some(exit) = machine.exit.get() {
        return Err(MigrationError::Exited(exit));
    }
    let frozen = disk_cow::freeze_disks(disks, IoPolicy::Live).map_err(|e| resumed(e.into()))?;
    let handed = (|| -> Result<(PageBits, u64), MigrationError> {
        if options.mode != MigrationMode::Postcopy {
            let last = ctx.dirty.next_round(&machine.vm)?;
            lacking.or(&last);
        }
        ctx.dirty.end_rounds();
        let phase = |done: &'static str| {
            debug!(done, us = pause_start.elapsed().as_micros() as u64);
        };
        phase("dirty log");
        let state = checkpoint::save_state(&machine.vm, &machine.devices, &guard)?;
        phase("state");
        let switched = disk_cow::switch_disks(disks, &mut preps);
        disk_cow::record_layers(&preps, ctx.layers);
        switched?;
        // Writes issued before the pause land in the frozen layers first.
        disk_cow::wait_parents(disks)?;
        phase("disks");
        let disk_configs = preps
            .iter()
            .zip(&state.devices.blocks)
            .enumerate()
            .map(|(i, (prep, s))| prep.frozen_layer(i, s.disk.readonly))
            .collect::<Vec<_>>();
        if let Some(copies) = copies.as_mut() {
            report.disk_bytes_in_pause = copies.send_last(&mut conn, &disk_configs)?;
            phase("disk layer");
        }
        if options.mode == MigrationMode::Precopy {
            report.pages_in_pause =
                send_pages(&mut conn, &machine.memory, &regions, &lacking, false, None)?.0;
            lacking = PageBits::new(pages);
        }
        report.pages_postcopy = lacking.count();
        let switch = serde_json::to_vec(&Switch {
            disks: disk_configs,
            copied: copies.is_some(),
        })
        .expect("the switchover serializes");
        let encoded = ckpt_format::encode_state(&state).map_err(MigrationError::State)?;
        bitmap_bytes_into(&lacking, &mut lacking_bytes);
        conn.send(
            Kind::Switchover,
            &[
                &(switch.len() as u32).to_le_bytes(),
                &switch,
                &(encoded.len() as u32).to_le_bytes(),
                &encoded,
                &lacking_bytes,
            ],
        )?;
        conn.flush()?;
        report.pause_us = pause_start.elapsed().as_micros() as u64;
        conn.r.get_mut().spin_waits(SPIN_HANDOVER);
        wire::expect_frame(&mut conn.r, Kind::Ready, "the destination ready")?;
        let ready_us = pause_start.elapsed().as_micros() as u64;
        conn.r.get_mut().spin_waits(Duration::ZERO);
        conn.send(Kind::Go, &[])?;
        conn.flush()?;
        Ok((lacking, ready_us))
    })();
    let (lacking, ready_us) = match handed {
        Ok(handed) => handed,
        Err(e) => {
            warn!("migration failed before the hand-over, resuming: {e}");
            drop(frozen);
            guard.resume();
            return Err(resumed(e));
        }
    };
    // From here on the destination may run the VM: this one never runs again.
    machine.exit.notify(VmExit::Migrated(options.to.clone()));
    machine.control.request_exit();
    let served = serve(&mut conn, &machine.memory, &regions, &lacking, ready_us);
    drop(frozen);
    drop(guard);
    let downtime_us = served.map_err(|e| MigrationError::HandedOver {
        to: options.to.clone(),
        source: Box::new(e),
    })?;
    // The COW files this VM would have continued on: the destination writes its own.
    for prep in &preps {
        if let Err(e) = std::fs::remove_file(prep.overlay()) {
            warn!(path = %prep.overlay().display(), "cannot remove a COW file no VM uses: {e}");
        }
    }
    report.downtime_us = downtime_us;
    report.total_us = started.elapsed().as_micros() as u64;
    report.bytes_sent = conn.w.bytes;
    info!(
        downtime_us,
        total_us = report.total_us,
        bytes = report.bytes_sent,
        rounds = report.precopy_rounds,
        postcopy_pages = report.pages_postcopy,
        disk_bytes = report.disk_bytes_precopied + report.disk_bytes_in_pause,
        "VM migrated"
    );
    Ok(report)
}

/// `bits` as the wire carries a bitmap: its words, little endian.
fn bitmap_bytes(bits: &PageBits) -> Vec<u8> {
    let mut out = vec![0u8; bits.words().len() * 8];
    bitmap_bytes_into(bits, &mut out);
    out
}

/// Writes the words of `bits` into `out` (as many bytes), little endian.
fn bitmap_bytes_into(bits: &PageBits, out: &mut [u8]) {
    for (bytes, word) in out.chunks_exact_mut(8).zip(bits.words()) {
        bytes.copy_from_slice(&word.to_le_bytes());
    }
}

/// Waits until the destination has put in place everything sent so far.
fn sync(conn: &mut Conn) -> Result<(), MigrationError> {
    conn.send(Kind::Sync, &[])?;
    conn.flush()?;
    wire::expect_frame(&mut conn.r, Kind::Synced, "the destination in step")?;
    Ok(())
}

/// Says what VM comes and which pages its memory holds, and waits until the destination has
/// its memory and KVM VM ready.
fn handshake(
    ctx: &SendContext<'_>,
    options: &MigrateOptions,
    copy_disks: bool,
    regions: &[RamRegion],
    conn: &mut Conn,
) -> Result<(), MigrationError> {
    let machine = ctx.machine;
    let hello = Hello {
        mem_size: machine.summary.mem_size,
        vcpus: machine.summary.vcpus,
        mode: options.mode,
        kernel: machine.summary.kernel.clone(),
        cmdline: machine.summary.cmdline.clone(),
        copy_disks,
    };
    wire::write_preamble(&mut conn.w).map_err(WireError::Io)?;
    let hello = serde_json::to_vec(&hello).expect("the hello serializes");
    conn.send(Kind::Hello, &[&hello])?;
    let pages = regions.iter().map(RamRegion::pages).sum();
    let populated =
        populated_pages(&machine.memory, regions).unwrap_or_else(|| PageBits::all(pages));
    conn.send(Kind::Populated, &[&bitmap_bytes(&populated)])?;
    conn.flush()?;
    wire::expect_frame(&mut conn.r, Kind::Prepared, "the destination prepared")?;
    Ok(())
}

/// Pre-copy, the VM running: the first pass sends every page that is not zero, each round then
/// the pages written during the previous one, until what is left would fit the downtime
/// target, the rounds run out, or rounds stop shrinking (a round leaves more than three
/// quarters of what it sent; for `hybrid`, more than half). Returns the pages the destination
/// still lacks (all of them for `postcopy`).
fn precopy(
    ctx: &SendContext<'_>,
    options: &MigrateOptions,
    conn: &mut Conn,
    regions: &[RamRegion],
    pages: u64,
    report: &mut MigrationReport,
) -> Result<PageBits, MigrationError> {
    let machine = ctx.machine;
    if options.mode == MigrationMode::Postcopy {
        return Ok(PageBits::all(pages));
    }
    ctx.dirty.start_rounds(&machine.vm, &machine.memory)?;
    // Device writes count too: the disks carry the dirty log's observer from now on.
    if ctx.dirty.observer_first_installed() {
        for (index, h) in machine.devices.disks().iter().enumerate() {
            h.set_dma_observer(Some(ctx.dirty.observer()))
                .map_err(|source| CheckpointError::Disk { index, source })?;
        }
    }
    // Logging is on: a page populated after this look is logged as written.
    let mut to_send = populated_pages(&machine.memory, regions).unwrap_or_else(|| {
        debug!("guest memory is not all anonymous: every page is read");
        PageBits::all(pages)
    });
    let mut first_pass = true;
    let hybrid = options.mode == MigrationMode::Hybrid;
    loop {
        let round = Instant::now();
        let bytes = conn.w.bytes;
        // In hybrid, the round looks at the dirty log as it goes: once it has sent a quarter
        // of its pages and the guest has written again more than half of what it sent, the
        // guest outruns the stream, and the rest goes to post-copy at once instead of after a
        // round whose pages are mostly stale. (A guest that rewrites a small set of pages
        // makes at most that set stale, a small share of a quarter of memory.)
        let mut written_meanwhile = PageBits::new(pages);
        let judged_after = (to_send.count() / 4).max(CHECK_EVERY_PAGES);
        let mut outrun = |next: u64, sent: u64| -> Result<bool, MigrationError> {
            written_meanwhile.or(&ctx.dirty.next_round(&machine.vm)?);
            let stale = to_send.count_both_below(&written_meanwhile, next);
            Ok(sent >= judged_after && stale * 2 > sent)
        };
        let (sent, cut) = send_pages(
            conn,
            &machine.memory,
            regions,
            &to_send,
            first_pass,
            hybrid.then_some(&mut outrun as StopEarly<'_>),
        )?;
        report.pages_precopied += sent;
        report.precopy_rounds += 1;
        let secs = round.elapsed().as_secs_f64().max(1e-6);
        let rate = (conn.w.bytes - bytes) as f64 / secs;
        first_pass = false;
        let mut left = ctx.dirty.next_round(&machine.vm)?;
        left.or(&written_meanwhile);
        if let Some(at) = cut {
            left.or_from(&to_send, at);
            info!(
                round = report.precopy_rounds,
                sent_pages = sent,
                left_pages = left.count(),
                "the guest writes memory faster than pre-copy sends it: post-copy sends the rest"
            );
            return Ok(left);
        }
        to_send = left;
        let left = (to_send.count() * PAGE_SIZE) as f64;
        let fits = rate <= 0.0 || left / rate <= options.max_downtime.as_secs_f64();
        debug!(
            round = report.precopy_rounds,
            left_pages = to_send.count(),
            rate_mib_s = rate / (1 << 20) as f64,
            "pre-copy round"
        );
        // A hybrid migration goes on only while rounds shrink: a guest that rewrote half of
        // what a round sent would make the next one resend it for little gain, and leaves
        // the destination more stale pages to drop in the pause.
        let shrinking = to_send.count() * 2 <= sent;
        let hybrid_done = options.mode == MigrationMode::Hybrid && !shrinking;
        // A pre-copy goes on while each round leaves at most three quarters of what it sent.
        // Past that the guest writes about as fast as the stream sends: more rounds would
        // barely shorten the pause, while every one of them slows the guest (its first write
        // to each page after a read of the dirty log is a fault).
        let stalled = to_send.count() * 4 > sent * 3;
        if fits || hybrid_done || stalled || report.precopy_rounds > options.max_rounds {
            if !fits && options.mode == MigrationMode::Precopy {
                warn!(
                    round = report.precopy_rounds,
                    sent_pages = sent,
                    left_pages = to_send.count(),
                    "pre-copy does not converge: the pause sends what is left"
                );
            }
            return Ok(to_send);
        }
    }
}

/// The pages of guest memory that were ever populated (mapped, or swapped out), from
/// `/proc/self/pagemap`. A page of anonymous memory never populated reads as zero, and reading
/// it costs a fault: the first pass skips those without touching them. `None` where memory is
/// a file's mapping (a page not mapped there holds the file's bytes) or the map is unreadable.
fn populated_pages(memory: &GuestMemoryMmap, regions: &[RamRegion]) -> Option<PageBits> {
    if memory.iter().any(|r| r.file_offset().is_some()) {
        return None;
    }
    crate::checkpoint::memory_cow::populated_pages(regions)
}

/// What the destination said after `Go`.
enum Incoming {
    Request(u64, u64),
    Running(u64),
    Resident,
    Failed(MigrationError),
}

/// Reads the destination's frames after `Go` and passes them on, until it is resident or the
/// connection fails.
fn read_incoming(r: &mut BufReader<ReadHalf>, pages: u64, tx: &std::sync::mpsc::Sender<Incoming>) {
    loop {
        let msg = match wire::read_frame(r) {
            Ok((Kind::Request, payload)) => match wire::decode_request(&payload, pages) {
                Ok((first, end)) => Incoming::Request(first, end),
                Err(e) => Incoming::Failed(e.into()),
            },
            // The destination's own time from the switchover's arrival to its vCPUs running.
            Ok((Kind::Running, payload)) => match <[u8; 8]>::try_from(payload.as_slice()) {
                Ok(took) => Incoming::Running(u64::from_le_bytes(took)),
                Err(_) => {
                    Incoming::Failed(WireError::malformed(Kind::Running, "not a duration").into())
                }
            },
            Ok((Kind::Resident, _)) => Incoming::Resident,
            Ok((got, _)) => Incoming::Failed(
                WireError::Unexpected {
                    got,
                    expected: "a page request or the destination resident",
                }
                .into(),
            ),
            Err(e) => Incoming::Failed(e.into()),
        };
        let last = !matches!(msg, Incoming::Request(..) | Incoming::Running(_));
        if tx.send(msg).is_err() || last {
            return;
        }
    }
}

/// After `Go`: pushes every block the destination lacks, in address order, answering its
/// requests (the blocks its vCPUs are waiting for) first, until it has every page. Each block
/// is sent once; the pushing starts once the vCPUs run, so as not to slow their start.
/// Returns the downtime: `ready_us` (the pause until the destination's `Ready` arrived) plus
/// the destination's time from sending `Ready` until its vCPUs ran. That needs neither host's
/// clock, and errs only on the long side: the time `Ready` spent on its way is counted twice,
/// once in each part.
fn serve(
    conn: &mut Conn,
    memory: &GuestMemoryMmap,
    regions: &[RamRegion],
    lacking: &PageBits,
    ready_us: u64,
) -> Result<u64, MigrationError> {
    let pages = lacking.len();
    let mut sent = vec![false; pages.div_ceil(BLOCK_PAGES) as usize];
    let mut blocks = regions.iter().flat_map(|r| {
        let end = r.first_page() + r.pages();
        (r.first_page()..end)
            .step_by(BLOCK_PAGES as usize)
            .map(move |first| (r, first, (first + BLOCK_PAGES).min(end)))
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let Conn { r, w } = conn;
    std::thread::scope(|scope| {
        scope.spawn(|| read_incoming(r, pages, &tx));
        let result = (|| {
            let mut downtime = None;
            let mut pushing = false;
            loop {
                let msg = if pushing {
                    rx.try_recv().ok()
                } else {
                    Some(rx.recv().map_err(|_| WireError::Closed)?)
                };
                let mut push_block = |region: &RamRegion, first: u64, end: u64| {
                    let block = (first / BLOCK_PAGES) as usize;
                    if sent[block] || !lacking.any(first, end) {
                        return Ok::<(), MigrationError>(());
                    }
                    sent[block] = true;
                    send_stopped_block(w, memory, region, (first, end), lacking)?;
                    w.flush().map_err(WireError::Io)?;
                    Ok(())
                };
                match msg {
                    Some(Incoming::Request(first, end)) => {
                        let region = region_of(regions, first)
                            .filter(|r| {
                                end <= r.first_page() + r.pages() && first % BLOCK_PAGES == 0
                            })
                            .ok_or_else(|| {
                                WireError::malformed(Kind::Request, "not a block of guest memory")
                            })?;
                        push_block(region, first, end)?;
                    }
                    Some(Incoming::Running(took)) => {
                        let total = ready_us.saturating_add(took);
                        downtime = Some(total);
                        pushing = true;
                        info!(downtime_us = total, "the destination runs the VM");
                    }
                    Some(Incoming::Resident) => {
                        return downtime.ok_or(MigrationError::Wire(WireError::Unexpected {
                            got: Kind::Resident,
                            expected: "the destination running",
                        }));
                    }
                    Some(Incoming::Failed(e)) => return Err(e),
                    None => match blocks.next() {
                        Some((region, first, end)) => push_block(region, first, end)?,
                        None => pushing = false,
                    },
                }
            }
        })();
        if result.is_err() {
            // Unblocks the reader.
            let _ = w
                .inner
                .get_ref()
                .socket()
                .shutdown(std::net::Shutdown::Both);
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, HugePages};

    #[test]
    fn the_first_pass_reads_only_pages_ever_populated() {
        let memory = create_guest_memory(64 << 20, HugePages::None).unwrap();
        let regions = ram_regions(&memory);
        let written = [0u64, 7, 4095, 9000, 16383];
        for page in written {
            memory
                .write_slice(&[0xa5], GuestAddress(page * PAGE_SIZE + 17))
                .unwrap();
        }
        let populated = populated_pages(&memory, &regions).expect("anonymous memory");
        let pages: Vec<u64> = (0..populated.len()).filter(|&p| populated.get(p)).collect();
        assert_eq!(pages, written);
    }
}
