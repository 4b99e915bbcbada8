//! What the benchmarks share: the sizes they measure, the guest's progress stamps and what they
//! say about a checkpoint, the row of a measured checkpoint, and `dd` as the yardstick.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ckpt_format::{CheckpointOptions, Strategy};
use serde::Serialize;
use vmm::{CheckpointRequest, Progress, StoreSpec};
use vmm::{Console, MemSize, Vm};

use crate::cli::{HugePagesArg, VmArgs};

/// Time the guest runs undisturbed before a checkpoint, and after it.
pub const SETTLE: Duration = Duration::from_millis(600);

/// How to boot a one-vCPU test guest of `mem` bytes running `cmdline`.
pub fn guest_args(kernel: &Path, cmdline: String, mem: u64) -> VmArgs {
    VmArgs {
        kernel: kernel.to_path_buf(),
        initrd: None,
        cmdline,
        mem: MemSize(mem).to_string(),
        vcpus: 1,
        hugepages: HugePagesArg::None,
        disks: Vec::new(),
    }
}

/// A checkpoint into the directory `dir` with `strategy` and the default policies.
pub fn dir_checkpoint(dir: &Path, strategy: Strategy) -> CheckpointRequest {
    CheckpointRequest {
        store: StoreSpec::Dir(dir.to_path_buf()),
        options: CheckpointOptions {
            strategy,
            ..Default::default()
        },
        pause_probe: None,
        parent: None,
    }
}

/// Boots the `dirty` guest of `vm_args`, lets it warm up (within `boot_wait`) and run
/// undisturbed, takes a checkpoint into `dir` (replacing what is there), lets the guest run on,
/// and stops it. Returns the checkpoint and the guest's progress stamps around it.
pub fn live_checkpoint(
    vm_args: &VmArgs,
    dir: &Path,
    strategy: Strategy,
    boot_wait: Duration,
) -> anyhow::Result<(Taken, Stamps)> {
    let stamps = Stamps::default();
    let vm = Vm::boot(vm_args.config(Console::Writer(Box::new(stamps.clone())))?)?;
    // Warm up: the first passes populate memory; then measure the undisturbed rate.
    if !stamps.wait_for(3, boot_wait) {
        bail!("the guest printed no progress in {boot_wait:?}");
    }
    let base_start = Instant::now();
    if !stamps.settle(boot_wait) {
        bail!("the guest made fewer than 2 passes in {boot_wait:?}");
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    let t0 = Instant::now();
    let manifest = vm.checkpoint(&dir_checkpoint(dir, strategy), &Progress::default())?;
    let t1 = Instant::now();
    std::thread::sleep(SETTLE);
    if let Some(exit) = vm.exit_status() {
        bail!("the guest stopped during the benchmark: {exit}");
    }
    vm.stop();
    let m = &manifest.metrics;
    let taken = Taken {
        window: Window { base_start, t0, t1 },
        pause_us: m.pause_us,
        total_us: m.total_us,
        bytes: m.bytes_written,
        pages: Some((m.pages_saved_by_fault, m.pages_saved_in_background)),
        vmm_guest_lost_us: Some(m.guest_lost_us),
    };
    Ok((taken, stamps))
}

/// What a checkpoint of either system yields before the guest view is computed.
pub struct Taken {
    /// The measurement's instants.
    pub window: Window,
    /// VMM-reported pause.
    pub pause_us: u64,
    /// From the request to the completion.
    pub total_us: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Pages saved by fault and in the background (cowvm only).
    pub pages: Option<(u64, u64)>,
    /// The VMM's own estimate of the guest time lost (cowvm only).
    pub vmm_guest_lost_us: Option<u64>,
}

/// What a row measures: the system, its method, the guest memory size and the workload.
pub struct Subject {
    /// `cowvm` or `qemu`.
    pub system: String,
    /// Strategy.
    pub method: String,
    /// Guest memory in bytes.
    pub mem: u64,
    /// Workload description.
    pub workload: String,
}

impl Row {
    /// The row of a checkpoint `taken` while the guest printed `stamps`, next to `dd` writing
    /// as many bytes into `dd_dir`.
    pub fn measured(
        subject: Subject,
        taken: &Taken,
        stamps: &Stamps,
        dd_dir: &Path,
        restore_us: Option<u64>,
    ) -> anyhow::Result<Row> {
        let view = guest_view(&stamps.snapshot(), &taken.window)?;
        let dd_took = dd(dd_dir, taken.bytes)?;
        Ok(Row {
            system: subject.system,
            method: subject.method,
            mem_mib: subject.mem >> 20,
            workload: subject.workload,
            error: None,
            pause_us: taken.pause_us,
            guest_pause_us: view.guest_pause_us,
            guest_lost_us: view.guest_lost_us,
            vmm_guest_lost_us: taken.vmm_guest_lost_us,
            guest_progress: view.guest_progress,
            total_us: taken.total_us,
            bytes_written: taken.bytes,
            dd_us: dd_took.as_micros() as u64,
            total_vs_dd: taken.total_us as f64 / dd_took.as_micros().max(1) as f64,
            pages_saved_by_fault: taken.pages.map(|p| p.0),
            pages_saved_in_background: taken.pages.map(|p| p.1),
            restore_us,
            timeline: view.timeline,
        })
    }

    /// The row of a measurement that failed with `error`: no figures, only the error.
    pub fn failed(subject: Subject, error: &anyhow::Error) -> Row {
        Row {
            system: subject.system,
            method: subject.method,
            mem_mib: subject.mem >> 20,
            workload: subject.workload,
            error: Some(format!("{error:#}")),
            pause_us: 0,
            guest_pause_us: 0,
            guest_lost_us: 0,
            vmm_guest_lost_us: None,
            guest_progress: 0.0,
            total_us: 0,
            bytes_written: 0,
            dd_us: 0,
            total_vs_dd: 0.0,
            pages_saved_by_fault: None,
            pages_saved_in_background: None,
            restore_us: None,
            timeline: Vec::new(),
        }
    }
}

/// The guest memory sizes a benchmark measures: `--sizes`, or only 256 MiB with `--quick`.
pub fn memory_sizes(quick: bool, sizes: &[String]) -> anyhow::Result<Vec<u64>> {
    if quick {
        return Ok(vec![256 << 20]);
    }
    sizes
        .iter()
        .map(|s| {
            s.parse::<vmm::MemSize>()
                .map(|m| m.0)
                .with_context(|| format!("--sizes {s}"))
        })
        .collect()
}

/// One measured checkpoint.
#[derive(Debug, Serialize)]
pub struct Row {
    /// `cowvm` or `qemu`.
    pub system: String,
    /// Strategy.
    pub method: String,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Workload description.
    pub workload: String,
    /// Why the measurement failed (then every figure is zero or absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// VMM-reported pause.
    pub pause_us: u64,
    /// Longest stall of the guest's progress stamps during the checkpoint, beyond a normal pass.
    pub guest_pause_us: u64,
    /// Guest time lost, from its progress stamps: the passes it fell behind its undisturbed
    /// rate, as time at that rate.
    pub guest_lost_us: u64,
    /// The VMM's estimate of the guest time lost (cowvm: pause plus fault stalls).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm_guest_lost_us: Option<u64>,
    /// Guest progress during the checkpoint as a fraction of its undisturbed progress.
    pub guest_progress: f64,
    /// From the checkpoint request until it is durable and complete.
    pub total_us: u64,
    /// Bytes written to the store.
    pub bytes_written: u64,
    /// `dd` writing the same bytes with fsync to the same filesystem.
    pub dd_us: u64,
    /// `total_us / dd_us`.
    pub total_vs_dd: f64,
    /// Pages saved by the write-fault path (cowvm only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pages_saved_by_fault: Option<u64>,
    /// Pages saved by the background writer (cowvm only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pages_saved_in_background: Option<u64>,
    /// Restore to the guest's next progress line (when measured).
    pub restore_us: Option<u64>,
    /// Guest progress relative to undisturbed, over time around the checkpoint (ms, fraction).
    #[serde(skip)]
    pub timeline: Vec<(f64, f64)>,
}

/// One `dirty pass=<n> tsc=<t>` line and when it reached the host.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    /// Arrival on the host.
    pub at: Instant,
    /// Pass number.
    pub pass: u64,
    /// The guest's TSC when it printed the line.
    pub tsc: u64,
}

/// The console so far: a partial line, and the progress stamps.
#[derive(Default)]
struct StampLog {
    partial: Vec<u8>,
    stamps: Vec<Stamp>,
}

/// Console sink that records progress stamps with their arrival time (the same for every
/// system: cowvm writes the console into it, the QEMU runner copies QEMU's serial output in).
#[derive(Clone, Default)]
pub struct Stamps(Arc<Mutex<StampLog>>);

fn parse_stamp(line: &str) -> Option<(u64, u64)> {
    // Firmware output may precede the first stamp on its line.
    let rest = &line[line.find("dirty pass=")? + "dirty pass=".len()..];
    let mut words = rest.split_whitespace();
    let pass = words.next()?.parse().ok()?;
    let tsc = words.next()?.strip_prefix("tsc=")?.parse().ok()?;
    Some((pass, tsc))
}

impl Write for Stamps {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let now = Instant::now();
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        inner.partial.extend_from_slice(buf);
        while let Some(nl) = inner.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = inner.partial.drain(..=nl).collect();
            if let Some((pass, tsc)) = parse_stamp(&String::from_utf8_lossy(&line)) {
                inner.stamps.push(Stamp { at: now, pass, tsc });
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Stamps {
    pub fn snapshot(&self) -> Vec<Stamp> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stamps
            .clone()
    }

    /// Lets the guest run undisturbed for [`SETTLE`], and on until it has printed two more
    /// stamps (a pass can take longer than that on a loaded host), so that the interval shows
    /// its rate; false if that takes longer than `timeout`.
    pub fn settle(&self, timeout: Duration) -> bool {
        let n = self.snapshot().len();
        std::thread::sleep(SETTLE);
        self.wait_for(n + 2, timeout)
    }

    /// Waits until `n` stamps have arrived; false after `timeout`.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let start = Instant::now();
        while self.snapshot().len() < n {
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

/// Passes completed by `t`, interpolated linearly between the stamps around it.
fn passes_at(stamps: &[Stamp], t: Instant) -> f64 {
    let i = stamps.partition_point(|s| s.at <= t);
    match (i.checked_sub(1).map(|j| &stamps[j]), stamps.get(i)) {
        (Some(a), Some(b)) => {
            let f = (t - a.at).as_secs_f64() / (b.at - a.at).as_secs_f64().max(1e-9);
            a.pass as f64 + f * (b.pass - a.pass) as f64
        }
        (Some(a), None) => a.pass as f64,
        (None, _) => 0.0,
    }
}

/// The instants of a measurement: undisturbed from `base_start` to `t0`, checkpoint from `t0`
/// (the request) to `t1` (complete, the VM running).
pub struct Window {
    pub base_start: Instant,
    pub t0: Instant,
    pub t1: Instant,
}

/// What the progress stamps say about a checkpoint.
pub struct GuestView {
    pub guest_progress: f64,
    pub guest_pause_us: u64,
    pub guest_lost_us: u64,
    pub timeline: Vec<(f64, f64)>,
}

/// Guest progress and the guest-visible pause from the stamps around `w`. The longest gap
/// between consecutive stamps is measured with the guest's own TSC (calibrated against the
/// host clock over the undisturbed interval), or with arrival times where those are longer
/// (a hypervisor may hold the guest TSC still while the VM is stopped).
pub fn guest_view(stamps: &[Stamp], w: &Window) -> anyhow::Result<GuestView> {
    let (t0, t1) = (w.t0, w.t1);
    let base_rate = (passes_at(stamps, t0) - passes_at(stamps, w.base_start))
        / (t0 - w.base_start).as_secs_f64();
    if base_rate <= 0.0 {
        bail!("the guest made no progress before the checkpoint");
    }
    // Progress is the work the guest did not lose: the shortfall against the undisturbed rate
    // from the request to the last stamp (the guest runs at full speed again after the
    // checkpoint), so that stamp granularity does not decide short checkpoints.
    let end = stamps.last().map_or(t1, |s| s.at.max(t1));
    let done = passes_at(stamps, end) - passes_at(stamps, t0);
    let lost = (base_rate * (end - t0).as_secs_f64() - done).max(0.0);
    let guest_lost_us = (lost / base_rate * 1e6) as u64;
    let guest_progress = (1.0 - lost / (base_rate * (t1 - t0).as_secs_f64())).clamp(0.0, 1.0);
    let base: Vec<&Stamp> = stamps
        .iter()
        .filter(|s| s.at >= w.base_start && s.at <= t0)
        .collect();
    let tsc_hz = match (base.first(), base.last()) {
        (Some(a), Some(b)) if b.at > a.at && b.tsc > a.tsc => {
            (b.tsc - a.tsc) as f64 / (b.at - a.at).as_secs_f64()
        }
        _ => bail!("too few progress stamps before the checkpoint"),
    };
    let normal_gap = 1.0 / base_rate;
    let max_gap = stamps
        .windows(2)
        .filter(|p| p[1].at >= t0 && p[0].at <= t1)
        .map(|p| {
            let by_tsc = p[1].tsc.saturating_sub(p[0].tsc) as f64 / tsc_hz;
            by_tsc.max((p[1].at - p[0].at).as_secs_f64())
        })
        .fold(0.0, f64::max);
    let guest_pause_us = ((max_gap - normal_gap).max(0.0) * 1e6) as u64;
    let margin = Duration::from_millis(300);
    let timeline = stamps
        .windows(2)
        .filter(|p| p[0].at + margin >= t0 && p[1].at <= t1 + margin)
        .map(|p| {
            let mid = p[0].at + (p[1].at - p[0].at) / 2;
            let rate = (p[1].pass - p[0].pass) as f64 / (p[1].at - p[0].at).as_secs_f64();
            let x = mid.checked_duration_since(t0).map_or_else(
                || -(t0 - mid).as_secs_f64() * 1e3,
                |d| d.as_secs_f64() * 1e3,
            );
            (x, (rate / base_rate).min(1.5))
        })
        .collect();
    Ok(GuestView {
        guest_progress,
        guest_pause_us,
        guest_lost_us,
        timeline,
    })
}

pub fn parse_strategy(s: &str) -> anyhow::Result<Strategy> {
    Ok(match s {
        "uffd" => Strategy::Uffd,
        "fork" => Strategy::Fork,
        "stop" => Strategy::Stop,
        other => bail!("unknown strategy {other:?} (uffd, fork or stop)"),
    })
}

/// Time for `dd` to write `bytes` with fsync into `dir`.
pub fn dd(dir: &Path, bytes: u64) -> anyhow::Result<Duration> {
    let file = dir.join("dd.bin");
    let start = Instant::now();
    let status = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .args(["bs=1M", "conv=fsync", "status=none"])
        .arg(format!("count={}", bytes.div_ceil(1 << 20)))
        .status()
        .context("run dd")?;
    let took = start.elapsed();
    std::fs::remove_file(&file).ok();
    if !status.success() {
        bail!("dd failed: {status}");
    }
    Ok(took)
}

/// Where a checkpoint's files are when a restore is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PageCache {
    /// On the device only: written back, then dropped from the host's page cache, as long
    /// after a checkpoint (or on another host).
    Cold,
    /// Read once into the host's page cache, as when one checkpoint is restored again and
    /// again.
    Warm,
}

impl PageCache {
    /// Where the files are, for reports.
    pub fn describe(self) -> &'static str {
        match self {
            PageCache::Cold => "on the device only (dropped from the page cache)",
            PageCache::Warm => "in the host's page cache",
        }
    }

    /// Puts the file at `path`, or every file in the directory at `path`, in this state, so that
    /// restores of both systems start from the same place: cowvm writes its images with direct
    /// I/O (they are not cached afterwards), QEMU through the page cache.
    pub fn apply(self, path: &Path) -> anyhow::Result<()> {
        if path.is_dir() {
            for entry in std::fs::read_dir(path).with_context(|| format!("{}", path.display()))? {
                self.apply_file(&entry?.path())?;
            }
            Ok(())
        } else {
            self.apply_file(path)
        }
    }

    fn apply_file(self, path: &Path) -> anyhow::Result<()> {
        let mut file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
        file.sync_all()
            .with_context(|| format!("sync {}", path.display()))?;
        match self {
            PageCache::Warm => {
                std::io::copy(&mut file, &mut std::io::sink())
                    .with_context(|| format!("read {}", path.display()))?;
            }
            PageCache::Cold => {
                // SAFETY: advice on an open descriptor; no memory is passed.
                let rc = unsafe {
                    libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
                };
                if rc != 0 {
                    bail!(
                        "drop {} from the page cache: {}",
                        path.display(),
                        std::io::Error::from_raw_os_error(rc)
                    );
                }
            }
        }
        Ok(())
    }
}

/// Working set of the `dirty` guest: `percent` of memory, within low RAM (below 3 GiB), minus
/// room for the guest image.
pub fn working_set(mem: u64, percent: u64) -> u64 {
    let usable = mem.min(3 << 30) - (32 << 20);
    (usable * percent / 100) & !((2 << 20) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_parse_with_firmware_noise_and_tsc() {
        assert_eq!(parse_stamp("dirty pass=3 tsc=99\n"), Some((3, 99)));
        assert_eq!(
            parse_stamp("Booting from ROM..dirty pass=1 tsc=7"),
            Some((1, 7))
        );
        assert_eq!(parse_stamp("dirty pass=3\n"), None);
        assert_eq!(parse_stamp("dirty done passes=3 checksum=00"), None);
    }

    #[test]
    fn stalled_guest_shows_a_pause_and_no_progress() {
        // 1 pass per 10 ms (TSC 1 MHz), then a 500 ms stop starting at 300 ms, then 10 ms again.
        let origin = Instant::now();
        let at = |ms: u64| origin + Duration::from_millis(ms);
        let mut stamps = Vec::new();
        let mut pass = 0;
        let mut t = 0;
        while t <= 1400 {
            pass += 1;
            stamps.push(Stamp {
                at: at(t),
                pass,
                tsc: t * 1000,
            });
            t += if t == 300 { 510 } else { 10 };
        }
        let w = Window {
            base_start: at(0),
            t0: at(300),
            t1: at(800),
        };
        let view = guest_view(&stamps, &w).unwrap();
        assert!(
            (490_000..=510_000).contains(&view.guest_pause_us),
            "{}",
            view.guest_pause_us
        );
        assert!(view.guest_progress < 0.05, "{}", view.guest_progress);
        assert!(
            (490_000..=510_000).contains(&view.guest_lost_us),
            "{}",
            view.guest_lost_us
        );
    }
}
