//! `cowvm bench checkpoint`: live checkpoints of a guest that dirties its memory at full speed,
//! for each memory size and strategy, side by side in one run: pause (VMM-reported and as the
//! guest saw it), guest progress during the checkpoint, total time against `dd` writing the same
//! bytes to the same filesystem, bytes written, pages saved by fault and in the background.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ckpt_format::{CheckpointOptions, Strategy};
use vmm::checkpoint::{CheckpointRequest, Progress, StoreSpec};
use vmm::{Console, MemSize, Vm};

use super::common::{
    dd, guest_view, memory_sizes, parse_strategy, working_set, Row, Stamps, Window,
};
use super::plot::{line_chart, Chart, Series};
use crate::cli::{HugePagesArg, VmArgs};

#[derive(clap::Args, Debug)]
pub struct CheckpointBenchArgs {
    /// The test guest kernel.
    #[arg(long)]
    kernel: PathBuf,
    /// Guest memory sizes.
    #[arg(long, value_delimiter = ',', default_value = "256M,1G,4G")]
    sizes: Vec<String>,
    /// Strategies to compare.
    #[arg(long, value_delimiter = ',', default_value = "uffd,fork,stop")]
    strategies: Vec<String>,
    /// Share of guest memory the workload dirties, in percent.
    #[arg(long, default_value_t = 100)]
    dirty_percent: u64,
    /// Only 256 MiB.
    #[arg(long)]
    quick: bool,
    /// Transparent huge pages for guest memory.
    #[arg(long, value_enum, default_value_t = HugePagesArg::None)]
    hugepages: HugePagesArg,
    /// Directory for the checkpoints and the `dd` file (removed after each run).
    #[arg(long, default_value = "target/bench/checkpoints")]
    store_dir: PathBuf,
    /// Directory for the plots.
    #[arg(long, default_value = "target/bench")]
    plot_dir: PathBuf,
    /// Print JSON rows instead of a table.
    #[arg(long)]
    json: bool,
}

fn measure(args: &CheckpointBenchArgs, mem: u64, strategy: Strategy) -> anyhow::Result<Row> {
    let ws = working_set(mem, args.dirty_percent);
    let stamps = Stamps::default();
    let vm_args = VmArgs {
        kernel: args.kernel.clone(),
        initrd: None,
        cmdline: format!("dirty mem={}K fill=1 every=1", ws >> 10),
        mem: MemSize(mem).to_string(),
        vcpus: 1,
        hugepages: args.hugepages,
        disks: Vec::new(),
    };
    let vm = Vm::boot(vm_args.config(Console::Writer(Box::new(stamps.clone())))?)?;
    // Warm up: the first passes populate memory; then measure the undisturbed rate.
    if !stamps.wait_for(3, Duration::from_secs(60)) {
        bail!("the guest printed no progress within a minute");
    }
    let base_start = Instant::now();
    std::thread::sleep(Duration::from_millis(600));
    let dir = args
        .store_dir
        .join(format!("ckpt-{}-{:?}", mem >> 20, strategy).to_lowercase());
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    let request = CheckpointRequest {
        store: StoreSpec::Dir(dir.clone()),
        options: CheckpointOptions {
            strategy,
            ..Default::default()
        },
        pause_probe: None,
    };
    let t0 = Instant::now();
    let manifest = vm.checkpoint(&request, &Progress::default())?;
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_millis(600));
    if let Some(exit) = vm.exit_status() {
        bail!("the guest stopped during the benchmark: {exit}");
    }
    vm.stop();
    drop(vm);
    let view = guest_view(&stamps.snapshot(), &Window { base_start, t0, t1 })?;

    let m = &manifest.metrics;
    let dd_took = dd(&args.store_dir, m.bytes_written)?;
    std::fs::remove_dir_all(&dir).ok();
    Ok(Row {
        system: "cowvm".into(),
        method: format!("{strategy:?}").to_lowercase(),
        mem_mib: mem >> 20,
        workload: format!("dirty {}% fill", args.dirty_percent),
        pause_us: m.pause_us,
        guest_pause_us: view.guest_pause_us,
        guest_progress: view.guest_progress,
        total_us: m.total_us,
        bytes_written: m.bytes_written,
        dd_us: dd_took.as_micros() as u64,
        total_vs_dd: m.total_us as f64 / dd_took.as_micros().max(1) as f64,
        pages_saved_by_fault: Some(m.pages_saved_by_fault),
        pages_saved_in_background: Some(m.pages_saved_in_background),
        restore_us: None,
        timeline: view.timeline,
    })
}

pub fn run(args: CheckpointBenchArgs) -> anyhow::Result<ExitCode> {
    let sizes = memory_sizes(args.quick, &args.sizes)?;
    if !(1..=100).contains(&args.dirty_percent) {
        bail!("--dirty-percent must be between 1 and 100");
    }
    let strategies = args
        .strategies
        .iter()
        .map(|s| parse_strategy(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::fs::create_dir_all(&args.store_dir)
        .with_context(|| format!("create {}", args.store_dir.display()))?;
    let mut rows = Vec::new();
    for &mem in &sizes {
        for &strategy in &strategies {
            eprintln!("measuring {strategy:?} at {}...", MemSize(mem));
            rows.push(measure(&args, mem, strategy)?);
        }
    }
    print_rows(&rows, args.json)?;
    plot(&args.plot_dir, &rows, &strategies)?;
    Ok(ExitCode::SUCCESS)
}

fn print_rows(rows: &[Row], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    println!(
        "{:>6} {:>6} {:>10} {:>12} {:>8} {:>10} {:>10} {:>7} {:>9} {:>9}",
        "method",
        "MiB",
        "pause µs",
        "guest µs",
        "progress",
        "total ms",
        "MB written",
        "vs dd",
        "by fault",
        "in bg"
    );
    for r in rows {
        println!(
            "{:>6} {:>6} {:>10} {:>12} {:>7.0}% {:>10.1} {:>10.1} {:>6.2}x {:>9} {:>9}",
            r.method,
            r.mem_mib,
            r.pause_us,
            r.guest_pause_us,
            r.guest_progress * 100.0,
            r.total_us as f64 / 1e3,
            r.bytes_written as f64 / 1e6,
            r.total_vs_dd,
            r.pages_saved_by_fault.unwrap_or(0),
            r.pages_saved_in_background.unwrap_or(0)
        );
    }
    Ok(())
}

fn plot(dir: &Path, rows: &[Row], strategies: &[Strategy]) -> anyhow::Result<()> {
    let name = |s: &Strategy| format!("{s:?}").to_lowercase();
    let pause: Vec<Series> = strategies
        .iter()
        .map(|s| Series {
            label: format!("cowvm {}", name(s)),
            points: rows
                .iter()
                .filter(|r| r.method == name(s))
                .map(|r| (r.mem_mib as f64, r.pause_us as f64 / 1e3))
                .collect(),
        })
        .collect();
    line_chart(
        &dir.join("checkpoint-pause.svg"),
        &Chart {
            title: "VM pause of a live checkpoint vs guest memory",
            x_label: "guest memory (MiB, log scale)",
            y_label: "pause (ms)",
            log_x: true,
        },
        &pause,
    )?;
    let largest = rows.iter().map(|r| r.mem_mib).max().unwrap_or(0);
    let progress: Vec<Series> = rows
        .iter()
        .filter(|r| r.mem_mib == largest)
        .map(|r| Series {
            label: format!("cowvm {}", r.method),
            points: r.timeline.clone(),
        })
        .collect();
    line_chart(
        &dir.join("checkpoint-progress.svg"),
        &Chart {
            title: "guest progress around a checkpoint (largest size)",
            x_label: "time since the checkpoint request (ms)",
            y_label: "progress / undisturbed progress",
            log_x: false,
        },
        &progress,
    )?;
    eprintln!("plots written to {}", dir.display());
    Ok(())
}
