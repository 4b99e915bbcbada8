//! `cowvm bench restore`: restore latency (to the first guest instruction and to the guest's next
//! output line), lazy vs eager, per memory size; and clone density: time and host memory (RSS
//! and PSS of this process) to run 1, 10 and 50 clones of one checkpoint whose guest only reads.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ckpt_format::Strategy;
use serde::Serialize;
use vmm::RestoreOptions;
use vmm::{Console, MemSize, Vm};
use vmm::{Progress, StoreSpec};

use super::common::{dir_checkpoint, guest_args, memory_sizes};
use super::plot::{line_chart, Chart, Series};

#[derive(clap::Args, Debug)]
pub struct RestoreBenchArgs {
    /// The test guest kernel.
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
    /// Directory for the checkpoints (removed afterwards).
    #[arg(long, default_value = "target/bench/restore")]
    store_dir: PathBuf,
    /// Directory for the plots.
    #[arg(long, default_value = "target/bench")]
    plot_dir: PathBuf,
    /// Restores per size and mode; the time to the first instruction is their median (the
    /// time to the next line is that of the last one).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// Restore latency of one checkpoint.
#[derive(Debug, Serialize)]
struct LatencyRow {
    mem_mib: u64,
    mode: &'static str,
    /// From the restore call until the vCPU threads run (the next instruction is the guest's).
    to_first_instruction_us: u64,
    /// From the restore call until the guest's next complete console line.
    to_next_line_us: u64,
}

/// Memory and time for a number of clones.
#[derive(Debug, Serialize)]
struct DensityRow {
    clones: usize,
    /// Wall time to restore all of them.
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
    latency: Vec<LatencyRow>,
    density: Vec<DensityRow>,
    booted_vm_pss_mib: f64,
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

fn boot(
    args: &RestoreBenchArgs,
    mem: u64,
    cmdline: String,
    console: &LineCounter,
) -> anyhow::Result<Vm> {
    let vm_args = guest_args(&args.kernel, cmdline, mem);
    Ok(Vm::boot(
        vm_args.config(Console::Writer(Box::new(console.clone())))?,
    )?)
}

fn checkpoint(vm: &Vm, dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    vm.checkpoint(&dir_checkpoint(dir, Strategy::Stop), &Progress::default())?;
    // A restore usually comes long after its checkpoint: the image is written back before a
    // restore is timed, so the kernel's write-back does not compete with it.
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("sync {}", path.display()))?;
    }
    Ok(())
}

fn restore(dir: &Path, eager: bool, console: &LineCounter) -> anyhow::Result<Vm> {
    Ok(Vm::restore(
        &StoreSpec::Dir(dir.to_path_buf()),
        RestoreOptions {
            console: Console::Writer(Box::new(console.clone())),
            eager,
            disk_dir: None,
            allow_dirs: Vec::new(),
        },
    )?)
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

fn latency(args: &RestoreBenchArgs, mem: u64) -> anyhow::Result<Vec<LatencyRow>> {
    let ws = (mem.min(3 << 30) - (32 << 20)) & !((2 << 20) - 1);
    let console = LineCounter::default();
    let vm = boot(
        args,
        mem,
        format!("dirty mem={}K fill=1 every=1", ws >> 10),
        &console,
    )?;
    console.wait_for(3, Duration::from_secs(120))?;
    let dir = args.store_dir.join(format!("latency-{}", mem >> 20));
    checkpoint(&vm, &dir)?;
    vm.stop();
    drop(vm);
    let mut rows = Vec::new();
    for (mode, eager) in [("lazy", false), ("eager", true)] {
        let mut firsts = Vec::new();
        let mut line = Duration::ZERO;
        for i in 1..=args.repeat {
            let console = LineCounter::default();
            let start = Instant::now();
            let vm = restore(&dir, eager, &console)?;
            firsts.push(start.elapsed());
            if i == args.repeat {
                console.wait_for(1, Duration::from_secs(120))?;
                line = start.elapsed();
            }
            vm.stop();
            drop(vm);
        }
        firsts.sort();
        rows.push(LatencyRow {
            mem_mib: mem >> 20,
            mode,
            to_first_instruction_us: firsts[firsts.len() / 2].as_micros() as u64,
            to_next_line_us: line.as_micros() as u64,
        });
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok(rows)
}

fn density(args: &RestoreBenchArgs, counts: &[usize]) -> anyhow::Result<(f64, Vec<DensityRow>)> {
    const MEM: u64 = 256 << 20;
    let cmdline = "scan mem=192M every=1".to_string();
    let console = LineCounter::default();
    let (_, pss_before) = memory_use()?;
    let vm = boot(args, MEM, cmdline, &console)?;
    // "scan filled" and two full read passes.
    console.wait_for(3, Duration::from_secs(120))?;
    let (_, pss_booted) = memory_use()?;
    let one_vm = pss_booted - pss_before;
    let dir = args.store_dir.join("density");
    checkpoint(&vm, &dir)?;
    vm.stop();
    drop(vm);
    let mut rows = Vec::new();
    for &n in counts {
        let (_, base) = memory_use()?;
        let start = Instant::now();
        let clones = (0..n)
            .map(|_| {
                let c = LineCounter::default();
                restore(&dir, false, &c).map(|vm| (vm, c))
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
        eprintln!("restore latency at {}...", MemSize(mem));
        latency_rows.extend(latency(&args, mem)?);
    }
    eprintln!("clone density...");
    let (one_vm, density_rows) = density(&args, &counts)?;
    let report = Report {
        latency: latency_rows,
        density: density_rows,
        booted_vm_pss_mib: one_vm,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{:>6} {:>6} {:>22} {:>18}",
            "MiB", "mode", "to first instruction", "to next line"
        );
        for r in &report.latency {
            println!(
                "{:>6} {:>6} {:>19.2} ms {:>15.2} ms",
                r.mem_mib,
                r.mode,
                r.to_first_instruction_us as f64 / 1e3,
                r.to_next_line_us as f64 / 1e3
            );
        }
        println!();
        println!("one booted 256 MiB VM (192 MiB touched): {one_vm:.1} MiB PSS");
        println!(
            "{:>7} {:>10} {:>10} {:>10} {:>14}",
            "clones", "start ms", "RSS MiB", "PSS MiB", "PSS / one VM"
        );
        for r in &report.density {
            println!(
                "{:>7} {:>10} {:>10.1} {:>10.1} {:>13.2}x",
                r.clones, r.start_ms, r.rss_mib, r.pss_mib, r.pss_vs_one_booted_vm
            );
        }
    }
    let series = ["lazy", "eager"]
        .iter()
        .map(|mode| Series {
            label: format!("{mode} restore"),
            points: report
                .latency
                .iter()
                .filter(|r| r.mode == *mode)
                .map(|r| (r.mem_mib as f64, r.to_next_line_us as f64 / 1e3))
                .collect(),
        })
        .collect::<Vec<_>>();
    line_chart(
        &args.plot_dir.join("restore-latency.svg"),
        &Chart {
            title: "restore to the guest's next output line",
            x_label: "guest memory (MiB, log scale)",
            y_label: "latency (ms)",
            log_x: true,
        },
        &series,
    )?;
    line_chart(
        &args.plot_dir.join("clone-density.svg"),
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
    Ok(ExitCode::SUCCESS)
}
