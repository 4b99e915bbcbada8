//! Refcounts and cluster allocation for a writable qcow2 file.
//!
//! Allocation appends: the next cluster is the first one past both the end of the file and
//! the last cluster with a non-zero refcount. Clusters are never freed while the image is in
//! use except the old refcount table after it grows, so an append allocator loses nothing.
//!
//! Crash-safety order (see `qcow2.rs`): a refcount is set before anything points at the
//! cluster, a new refcount block is written (describing itself) before the refcount-table entry
//! that points at it, and a grown refcount table (with its new blocks) is complete before the
//! header is switched to it. A crash in between leaves leaked clusters only.

use crate::error::{Error, Result};
use crate::header::MAX_REFCOUNT_TABLE_BYTES;
use crate::io::read_exact_at;
use crate::qcow2::Qcow2;
use crate::table::{encode_table, get_refcount, refcount_entry_span, set_refcount, OFFSET_MASK};

impl Qcow2 {
    /// Offset of the refcount block for refcount-table index `rti` (0 = none).
    fn refblock_offset(&self, rti: u64) -> Result<u64> {
        let raw = self.reftable.get(rti as usize).copied().unwrap_or(0);
        if raw & 0x1ff != 0 {
            return Err(Error::corrupt(
                &self.path,
                format!("refcount table entry {rti} has reserved bits set"),
            ));
        }
        let off = raw & OFFSET_MASK;
        if off != 0 && (!self.geo.is_aligned(off) || off + self.cluster_size() > self.file_len) {
            return Err(Error::corrupt(
                &self.path,
                format!("refcount block {rti} at {off:#x} is unaligned or beyond the file"),
            ));
        }
        Ok(off)
    }

    /// Loads a refcount block into the cache and returns it.
    fn refblock(&mut self, off: u64) -> Result<&mut Vec<u8>> {
        if self.refblock_cache.get_mut(off).is_none() {
            let mut bytes = vec![0u8; self.cluster_size() as usize];
            read_exact_at(
                &self.file,
                &self.path,
                &mut bytes,
                off,
                "reading a refcount block",
            )?;
            self.refblock_cache.insert(off, bytes);
        }
        Ok(self
            .refblock_cache
            .get_mut(off)
            .expect("refcount block was inserted just above"))
    }

    /// The refcount of the host cluster containing `host`.
    pub(crate) fn refcount(&mut self, host: u64) -> Result<u64> {
        let (rti, idx) = self.geo.split_host(host);
        let block = self.refblock_offset(rti)?;
        if block == 0 {
            return Ok(0);
        }
        let order = self.geo.refcount_order;
        Ok(get_refcount(self.refblock(block)?, idx, order))
    }

    /// Sets the refcount of `host`'s cluster; its refcount block must exist.
    fn write_refcount(&mut self, host: u64, value: u64) -> Result<()> {
        let (rti, idx) = self.geo.split_host(host);
        let block = self.refblock_offset(rti)?;
        if block == 0 {
            return Err(Error::corrupt(
                &self.path,
                format!("no refcount block for cluster {host:#x}"),
            ));
        }
        let order = self.geo.refcount_order;
        let (at, len) = refcount_entry_span(idx, order);
        let bytes = {
            let b = self.refblock(block)?;
            set_refcount(b, idx, order, value);
            b[at as usize..(at + len) as usize].to_vec()
        };
        self.pwrite(&bytes, block + at, "writing a refcount")
    }

    /// First cluster past the file end and past every cluster in use.
    fn next_free(&mut self) -> Result<u64> {
        if let Some(n) = self.next_free {
            return Ok(n);
        }
        let mut end = 0;
        let per_block = self.geo.refblock_entries();
        let order = self.geo.refcount_order;
        for rti in (0..self.reftable.len() as u64).rev() {
            let block = self.refblock_offset(rti)?;
            if block == 0 {
                continue;
            }
            let b = self.refblock(block)?;
            if let Some(idx) = (0..per_block)
                .rev()
                .find(|&i| get_refcount(b, i, order) != 0)
            {
                end = (rti * per_block + idx + 1) * self.geo.cluster_size();
                break;
            }
        }
        let n = end.max(self.geo.align_up(self.file_len));
        self.next_free = Some(n);
        Ok(n)
    }

    /// Grows the file (with zeros) to at least `len` bytes.
    fn extend_file(&mut self, len: u64) -> Result<()> {
        if len > self.file_len {
            self.crash_point("extending the file")?;
            self.file
                .set_len(len)
                .map_err(|e| Error::io(&self.path, "extending the file", e))?;
            self.file_len = len;
        }
        Ok(())
    }

    /// Allocates one host cluster: its refcount is one and the file covers it (zeros).
    pub(crate) fn alloc_cluster(&mut self) -> Result<u64> {
        self.ensure_writable()?;
        let cs = self.cluster_size();
        let order = self.geo.refcount_order;
        loop {
            let off = self.next_free()?;
            let (rti, idx) = self.geo.split_host(off);
            if rti >= self.reftable.len() as u64 {
                self.grow_reftable(rti)?;
                continue;
            }
            if self.refblock_offset(rti)? == 0 {
                // The new block goes at `off`, the first cluster it describes, so it can
                // count itself: write it, then the table entry that points at it.
                let mut block = vec![0u8; cs as usize];
                set_refcount(&mut block, idx, order, 1);
                self.pwrite(&block, off, "writing a refcount block")?;
                self.file_len = self.file_len.max(off + cs);
                self.barrier()?;
                self.pwrite(
                    &off.to_be_bytes(),
                    self.header.refcount_table_offset + rti * 8,
                    "writing a refcount table entry",
                )?;
                self.barrier()?;
                self.reftable[rti as usize] = off;
                self.refblock_cache.insert(off, block);
                self.next_free = Some(off + cs);
                self.stats.metadata_clusters_allocated += 1;
                continue;
            }
            if self.refcount(off)? != 0 {
                // Defensive: never hand out a cluster in use.
                self.next_free = Some(off + cs);
                continue;
            }
            self.extend_file(off + cs)?;
            self.write_refcount(off, 1)?;
            self.barrier()?;
            self.next_free = Some(off + cs);
            return Ok(off);
        }
    }

    /// Replaces the refcount table by a larger one that has an entry for `needed_rti`.
    ///
    /// The new table and any refcount blocks needed to count its own clusters are placed at
    /// the end of the file, fully written, and only then does the header switch to them.
    fn grow_reftable(&mut self, needed_rti: u64) -> Result<()> {
        let cs = self.cluster_size();
        let per_cluster = cs / 8;
        let start = self.next_free()?;
        let old_len = self.reftable.len() as u64;
        // As when opening: a table this large only comes from a hostile or corrupt image
        // (a cluster in use far past the data), and growing it would take unbounded work.
        let too_large = || {
            Error::unsupported(
                &self.path,
                format!("growing the refcount table for cluster index {needed_rti}"),
            )
        };
        let mut entries = (needed_rti + 1)
            .max(old_len * 2)
            .next_multiple_of(per_cluster);
        if entries.saturating_mul(8) > MAX_REFCOUNT_TABLE_BYTES {
            return Err(too_large());
        }
        // Find a fixed point: table of `n` clusters at `start`, then `missing.len()` new blocks,
        // such that every cluster of that area is described by an old or a new block and the
        // table has an entry for every block.
        let (n, missing, end) = loop {
            let n = entries / per_cluster;
            let mut missing: Vec<u64> = Vec::new();
            let end = loop {
                let end = start + (n + missing.len() as u64) * cs;
                let first = self.geo.split_host(start).0;
                let last = self.geo.split_host(end - 1).0;
                let now: Vec<u64> = (first..=last)
                    .filter(|&rti| self.reftable.get(rti as usize).copied().unwrap_or(0) == 0)
                    .collect();
                if now.len() == missing.len() {
                    break end;
                }
                missing = now;
            };
            let last_rti = self.geo.split_host(end - 1).0;
            if last_rti.max(needed_rti) < entries {
                break (n, missing, end);
            }
            entries = (last_rti.max(needed_rti) + 1).next_multiple_of(per_cluster);
            if entries * 8 > MAX_REFCOUNT_TABLE_BYTES {
                return Err(too_large());
            }
        };
        tracing::debug!(path = %self.path.display(), old_clusters = self.header.refcount_table_clusters,
            new_clusters = n, new_blocks = missing.len(), "growing the refcount table");

        let mut table = self.reftable.clone();
        table.resize(entries as usize, 0);
        let order = self.geo.refcount_order;
        let per_block = self.geo.refblock_entries();
        // 1. New refcount blocks, each counting the clusters of the new area it covers.
        for (i, &rti) in missing.iter().enumerate() {
            let block_off = start + (n + i as u64) * cs;
            let mut block = vec![0u8; cs as usize];
            for c in (start / cs)..(end / cs) {
                if c / per_block == rti {
                    set_refcount(&mut block, c % per_block, order, 1);
                }
            }
            self.pwrite(&block, block_off, "writing a refcount block")?;
            self.refblock_cache.insert(block_off, block);
            table[rti as usize] = block_off;
        }
        self.file_len = self.file_len.max(end);
        // 2. Area clusters covered by existing blocks.
        for c in (start / cs)..(end / cs) {
            let rti = c / per_block;
            if !missing.contains(&rti) {
                self.write_refcount(c * cs, 1)?;
            }
        }
        // 3. The new table.
        self.pwrite(&encode_table(&table), start, "writing the refcount table")?;
        self.barrier()?;
        // 4. Switch the header (refcount_table_offset and _clusters are adjacent: one write).
        let old_offset = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&start.to_be_bytes());
        fields[8..].copy_from_slice(&(n as u32).to_be_bytes());
        self.pwrite(&fields, 48, "writing the header")?;
        self.barrier()?;
        self.header.refcount_table_offset = start;
        self.header.refcount_table_clusters = n as u32;
        self.reftable = table;
        self.next_free = Some(end);
        self.stats.metadata_clusters_allocated += n + missing.len() as u64;
        // 5. Free the old table (a crash before this only leaks it).
        for i in 0..old_clusters {
            self.write_refcount(old_offset + i * cs, 0)?;
        }
        Ok(())
    }
}
