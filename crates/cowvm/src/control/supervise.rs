//! `cowvm run` and `cowvm restore` with a control plane: the API server (`--api-sock`) and the
//! periodic checkpoint trigger (`--checkpoint-every`) run on a tokio runtime beside the VM,
//! until the VM ends. A rollback replaces the VM in this process; the process then follows the
//! new one and ends when the current VM does.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ckpt_format::{CheckpointOptions, StoreAddress};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};
use vmm::{Vm, VmExit};

use super::periodic::{self, Periodic};
use super::{Controller, RollbackSettings};
use crate::api::ApiServer;

/// The control options of `cowvm run` and `cowvm restore`.
#[derive(clap::Args, Debug, Clone)]
pub struct ControlArgs {
    /// Serve the control API (HTTP/1.1, JSON) on this Unix socket, created owner-only.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Take a checkpoint at this interval (500ms, 10s, 2m, ...).
    #[arg(long, value_name = "DURATION", value_parser = periodic::parse_duration, requires = "checkpoint_dir")]
    pub checkpoint_every: Option<Duration>,
    /// Where periodic checkpoints go, each in DIR/ckpt-<unix ms>.
    #[arg(long, value_name = "DIR", requires = "checkpoint_every")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Keep only the newest K complete periodic checkpoints (and the parents they need).
    #[arg(long, value_name = "K", requires = "checkpoint_every", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep: Option<u32>,
    /// Make every N-th periodic checkpoint a full one and the others incremental, each naming
    /// the one before (1: all full, the default).
    #[arg(long, value_name = "N", requires = "checkpoint_every", value_parser = clap::value_parser!(u32).range(1..))]
    pub full_every: Option<u32>,
    /// Bytes of original pages a `uffd` checkpoint may copy aside while the store catches up
    /// (512M, 2G, ...; at least one 2 MiB block): while budget remains a guest write never
    /// waits for the store. Default: a quarter of the host's available memory at each
    /// checkpoint's start, at least 64M.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub cow_budget: Option<u64>,
}

fn parse_bytes(text: &str) -> Result<u64, String> {
    text.parse::<vmm::MemSize>()
        .map(|size| size.0)
        .map_err(|e| e.to_string())
}

impl ControlArgs {
    /// Whether the VM needs a control plane.
    pub fn wanted(&self) -> bool {
        self.api_sock.is_some() || self.checkpoint_every.is_some()
    }
}

/// How the process's VM ended.
#[derive(Debug)]
pub struct Ended {
    /// How the current VM ended.
    pub exit: VmExit,
    /// The signal (SIGINT or SIGTERM) that stopped it, if one did.
    pub signal: Option<i32>,
}

impl From<VmExit> for Ended {
    fn from(exit: VmExit) -> Ended {
        Ended { exit, signal: None }
    }
}

/// Waits for the current VM to end, stopping it on SIGINT or SIGTERM. The exit of a VM that a
/// rollback has replaced (it is no longer current when it stops) does not count.
async fn wait_for_exit(controller: Arc<Controller>) -> anyhow::Result<Ended> {
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let waiter = controller.clone();
    let mut exit = tokio::task::spawn_blocking(move || loop {
        let vm = waiter.vm();
        if let Some(exit) = vm.wait_timeout(Duration::from_secs(1)) {
            // A rollback makes the new VM current before it stops the old one.
            if Arc::ptr_eq(&vm, &waiter.vm()) {
                return exit;
            }
            info!("the VM was rolled back: following the restored VM");
        }
    });
    let mut signal = None;
    loop {
        tokio::select! {
            exit = &mut exit => {
                let exit = exit.context("waiting for the VM")?;
                return Ok(Ended { exit, signal });
            }
            _ = int.recv() => {
                info!("SIGINT: stopping the VM");
                signal.get_or_insert(libc::SIGINT);
                controller.stop();
            }
            _ = term.recv() => {
                info!("SIGTERM: stopping the VM");
                signal.get_or_insert(libc::SIGTERM);
                controller.stop();
            }
        }
    }
}

/// What the process's VM was made from, for the API and for rollbacks.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The checkpoint it was restored from (`cowvm restore`), if any.
    pub restored_from: Option<StoreAddress>,
    /// How a rollback sets up the VM that replaces it.
    pub rollback: RollbackSettings,
    /// The API socket, already bound at `--api-sock` by the server before this VM existed
    /// (`cowvm standby`).
    pub api_listener: Option<Arc<std::os::unix::net::UnixListener>>,
}

/// Runs `vm` until it ends: with its control plane (`run`) if `args` asks for one.
pub fn run_or_wait(vm: Vm, args: &ControlArgs, origin: Origin) -> anyhow::Result<Ended> {
    if args.wanted() {
        run(vm, args, origin)
    } else {
        Ok(vm.wait().into())
    }
}

/// Runs `vm` with its control plane until the current VM (`vm`, or the VM of the latest
/// rollback) ends; returns how it ended.
fn run(vm: Vm, args: &ControlArgs, origin: Origin) -> anyhow::Result<Ended> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("cowvm-api")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    vm.set_cow_budget(args.cow_budget);
    if args.full_every.is_some_and(|n| n > 1) {
        vm.log_writes();
    }
    let Origin {
        restored_from,
        rollback,
        api_listener,
    } = origin;
    let controller = Arc::new(Controller::new(Arc::new(vm), restored_from, rollback));
    let exit = runtime.block_on(async {
        let server = match (&args.api_sock, api_listener) {
            (Some(path), Some(bound)) => Some(
                bound
                    .try_clone()
                    .map_err(|source| crate::api::ServeError::Io {
                        op: "serve",
                        path: path.clone(),
                        source,
                    })
                    .and_then(|listener| ApiServer::start_on(listener, path, controller.clone()))
                    .with_context(|| format!("--api-sock {}", path.display()))?,
            ),
            (Some(path), None) => Some(
                ApiServer::start(path, controller.clone())
                    .with_context(|| format!("--api-sock {}", path.display()))?,
            ),
            (None, _) => None,
        };
        let (stop_trigger, trigger_stopped) = tokio::sync::watch::channel(false);
        let trigger = match (args.checkpoint_every, &args.checkpoint_dir) {
            (Some(every), Some(dir)) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("--checkpoint-dir {}", dir.display()))?;
                let dir = std::path::absolute(dir)
                    .with_context(|| format!("--checkpoint-dir {}", dir.display()))?;
                Some(tokio::spawn(periodic::run(
                    controller.clone(),
                    Periodic {
                        every,
                        dir,
                        keep: args.keep.map(|k| k as usize),
                        full_every: args.full_every.unwrap_or(1),
                        options: CheckpointOptions::default(),
                    },
                    trigger_stopped,
                )))
            }
            _ => None,
        };
        let exit = wait_for_exit(controller.clone()).await;
        // A VM that migrated ended at the hand-over; its request answers, and the process may
        // end, once the destination has every page.
        controller.migrations_finished().await;
        if let Some(server) = server {
            server.shutdown().await;
        }
        // Nothing starts from here on (a request or a periodic tick may have been under way);
        // a checkpoint in progress finishes (its write-out does not need running vCPUs), so
        // that it is not left incomplete for no reason. The trigger finishes its tick: it
        // removes the directory of a checkpoint that failed and completes its pruning.
        controller.close();
        if let Some(trigger) = trigger {
            // The receiver is gone only if the trigger has ended already.
            let _ = stop_trigger.send(true);
            if let Err(e) = trigger.await {
                warn!("the periodic checkpoint trigger ended abnormally: {e}");
            }
        }
        if let Some(job) = controller.running() {
            info!(id = %job.id(), "waiting for the checkpoint in progress");
            job.finished().await;
        }
        controller.release_pause();
        exit
    });
    let vm = controller.vm();
    drop(controller);
    drop(runtime);
    // The last reference: dropping the VM joins the vCPU threads and flushes the console.
    if let Err(vm) = Arc::try_unwrap(vm) {
        tracing::debug!(
            references = Arc::strong_count(&vm),
            "the VM is still referenced"
        );
    }
    exit
}
