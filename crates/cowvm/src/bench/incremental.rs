//! `cowvm bench incremental`: incremental checkpoints against full ones of the same guest, and,
//! with `--s3`, the S3 store's upload throughput against a plain multipart upload of the same
//! bytes, and lazy restores from S3 with a cold and a warm cache.
//!
//! The guest fills all of its memory once, then rewrites a share of it (`--rates`) pass after
//! pass: a full checkpoint is taken, the guest makes two passes, and an incremental checkpoint
//! naming the full one is taken, each a live checkpoint with `--strategy`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ckpt_format::{CheckpointOptions, Manifest, StoreAddress, Strategy};
use serde::Serialize;
use vmm::{CheckpointRequest, Console, MemSize, ParentSpec, Progress, RestoreOptions, StoreSpec};
use vmm::{RestoreStats, Vm};

use super::common::{guest_args, memory_sizes, parse_strategy, working_set, Stamps};
use super::plot::{line_chart_log_y, Chart, Series};
use crate::control::named_store;

/// How long the guest may take to fill its memory and make its first passes.
const BOOT_WAIT: Duration = Duration::from_secs(180);

#[derive(clap::Args, Debug)]
pub struct IncrementalBenchArgs {
    /// The test guest kernel.
    #[arg(long)]
    kernel: PathBuf,
    /// Guest memory sizes.
    #[arg(long, value_delimiter = ',', default_value = "256M,1G")]
    sizes: Vec<String>,
    /// Shares of guest memory (percent) the guest rewrites between the two checkpoints.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    rates: Vec<u64>,
    /// The live checkpoint strategy.
    #[arg(long, default_value = "uffd")]
    strategy: String,
    /// Directory for the directory-store checkpoints (removed after each size and rate).
    #[arg(long, default_value = "target/bench/incremental")]
    store_dir: PathBuf,
    /// Also measure an S3 store: s3://BUCKET/PREFIX (each run writes below a fresh
    /// PREFIX/run-<unix ms>/, left in place).
    #[arg(long, value_name = "URL")]
    s3: Option<String>,
    /// The endpoint URL of --s3 (default: AWS_ENDPOINT_URL, else AWS S3).
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Directory for the plots.
    #[arg(long, default_value = "target/bench")]
    plot_dir: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// One checkpoint's figures.
#[derive(Debug, Serialize)]
struct Taken {
    bytes_written: u64,
    total_us: u64,
    pause_us: u64,
    pages_in_parent: u64,
}

impl Taken {
    fn of(m: &Manifest) -> Taken {
        Taken {
            bytes_written: m.metrics.bytes_written,
            total_us: m.metrics.total_us,
            pause_us: m.metrics.pause_us,
            pages_in_parent: m.metrics.pages_in_parent,
        }
    }
}

/// A full and an incremental checkpoint of one guest into one kind of store.
#[derive(Debug, Serialize)]
struct PairRow {
    store: &'static str,
    mem_mib: u64,
    /// Share of memory the guest rewrites, as asked and as it is (whole 2 MiB blocks).
    rate_percent: u64,
    rewritten_mib: u64,
    full: Taken,
    incremental: Taken,
    bytes_ratio: f64,
    time_ratio: f64,
}

/// The S3 store's write-out against a plain multipart upload of the same bytes.
#[derive(Debug, Serialize)]
struct UploadRow {
    mem_mib: u64,
    bytes: u64,
    store_us: u64,
    plain_us: u64,
    /// Store throughput ÷ plain throughput.
    ratio: f64,
}

/// A lazy restore from S3.
#[derive(Debug, Serialize)]
struct S3RestoreRow {
    mem_mib: u64,
    cache: &'static str,
    first_instruction_us: u64,
    next_pass_us: u64,
    faults_served: u64,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    pairs: Vec<PairRow>,
    uploads: Vec<UploadRow>,
    restores: Vec<S3RestoreRow>,
}

/// The store of a directory or an `s3://` URL, and its address as a parent.
fn store(address: &str, endpoint: Option<&str>) -> anyhow::Result<(StoreSpec, String)> {
    let parsed: StoreAddress = address
        .parse()
        .map_err(|e: ckpt_format::AddressError| anyhow::anyhow!(e.about(address)))?;
    let spec = named_store(&parsed, endpoint).context("a RAM store cannot be measured")?;
    Ok((spec, parsed.to_string()))
}

fn request(store: StoreSpec, strategy: Strategy, parent: Option<ParentSpec>) -> CheckpointRequest {
    CheckpointRequest {
        store,
        options: CheckpointOptions {
            strategy,
            ..Default::default()
        },
        pause_probe: None,
        parent,
    }
}

/// `name` below `base`: a directory, or a prefix of an S3 URL.
fn below(base: &str, name: &str) -> String {
    format!("{}/{name}", base.trim_end_matches('/'))
}

/// Where one size and rate's checkpoints go, below `base`.
fn place(base: &str, mem: u64, rate: u64) -> String {
    below(base, &format!("{}m-{rate}pct", mem >> 20))
}

/// Boots the guest rewriting `rate` percent of its `mem` bytes, after filling the rest.
fn boot(args: &IncrementalBenchArgs, mem: u64, rate: u64) -> anyhow::Result<(Vm, Stamps, u64)> {
    let all = working_set(mem, 100);
    let rewritten = working_set(mem, rate).max(2 << 20);
    let mut cmdline = format!("dirty mem={}K fill=1 every=1", rewritten >> 10);
    if all > rewritten {
        cmdline.push_str(&format!(" rest={}K", (all - rewritten) >> 10));
    }
    let stamps = Stamps::default();
    let config =
        guest_args(&args.kernel, cmdline, mem).config(Console::Writer(Box::new(stamps.clone())))?;
    let vm = Vm::boot(config)?;
    if !stamps.wait_for(3, BOOT_WAIT) {
        bail!("the guest made fewer than 3 passes in {BOOT_WAIT:?}");
    }
    Ok((vm, stamps, rewritten))
}

/// A full checkpoint, two more passes of the guest, an incremental one: into `base`.
fn pair(
    args: &IncrementalBenchArgs,
    vm: &Vm,
    stamps: &Stamps,
    base: &str,
    strategy: Strategy,
) -> anyhow::Result<(Manifest, Manifest)> {
    let endpoint = args.s3_endpoint.as_deref();
    let (full_store, full_address) = store(&below(base, "full"), endpoint)?;
    let (incr_store, _) = store(&below(base, "incremental"), endpoint)?;
    let full = vm
        .checkpoint(
            &request(full_store.clone(), strategy, None),
            &Progress::default(),
        )
        .context("full checkpoint")?;
    let n = stamps.snapshot().len();
    if !stamps.wait_for(n + 2, BOOT_WAIT) {
        bail!("the guest made no progress after the full checkpoint");
    }
    let parent = ParentSpec {
        address: full_address,
        store: full_store,
    };
    let incremental = vm
        .checkpoint(
            &request(incr_store, strategy, Some(parent)),
            &Progress::default(),
        )
        .context("incremental checkpoint")?;
    Ok((full, incremental))
}

fn pair_row(
    store: &'static str,
    mem: u64,
    rate: u64,
    rewritten: u64,
    (full, incr): (Manifest, Manifest),
) -> PairRow {
    let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    PairRow {
        store,
        mem_mib: mem >> 20,
        rate_percent: rate,
        rewritten_mib: rewritten >> 20,
        bytes_ratio: ratio(incr.metrics.bytes_written, full.metrics.bytes_written),
        time_ratio: ratio(incr.metrics.total_us, full.metrics.total_us),
        full: Taken::of(&full),
        incremental: Taken::of(&incr),
    }
}

/// The memory image of the directory checkpoint `dir`, as a plain upload would send it.
fn memory_image(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = dir.join("memory.img");
    std::fs::read(&path).with_context(|| format!("read {}", path.display()))
}

/// Lazy restores of the S3 checkpoint `url` into a fresh cache directory, then again with it.
fn s3_restores(
    args: &IncrementalBenchArgs,
    mem: u64,
    url: &str,
    cache: &Path,
) -> anyhow::Result<Vec<S3RestoreRow>> {
    if cache.exists() {
        std::fs::remove_dir_all(cache)?;
    }
    let mut rows = Vec::new();
    for which in ["cold", "warm"] {
        let (spec, _) = store(url, args.s3_endpoint.as_deref())?;
        let StoreSpec::S3(s3) = spec else {
            bail!("{url} is not an S3 store");
        };
        let stamps = Stamps::default();
        let start = Instant::now();
        let vm = Vm::restore(
            &StoreSpec::S3(s3.cache_dir(cache)),
            RestoreOptions {
                console: Console::Writer(Box::new(stamps.clone())),
                eager: false,
                disk_dir: None,
                allow_dirs: Vec::new(),
            },
        )?;
        let first_instruction = start.elapsed();
        let passed = stamps.wait_for(1, BOOT_WAIT);
        let next_pass = stamps.snapshot().first().map(|s| s.at - start);
        // The warm restore needs all of memory in the cache: wait for the prefetcher.
        let stats: Option<RestoreStats> = wait_resident(&vm);
        vm.stop();
        drop(vm);
        let Some(next_pass) = next_pass.filter(|_| passed) else {
            bail!("the guest restored from {url} made no pass in {BOOT_WAIT:?}");
        };
        rows.push(S3RestoreRow {
            mem_mib: mem >> 20,
            cache: which,
            first_instruction_us: first_instruction.as_micros() as u64,
            next_pass_us: next_pass.as_micros() as u64,
            faults_served: stats.map_or(0, |s| s.pages.faults_served),
        });
    }
    Ok(rows)
}

/// Waits until the page service has all of memory resident; its statistics then.
fn wait_resident(vm: &Vm) -> Option<RestoreStats> {
    let start = Instant::now();
    loop {
        let stats = vm.restore_stats()?;
        if stats.pages.resident_after_us.is_some() || start.elapsed() > BOOT_WAIT {
            return Some(stats);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn run(args: IncrementalBenchArgs) -> anyhow::Result<ExitCode> {
    let sizes = memory_sizes(false, &args.sizes)?;
    if let Some(bad) = args.rates.iter().find(|r| !(1..=100).contains(*r)) {
        bail!("--rates: {bad} is not a percentage between 1 and 100");
    }
    let strategy = parse_strategy(&args.strategy)?;
    std::fs::create_dir_all(&args.store_dir)
        .with_context(|| format!("create {}", args.store_dir.display()))?;
    let dir_base = std::path::absolute(&args.store_dir)?
        .to_str()
        .context("--store-dir is not UTF-8")?
        .to_string();
    // A fresh prefix per run: the store refuses a prefix that holds objects.
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let s3_run = args
        .s3
        .as_deref()
        .map(|url| below(url, &format!("run-{}", since_epoch.as_millis())));
    let mut report = Report::default();
    for &mem in &sizes {
        for &rate in &args.rates {
            eprintln!("measuring {}% of {}...", rate, MemSize(mem));
            let (vm, stamps, rewritten) = boot(&args, mem, rate)?;
            let base = place(&dir_base, mem, rate);
            let taken = pair(&args, &vm, &stamps, &base, strategy)?;
            let full_bytes = taken.0.metrics.bytes_written;
            report
                .pairs
                .push(pair_row("dir", mem, rate, rewritten, taken));
            let mut image = None;
            if let Some(url) = &s3_run {
                let s3_base = place(url, mem, rate);
                let s3_taken = pair(&args, &vm, &stamps, &s3_base, strategy)?;
                let s3_full_us = s3_taken.0.metrics.total_us;
                report
                    .pairs
                    .push(pair_row("s3", mem, rate, rewritten, s3_taken));
                if rate == args.rates[0] {
                    let image_of = memory_image(Path::new(&below(&base, "full")))?;
                    image = Some((image_of, s3_full_us));
                }
            }
            vm.stop();
            drop(vm);
            if let (Some(url), Some((image, store_us))) = (&s3_run, image) {
                let (spec, _) = store(url, args.s3_endpoint.as_deref())?;
                let StoreSpec::S3(s3) = spec else {
                    bail!("{url} is not an S3 store");
                };
                // The store wrote only the pages that are not zero: the plain upload sends
                // as many bytes.
                let bytes = full_bytes.min(image.len() as u64) as usize;
                let mut image = image;
                image.truncate(bytes);
                let start = Instant::now();
                s3.upload_plain(&format!("plain-{}m", mem >> 20), Arc::new(image))?;
                let plain_us = start.elapsed().as_micros() as u64;
                report.uploads.push(UploadRow {
                    mem_mib: mem >> 20,
                    bytes: bytes as u64,
                    store_us,
                    plain_us,
                    ratio: plain_us as f64 / store_us.max(1) as f64,
                });
                let full_url = below(&place(url, mem, rate), "full");
                let cache = args.store_dir.join(format!("cache-{}m", mem >> 20));
                report
                    .restores
                    .extend(s3_restores(&args, mem, &full_url, &cache)?);
                std::fs::remove_dir_all(&cache).ok();
            }
            std::fs::remove_dir_all(&base).ok();
        }
    }
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

fn tables(report: &Report) -> String {
    let mut out = String::new();
    out.push_str("| store | MiB | rewritten | full MB | full ms | incremental MB | incremental ms | pages in parent | bytes incr ÷ full | time incr ÷ full |\n");
    out.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for r in &report.pairs {
        out.push_str(&format!(
            "| {} | {} | {}% ({} MiB) | {:.1} | {:.0} | {:.2} | {:.0} | {} | {:.3} | {:.3} |\n",
            r.store,
            r.mem_mib,
            r.rate_percent,
            r.rewritten_mib,
            r.full.bytes_written as f64 / 1e6,
            ms(r.full.total_us),
            r.incremental.bytes_written as f64 / 1e6,
            ms(r.incremental.total_us),
            r.incremental.pages_in_parent,
            r.bytes_ratio,
            r.time_ratio,
        ));
    }
    if !report.uploads.is_empty() {
        out.push_str("\n| MiB | MB uploaded | S3 store ms | plain multipart ms | store ÷ plain throughput |\n");
        out.push_str("|--:|--:|--:|--:|--:|\n");
        for u in &report.uploads {
            out.push_str(&format!(
                "| {} | {:.1} | {:.0} | {:.0} | {:.2}x |\n",
                u.mem_mib,
                u.bytes as f64 / 1e6,
                ms(u.store_us),
                ms(u.plain_us),
                u.ratio
            ));
        }
    }
    if !report.restores.is_empty() {
        out.push_str("\n| MiB | cache | first instruction ms | next pass ms | faults served |\n");
        out.push_str("|--:|---|--:|--:|--:|\n");
        for r in &report.restores {
            out.push_str(&format!(
                "| {} | {} | {:.1} | {:.0} | {} |\n",
                r.mem_mib,
                r.cache,
                ms(r.first_instruction_us),
                ms(r.next_pass_us),
                r.faults_served
            ));
        }
    }
    out
}

fn plot(dir: &Path, report: &Report) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut series = Vec::new();
    for store in ["dir", "s3"] {
        let mut sizes: Vec<u64> = report
            .pairs
            .iter()
            .filter(|r| r.store == store)
            .map(|r| r.mem_mib)
            .collect();
        sizes.dedup();
        for mib in sizes {
            series.push(Series {
                label: format!("{store}, {mib} MiB"),
                points: report
                    .pairs
                    .iter()
                    .filter(|r| r.store == store && r.mem_mib == mib)
                    .map(|r| (r.rate_percent as f64, r.bytes_ratio))
                    .collect(),
            });
        }
    }
    line_chart_log_y(
        &dir.join("incremental-bytes.svg"),
        &Chart {
            title: "incremental checkpoint bytes ÷ full checkpoint bytes",
            x_label: "memory rewritten between checkpoints (%, log scale)",
            y_label: "bytes incremental ÷ full (log scale)",
            log_x: true,
        },
        &series,
    )?;
    eprintln!(
        "plot written to {}",
        dir.join("incremental-bytes.svg").display()
    );
    Ok(())
}
