//! Every subcommand but `bench`: its arguments and its handler. `run`, `restore`, `clone` and
//! `standby` run VMs in this process; `checkpoint`, `pause`, `resume`, `status` and `rollback` talk to a
//! running VM through its API socket; `inspect` reads a checkpoint directly; `disk` works on
//! disk images; `store` makes raw checkpoint stores.

mod checkpoint;
mod disk;
mod flatten;
mod inspect;
mod migrate;
mod output;
mod restore;
mod rollback;
mod run;
mod standby;
mod store;
mod vm;

use std::future::Future;
use std::path::PathBuf;

use anyhow::Context;

pub use self::checkpoint::{checkpoint, CheckpointCommand};
pub use self::disk::{run as disk, DiskCommand};
pub use self::inspect::{inspect, InspectArgs};
pub use self::migrate::{migrate, receive, MigrateArgs, ReceiveArgs};
pub use self::output::ms;
pub use self::restore::{clone, restore, CloneArgs, RestoreArgs};
pub use self::rollback::{rollback, RollbackArgs};
pub use self::run::{exit_code, run, HugePagesArg, RunArgs, VmArgs};
pub use self::standby::{standby, StandbyArgs};
pub use self::store::{run as store, StoreCommand};
pub use self::vm::{pause, resume, status};
use crate::client::ApiClient;

/// How to reach a running VM.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// The API socket of the VM (`cowvm run --api-sock`).
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl ApiArgs {
    fn client(&self) -> ApiClient {
        ApiClient::new(&self.api_sock)
    }
}

/// `cowvm pause | resume | status`.
#[derive(clap::Args, Debug)]
pub struct VmCommandArgs {
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Runs an async client call to completion on a small runtime.
fn block_on<T>(f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(f)
}
