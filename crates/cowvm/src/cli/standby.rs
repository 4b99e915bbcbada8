//! `cowvm standby`: a VM made before its checkpoint is known. The process creates the KVM VM,
//! registers its memory and makes its vCPUs, then waits on its API socket for `PUT /restore`
//! (or `cowvm restore --standby SOCKET DIR`); the restore then only loads state, and the VM
//! runs as under `cowvm restore`, with its full API on the same socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tracing::{info, warn};
use vmm::{MemSize, Standby, Vm};

use super::restore::{cached, store_spec, RestoredVmArgs};
use crate::api::standby::{self, RestoreAsked, StandbyRestored};
use crate::api::ApiServer;
use crate::control::supervise::{self, ControlArgs};
use crate::control::{chain, named_store};

/// Arguments of `cowvm standby`.
#[derive(clap::Args, Debug)]
pub struct StandbyArgs {
    /// Guest memory (256M, 4G, ...): only a checkpoint of this size is taken.
    #[arg(long)]
    mem: String,
    /// vCPUs: only a checkpoint with this many is taken.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    vcpus: u8,
    /// The endpoint URL of s3:// checkpoints (default: AWS_ENDPOINT_URL, else AWS S3); a
    /// request may name another.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Keep what is read from s3:// checkpoints in DIR, and read it from there next time.
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    #[command(flatten)]
    vm: RestoredVmArgs,
    #[command(flatten)]
    control: ControlArgs,
}

/// Runs `cowvm standby`.
pub fn standby(args: StandbyArgs) -> anyhow::Result<ExitCode> {
    let Some(socket) = args.control.api_sock.clone() else {
        bail!("cowvm standby needs --api-sock: the restore is asked for there");
    };
    args.vm.make_dirs()?;
    let mem: MemSize = args
        .mem
        .parse()
        .with_context(|| format!("--mem {}", args.mem))?;
    let made = Instant::now();
    let mut vm_standby = Standby::new(mem.0, args.vcpus).context("cannot make the standby VM")?;
    info!(
        mem = mem.0,
        vcpus = args.vcpus,
        made_us = made.elapsed().as_micros() as u64,
        "standby VM ready"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (asks, mut asked) = mpsc::channel::<RestoreAsked>(1);
    let (server, mut int, mut term) = runtime.block_on(async {
        let server = ApiServer::bind(&socket, standby::router(mem.0, args.vcpus, asks))?;
        let int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        anyhow::Ok((server, int, term))
    })?;
    // The server runs on the runtime's thread only while this one waits in `block_on`: each
    // request is taken there and restored here, so the KVM work stays off the async thread.
    let restored = loop {
        let next = runtime.block_on(async {
            tokio::select! {
                ask = asked.recv() => Ok(ask),
                _ = int.recv() => Err(libc::SIGINT),
                _ = term.recv() => Err(libc::SIGTERM),
            }
        });
        let ask = match next {
            Ok(Some(ask)) => ask,
            Ok(None) => bail!("the standby API stopped"),
            Err(signal) => {
                info!(signal, "stopping the standby VM, unused");
                runtime.block_on(server.shutdown());
                return Ok(ExitCode::from(128 + signal as u8));
            }
        };
        match restore_on(&mut vm_standby, &args, &ask) {
            Ok((vm, first_instruction_us)) => {
                info!(from = %ask.from_text, first_instruction_us, "restored on the standby VM");
                let from = ask.from.clone();
                let _ = ask.reply.send(Ok(StandbyRestored {
                    from: ask.from_text,
                    first_instruction_us,
                }));
                break (vm, from);
            }
            Err(e) => {
                let kind = e
                    .downcast_ref::<vmm::RestoreError>()
                    .map_or(vmm::ErrorKind::InvalidInput, vmm::RestoreError::kind);
                let message = chain(e.as_ref());
                warn!(from = %ask.from_text, "restore refused: {message}");
                let _ = ask.reply.send(Err((kind, message.clone())));
                if vm_standby.is_used() {
                    runtime.block_on(server.shutdown());
                    bail!("the standby VM was used up by a failed restore: {message}");
                }
            }
        }
    };
    // Requests in flight finish (the answer to the restore among them); the socket stays
    // bound, and the VM's own API serves what arrives meanwhile.
    let listener = runtime.block_on(server.hand_over());
    drop(runtime);
    let (vm, from) = restored;
    let exit = supervise::run_or_wait(vm, &args.control, args.vm.origin(from, Some(listener)))?;
    Ok(super::exit_code(&exit))
}

/// Restores the checkpoint `ask` names on `standby`. Returns the VM and the microseconds from
/// taking the request until its vCPUs ran.
fn restore_on(
    standby: &mut Standby,
    args: &StandbyArgs,
    ask: &RestoreAsked,
) -> anyhow::Result<(Vm, u64)> {
    let started = Instant::now();
    let endpoint = ask.s3_endpoint.as_deref().or(args.s3_endpoint.as_deref());
    let Some(store) = named_store(&ask.from, endpoint) else {
        bail!(
            "{}: a RAM checkpoint exists only in the process that took it",
            ask.from_text
        );
    };
    let store = cached(store, args.cache.as_deref())?;
    let before_us = started.elapsed().as_micros() as u64;
    let vm = Vm::restore_standby(standby, &store, args.vm.options(false))?;
    // The restore's own figure ends when the vCPUs run (what follows it does not delay them).
    let restore_us = vm.restore_stats().map_or(0, |s| s.first_instruction_us);
    Ok((vm, before_us + restore_us))
}

/// `cowvm restore --standby SOCKET DIR`: asks the standby VM on `socket` to restore `from`,
/// and prints how long it took.
pub fn ask(
    socket: &std::path::Path,
    from: &str,
    s3_endpoint: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    // The standby process resolves the path: name it absolutely.
    let (address, _) = store_spec(from, s3_endpoint)?;
    let from = match address {
        ckpt_format::StoreAddress::Dir(p) => std::path::absolute(&p)
            .with_context(|| format!("{}", p.display()))?
            .display()
            .to_string(),
        ckpt_format::StoreAddress::Raw(p) => format!(
            "raw:{}",
            std::path::absolute(&p)
                .with_context(|| format!("{}", p.display()))?
                .display()
        ),
        _ => from.to_string(),
    };
    let body = standby::StandbyRestoreBody {
        from,
        s3_endpoint: s3_endpoint.map(str::to_string),
    };
    let client = crate::client::ApiClient::new(socket);
    let done: StandbyRestored = super::block_on(async {
        Ok(client
            .call(hyper::Method::PUT, "/restore", Some(&body))
            .await?)
    })?;
    if json {
        println!("{}", serde_json::to_string(&done)?);
    } else {
        println!(
            "restored {} on the standby VM: first instruction after {:.2} ms",
            done.from,
            done.first_instruction_us as f64 / 1e3
        );
    }
    Ok(ExitCode::SUCCESS)
}
