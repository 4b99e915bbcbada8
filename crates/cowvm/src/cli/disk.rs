//! `cowvm disk create | commit` and the `--disk` option of `cowvm run`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use vmm::DiskConfig;
use vmm::MemSize;

#[derive(Subcommand, Debug)]
pub enum DiskCommand {
    /// Create a qcow2 image, optionally as a copy-on-write overlay over a backing file.
    Create {
        /// Virtual size such as 1G (default with --backing: the backing file's size).
        #[arg(long)]
        size: Option<String>,
        /// Backing file (raw or qcow2, probed), stored as given. It must resolve inside the
        /// new image's directory or an --allow-dir directory, as `cowvm run` requires.
        #[arg(long)]
        backing: Option<PathBuf>,
        /// Also allow backing files below DIR (repeatable).
        #[arg(long = "allow-dir", value_name = "DIR")]
        allow_dirs: Vec<PathBuf>,
        /// The new image.
        out: PathBuf,
    },
    /// Write an overlay's clusters into its backing file (the overlay is kept).
    Commit {
        /// The overlay to commit.
        top: PathBuf,
        /// Also allow backing files below DIR (repeatable).
        #[arg(long = "allow-dir", value_name = "DIR")]
        allow_dirs: Vec<PathBuf>,
    },
}

/// The backing-file policy allowing `dirs` besides each image's own directory.
fn policy(dirs: &[PathBuf]) -> disk::PathPolicy {
    dirs.iter()
        .fold(disk::PathPolicy::same_dir(), |p, d| p.allow_dir(d))
}

/// Parses `PATH[,readonly][,delay_ms=N][,allow=DIR]...`.
pub fn parse_disk(arg: &str) -> anyhow::Result<DiskConfig> {
    let mut parts = arg.split(',');
    let path = parts.next().filter(|p| !p.is_empty());
    let Some(path) = path else {
        bail!("--disk {arg:?}: expected PATH[,readonly][,delay_ms=N][,allow=DIR]");
    };
    let mut config = DiskConfig {
        path: PathBuf::from(path),
        ..DiskConfig::default()
    };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "readonly" => config.readonly = true,
            Some(("delay_ms", n)) => {
                config.delay_ms = n
                    .parse()
                    .with_context(|| format!("--disk {arg:?}: bad delay_ms {n:?}"))?
            }
            Some(("allow", dir)) if !dir.is_empty() => config.allow_dirs.push(PathBuf::from(dir)),
            _ => bail!("--disk {arg:?}: unknown option {opt:?} (readonly, delay_ms=N, allow=DIR)"),
        }
    }
    Ok(config)
}

pub fn run(cmd: DiskCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DiskCommand::Create {
            size,
            backing,
            allow_dirs,
            out,
        } => create(size.as_deref(), backing, &policy(&allow_dirs), &out),
        DiskCommand::Commit { top, allow_dirs } => commit(&top, &policy(&allow_dirs)),
    }
}

fn create(
    size: Option<&str>,
    backing: Option<PathBuf>,
    policy: &disk::PathPolicy,
    out: &Path,
) -> anyhow::Result<ExitCode> {
    let size = size
        .map(|s| s.parse::<MemSize>().with_context(|| format!("--size {s}")))
        .transpose()?
        .map(|m| m.0);
    if size.is_none() && backing.is_none() {
        bail!("--size is required without --backing");
    }
    let backing = match &backing {
        Some(b) => {
            // Relative names are relative to the new image's directory, as in QEMU.
            let resolved = match out.parent() {
                Some(dir) if b.is_relative() => dir.join(b),
                _ => b.clone(),
            };
            let format = disk::probe_format(&resolved)
                .with_context(|| format!("backing file {}", resolved.display()))?;
            Some((b.as_path(), format))
        }
        None => None,
    };
    disk::create_qcow2(
        out,
        &disk::CreateOptions {
            size,
            backing,
            backing_policy: policy.clone(),
            ..disk::CreateOptions::default()
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

fn commit(top: &Path, policy: &disk::PathPolicy) -> anyhow::Result<ExitCode> {
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .context("progress bar template")?
            .progress_chars("=> "),
        );
        bar.set_message(format!("commit {}", top.display()));
        Some(bar)
    } else {
        None
    };
    let stats = disk::commit_with(top, policy, &mut |done, total| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    eprintln!(
        "committed {} clusters ({} bytes) of {} into {}",
        stats.clusters,
        stats.bytes,
        top.display(),
        stats.base.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options() {
        let d = parse_disk("vm/top.qcow2,readonly,allow=/images,allow=/base,delay_ms=3").unwrap();
        assert_eq!(d.path, PathBuf::from("vm/top.qcow2"));
        assert!(d.readonly);
        assert_eq!(d.delay_ms, 3);
        assert_eq!(
            d.allow_dirs,
            vec![PathBuf::from("/images"), PathBuf::from("/base")]
        );
        assert_eq!(
            d.backing_policy(),
            disk::PathPolicy::same_dir()
                .allow_dir("/images")
                .allow_dir("/base")
        );
        assert!(parse_disk("x.raw,allow=").is_err());
        assert!(parse_disk("x.raw,colour=red").is_err());
    }
}
