//! Image generations of one disk. A switch makes a new image (normally a COW overlay over the
//! old top) current for requests popped from then on; a request keeps the generation it was
//! popped against, so an older image stays open until its last request finishes, and is then
//! flushed and closed (retired). Two rules keep the generations consistent:
//!
//! - a write on an older image that allocates clusters makes the newer overlays reopen, so they
//!   do not read through a stale copy of its metadata;
//! - M14: a write must not copy up clusters that a write against an older image still
//!   modifies, or the copy would miss that write; such a write is deferred until the older one
//!   completes ([`Images::conflicts`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc::Sender;

use disk::{Extent, Format, Image};
use tracing::{info, warn};

use super::command::ImageInfo;
use super::{BlockError, InflightRequest, RequestKind, SECTOR_SIZE};

/// The open images of one disk, by generation.
pub(super) struct Images {
    images: BTreeMap<u64, Image>,
    generation: u64,
    /// Virtual size in bytes; every generation has it.
    capacity: u64,
    /// Replies owed once no request older than the generation is live.
    older_waiters: Vec<(u64, Sender<()>)>,
}

impl Images {
    /// `image` as generation 0.
    pub fn new(image: Image) -> Images {
        Images {
            capacity: image.size(),
            images: BTreeMap::from([(0, image)]),
            generation: 0,
            older_waiters: Vec::new(),
        }
    }

    /// The generation new requests are popped against.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn current(&mut self) -> &mut Image {
        self.images
            .get_mut(&self.generation)
            .expect("the current generation always has its image")
    }

    /// The image of generation `g`, while a request still uses it.
    pub fn get_mut(&mut self, g: u64) -> Option<&mut Image> {
        self.images.get_mut(&g)
    }

    pub fn info(&mut self) -> ImageInfo {
        let generation = self.generation;
        let image = self.current();
        ImageInfo {
            path: image.path().to_owned(),
            generation,
            chain: image.backing_chain(),
            stats: image.stats(),
            backing_policy: image.backing_policy().clone(),
        }
    }

    /// Flushes every open image; returns the failures.
    pub fn flush_all(&mut self) -> Vec<disk::Error> {
        self.images
            .values_mut()
            .filter_map(|image| image.flush().err())
            .collect()
    }

    /// Makes `image` the image for requests popped from now on; returns its generation.
    pub fn switch(&mut self, d: usize, image: Image, readonly: bool) -> Result<u64, BlockError> {
        if image.size() != self.capacity {
            return Err(BlockError::SizeMismatch {
                new: image.size(),
                current: self.capacity,
            });
        }
        if image.is_read_only() && !readonly {
            return Err(BlockError::ReadOnlyImage);
        }
        // The caller opened the overlay while the VM was still writing the old top, so its view
        // of the old top's metadata may be stale; reopen it now that nothing new is prepared.
        let image = reopen(&image)?;
        self.generation += 1;
        info!(disk = d, generation = self.generation, path = %image.path().display(), "disk switched to a new image");
        self.images.insert(self.generation, image);
        Ok(self.generation)
    }

    /// Rebases the current image onto `backing`, which must have the content of its current
    /// backing file.
    pub fn rebase(&mut self, backing: &Path, format: Option<Format>) -> Result<(), BlockError> {
        self.current()
            .set_backing(backing, format)
            .map_err(BlockError::Image)
    }

    /// Allocates (copy-up) the clusters of write `w` in the image it was popped against; an
    /// older image's allocation, even a failed one, makes the newer overlays reopen.
    pub fn prepare_write(&mut self, w: &InflightRequest) -> Result<Vec<Extent>, disk::Error> {
        let extents = match self.images.get_mut(&w.image_generation) {
            Some(image) => image.prepare_write(w.sector * SECTOR_SIZE, u64::from(w.len)),
            None => Ok(Vec::new()),
        };
        if w.image_generation < self.generation {
            self.refresh_newer(w.image_generation);
        }
        extents
    }

    /// An image of generation `g` allocated clusters after newer overlays were opened over it:
    /// reopen those, so they do not read through a stale copy of its metadata.
    fn refresh_newer(&mut self, g: u64) {
        let newer: Vec<u64> = self.images.range(g + 1..).map(|(&k, _)| k).collect();
        for k in newer {
            let fresh = self.images.get(&k).map(reopen);
            match fresh {
                Some(Ok(img)) => {
                    self.images.insert(k, img);
                }
                Some(Err(e)) => warn!("cannot reopen overlay after an allocation below it: {e}"),
                None => {}
            }
        }
    }

    /// M14: whether write `w` would copy up clusters that a `live` write against an older
    /// image still modifies.
    pub fn conflicts<'a>(
        &self,
        w: &InflightRequest,
        mut live: impl Iterator<Item = &'a InflightRequest>,
    ) -> bool {
        let Some(image) = self.images.get(&w.image_generation) else {
            return false;
        };
        let cs = image.cluster_size();
        let offset = w.sector * SECTOR_SIZE;
        let clusters = image.clusters_touched(offset, u64::from(w.len));
        let (start, end) = (clusters.start * cs, clusters.end * cs);
        live.any(|r| {
            let o = r.sector * SECTOR_SIZE;
            r.kind == RequestKind::Write
                && r.image_generation < w.image_generation
                && o < end
                && start < o + u64::from(r.len)
        })
    }

    /// Replies on `tx` once every request popped against an older generation has finished and
    /// the older images are retired.
    pub fn wait_older(&mut self, tx: Sender<()>) {
        self.older_waiters.push((self.generation, tx));
    }

    /// Retires the older images no live request uses (their writes made durable first), then
    /// answers the waiters whose older requests are all done. `live` lists the generation of
    /// every live request.
    pub fn settle(&mut self, d: usize, live: &[u64]) {
        let current = self.generation;
        let old: Vec<u64> = self
            .images
            .keys()
            .copied()
            .filter(|&g| g != current && !live.contains(&g))
            .collect();
        for g in old {
            if let Some(mut image) = self.images.remove(&g) {
                // Writes that completed into it must be durable before it is let go.
                if let Err(e) = image.flush() {
                    warn!(disk = d, "flush of a retired image failed: {e}");
                }
                info!(disk = d, generation = g, path = %image.path().display(), "old image retired");
            }
        }
        let waiters = std::mem::take(&mut self.older_waiters);
        for (g, w) in waiters {
            if live.iter().any(|&r| r < g) {
                self.older_waiters.push((g, w));
            } else {
                let _ = w.send(());
            }
        }
    }
}

fn reopen(image: &Image) -> Result<Image, BlockError> {
    let opts = disk::OpenOptions {
        read_only: image.is_read_only(),
        format: Some(image.format()),
        backing_policy: image.backing_policy().clone(),
        ..disk::OpenOptions::default()
    };
    Image::open_with(image.path(), &opts).map_err(BlockError::Open)
}
