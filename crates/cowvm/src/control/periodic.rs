//! `cowvm run --checkpoint-every DURATION --checkpoint-dir DIR [--keep K] [--full-every N]`: a
//! checkpoint every DURATION into `DIR/ckpt-<unix ms>`, keeping the newest K complete ones;
//! with `--full-every N` every N-th is full and the others incremental, each naming the one
//! before (after a failure, or a refused parent, the next one is full).
//!
//! Safety of the pruning: only complete checkpoints are deleted, only after the checkpoint
//! just taken is complete, and only those older than the newest K that no kept checkpoint
//! needs as a parent (directly or down its chain). A checkpoint that fails is removed by the
//! trigger that started it (nobody else writes there); any other incomplete directory is left
//! alone, since it may be one another client is writing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ckpt_format::{CheckpointOptions, DirStore, Manifest, StoreAddress};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tracing::{debug, info, warn};

use super::{chain, CheckpointSpec, ControlError, Controller, Outcome};

/// Prefix of the checkpoint directories the trigger makes.
const PREFIX: &str = "ckpt-";

/// The periodic trigger's settings.
#[derive(Debug, Clone)]
pub struct Periodic {
    /// Time between the starts of two checkpoints.
    pub every: Duration,
    /// Where the checkpoints go.
    pub dir: PathBuf,
    /// How many complete checkpoints to keep (all if none).
    pub keep: Option<usize>,
    /// Every N-th checkpoint is full, the others incremental (1: all full).
    pub full_every: u32,
    /// Strategy and policies.
    pub options: CheckpointOptions,
}

/// Parses `500ms`, `10s`, `2m`, `1h 30m`: a positive duration.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
    if d.is_zero() {
        return Err("the interval must be longer than zero".into());
    }
    Ok(d)
}

/// The sequence number (creation time) of a checkpoint directory name the trigger made.
fn sequence(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The parent a checkpoint directory's manifest names, if it names one.
fn parent_of(ckpt: &Path) -> Option<PathBuf> {
    let bytes = std::fs::read(ckpt.join("manifest.json")).ok()?;
    let manifest = Manifest::from_json(&bytes).ok()?;
    Some(PathBuf::from(manifest.parent?.address))
}

/// Deletes, with `delete`, all but the newest `keep` complete checkpoints the trigger made in
/// `dir`, oldest first, except the parents the kept ones need down their chains. Returns the
/// directories deleted.
pub fn prune(
    dir: &Path,
    keep: usize,
    delete: &mut dyn FnMut(&Path) -> std::io::Result<()>,
) -> std::io::Result<Vec<PathBuf>> {
    let mut complete: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let seq = sequence(e.file_name().to_str()?)?;
            let path = e.path();
            DirStore::new(&path).is_complete().then_some((seq, path))
        })
        .collect();
    complete.sort();
    let excess = complete.len().saturating_sub(keep);
    let mut needed: Vec<PathBuf> = Vec::new();
    for (_, kept) in &complete[excess..] {
        let mut at = parent_of(kept);
        while let Some(parent) = at {
            if needed.contains(&parent) {
                break;
            }
            at = parent_of(&parent);
            needed.push(parent);
        }
    }
    let mut deleted = Vec::new();
    for (_, path) in complete.into_iter().take(excess) {
        if needed.contains(&path) {
            continue;
        }
        delete(&path)?;
        deleted.push(path);
    }
    Ok(deleted)
}

/// Deletes one old checkpoint of the trigger through the controller, which merges away the
/// disk layers it alone needed. A merge that fails leaves the chain as it was (logged); a
/// directory whose checkpoint cannot be read is removed all the same.
fn retire(controller: &Controller, dir: &Path) -> std::io::Result<()> {
    match controller.delete_checkpoint(&StoreAddress::Dir(dir.to_path_buf())) {
        Ok(merges) => {
            for m in merges {
                debug!(layer = %m.layer.display(), into = %m.into.display(), bytes = m.bytes, "disk layer merged");
            }
            remove_rest(dir)
        }
        Err(ControlError::Merge(e)) => {
            warn!(
                "{}: checkpoint deleted, but its disk layers stay: {}",
                dir.display(),
                chain(&e)
            );
            remove_rest(dir)
        }
        Err(ControlError::NotACheckpoint { .. }) => std::fs::remove_dir_all(dir),
        Err(e) => Err(std::io::Error::other(chain(&e))),
    }
}

/// What is left in a checkpoint directory the trigger made (a restore's COW files, say) goes
/// with it.
fn remove_rest(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn next_dir(dir: &Path) -> PathBuf {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    // Zero-padded so that names sort like numbers.
    dir.join(format!("{PREFIX}{ms:016}"))
}

/// Where the trigger is in its cycle of full and incremental checkpoints.
#[derive(Debug, Default)]
struct Cycle {
    /// The latest complete checkpoint, and how many incremental ones followed the last full.
    last: Option<(PathBuf, u32)>,
}

impl Cycle {
    /// The parent of the next checkpoint, if it is to be incremental.
    fn parent(&self, full_every: u32) -> Option<&PathBuf> {
        match &self.last {
            Some((path, since_full)) if since_full + 1 < full_every => Some(path),
            _ => None,
        }
    }
}

/// Takes one checkpoint and prunes. Errors are logged: the VM goes on, and so does the trigger.
async fn tick(controller: &Arc<Controller>, cfg: &Periodic, cycle: &mut Cycle) {
    let out = next_dir(&cfg.dir);
    let parent = cycle.parent(cfg.full_every).cloned();
    let spec = CheckpointSpec {
        store: StoreAddress::Dir(out.clone()),
        s3_endpoint: None,
        options: cfg.options,
        parent: parent.clone().map(StoreAddress::Dir),
    };
    let ctl = controller.clone();
    let started = tokio::task::spawn_blocking(move || ctl.start_checkpoint(spec)).await;
    let job = match started {
        Ok(Ok(job)) => job,
        // The VM is ending: the trigger is about to be stopped.
        Ok(Err(ControlError::Exited(_))) => return,
        Ok(Err(e)) => {
            warn!("periodic checkpoint skipped: {e}");
            cycle.last = None;
            return;
        }
        Err(e) => {
            debug!("periodic checkpoint not started: {e}");
            return;
        }
    };
    job.finished().await;
    match job.end() {
        Some((Outcome::Complete(m), _)) => {
            info!(out = %out.display(), pause_us = m.metrics.pause_us, incremental = parent.is_some(), "periodic checkpoint complete");
            let since_full = match (&cycle.last, &parent) {
                (Some((_, n)), Some(_)) => n + 1,
                _ => 0,
            };
            cycle.last = Some((out.clone(), since_full));
            if let Some(keep) = cfg.keep {
                let ctl = controller.clone();
                let dir = cfg.dir.clone();
                let pruned = tokio::task::spawn_blocking(move || {
                    prune(&dir, keep, &mut |d| retire(&ctl, d))
                })
                .await;
                match pruned {
                    Ok(Ok(deleted)) => {
                        for d in deleted {
                            info!(dir = %d.display(), "old checkpoint deleted");
                        }
                    }
                    Ok(Err(e)) => warn!("pruning {} failed: {e}", cfg.dir.display()),
                    Err(e) => warn!("pruning {} failed: {e}", cfg.dir.display()),
                }
            }
        }
        Some((Outcome::Failed(e), _)) => {
            warn!(out = %out.display(), "periodic checkpoint failed: {}", chain(&e));
            // The next one is full: a refused parent (after a rollback) is not asked again.
            cycle.last = None;
            // Ours, and no longer being written.
            if out.exists() {
                if let Err(e) = std::fs::remove_dir_all(&out) {
                    warn!("cannot remove {}: {e}", out.display());
                }
            }
        }
        None => warn!("periodic checkpoint ended without an outcome"),
    }
}

/// Runs the trigger until `stop` turns true (or its sender goes). A tick under way is finished
/// first: its checkpoint completes or fails (and then its directory is removed), and its
/// pruning runs to the end, so that the trigger never leaves an incomplete directory behind.
pub async fn run(controller: Arc<Controller>, cfg: Periodic, mut stop: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(cfg.every);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut cycle = Cycle::default();
    // The first tick is immediate: wait one period first.
    let mut first = true;
    loop {
        tokio::select! {
            biased;
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
                continue;
            }
            _ = interval.tick() => {}
        }
        if std::mem::take(&mut first) {
            continue;
        }
        tick(&controller, &cfg, &mut cycle).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn names() {
        assert_eq!(
            sequence("ckpt-0000001700000000123"),
            Some(1_700_000_000_123)
        );
        assert_eq!(sequence("ckpt-"), None);
        assert_eq!(sequence("ckpt-12a"), None);
        assert_eq!(sequence("other-12"), None);
    }

    fn fake(dir: &Path, seq: u64, complete: bool) -> PathBuf {
        let p = dir.join(format!("{PREFIX}{seq:016}"));
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("manifest.json"), b"{}").unwrap();
        if complete {
            std::fs::write(p.join("COMPLETE"), b"x").unwrap();
        }
        p
    }

    #[test]
    fn prune_keeps_newest_complete_and_every_incomplete() {
        let tmp = tempfile::tempdir().unwrap();
        let a = fake(tmp.path(), 1, true);
        let b = fake(tmp.path(), 2, false);
        let c = fake(tmp.path(), 3, true);
        let d = fake(tmp.path(), 4, true);
        let e = fake(tmp.path(), 5, false);
        let other = tmp.path().join("mine");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("COMPLETE"), b"x").unwrap();
        let deleted = prune(tmp.path(), 2, &mut |p| std::fs::remove_dir_all(p)).unwrap();
        assert_eq!(deleted, vec![a.clone()]);
        assert!(!a.exists());
        for kept in [&b, &c, &d, &e, &other] {
            assert!(kept.exists(), "{}", kept.display());
        }
        assert_eq!(
            prune(tmp.path(), 1, &mut |p| std::fs::remove_dir_all(p)).unwrap(),
            vec![c]
        );
        assert!(d.exists() && b.exists() && e.exists());
    }

    #[test]
    fn prune_keeps_the_parents_of_kept_checkpoints() {
        let tmp = tempfile::tempdir().unwrap();
        let with_parent = |seq: u64, parent: Option<&Path>| {
            let p = fake(tmp.path(), seq, true);
            let mut m: serde_json::Value = serde_json::json!({
                "format": ckpt_format::FORMAT_NAME,
                "format_version": ckpt_format::FORMAT_VERSION,
                "memory": {"page_size": 4096, "mem_size": 4096, "pages": 1},
                "sections": [],
            });
            if let Some(parent) = parent {
                m["parent"] = serde_json::json!({
                    "address": parent.display().to_string(),
                    "manifest_checksum": "xxh3:0000000000000001",
                });
            }
            std::fs::write(p.join("manifest.json"), m.to_string()).unwrap();
            p
        };
        let full1 = with_parent(1, None);
        let incr2 = with_parent(2, Some(&full1));
        let incr3 = with_parent(3, Some(&incr2));
        let full4 = with_parent(4, None);
        let incr5 = with_parent(5, Some(&full4));
        // Keeping 3 keeps 3, 4, 5 and the chain 3 needs: 2 and 1.
        assert!(prune(tmp.path(), 3, &mut |p| std::fs::remove_dir_all(p))
            .unwrap()
            .is_empty());
        // Keeping 2 keeps 4 and 5: the first chain goes.
        assert_eq!(
            prune(tmp.path(), 2, &mut |p| std::fs::remove_dir_all(p)).unwrap(),
            vec![full1, incr2, incr3]
        );
        assert!(full4.exists() && incr5.exists());
    }

    #[test]
    fn every_nth_is_full() {
        let mut cycle = Cycle::default();
        assert_eq!(cycle.parent(3), None);
        cycle.last = Some(("a".into(), 0));
        assert_eq!(cycle.parent(3), Some(&PathBuf::from("a")));
        assert_eq!(cycle.parent(1), None);
        cycle.last = Some(("b".into(), 1));
        assert_eq!(cycle.parent(3), Some(&PathBuf::from("b")));
        cycle.last = Some(("c".into(), 2));
        assert_eq!(cycle.parent(3), None);
    }
}
