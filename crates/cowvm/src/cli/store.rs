//! `cowvm store init`: make a new, empty raw checkpoint store.
//!
//! A raw store (one file or block device) is written only if it already holds a cowvm raw-store
//! header, so a `raw:` path given by mistake never overwrites user data; this command makes
//! the header.

use std::process::ExitCode;

use anyhow::{bail, Context};
use ckpt_format::{RawStore, StoreAddress};
use clap::Subcommand;
use vmm::MemSize;

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Make a new, empty raw store: a sparse file of --size bytes, an existing empty file, or
    /// (with --force) any existing file or block device.
    Init {
        /// The store: raw:PATH.
        #[arg(value_name = "raw:PATH")]
        store: String,
        /// Size of a new file, such as 8G (a block device keeps its own size).
        #[arg(long)]
        size: Option<String>,
        /// Also take a file or block device that holds data: every byte of it is given up.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(cmd: StoreCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        StoreCommand::Init { store, size, force } => init(&store, size.as_deref(), force),
    }
}

fn init(store: &str, size: Option<&str>, force: bool) -> anyhow::Result<ExitCode> {
    let size = size
        .map(|s| s.parse::<MemSize>().with_context(|| format!("--size {s}")))
        .transpose()?
        .map(|m| m.0);
    let address: StoreAddress = store
        .parse()
        .map_err(|e: ckpt_format::AddressError| anyhow::anyhow!(e.about(store)))?;
    let StoreAddress::Raw(path) = address else {
        bail!("{store}: only raw:PATH stores are initialised (a directory store is made by its first checkpoint)");
    };
    if force {
        RawStore::init_overwriting(&path, size)
    } else {
        RawStore::init(&path, size)
    }
    .with_context(|| format!("cannot initialise raw store {}", path.display()))?;
    eprintln!("initialised raw store {}", path.display());
    Ok(ExitCode::SUCCESS)
}
