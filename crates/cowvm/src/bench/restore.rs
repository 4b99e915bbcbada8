//! `cowvm bench restore`: restore latency per memory size — cowvm with its page service (lazy),
//! the same on a standby VM made in advance, and eagerly, and QEMU restoring the same guest from its migration stream — to the first
//! guest instruction and to the guest's next full pass over its memory, by the guest's own
//! progress lines; and clone density: time and host memory (RSS and PSS of this process) to run
//! 1, 10 and 50 clones of one checkpoint whose guest only reads.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ckpt_format::Strategy;
use serde::Serialize;
use vmm::{Console, MemSize, Progress, RestoreOptions, Standby, StoreSpec, Vm};

use super::common::{dir_checkpoint, guest_args, memory_sizes, working_set, PageCache, Stamps};
use super::compare::qemu::{self, Qemu, QemuConfig};
use super::plot::{line_chart, line_chart_log_y, Chart, Series};

/// Boot (QEMU runs its firmware first) and the passes that populate memory.
const BOOT_WAIT: Duration = Duration::from_secs(120);
/// Passes the guest completes before its checkpoint: the first one populates memory.
const WARM_PASSES: usize = 3;

#[derive(clap::Args, Debug)]
pub struct RestoreBenchArgs {
    /// The test guest kernel (the same binary boots under QEMU).
    #[arg(long)]
    kernel: PathBuf,
    /// Guest memory sizes for the latency measurement.
    #[arg(long, value_delimiter = ',', default_value = "256M,1G,4G")]
    sizes: Vec<String>,
    /// Clone counts for the density measurement (of a 256 MiB checkpoint).
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    clones: Vec<usize>,
    /// Only 256 MiB and 1 and 10 clones.
    #[arg(long)]
    quick: bool,
    /// Leave QEMU out (it is measured by default, and needed then).
    #[arg(long)]
    no_qemu: bool,
    /// Directory for the checkpoints and QEMU's migration files (removed afterwards).
    #[arg(long, default_value = "target/bench/restore")]
    store_dir: PathBuf,
    /// Directory for the plots.
    #[arg(long, default_value = "target/bench")]
    plot_dir: PathBuf,
    /// Restores per size and mode; every figure shown is the median.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Where the checkpoint's files (cowvm's image, QEMU's migration file) are when each
    /// restore starts: only on the device (`cold`), or also in the host's page cache (`warm`).
    #[arg(long, value_enum, default_value = "cold")]
    page_cache: PageCache,
}

/// How a restore was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    /// cowvm, memory served by the page service.
    Lazy,
    /// cowvm, memory read and verified before the first instruction.
    Eager,
    /// cowvm, lazily, on a standby VM made before the restore was asked for.
    Standby,
    /// QEMU `-incoming` from the migration stream of a stopped VM.
    QemuIncoming,
}

impl Mode {
    fn system(self) -> &'static str {
        match self {
            Mode::Lazy | Mode::Eager | Mode::Standby => "cowvm",
            Mode::QemuIncoming => "qemu",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Lazy => "lazy",
            Mode::Eager => "eager",
            Mode::Standby => "standby",
            Mode::QemuIncoming => "incoming",
        }
    }
}

/// Restore latency of one checkpoint in one mode (medians over `--repeat` restores).
#[derive(Debug, Serialize)]
struct LatencyRow {
    mem_mib: u64,
    system: &'static str,
    mode: Mode,
    restores: u32,
    /// From the restore request until the guest runs: cowvm's restore call (it returns with the
    /// vCPU threads running); QEMU from its spawn until `query-status` says `running`.
    to_first_instruction_us: u64,
    /// From the restore request until the guest's next progress line. The checkpoint was taken
    /// just after a line, so this line ends a pass that rewrote (nearly) all of the working set.
    to_next_pass_us: u64,
    /// The pass after that one: equal to `undisturbed_pass_us` once the guest runs at full speed.
    following_pass_us: u64,
    /// One pass of the guest before the checkpoint.
    undisturbed_pass_us: u64,
    /// Faults the page service served (lazy only).
    #[serde(skip_serializing_if = "Option::is_none")]
    faults_served: Option<u64>,
    /// From the restore until the prefetcher had made all memory resident (lazy only).
    #[serde(skip_serializing_if = "Option::is_none")]
    resident_after_us: Option<u64>,
}

/// Memory and time for a number of clones.
#[derive(Debug, Serialize)]
struct DensityRow {
    clones: usize,
    /// Wall time to load the shared image and restore all of them.
    start_ms: u64,
    /// Resident memory of this process with every clone running.
    rss_mib: f64,
    /// Proportional set size: pages shared between clones counted once.
    pss_mib: f64,
    /// PSS relative to one freshly booted VM running the same guest.
    pss_vs_one_booted_vm: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    page_cache: PageCache,
    latency: Vec<LatencyRow>,
    density: Vec<DensityRow>,
    booted_vm_pss_mib: f64,
}

/// One timed restore.
struct Timing {
    first_instruction: Duration,
    next_pass: Duration,
    following_pass: Duration,
    faults_served: Option<u64>,
    resident_after: Option<Duration>,
}

/// The `dirty` guest of `mem` bytes rewriting all of low RAM, a progress line after every pass.
fn workload(mem: u64) -> String {
    format!("dirty mem={}K fill=1 every=1", working_set(mem, 100) >> 10)
}

/// Waits until the guest has made [`WARM_PASSES`] passes and then for its next progress line, so
/// that a checkpoint taken at once finds it at the start of a pass. Returns the last pass's
/// duration.
fn at_start_of_pass(stamps: &Stamps) -> anyhow::Result<Duration> {
    if !stamps.wait_for(WARM_PASSES, BOOT_WAIT) {
        bail!("the guest made fewer than {WARM_PASSES} passes in {BOOT_WAIT:?}");
    }
    let n = stamps.snapshot().len();
    if !stamps.wait_for(n + 1, BOOT_WAIT) {
        bail!("the guest made no pass in {BOOT_WAIT:?}");
    }
    let s = stamps.snapshot();
    Ok(s[n].at - s[n - 1].at)
}

/// The next pass and the following one after a restore requested at `start`, from the
/// restored guest's progress lines.
fn passes_after(stamps: &Stamps, start: Instant) -> anyhow::Result<(Duration, Duration)> {
    if !stamps.wait_for(2, BOOT_WAIT) {
        bail!("the restored guest made fewer than 2 passes in {BOOT_WAIT:?}");
    }
    let s = stamps.snapshot();
    Ok((s[0].at - start, s[1].at - s[0].at))
}

fn median(mut values: Vec<Duration>) -> u64 {
    values.sort();
    values[values.len() / 2].as_micros() as u64
}

fn row(mem: u64, mode: Mode, undisturbed: Duration, timings: Vec<Timing>) -> LatencyRow {
    let pick = |f: fn(&Timing) -> Duration| median(timings.iter().map(f).collect());
    let last = timings.last().expect("at least one restore");
    LatencyRow {
        mem_mib: mem >> 20,
        system: mode.system(),
        mode,
        restores: timings.len() as u32,
        to_first_instruction_us: pick(|t| t.first_instruction),
        to_next_pass_us: pick(|t| t.next_pass),
        following_pass_us: pick(|t| t.following_pass),
        undisturbed_pass_us: undisturbed.as_micros() as u64,
        faults_served: last.faults_served,
        resident_after_us: last.resident_after.map(|d| d.as_micros() as u64),
    }
}

fn boot(kernel: &Path, mem: u64, cmdline: String, console: &Stamps) -> anyhow::Result<Vm> {
    let vm_args = guest_args(kernel, cmdline, mem);
    Ok(Vm::boot(
        vm_args.config(Console::Writer(Box::new(console.clone())))?,
    )?)
}

/// Takes a stopped-VM checkpoint of `vm` into `dir`.
fn checkpoint(vm: &Vm, dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    vm.checkpoint(&dir_checkpoint(dir, Strategy::Stop), &Progress::default())?;
    Ok(())
}

fn restore_options(console: Console, eager: bool) -> RestoreOptions {
    RestoreOptions {
        console,
        eager,
        disk_dir: None,
        allow_dirs: Vec::new(),
    }
}

fn time_cowvm_restore(
    dir: &Path,
    mode: Mode,
    mem: u64,
    cache: PageCache,
) -> anyhow::Result<Timing> {
    let stamps = Stamps::default();
    let store = StoreSpec::Dir(dir.to_path_buf());
    let options = restore_options(
        Console::Writer(Box::new(stamps.clone())),
        mode == Mode::Eager,
    );
    // The image is written back (and cached or not) before the clock starts, so the kernel's
    // write-back does not compete with the restore. A standby is made before the clock
    // starts too: that is its point.
    cache.apply(dir)?;
    let mut standby = match mode {
        Mode::Standby => Some(Standby::new(mem, 1)?),
        _ => None,
    };
    let start = Instant::now();
    let vm = match standby.as_mut() {
        Some(standby) => Vm::restore_standby(standby, &store, options)?,
        None => Vm::restore(&store, options)?,
    };
    let first_instruction = start.elapsed();
    let passes = passes_after(&stamps, start);
    let stats = vm.restore_stats().filter(|s| s.lazy);
    vm.stop();
    drop(vm);
    let (next_pass, following_pass) = passes?;
    Ok(Timing {
        first_instruction,
        next_pass,
        following_pass,
        faults_served: stats.map(|s| s.pages.faults_served),
        resident_after: stats
            .and_then(|s| s.pages.resident_after_us)
            .map(Duration::from_micros),
    })
}

fn cowvm_latency(args: &RestoreBenchArgs, mem: u64) -> anyhow::Result<Vec<LatencyRow>> {
    let stamps = Stamps::default();
    let vm = boot(&args.kernel, mem, workload(mem), &stamps)?;
    let dir = args.store_dir.join(format!("cowvm-{}", mem >> 20));
    let undisturbed = at_start_of_pass(&stamps)?;
    checkpoint(&vm, &dir)?;
    vm.stop();
    drop(vm);
    // The modes take turns, each going first in some rounds: the first read of a checkpoint
    // just written can be slower or faster than the next ones (a virtual disk's own cache), and
    // a mode always first would carry that alone.
    const MODES: [Mode; 3] = [Mode::Lazy, Mode::Standby, Mode::Eager];
    let mut timings: [Vec<Timing>; 3] = Default::default();
    for round in 0..args.repeat {
        for turn in 0..MODES.len() {
            let m = (round as usize + turn) % MODES.len();
            timings[m].push(time_cowvm_restore(&dir, MODES[m], mem, args.page_cache)?);
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok(MODES
        .into_iter()
        .zip(timings)
        .map(|(mode, t)| row(mem, mode, undisturbed, t))
        .collect())
}

fn time_qemu_restore(
    config: &QemuConfig<'_>,
    file: &Path,
    cache: PageCache,
) -> anyhow::Result<Timing> {
    cache.apply(file)?;
    let start = Instant::now();
    let vm = Qemu::restore(config, file)?;
    let first_instruction = start.elapsed();
    let (next_pass, following_pass) = passes_after(&vm.stamps, start)?;
    drop(vm);
    Ok(Timing {
        first_instruction,
        next_pass,
        following_pass,
        faults_served: None,
        resident_after: None,
    })
}

/// The same guest under QEMU: stopped just after a progress line, saved to a file (migration
/// of the stopped VM, at full speed), restored from it with `-incoming`.
fn qemu_latency(args: &RestoreBenchArgs, mem: u64) -> anyhow::Result<LatencyRow> {
    let cmdline = workload(mem);
    let config = QemuConfig {
        kernel: &args.kernel,
        mem,
        cmdline: &cmdline,
        dir: &args.store_dir,
        incoming: None,
    };
    let file = args.store_dir.join(format!("qemu-{}.mig", mem >> 20));
    let mut vm = Qemu::start(&config)?;
    vm.unthrottle_migration()?;
    let undisturbed = at_start_of_pass(&vm.stamps)?;
    vm.stop()?;
    vm.migrate_to_file(&file)?;
    drop(vm);
    let timings = (0..args.repeat)
        .map(|_| time_qemu_restore(&config, &file, args.page_cache))
        .collect::<anyhow::Result<Vec<_>>>();
    std::fs::remove_file(&file).ok();
    Ok(row(mem, Mode::QemuIncoming, undisturbed, timings?))
}

/// (RSS, PSS) of this process in MiB, from /proc/self/smaps_rollup.
fn memory_use() -> anyhow::Result<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").context("read smaps_rollup")?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    match (field("Rss:"), field("Pss:")) {
        (Some(rss), Some(pss)) => Ok((rss, pss)),
        _ => bail!("no Rss/Pss in /proc/self/smaps_rollup"),
    }
}

/// A console that counts complete lines and wakes waiters.
#[derive(Clone, Default)]
struct LineCounter(Arc<(Mutex<usize>, Condvar)>);

impl Write for LineCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let lines = buf.iter().filter(|&&b| b == b'\n').count();
        if lines > 0 {
            let (count, cv) = &*self.0;
            *count.lock().unwrap_or_else(|p| p.into_inner()) += lines;
            cv.notify_all();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LineCounter {
    fn console(&self) -> Console {
        Console::Writer(Box::new(self.clone()))
    }

    fn wait_for(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let (count, cv) = &*self.0;
        let guard = count.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |c| *c < n)
            .unwrap_or_else(|p| p.into_inner());
        if *guard < n {
            bail!(
                "the guest printed {} of {n} lines within {timeout:?}",
                *guard
            );
        }
        Ok(())
    }
}

/// Clones as `cowvm clone` makes them: one verified, sealed image of the checkpoint's memory,
/// mapped copy-on-write by every clone.
fn density(args: &RestoreBenchArgs, counts: &[usize]) -> anyhow::Result<(f64, Vec<DensityRow>)> {
    const MEM: u64 = 256 << 20;
    let console = LineCounter::default();
    let (_, pss_before) = memory_use()?;
    let vm = Vm::boot(
        guest_args(&args.kernel, "scan mem=192M every=1".into(), MEM).config(console.console())?,
    )?;
    // "scan filled" and two full read passes.
    console.wait_for(3, BOOT_WAIT)?;
    let (_, pss_booted) = memory_use()?;
    let one_vm = pss_booted - pss_before;
    let dir = args.store_dir.join("density");
    checkpoint(&vm, &dir)?;
    vm.stop();
    drop(vm);
    let store = StoreSpec::Dir(dir.clone());
    let mut rows = Vec::new();
    for &n in counts {
        let (_, base) = memory_use()?;
        let start = Instant::now();
        let image = Vm::load_shared_image(&store)?;
        let clones = (0..n)
            .map(|_| {
                let c = LineCounter::default();
                let options = restore_options(c.console(), false);
                Ok((Vm::restore_clone(&store, &image, options)?, c))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let start_ms = start.elapsed().as_millis() as u64;
        // Every clone has read all of its memory at least twice.
        for (_, c) in &clones {
            c.wait_for(2, Duration::from_secs(600))?;
        }
        let (rss, pss) = memory_use()?;
        for (vm, _) in &clones {
            vm.stop();
        }
        drop(clones);
        drop(image);
        rows.push(DensityRow {
            clones: n,
            start_ms,
            rss_mib: rss,
            pss_mib: pss - base,
            pss_vs_one_booted_vm: (pss - base) / one_vm,
        });
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok((one_vm, rows))
}

pub fn run(args: RestoreBenchArgs) -> anyhow::Result<ExitCode> {
    if !args.no_qemu {
        qemu::check_installed()?;
    }
    let sizes = memory_sizes(args.quick, &args.sizes)?;
    let counts: Vec<usize> = if args.quick {
        vec![1, 10]
    } else {
        args.clones.clone()
    };
    std::fs::create_dir_all(&args.store_dir)
        .with_context(|| format!("create {}", args.store_dir.display()))?;
    let mut latency_rows = Vec::new();
    for &mem in &sizes {
        eprintln!("cowvm restore latency at {}...", MemSize(mem));
        latency_rows.extend(cowvm_latency(&args, mem)?);
        if !args.no_qemu {
            eprintln!("QEMU restore latency at {}...", MemSize(mem));
            latency_rows.push(qemu_latency(&args, mem).context("QEMU")?);
        }
    }
    eprintln!("clone density...");
    let (one_vm, density_rows) = density(&args, &counts)?;
    let report = Report {
        page_cache: args.page_cache,
        latency: latency_rows,
        density: density_rows,
        booted_vm_pss_mib: one_vm,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", tables(&report));
    }
    plot(&args.plot_dir, &report)?;
    Ok(ExitCode::SUCCESS)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1e3
}

fn find(rows: &[LatencyRow], mem_mib: u64, mode: Mode) -> Option<&LatencyRow> {
    rows.iter().find(|r| r.mem_mib == mem_mib && r.mode == mode)
}

/// The report as Markdown tables: latency, the ratios the targets are about, density.
fn tables(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Each restore starts with the checkpoint's files {}.\n",
        report.page_cache.describe()
    );
    t.push_str("| MiB | system | restore | first instruction ms | next pass ms | following pass ms | undisturbed pass ms | all resident ms | faults served |\n");
    t.push_str("|--:|---|---|--:|--:|--:|--:|--:|--:|\n");
    let opt = |v: Option<u64>, f: fn(u64) -> String| v.map_or_else(|| "-".into(), f);
    for r in &report.latency {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.2} | {:.0} | {:.0} | {:.0} | {} | {} |",
            r.mem_mib,
            r.system,
            r.mode.name(),
            ms(r.to_first_instruction_us),
            ms(r.to_next_pass_us),
            ms(r.following_pass_us),
            ms(r.undisturbed_pass_us),
            opt(r.resident_after_us, |us| format!("{:.0}", ms(us))),
            opt(r.faults_served, |n| n.to_string()),
        );
    }
    let mut sizes: Vec<u64> = report.latency.iter().map(|r| r.mem_mib).collect();
    sizes.dedup();
    t.push_str("\nTo the next pass, ratios (above 1: lazy restore ahead):\n\n");
    t.push_str("| MiB | eager ÷ lazy | QEMU ÷ lazy | QEMU ÷ eager |\n|--:|--:|--:|--:|\n");
    for mem in sizes {
        let pass = |mode| find(&report.latency, mem, mode).map(|r| r.to_next_pass_us as f64);
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        let (lazy, eager, qemu) = (
            pass(Mode::Lazy),
            pass(Mode::Eager),
            pass(Mode::QemuIncoming),
        );
        let _ = writeln!(
            t,
            "| {mem} | {} | {} | {} |",
            ratio(eager, lazy),
            ratio(qemu, lazy),
            ratio(qemu, eager)
        );
    }
    let _ = writeln!(
        t,
        "\nOne booted 256 MiB VM (192 MiB touched): {:.1} MiB PSS\n",
        report.booted_vm_pss_mib
    );
    t.push_str("| clones | start ms | RSS MiB | PSS MiB | PSS / one VM |\n|--:|--:|--:|--:|--:|\n");
    for r in &report.density {
        let _ = writeln!(
            t,
            "| {} | {} | {:.0} | {:.0} | {:.2}x |",
            r.clones, r.start_ms, r.rss_mib, r.pss_mib, r.pss_vs_one_booted_vm
        );
    }
    t
}

fn plot(dir: &Path, report: &Report) -> anyhow::Result<()> {
    let per_mode = |y: fn(&LatencyRow) -> u64| {
        [Mode::Lazy, Mode::Standby, Mode::Eager, Mode::QemuIncoming]
            .iter()
            .map(|&mode| Series {
                label: format!("{} {}", mode.system(), mode.name()),
                points: report
                    .latency
                    .iter()
                    .filter(|r| r.mode == mode)
                    .map(|r| (r.mem_mib as f64, ms(y(r))))
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect::<Vec<_>>()
    };
    line_chart_log_y(
        &dir.join("restore-first-instruction.svg"),
        &Chart {
            title: "restore to the first guest instruction",
            x_label: "guest memory (MiB, log scale)",
            y_label: "latency (ms, log scale)",
            log_x: true,
        },
        &per_mode(|r| r.to_first_instruction_us),
    )?;
    line_chart(
        &dir.join("restore-next-pass.svg"),
        &Chart {
            title: "restore to the end of the guest's next full pass over its memory",
            x_label: "guest memory (MiB, log scale)",
            y_label: "latency (ms)",
            log_x: true,
        },
        &per_mode(|r| r.to_next_pass_us),
    )?;
    line_chart(
        &dir.join("clone-density.svg"),
        &Chart {
            title: "host memory (PSS) of N clones of a 256 MiB checkpoint",
            x_label: "clones",
            y_label: "PSS (MiB)",
            log_x: false,
        },
        &[Series {
            label: "clones (read-only guests)".into(),
            points: report
                .density
                .iter()
                .map(|r| (r.clones as f64, r.pss_mib))
                .collect(),
        }],
    )?;
    eprintln!("plots written to {}", dir.display());
    Ok(())
}
