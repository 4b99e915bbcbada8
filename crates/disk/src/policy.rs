//! Where backing files may live.
//!
//! An image names its backing file, and whoever wrote the image chose that name: opening the
//! chain of an image made elsewhere must not let it read any host file (`-b /etc/shadow`). The
//! rule: a backing file named by an image must resolve, after following every symlink, inside
//! the directory of the image that names it, or inside a directory the caller allows
//! explicitly. The check is made on the file actually opened (its path as the kernel reports
//! it), so a symlink swapped in between the check and the open does not escape it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Outside, Result};

/// The rule, as error messages state it.
pub const BACKING_RULE: &str =
    "a backing file must resolve inside the directory of the image naming it or an allowed directory";

/// Which directories backing files may resolve into, besides the directory of the image that
/// names them. The default allows only that directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathPolicy {
    allowed_dirs: Vec<PathBuf>,
}

impl PathPolicy {
    /// Only the directory of the naming image (the default).
    pub fn same_dir() -> PathPolicy {
        PathPolicy::default()
    }

    /// Also allows backing files anywhere below `dir` (which need not exist yet; it is
    /// resolved when a backing file is checked).
    pub fn allow_dir(mut self, dir: impl Into<PathBuf>) -> PathPolicy {
        self.allowed_dirs.push(dir.into());
        self
    }

    /// The directories allowed explicitly.
    pub fn allowed_dirs(&self) -> &[PathBuf] {
        &self.allowed_dirs
    }

    /// Checks that `opened` (the file opened for `backing`, as named by `image`) lies inside
    /// the directory of `image` or an allowed directory.
    pub(crate) fn check_opened(&self, image: &Path, backing: &Path, opened: &File) -> Result<()> {
        let real = opened_path(opened).or_else(|_| canonical(backing));
        self.check_real(image, backing, real)
    }

    fn check_real(
        &self,
        image: &Path,
        backing: &Path,
        real: std::io::Result<PathBuf>,
    ) -> Result<()> {
        let refused = |resolved: PathBuf| Error::BackingRefused {
            image: image.to_owned(),
            backing: backing.to_owned(),
            outside: Box::new(Outside {
                resolved,
                allowed: self.dirs_for(image),
            }),
        };
        let real = real.map_err(|_| refused(backing.to_owned()))?;
        let inside = self
            .dirs_for(image)
            .iter()
            .filter_map(|d| canonical(d).ok())
            .any(|d| real.starts_with(d));
        if inside {
            Ok(())
        } else {
            tracing::warn!(image = %image.display(), backing = %backing.display(),
                resolved = %real.display(), "backing file refused by the path policy");
            Err(refused(real))
        }
    }

    /// The directory of `image` followed by the allowed directories.
    fn dirs_for(&self, image: &Path) -> Vec<PathBuf> {
        let own = match image.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        std::iter::once(own)
            .chain(self.allowed_dirs.iter().cloned())
            .collect()
    }
}

fn canonical(path: &Path) -> std::io::Result<PathBuf> {
    std::fs::canonicalize(path)
}

/// The path of an open file as the kernel reports it (symlinks already followed).
fn opened_path(file: &File) -> std::io::Result<PathBuf> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    // A deleted file reads as "/path (deleted)": that name does not exist, so refuse.
    if !link.is_absolute() || link.exists() {
        Ok(link)
    } else {
        Err(std::io::Error::from(std::io::ErrorKind::NotFound))
    }
}

/// A backing file name resolved as QEMU does: relative to the overlay's directory.
pub(crate) fn resolve_backing(overlay: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_owned();
    }
    match overlay.parent() {
        Some(dir) => dir.join(name),
        None => name.to_owned(),
    }
}
