//! `cowvm checkpoint flatten CHILD --out STORE [--s3-endpoint URL] [--json]`: writes one full
//! checkpoint equal to an incremental checkpoint's chain, so that the chain may be deleted.

use std::process::ExitCode;

use anyhow::Context;
use ckpt_format::{Checkpoint, DirStore, RawStore, Store};
use serde::Serialize;
use vmm::StoreSpec;

use super::output::{bytes, table};
use super::restore::store_spec;

/// Arguments of `cowvm checkpoint flatten`.
#[derive(clap::Args, Debug)]
pub struct FlattenArgs {
    /// The incremental checkpoint: a directory, raw:PATH or s3://BUCKET/PREFIX.
    #[arg(value_name = "CHILD")]
    child: String,
    /// Where the full checkpoint goes (a store holding no complete checkpoint).
    #[arg(long, value_name = "STORE")]
    out: String,
    /// The endpoint URL of s3:// stores, the chain's and the output's (default:
    /// AWS_ENDPOINT_URL, else AWS S3).
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct Report<'a> {
    child: &'a str,
    out: &'a str,
    /// Checkpoints in the chain, the child included.
    chain: usize,
    bytes_written: u64,
    total_us: u64,
}

fn store_of(arg: &str, s3_endpoint: Option<&str>) -> anyhow::Result<Box<dyn Store>> {
    Ok(match store_spec(arg, s3_endpoint)?.1 {
        StoreSpec::Raw(path) => Box::new(RawStore::new(path)),
        StoreSpec::S3(s3) => Box::new(s3),
        _ => Box::new(DirStore::new(arg)),
    })
}

/// Runs `cowvm checkpoint flatten`.
pub fn flatten(args: FlattenArgs) -> anyhow::Result<ExitCode> {
    let endpoint = args.s3_endpoint.as_deref();
    let child = store_of(&args.child, endpoint)?;
    let out = store_of(&args.out, endpoint)?;
    let ckpt = Checkpoint::open(child.as_ref()).with_context(|| args.child.clone())?;
    let chain = std::iter::successors(Some(&ckpt), |c| c.parent()).count();
    let manifest = ckpt_format::flatten(&ckpt, out.as_ref())
        .with_context(|| format!("cannot flatten {} into {}", args.child, args.out))?;
    let m = &manifest.metrics;
    if args.json {
        let report = Report {
            child: &args.child,
            out: &args.out,
            chain,
            bytes_written: m.bytes_written,
            total_us: m.total_us,
        };
        println!("{}", serde_json::to_string(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    table(&[
        ("flattened", args.child.clone()),
        ("chain", format!("{chain} checkpoints")),
        ("into", args.out.clone()),
        ("written", bytes(m.bytes_written)),
        ("took", format!("{:.1} ms", m.total_us as f64 / 1000.0)),
    ]);
    Ok(ExitCode::SUCCESS)
}
