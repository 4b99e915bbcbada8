//! `cowvm checkpoint --api-sock SOCK --out DIR [--strategy] [--io] [--disk] [--json]`: takes a
//! checkpoint of a running VM, shows its progress, waits until it is complete and prints its
//! metrics; `--parent STORE` makes it incremental. `cowvm checkpoint delete --api-sock SOCK DIR
//! [--json]`: deletes a checkpoint of the VM and merges away the disk layers it alone needed.
//! `cowvm checkpoint flatten`: see [`super::flatten`].

use std::path::{Component, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use ckpt_format::{AddressError, DiskPolicy, IoPolicy, Metrics, StoreAddress, Strategy};
use hyper::Method;
use serde::Serialize;

use super::output::{byte_bar, metric_rows, table};
use super::{block_on, ApiArgs};
use crate::api::model::{
    CheckpointBody, CheckpointDeleted, CheckpointJob, DeleteBody, DiskArg, IoArg, JobPhase,
    JobStatus, StrategyArg,
};

/// How often progress is polled.
const POLL: Duration = Duration::from_millis(100);

/// `cowvm checkpoint`: take one, or `delete` one.
#[derive(clap::Args, Debug)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    flatten_help = true
)]
pub struct CheckpointCommand {
    #[command(subcommand)]
    action: Option<CheckpointAction>,
    #[command(flatten)]
    take: CheckpointArgs,
}

/// What `cowvm checkpoint` does besides taking one.
#[derive(clap::Subcommand, Debug)]
pub enum CheckpointAction {
    /// Delete a checkpoint of the VM (through its API socket); the disk layers no retained
    /// checkpoint needs any more are merged into the layer above them and deleted.
    Delete(DeleteArgs),
    /// Write one full checkpoint equal to an incremental checkpoint's chain (no VM needed).
    Flatten(super::flatten::FlattenArgs),
}

/// Arguments of `cowvm checkpoint delete`.
#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The checkpoint: a directory, or mem:NAME for one taken into RAM by the VM's process.
    #[arg(value_name = "DIR")]
    path: String,
}

/// Arguments of `cowvm checkpoint` (taking one). Required unless `delete` is given, hence
/// options here (and the API arguments spelt out rather than flattened).
#[derive(clap::Args, Debug)]
pub struct CheckpointArgs {
    /// The API socket of the VM (`cowvm run --api-sock`).
    #[arg(long, value_name = "PATH", required = true)]
    api_sock: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// The store: a directory, raw:PATH for a file or block device, mem:NAME for RAM inside
    /// the VM's process (for the fastest rollback; it lives as long as that process), or
    /// s3://BUCKET/PREFIX for an S3-protocol object store.
    #[arg(long, value_name = "DIR", required = true)]
    out: Option<String>,
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
    strategy_used: Strategy,
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

/// Runs `cowvm checkpoint` and `cowvm checkpoint delete`.
pub fn checkpoint(command: CheckpointCommand) -> anyhow::Result<ExitCode> {
    match command.action {
        Some(CheckpointAction::Delete(args)) => delete(args),
        Some(CheckpointAction::Flatten(args)) => super::flatten::flatten(args),
        None => take(command.take),
    }
}

/// Runs `cowvm checkpoint delete`.
fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let client = args.api.client();
    let body = DeleteBody {
        path: absolute(&args.path, "DIR")?,
    };
    let done: CheckpointDeleted = block_on(async {
        client
            .call(Method::DELETE, "/checkpoints", Some(&body))
            .await
            .with_context(|| format!("cannot delete {}", body.path))
    })?;
    if args.api.json {
        println!("{}", serde_json::to_string(&done)?);
    } else {
        let mut rows = vec![("deleted", done.path.clone())];
        for m in &done.merged {
            rows.push((
                "merged",
                format!(
                    "disk {}: {} into {} ({} bytes)",
                    m.disk, m.layer, m.into, m.bytes
                ),
            ));
        }
        table(&rows);
    }
    Ok(ExitCode::SUCCESS)
}

/// Takes a checkpoint.
fn take(args: CheckpointArgs) -> anyhow::Result<ExitCode> {
    let (Some(api_sock), Some(out)) = (args.api_sock, args.out) else {
        bail!("cowvm checkpoint needs --api-sock and --out (or delete, or flatten)");
    };
    let api = ApiArgs {
        api_sock,
        json: args.json,
    };
    let client = api.client();
    let body = CheckpointBody {
        out: absolute(&out, "--out")?,
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
    let (metrics, used) = match (&job.status, &job.metrics) {
        (JobStatus::Complete, Some(m)) => (m, job.strategy_used.unwrap_or(job.strategy)),
        _ => bail!(
            "checkpoint {} failed: {}",
            job.id,
            job.error.as_deref().unwrap_or("no reason given")
        ),
    };
    if api.json {
        let report = Report {
            id: &job.id,
            out: &job.out,
            strategy: job.strategy,
            strategy_used: used,
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
                    "strategy {}{}, io {}, disk {}",
                    name(&used),
                    if used == job.strategy {
                        String::new()
                    } else {
                        format!(" ({} asked)", name(&job.strategy))
                    },
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
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        command: CheckpointCommand,
    }

    #[test]
    fn take_delete_or_flatten() {
        let take = Cli::try_parse_from(["checkpoint", "--api-sock", "s", "--out", "/c"]).unwrap();
        assert!(take.command.action.is_none());
        assert_eq!(take.command.take.out.as_deref(), Some("/c"));
        let delete =
            Cli::try_parse_from(["checkpoint", "delete", "--api-sock", "s", "/c", "--json"])
                .unwrap();
        assert!(delete.command.take.out.is_none());
        match delete.command.action {
            Some(CheckpointAction::Delete(args)) => {
                assert_eq!(args.path, "/c");
                assert!(args.api.json);
            }
            other => panic!("not delete: {other:?}"),
        }
        let flatten =
            Cli::try_parse_from(["checkpoint", "flatten", "/child", "--out", "/full"]).unwrap();
        assert!(matches!(
            flatten.command.action,
            Some(CheckpointAction::Flatten(_))
        ));
        assert!(Cli::try_parse_from(["checkpoint", "flatten", "/child"]).is_err());
        assert!(Cli::try_parse_from(["checkpoint", "--api-sock", "s"]).is_err());
        assert!(Cli::try_parse_from(["checkpoint", "delete", "--api-sock", "s"]).is_err());
    }

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
