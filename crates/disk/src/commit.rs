//! Committing an overlay into its backing file (design.md §2.8, M5).
//!
//! Every cluster allocated in the top image (data, or explicit zeros) is written into the
//! backing file, which is opened read-write for the duration, then the backing file is
//! flushed. The top image is left unchanged: it keeps its content. That is what makes a commit
//! safe while the top image is still part of a running VM's chain (as the middle image below a
//! new COW file, M6): the chain reads the same bytes before, during and after the commit, and
//! the running overlay can then be rebased onto the parent with [`crate::Image::set_backing`].
//! (QEMU's `qemu-img commit` empties the top by default; with `-d` it keeps it, as we do.)

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::image::{Image, OpenOptions};
use crate::policy::PathPolicy;
use crate::table::L2Entry;

/// What a commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitStats {
    /// The backing file written into.
    pub base: PathBuf,
    /// Clusters of the top image written into the base.
    pub clusters: u64,
    /// Guest bytes written into the base.
    pub bytes: u64,
}

/// Writes the clusters allocated in `top_path` into its backing file and flushes it.
/// `progress(done, total)` is called with guest bytes after each cluster. The chain must lie
/// in the directories of its images ([`PathPolicy::same_dir`]); see [`commit_with`].
pub fn commit(top_path: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<CommitStats> {
    commit_with(top_path, &PathPolicy::same_dir(), progress)
}

/// [`commit`] of a chain whose backing files may also lie where `policy` allows.
pub fn commit_with(
    top_path: &Path,
    policy: &PathPolicy,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CommitStats> {
    let mut top = Image::open_with(
        top_path,
        &OpenOptions {
            read_only: true,
            backing_policy: policy.clone(),
            ..OpenOptions::default()
        },
    )?;
    let Some((base_path, base_format)) = top.layer_path(1).map(|(p, f)| (p.to_owned(), f)) else {
        return Err(Error::InvalidArgument {
            path: top_path.to_owned(),
            reason: "image has no backing file to commit into".into(),
        });
    };
    let Some(clusters) = top.top_allocated()? else {
        return Err(Error::InvalidArgument {
            path: top_path.to_owned(),
            reason: "only a qcow2 image can be committed".into(),
        });
    };
    let mut base = Image::open_with(
        &base_path,
        &OpenOptions {
            read_only: false,
            format: Some(base_format),
            backing_policy: policy.clone(),
            ..OpenOptions::default()
        },
    )
    .map_err(|e| Error::OpenBacking {
        image: top_path.to_owned(),
        backing: base_path.clone(),
        source: Box::new(e),
    })?;
    let size = top.size();
    if base.size() < size && !base.grow_raw(size)? {
        return Err(Error::unsupported(
            &base_path,
            format!("growing a qcow2 base from {} to {size} bytes", base.size()),
        ));
    }
    let cs = top.cluster_size();
    let len_of = |guest: u64| cs.min(size - guest);
    let total: u64 = clusters.iter().map(|&(g, _)| len_of(g)).sum();
    let span =
        tracing::info_span!("commit", top = %top_path.display(), base = %base_path.display());
    let _enter = span.enter();
    tracing::info!(clusters = clusters.len(), bytes = total, "committing");
    progress(0, total);
    let mut done = 0;
    let mut buf = vec![0u8; cs as usize];
    for &(guest, entry) in &clusters {
        let n = len_of(guest) as usize;
        match entry {
            L2Entry::Data { host, .. } => top.read_top_host(host, &mut buf[..n])?,
            _ => buf[..n].fill(0),
        }
        base.write_at(guest, &buf[..n])?;
        done += n as u64;
        progress(done, total);
    }
    base.flush()?;
    tracing::info!(bytes = done, "commit done");
    Ok(CommitStats {
        base: base_path,
        clusters: clusters.len() as u64,
        bytes: done,
    })
}
