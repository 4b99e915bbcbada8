//! `cowvm checkpoint --api-sock SOCK --out DIR [--parent STORE] [--strategy] [--io] [--disk]
//! [--json]`: takes a checkpoint of a running VM, shows its progress, waits until it is complete
//! and prints its metrics.

use std::path::{Component, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use ckpt_format::{AddressError, DiskPolicy, IoPolicy, Metrics, StoreAddress, Strategy};
use hyper::Method;
use serde::Serialize;

use super::block_on;
use super::output::{byte_bar, metric_rows, table};
use crate::api::model::{
    CheckpointBody, CheckpointJob, DiskArg, IoArg, JobPhase, JobStatus, StrategyArg,
};
use crate::client::ApiClient;

/// How often progress is polled.
const POLL: Duration = Duration::from_millis(100);

/// `cowvm checkpoint`: take a checkpoint, or `cowvm checkpoint flatten`.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct CheckpointCommand {
    #[command(subcommand)]
    action: Option<CheckpointAction>,
    #[command(flatten)]
    take: Option<CheckpointArgs>,
}

/// What else `cowvm checkpoint` does.
#[derive(clap::Subcommand, Debug)]
enum CheckpointAction {
    /// Write one full checkpoint equal to an incremental checkpoint's chain (no VM needed).
    Flatten(super::flatten::FlattenArgs),
}

/// Runs `cowvm checkpoint` or its subcommand.
pub fn run(cmd: CheckpointCommand) -> anyhow::Result<ExitCode> {
    match (cmd.action, cmd.take) {
        (Some(CheckpointAction::Flatten(args)), _) => super::flatten::flatten(args),
        (None, Some(args)) => checkpoint(args),
        (None, None) => bail!("--api-sock and --out are required (or a subcommand)"),
    }
}

/// Arguments of `cowvm checkpoint`.
#[derive(clap::Args, Debug)]
pub struct CheckpointArgs {
    /// The API socket of the VM (`cowvm run --api-sock`).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// The store: a directory, raw:PATH for a file or block device, mem:NAME for RAM inside
    /// the VM's process (for the fastest rollback; it lives as long as that process), or
    /// s3://BUCKET/PREFIX for an S3-protocol object store.
    #[arg(long, value_name = "DIR")]
    out: String,
    /// The endpoint URL of an s3:// store (default: AWS_ENDPOINT_URL in the VM's process's
    /// environment, else AWS S3).
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Memory copy-on-write mechanism.
    #[arg(long, value_enum, default_value_t)]
    strategy: StrategyArg,
    /// Disk I/O in flight at the checkpoint instant.
    #[arg(long, value_enum, default_value_t)]
    io: IoArg,
    /// What happens to the parent disk image.
    #[arg(long, value_enum, default_value_t)]
    disk: DiskArg,
    /// Take an incremental checkpoint: only the pages written since this checkpoint (a complete
    /// checkpoint of this VM taken by the same process) are written; a restore reads the others
    /// from it.
    #[arg(long, value_name = "STORE")]
    parent: Option<String>,
}

/// What `--json` prints: the job, its options, and its metrics at top level.
#[derive(Debug, Serialize)]
struct Report<'a> {
    id: &'a str,
    out: &'a str,
    strategy: Strategy,
    io: IoPolicy,
    disk: DiskPolicy,
    #[serde(flatten)]
    metrics: &'a Metrics,
}

/// The store argument `what` with its path made absolute and free of `.` and `..` (resolved
/// lexically, as a shell user means them), since the server takes only absolute, normal paths.
/// A RAM store (`mem:NAME`) and an S3 store name no file and are passed on as they are.
pub fn absolute(arg: &str, what: &str) -> anyhow::Result<String> {
    let address: StoreAddress = arg
        .parse()
        .map_err(|e: AddressError| anyhow!(e.about(&format!("{what} {arg}"))))?;
    let normal = |path: PathBuf| -> anyhow::Result<PathBuf> {
        let abs = std::path::absolute(&path).with_context(|| format!("{what} {arg}"))?;
        let mut normal = PathBuf::new();
        for c in abs.components() {
            match c {
                Component::ParentDir => {
                    normal.pop();
                }
                Component::CurDir => {}
                other => normal.push(other),
            }
        }
        Ok(normal)
    };
    let address = match address {
        StoreAddress::Dir(p) => StoreAddress::Dir(normal(p)?),
        StoreAddress::Raw(p) => StoreAddress::Raw(normal(p)?),
        other @ (StoreAddress::Mem(_) | StoreAddress::S3 { .. }) => other,
    };
    Ok(address.to_string())
}

/// Takes a checkpoint.
fn checkpoint(args: CheckpointArgs) -> anyhow::Result<ExitCode> {
    let client = ApiClient::new(&args.api_sock);
    let body = CheckpointBody {
        out: absolute(&args.out, "--out")?,
        s3_endpoint: args.s3_endpoint.clone(),
        strategy: args.strategy,
        io: args.io,
        disk: args.disk,
        parent: args
            .parent
            .as_deref()
            .map(|p| absolute(p, "--parent"))
            .transpose()?,
    };
    let job = block_on(async {
        let mut job: CheckpointJob = client
            .call(Method::PUT, "/checkpoints", Some(&body))
            .await
            .context("cannot start the checkpoint")?;
        let bar = byte_bar(job.progress.bytes_total, "preparing");
        let path = format!("/checkpoints/{}", job.id);
        while job.status == JobStatus::Running {
            bar.set_length(job.progress.bytes_total);
            bar.set_position(job.progress.bytes_done);
            bar.set_message(match job.phase {
                JobPhase::Paused => "paused",
                JobPhase::Writing => "writing",
                _ => "preparing",
            });
            tokio::time::sleep(POLL).await;
            job = client.get(&path).await.context("polling the checkpoint")?;
        }
        bar.finish_and_clear();
        Ok(job)
    })?;
    let metrics = match (&job.status, &job.metrics) {
        (JobStatus::Complete, Some(m)) => m,
        _ => bail!(
            "checkpoint {} failed: {}",
            job.id,
            job.error.as_deref().unwrap_or("no reason given")
        ),
    };
    if args.json {
        let report = Report {
            id: &job.id,
            out: &job.out,
            strategy: job.strategy,
            io: job.io,
            disk: job.disk,
            metrics,
        };
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let mut rows = vec![
            ("checkpoint", format!("{} complete", job.id)),
            ("out", job.out.clone()),
            (
                "options",
                format!(
                    "strategy {}, io {}, disk {}",
                    name(&job.strategy),
                    name(&job.io),
                    name(&job.disk)
                ),
            ),
        ];
        rows.extend(metric_rows(metrics));
        table(&rows);
    }
    Ok(ExitCode::SUCCESS)
}

/// The kebab-case name of an option, as the API and the command line spell it.
pub fn name(v: &impl Serialize) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_is_made_absolute_and_normal() {
        let cwd = std::env::current_dir().unwrap();
        let parent = cwd.parent().unwrap_or(&cwd).display().to_string();
        assert_eq!(absolute("/a/./b/../c", "--out").unwrap(), "/a/c");
        assert_eq!(absolute("raw:/dev/sdb", "--out").unwrap(), "raw:/dev/sdb");
        assert_eq!(absolute("mem:a", "--out").unwrap(), "mem:a");
        assert_eq!(absolute("s3://ckpt/a", "--out").unwrap(), "s3://ckpt/a");
        assert_eq!(
            absolute("x", "--out").unwrap(),
            cwd.join("x").display().to_string()
        );
        assert_eq!(
            absolute("../y", "--out").unwrap(),
            format!("{parent}/y").replace("//", "/")
        );
        assert!(absolute("raw:img", "--out").unwrap().starts_with("raw:/"));
    }
}
