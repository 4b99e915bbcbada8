//! Reading a checkpoint from S3: sections are whole objects, memory is read with one ranged
//! GET per chunk touched, and checked against the page index before it is returned, so a
//! corrupt chunk is named.

use std::sync::{Arc, Mutex, OnceLock};

use object_store::ObjectStoreExt;

use super::cache::CheckpointCache;
use super::{
    chunk_name, object_of, Client, S3Config, S3Error, COMPLETE, MARKER_HEADER, MEMORY_DIR,
};
use crate::checksum::{checksum, Checksum};
use crate::error::{Error, Result};
use crate::manifest::{Section, SectionEntry};
use crate::page_index::{PageIndex, PageState};
use crate::store::{MemorySource, StoreReader};
use crate::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

/// Reads a whole section object, checking its name and length against `entry`.
pub(super) fn get_section(
    client: &Client,
    config: &S3Config,
    entry: &SectionEntry,
) -> Result<Vec<u8>> {
    let section = [Section::State, Section::PageIndex, Section::Manifest]
        .into_iter()
        .find(|s| s.name() == entry.name)
        .ok_or_else(|| Error::corrupt("manifest", format!("unknown section {:?}", entry.name)))?;
    let name = object_of(section);
    if entry.file.as_deref() != Some(name) || entry.offset != 0 {
        return Err(Error::corrupt(
            "manifest",
            format!(
                "section {} in {:?}+{}, expected {name}+0",
                entry.name, entry.file, entry.offset
            ),
        ));
    }
    let store = Arc::clone(&client.store);
    let path = config.location.object(name);
    let bytes = client
        .run(async move { store.get(&path).await?.bytes().await })
        .map_err(|e| {
            let not_found = matches!(e, object_store::Error::NotFound { .. });
            match config.classify("read", &config.location.url_of(name), e) {
                S3Error::Request { .. } if not_found => Error::Truncated {
                    section: entry.name.clone(),
                    expected: entry.length,
                    found: 0,
                },
                e => e.into(),
            }
        })?;
    let len = bytes.len() as u64;
    if len < entry.length {
        return Err(Error::Truncated {
            section: entry.name.clone(),
            expected: entry.length,
            found: len,
        });
    }
    if len > entry.length {
        return Err(Error::corrupt(
            format!("section {}", entry.name),
            format!(
                "{} trailing bytes in {}",
                len - entry.length,
                config.location.url_of(name)
            ),
        ));
    }
    Ok(bytes.to_vec())
}

/// Reads bytes `range` (from its start) of a section object with one ranged GET, unverified.
fn get_section_range(
    client: &Client,
    config: &S3Config,
    entry: &SectionEntry,
    range: std::ops::Range<u64>,
) -> Result<Vec<u8>> {
    let name = object_of(Section::PageIndex);
    if entry.name != Section::PageIndex.name()
        || entry.file.as_deref() != Some(name)
        || range.end > entry.length
    {
        // Only the page index is read in parts; anything else is read whole.
        let bytes = get_section(client, config, entry)?;
        return bytes
            .get(range.start as usize..range.end as usize)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| Error::Truncated {
                section: entry.name.clone(),
                expected: range.end,
                found: bytes.len() as u64,
            });
    }
    let store = Arc::clone(&client.store);
    let path = config.location.object(name);
    let want = range.end - range.start;
    let bytes = client
        .run(async move { store.get_range(&path, range).await })
        .map_err(|e| Error::from(config.classify("read", &config.location.url_of(name), e)))?;
    if bytes.len() as u64 != want {
        return Err(Error::Truncated {
            section: entry.name.clone(),
            expected: want,
            found: bytes.len() as u64,
        });
    }
    Ok(bytes.to_vec())
}

/// What the completion marker says.
struct Marker {
    manifest: SectionEntry,
    chunk_size: u64,
}

fn parse_marker(text: &str) -> Option<Marker> {
    let mut lines = text.lines();
    if lines.next()? != MARKER_HEADER {
        return None;
    }
    let (mut file, mut length, mut sum, mut chunk_size) = (None, None, None, None);
    for line in lines {
        let (key, value) = line.split_once(' ')?;
        match key {
            "manifest" => file = Some(value.to_string()),
            "length" => length = Some(value.parse().ok()?),
            "checksum" => sum = Some(value.parse::<Checksum>().ok()?),
            "chunk-size" => chunk_size = Some(value.parse::<u64>().ok()?),
            _ => {} // tolerate fields added later
        }
    }
    let chunk_size = chunk_size.filter(|c| *c > 0 && c % PAGE == 0)?;
    Some(Marker {
        manifest: SectionEntry {
            name: Section::Manifest.name().to_string(),
            file: Some(file?),
            offset: 0,
            length: length?,
            checksum: Some(sum?),
        },
        chunk_size,
    })
}

/// Reading side of the S3 store.
pub(super) struct S3Reader {
    config: Arc<S3Config>,
    client: Client,
    chunk_size: OnceLock<u64>,
    memory_len: OnceLock<u64>,
    index: OnceLock<PageIndex>,
    /// The local cache of this checkpoint, once the marker named its manifest.
    cache: OnceLock<CheckpointCache>,
    /// Sections read whole from the cache for ranged reads.
    whole: Mutex<Vec<(String, Arc<Vec<u8>>)>>,
}

impl std::fmt::Debug for S3Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Reader({})", self.config.location)
    }
}

impl S3Reader {
    pub(super) fn open(config: Arc<S3Config>) -> Result<S3Reader> {
        let client = Client::connect(&config)?;
        client.probe(&config)?;
        Ok(S3Reader {
            config,
            client,
            chunk_size: OnceLock::new(),
            memory_len: OnceLock::new(),
            index: OnceLock::new(),
            cache: OnceLock::new(),
            whole: Mutex::new(Vec::new()),
        })
    }

    /// Reads `buf.len()` bytes at `within` of chunk `chunk` (one ranged GET, none if the page
    /// index says they are all zero) and checks them against the page index.
    fn read_piece(&self, chunk: u64, within: u64, buf: &mut [u8]) -> Result<()> {
        let chunk_size = *self.chunk_size.get().expect("set by read_commit");
        let first_page = (chunk * chunk_size + within) / PAGE;
        let pages = buf.len() as u64 / PAGE;
        let index = self.index.get();
        let state = |p: u64| index.and_then(|i| i.entry(p));
        if index.is_some()
            && (first_page..first_page + pages)
                .all(|p| state(p).is_some_and(|e| e.state == PageState::Zero))
        {
            buf.fill(0);
            return Ok(());
        }
        let offset = chunk * chunk_size + within;
        let cache = self.cache.get().zip(self.memory_len.get());
        if let (Some((cache, &len)), Some(index)) = (cache, index) {
            if cache.read_memory(len, offset, buf) && pages_match(index, first_page, buf) {
                return Ok(());
            }
        }
        let name = chunk_name(chunk);
        let object = self.config.location.url_of(&name);
        let store = Arc::clone(&self.client.store);
        let path = self.config.location.object(&name);
        let range = within..within + buf.len() as u64;
        let bytes = self
            .client
            .run(async move { store.get_range(&path, range).await })
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => S3Error::ChunkMissing {
                    object: object.clone(),
                },
                e => self.config.classify("read", &object, e),
            })?;
        if bytes.len() != buf.len() {
            return Err(S3Error::ChunkTruncated {
                object,
                expected: within + buf.len() as u64,
                found: within + bytes.len() as u64,
            }
            .into());
        }
        buf.copy_from_slice(&bytes);
        for (i, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
            let p = first_page + i as u64;
            match state(p) {
                Some(e) if e.state == PageState::Zero => page.fill(0),
                Some(e) if checksum(page) != e.hash => {
                    return Err(S3Error::ChunkCorrupt { object, page: p }.into());
                }
                _ => {}
            }
        }
        // Kept even before the index is known: what is read back is checked against it.
        if let Some((cache, &len)) = cache {
            cache.put_memory(len, offset, buf);
        }
        Ok(())
    }
}

impl S3Reader {
    /// Keeps the page index (once its checksum holds) to check every chunk read.
    fn keep_index(&self, entry: &SectionEntry, bytes: &[u8]) {
        if entry.name == Section::PageIndex.name()
            && entry.checksum == Some(Checksum(checksum(bytes)))
        {
            if let Some(len) = self.memory_len.get() {
                if let Ok(index) = PageIndex::decode(bytes, len / PAGE) {
                    let _ = self.index.set(index);
                }
            }
        }
    }

    /// The section `entry` from the cache, read and verified once for the ranged reads of it
    /// (the page index's segments before the whole index is needed).
    fn whole_from_cache(&self, entry: &SectionEntry) -> Option<Arc<Vec<u8>>> {
        let cache = self.cache.get()?;
        let mut whole = self.whole.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, bytes)) = whole.iter().find(|(name, _)| *name == entry.name) {
            return Some(Arc::clone(bytes));
        }
        let bytes = Arc::new(cache.section(entry)?);
        self.keep_index(entry, &bytes);
        whole.push((entry.name.clone(), Arc::clone(&bytes)));
        Some(bytes)
    }
}

/// Whether every page of `buf` (pages from `first` on) matches `index`; zero pages are zeroed
/// instead of checked.
fn pages_match(index: &PageIndex, first: u64, buf: &mut [u8]) -> bool {
    buf.chunks_exact_mut(PAGE_SIZE)
        .enumerate()
        .all(|(i, page)| match index.entry(first + i as u64) {
            Some(e) if e.state == PageState::Zero => {
                page.fill(0);
                true
            }
            Some(e) if e.state == PageState::Present => checksum(page) == e.hash,
            _ => false,
        })
}

impl StoreReader for S3Reader {
    fn describe(&self) -> String {
        self.config.location.to_string()
    }

    fn read_commit(&self) -> Result<Option<SectionEntry>> {
        let store = Arc::clone(&self.client.store);
        let path = self.config.location.object(COMPLETE);
        let url = self.config.location.url_of(COMPLETE);
        let text = match self
            .client
            .run(async move { store.get(&path).await?.bytes().await })
        {
            Ok(t) => t,
            Err(e) => {
                let not_found = matches!(e, object_store::Error::NotFound { .. });
                return match self.config.classify("read", &url, e) {
                    S3Error::Request { .. } if not_found => Ok(None),
                    e => Err(e.into()),
                };
            }
        };
        let marker = std::str::from_utf8(&text).ok().and_then(parse_marker);
        match marker {
            Some(m) => {
                let _ = self.chunk_size.set(m.chunk_size);
                if let (Some(root), Some(sum)) = (&self.config.cache, m.manifest.checksum) {
                    let _ = self.cache.set(CheckpointCache::new(root, sum));
                }
                Ok(Some(m.manifest))
            }
            None => Err(Error::corrupt(
                "completion marker",
                format!("{url} is not a completion marker"),
            )),
        }
    }

    fn read_section(&self, entry: &SectionEntry) -> Result<Vec<u8>> {
        let cache = self.cache.get();
        let bytes = match cache.and_then(|c| c.section(entry)) {
            Some(bytes) => bytes,
            None => {
                let bytes = get_section(&self.client, &self.config, entry)?;
                if let Some(cache) = cache {
                    cache.put_section(entry, &bytes);
                }
                bytes
            }
        };
        self.keep_index(entry, &bytes);
        Ok(bytes)
    }

    fn read_section_range(
        &self,
        entry: &SectionEntry,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<u8>> {
        if let Some(bytes) = self.whole_from_cache(entry) {
            if let Some(part) = bytes.get(range.start as usize..range.end as usize) {
                return Ok(part.to_vec());
            }
        }
        get_section_range(&self.client, &self.config, entry, range)
    }

    fn check_memory(&self, entry: &SectionEntry) -> Result<()> {
        if entry.file.as_deref() != Some(MEMORY_DIR) || entry.offset != 0 {
            return Err(Error::corrupt(
                "manifest",
                format!(
                    "memory at {:?}+{}, expected {MEMORY_DIR}+0",
                    entry.file, entry.offset
                ),
            ));
        }
        if self.chunk_size.get().is_none() {
            return Err(Error::corrupt("completion marker", "no chunk size"));
        }
        let _ = self.memory_len.set(entry.length);
        Ok(())
    }

    fn read_memory(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let chunk_size = *self
            .chunk_size
            .get()
            .ok_or_else(|| Error::corrupt("completion marker", "no chunk size"))?;
        let mut at = offset;
        for piece in split_at_chunks(buf, offset, chunk_size) {
            let chunk = at / chunk_size;
            let len = piece.len() as u64;
            self.read_piece(chunk, at - chunk * chunk_size, piece)?;
            at += len;
        }
        Ok(())
    }

    fn memory_source(&self, _entry: &SectionEntry) -> Result<MemorySource> {
        Ok(MemorySource::Pages)
    }
}

/// Splits `buf` (memory from `offset` on) at chunk boundaries.
fn split_at_chunks(buf: &mut [u8], offset: u64, chunk_size: u64) -> Vec<&mut [u8]> {
    let mut pieces = Vec::new();
    let mut rest = buf;
    let mut at = offset;
    while !rest.is_empty() {
        let n = ((chunk_size - at % chunk_size) as usize).min(rest.len());
        let (head, tail) = rest.split_at_mut(n);
        pieces.push(head);
        rest = tail;
        at += n as u64;
    }
    pieces
}
