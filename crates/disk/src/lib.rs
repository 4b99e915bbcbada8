//! The disk image layer of cowvm: raw and qcow2 (v2 read/write, v3 created) images with
//! backing-file chains, copy-up on first write, commit into the parent, and a mapping API for
//! asynchronous I/O done elsewhere.
//!
//! Files written here are valid for QEMU's tools (`qemu-img check` finds no errors, also after
//! a crash at any moment: at worst leaked clusters).
//!
//! * [`Image`] — an open image with its whole backing chain: guest reads and writes, flush,
//!   [`Image::map_read`]/[`Image::prepare_write`] for io_uring, [`Image::set_backing`].
//! * [`create_qcow2`], [`create_raw`] — new images, e.g. the COW file of a checkpoint (§2.1).
//! * [`set_backing_file`] — point a qcow2 image at another backing file without opening the
//!   one it names now (a copied layer made to name the local copy of its parent).
//! * [`commit()`] — write an overlay's clusters into its parent (§2.8).
//! * [`stream()`] — merge a backing file into its child, which then skips it in the chain.
//! * [`PathPolicy`] — where backing files named by an image may live: the image's own
//!   directory and directories the caller allows, symlinks followed.
//!
//! Design choices: refcounts are kept exact (the dirty bit is never set); allocation appends
//! to the file; a guest cluster is the copy-up unit (the "block group" of design.md §2.7).

#![forbid(unsafe_code)]

mod commit;
mod create;
mod error;
pub mod header;
mod image;
mod io;
mod policy;
mod qcow2;
mod raw;
mod refcount;
mod stream;
pub mod table;

use std::fmt;
use std::fs::File;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

pub use commit::{commit, commit_with, CommitStats};
pub use create::{
    create_qcow2, create_raw, image_size, probe_format, set_backing_file, CreateOptions,
};
pub use error::Outside;
pub use error::{Error, Result};
pub use header::HeaderError;
pub use image::{Image, OpenOptions};
pub use policy::{PathPolicy, BACKING_RULE};
pub use stream::{stream, stream_with, StreamStats};

/// Deepest backing chain accepted (also stops loops).
pub const MAX_CHAIN_DEPTH: usize = 32;

/// Default qcow2 cluster size: 64 KiB.
pub const DEFAULT_CLUSTER_BITS: u32 = 16;

/// On-disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    /// The name QEMU uses (and that goes into the backing-format header extension).
    pub fn as_str(&self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Format, String> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(format!("unknown image format {other:?}")),
        }
    }
}

/// Per-image counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Guest data clusters newly allocated in this image.
    pub clusters_allocated: u64,
    /// Clusters allocated for metadata (L2 tables, refcount blocks and tables).
    pub metadata_clusters_allocated: u64,
    /// Disk COW faults: clusters whose old content was copied up from the backing chain.
    pub copy_ups: u64,
    /// Guest bytes read from this file by [`Image::read_at`] (not by users of `map_read`).
    pub bytes_read: u64,
    /// Guest bytes written to this file by [`Image::write_at`] and copy-ups.
    pub bytes_written: u64,
}

/// A piece of a guest range, as host I/O to perform (see [`Image::map_read`]).
#[derive(Debug, Clone)]
pub enum Extent {
    /// `len` bytes at `file_offset` in `file` (this image or one further down the chain).
    Data {
        file: Arc<File>,
        file_offset: u64,
        len: u64,
    },
    /// `len` bytes that read as zeros.
    Zero { len: u64 },
}

impl Extent {
    pub fn len(&self) -> u64 {
        match self {
            Extent::Data { len, .. } | Extent::Zero { len } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// The VMM moves images between threads (e.g. a commit thread).
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Image>();
};

/// One image of a backing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainEntry {
    pub path: PathBuf,
    pub format: Format,
}
