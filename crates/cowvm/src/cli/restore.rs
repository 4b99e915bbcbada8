//! `cowvm restore` and `cowvm clone`: new VMs in this process from a checkpoint.
//!
//! `restore` runs one restored VM as `cowvm run` runs a booted one (console, exit status, API
//! socket, periodic checkpoints). `clone` starts N VMs from one checkpoint side by side; lazily
//! restored clones map the same memory image `MAP_PRIVATE`, so the pages none of them has
//! written are shared through the page cache, and each has its own COW files over the
//! checkpoint's disks.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use ckpt_format::{AddressError, StoreAddress};
use serde::Serialize;
use tracing::info;
use vmm::RestoreOptions;
use vmm::StoreSpec;
use vmm::{Console, Vm};

use crate::control::supervise::{self, ControlArgs, Origin};
use crate::control::{self, RollbackSettings};

/// Arguments of `cowvm restore`.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The checkpoint: a directory, raw:PATH for a file or block device, or
    /// s3://BUCKET/PREFIX.
    #[arg(value_name = "DIR")]
    from: String,
    /// The endpoint URL of an s3:// checkpoint (default: AWS_ENDPOINT_URL, else AWS S3).
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Keep what is read from an s3:// checkpoint (and its parents) in DIR, and read it from
    /// there when this host restores the same checkpoint again (verified again each time).
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Read and verify all memory before the VM runs, instead of serving it on demand (each
    /// page verified as it is first touched, the rest prefetched while the VM runs).
    #[arg(long)]
    eager: bool,
    #[command(flatten)]
    vm: RestoredVmArgs,
    /// Restore on the standby VM waiting on this API socket (`cowvm standby`) instead of in a
    /// new process: print how long it took and return; the VM runs in the standby's process.
    #[arg(
        long,
        value_name = "SOCKET",
        conflicts_with_all = ["cache", "console", "eager", "disk_dir", "allow_dirs", "api_sock", "checkpoint_every"]
    )]
    standby: Option<PathBuf>,
    /// With --standby: print one JSON object.
    #[arg(long, requires = "standby")]
    json: bool,
    #[command(flatten)]
    control: ControlArgs,
}

/// How `cowvm restore` and `cowvm standby` set up the VM they restore.
#[derive(clap::Args, Debug)]
pub(super) struct RestoredVmArgs {
    /// Write the serial console to this file instead of standard output.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Where the disks' fresh COW files go (default: next to the checkpoint's disks).
    #[arg(long, value_name = "DIR")]
    disk_dir: Option<PathBuf>,
    /// Trust checkpoint disks (and their backing files) below DIR besides the checkpoint's
    /// directory and --disk-dir (repeatable).
    #[arg(long = "allow-dir", value_name = "DIR")]
    allow_dirs: Vec<PathBuf>,
}

impl RestoredVmArgs {
    /// Creates `--disk-dir` if it is missing.
    pub(super) fn make_dirs(&self) -> anyhow::Result<()> {
        match &self.disk_dir {
            Some(dir) => make_dir(dir, "--disk-dir"),
            None => Ok(()),
        }
    }

    /// The options of a restore, lazy or `eager`.
    pub(super) fn options(&self, eager: bool) -> RestoreOptions {
        RestoreOptions {
            console: match &self.console {
                Some(path) => Console::File(path.clone()),
                None => Console::Stdout,
            },
            eager,
            disk_dir: self.disk_dir.clone(),
            allow_dirs: self.allow_dirs.clone(),
        }
    }

    /// What the control plane knows of the VM restored from `from` (`api_listener`: the API
    /// socket, if a server before the VM bound it already).
    pub(super) fn origin(
        &self,
        from: StoreAddress,
        api_listener: Option<std::os::unix::net::UnixListener>,
    ) -> Origin {
        Origin {
            restored_from: Some(from),
            rollback: RollbackSettings {
                console: self.console.clone(),
                disk_dir: self.disk_dir.clone(),
                allow_dirs: self.allow_dirs.clone(),
            },
            api_listener: api_listener.map(std::sync::Arc::new),
        }
    }
}

/// Arguments of `cowvm clone`.
#[derive(clap::Args, Debug)]
pub struct CloneArgs {
    /// The checkpoint: a directory, raw:PATH for a file or block device, or
    /// s3://BUCKET/PREFIX.
    #[arg(value_name = "DIR")]
    from: String,
    /// The endpoint URL of an s3:// checkpoint (default: AWS_ENDPOINT_URL, else AWS S3).
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Keep what is read from an s3:// checkpoint (and its parents) in DIR, and read it from
    /// there when this host restores the same checkpoint again (verified again each time).
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// How many VMs to start.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    count: u32,
    /// Where the consoles go, one file per clone: DIR/clone-<i>.log (i from 0).
    #[arg(long, value_name = "DIR", default_value = "clones")]
    console_dir: PathBuf,
    /// Where the disks' fresh COW files go (default: next to the checkpoint's disks).
    #[arg(long, value_name = "DIR")]
    disk_dir: Option<PathBuf>,
    /// Trust checkpoint disks (and their backing files) below DIR besides the checkpoint's
    /// directory and --disk-dir (repeatable).
    #[arg(long = "allow-dir", value_name = "DIR")]
    allow_dirs: Vec<PathBuf>,
    /// Read and verify all memory before each VM runs, into its own anonymous memory (no
    /// sharing). By default the checkpoint's memory is read and verified once into a sealed
    /// in-memory image that every clone maps copy-on-write, so clones share what they do not
    /// write.
    #[arg(long)]
    eager: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// The store a command-line checkpoint argument names: `raw:PATH`, `s3://BUCKET/PREFIX` (at
/// `s3_endpoint`, if given) or a directory. A RAM store (`mem:NAME`) exists only inside the
/// process that took it, which alone can use it.
pub fn store_spec(
    arg: &str,
    s3_endpoint: Option<&str>,
) -> anyhow::Result<(StoreAddress, StoreSpec)> {
    let address: StoreAddress = arg
        .parse()
        .map_err(|e: AddressError| anyhow!(e.about(arg)))?;
    match control::named_store(&address, s3_endpoint) {
        Some(spec) => Ok((address, spec)),
        None => bail!(
            "{arg} is a RAM checkpoint: it exists only inside the cowvm process that took it \
             (roll back to it with `cowvm rollback --api-sock SOCKET {arg}`)"
        ),
    }
}

/// `store` reading through the local cache `dir`, if given (S3 stores only).
pub(super) fn cached(store: StoreSpec, dir: Option<&Path>) -> anyhow::Result<StoreSpec> {
    match (store, dir) {
        (store, None) => Ok(store),
        (StoreSpec::S3(s3), Some(dir)) => {
            make_dir(dir, "--cache")?;
            Ok(StoreSpec::S3(s3.cache_dir(dir)))
        }
        (_, Some(_)) => bail!("--cache applies to s3:// checkpoints only (the others are local)"),
    }
}

/// Creates `dir` (and its parents) for files a command writes there.
fn make_dir(dir: &Path, flag: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{flag} {}", dir.display()))
}

/// Runs `cowvm restore`.
pub fn restore(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    if let Some(socket) = &args.standby {
        return super::standby::ask(socket, &args.from, args.s3_endpoint.as_deref(), args.json);
    }
    args.vm.make_dirs()?;
    let (from, store) = store_spec(&args.from, args.s3_endpoint.as_deref())?;
    let store = cached(store, args.cache.as_deref())?;
    let start = Instant::now();
    let vm = Vm::restore(&store, args.vm.options(args.eager))?;
    let first_instruction_us = vm.restore_stats().map_or(0, |s| s.first_instruction_us);
    info!(
        from = %args.from,
        restore_us = start.elapsed().as_micros() as u64,
        first_instruction_us,
        "restored VM runs"
    );
    // The page service logs "all restored memory is resident" with what it served.
    let exit = supervise::run_or_wait(vm, &args.control, args.vm.origin(from, None))?;
    Ok(super::exit_code(&exit))
}

/// One clone's line of the report.
#[derive(Debug, Serialize)]
struct CloneReport {
    clone: u32,
    /// The process status the clone's exit maps to (as `cowvm run` would exit).
    status: i32,
    exit: String,
    console: PathBuf,
    /// `Vm::restore` of this clone.
    start_us: u64,
    /// The clone's own disk images (COW files over the checkpoint's disks).
    disks: Vec<PathBuf>,
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct Report<'a> {
    from: &'a str,
    eager: bool,
    /// From the first restore until every clone runs.
    start_all_us: u64,
    clones: Vec<CloneReport>,
}

/// Runs `cowvm clone`.
pub fn clone(args: CloneArgs) -> anyhow::Result<ExitCode> {
    make_dir(&args.console_dir, "--console-dir")?;
    if let Some(dir) = &args.disk_dir {
        make_dir(dir, "--disk-dir")?;
    }
    let (_, store) = store_spec(&args.from, args.s3_endpoint.as_deref())?;
    let store = cached(store, args.cache.as_deref())?;
    let all = Instant::now();
    let shared = if args.eager {
        None
    } else {
        Some(Vm::load_shared_image(&store).context("loading the checkpoint's memory")?)
    };
    // If a restore fails, the clones already started are dropped (stopped) on the way out.
    let mut clones: Vec<(Vm, PathBuf, Duration)> = Vec::new();
    for i in 0..args.count {
        let console = args.console_dir.join(format!("clone-{i}.log"));
        let start = Instant::now();
        let options = RestoreOptions {
            console: Console::File(console.clone()),
            eager: args.eager,
            disk_dir: args.disk_dir.clone(),
            allow_dirs: args.allow_dirs.clone(),
        };
        let vm = match &shared {
            Some(image) => Vm::restore_clone(&store, image, options),
            None => Vm::restore(&store, options),
        }
        .with_context(|| format!("clone {i}"))?;
        clones.push((vm, console, start.elapsed()));
    }
    let start_all = all.elapsed();
    info!(
        count = args.count,
        start_all_us = start_all.as_micros() as u64,
        "every clone runs"
    );
    let reports: Vec<CloneReport> = clones
        .into_iter()
        .zip(0..)
        .map(|((vm, console, took), clone)| {
            let disks = vm
                .disks()
                .iter()
                .filter_map(|d| d.image_info().ok().map(|info| info.path))
                .collect();
            // The clones run side by side; waiting for each in turn waits for the slowest.
            let exit = vm.wait();
            CloneReport {
                clone,
                status: exit.status(),
                exit: exit.to_string(),
                console,
                start_us: took.as_micros() as u64,
                disks,
            }
        })
        .collect();
    let code = reports
        .iter()
        .map(|r| r.status)
        .find(|s| *s != 0)
        .unwrap_or(0);
    if args.json {
        let report = Report {
            from: &args.from,
            eager: args.eager,
            start_all_us: start_all.as_micros() as u64,
            clones: reports,
        };
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let width = reports
            .iter()
            .map(|r| r.console.display().to_string().len())
            .max()
            .unwrap_or(0)
            .max("CONSOLE".len());
        println!(
            "{:>5}  {:>6}  {:>10}  {:<width$}  EXIT",
            "CLONE", "STATUS", "START", "CONSOLE"
        );
        for r in &reports {
            println!(
                "{:>5}  {:>6}  {:>10}  {:<width$}  {}",
                r.clone,
                r.status,
                super::ms(r.start_us),
                r.console.display().to_string(),
                r.exit
            );
        }
        println!(
            "{} clones of {} started in {}",
            reports.len(),
            args.from,
            super::ms(start_all.as_micros() as u64)
        );
    }
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_arguments() {
        assert!(
            matches!(store_spec("raw:/dev/sdb", None), Ok((_, StoreSpec::Raw(p))) if p == Path::new("/dev/sdb"))
        );
        assert!(
            matches!(store_spec("ckpt", None), Ok((_, StoreSpec::Dir(p))) if p == Path::new("ckpt"))
        );
        assert!(matches!(
            store_spec("s3://bucket/key", Some("http://127.0.0.1:1")),
            Ok((_, StoreSpec::S3(s))) if s.location().to_string() == "s3://bucket/key"
        ));
        let e = store_spec("mem:a", None).unwrap_err().to_string();
        assert!(
            e.contains("RAM checkpoint") && e.contains("rollback"),
            "{e}"
        );
        let e = store_spec("s3://ab/key", None).unwrap_err().to_string();
        assert!(e.contains("s3://"), "{e}");
    }
}
