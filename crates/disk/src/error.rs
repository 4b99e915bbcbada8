//! The error type of the disk image layer.
//!
//! Messages are short, name the file and the problem, and never repeat their `#[source]`.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::header::HeaderError;

/// Every way an image operation can fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image file itself cannot be opened (missing, permissions, ...).
    #[error("cannot open image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A backing file named by `image` cannot be opened or is itself invalid.
    #[error("cannot open backing file {backing} of {image}")]
    OpenBacking {
        image: PathBuf,
        backing: PathBuf,
        #[source]
        source: Box<Error>,
    },
    /// A read, write, sync or resize of the file failed.
    #[error("{path}: I/O error while {action}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    /// The qcow2 header is invalid or asks for something we do not implement.
    #[error("{path}: refused header")]
    Header {
        path: PathBuf,
        #[source]
        problem: HeaderError,
    },
    /// Metadata found after the header (L1/L2/refcount tables) is inconsistent.
    #[error("{path}: corrupt image: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// A valid image uses a feature this implementation refuses to guess at.
    #[error("{path}: unsupported: {what}")]
    Unsupported { path: PathBuf, what: String },
    /// A write or metadata change was attempted on an image opened read-only.
    #[error("{path}: image is read-only")]
    ReadOnly { path: PathBuf },
    /// A guest access lies outside the virtual disk.
    #[error("{path}: access at {offset}+{len} is beyond the disk size {size}")]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// `create_*` would overwrite an existing file and was not asked to.
    #[error("{path} already exists")]
    Exists { path: PathBuf },
    /// A caller-supplied argument cannot be honoured.
    #[error("{path}: invalid argument: {reason}")]
    InvalidArgument { path: PathBuf, reason: String },
    /// A backing file named by `image` resolves (symlinks followed) outside the directories
    /// its [`crate::PathPolicy`] allows.
    #[error("{image}: backing file {backing} {outside}: {rule}", rule = crate::BACKING_RULE)]
    BackingRefused {
        image: PathBuf,
        backing: PathBuf,
        /// Where it resolves and the directories allowed (boxed: keeps `Error` small).
        outside: Box<Outside>,
    },
    /// The backing chain loops or is deeper than [`crate::MAX_CHAIN_DEPTH`].
    #[error("{path}: backing chain is too deep or loops")]
    ChainTooDeep { path: PathBuf },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, action: &'static str, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            action,
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.into(),
            what: what.into(),
        }
    }
}

/// Where a refused backing file resolves, and the directories it could have been in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outside {
    pub resolved: PathBuf,
    pub allowed: Vec<PathBuf>,
}

impl fmt::Display for Outside {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "resolves to {}, outside ", self.resolved.display())?;
        for (i, d) in self.allowed.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}", d.display())?;
        }
        Ok(())
    }
}
