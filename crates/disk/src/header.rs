//! The qcow2 file header: parsing with validation, and serialization.
//!
//! Layout (big endian, see QEMU's docs/interop/qcow2.txt): a fixed header of 72 bytes (v2) or
//! `header_length` >= 104 bytes (v3), then header extensions (type, length, data padded to 8),
//! closed by an extension of type 0, then the backing file name, all inside the first cluster.
//! This module does no I/O: it works on the bytes of the first cluster, so every check can be
//! unit tested and a refused image is never touched.

/// "QFI\xfb".
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Header extension: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;

/// Incompatible feature: refcounts may be inconsistent (lazy refcounts in use).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: metadata is known to be corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external data file.
pub const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
/// Incompatible feature: compressed clusters use a non-zlib compression type.
pub const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
/// Incompatible feature: extended (subcluster) L2 entries.
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = (1 << 5) - 1;

/// Smallest and largest cluster_bits accepted (512 B .. 2 MiB, QEMU's limits).
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;

/// Size of the fixed v2 header and of the mandatory part of the v3 header.
const V2_HEADER_LEN: usize = 72;
const V3_HEADER_LEN: usize = 104;
/// QEMU writes a 112-byte v3 header (104 + compression_type + padding); so do we.
const V3_DEFAULT_HEADER_LEN: u32 = 112;
/// Longest backing file name allowed by the format.
pub const MAX_BACKING_NAME: usize = 1023;
/// Refuse tables larger than this when opening (bounds memory use on hostile images).
const MAX_L1_BYTES: u64 = 32 << 20;
pub(crate) const MAX_REFCOUNT_TABLE_BYTES: u64 = 64 << 20;

/// Why a qcow2 header is refused. Each problem has its own variant so callers and tests can
/// tell them apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("file too short for a qcow2 header ({0} bytes)")]
    TooShort(u64),
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported qcow2 version {0}")]
    Version(u32),
    #[error("cluster_bits {0} outside 9..=21")]
    ClusterBits(u32),
    #[error("unknown incompatible feature bits {0:#x}")]
    IncompatibleFeatures(u64),
    #[error("external data files are unsupported")]
    ExternalDataFile,
    #[error("extended L2 entries are unsupported")]
    ExtendedL2,
    #[error("encrypted images are unsupported (crypt_method {0})")]
    Encrypted(u32),
    #[error("invalid refcount_order {0}")]
    RefcountOrder(u32),
    #[error("invalid header_length {0}")]
    HeaderLength(u32),
    #[error("{0} is not cluster aligned")]
    Misaligned(&'static str),
    #[error("{0} lies beyond the end of the file")]
    BeyondEof(&'static str),
    #[error("{0} overlaps the header")]
    OverlapsHeader(&'static str),
    #[error("{0} is too large")]
    TooLarge(&'static str),
    #[error("L1 table has {l1_size} entries but the disk size needs {needed}")]
    L1TooSmall { l1_size: u64, needed: u64 },
    #[error("invalid backing file name")]
    BackingName,
    #[error("malformed header extension {0:#x}")]
    Extension(u32),
    #[error("header, extensions and backing name do not fit in the first cluster")]
    DoesNotFit,
}

/// A parsed qcow2 header, including the pieces we must preserve when rewriting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file: Option<String>,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    /// v3 header_length (72 for v2).
    pub header_length: u32,
    /// Raw bytes of the optional v3 fields `[104, header_length)`, kept verbatim.
    pub extra_fields: Vec<u8>,
    /// The backing format extension (0xE2792ACA), if present.
    pub backing_format: Option<String>,
    /// Every other header extension, kept verbatim and in order.
    pub extensions: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Reads the cluster_bits field, so a caller knows how much of the file to hand to
/// [`Header::parse`]. Needs the first 24 bytes.
pub fn peek_cluster_bits(first: &[u8]) -> Result<u32, HeaderError> {
    if first.len() < 24 {
        return Err(HeaderError::TooShort(first.len() as u64));
    }
    if first[..4] != QCOW2_MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let bits = be32(first, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        return Err(HeaderError::ClusterBits(bits));
    }
    Ok(bits)
}

/// Number of L1 entries needed to map `size` bytes with `cluster_bits` clusters.
pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
    // One L2 table maps (cluster_size / 8) clusters.
    let l2_span_bits = cluster_bits + (cluster_bits - 3);
    size.div_ceil(1u64 << l2_span_bits)
}

impl Header {
    /// A fresh v3 header for a new image (tables filled in by the caller).
    pub fn new_v3(cluster_bits: u32, size: u64) -> Header {
        Header {
            version: 3,
            backing_file: None,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_DEFAULT_HEADER_LEN,
            extra_fields: vec![0; (V3_DEFAULT_HEADER_LEN as usize) - V3_HEADER_LEN],
            backing_format: None,
            extensions: Vec::new(),
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Parses and validates a header. `buf` holds the start of the file: at least the whole
    /// first cluster, or the whole file if it is shorter. `file_len` is the file's length.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header, HeaderError> {
        if buf.len() < V2_HEADER_LEN {
            return Err(HeaderError::TooShort(file_len));
        }
        if buf[..4] != QCOW2_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(HeaderError::Version(version));
        }
        let cluster_bits = peek_cluster_bits(buf)?;
        let cs = 1u64 << cluster_bits;
        // The header area is the first cluster (or what exists of it).
        let area = &buf[..buf.len().min(cs as usize)];

        let backing_file_offset = be64(buf, 8);
        let backing_file_size = be32(buf, 16);
        let mut h = Header {
            version,
            backing_file: None,
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            extra_fields: Vec::new(),
            backing_format: None,
            extensions: Vec::new(),
        };
        if version >= 3 {
            if area.len() < V3_HEADER_LEN {
                return Err(HeaderError::TooShort(file_len));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            let hl = h.header_length as usize;
            if hl < V3_HEADER_LEN || hl % 8 != 0 || hl > area.len() {
                return Err(HeaderError::HeaderLength(h.header_length));
            }
            h.extra_fields = area[V3_HEADER_LEN..hl].to_vec();
        }
        h.validate_fields(file_len)?;
        h.parse_extensions(area)?;
        if backing_file_offset != 0 {
            let len = backing_file_size as usize;
            let start =
                usize::try_from(backing_file_offset).map_err(|_| HeaderError::BackingName)?;
            if len == 0 || len > MAX_BACKING_NAME || start.saturating_add(len) > area.len() {
                return Err(HeaderError::BackingName);
            }
            let name = std::str::from_utf8(&area[start..start + len])
                .map_err(|_| HeaderError::BackingName)?;
            if name.contains('\0') {
                return Err(HeaderError::BackingName);
            }
            h.backing_file = Some(name.to_owned());
        }
        Ok(h)
    }

    fn validate_fields(&self, file_len: u64) -> Result<(), HeaderError> {
        let cs = self.cluster_size();
        let unknown = self.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(HeaderError::IncompatibleFeatures(unknown));
        }
        if self.incompatible_features & INCOMPAT_EXTERNAL_DATA != 0 {
            return Err(HeaderError::ExternalDataFile);
        }
        if self.incompatible_features & INCOMPAT_EXTENDED_L2 != 0 {
            return Err(HeaderError::ExtendedL2);
        }
        if self.crypt_method != 0 {
            return Err(HeaderError::Encrypted(self.crypt_method));
        }
        if self.refcount_order > 6 {
            return Err(HeaderError::RefcountOrder(self.refcount_order));
        }
        if self.size > (1u64 << 61) {
            return Err(HeaderError::TooLarge("disk size"));
        }
        // L1 table.
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(HeaderError::TooLarge("L1 table"));
        }
        let needed = l1_entries_for(self.size, self.cluster_bits);
        if u64::from(self.l1_size) < needed {
            return Err(HeaderError::L1TooSmall {
                l1_size: u64::from(self.l1_size),
                needed,
            });
        }
        if self.l1_table_offset % cs != 0 {
            return Err(HeaderError::Misaligned("L1 table"));
        }
        if self.l1_size > 0 {
            if self.l1_table_offset == 0 {
                return Err(HeaderError::OverlapsHeader("L1 table"));
            }
            if self.l1_table_offset.saturating_add(l1_bytes) > file_len {
                return Err(HeaderError::BeyondEof("L1 table"));
            }
        }
        // Refcount table.
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(HeaderError::TooLarge("refcount table"));
        }
        if self.refcount_table_offset % cs != 0 {
            return Err(HeaderError::Misaligned("refcount table"));
        }
        if self.refcount_table_offset == 0 {
            return Err(HeaderError::OverlapsHeader("refcount table"));
        }
        if self.refcount_table_clusters == 0 {
            return Err(HeaderError::TooLarge("refcount table (empty)"));
        }
        if self.refcount_table_offset.saturating_add(rt_bytes) > file_len {
            return Err(HeaderError::BeyondEof("refcount table"));
        }
        if self.nb_snapshots > 0 && self.snapshots_offset % cs != 0 {
            return Err(HeaderError::Misaligned("snapshot table"));
        }
        Ok(())
    }

    fn parse_extensions(&mut self, area: &[u8]) -> Result<(), HeaderError> {
        let mut at = self.header_length as usize;
        loop {
            if at + 8 > area.len() {
                // No end marker before the end of the cluster: treat as the end (QEMU does).
                return Ok(());
            }
            let ty = be32(area, at);
            let len = be32(area, at + 4) as usize;
            if ty == EXT_END {
                return Ok(());
            }
            let data_start = at + 8;
            let data_end = data_start
                .checked_add(len)
                .filter(|&e| e <= area.len())
                .ok_or(HeaderError::Extension(ty))?;
            let data = &area[data_start..data_end];
            if ty == EXT_BACKING_FORMAT {
                let s = std::str::from_utf8(data).map_err(|_| HeaderError::Extension(ty))?;
                self.backing_format = Some(s.trim_end_matches('\0').to_owned());
            } else {
                self.extensions.push((ty, data.to_vec()));
            }
            at = data_start + len.next_multiple_of(8);
        }
    }

    /// Serializes header, extensions and backing name into the bytes of the header area
    /// (starting at file offset 0). Fails if they do not fit in the first cluster.
    pub fn to_bytes(&self) -> Result<Vec<u8>, HeaderError> {
        let fixed_len = if self.version >= 3 {
            self.header_length as usize
        } else {
            V2_HEADER_LEN
        };
        let mut b = vec![0u8; fixed_len];
        b[..4].copy_from_slice(&QCOW2_MAGIC);
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        // backing_file_offset/size filled in below.
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b[72..80].copy_from_slice(&self.incompatible_features.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible_features.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear_features.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&self.header_length.to_be_bytes());
            let extra = &mut b[V3_HEADER_LEN..];
            let n = extra.len().min(self.extra_fields.len());
            extra[..n].copy_from_slice(&self.extra_fields[..n]);
        }
        let push_ext = |b: &mut Vec<u8>, ty: u32, data: &[u8]| {
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().next_multiple_of(8), 0);
        };
        if let Some(fmt) = &self.backing_format {
            push_ext(&mut b, EXT_BACKING_FORMAT, fmt.as_bytes());
        }
        for (ty, data) in &self.extensions {
            push_ext(&mut b, *ty, data);
        }
        push_ext(&mut b, EXT_END, &[]);
        if let Some(name) = &self.backing_file {
            if name.is_empty() || name.len() > MAX_BACKING_NAME {
                return Err(HeaderError::BackingName);
            }
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(HeaderError::DoesNotFit);
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let mut h = Header::new_v3(16, 1 << 30);
        h.l1_size = l1_entries_for(h.size, 16) as u32;
        h.refcount_table_offset = 0x10000;
        h.refcount_table_clusters = 1;
        h.l1_table_offset = 0x30000;
        h
    }

    #[test]
    fn round_trip_without_backing() {
        let h = sample();
        let bytes = h.to_bytes().unwrap();
        assert_eq!(bytes.len(), 112 + 8);
        let parsed = Header::parse(&bytes, 0x40000).unwrap();
        assert_eq!(parsed, h);
    }

    #[test]
    fn round_trip_with_backing_and_unknown_extension() {
        let mut h = sample();
        h.backing_file = Some("../base.img".into());
        h.backing_format = Some("raw".into());
        h.extensions.push((0x1234_5678, vec![1, 2, 3]));
        h.autoclear_features = 0;
        let bytes = h.to_bytes().unwrap();
        let parsed = Header::parse(&bytes, 0x40000).unwrap();
        // Unknown extension data comes back padded to the original length only.
        assert_eq!(parsed.extensions, vec![(0x1234_5678, vec![1, 2, 3])]);
        assert_eq!(parsed, h);
        // Backing name sits after the extension area.
        assert_eq!(be64(&bytes, 8) as usize + 11, bytes.len());
        assert_eq!(be32(&bytes, 16), 11);
    }

    #[test]
    fn l1_sizing() {
        // 64 KiB clusters: one L2 table maps 8192 * 64 KiB = 512 MiB.
        assert_eq!(l1_entries_for(0, 16), 0);
        assert_eq!(l1_entries_for(1, 16), 1);
        assert_eq!(l1_entries_for(512 << 20, 16), 1);
        assert_eq!(l1_entries_for((512 << 20) + 1, 16), 2);
        // 512 B clusters: one L2 table maps 64 * 512 = 32 KiB.
        assert_eq!(l1_entries_for(1 << 20, 9), 32);
    }

    fn parse_mutated(f: impl FnOnce(&mut Vec<u8>)) -> Result<Header, HeaderError> {
        let mut bytes = sample().to_bytes().unwrap();
        bytes.resize(0x10000, 0);
        f(&mut bytes);
        Header::parse(&bytes, 0x40000)
    }

    #[test]
    fn refusals_are_distinct() {
        assert_eq!(parse_mutated(|b| b[0] = b'X'), Err(HeaderError::BadMagic));
        assert_eq!(
            parse_mutated(|b| b[4..8].copy_from_slice(&4u32.to_be_bytes())),
            Err(HeaderError::Version(4))
        );
        assert_eq!(
            parse_mutated(|b| b[20..24].copy_from_slice(&22u32.to_be_bytes())),
            Err(HeaderError::ClusterBits(22))
        );
        assert_eq!(
            parse_mutated(|b| b[20..24].copy_from_slice(&8u32.to_be_bytes())),
            Err(HeaderError::ClusterBits(8))
        );
        assert_eq!(
            parse_mutated(|b| b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes())),
            Err(HeaderError::IncompatibleFeatures(1 << 40))
        );
        assert_eq!(
            parse_mutated(|b| b[72..80].copy_from_slice(&INCOMPAT_EXTENDED_L2.to_be_bytes())),
            Err(HeaderError::ExtendedL2)
        );
        assert_eq!(
            parse_mutated(|b| b[72..80].copy_from_slice(&INCOMPAT_EXTERNAL_DATA.to_be_bytes())),
            Err(HeaderError::ExternalDataFile)
        );
        assert_eq!(
            parse_mutated(|b| b[32..36].copy_from_slice(&2u32.to_be_bytes())),
            Err(HeaderError::Encrypted(2))
        );
        assert_eq!(
            parse_mutated(|b| b[40..48].copy_from_slice(&0x1000_0000u64.to_be_bytes())),
            Err(HeaderError::BeyondEof("L1 table"))
        );
        assert_eq!(
            parse_mutated(|b| b[40..48].copy_from_slice(&0x30001u64.to_be_bytes())),
            Err(HeaderError::Misaligned("L1 table"))
        );
        assert_eq!(
            parse_mutated(|b| b[48..56].copy_from_slice(&0x1000_0000u64.to_be_bytes())),
            Err(HeaderError::BeyondEof("refcount table"))
        );
        assert_eq!(
            parse_mutated(|b| b[36..40].copy_from_slice(&1u32.to_be_bytes())),
            Err(HeaderError::L1TooSmall {
                l1_size: 1,
                needed: 2
            })
        );
        assert_eq!(
            parse_mutated(|b| b[96..100].copy_from_slice(&7u32.to_be_bytes())),
            Err(HeaderError::RefcountOrder(7))
        );
        assert_eq!(
            parse_mutated(|b| b[100..104].copy_from_slice(&105u32.to_be_bytes())),
            Err(HeaderError::HeaderLength(105))
        );
        assert_eq!(
            parse_mutated(|b| {
                b[8..16].copy_from_slice(&0xfff0u64.to_be_bytes());
                b[16..20].copy_from_slice(&100u32.to_be_bytes());
            }),
            Err(HeaderError::BackingName)
        );
        assert_eq!(
            Header::parse(&[0u8; 40], 40),
            Err(HeaderError::TooShort(40))
        );
    }

    #[test]
    fn backing_name_that_does_not_fit_is_refused() {
        let mut h = Header::new_v3(9, 1 << 20);
        h.backing_file = Some("x".repeat(600));
        assert_eq!(h.to_bytes(), Err(HeaderError::DoesNotFit));
        h.backing_file = Some("x".repeat(1024));
        assert_eq!(h.to_bytes(), Err(HeaderError::BackingName));
    }
}
