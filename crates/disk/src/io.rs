//! Positional I/O helpers that turn `std::io::Error` into our typed errors.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};

/// Reads exactly `buf.len()` bytes at `offset`; a short file is an error.
pub(crate) fn read_exact_at(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
    action: &'static str,
) -> Result<()> {
    file.read_exact_at(buf, offset)
        .map_err(|e| Error::io(path, action, e))
}

/// Reads `buf.len()` bytes at `offset`, filling whatever lies beyond the end of the file with
/// zeros (qcow2 data clusters and raw backing files may end before the cluster does).
pub(crate) fn read_zero_filled_at(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
    action: &'static str,
) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, action, e)),
        }
    }
    Ok(())
}

/// Writes all of `buf` at `offset`.
pub(crate) fn write_all_at(
    file: &File,
    path: &Path,
    buf: &[u8],
    offset: u64,
    action: &'static str,
) -> Result<()> {
    file.write_all_at(buf, offset)
        .map_err(|e| Error::io(path, action, e))
}

/// Makes every write so far durable (data and the file size).
pub(crate) fn sync_data(file: &File, path: &Path) -> Result<()> {
    file.sync_data().map_err(|e| Error::io(path, "syncing", e))
}

/// Length of an open file.
pub(crate) fn file_len(file: &File, path: &Path) -> Result<u64> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|e| Error::io(path, "reading file size", e))
}
