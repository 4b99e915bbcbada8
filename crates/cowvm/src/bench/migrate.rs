//! `cowvm bench migrate`: live migration, cowvm against QEMU, on the same guest, host and memory
//! size. For each size, share of memory the guest rewrites at full speed, and mode (pre-copy,
//! post-copy, hybrid), it boots the `dirty` guest, lets it run, migrates it over TCP on
//! localhost to a second VMM process, lets the destination run on, and reports the downtime each
//! VMM measured, what the guest's own progress stamps say it lost, the total time, the bytes
//! sent and the pre-copy rounds.
//!
//! cowvm runs as three processes of this binary: `cowvm receive --listen` (the destination),
//! `cowvm run --api-sock` (the source) and `cowvm migrate --json` (the request, whose JSON report
//! gives the VMM's figures). QEMU runs as two `qemu-system-x86_64` processes, the destination
//! with `-incoming tcp:…`, the source driven over QMP.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use vmm::MemSize;

use super::common::{guest_view, memory_sizes, GuestView, Stamp, Stamps, Window, SETTLE};
use super::compare::qemu::{self, MigrationState, Qemu, QemuConfig, MAX_DOWNTIME_LIMIT_MS};
use super::compare::{finished, load_average, run_description, Workload};
use super::plot::{line_chart, line_chart_log_y, Chart, Series};

/// Boot (QEMU runs SeaBIOS first) and the first passes that populate memory.
const BOOT_WAIT: Duration = Duration::from_secs(120);
/// How long the migrated guest may take for the passes it is watched for.
const AFTER_WAIT: Duration = Duration::from_secs(60);
/// How long a destination may take to listen.
const LISTEN_WAIT: Duration = Duration::from_secs(30);
/// How long a migration may take.
const MIGRATE_WAIT: Duration = Duration::from_secs(300);
/// How long the source `cowvm run` may take to exit after its VM migrated.
const SOURCE_EXIT_WAIT: Duration = Duration::from_secs(30);

#[derive(clap::Args, Debug)]
pub struct MigrateBenchArgs {
    /// The test guest kernel (the same binary boots on both systems).
    #[arg(long)]
    kernel: PathBuf,
    /// Guest memory sizes.
    #[arg(long, value_delimiter = ',', default_value = "256M,1G,4G")]
    sizes: Vec<String>,
    /// Shares of guest memory (percent) the guest rewrites at full speed, pass after pass,
    /// throughout.
    #[arg(long, value_delimiter = ',', default_value = "100,10",
          value_parser = clap::value_parser!(u64).range(1..=100))]
    write_pct: Vec<u64>,
    /// Migration modes, for both systems.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "precopy,postcopy,hybrid"
    )]
    modes: Vec<Mode>,
    /// The longest pause a pre-copy may take to copy what is left, in milliseconds (cowvm
    /// `--max-downtime`, QEMU `downtime-limit`). Default: each system's own (QEMU: 300).
    #[arg(long, value_name = "MS")]
    max_downtime: Option<u64>,
    /// Seconds after which a QEMU pre-copy that has not converged is made to finish: its
    /// downtime limit is raised to the largest QEMU takes, so that it stops the VM and copies
    /// the rest at once (the row is marked forced).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    force_after: u64,
    /// Print the rows as a JSON array instead of a table.
    #[arg(long)]
    json: bool,
    /// Where results.json, results.md, the plots and each measurement's logs go.
    #[arg(long, default_value = "target/bench/migrate")]
    out_dir: PathBuf,
}

/// How the memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    /// Copy memory while the guest runs, round after round, then stop it for what is left.
    Precopy,
    /// Stop at once, move the vCPU and device state, run on the destination, which fetches
    /// each page when the guest touches it while the rest streams behind.
    Postcopy,
    /// Pre-copy first, then post-copy for what is left (QEMU: after its first pass).
    Hybrid,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Hybrid => "hybrid",
        }
    }
}

/// The systems compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Engine {
    Cowvm,
    Qemu,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Cowvm => "cowvm",
            Engine::Qemu => "qemu",
        }
    }
}

/// What one migration yields before the guest view is computed.
struct Migrated {
    /// Undisturbed from `base_start` to `t0` (the request), migrating until `t1` (complete).
    window: Window,
    /// The guest's progress stamps, on the source and then on the destination.
    stamps: Vec<Stamp>,
    downtime_us: u64,
    total_us: u64,
    bytes_sent: u64,
    precopy_rounds: u64,
    forced: bool,
}

/// One measured migration.
#[derive(Debug, Serialize)]
struct Row {
    engine: Engine,
    mode: Mode,
    mem_mib: u64,
    /// Share of memory the guest rewrites throughout, in percent.
    write_pct: u64,
    /// Why the measurement failed (then every figure is zero).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// The VMM's own: cowvm `downtime_us`, QEMU `downtime`.
    downtime_us: u64,
    /// The longest gap between consecutive progress stamps across the migration, beyond a
    /// normal pass.
    guest_stall_us: u64,
    /// The passes the guest fell behind its undisturbed rate from the request on, as time at
    /// that rate.
    guest_lost_us: u64,
    /// The VMM's own: cowvm `total_us`, QEMU `total-time`.
    total_us: u64,
    /// cowvm `bytes_sent`, QEMU `ram.transferred`.
    bytes_sent: u64,
    /// cowvm `precopy_rounds`, QEMU `ram.dirty-sync-count`.
    precopy_rounds: u64,
    /// A QEMU pre-copy made to finish after `--force-after` seconds.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    forced: bool,
    /// Guest progress relative to undisturbed around the migration (ms, fraction).
    #[serde(skip)]
    timeline: Vec<(f64, f64)>,
}

impl Row {
    fn new(engine: Engine, mode: Mode, mem: u64, work: Workload) -> Row {
        Row {
            engine,
            mode,
            mem_mib: mem >> 20,
            write_pct: work.percent,
            error: None,
            downtime_us: 0,
            guest_stall_us: 0,
            guest_lost_us: 0,
            total_us: 0,
            bytes_sent: 0,
            precopy_rounds: 0,
            forced: false,
            timeline: Vec::new(),
        }
    }

    /// The row of migration `m`, whose progress stamps say `view`.
    fn measured(self, m: Migrated, view: GuestView) -> Row {
        Row {
            downtime_us: m.downtime_us,
            guest_stall_us: view.guest_pause_us,
            guest_lost_us: view.guest_lost_us,
            total_us: m.total_us,
            bytes_sent: m.bytes_sent,
            precopy_rounds: m.precopy_rounds,
            forced: m.forced,
            timeline: view.timeline,
            ..self
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("find a free TCP port")?;
    Ok(listener.local_addr()?.port())
}

/// Whether a socket listens on TCP `port` (IPv4), from `/proc/net/tcp`: asking by connecting
/// would take the one connection a destination accepts.
fn listening(port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    table.lines().skip(1).any(|line| {
        // sl local_address rem_address st ...; 0A is LISTEN.
        let mut fields = line.split_whitespace();
        let local = fields.nth(1).and_then(|a| a.rsplit_once(':'));
        let state = fields.nth(1);
        matches!((local, state), (Some((_, p)), Some("0A")) if u16::from_str_radix(p, 16) == Ok(port))
    })
}

/// Waits until the destination listens on `port`; `alive` fails when it has exited.
fn wait_listening(port: u16, mut alive: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let start = Instant::now();
    while !listening(port) {
        alive()?;
        if start.elapsed() > LISTEN_WAIT {
            bail!("the destination did not listen on port {port} within {LISTEN_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The line of a log that says what went wrong: the last one that mentions an error, else the
/// last one.
fn error_line(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines
        .iter()
        .rev()
        .find(|l| l.to_ascii_lowercase().contains("error"))
        .or(lines.last())
        .map_or_else(|| "no error output".into(), |l| l.to_string())
}

/// A `cowvm` process: its standard output (the console) copied into progress stamps or kept
/// in the pipe, its standard error in a log; killed if it still runs when dropped.
struct Process {
    /// The command, as errors name it (`cowvm receive`).
    role: &'static str,
    child: std::process::Child,
    log: PathBuf,
    console: Option<JoinHandle<()>>,
}

impl Process {
    fn spawn(
        role: &'static str,
        mut cmd: Command,
        log: PathBuf,
        console: Option<&Stamps>,
    ) -> anyhow::Result<Process> {
        let stderr = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("start {role}"))?;
        let console = console.and_then(|stamps| {
            let mut sink = stamps.clone();
            let mut out = child.stdout.take()?;
            Some(std::thread::spawn(move || {
                // Ends when the process exits; the copy cannot fail on the sink side.
                let _ = std::io::copy(&mut out, &mut sink);
            }))
        });
        Ok(Process {
            role,
            child,
            log,
            console,
        })
    }

    /// Fails with the process's own error once it has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!("{}: {} ({status})", self.role, error_line(&self.log)),
        }
    }

    /// Waits for the process to exit, killing it after `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > timeout {
                bail!("{} did not exit within {timeout:?}", self.role);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the guest has printed `n` progress stamps, failing early if the process
    /// exits.
    fn wait_for_stamps(
        &mut self,
        stamps: &Stamps,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        while stamps.snapshot().len() < n {
            self.check_running()?;
            if start.elapsed() > timeout {
                bail!(
                    "the guest under {} printed fewer than {n} progress stamps in {timeout:?}",
                    self.role
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// As [`Stamps::settle`]: [`SETTLE`], then two more stamps.
    fn settle(&mut self, stamps: &Stamps, timeout: Duration) -> anyhow::Result<()> {
        let n = stamps.snapshot().len();
        std::thread::sleep(SETTLE);
        self.wait_for_stamps(stamps, n + 2, timeout)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Best effort: a process that already exited makes kill fail harmlessly.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(console) = self.console.take() {
            let _ = console.join();
        }
    }
}

/// What `cowvm migrate --json` prints when the migration is over.
#[derive(Debug, Deserialize)]
struct CowvmReport {
    mode: String,
    downtime_us: u64,
    total_us: u64,
    bytes_sent: u64,
    precopy_rounds: u64,
}

/// Runs `cowvm migrate` to completion and returns its report.
fn cowvm_migrate(
    exe: &Path,
    sock: &Path,
    to: &str,
    mode: Mode,
    max_downtime: Option<u64>,
    log: PathBuf,
) -> anyhow::Result<CowvmReport> {
    let mut cmd = Command::new(exe);
    cmd.args(["migrate", "--api-sock"]).arg(sock).args([
        "--to",
        to,
        "--mode",
        mode.name(),
        "--json",
    ]);
    if let Some(ms) = max_downtime {
        cmd.args(["--max-downtime", &ms.to_string()]);
    }
    let mut migrate = Process::spawn("cowvm migrate", cmd, log, None)?;
    let status = migrate.wait_exit(MIGRATE_WAIT)?;
    if !status.success() {
        bail!("cowvm migrate: {} ({status})", error_line(&migrate.log));
    }
    let mut out = String::new();
    if let Some(stdout) = migrate.child.stdout.as_mut() {
        stdout
            .read_to_string(&mut out)
            .context("read cowvm migrate's report")?;
    }
    let report: CowvmReport = serde_json::from_str(out.trim())
        .with_context(|| format!("cowvm migrate --json printed no report: {out:?}"))?;
    if report.mode != mode.name() {
        bail!(
            "cowvm migrate reported mode {:?}, asked for {}",
            report.mode,
            mode.name()
        );
    }
    Ok(report)
}

/// cowvm: `cowvm receive` listening, `cowvm run` with the guest, `cowvm migrate` between them.
fn measure_cowvm(
    args: &MigrateBenchArgs,
    dir: &Path,
    mem: u64,
    work: Workload,
    mode: Mode,
) -> anyhow::Result<Migrated> {
    let exe = std::env::current_exe().context("the path of this cowvm binary")?;
    let port = free_port()?;
    let to = format!("tcp://127.0.0.1:{port}");
    let sock = dir.join("api.sock");

    let dst_stamps = Stamps::default();
    let mut receive = Command::new(&exe);
    receive.args(["receive", "--listen", &to]);
    let mut dst = Process::spawn(
        "cowvm receive",
        receive,
        dir.join("receive.log"),
        Some(&dst_stamps),
    )?;
    wait_listening(port, || dst.check_running())?;

    let src_stamps = Stamps::default();
    let mut run = Command::new(&exe);
    run.args(["run", "--kernel"])
        .arg(&args.kernel)
        .args(["--mem", &MemSize(mem).to_string()])
        .args(["--cmdline", &work.cmdline(mem)])
        .arg("--api-sock")
        .arg(&sock);
    let mut src = Process::spawn("cowvm run", run, dir.join("run.log"), Some(&src_stamps))?;
    src.wait_for_stamps(&src_stamps, 3, BOOT_WAIT)?;
    let base_start = Instant::now();
    src.settle(&src_stamps, BOOT_WAIT)?;

    let t0 = Instant::now();
    let report = cowvm_migrate(
        &exe,
        &sock,
        &to,
        mode,
        args.max_downtime,
        dir.join("migrate.log"),
    )?;
    let t1 = Instant::now();
    let status = src.wait_exit(SOURCE_EXIT_WAIT)?;
    if !status.success() {
        bail!(
            "cowvm run (the source) ended with {status} after the migration: {}",
            error_line(&src.log)
        );
    }
    dst.settle(&dst_stamps, AFTER_WAIT)?;
    let mut stamps = src_stamps.snapshot();
    stamps.extend(dst_stamps.snapshot());
    Ok(Migrated {
        window: Window { base_start, t0, t1 },
        stamps,
        downtime_us: report.downtime_us,
        total_us: report.total_us,
        bytes_sent: report.bytes_sent,
        precopy_rounds: report.precopy_rounds,
        forced: false,
    })
}

/// QEMU: a destination with `-incoming tcp:…`, the source migrated to it over QMP.
fn measure_qemu(
    args: &MigrateBenchArgs,
    dir: &Path,
    mem: u64,
    work: Workload,
    mode: Mode,
) -> anyhow::Result<Migrated> {
    let cmdline = work.cmdline(mem);
    let port = free_port()?;
    let uri = format!("tcp:127.0.0.1:{port}");
    let (src_dir, dst_dir) = (dir.join("source"), dir.join("destination"));
    for d in [&src_dir, &dst_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    let config = |dir, incoming| QemuConfig {
        kernel: &args.kernel,
        mem,
        cmdline: &cmdline,
        dir,
        incoming,
    };
    let mut dst = Qemu::start(&config(&dst_dir, Some(&uri)))?;
    let mut src = Qemu::start(&config(&src_dir, None))?;
    if mode != Mode::Precopy {
        dst.enable_postcopy()?;
        src.enable_postcopy()?;
    }
    src.unthrottle_migration()?;
    if let Some(ms) = args.max_downtime {
        src.set_downtime_limit(ms)?;
    }
    if !src.stamps.wait_for(3, BOOT_WAIT) {
        bail!("the guest under QEMU printed no progress in {BOOT_WAIT:?}");
    }
    let base_start = Instant::now();
    if !src.stamps.settle(BOOT_WAIT) {
        bail!("the guest under QEMU made fewer than 2 passes in {BOOT_WAIT:?}");
    }
    let dst_log = dst_dir.join("qemu.log");
    wait_listening(port, || {
        if dst.running() {
            Ok(())
        } else {
            bail!("the destination QEMU exited: {}", error_line(&dst_log))
        }
    })?;

    let t0 = Instant::now();
    src.start_migration(&uri)?;
    if mode == Mode::Postcopy {
        src.start_postcopy()?;
    }
    let force_after = Duration::from_secs(args.force_after);
    let mut switched = mode == Mode::Postcopy;
    let mut forced = false;
    let report = loop {
        match src.migration_state()? {
            MigrationState::Completed(report) => break report,
            MigrationState::Active { dirty_syncs } => {
                // The second sync ends the first pass over memory.
                if mode == Mode::Hybrid && !switched && dirty_syncs >= 2 {
                    src.start_postcopy()?;
                    switched = true;
                }
                if mode == Mode::Precopy && !forced && t0.elapsed() >= force_after {
                    src.set_downtime_limit(MAX_DOWNTIME_LIMIT_MS)?;
                    forced = true;
                }
                if t0.elapsed() > MIGRATE_WAIT {
                    bail!("the migration did not complete within {MIGRATE_WAIT:?}");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    let t1 = Instant::now();
    dst.finish_incoming()?;
    if !dst.stamps.settle(AFTER_WAIT) {
        bail!("the migrated guest made fewer than 2 passes in {AFTER_WAIT:?}");
    }
    let mut stamps = src.stamps.snapshot();
    stamps.extend(dst.stamps.snapshot());
    Ok(Migrated {
        window: Window { base_start, t0, t1 },
        stamps,
        downtime_us: report.downtime_us.unwrap_or(0),
        total_us: report.total_us.unwrap_or((t1 - t0).as_micros() as u64),
        bytes_sent: report.bytes.unwrap_or(0),
        precopy_rounds: report.dirty_syncs.unwrap_or(0),
        forced,
    })
}

/// One row: measured, or recorded as failed with its error so that the other rows survive.
fn measure(args: &MigrateBenchArgs, engine: Engine, mem: u64, work: Workload, mode: Mode) -> Row {
    let row = Row::new(engine, mode, mem, work);
    let what = format!(
        "{} {} at {}, {}% written",
        engine.name(),
        mode.name(),
        MemSize(mem),
        work.percent
    );
    eprintln!("measuring {what}...");
    let dir = args.out_dir.join("logs").join(format!(
        "{}-{}-{}M-{}pct",
        engine.name(),
        mode.name(),
        mem >> 20,
        work.percent
    ));
    // The logs of an earlier run of this measurement go.
    std::fs::remove_dir_all(&dir).ok();
    let measured = std::fs::create_dir_all(&dir)
        .with_context(|| format!("create {}", dir.display()))
        .and_then(|()| match engine {
            Engine::Cowvm => measure_cowvm(args, &dir, mem, work, mode),
            Engine::Qemu => measure_qemu(args, &dir, mem, work, mode),
        });
    let viewed = measured.and_then(|m| {
        let view = guest_view(&m.stamps, &m.window)?;
        Ok((m, view))
    });
    match viewed {
        Ok((m, view)) => row.measured(m, view),
        Err(e) => {
            eprintln!("{what} failed: {e:#}");
            Row {
                error: Some(format!("{e:#}")),
                ..row
            }
        }
    }
}

/// Refuses sizes for which two VMs (source and destination) might not fit in the host's
/// available memory.
fn check_memory(sizes: &[u64]) -> anyhow::Result<()> {
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kib| kib << 10);
    if let (Some(available), Some(&largest)) = (available, sizes.iter().max()) {
        if 2 * largest > available {
            bail!(
                "a migration of {} runs two VMs of that size, and the host has {} available",
                MemSize(largest),
                MemSize(available & !((1 << 20) - 1))
            );
        }
    }
    Ok(())
}

pub fn run(args: MigrateBenchArgs) -> anyhow::Result<ExitCode> {
    qemu::check_installed()?;
    let sizes = memory_sizes(false, &args.sizes)?;
    check_memory(&sizes)?;
    if args.write_pct.is_empty() || args.modes.is_empty() {
        bail!("--write-pct and --modes need at least one value each");
    }
    let load_before = load_average();
    let started = Instant::now();
    let mut rows = Vec::new();
    for &mem in &sizes {
        for &percent in &args.write_pct {
            let work = Workload { percent };
            for engine in [Engine::Cowvm, Engine::Qemu] {
                for &mode in &args.modes {
                    rows.push(measure(&args, engine, mem, work, mode));
                }
            }
        }
    }
    let took = started.elapsed();
    let load = format!("{load_before} at the start, {} at the end", load_average());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", table(&rows));
    }
    write_outputs(&args, &rows, &run_description(&load, took))?;
    let failed = rows.iter().filter(|r| r.error.is_some()).count();
    Ok(finished(&args.out_dir, took, failed, rows.len()))
}

fn ms(us: u64) -> f64 {
    us as f64 / 1e3
}

/// The rows as a Markdown table.
fn table(rows: &[Row]) -> String {
    let mut t = String::new();
    t.push_str("| engine | mode | MiB | write % | downtime ms | longest guest stall ms | guest time lost ms | total ms | MiB sent | precopy rounds |\n");
    t.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for r in rows {
        if let Some(error) = &r.error {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | failed: {} ||||||",
                r.engine.name(),
                r.mode.name(),
                r.mem_mib,
                r.write_pct,
                error.replace('|', "/")
            );
            continue;
        }
        let _ = writeln!(
            t,
            "| {} | {}{} | {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {} |",
            r.engine.name(),
            r.mode.name(),
            if r.forced { " (forced)" } else { "" },
            r.mem_mib,
            r.write_pct,
            ms(r.downtime_us),
            ms(r.guest_stall_us),
            ms(r.guest_lost_us),
            ms(r.total_us),
            r.bytes_sent as f64 / f64::from(1 << 20),
            r.precopy_rounds,
        );
    }
    t
}

fn write_outputs(args: &MigrateBenchArgs, rows: &[Row], run: &str) -> anyhow::Result<()> {
    let dir = &args.out_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let json = dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(rows)?)
        .with_context(|| format!("write {}", json.display()))?;
    let md = dir.join("results.md");
    std::fs::write(&md, format!("{run}{}", table(rows)))
        .with_context(|| format!("write {}", md.display()))?;
    plot(dir, rows, args.write_pct[0])
}

/// A chart against memory size: file, title, y label, and the value of a row in microseconds.
type SizeChart = (&'static str, String, &'static str, fn(&Row) -> u64);

/// Plots of the rows with `write_pct`: downtime, longest guest stall and total time against
/// memory size, one line per system and mode, and guest progress across the migration.
fn plot(dir: &Path, rows: &[Row], write_pct: u64) -> anyhow::Result<()> {
    let shown = |r: &&Row| r.error.is_none() && r.write_pct == write_pct;
    let mut lines: Vec<(Engine, Mode)> = Vec::new();
    for r in rows.iter().filter(shown) {
        if !lines.contains(&(r.engine, r.mode)) {
            lines.push((r.engine, r.mode));
        }
    }
    let per_size = |y: fn(&Row) -> u64| -> Vec<Series> {
        lines
            .iter()
            .map(|&(engine, mode)| Series {
                label: format!("{} {}", engine.name(), mode.name()),
                // Log scales cannot show zero: values below 10 µs are drawn at 10 µs.
                points: rows
                    .iter()
                    .filter(shown)
                    .filter(|r| r.engine == engine && r.mode == mode)
                    .map(|r| (r.mem_mib as f64, ms(y(r).max(10))))
                    .collect(),
            })
            .collect()
    };
    let charts: [SizeChart; 3] = [
        (
            "downtime-vs-memory.svg",
            format!("migration downtime vs memory ({write_pct}% written; floor 0.01 ms)"),
            "downtime reported by the VMM (ms, log scale)",
            |r| r.downtime_us,
        ),
        (
            "guest-stall-vs-memory.svg",
            format!("longest guest stall vs memory ({write_pct}% written; floor 0.01 ms)"),
            "longest gap between progress stamps beyond a pass (ms, log scale)",
            |r| r.guest_stall_us,
        ),
        (
            "total-vs-memory.svg",
            format!("migration total time vs memory ({write_pct}% written)"),
            "total (ms, log scale)",
            |r| r.total_us,
        ),
    ];
    for (file, title, y_label, y) in charts {
        line_chart_log_y(
            &dir.join(file),
            &Chart {
                title: &title,
                x_label: "guest memory (MiB, log scale)",
                y_label,
                log_x: true,
            },
            &per_size(y),
        )?;
    }
    // The progress picture at 1 GiB, or the size nearest below it.
    let size = rows
        .iter()
        .filter(shown)
        .map(|r| r.mem_mib)
        .filter(|&m| m <= 1024)
        .max()
        .unwrap_or(0);
    let progress: Vec<Series> = rows
        .iter()
        .filter(shown)
        .filter(|r| r.mem_mib == size)
        .map(|r| Series {
            label: format!("{} {}", r.engine.name(), r.mode.name()),
            points: r.timeline.clone(),
        })
        .collect();
    line_chart(
        &dir.join("progress-across-migration.svg"),
        &Chart {
            title: &format!("guest progress across a migration ({size} MiB, {write_pct}% written)"),
            x_label: "time since the migration request (ms)",
            y_label: "progress / undisturbed progress",
            log_x: false,
        },
        &progress,
    )
}
