//! What a [`super::BlockHandle`] asks the device thread to do, and what it learns back.

use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use disk::{ChainEntry, Format, Image, PathPolicy, Stats};

use super::{BlockError, BlockState, InflightRequest};
use crate::devices::virtio::DmaObserver;

/// The image a disk is using now.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// The top image (the one the guest writes).
    pub path: PathBuf,
    /// Bumped by every [`super::BlockHandle::switch_image`].
    pub generation: u64,
    /// Top first.
    pub chain: Vec<ChainEntry>,
    /// Counters of the top image.
    pub stats: Stats,
    /// Where backing files of this disk's images may live; images made for the disk
    /// (checkpoint COW files, copies, commits) are opened under the same policy.
    pub backing_policy: PathPolicy,
}

/// One command to the device thread; each carries its reply channel.
pub(crate) enum Command {
    Inflight(Sender<Vec<InflightRequest>>),
    Save(Sender<BlockState>),
    Switch(Box<Image>, Sender<Result<u64, BlockError>>),
    Drain(Sender<()>),
    WaitOlder(Sender<()>),
    Rebase(PathBuf, Option<Format>, Sender<Result<(), BlockError>>),
    Freeze(bool, Sender<()>),
    Observer(Option<Arc<dyn DmaObserver>>, Sender<()>),
    Info(Sender<ImageInfo>),
}
