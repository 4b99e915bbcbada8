//! `cowvm bench checkpoint --repeat N [--cpu-hog]`: the pause's distribution over N checkpoints
//! in a row of one VM whose guest dirties memory, optionally with every other host core kept
//! busy, and where the pause goes (the `quiesce` and `resume` phases' tails).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use ckpt_format::Strategy;
use serde::Serialize;
use vmm::{Console, Progress, Vm};

use super::common::{dir_checkpoint, Stamps};
use crate::cli::VmArgs;

/// Time the guest runs between two checkpoints of a series.
const BETWEEN: Duration = Duration::from_millis(200);

/// The pauses of one series, in microseconds.
#[derive(Debug, Serialize)]
pub struct PauseSeries {
    /// Strategy.
    pub method: String,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Checkpoints taken.
    pub checkpoints: usize,
    /// Whether a CPU hog ran on the other cores.
    pub cpu_hog: bool,
    /// VMM pause: median, 99th percentile (nearest rank: the largest of 20) and largest.
    pub pause_median_us: u64,
    pub pause_p99_us: u64,
    pub pause_max_us: u64,
    /// The `quiesce` phase (parking the vCPUs): 99th percentile.
    pub quiesce_p99_us: u64,
    /// The `resume` phase: 99th percentile.
    pub resume_p99_us: u64,
    /// Guest time lost as the VMM estimates it (pause plus fault stalls): median and largest.
    pub guest_lost_median_us: u64,
    pub guest_lost_max_us: u64,
}

/// Threads spinning on every host core but one until dropped.
struct CpuHog {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl CpuHog {
    fn start() -> anyhow::Result<CpuHog> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..cores.saturating_sub(1).max(1))
            .map(|i| {
                let stop = stop.clone();
                std::thread::Builder::new()
                    .name(format!("cpu-hog-{i}"))
                    .spawn(move || {
                        let mut x = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            x = std::hint::black_box(x.wrapping_mul(6364136223846793005) + 1);
                        }
                    })
                    .context("start a CPU hog thread")
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(CpuHog { stop, threads })
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            // A hog thread only spins: it cannot have panicked.
            let _ = t.join();
        }
    }
}

/// The value at quantile `q` (nearest rank) of `sorted`.
fn nearest_rank(sorted: &[u64], q: f64) -> u64 {
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Boots the guest of `vm_args` (`mem` bytes), takes `count` checkpoints of it into `dir` one after the
/// other (`BETWEEN` apart), with a CPU hog on the other cores if `cpu_hog`, and stops it.
pub fn measure(
    vm_args: &VmArgs,
    mem: u64,
    dir: &Path,
    strategy: Strategy,
    count: usize,
    cpu_hog: bool,
) -> anyhow::Result<PauseSeries> {
    if count == 0 {
        bail!("--repeat must be at least 1");
    }
    let stamps = Stamps::default();
    let vm = Vm::boot(vm_args.config(Console::Writer(Box::new(stamps.clone())))?)?;
    if !stamps.wait_for(3, Duration::from_secs(60)) {
        bail!("the guest printed no progress in 60 s");
    }
    let hog = cpu_hog.then(CpuHog::start).transpose()?;
    let mut pause = Vec::with_capacity(count);
    let mut quiesce = Vec::with_capacity(count);
    let mut resume = Vec::with_capacity(count);
    let mut lost = Vec::with_capacity(count);
    for _ in 0..count {
        std::thread::sleep(BETWEEN);
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        let m = vm
            .checkpoint(&dir_checkpoint(dir, strategy), &Progress::default())?
            .metrics;
        pause.push(m.pause_us);
        quiesce.push(m.phases_us.get("quiesce").copied().unwrap_or(0));
        resume.push(m.phases_us.get("resume").copied().unwrap_or(0));
        lost.push(m.guest_lost_us);
    }
    drop(hog);
    if let Some(exit) = vm.exit_status() {
        bail!("the guest stopped during the benchmark: {exit}");
    }
    vm.stop();
    std::fs::remove_dir_all(dir).ok();
    for v in [&mut pause, &mut quiesce, &mut resume, &mut lost] {
        v.sort_unstable();
    }
    Ok(PauseSeries {
        method: format!("{strategy:?}").to_lowercase(),
        mem_mib: mem >> 20,
        checkpoints: count,
        cpu_hog,
        pause_median_us: nearest_rank(&pause, 0.5),
        pause_p99_us: nearest_rank(&pause, 0.99),
        pause_max_us: nearest_rank(&pause, 1.0),
        quiesce_p99_us: nearest_rank(&quiesce, 0.99),
        resume_p99_us: nearest_rank(&resume, 0.99),
        guest_lost_median_us: nearest_rank(&lost, 0.5),
        guest_lost_max_us: nearest_rank(&lost, 1.0),
    })
}

/// Prints the series as a table, or as JSON.
pub fn print(rows: &[PauseSeries], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    println!("times in µs; p99 is the nearest rank (of 20 checkpoints, the largest)");
    println!(
        "{:>6} {:>6} {:>5} {:>4} {:>10} {:>10} {:>10} {:>11} {:>10} {:>12} {:>12}",
        "method",
        "MiB",
        "n",
        "hog",
        "pause p50",
        "pause p99",
        "pause max",
        "quiesce p99",
        "resume p99",
        "lost p50",
        "lost max"
    );
    for r in rows {
        println!(
            "{:>6} {:>6} {:>5} {:>4} {:>10} {:>10} {:>10} {:>11} {:>10} {:>12} {:>12}",
            r.method,
            r.mem_mib,
            r.checkpoints,
            if r.cpu_hog { "yes" } else { "no" },
            r.pause_median_us,
            r.pause_p99_us,
            r.pause_max_us,
            r.quiesce_p99_us,
            r.resume_p99_us,
            r.guest_lost_median_us,
            r.guest_lost_max_us
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_of_twenty_takes_the_largest_for_p99() {
        let v: Vec<u64> = (1..=20).collect();
        assert_eq!(nearest_rank(&v, 0.5), 10);
        assert_eq!(nearest_rank(&v, 0.99), 20);
        assert_eq!(nearest_rank(&v, 1.0), 20);
        assert_eq!(nearest_rank(&[7], 0.99), 7);
    }
}
