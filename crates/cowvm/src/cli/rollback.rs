//! `cowvm rollback --api-sock SOCK DIR [--eager] [--json]`: returns a running VM to an earlier
//! checkpoint of its own, in the same process (the server restores the checkpoint, makes the
//! restored VM current and stops the old one).

use std::process::ExitCode;

use anyhow::Context;
use hyper::Method;

use super::checkpoint::absolute;
use super::output::{ms, table};
use super::{block_on, ApiArgs};
use crate::api::model::{RollbackBody, RollbackDone};

/// Arguments of `cowvm rollback`.
#[derive(clap::Args, Debug)]
pub struct RollbackArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The checkpoint: a directory, raw:PATH for a file or block device, mem:NAME for one
    /// taken into RAM by this VM's process, or s3://BUCKET/PREFIX.
    #[arg(value_name = "DIR")]
    from: String,
    /// The endpoint URL of an s3:// store (default: AWS_ENDPOINT_URL in the VM's process's
    /// environment, else AWS S3).
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Read and verify all memory before the restored VM runs (a corrupt page is then refused
    /// while the VM still runs on, instead of stopping the restored VM later).
    #[arg(long)]
    eager: bool,
}

/// Runs `cowvm rollback`.
pub fn rollback(args: RollbackArgs) -> anyhow::Result<ExitCode> {
    let client = args.api.client();
    let body = RollbackBody {
        from: absolute(&args.from, "DIR")?,
        s3_endpoint: args.s3_endpoint.clone(),
        eager: args.eager,
    };
    let done: RollbackDone = block_on(async {
        client
            .call(Method::PUT, "/rollback", Some(&body))
            .await
            .with_context(|| format!("cannot roll back to {}", body.from))
    })?;
    if args.api.json {
        println!("{}", serde_json::to_string(&done)?);
    } else {
        table(&[
            ("rolled back to", done.from.clone()),
            (
                "memory",
                if done.eager { "eager" } else { "lazy" }.to_string(),
            ),
            ("restore", ms(done.restore_us)),
            ("downtime", ms(done.downtime_us)),
        ]);
    }
    Ok(ExitCode::SUCCESS)
}
