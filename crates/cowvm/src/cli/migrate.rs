//! `cowvm receive` and `cowvm migrate`: live migration of a running VM to another cowvm
//! process, on this host or another, over TCP, optionally with TLS.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use hyper::Method;
use tracing::info;
use vmm::{Console, MigrationMode, MigrationReport, ReceiveOptions, TlsServer, Vm};

use super::output::{ms, table};
use super::run::HugePagesArg;
use super::{block_on, ApiArgs};
use crate::api::model::MigrateBody;
use crate::control::supervise::{self, ControlArgs, Origin};
use crate::control::RollbackSettings;

/// Arguments of `cowvm receive`.
#[derive(clap::Args, Debug)]
pub struct ReceiveArgs {
    /// Where to wait for the VM: tcp://ADDR:PORT.
    #[arg(long, value_name = "URL")]
    listen: String,
    /// Write the serial console to this file instead of standard output.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Where the disks' COW files go (default: next to the source's disk layers), and the
    /// copies of the disks of a source that copies them (`migrate --copy-disks`): required
    /// for those.
    #[arg(long, value_name = "DIR")]
    disk_dir: Option<PathBuf>,
    /// Trust the disks the source names (and their backing files) below DIR (repeatable).
    /// A VM with a disk outside every trusted directory, and --disk-dir, is refused.
    #[arg(long = "allow-dir", value_name = "DIR")]
    allow_dirs: Vec<PathBuf>,
    /// Serve TLS with this certificate (PEM; the chain, this receiver's certificate first):
    /// only a source given it (migrate --tls-ca) is accepted. Needs --tls-key.
    #[arg(long, value_name = "CERT.pem", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "KEY.pem", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Transparent huge pages for the received VM's memory. With thp, KVM maps the guest's
    /// memory 2 MiB at a time, so the migrated guest's first touches cost fewer faults; none
    /// saves the kernel assembling huge pages where free memory is fragmented.
    #[arg(long, value_enum, default_value_t = HugePagesArg::Thp)]
    hugepages: HugePagesArg,
    #[command(flatten)]
    control: ControlArgs,
}

/// Arguments of `cowvm migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The destination, a `cowvm receive --listen`: tcp://ADDR:PORT.
    #[arg(long, value_name = "URL")]
    to: String,
    /// precopy (rounds while the guest runs, the rest in the pause), postcopy (only device
    /// state in the pause, memory on demand), or hybrid (a few rounds, then post-copy).
    #[arg(long, default_value = "hybrid")]
    mode: MigrationMode,
    /// Pre-copy stops once what is left could be sent in this many milliseconds (default 50).
    #[arg(long, value_name = "MS")]
    max_downtime: Option<u64>,
    /// Copy every layer of each disk's chain to the destination (no shared storage): the
    /// destination writes them under its --disk-dir and runs the VM on its own copy.
    #[arg(long)]
    copy_disks: bool,
    /// Connect with TLS, trusting only the certificates in this PEM file: the destination's
    /// certificate (receive --tls-cert), or the CA that signed it. Read by the VM's process.
    #[arg(long, value_name = "CERT.pem")]
    tls_ca: Option<PathBuf>,
    /// The name the destination's certificate must carry, when the host of --to is not in it
    /// (default: that host).
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    tls_server_name: Option<String>,
}

/// The `tcp://HOST:PORT` address of `url`.
fn tcp_address(url: &str) -> anyhow::Result<&str> {
    match url.strip_prefix("tcp://") {
        Some(addr) if !addr.is_empty() => Ok(addr),
        _ => bail!("{url:?} is not a migration address: expected tcp://ADDR:PORT"),
    }
}

/// Runs `cowvm receive`: waits for one VM, then runs it until the guest exits.
pub fn receive(args: ReceiveArgs) -> anyhow::Result<ExitCode> {
    let addr = tcp_address(&args.listen)?;
    if let Some(dir) = &args.disk_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("--disk-dir {}", dir.display()))?;
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsServer::from_pem_files(cert, key)?),
        _ => None,
    };
    let listener =
        TcpListener::bind(addr).with_context(|| format!("cannot listen on {}", args.listen))?;
    info!(listen = %args.listen, "waiting for a VM");
    let (stream, peer) = listener
        .accept()
        .with_context(|| format!("cannot accept on {}", args.listen))?;
    drop(listener);
    let console = match &args.console {
        Some(path) => Console::File(path.clone()),
        None => Console::Stdout,
    };
    let vm = Vm::receive(
        stream,
        ReceiveOptions {
            console,
            disk_dir: args.disk_dir.clone(),
            allow_dirs: args.allow_dirs.clone(),
            tls,
            hugepages: args.hugepages.into(),
        },
    )
    .with_context(|| format!("cannot receive the VM from {peer}"))?;
    info!(
        from = %peer,
        first_instruction_us = vm.restore_stats().map_or(0, |s| s.first_instruction_us),
        "received VM runs"
    );
    let exit = supervise::run_or_wait(
        vm,
        &args.control,
        Origin {
            restored_from: None,
            rollback: RollbackSettings {
                console: args.console.clone(),
                disk_dir: args.disk_dir.clone(),
                allow_dirs: args.allow_dirs.clone(),
            },
            api_listener: None,
        },
    )?;
    Ok(super::exit_code(&exit))
}

/// Runs `cowvm migrate`: asks the VM's process to move it, prints what the move cost.
pub fn migrate(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    tcp_address(&args.to)?;
    // The VM's process reads the file: name it absolutely.
    let tls_ca = match &args.tls_ca {
        Some(ca) => {
            Some(std::path::absolute(ca).with_context(|| format!("--tls-ca {}", ca.display()))?)
        }
        None => None,
    };
    let client = args.api.client();
    let body = MigrateBody {
        to: args.to.clone(),
        mode: Some(args.mode),
        max_downtime_ms: args.max_downtime,
        copy_disks: args.copy_disks.then_some(true),
        tls_ca,
        tls_server_name: args.tls_server_name.clone(),
    };
    let done: MigrationReport = block_on(async {
        client
            .call(Method::PUT, "/migration", Some(&body))
            .await
            .with_context(|| format!("cannot migrate the VM to {}", args.to))
    })?;
    if args.api.json {
        println!("{}", serde_json::to_string(&done)?);
    } else {
        table(&[
            ("migrated to", done.to.clone()),
            ("mode", done.mode.to_string()),
            ("downtime", ms(done.downtime_us)),
            ("pause", ms(done.pause_us)),
            ("total", ms(done.total_us)),
            ("bytes sent", done.bytes_sent.to_string()),
            ("pre-copy rounds", done.precopy_rounds.to_string()),
            ("pages pre-copied", done.pages_precopied.to_string()),
            ("pages in the pause", done.pages_in_pause.to_string()),
            ("pages post-copied", done.pages_postcopy.to_string()),
            ("disk bytes copied", done.disk_bytes_precopied.to_string()),
            (
                "disk bytes in the pause",
                done.disk_bytes_in_pause.to_string(),
            ),
        ]);
    }
    Ok(ExitCode::SUCCESS)
}
