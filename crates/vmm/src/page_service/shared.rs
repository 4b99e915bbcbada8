//! Shared memory for clones: a checkpoint's memory loaded and verified once into a sealed
//! memfd, which every clone maps `MAP_PRIVATE`.
//!
//! Pages no clone writes stay shared (one copy in the page cache of the memfd, however many
//! clones), a clone's write copies the page into its own anonymous memory, and the seals
//! (`F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL`) make sure nothing, in this
//! process or outside it, changes what the clones map. Every page was verified against the page
//! index while loading; zero pages are holes of the memfd and read as zero.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use ckpt_format::{Checkpoint, PageState, PAGE_SIZE};
use vm_memory::{FileOffset, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::memory;

/// Pages read and verified per store read while loading (1 MiB).
const CHUNK_PAGES: u64 = 256;

/// A checkpoint's memory, verified and sealed, for clones to map.
#[derive(Debug)]
pub struct SharedImage {
    file: Arc<File>,
    mem_size: u64,
}

/// Why a shared image cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum SharedImageError {
    /// memfd_create, writing it or sealing it failed.
    #[error("cannot {0} the shared memory image")]
    Memfd(&'static str, #[source] std::io::Error),
    /// A page cannot be read or does not verify.
    #[error("checkpoint memory")]
    Checkpoint(#[source] ckpt_format::Error),
    /// Mapping it for a clone failed.
    #[error("cannot map the shared memory image")]
    Map(String),
}

impl SharedImage {
    /// Reads and verifies every present page of `ckpt` into a new memfd, then seals it.
    pub fn load(ckpt: &Checkpoint) -> Result<SharedImage, SharedImageError> {
        let mem_size = ckpt.manifest().memory.mem_size;
        // SAFETY: memfd_create takes a NUL-terminated name and flags, and returns a new fd.
        let fd = unsafe {
            libc::memfd_create(
                c"cowvm-clone-memory".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(SharedImageError::Memfd(
                "create",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: a fresh fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(mem_size)
            .map_err(|e| SharedImageError::Memfd("size", e))?;
        let index = ckpt.page_index().map_err(SharedImageError::Checkpoint)?;
        let mut buf = vec![0u8; (CHUNK_PAGES as usize) * PAGE_SIZE];
        let pages = ckpt.pages();
        let mut first = 0;
        while first < pages {
            let count = CHUNK_PAGES.min(pages - first);
            let present = (first..first + count).any(|p| {
                index
                    .entry(p)
                    .is_some_and(|e| e.state == PageState::Present)
            });
            if present {
                let bytes = &mut buf[..(count as usize) * PAGE_SIZE];
                ckpt.read_pages(first, bytes)
                    .map_err(SharedImageError::Checkpoint)?;
                for (i, page) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
                    ckpt.verify_page(first + i as u64, page)
                        .map_err(SharedImageError::Checkpoint)?;
                }
                file.write_all_at(bytes, first * PAGE_SIZE as u64)
                    .map_err(|e| SharedImageError::Memfd("write", e))?;
            }
            first += count;
        }
        let seals =
            libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on our own memfd; no shared writable mapping of it exists.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(SharedImageError::Memfd(
                "seal",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(SharedImage {
            file: Arc::new(file),
            mem_size,
        })
    }

    /// Guest memory for one clone: private mappings of the image.
    pub(crate) fn map(&self) -> Result<GuestMemoryMmap, SharedImageError> {
        let mut image_offset = 0;
        let mut regions = Vec::new();
        for (gpa, len) in memory::ram_ranges(self.mem_size) {
            let mapping = MmapRegion::build(
                Some(FileOffset::from_arc(self.file.clone(), image_offset)),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
            .map_err(|e| SharedImageError::Map(e.to_string()))?;
            regions.push(
                GuestRegionMmap::new(mapping, gpa)
                    .ok_or_else(|| SharedImageError::Map("region overflows".into()))?,
            );
            image_offset += len as u64;
        }
        GuestMemoryMmap::from_regions(regions).map_err(|e| SharedImageError::Map(e.to_string()))
    }

    /// Guest memory size.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }
}
