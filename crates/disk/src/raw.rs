//! A raw image: the file is the disk, byte for byte.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::io::{file_len, read_zero_filled_at, sync_data, write_all_at};
use crate::Stats;

pub(crate) struct Raw {
    pub(crate) path: PathBuf,
    pub(crate) file: Arc<File>,
    pub(crate) read_only: bool,
    pub(crate) size: u64,
    pub(crate) stats: Stats,
}

impl Raw {
    pub(crate) fn open(path: &Path, file: File, read_only: bool) -> Result<Raw> {
        let size = file_len(&file, path)?;
        tracing::debug!(path = %path.display(), size, "opened raw");
        Ok(Raw {
            path: path.to_owned(),
            file: Arc::new(file),
            read_only,
            size,
            stats: Stats::default(),
        })
    }

    pub(crate) fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        read_zero_filled_at(&self.file, &self.path, buf, offset, "reading data")?;
        self.stats.bytes_read += buf.len() as u64;
        Ok(())
    }

    pub(crate) fn write(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        write_all_at(&self.file, &self.path, buf, offset, "writing data")?;
        self.stats.bytes_written += buf.len() as u64;
        Ok(())
    }

    /// Grows the disk (used when committing a larger overlay into a raw parent).
    pub(crate) fn grow(&mut self, size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        if size > self.size {
            self.file
                .set_len(size)
                .map_err(|e| Error::io(&self.path, "resizing", e))?;
            self.size = size;
        }
        Ok(())
    }

    pub(crate) fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        sync_data(&self.file, &self.path)
    }
}
