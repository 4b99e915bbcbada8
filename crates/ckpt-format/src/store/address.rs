//! Store addresses: the one text form by which the command line and the API name a store.
//!
//! * `raw:PATH` — one raw file or block device;
//! * `mem:NAME` — RAM inside the process that took the checkpoint, NAME of 1 to 64 ASCII
//!   letters, digits, `-`, `_` or `.`;
//! * `s3://BUCKET/PREFIX` — objects under PREFIX in an S3-protocol bucket;
//! * anything else — a directory.
//!
//! Any other `SCHEME://` form is refused with the scheme named, so that a store address of a
//! store this build does not know (a network peer) is never taken for a directory.

use std::fmt;
use std::path::{Component, PathBuf};
use std::str::FromStr;

use thiserror::Error;

use super::{S3Error, S3Location};

/// Longest name of a RAM store.
const MAX_MEM_NAME: usize = 64;

/// Where a checkpoint is, as a user names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StoreAddress {
    /// A directory of files.
    Dir(PathBuf),
    /// One raw file or block device (`raw:PATH`).
    Raw(PathBuf),
    /// RAM inside the process that took the checkpoint (`mem:NAME`).
    Mem(String),
    /// Objects under `prefix` (no leading or trailing `/`, possibly empty) in an S3-protocol
    /// bucket (`s3://BUCKET/PREFIX`).
    S3 {
        /// The bucket.
        bucket: String,
        /// The prefix inside the bucket.
        prefix: String,
    },
}

/// Why a text is not a usable store address. The messages read after the name of the field or
/// argument that holds the address.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddressError {
    /// The text contains a NUL byte.
    #[error("contains a NUL byte")]
    Nul,
    /// `mem:` with a name outside the rules.
    #[error("a RAM store is mem:NAME, NAME of 1 to 64 letters, digits, '-', '_' or '.'")]
    MemName,
    /// An `s3://` URL that is not `s3://BUCKET/PREFIX` with a valid bucket and prefix.
    #[error("is not a valid s3://BUCKET/PREFIX: {0}")]
    S3Url(&'static str),
    /// A `SCHEME://` this build has no store for.
    #[error("names a store of unknown kind {0}://")]
    UnknownScheme(String),
    /// A relative path where an absolute one is required.
    #[error("must be an absolute directory path or raw:/absolute/path of a file or device")]
    NotAbsolute,
    /// A `..` component where a normal path is required.
    #[error("must not contain '..' components")]
    ParentDir,
    /// The root directory.
    #[error("must not be the root directory")]
    Root,
}

impl AddressError {
    /// The message about an address held by `subject` (a request field, a command-line
    /// argument).
    pub fn about(&self, subject: &str) -> String {
        match self {
            AddressError::MemName => format!("{subject}: {self}"),
            _ => format!("{subject} {self}"),
        }
    }
}

impl StoreAddress {
    /// Refuses a path a server must not be asked to touch: anything but an absolute, normal
    /// path (no relative path, whose meaning would be the server's working directory; no `..`;
    /// not the root). A RAM store names no path and passes.
    pub fn require_absolute(&self) -> Result<(), AddressError> {
        let path = match self {
            StoreAddress::Dir(p) | StoreAddress::Raw(p) => p,
            StoreAddress::Mem(_) | StoreAddress::S3 { .. } => return Ok(()),
        };
        if !path.starts_with("/") {
            return Err(AddressError::NotAbsolute);
        }
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(AddressError::ParentDir);
        }
        if path.parent().is_none() {
            return Err(AddressError::Root);
        }
        Ok(())
    }
}

/// The scheme of a `SCHEME://` text: a letter, then letters, digits, `+`, `-` or `.`.
fn scheme(text: &str) -> Option<&str> {
    let (scheme, _) = text.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

fn valid_mem_name(name: &str) -> bool {
    (1..=MAX_MEM_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl FromStr for StoreAddress {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<StoreAddress, AddressError> {
        if let Some(name) = text.strip_prefix("mem:") {
            return if valid_mem_name(name) {
                Ok(StoreAddress::Mem(name.to_string()))
            } else {
                Err(AddressError::MemName)
            };
        }
        if text.contains('\0') {
            return Err(AddressError::Nul);
        }
        if text.starts_with("s3://") {
            return match S3Location::parse(text) {
                Ok(l) => Ok(StoreAddress::S3 {
                    bucket: l.bucket().to_string(),
                    prefix: l.prefix().to_string(),
                }),
                Err(S3Error::InvalidUrl { reason, .. }) => Err(AddressError::S3Url(reason)),
                Err(_) => Err(AddressError::S3Url("not an S3 URL")),
            };
        }
        if let Some(scheme) = scheme(text) {
            return Err(AddressError::UnknownScheme(scheme.to_string()));
        }
        Ok(match text.strip_prefix("raw:") {
            Some(path) => StoreAddress::Raw(PathBuf::from(path)),
            None => StoreAddress::Dir(PathBuf::from(text)),
        })
    }
}

impl fmt::Display for StoreAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreAddress::Dir(p) => write!(f, "{}", p.display()),
            StoreAddress::Raw(p) => write!(f, "raw:{}", p.display()),
            StoreAddress::Mem(name) => write!(f, "mem:{name}"),
            StoreAddress::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreAddress::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<StoreAddress, AddressError> {
        text.parse()
    }

    #[test]
    fn forms() {
        assert_eq!(parse("/a/b"), Ok(StoreAddress::Dir("/a/b".into())));
        assert_eq!(parse("ckpt"), Ok(StoreAddress::Dir("ckpt".into())));
        assert_eq!(
            parse("s3://bucket/vm/1/"),
            Ok(StoreAddress::S3 {
                bucket: "bucket".into(),
                prefix: "vm/1".into()
            })
        );
        assert_eq!(
            parse("raw:/dev/sdb"),
            Ok(StoreAddress::Raw("/dev/sdb".into()))
        );
        assert_eq!(parse("raw:img"), Ok(StoreAddress::Raw("img".into())));
        assert_eq!(
            parse("mem:a-b_c.9"),
            Ok(StoreAddress::Mem("a-b_c.9".into()))
        );
        assert_eq!(
            parse(&format!("mem:{}", "x".repeat(64))),
            Ok(StoreAddress::Mem("x".repeat(64)))
        );
    }

    #[test]
    fn refusals() {
        for bad in ["mem:", "mem:a/b", "mem:a b", "mem:\0"] {
            assert_eq!(parse(bad), Err(AddressError::MemName), "{bad}");
        }
        assert_eq!(
            parse(&format!("mem:{}", "x".repeat(65))),
            Err(AddressError::MemName)
        );
        assert_eq!(parse("/a\0b"), Err(AddressError::Nul));
        assert_eq!(
            parse("gs://bucket/key"),
            Err(AddressError::UnknownScheme("gs".into()))
        );
        assert_eq!(
            parse("tcp://host:1234"),
            Err(AddressError::UnknownScheme("tcp".into()))
        );
        let e = parse("gs://bucket/key").unwrap_err().to_string();
        assert!(e.contains("gs://"), "{e}");
        for bad in [
            "s3://ab/x",
            "s3://Bucket/x",
            "s3://bucket/a/../b",
            "s3://bucket/a//b",
        ] {
            assert!(matches!(parse(bad), Err(AddressError::S3Url(_))), "{bad}");
        }
        // Not a scheme: a directory whose name has "://" after a slash.
        assert_eq!(parse("a/b://c"), Ok(StoreAddress::Dir("a/b://c".into())));
    }

    #[test]
    fn round_trip() {
        for text in [
            "/a/b",
            "rel/dir",
            "raw:/dev/sdb",
            "raw:img",
            "mem:first",
            "s3://bucket",
            "s3://bucket/vm/1",
        ] {
            let address = parse(text).expect(text);
            assert_eq!(address.to_string(), text);
            assert_eq!(parse(&address.to_string()), Ok(address));
        }
    }

    #[test]
    fn absolute_paths() {
        for good in ["/a/b", "raw:/dev/sdb", "mem:x", "/a/./b", "s3://bucket/x"] {
            assert_eq!(
                parse(good).expect(good).require_absolute(),
                Ok(()),
                "{good}"
            );
        }
        for (bad, why) in [
            ("", AddressError::NotAbsolute),
            ("rel/dir", AddressError::NotAbsolute),
            ("./x", AddressError::NotAbsolute),
            ("raw:rel", AddressError::NotAbsolute),
            ("/a/../b", AddressError::ParentDir),
            ("/a/..", AddressError::ParentDir),
            ("raw:/a/../b", AddressError::ParentDir),
            ("/", AddressError::Root),
        ] {
            assert_eq!(parse(bad).expect(bad).require_absolute(), Err(why), "{bad}");
        }
    }
}
