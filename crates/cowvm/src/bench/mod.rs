//! `cowvm bench`: benchmarks of the VMM that print a table (and JSON on request).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use serde::Serialize;
use vmm::{Console, Vm};

mod checkpoint;
mod common;
mod compare;
mod disk;
mod incremental;
mod migrate;
mod pause_series;
mod plot;
mod restore;

use self::common::guest_args;
use self::plot::{line_chart, Chart, Series};
use crate::cli::VmArgs;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Pause/resume latency of a running guest: the floor of every checkpoint pause.
    Pause(PauseArgs),
    /// Restore latency (lazy, eager, and QEMU on the same guest) and clone density.
    Restore(restore::RestoreBenchArgs),
    /// Live checkpoints of a guest dirtying memory at full speed, per size and strategy.
    Checkpoint(checkpoint::CheckpointBenchArgs),
    /// cowvm's checkpoints side by side with QEMU's on the same guest.
    Compare(compare::CompareArgs),
    /// Guest disk IOPS through virtio-blk on raw and qcow2, next to the host.
    Disk(disk::DiskBenchArgs),
    /// Incremental checkpoints against full ones; with --s3, upload throughput and restores
    /// from S3 with a cold and a warm cache.
    Incremental(incremental::IncrementalBenchArgs),
    /// Live migration, cowvm (pre-copy, post-copy, hybrid) against QEMU, on the same guest:
    /// downtime, guest time lost, total time, bytes sent.
    Migrate(migrate::MigrateBenchArgs),
}

#[derive(clap::Args, Debug)]
pub struct PauseArgs {
    /// The test guest kernel (its `dirty` workload keeps every vCPU busy).
    #[arg(long)]
    kernel: PathBuf,
    /// Guest memory size.
    #[arg(long, default_value = "256M")]
    mem: String,
    /// vCPU counts to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    vcpus: Vec<u8>,
    /// Pauses per vCPU count.
    #[arg(long, default_value_t = 200)]
    count: usize,
    /// Time the guest runs between pauses, in milliseconds.
    #[arg(long, default_value_t = 5)]
    interval_ms: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Where to write the latency distribution plot (SVG).
    #[arg(long, default_value = "target/bench/pause-latency.svg")]
    plot: PathBuf,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Pause(args) => pause(args),
        BenchCommand::Checkpoint(args) => checkpoint::run(args),
        BenchCommand::Compare(args) => compare::run(args),
        BenchCommand::Restore(args) => restore::run(args),
        BenchCommand::Disk(args) => disk::run(args),
        BenchCommand::Incremental(args) => incremental::run(args),
        BenchCommand::Migrate(args) => migrate::run(args),
    }
}

/// Latency statistics in microseconds.
#[derive(Debug, Serialize)]
struct Stats {
    vcpus: u8,
    samples: usize,
    #[serde(rename = "min_us")]
    min: f64,
    #[serde(rename = "median_us")]
    median: f64,
    #[serde(rename = "p99_us")]
    p99: f64,
    #[serde(rename = "max_us")]
    max: f64,
    #[serde(skip)]
    cdf: Vec<(f64, f64)>,
}

fn stats(vcpus: u8, mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let pick = |q: f64| us(samples[((samples.len() - 1) as f64 * q).round() as usize]);
    let n = samples.len() as f64;
    Stats {
        vcpus,
        cdf: samples
            .iter()
            .enumerate()
            .map(|(i, &d)| (us(d), (i + 1) as f64 / n))
            .collect(),
        samples: samples.len(),
        min: us(samples[0]),
        median: pick(0.5),
        p99: pick(0.99),
        max: us(*samples.last().expect("at least one sample")),
    }
}

fn pause(args: PauseArgs) -> anyhow::Result<ExitCode> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    let mut rows = Vec::new();
    for &vcpus in &args.vcpus {
        let vm_args = VmArgs {
            mem: args.mem.clone(),
            vcpus,
            ..guest_args(&args.kernel, "dirty mem=32M every=1000000".into(), 0)
        };
        let vm = Vm::boot(vm_args.config(Console::Writer(Box::new(std::io::sink())))?)?;
        // Let the guest reach its workload before measuring.
        std::thread::sleep(Duration::from_millis(200));
        let mut samples = Vec::with_capacity(args.count);
        for _ in 0..args.count {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
            let start = Instant::now();
            let guard = vm.pause().context("pause")?;
            samples.push(start.elapsed());
            guard.resume();
        }
        if let Some(exit) = vm.exit_status() {
            bail!("the guest stopped during the benchmark: {exit}");
        }
        rows.push(stats(vcpus, samples));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:>6} {:>8} {:>10} {:>10} {:>10} {:>10}",
            "vcpus", "pauses", "min µs", "median µs", "p99 µs", "max µs"
        );
        for r in &rows {
            println!(
                "{:>6} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                r.vcpus, r.samples, r.min, r.median, r.p99, r.max
            );
        }
    }
    let series: Vec<Series> = rows
        .iter()
        .map(|r| Series {
            label: format!("{} vCPU", r.vcpus),
            points: r.cdf.clone(),
        })
        .collect();
    line_chart(
        &args.plot,
        &Chart {
            title: "cowvm pause latency (request to all vCPUs parked)",
            x_label: "pause latency (µs, log scale)",
            y_label: "fraction of pauses at or below",
            log_x: true,
        },
        &series,
    )?;
    eprintln!("plot written to {}", args.plot.display());
    Ok(ExitCode::SUCCESS)
}
