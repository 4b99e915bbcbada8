//! `cowvm bench checkpoint`: live checkpoints of a guest that dirties its memory at full speed,
//! for each memory size and strategy, side by side in one run: pause (VMM-reported and as the
//! guest saw it), guest progress during the checkpoint, total time against `dd` writing the same
//! bytes to the same filesystem, bytes written, pages saved by fault and in the background.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use ckpt_format::Strategy;
use vmm::MemSize;

use super::common::{
    guest_args, live_checkpoint, memory_sizes, parse_strategy, working_set, Row, Subject,
};
use super::pause_series;
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
    /// Instead of one checkpoint per size and strategy, take this many in a row of one VM and
    /// report the pause's median, 99th percentile and maximum, with the tails of its `quiesce`
    /// and `resume` phases (20 for the pause target).
    #[arg(long, value_name = "N")]
    repeat: Option<usize>,
    /// With --repeat: keep every other host core busy with a spinning thread meanwhile.
    #[arg(long, requires = "repeat")]
    cpu_hog: bool,
}

/// The guest of a measurement and the directory its checkpoints go to.
fn setup(args: &CheckpointBenchArgs, mem: u64, strategy: Strategy) -> (VmArgs, PathBuf) {
    let ws = working_set(mem, args.dirty_percent);
    let vm_args = VmArgs {
        hugepages: args.hugepages,
        ..guest_args(
            &args.kernel,
            format!("dirty mem={}K fill=1 every=1", ws >> 10),
            mem,
        )
    };
    let dir = args
        .store_dir
        .join(format!("ckpt-{}-{:?}", mem >> 20, strategy).to_lowercase());
    (vm_args, dir)
}

fn measure(args: &CheckpointBenchArgs, mem: u64, strategy: Strategy) -> anyhow::Result<Row> {
    let (vm_args, dir) = setup(args, mem, strategy);
    let (taken, stamps) = live_checkpoint(&vm_args, &dir, strategy, Duration::from_secs(60))?;
    let subject = Subject {
        system: "cowvm".into(),
        method: format!("{strategy:?}").to_lowercase(),
        mem,
        workload: format!("dirty {}% fill", args.dirty_percent),
    };
    let row = Row::measured(subject, &taken, &stamps, &args.store_dir, None)?;
    std::fs::remove_dir_all(&dir).ok();
    Ok(row)
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
    if let Some(count) = args.repeat {
        let mut series = Vec::new();
        for &mem in &sizes {
            for &strategy in &strategies {
                eprintln!(
                    "{count} checkpoints with {strategy:?} at {}...",
                    MemSize(mem)
                );
                let (vm_args, dir) = setup(&args, mem, strategy);
                series.push(pause_series::measure(
                    &vm_args,
                    mem,
                    &dir,
                    strategy,
                    count,
                    args.cpu_hog,
                )?);
            }
        }
        pause_series::print(&series, args.json)?;
        return Ok(ExitCode::SUCCESS);
    }
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
        "{:>6} {:>6} {:>12} {:>10} {:>12} {:>8} {:>10} {:>10} {:>7} {:>9} {:>9}",
        "method",
        "MiB",
        "guest lost µs",
        "pause µs",
        "stall µs",
        "progress",
        "total ms",
        "MB written",
        "vs dd",
        "by fault",
        "in bg"
    );
    for r in rows {
        println!(
            "{:>6} {:>6} {:>12} {:>10} {:>12} {:>7.0}% {:>10.1} {:>10.1} {:>6.2}x {:>9} {:>9}",
            r.method,
            r.mem_mib,
            r.guest_lost_us,
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
