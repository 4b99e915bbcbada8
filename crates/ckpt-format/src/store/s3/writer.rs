//! Writing a checkpoint to S3: memory assembled into chunk objects, uploaded in parallel.
//!
//! Each chunk counts the pages that arrived (written, or announced zero). A chunk buffer is
//! allocated on the first non-zero page and uploaded when the last page arrives; a chunk whose
//! pages are all zero is never uploaded. At most `buffered_chunks` partly filled buffers are
//! kept: past that, the fullest one is *spilled* — uploaded as it is, zero pages where pages
//! are still missing — and its later pages go to a fresh buffer, merged with the spilled
//! object (read back) when that chunk completes. At most `uploads` uploads are in flight; a
//! writer that completes a chunk waits for a slot. So the memory held is bounded by
//! `(uploads + buffered_chunks) * chunk_size`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::{
    chunk_name, object_of, Client, S3Config, S3Error, COMPLETE, MARKER_HEADER, MEMORY_DIR,
};
use crate::error::{Error, Result};
use crate::manifest::{Section, SectionEntry};
use crate::store::{Layout, Location, Overwrite, StoreWriter};
use crate::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Assembly state of one chunk.
#[derive(Debug, Default)]
struct Chunk {
    /// Pages written or announced zero.
    arrived: u64,
    /// The chunk's bytes so far (zero where nothing was written), with which pages were
    /// written into it.
    buffer: Option<(Vec<u8>, Vec<bool>)>,
    /// Set once a partial version was uploaded: notified when that upload ends.
    spilled: Option<Arc<Notify>>,
}

/// Notifies the next upload of the same chunk when dropped (whatever the outcome).
struct Done(Arc<Notify>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// Writing side of the S3 store.
pub(super) struct S3Writer {
    config: Arc<S3Config>,
    client: Mutex<Arc<Client>>,
    mem_size: u64,
    chunks: Vec<Mutex<Chunk>>,
    buffered: AtomicUsize,
    permits: Arc<Semaphore>,
    uploads: Mutex<Vec<JoinHandle<Result<(), S3Error>>>>,
    failed: Arc<AtomicBool>,
}

impl std::fmt::Debug for S3Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Writer({})", self.config.location)
    }
}

impl S3Writer {
    pub(super) fn create(config: Arc<S3Config>, layout: &Layout) -> Result<S3Writer> {
        let client = Client::connect(&config)?;
        let existing = client.probe(&config)?;
        if !existing.is_empty() {
            let marker = config.location.object(COMPLETE);
            let complete = existing.contains(&marker);
            let allowed = match config.overwrite {
                Overwrite::Never => false,
                Overwrite::Incomplete => !complete,
                Overwrite::Any => true,
            };
            if !allowed {
                return Err(Error::CheckpointExists {
                    path: config.location.to_string().into(),
                    complete,
                });
            }
            // The old checkpoint stops being complete before any of its objects is touched.
            if complete {
                delete(&client, &config, vec![marker.clone()])?;
            }
            let rest = client.list_all(&config)?;
            delete(
                &client,
                &config,
                rest.into_iter().filter(|p| *p != marker).collect(),
            )?;
        }
        let chunks = layout.mem_size.div_ceil(config.chunk_size);
        Ok(S3Writer {
            permits: Arc::new(Semaphore::new(config.uploads)),
            config,
            client: Mutex::new(Arc::new(client)),
            mem_size: layout.mem_size,
            chunks: (0..chunks).map(|_| Mutex::default()).collect(),
            buffered: AtomicUsize::new(0),
            uploads: Mutex::new(Vec::new()),
            failed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The client of this process: a forked child starts its own on first use.
    fn client(&self) -> Result<Arc<Client>> {
        let mut client = lock(&self.client);
        if client.pid != std::process::id() {
            // The parent's runtime has no threads here and its connections are the
            // parent's: never touch them (the old client is leaked, not dropped).
            let fresh = Arc::new(Client::connect(&self.config)?);
            std::mem::forget(std::mem::replace(&mut *client, fresh));
            lock(&self.uploads).clear();
        }
        Ok(Arc::clone(&client))
    }

    fn check_failed(&self) -> Result<()> {
        if self.failed.load(Ordering::Relaxed) {
            return Err(S3Error::UploadFailed {
                location: self.config.location.to_string(),
            }
            .into());
        }
        Ok(())
    }

    fn chunk_len(&self, chunk: u64) -> u64 {
        self.config
            .chunk_size
            .min(self.mem_size - chunk * self.config.chunk_size)
    }

    /// Splits `offset..offset + len` of memory into per-chunk pieces.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        let size = self.config.chunk_size;
        let end = offset + len;
        let mut at = offset;
        std::iter::from_fn(move || {
            (at < end).then(|| {
                let chunk = at / size;
                let within = at - chunk * size;
                let n = (size - within).min(end - at);
                at += n;
                (chunk, within, n)
            })
        })
    }

    /// `pages` pages at byte `within` of `chunk` arrived: `data` if written, zero pages if
    /// `None`. Uploads the chunk when it is whole.
    fn arrive(
        &self,
        client: &Client,
        chunk: u64,
        within: u64,
        pages: u64,
        data: Option<&[u8]>,
    ) -> Result<()> {
        let mut ch = loop {
            let mut ch = lock(&self.chunks[chunk as usize]);
            if data.is_none() || ch.buffer.is_some() {
                break ch;
            }
            if self.buffered.fetch_add(1, Ordering::AcqRel) >= self.config.buffered_chunks
                && self.spill_one(client, chunk)
            {
                self.buffered.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            let len = self.chunk_len(chunk) as usize;
            ch.buffer = Some((vec![0; len], vec![false; len / PAGE_SIZE]));
            break ch;
        };
        if let Some(d) = data {
            let (buf, written) = ch.buffer.as_mut().expect("allocated above");
            buf[within as usize..within as usize + d.len()].copy_from_slice(d);
            let first = (within / PAGE) as usize;
            written[first..first + pages as usize].fill(true);
        }
        ch.arrived += pages;
        if ch.arrived < self.chunk_len(chunk) / PAGE {
            return Ok(());
        }
        let Some(buffer) = ch.buffer.take() else {
            // All zero, or nothing new since the spilled version: that object is final.
            return Ok(());
        };
        self.buffered.fetch_sub(1, Ordering::AcqRel);
        let previous = ch.spilled.take();
        drop(ch);
        self.upload(client, chunk, buffer, previous, None);
        Ok(())
    }

    /// Uploads the fullest partly filled chunk other than `except` as it is. Returns whether
    /// one was found.
    fn spill_one(&self, client: &Client, except: u64) -> bool {
        let mut best: Option<(u64, u64)> = None;
        for (i, c) in self.chunks.iter().enumerate() {
            if i as u64 == except {
                continue;
            }
            if let Ok(ch) = c.try_lock() {
                if ch.buffer.is_some() && best.is_none_or(|(_, a)| ch.arrived > a) {
                    best = Some((i as u64, ch.arrived));
                }
            }
        }
        let Some((victim, _)) = best else {
            return false;
        };
        // Never wait for another chunk's lock while holding one: its holder may be spilling.
        let Ok(mut ch) = self.chunks[victim as usize].try_lock() else {
            return false;
        };
        let Some(buffer) = ch.buffer.take() else {
            return false;
        };
        self.buffered.fetch_sub(1, Ordering::AcqRel);
        let done = Arc::new(Notify::new());
        let previous = ch.spilled.replace(Arc::clone(&done));
        drop(ch);
        tracing::debug!(chunk = victim, "spilling a partly filled memory chunk");
        self.upload(client, victim, buffer, previous, Some(done));
        true
    }

    /// Starts uploading `chunk`, after its `previous` version (whose pages it merges in) is
    /// uploaded; notifies `done` when finished. Waits for an upload slot.
    fn upload(
        &self,
        client: &Client,
        chunk: u64,
        (mut buf, written): (Vec<u8>, Vec<bool>),
        previous: Option<Arc<Notify>>,
        done: Option<Arc<Notify>>,
    ) {
        let permit: OwnedSemaphorePermit =
            futures::executor::block_on(Arc::clone(&self.permits).acquire_owned())
                .expect("the upload semaphore is never closed");
        let store = Arc::clone(&client.store);
        let config = Arc::clone(&self.config);
        let failed = Arc::clone(&self.failed);
        let name = chunk_name(chunk);
        let path = config.location.object(&name);
        let task = client.runtime().spawn(async move {
            let _permit = permit;
            let _done = done.map(Done);
            let result = async {
                if let Some(previous) = previous {
                    previous.notified().await;
                    let old = store
                        .get_range(&path, 0..buf.len() as u64)
                        .await
                        .map_err(|e| {
                            config.classify("read back", &config.location.url_of(&name), e)
                        })?;
                    merge(&mut buf, &written, &old);
                }
                store
                    .put(&path, Bytes::from(buf).into())
                    .await
                    .map_err(|e| config.classify("write", &config.location.url_of(&name), e))
                    .map(drop)
            }
            .await;
            if let Err(e) = &result {
                tracing::warn!(chunk = %name, error = %e, "memory chunk upload failed");
                failed.store(true, Ordering::Relaxed);
            }
            result
        });
        lock(&self.uploads).push(task);
    }

    /// Waits for every upload started so far; the first error, if any.
    fn wait_uploads(&self) -> Result<()> {
        let tasks = std::mem::take(&mut *lock(&self.uploads));
        let mut first = None;
        for task in tasks {
            let result = match futures::executor::block_on(task) {
                Ok(r) => r,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            };
            if let Err(e) = result {
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(e.into()),
            None => self.check_failed(),
        }
    }

    fn put(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let client = self.client()?;
        let store = Arc::clone(&client.store);
        let path = self.config.location.object(name);
        client
            .run(async move { store.put(&path, Bytes::from(bytes).into()).await })
            .map_err(|e| {
                self.config
                    .classify("write", &self.config.location.url_of(name), e)
            })?;
        Ok(())
    }
}

/// Copies into `buf` the pages of `old` that were not written into `buf`.
fn merge(buf: &mut [u8], written: &[bool], old: &[u8]) {
    for (i, w) in written.iter().enumerate() {
        let r = i * PAGE_SIZE..(i + 1) * PAGE_SIZE;
        if !w && old.len() >= r.end {
            buf[r.clone()].copy_from_slice(&old[r]);
        }
    }
}

fn delete(client: &Client, config: &S3Config, paths: Vec<ObjectPath>) -> Result<()> {
    for path in paths {
        let store = Arc::clone(&client.store);
        let name = path.to_string();
        client
            .run(async move { store.delete(&path).await })
            .map_err(|e| {
                config.classify(
                    "delete",
                    &format!("s3://{}/{name}", config.location.bucket),
                    e,
                )
            })?;
    }
    Ok(())
}

impl StoreWriter for S3Writer {
    fn describe(&self) -> String {
        self.config.location.to_string()
    }

    fn memory_location(&self) -> Location {
        Location {
            file: Some(MEMORY_DIR.to_string()),
            offset: 0,
        }
    }

    fn write_memory(&self, offset: u64, buf: &[u8]) -> Result<()> {
        debug_assert!(offset + buf.len() as u64 <= self.mem_size);
        self.check_failed()?;
        let client = self.client()?;
        let mut at = 0;
        for (chunk, within, n) in self.pieces(offset, buf.len() as u64) {
            let data = &buf[at..at + n as usize];
            at += n as usize;
            self.arrive(&client, chunk, within, n / PAGE, Some(data))?;
        }
        Ok(())
    }

    fn zero_memory(&self, offset: u64, len: u64) -> Result<()> {
        let client = self.client()?;
        for (chunk, within, n) in self.pieces(offset, len) {
            self.arrive(&client, chunk, within, n / PAGE, None)?;
        }
        Ok(())
    }

    fn sync_memory(&self) -> Result<()> {
        let client = self.client()?;
        // Chunks some of whose pages never arrived (a writer that stopped early): upload
        // what there is, so that `sync` means what it says.
        for chunk in 0..self.chunks.len() as u64 {
            let mut ch = lock(&self.chunks[chunk as usize]);
            if let Some(buffer) = ch.buffer.take() {
                self.buffered.fetch_sub(1, Ordering::AcqRel);
                let done = Arc::new(Notify::new());
                let previous = ch.spilled.replace(Arc::clone(&done));
                drop(ch);
                self.upload(&client, chunk, buffer, previous, Some(done));
            }
        }
        self.wait_uploads()
    }

    fn write_section(&self, section: Section, bytes: &[u8]) -> Result<Location> {
        let name = object_of(section);
        self.put(name, bytes.to_vec())?;
        Ok(Location {
            file: Some(name.to_string()),
            offset: 0,
        })
    }

    fn read_section(&self, entry: &SectionEntry) -> Result<Vec<u8>> {
        let client = self.client()?;
        super::reader::get_section(&client, &self.config, entry)
    }

    fn sync(&self) -> Result<()> {
        self.sync_memory()
    }

    fn commit(&self, _sections: &[SectionEntry], manifest: &SectionEntry) -> Result<()> {
        self.wait_uploads()?;
        let checksum = manifest
            .checksum
            .ok_or_else(|| Error::corrupt("manifest entry", "no checksum"))?;
        let text = format!(
            "{MARKER_HEADER}\nmanifest {}\nlength {}\nchecksum {checksum}\nchunk-size {}\n",
            object_of(Section::Manifest),
            manifest.length,
            self.config.chunk_size
        );
        self.put(COMPLETE, text.into_bytes())
    }

    fn discard(&self) -> Result<()> {
        // Uploads still in flight would recreate what is removed: let them end first.
        let _ = self.wait_uploads();
        let client = self.client()?;
        // Only the names this checkpoint writes, the marker first: whatever else fails to
        // go, no reader takes the rest for a checkpoint.
        let names = [
            COMPLETE,
            object_of(Section::Manifest),
            object_of(Section::State),
            object_of(Section::PageIndex),
        ]
        .into_iter()
        .map(str::to_string)
        .chain((0..self.chunks.len() as u64).map(chunk_name));
        for name in names {
            let store = Arc::clone(&client.store);
            let path = self.config.location.object(&name);
            match client.run(async move { store.delete(&path).await }) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    return Err(self
                        .config
                        .classify("delete", &self.config.location.url_of(&name), e)
                        .into())
                }
            }
        }
        Ok(())
    }
}
