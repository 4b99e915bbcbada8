//! The `cowvm` command: boots, checkpoints, restores, clones and rolls back VMs.

mod api;
mod bench;
mod bench_checkpoint;
mod bench_compare;
mod bench_restore;
mod cli;
mod client;
mod disk_cmd;
mod periodic;
mod plot;
mod restore;
mod supervise;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use api::control::RollbackSettings;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;
use vmm::{Console, HugePages, MemSize, Vm, VmConfig, VmExit};

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

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum HugePagesArg {
    None,
    Thp,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a kernel and run it until the guest exits; the exit status is the guest's.
    Run(RunArgs),
    /// Take a checkpoint of a running VM (through its API socket), wait, print its metrics.
    Checkpoint(cli::CheckpointArgs),
    /// Pause a running VM.
    Pause(cli::VmCommandArgs),
    /// Resume a VM paused with `cowvm pause`.
    Resume(cli::VmCommandArgs),
    /// The state of a running VM and its checkpoints.
    Status(cli::VmCommandArgs),
    /// Show a checkpoint's manifest and metrics (reads the store; no VM needed).
    Inspect(cli::InspectArgs),
    /// Run a VM restored from a checkpoint until the guest exits; the exit status is the guest's.
    Restore(restore::RestoreArgs),
    /// Start N VMs from one checkpoint in this process, wait for all, report each.
    Clone(restore::CloneArgs),
    /// Return a running VM to an earlier checkpoint of its own, in the same process.
    Rollback(cli::RollbackArgs),
    /// Disk images: create overlays, commit them.
    #[command(subcommand)]
    Disk(disk_cmd::DiskCommand),
    /// Benchmarks of the VMM itself.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// How to build a VM.
#[derive(clap::Args, Debug, Clone)]
pub struct VmArgs {
    /// Kernel: a PVH ELF, a Linux bzImage or a vmlinux ELF.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Guest memory size, such as 512M or 2G.
    #[arg(long, default_value = "256M")]
    mem: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Transparent huge pages for guest memory.
    #[arg(long, value_enum, default_value_t = HugePagesArg::None)]
    hugepages: HugePagesArg,
    /// A virtio-blk disk: PATH[,readonly][,delay_ms=N] (raw or qcow2; repeatable).
    #[arg(long = "disk", value_name = "PATH[,OPTS]")]
    disks: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Write the serial console to this file instead of standard output.
    #[arg(long)]
    console: Option<PathBuf>,
    #[command(flatten)]
    control: supervise::ControlArgs,
}

impl VmArgs {
    /// The VM configuration these arguments describe.
    pub fn config(&self, console: Console) -> anyhow::Result<VmConfig> {
        let mem: MemSize = self
            .mem
            .parse()
            .with_context(|| format!("--mem {}", self.mem))?;
        Ok(VmConfig {
            mem_size: mem.0,
            vcpus: self.vcpus,
            hugepages: match self.hugepages {
                HugePagesArg::None => HugePages::None,
                HugePagesArg::Thp => HugePages::Thp,
            },
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            console,
            disks: self
                .disks
                .iter()
                .map(|d| disk_cmd::parse_disk(d))
                .collect::<anyhow::Result<_>>()?,
        })
    }
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

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let console = match &args.console {
        Some(path) => Console::File(path.clone()),
        None => Console::Stdout,
    };
    let vm = Vm::boot(args.vm.config(console)?)?;
    let exit = if args.control.wanted() {
        let origin = supervise::Origin {
            restored_from: None,
            rollback: RollbackSettings {
                console: args.console.clone(),
                disk_dir: None,
            },
        };
        supervise::run(vm, &args.control, origin)?
    } else {
        vm.wait()
    };
    Ok(exit_code(&exit))
}

/// The process status for how the VM ended (the guest's own status, or 125 for a VMM-side
/// failure, which is reported on standard error).
pub fn exit_code(exit: &VmExit) -> ExitCode {
    match exit {
        VmExit::Guest(_) | VmExit::Stopped => {}
        other => eprintln!("cowvm: {other}"),
    }
    ExitCode::from(exit.status() as u8)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = init_logging(&cli.log_level, cli.log_format).and_then(|()| match cli.command {
        Command::Run(args) => run(args),
        Command::Checkpoint(args) => cli::checkpoint(args),
        Command::Pause(args) => cli::pause(args),
        Command::Resume(args) => cli::resume(args),
        Command::Status(args) => cli::status(args),
        Command::Inspect(args) => cli::inspect(args),
        Command::Restore(args) => restore::restore(args),
        Command::Clone(args) => restore::clone(args),
        Command::Rollback(args) => cli::rollback(args),
        Command::Disk(cmd) => disk_cmd::run(cmd),
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
