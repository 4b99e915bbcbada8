//! `cowvm inspect DIR [--json] [--verify]`: a checkpoint's manifest and metrics, read from the
//! store directly (no VM needed). Opening verifies the completion marker, the manifest and the
//! checksums of the state and the page index; `--verify` also checks every memory page.

use std::process::ExitCode;

use anyhow::Context;
use ckpt_format::{Checkpoint, CheckpointOptions, DirStore, Manifest, Metrics, RawStore, Store};
use serde::Serialize;
use vmm::MachineState;
use vmm::StoreSpec;

use super::checkpoint::name;
use super::output::{byte_bar, bytes, metric_rows, table};

/// Arguments of `cowvm inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The checkpoint: a directory, raw:PATH, or s3://BUCKET/PREFIX.
    #[arg(value_name = "DIR")]
    dir: String,
    /// The endpoint URL of an s3:// checkpoint (default: AWS_ENDPOINT_URL, else AWS S3).
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also read and check every memory page against the page index.
    #[arg(long)]
    verify: bool,
}

/// The result of `--verify`.
#[derive(Debug, Serialize)]
struct Verified {
    pages_verified: u64,
    zero_pages: u64,
}

/// What `--json` prints: options and metrics at top level (as `cowvm checkpoint --json`), then
/// the whole manifest.
#[derive(Debug, Serialize)]
struct Report<'a> {
    out: &'a str,
    #[serde(flatten)]
    options: CheckpointOptions,
    #[serde(flatten)]
    metrics: &'a Metrics,
    manifest_checksum: String,
    /// Bytes the guest had written to its console at the checkpoint instant: a restored VM's
    /// console continues the original's after this many bytes.
    console_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    verified: Option<Verified>,
    manifest: &'a Manifest,
}

/// Runs `cowvm inspect`.
pub fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let store: Box<dyn Store> =
        match super::restore::store_spec(&args.dir, args.s3_endpoint.as_deref())?.1 {
            StoreSpec::Raw(path) => Box::new(RawStore::new(path)),
            StoreSpec::S3(s3) => Box::new(s3),
            _ => Box::new(DirStore::new(&args.dir)),
        };
    let ckpt = Checkpoint::open(store.as_ref()).with_context(|| args.dir.clone())?;
    let m = ckpt.manifest();
    let verified = if args.verify {
        let bar = byte_bar(m.memory.mem_size, "verifying");
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let page = ckpt_format::PAGE_SIZE as u64;
        let report = ckpt
            .verify_memory(threads, &|done| bar.set_position(done * page))
            .with_context(|| format!("{}: memory", args.dir))?;
        bar.finish_and_clear();
        Some(Verified {
            pages_verified: report.pages_verified,
            zero_pages: report.zero_pages,
        })
    } else {
        None
    };
    let checksum = format!("{:016x}", ckpt.manifest_checksum());
    let state: MachineState = ckpt
        .decode_state()
        .with_context(|| format!("{}: state section", args.dir))?;
    let console_bytes = state.devices.serial.bytes_emitted;
    if args.json {
        let report = Report {
            out: &args.dir,
            options: m.options,
            metrics: &m.metrics,
            manifest_checksum: checksum,
            console_bytes,
            verified,
            manifest: m,
        };
        println!("{}", serde_json::to_string(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![
        ("checkpoint", args.dir.clone()),
        (
            "format",
            format!("{} {}.{}", m.format, m.format_version, m.format_minor),
        ),
        ("created", m.created_utc.clone()),
        (
            "parent",
            match &m.parent {
                Some(p) => format!("{} ({} pages there)", p.address, m.metrics.pages_in_parent),
                None => "none (a full checkpoint)".into(),
            },
        ),
        ("manifest checksum", checksum),
        (
            "memory",
            format!(
                "{} ({} pages, {} zero)",
                bytes(m.memory.mem_size),
                m.memory.pages,
                m.memory.zero_pages
            ),
        ),
        ("vcpus", m.vm.vcpus.to_string()),
        (
            "kernel",
            m.vm.kernel
                .as_ref()
                .map(|k| k.display().to_string())
                .unwrap_or_default(),
        ),
        ("cmdline", m.vm.cmdline.clone().unwrap_or_default()),
        ("console bytes", console_bytes.to_string()),
        (
            "disks",
            if m.vm.disks.is_empty() {
                "none".into()
            } else {
                m.vm.disks
                    .iter()
                    .map(|d| format!("{} {}", d.id, d.path.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        (
            "options",
            format!(
                "strategy {}, io {}, disk {}",
                name(&m.options.strategy),
                name(&m.options.io),
                name(&m.options.disk)
            ),
        ),
    ];
    rows.extend(metric_rows(&m.metrics));
    if let Some(v) = &verified {
        rows.push((
            "verified",
            format!(
                "{} pages match the page index ({} zero)",
                v.pages_verified, v.zero_pages
            ),
        ));
    }
    table(&rows);
    Ok(ExitCode::SUCCESS)
}
