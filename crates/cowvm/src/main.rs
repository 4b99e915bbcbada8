//! The `cowvm` command: boots, checkpoints, restores, clones and rolls back VMs.

mod api;
mod bench;
mod cli;
mod client;
mod control;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "cowvm",
    version,
    about = "A KVM virtual machine monitor with live checkpoints"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or a tracing filter directive.
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a kernel and run it until the guest exits; the exit status is the guest's.
    Run(cli::RunArgs),
    /// Take a checkpoint of a running VM (through its API socket), wait, print its metrics;
    /// or delete one (`checkpoint delete`), or flatten an incremental one's chain.
    Checkpoint(cli::CheckpointCommand),
    /// Pause a running VM.
    Pause(cli::VmCommandArgs),
    /// Resume a VM paused with `cowvm pause`.
    Resume(cli::VmCommandArgs),
    /// The state of a running VM and its checkpoints.
    Status(cli::VmCommandArgs),
    /// Show a checkpoint's manifest and metrics (reads the store; no VM needed).
    Inspect(cli::InspectArgs),
    /// Run a VM restored from a checkpoint until the guest exits; the exit status is the guest's.
    Restore(cli::RestoreArgs),
    /// Make a VM before its checkpoint is known, wait on the API socket for the restore, then
    /// run the restored VM until the guest exits (restores in about a millisecond).
    Standby(cli::StandbyArgs),
    /// Start N VMs from one checkpoint in this process, wait for all, report each.
    Clone(cli::CloneArgs),
    /// Return a running VM to an earlier checkpoint of its own, in the same process.
    Rollback(cli::RollbackArgs),
    /// Wait for one VM migrated from another cowvm process, then run it until the guest exits.
    Receive(cli::ReceiveArgs),
    /// Move a running VM to a `cowvm receive` (live migration over TCP).
    Migrate(cli::MigrateArgs),
    /// Disk images: create overlays, commit them.
    #[command(subcommand)]
    Disk(cli::DiskCommand),
    /// Checkpoint stores: initialise a raw store.
    #[command(subcommand)]
    Store(cli::StoreCommand),
    /// Benchmarks of the VMM itself.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(level).with_context(|| format!("--log-level {level}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit: the API server, disks, stores and
/// clones each hold descriptors, and the soft limit (often 1024) is a historical default.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::debug!("getrlimit: {}", std::io::Error::last_os_error());
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads one rlimit from the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            tracing::debug!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_open_file_limit();
    let result = init_logging(&cli.log_level, cli.log_format).and_then(|()| match cli.command {
        Command::Run(args) => cli::run(args),
        Command::Checkpoint(args) => cli::checkpoint(args),
        Command::Pause(args) => cli::pause(args),
        Command::Resume(args) => cli::resume(args),
        Command::Status(args) => cli::status(args),
        Command::Inspect(args) => cli::inspect(args),
        Command::Restore(args) => cli::restore(args),
        Command::Standby(args) => cli::standby(args),
        Command::Clone(args) => cli::clone(args),
        Command::Rollback(args) => cli::rollback(args),
        Command::Receive(args) => cli::receive(args),
        Command::Migrate(args) => cli::migrate(args),
        Command::Disk(cmd) => cli::disk(cmd),
        Command::Store(cmd) => cli::store(cmd),
        Command::Bench(cmd) => bench::run(cmd),
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cowvm: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
