//! `cowvm bench compare`: cowvm's checkpoints side by side with QEMU's on the same guest binary,
//! memory size and host, in one run. For each size and workload (`dirty` writing all of its
//! working set, or 10% of memory, at full speed) and each method — cowvm `uffd`, `fork`,
//! `stop`; QEMU `background-snapshot` (userfaultfd write-protect) and stop-and-copy — it
//! measures the VMM-reported and guest-visible pause, guest progress during the checkpoint,
//! total time and bytes against `dd`, and restore to the guest's next progress line (cowvm:
//! the default restore, memory served by the page service; QEMU: `-incoming`).

pub(super) mod qemu;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vmm::RestoreOptions;
use vmm::StoreSpec;
use vmm::{Console, MemSize, Vm};

use self::qemu::{Qemu, QemuConfig};
use super::common::{
    guest_args, live_checkpoint, memory_sizes, parse_strategy, working_set, PageCache, Row, Stamps,
    Subject, Taken, Window, SETTLE,
};
use super::plot::{line_chart, line_chart_log_y, Chart, Series};

/// Boot (QEMU runs SeaBIOS first) and the first passes that populate memory.
const BOOT_WAIT: Duration = Duration::from_secs(120);

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// The test guest kernel (the same binary boots on both systems).
    #[arg(long)]
    kernel: PathBuf,
    /// Guest memory sizes.
    #[arg(long, value_delimiter = ',', default_value = "256M,1G,4G")]
    sizes: Vec<String>,
    /// Only 256 MiB.
    #[arg(long)]
    quick: bool,
    /// Print the rows as a JSON array instead of tables.
    #[arg(long)]
    json: bool,
    /// Where results.json, results.md and the plots go.
    #[arg(long, default_value = "target/bench/compare")]
    out_dir: PathBuf,
    /// Directory for checkpoints, snapshot files and `dd` (each removed after its measurement).
    #[arg(long, default_value = "target/bench/compare-store")]
    store_dir: PathBuf,
    /// Where the checkpoint's files are when its restore starts: only on the device (`cold`),
    /// or also in the host's page cache (`warm`).
    #[arg(long, value_enum, default_value = "cold")]
    page_cache: PageCache,
}

/// The checkpoint methods compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Cowvm(&'static str),
    QemuBackground,
    QemuStopCopy,
}

const METHODS: [Method; 5] = [
    Method::Cowvm("uffd"),
    Method::Cowvm("fork"),
    Method::Cowvm("stop"),
    Method::QemuBackground,
    Method::QemuStopCopy,
];

impl Method {
    fn system(self) -> &'static str {
        match self {
            Method::Cowvm(_) => "cowvm",
            _ => "qemu",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Method::Cowvm(s) => s,
            Method::QemuBackground => "background-snapshot",
            Method::QemuStopCopy => "stop-and-copy",
        }
    }

    /// The QEMU method a cowvm method is compared with.
    fn counterpart(self) -> Option<Method> {
        match self {
            Method::Cowvm("stop") => Some(Method::QemuStopCopy),
            Method::Cowvm(_) => Some(Method::QemuBackground),
            _ => None,
        }
    }
}

/// A workload: the share of memory the `dirty` guest writes at full speed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Workload {
    pub(super) percent: u64,
}

const WORKLOADS: [Workload; 2] = [Workload { percent: 100 }, Workload { percent: 10 }];

impl Workload {
    fn name(self) -> String {
        format!("dirty {}%", self.percent)
    }

    /// The guest's command line: the working set rewritten whole page by whole page, a
    /// progress stamp after every pass.
    pub(super) fn cmdline(self, mem: u64) -> String {
        format!(
            "dirty mem={}K fill=1 every=1",
            working_set(mem, self.percent) >> 10
        )
    }
}

fn measure_cowvm(
    args: &CompareArgs,
    mem: u64,
    work: Workload,
    strategy: &str,
) -> anyhow::Result<(Taken, Stamps, u64)> {
    let (kernel, store) = (&args.kernel, &args.store_dir);
    let vm_args = guest_args(kernel, work.cmdline(mem), mem);
    let dir = store.join(format!("cowvm-{}-{strategy}", mem >> 20));
    let (taken, stamps) = live_checkpoint(&vm_args, &dir, parse_strategy(strategy)?, BOOT_WAIT)?;

    // Restore from the checkpoint just taken (memory served by the page service), timed to the
    // guest's next progress line.
    args.page_cache.apply(&dir)?;
    let restored = Stamps::default();
    let start = Instant::now();
    let vm = Vm::restore(
        &StoreSpec::Dir(dir.clone()),
        RestoreOptions {
            console: Console::Writer(Box::new(restored.clone())),
            eager: false,
            disk_dir: None,
            allow_dirs: Vec::new(),
        },
    )?;
    let ran = restored.wait_for(1, BOOT_WAIT);
    vm.stop();
    drop(vm);
    std::fs::remove_dir_all(&dir).ok();
    let restore_us = match restored.snapshot().first() {
        Some(s) if ran => (s.at - start).as_micros() as u64,
        _ => bail!("the restored guest printed no progress in {BOOT_WAIT:?}"),
    };
    Ok((taken, stamps, restore_us))
}

fn measure_qemu(
    args: &CompareArgs,
    mem: u64,
    work: Workload,
    method: Method,
) -> anyhow::Result<(Taken, Stamps, u64)> {
    let (kernel, store) = (&args.kernel, &args.store_dir);
    let cmdline = work.cmdline(mem);
    let config = QemuConfig {
        kernel,
        mem,
        cmdline: &cmdline,
        dir: store,
        incoming: None,
    };
    let mut vm = Qemu::start(&config)?;
    if !vm.stamps.wait_for(3, BOOT_WAIT) {
        bail!("the guest under QEMU printed no progress in {BOOT_WAIT:?}");
    }
    if method == Method::QemuBackground {
        vm.enable_background_snapshot()?;
    }
    let base_start = Instant::now();
    if !vm.stamps.settle(BOOT_WAIT) {
        bail!("the guest under QEMU made fewer than 2 passes in {BOOT_WAIT:?}");
    }
    let file = store.join(format!("qemu-{}-{}.mig", mem >> 20, method.name()));
    let t0 = Instant::now();
    let (pause_us, t1) = if method == Method::QemuStopCopy {
        vm.stop()?;
        vm.migrate_to_file(&file)?;
        vm.cont()?;
        let t1 = Instant::now();
        ((t1 - t0).as_micros() as u64, t1)
    } else {
        let report = vm.migrate_to_file(&file)?;
        (report.downtime_us.unwrap_or(0), Instant::now())
    };
    std::thread::sleep(SETTLE);
    if !vm.running() {
        bail!("QEMU exited during the benchmark");
    }
    let stamps = vm.stamps.clone();
    drop(vm);
    let bytes = std::fs::metadata(&file)
        .with_context(|| format!("{}", file.display()))?
        .len();

    args.page_cache.apply(&file)?;
    let start = Instant::now();
    let restored = Qemu::restore(&config, &file)?;
    let ran = restored.stamps.wait_for(1, BOOT_WAIT);
    let first = restored.stamps.snapshot().first().map(|s| s.at);
    drop(restored);
    std::fs::remove_file(&file).ok();
    let restore_us = match first {
        Some(at) if ran => (at - start).as_micros() as u64,
        _ => bail!("the guest restored by QEMU printed no progress in {BOOT_WAIT:?}"),
    };
    Ok((
        Taken {
            window: Window { base_start, t0, t1 },
            pause_us,
            total_us: (t1 - t0).as_micros() as u64,
            bytes,
            pages: None,
            vmm_guest_lost_us: None,
        },
        stamps,
        restore_us,
    ))
}

/// One row: measured, or recorded as failed with its error so that the other rows survive.
fn measure(args: &CompareArgs, mem: u64, work: Workload, method: Method) -> Row {
    let subject = || Subject {
        system: method.system().into(),
        method: method.name().into(),
        mem,
        workload: work.name(),
    };
    let measured = match method {
        Method::Cowvm(strategy) => measure_cowvm(args, mem, work, strategy),
        _ => measure_qemu(args, mem, work, method),
    }
    .and_then(|(taken, stamps, restore_us)| {
        Row::measured(
            subject(),
            &taken,
            &stamps,
            &args.store_dir,
            Some(restore_us),
        )
    });
    measured.unwrap_or_else(|e| {
        eprintln!(
            "{} {} at {}, {} failed: {e:#}",
            method.system(),
            method.name(),
            MemSize(mem),
            work.name()
        );
        Row::failed(subject(), &e)
    })
}

pub fn run(args: CompareArgs) -> anyhow::Result<ExitCode> {
    qemu::check_installed()?;
    let sizes = memory_sizes(args.quick, &args.sizes)?;
    std::fs::create_dir_all(&args.store_dir)
        .with_context(|| format!("create {}", args.store_dir.display()))?;
    let load_before = load_average();
    let started = Instant::now();
    let mut rows = Vec::new();
    for &mem in &sizes {
        for work in WORKLOADS {
            for method in METHODS {
                eprintln!(
                    "measuring {} {} at {}, {}...",
                    method.system(),
                    method.name(),
                    MemSize(mem),
                    work.name()
                );
                rows.push(measure(&args, mem, work, method));
            }
        }
    }
    let took = started.elapsed();
    let report = Report {
        rows: &rows,
        took,
        load: format!("{load_before} at the start, {} at the end", load_average()),
        page_cache: args.page_cache,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", report.tables());
    }
    write_outputs(&args.out_dir, &report)?;
    let failed = rows.iter().filter(|r| r.error.is_some()).count();
    Ok(finished(&args.out_dir, took, failed, rows.len()))
}

/// Says where the results went; fails the command if any of the `total` measurements failed.
pub(super) fn finished(out_dir: &Path, took: Duration, failed: usize, total: usize) -> ExitCode {
    eprintln!(
        "results and plots written to {} in {:.0} s",
        out_dir.display(),
        took.as_secs_f64()
    );
    if failed > 0 {
        eprintln!("{failed} of {total} measurements failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// `/proc/loadavg`'s three averages.
pub(super) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

struct Report<'a> {
    rows: &'a [Row],
    took: Duration,
    load: String,
    page_cache: PageCache,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1e3
}

/// `a / b` as a ratio text; `-` when `b` is zero.
fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

impl Report<'_> {
    /// The rows as Markdown tables: every measurement, then cowvm against QEMU.
    fn tables(&self) -> String {
        let mut t = String::new();
        t.push_str("| system | method | MiB | workload | guest time lost ms | VMM pause ms | longest guest stall ms | guest progress | total to durable ms | MB written | total / dd | restore ms |\n");
        t.push_str("|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        for r in self.rows {
            if let Some(error) = &r.error {
                let _ = writeln!(
                    t,
                    "| {} | {} | {} | {} | failed: {} |||||||||",
                    r.system,
                    r.method,
                    r.mem_mib,
                    r.workload,
                    error.replace('|', "/")
                );
                continue;
            }
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {:.1} | {:.3} | {:.1} | {:.0}% | {:.0} | {:.0} | {:.2} | {:.1} |",
                r.system,
                r.method,
                r.mem_mib,
                r.workload,
                ms(r.guest_lost_us),
                ms(r.pause_us),
                ms(r.guest_pause_us),
                r.guest_progress * 100.0,
                ms(r.total_us),
                r.bytes_written as f64 / 1e6,
                r.total_vs_dd,
                ms(r.restore_us.unwrap_or(0)),
            );
        }
        t.push_str("\nRatios, QEMU ÷ cowvm for times (above 1: cowvm faster), cowvm ÷ QEMU for guest progress (above 1: the guest keeps more speed under cowvm):\n\n");
        t.push_str("| MiB | workload | cowvm | vs QEMU | guest time lost | pause | longest guest stall | guest progress | total | restore |\n");
        t.push_str("|--:|---|---|---|--:|--:|--:|--:|--:|--:|\n");
        for r in self
            .rows
            .iter()
            .filter(|r| r.system == "cowvm" && r.error.is_none())
        {
            let Some(q) = METHODS
                .iter()
                .find(|m| m.name() == r.method)
                .and_then(|m| m.counterpart())
                .and_then(|m| {
                    self.rows.iter().find(|q| {
                        q.system == "qemu"
                            && q.error.is_none()
                            && q.method == m.name()
                            && q.mem_mib == r.mem_mib
                            && q.workload == r.workload
                    })
                })
            else {
                continue;
            };
            let us = |v: u64| v as f64;
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.mem_mib,
                r.workload,
                r.method,
                q.method,
                ratio(us(q.guest_lost_us), us(r.guest_lost_us)),
                ratio(us(q.pause_us), us(r.pause_us)),
                ratio(us(q.guest_pause_us), us(r.guest_pause_us)),
                ratio(r.guest_progress, q.guest_progress),
                ratio(us(q.total_us), us(r.total_us)),
                ratio(us(q.restore_us.unwrap_or(0)), us(r.restore_us.unwrap_or(0))),
            );
        }
        t
    }

    fn markdown(&self) -> String {
        let mut md = run_description(&self.load, self.took);
        let _ = writeln!(
            md,
            "Each restore starts with the checkpoint's files {}.\n",
            self.page_cache.describe()
        );
        md.push_str(&self.tables());
        md
    }
}

/// What a results file says about its run, as a Markdown list: the command, the host (CPU,
/// memory, kernel, QEMU), the load average and the run time.
pub(super) fn run_description(load: &str, took: Duration) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem_total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let command: Vec<String> = std::env::args().collect();
    let mut md = String::new();
    let _ = writeln!(md, "- command: `{}`", command.join(" "));
    let _ = writeln!(md, "- CPU: {cpu}, {cores} cores");
    let _ = writeln!(
        md,
        "- memory: {}",
        mem_total
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = writeln!(md, "- host kernel: {}", kernel.trim());
    let _ = writeln!(md, "- QEMU: {}", qemu::version());
    let _ = writeln!(md, "- load average: {load}");
    let _ = writeln!(md, "- run time: {:.0} s\n", took.as_secs_f64());
    md
}

fn write_outputs(dir: &Path, report: &Report<'_>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let json = dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(report.rows)?)
        .with_context(|| format!("write {}", json.display()))?;
    let md = dir.join("results.md");
    std::fs::write(&md, report.markdown()).with_context(|| format!("write {}", md.display()))?;
    plot(dir, report.rows)
}

/// One series per system and method for the full-speed workload: `y(row)` against memory size.
/// A chart against memory size: file, title, y label, and the value of a row in microseconds.
type SizeChart = (&'static str, &'static str, &'static str, fn(&Row) -> u64);

fn per_size(rows: &[Row], y: impl Fn(&Row) -> f64) -> Vec<Series> {
    let full = Workload { percent: 100 }.name();
    METHODS
        .iter()
        .map(|m| Series {
            label: format!("{} {}", m.system(), m.name()),
            points: rows
                .iter()
                .filter(|r| {
                    r.error.is_none()
                        && r.system == m.system()
                        && r.method == m.name()
                        && r.workload == full
                })
                .map(|r| (r.mem_mib as f64, y(r)))
                .collect(),
        })
        .collect()
}

fn plot(dir: &Path, rows: &[Row]) -> anyhow::Result<()> {
    // Log scales cannot show zero: values below 10 µs are drawn at 10 µs.
    let charts: [SizeChart; 4] = [
        (
            "guest-lost-vs-memory.svg",
            "guest time lost vs memory (dirty 100%; floor 0.01 ms)",
            "guest time lost (ms, log scale)",
            |r| r.guest_lost_us,
        ),
        (
            "pause-vs-memory.svg",
            "guest-visible pause vs memory (dirty 100%; floor 0.01 ms)",
            "longest stall of the guest (ms, log scale)",
            |r| r.guest_pause_us,
        ),
        (
            "total-vs-memory.svg",
            "checkpoint total time vs memory (dirty 100%)",
            "total (ms, log scale)",
            |r| r.total_us,
        ),
        (
            "restore-vs-memory.svg",
            "restore to the guest's next progress line vs memory (dirty 100%)",
            "restore (ms, log scale)",
            |r| r.restore_us.unwrap_or(0),
        ),
    ];
    for (file, title, y_label, us) in charts {
        line_chart_log_y(
            &dir.join(file),
            &Chart {
                title,
                x_label: "guest memory (MiB, log scale)",
                y_label,
                log_x: true,
            },
            &per_size(rows, |r| ms(us(r).max(10))),
        )?;
    }
    // The progress picture at 1 GiB, or the size nearest below it.
    let full = Workload { percent: 100 }.name();
    let size = rows
        .iter()
        .map(|r| r.mem_mib)
        .filter(|&m| m <= 1024)
        .max()
        .unwrap_or(0);
    let progress: Vec<Series> = rows
        .iter()
        .filter(|r| r.error.is_none() && r.mem_mib == size && r.workload == full)
        .map(|r| Series {
            label: format!("{} {}", r.system, r.method),
            points: r.timeline.clone(),
        })
        .collect();
    line_chart(
        &dir.join("progress-across-checkpoint.svg"),
        &Chart {
            title: &format!("guest progress across a checkpoint ({size} MiB, dirty 100%)"),
            x_label: "time since the checkpoint request (ms)",
            y_label: "progress / undisturbed progress",
            log_x: false,
        },
        &progress,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(system: &str, method: &str) -> Subject {
        Subject {
            system: system.into(),
            method: method.into(),
            mem: 256 << 20,
            workload: Workload { percent: 100 }.name(),
        }
    }

    /// A failed measurement is a row with its error; the others are printed and written.
    #[test]
    fn a_failed_row_keeps_the_others() {
        let failed = Row::failed(
            subject("qemu", "stop-and-copy"),
            &anyhow::anyhow!("too few progress stamps before the checkpoint"),
        );
        let mut measured = Row::failed(subject("cowvm", "uffd"), &anyhow::anyhow!("unused"));
        measured.error = None;
        measured.guest_lost_us = 12_500;
        measured.pause_us = 400;
        measured.timeline = vec![(0.0, 1.0), (10.0, 0.5)];
        let rows = [measured, failed];
        let report = Report {
            rows: &rows,
            took: Duration::from_secs(1),
            load: "0 0 0".into(),
            page_cache: PageCache::Cold,
        };
        let tables = report.tables();
        assert!(
            tables.contains("| cowvm | uffd | 256 | dirty 100% | 12.5 | 0.400 |"),
            "{tables}"
        );
        assert!(
            tables.contains("failed: too few progress stamps before the checkpoint"),
            "{tables}"
        );
        let dir = tempfile::tempdir().unwrap();
        write_outputs(dir.path(), &report).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap())
                .unwrap();
        assert_eq!(json.as_array().unwrap().len(), 2);
        assert!(json[0].get("error").is_none(), "{json}");
        assert_eq!(
            json[1]["error"],
            "too few progress stamps before the checkpoint"
        );
        assert!(dir.path().join("guest-lost-vs-memory.svg").exists());
        assert!(dir.path().join("progress-across-checkpoint.svg").exists());
    }
}
