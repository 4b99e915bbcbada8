//! The one error type of the checkpoint format and its stores.
//!
//! Messages are short, name the file or section concerned, and do not repeat their `#[source]`.

use std::io;
use std::path::{Path, PathBuf};

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong writing, opening or verifying a checkpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ---- refusing a checkpoint on open ----
    /// The completion marker is absent: the writing was interrupted or is still under way.
    #[error("checkpoint in {store} is incomplete: no completion marker")]
    Incomplete { store: String },
    /// The parent of an incremental checkpoint cannot be opened (missing, incomplete, corrupt).
    #[error("parent checkpoint {address}")]
    Parent {
        address: String,
        #[source]
        source: Box<Error>,
    },
    /// The parent's address holds a checkpoint other than the one recorded.
    #[error(
        "parent checkpoint {address} is not the one this checkpoint was taken against \
         (manifest checksum {found:#018x}, {expected:#018x} recorded)"
    )]
    ParentMismatch {
        address: String,
        expected: u64,
        found: u64,
    },
    /// A parent address that no reader outside the writing process can reach.
    #[error("parent checkpoint {address} cannot be opened here: {reason}")]
    ParentUnreachable { address: String, reason: String },
    /// More incremental checkpoints in a chain than a reader follows.
    #[error("a chain of more than {0} checkpoints (incremental ones and their full one)")]
    ChainTooLong(usize),
    /// A magic number or format name is not ours.
    #[error("bad magic in {what}: found {found:?}")]
    BadMagic { what: &'static str, found: String },
    /// Written by a newer, incompatible version of the format.
    #[error("{what} version {found} is newer than supported version {supported}")]
    UnsupportedVersion {
        what: &'static str,
        found: u32,
        supported: u32,
    },
    /// Written by an older version of the format that this version no longer reads.
    #[error("{what} version {found} is older than supported version {supported}")]
    OutdatedVersion {
        what: &'static str,
        found: u32,
        supported: u32,
    },
    /// A section is shorter than the manifest says.
    #[error("section {section} is truncated: {expected} bytes expected, {found} found")]
    Truncated {
        section: String,
        expected: u64,
        found: u64,
    },
    /// A section's bytes do not hash to the recorded checksum.
    #[error(
        "checksum mismatch in section {section}: recorded {expected:016x}, computed {actual:016x}"
    )]
    ChecksumMismatch {
        section: String,
        expected: u64,
        actual: u64,
    },
    /// A memory page does not hash to its entry in the page index.
    #[error("memory page {page} does not match the page index: recorded {expected:016x}, computed {actual:016x}")]
    PageMismatch {
        page: u64,
        expected: u64,
        actual: u64,
    },
    /// A page recorded as zero was given with non-zero bytes.
    #[error("memory page {page} is zero in the page index but the bytes given are not")]
    ZeroPageMismatch { page: u64 },
    /// A structure is internally inconsistent (bad lengths, bad offsets, bad entries).
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: String, detail: String },
    /// The manifest is not valid JSON for this format.
    #[error("invalid manifest")]
    ManifestJson(#[source] serde_json::Error),

    // ---- misuse of the writer (bugs of the checkpoint engine) ----
    /// The checkpoint engine promises each page is saved exactly once.
    #[error("memory page {page} written twice")]
    PageWrittenTwice { page: u64 },
    /// `finish` found pages that were never saved.
    #[error("memory page {page} never written ({missing} of {pages} pages missing)")]
    PageMissing { page: u64, missing: u64, pages: u64 },
    /// A page number beyond the memory size.
    #[error("memory page {page} out of range: memory has {pages} pages")]
    PageOutOfRange { page: u64, pages: u64 },
    /// A buffer or size that is not a whole number of pages.
    #[error("{what} of {len} bytes is not a whole number of 4096-byte pages")]
    NotPageMultiple { what: &'static str, len: u64 },
    /// A section given twice (state, page index).
    #[error("section {section} written twice")]
    SectionWrittenTwice { section: &'static str },
    /// `finish` without `write_state`.
    #[error("section state was never written")]
    MissingState,
    /// `finish` while clones of the memory writer are still alive (threads may still write).
    #[error("memory writer still shared by {holders} other handles")]
    MemoryWriterInUse { holders: usize },
    /// A memory report (from a forked child) that does not fit this checkpoint.
    #[error("memory report does not match this checkpoint: {detail}")]
    BadMemoryReport { detail: String },
    /// The VM configuration contradicts the layout.
    #[error("VM config says {config} bytes of memory, layout says {layout}")]
    MemorySizeMismatch { config: u64, layout: u64 },

    // ---- stores ----
    /// ENOSPC / EDQUOT while writing.
    #[error("store full: writing {what} to {}", path.display())]
    StoreFull {
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A raw store (file or device) smaller than the checkpoint.
    #[error("store too small: {} needs {needed} bytes, {available} available", path.display())]
    StoreTooSmall {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    /// A store path that does not exist (or disappeared).
    #[error("not found: {}", path.display())]
    NotFound {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Permission denied on a store path.
    #[error("permission denied: {op} {}", path.display())]
    PermissionDenied {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Any other I/O error.
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Refusing to write over an existing checkpoint.
    #[error("{} already holds {} checkpoint", path.display(), if *complete { "a complete" } else { "an incomplete" })]
    CheckpointExists { path: PathBuf, complete: bool },
    /// A store file that is a symbolic link or not a regular file: never followed, never used.
    #[error("refusing {}: {what}", path.display())]
    UnsafeStoreFile { path: PathBuf, what: &'static str },
    /// A store path that resolves into /proc, /sys or /dev, or cannot be resolved safely.
    #[error("refusing store {}: {reason}", path.display())]
    StorePathRefused { path: PathBuf, reason: String },
    /// A file or device without a raw-store header: never written as a raw store.
    #[error("{} is not an initialised raw store", path.display())]
    NotRawStore {
        path: PathBuf,
        #[source]
        header: Box<Error>,
    },
    /// Initialising a raw store would destroy existing content, or cannot be done.
    #[error("refusing to initialise raw store {}: {reason}", path.display())]
    RawInitRefused { path: PathBuf, reason: String },
    /// An error of the S3 store.
    #[error(transparent)]
    S3(Box<crate::store::s3::error::S3Error>),

    // ---- state encoding helpers ----
    /// Encoding the device state to CBOR failed.
    #[error("encoding device state")]
    StateEncode(#[source] ciborium::ser::Error<io::Error>),
    /// Decoding the device state from CBOR failed.
    #[error("decoding device state")]
    StateDecode(#[source] ciborium::de::Error<io::Error>),
}

const ENOSPC: i32 = 28;
const EDQUOT: i32 = 122;

impl Error {
    /// Classifies an I/O error on `path` while doing `op` (writing `what`).
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Error {
        let path = path.to_path_buf();
        match source.kind() {
            io::ErrorKind::NotFound => Error::NotFound { path, source },
            io::ErrorKind::PermissionDenied => Error::PermissionDenied { op, path, source },
            _ if is_no_space(&source) => Error::StoreFull {
                what: op.to_string(),
                path,
                source,
            },
            _ => Error::Io { op, path, source },
        }
    }

    /// Same as [`Error::io`] but names the section being written when the store is full.
    pub(crate) fn io_section(
        op: &'static str,
        section: &str,
        path: &Path,
        source: io::Error,
    ) -> Error {
        if is_no_space(&source) {
            Error::StoreFull {
                what: format!("section {section}"),
                path: path.to_path_buf(),
                source,
            }
        } else {
            Error::io(op, path, source)
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> Error {
        Error::Corrupt {
            what: what.into(),
            detail: detail.into(),
        }
    }
}

fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(ENOSPC) | Some(EDQUOT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_classified() {
        let p = Path::new("/x/memory.img");
        let e = Error::io_section("write", "memory", p, io::Error::from_raw_os_error(ENOSPC));
        assert!(matches!(e, Error::StoreFull { .. }));
        assert_eq!(
            e.to_string(),
            "store full: writing section memory to /x/memory.img"
        );
        let e = Error::io("open", p, io::Error::from_raw_os_error(13));
        assert_eq!(e.to_string(), "permission denied: open /x/memory.img");
        let e = Error::io("open", p, io::Error::from_raw_os_error(2));
        assert!(matches!(e, Error::NotFound { .. }));
        let e = Error::io("read", p, io::Error::from_raw_os_error(5));
        assert_eq!(e.to_string(), "read /x/memory.img");
    }
}
