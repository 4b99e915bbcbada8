//! `cowvm pause | resume | status --api-sock SOCK [--json]`.

use std::process::ExitCode;

use anyhow::Context;
use hyper::Method;
use serde::Serialize;

use super::checkpoint::name;
use super::output::{bytes, table};
use super::{block_on, VmCommandArgs};
use crate::api::model::{CheckpointJob, VmInfo, VmPatch, VmState};

fn vm_rows(vm: &VmInfo) -> Vec<(&'static str, String)> {
    let state = match (vm.state, vm.paused_by) {
        (VmState::Running, _) => "running".to_string(),
        (VmState::Paused, Some(by)) => format!("paused (by {})", name(&by)),
        (VmState::Paused, None) => "paused".to_string(),
    };
    let mut rows = vec![
        ("state", state),
        ("memory", bytes(vm.config.mem_size)),
        ("vcpus", vm.config.vcpus.to_string()),
        ("kernel", vm.config.kernel.clone().unwrap_or_default()),
        ("cmdline", vm.config.cmdline.clone().unwrap_or_default()),
        ("uptime", format!("{:.1} s", vm.uptime_ms as f64 / 1000.0)),
        (
            "checkpoint",
            vm.checkpoint_in_progress
                .as_ref()
                .map_or("none in progress".into(), |id| format!("{id} in progress")),
        ),
    ];
    if let Some(from) = &vm.restored_from {
        rows.push(("restored from", from.clone()));
    }
    rows
}

fn set_state(args: &VmCommandArgs, state: VmState) -> anyhow::Result<ExitCode> {
    let client = args.api.client();
    let what = match state {
        VmState::Paused => "pause",
        VmState::Running => "resume",
    };
    let vm: VmInfo = block_on(async {
        client
            .call(Method::PATCH, "/vm", Some(&VmPatch { state }))
            .await
            .with_context(|| format!("cannot {what} the VM"))
    })?;
    if args.api.json {
        println!("{}", serde_json::to_string(&vm)?);
    } else {
        table(&vm_rows(&vm)[..1]);
    }
    Ok(ExitCode::SUCCESS)
}

/// `cowvm pause`.
pub fn pause(args: VmCommandArgs) -> anyhow::Result<ExitCode> {
    set_state(&args, VmState::Paused)
}

/// `cowvm resume`.
pub fn resume(args: VmCommandArgs) -> anyhow::Result<ExitCode> {
    set_state(&args, VmState::Running)
}

#[derive(Debug, Serialize, serde::Deserialize)]
struct JobList {
    checkpoints: Vec<CheckpointJob>,
}

/// `cowvm status`: the VM and its checkpoint jobs.
pub fn status(args: VmCommandArgs) -> anyhow::Result<ExitCode> {
    let client = args.api.client();
    let (vm, jobs) = block_on(async {
        let vm: VmInfo = client.get("/vm").await.context("cannot query the VM")?;
        let jobs: JobList = client
            .get("/checkpoints")
            .await
            .context("cannot list checkpoints")?;
        Ok((vm, jobs))
    })?;
    if args.api.json {
        let out = serde_json::json!({ "vm": vm, "checkpoints": jobs.checkpoints });
        println!("{out}");
        return Ok(ExitCode::SUCCESS);
    }
    table(&vm_rows(&vm));
    if !jobs.checkpoints.is_empty() {
        println!();
        println!(
            "{:>4}  {:<8}  {:<6}  {:>10}  {:>10}  OUT",
            "ID", "STATUS", "STRAT", "PAUSE", "TOTAL"
        );
        for j in &jobs.checkpoints {
            let (pause, total) = j.metrics.as_ref().map_or(("-".into(), "-".into()), |m| {
                (super::output::ms(m.pause_us), super::output::ms(m.total_us))
            });
            println!(
                "{:>4}  {:<8}  {:<6}  {:>10}  {:>10}  {}",
                j.id,
                name(&j.status),
                name(&j.strategy),
                pause,
                total,
                j.out
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
