//! The cowvm checkpoint format and its stores.
//!
//! A checkpoint (design.md §1) is a set of sections — `state` (opaque device state from the VMM),
//! `memory` (the page image, page i at byte i*4096, starting 2 MiB aligned so a restore can
//! `mmap(MAP_PRIVATE)` it), `page-index` (per page: zero or present, and its xxh3-64 hash) — a
//! JSON [`Manifest`] describing them with their checksums, and a completion marker written last,
//! after everything else is durable. A checkpoint without the marker is incomplete and is never
//! opened.
//!
//! * Writing: [`CheckpointWriter`], whose [`MemoryWriter`] saves pages concurrently from many
//!   threads, out of order, each exactly once (see [`writer`] for the `fork` split).
//! * Reading: [`Checkpoint::open`] verifies before use; memory is verified per page or whole.
//!   An incremental checkpoint names its parent; it is opened with its chain and reads as the
//!   chain resolved. [`flatten`] writes one full checkpoint equal to a chain.
//! * Stores: [`DirStore`] (default), [`RawStore`] (file or block device), [`MemStore`] (memfd),
//!   [`S3Store`] (objects in an S3 bucket), behind the [`Store`] trait.
//!
//! Pure library: no KVM, no unsafe code.
#![forbid(unsafe_code)]

mod checksum;
mod error;
mod flatten;
mod index_segment;
mod manifest;
mod page_index;
mod reader;
pub mod store;
pub mod writer;

pub use checksum::{checksum, page_is_zero, zero_page_hash, Checksum};
pub use error::{Error, Result};
pub use flatten::flatten;
pub use index_segment::{IndexSegment, SEGMENT_PAGES};
pub use manifest::{
    decode_state, encode_state, CheckpointOptions, DeviceConfig, DiskConfig, DiskFormat,
    DiskPolicy, IoPolicy, Manifest, MemoryInfo, Metrics, ParentRef, Section, SectionEntry,
    Strategy, VmConfig,
};
pub use page_index::{PageEntry, PageIndex, PageState};
pub use reader::{Checkpoint, VerifyReport, MAX_CHAIN};
pub use store::{
    AddressError, DirStore, Layout, MemStore, MemorySource, Overwrite, RawStore, S3Error,
    S3Location, S3Store, Store, StoreAddress,
};
pub use writer::{CheckpointWriter, MemoryReport, MemoryWriter, Progress};

/// Guest page size.
pub const PAGE_SIZE: usize = 4096;
/// Alignment of the memory section in its file or device (a 2 MiB huge page).
pub const MEMORY_ALIGN: u64 = 2 << 20;
/// The format name, the manifest's magic.
pub const FORMAT_NAME: &str = "cowvm-checkpoint";
/// The format (major) version written, and the only one read. Version 2 records devices as
/// typed entries and options without fallback values; version 1 checkpoints are refused.
pub const FORMAT_VERSION: u32 = 2;
