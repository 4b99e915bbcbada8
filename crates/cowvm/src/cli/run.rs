//! `cowvm run`: boots a kernel and runs it until the guest exits, with the VM options shared by
//! every command that builds a VM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::ValueEnum;
use vmm::{Console, HugePages, MemSize, Vm, VmConfig, VmExit};

use crate::control::supervise::{self, ControlArgs, Ended, Origin};
use crate::control::RollbackSettings;

/// Transparent huge pages for guest memory.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum HugePagesArg {
    None,
    Thp,
}

impl From<HugePagesArg> for HugePages {
    fn from(arg: HugePagesArg) -> HugePages {
        match arg {
            HugePagesArg::None => HugePages::None,
            HugePagesArg::Thp => HugePages::Thp,
        }
    }
}

/// How to build a VM.
#[derive(clap::Args, Debug, Clone)]
pub struct VmArgs {
    /// Kernel: a PVH ELF, a Linux bzImage or a vmlinux ELF.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Guest memory size, such as 512M or 2G.
    #[arg(long, default_value = "256M")]
    pub mem: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Transparent huge pages for guest memory.
    #[arg(long, value_enum, default_value_t = HugePagesArg::None)]
    pub hugepages: HugePagesArg,
    /// A virtio-blk disk: PATH[,readonly][,delay_ms=N] (raw or qcow2; repeatable).
    #[arg(long = "disk", value_name = "PATH[,OPTS]")]
    pub disks: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Write the serial console to this file instead of standard output.
    #[arg(long)]
    console: Option<PathBuf>,
    #[command(flatten)]
    control: ControlArgs,
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
            hugepages: self.hugepages.into(),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            console,
            disks: self
                .disks
                .iter()
                .map(|d| super::disk::parse_disk(d))
                .collect::<anyhow::Result<_>>()?,
        })
    }
}

/// Runs `cowvm run`.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let console = match &args.console {
        Some(path) => Console::File(path.clone()),
        None => Console::Stdout,
    };
    let vm = Vm::boot(args.vm.config(console)?)?;
    let origin = Origin {
        restored_from: None,
        rollback: RollbackSettings {
            console: args.console.clone(),
            disk_dir: None,
            allow_dirs: Vec::new(),
        },
        api_listener: None,
    };
    let exit = supervise::run_or_wait(vm, &args.control, origin)?;
    Ok(exit_code(&exit))
}

/// The process status for how the VM ended: the guest's own status (0 to 124), 125 for a
/// VMM-side failure (reported on standard error), or 128 plus the signal's number when SIGINT
/// or SIGTERM stopped it (130, 143), as a shell reports a process that a signal ended.
pub fn exit_code(ended: &Ended) -> ExitCode {
    if let Some(signal) = ended.signal {
        return ExitCode::from(128 + signal as u8);
    }
    match &ended.exit {
        VmExit::Guest(_) | VmExit::Stopped | VmExit::Migrated(_) => {}
        other => eprintln!("cowvm: {other}"),
    }
    ExitCode::from(ended.exit.status() as u8)
}
