//! `cowvm bench disk`: guest disk IOPS through virtio-blk on raw and qcow2, next to the host
//! doing the same I/O through the image layer.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use vmm::DiskConfig;
use vmm::{Console, Vm, VmConfig, VmExit};

#[derive(clap::Args, Debug)]
pub struct DiskBenchArgs {
    /// The test guest kernel (its `disk` workload drives the disk).
    #[arg(long)]
    kernel: PathBuf,
    /// Disk area the guest touches, in 4 KiB blocks.
    #[arg(long, default_value_t = 16384)]
    blocks: u32,
    /// Rounds of the workload (each writes, flushes and reads back every block).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Requests in flight.
    #[arg(long, default_value_t = 32)]
    qd: u32,
    /// Where the images go (a temporary directory under it).
    #[arg(long, default_value = "target/bench")]
    dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct DiskBenchRow {
    format: String,
    /// 4 KiB block I/Os (writes + reads) the guest completed, in a random block order.
    guest_ios: u64,
    guest_seconds: f64,
    guest_iops: f64,
    guest_mib_per_s: f64,
    /// The same pattern on the host, synchronous (QD1) through the image layer.
    host_random_iops: f64,
    /// Sequential order on the host, same blocks.
    host_sequential_iops: f64,
    /// Guest IOPS over host random IOPS.
    ratio: f64,
}

pub fn run(args: DiskBenchArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("{}", args.dir.display()))?;
    let tmp = TempDir::new(&args.dir)?;
    let size = (u64::from(args.blocks) * 4096).max(64 << 20);
    let mut rows = Vec::new();
    for format in ["raw", "qcow2"] {
        let fresh = |name: &str| -> anyhow::Result<PathBuf> {
            let path = tmp.0.join(format!("{name}.{format}"));
            if format == "raw" {
                disk::create_raw(&path, size, true)?;
            } else {
                disk::create_qcow2(
                    &path,
                    &disk::CreateOptions {
                        size: Some(size),
                        overwrite: true,
                        ..disk::CreateOptions::default()
                    },
                )?;
            }
            Ok(path)
        };
        let (ios, secs) = guest_run(&args, &fresh("guest")?)?;
        let random = host_iops(&fresh("host-random")?, args.blocks, args.rounds, false)?;
        let sequential = host_iops(&fresh("host-seq")?, args.blocks, args.rounds, true)?;
        let iops = ios as f64 / secs;
        rows.push(DiskBenchRow {
            format: format.into(),
            guest_ios: ios,
            guest_seconds: secs,
            guest_iops: iops,
            guest_mib_per_s: iops * 4096.0 / f64::from(1u32 << 20),
            host_random_iops: random,
            host_sequential_iops: sequential,
            ratio: iops / random,
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:<6} {:>9} {:>8} {:>10} {:>8} {:>12} {:>12} {:>6}",
            "format",
            "4K I/Os",
            "seconds",
            "guest IOPS",
            "MiB/s",
            "host rnd IOPS",
            "host seq IOPS",
            "ratio"
        );
        for r in &rows {
            println!(
                "{:<6} {:>9} {:>8.3} {:>10.0} {:>8.1} {:>12.0} {:>12.0} {:>6.2}",
                r.format,
                r.guest_ios,
                r.guest_seconds,
                r.guest_iops,
                r.guest_mib_per_s,
                r.host_random_iops,
                r.host_sequential_iops,
                r.ratio
            );
        }
        println!(
            "guest: the test guest's `disk` workload (write every block, flush, read it back; \
             random block order, qd={}); host: pwrite/pread through the image layer, QD1",
            args.qd
        );
    }
    Ok(ExitCode::SUCCESS)
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(under: &Path) -> anyhow::Result<TempDir> {
        let dir = under.join(format!("disk-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the guest's `disk` workload and times its rounds from the console stamps: from the
/// `disk id=` line (device set up) to the last `disk round=` line. Returns (4 KiB I/Os,
/// seconds).
fn guest_run(args: &DiskBenchArgs, image: &Path) -> anyhow::Result<(u64, f64)> {
    let console = Stamps::default();
    let cmdline = format!(
        "disk blocks={} rounds={} qd={} seed=1 mem=4K",
        args.blocks, args.rounds, args.qd
    );
    let vm = Vm::boot(VmConfig {
        mem_size: 256 << 20,
        vcpus: 1,
        hugepages: vmm::HugePages::None,
        kernel: args.kernel.clone(),
        initrd: None,
        cmdline,
        console: Console::Writer(Box::new(console.clone())),
        disks: vec![DiskConfig {
            path: image.to_owned(),
            ..DiskConfig::default()
        }],
    })?;
    let exit = vm.wait_timeout(Duration::from_secs(600));
    drop(vm);
    match exit {
        Some(VmExit::Guest(0)) => {}
        other => bail!("disk workload failed ({other:?}): {}", console.text()),
    }
    let (start, end) = console.span("disk id=", "disk round=");
    let (Some(start), Some(end)) = (start, end) else {
        bail!("disk workload printed no rounds: {}", console.text());
    };
    // Each round writes every block once and reads it back once.
    let ios = u64::from(args.blocks) * u64::from(args.rounds) * 2;
    Ok((ios, (end - start).as_secs_f64()))
}

/// Console lines with the time they arrived.
#[derive(Clone, Default)]
struct Stamps(std::sync::Arc<std::sync::Mutex<Lines>>);

/// Bytes of an unfinished line, and finished lines with their arrival time.
type Lines = (Vec<u8>, Vec<(Instant, String)>);

impl Stamps {
    fn text(&self) -> String {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.1.iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
            + &String::from_utf8_lossy(&g.0)
    }

    /// Arrival of the first line starting with `first` and of the last starting with `last`.
    fn span(&self, first: &str, last: &str) -> (Option<Instant>, Option<Instant>) {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let a =
            g.1.iter()
                .find(|(_, l)| l.starts_with(first))
                .map(|(t, _)| *t);
        let b =
            g.1.iter()
                .rev()
                .find(|(_, l)| l.starts_with(last))
                .map(|(t, _)| *t);
        (a, b)
    }
}

impl std::io::Write for Stamps {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let now = Instant::now();
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.0.extend_from_slice(buf);
        while let Some(i) = g.0.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = g.0.drain(..=i).collect();
            g.1.push((now, String::from_utf8_lossy(&line).trim_end().to_owned()));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The same block pattern as the guest (write every block, flush, read every block, per
/// round) with plain pread/pwrite on the host, through the disk image layer for qcow2 (so
/// allocation is included, as for the guest).
fn host_iops(path: &Path, blocks: u32, rounds: u32, sequential: bool) -> anyhow::Result<f64> {
    let mut image = disk::Image::open(path)?;
    let n = u64::from(blocks);
    let order: Vec<u64> = if sequential {
        (0..n).collect()
    } else {
        // A fixed odd multiplier modulo a power of two is a permutation when n is one.
        let mask = n.next_power_of_two() - 1;
        (0..=mask)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) & mask)
            .filter(|&b| b < n)
            .collect()
    };
    let mut buf = vec![0x5au8; 4096];
    let start = Instant::now();
    for _ in 0..rounds {
        for &b in &order {
            image.write_at(b * 4096, &buf)?;
        }
        image.flush()?;
        for &b in &order {
            image.read_at(b * 4096, &mut buf)?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((n * u64::from(rounds) * 2) as f64 / secs)
}
