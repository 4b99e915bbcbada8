//! Streaming a backing file into its child: the child takes over every cluster of its backing
//! file that it does not hold itself, then names its backing file's own backing file, and the
//! backing file drops out of the chain (one layer of QEMU's `block-stream`).
//!
//! The order keeps the chain readable with the same content after a crash at any instant:
//!
//! 1. each cluster the child takes over is written with the content the child already shows
//!    there (read through the chain below it), data before the L2 entry that makes it visible,
//!    so every intermediate state reads the same bytes;
//! 2. the child is synced;
//! 3. the child's header is rewritten in one write naming the new backing file, and synced.
//!
//! The backing file that dropped out is left for the caller to delete: before step 3 the
//! chain still needs it, after it nothing does. Readers that already have the chain open
//! (another process, a VM's device) keep reading correct data: their view of the child either
//! lacks a cluster taken over (and reads it from the old backing file, still open) or has it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::image::{Image, OpenOptions};
use crate::policy::PathPolicy;

/// What [`stream`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStats {
    /// The backing file that dropped out of the chain (no longer needed by the child).
    pub removed: PathBuf,
    /// Its own backing file, now the child's.
    pub backing: PathBuf,
    /// Clusters of the child written.
    pub clusters: u64,
    /// Guest bytes written into the child.
    pub bytes: u64,
}

fn invalid(path: &Path, reason: &str) -> Error {
    Error::InvalidArgument {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Merges the backing file B of the qcow2 image `child` into `child` (see the module
/// documentation): afterwards `child` shows the same content with B's backing file as its own.
/// B must be a qcow2 image with a backing file; the chain must satisfy `policy`.
pub fn stream(child: &Path, policy: &PathPolicy) -> Result<StreamStats> {
    stream_with(
        child,
        &OpenOptions {
            backing_policy: policy.clone(),
            ..OpenOptions::default()
        },
    )
}

/// [`stream`], with `child` opened as `opts` say (for instance with `ordered_sync`, or a test's
/// crash point). `opts.read_only` is refused.
pub fn stream_with(child: &Path, opts: &OpenOptions) -> Result<StreamStats> {
    if opts.read_only {
        return Err(invalid(
            child,
            "streaming writes the image: it cannot be read-only",
        ));
    }
    let mut image = Image::open_with(child, opts)?;
    let Some((removed, _)) = image.layer_path(1).map(|(p, f)| (p.to_owned(), f)) else {
        return Err(invalid(child, "image has no backing file to stream"));
    };
    let Some((below, below_format)) = image.layer_path(2).map(|(p, f)| (p.to_owned(), f)) else {
        return Err(invalid(
            &removed,
            "a backing file without a backing file of its own is not streamed",
        ));
    };
    let Some(own) = image.top_allocated()? else {
        return Err(invalid(child, "only a qcow2 image takes over clusters"));
    };
    let Some((their_cs, theirs)) = image.layer_allocated(1)? else {
        return Err(invalid(&removed, "only a qcow2 backing file is streamed"));
    };
    let cs = image.cluster_size();
    let size = image.size();
    let own: BTreeSet<u64> = own.into_iter().map(|(guest, _)| guest).collect();
    // The child's clusters that overlap a cluster of the backing file and that the child does
    // not hold: those would read differently once the backing file is gone.
    let mut take: BTreeSet<u64> = BTreeSet::new();
    for (guest, _) in theirs {
        let end = (guest + their_cs).min(size);
        let mut c = guest - guest % cs;
        while c < end {
            if !own.contains(&c) {
                take.insert(c);
            }
            c += cs;
        }
    }
    let span =
        tracing::info_span!("stream", child = %child.display(), removed = %removed.display());
    let _enter = span.enter();
    let mut bytes = 0;
    for &guest in &take {
        let n = cs.min(size - guest) as usize;
        let data = image
            .backing_cluster(guest, cs)?
            .unwrap_or_else(|| vec![0u8; cs as usize]);
        // A write of a whole unallocated cluster installs it without a copy-up.
        image.write_at(guest, &data[..n])?;
        bytes += n as u64;
    }
    image.flush()?;
    let backing = std::fs::canonicalize(&below).map_err(|source| Error::Open {
        path: below.clone(),
        source,
    })?;
    image.set_backing(&backing, Some(below_format))?;
    tracing::info!(clusters = take.len(), bytes, backing = %backing.display(), "streamed");
    Ok(StreamStats {
        removed,
        backing,
        clusters: take.len() as u64,
        bytes,
    })
}
