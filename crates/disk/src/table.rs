//! qcow2 table arithmetic: guest offset → (L1 index, L2 index), L1/L2 entry encoding, and
//! refcount block entries of any width (1..=64 bits). Pure functions, no I/O.

/// Bit 63 of L1/L2 entries: "refcount is exactly one" (QCOW_OFLAG_COPIED).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: compressed cluster.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 descriptor (v3): the cluster reads as zeros.
pub const OFLAG_ZERO: u64 = 1;
/// Bits 9..=55: host offset of an L2 table or a data cluster.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry (1..=8 and 56..=62) and bit 0.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;

/// Geometry of a qcow2 image: cluster size and the derived table shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub refcount_order: u32,
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per L2 table (one cluster of 8-byte entries).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Refcount entries per refcount block.
    pub fn refblock_entries(&self) -> u64 {
        self.cluster_size() * 8 / self.refcount_bits()
    }

    pub fn refcount_bits(&self) -> u64 {
        1 << self.refcount_order
    }

    pub fn max_refcount(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << self.refcount_bits()) - 1
        }
    }

    /// Guest offset → (L1 index, L2 index, offset within the cluster).
    pub fn split_guest(&self, guest: u64) -> (u64, u64, u64) {
        let cluster = guest >> self.cluster_bits;
        (
            cluster / self.l2_entries(),
            cluster % self.l2_entries(),
            guest & (self.cluster_size() - 1),
        )
    }

    /// Host offset → (refcount table index, index within the refcount block).
    pub fn split_host(&self, host: u64) -> (u64, u64) {
        let cluster = host >> self.cluster_bits;
        (
            cluster / self.refblock_entries(),
            cluster % self.refblock_entries(),
        )
    }

    pub fn align_down(&self, x: u64) -> u64 {
        x & !(self.cluster_size() - 1)
    }

    pub fn align_up(&self, x: u64) -> u64 {
        x.next_multiple_of(self.cluster_size())
    }

    pub fn is_aligned(&self, x: u64) -> bool {
        x & (self.cluster_size() - 1) == 0
    }
}

/// What an L2 entry says about a guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated here: read from the backing chain.
    Unallocated,
    /// Reads as zeros. `prealloc` is a host cluster still attached to the entry; `shared`
    /// says its refcount may be above one (then it must not be reused or dropped).
    Zero { prealloc: Option<u64>, shared: bool },
    /// Data at `host`; `copied` says its refcount is exactly one (safe to write in place).
    Data { host: u64, copied: bool },
    /// Compressed data (unsupported; never misread as data).
    Compressed,
}

impl L2Entry {
    /// Decodes a (non-extended) L2 entry. `version` decides whether the zero flag exists.
    pub fn decode(raw: u64, version: u32) -> L2Entry {
        if raw & OFLAG_COMPRESSED != 0 {
            return L2Entry::Compressed;
        }
        let host = raw & OFFSET_MASK;
        let copied = raw & OFLAG_COPIED != 0;
        if version >= 3 && raw & OFLAG_ZERO != 0 {
            return L2Entry::Zero {
                prealloc: (host != 0).then_some(host),
                shared: host != 0 && !copied,
            };
        }
        if host == 0 {
            L2Entry::Unallocated
        } else {
            L2Entry::Data { host, copied }
        }
    }

    /// Encodes an entry for a data cluster whose refcount is one.
    pub fn encode_data(host: u64) -> u64 {
        (host & OFFSET_MASK) | OFLAG_COPIED
    }
}

/// Decodes an L1 entry: the L2 table offset, or `None` if unallocated. Returns `Err` with a
/// description if reserved bits are set.
pub fn decode_l1(raw: u64) -> Result<Option<u64>, &'static str> {
    if raw & L1_RESERVED != 0 {
        return Err("reserved bits set in L1 entry");
    }
    let off = raw & OFFSET_MASK;
    Ok((off != 0).then_some(off))
}

/// Encodes an L1 entry for an L2 table whose refcount is one.
pub fn encode_l1(l2_offset: u64) -> u64 {
    (l2_offset & OFFSET_MASK) | OFLAG_COPIED
}

/// Where refcount entry `index` of a block lives: (byte offset in the block, byte length).
/// Entries narrower than a byte share it; the caller writes the whole byte.
pub fn refcount_entry_span(index: u64, order: u32) -> (u64, u64) {
    let bits = 1u64 << order;
    if bits >= 8 {
        (index * (bits / 8), bits / 8)
    } else {
        (index * bits / 8, 1)
    }
}

/// Reads refcount entry `index` from a refcount block.
pub fn get_refcount(block: &[u8], index: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    let (at, len) = refcount_entry_span(index, order);
    let at = at as usize;
    if bits >= 8 {
        block[at..at + len as usize]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    } else {
        // Sub-byte entries: entry 0 is the least significant bit(s) of byte 0.
        let shift = (index * bits) % 8;
        (u64::from(block[at]) >> shift) & ((1 << bits) - 1)
    }
}

/// Writes refcount entry `index` in a refcount block. `value` must fit the entry width.
pub fn set_refcount(block: &mut [u8], index: u64, order: u32, value: u64) {
    let bits = 1u64 << order;
    let (at, len) = refcount_entry_span(index, order);
    let at = at as usize;
    if bits >= 8 {
        let be = value.to_be_bytes();
        block[at..at + len as usize].copy_from_slice(&be[8 - len as usize..]);
    } else {
        let shift = (index * bits) % 8;
        let mask = (((1u64 << bits) - 1) << shift) as u8;
        block[at] = (block[at] & !mask) | (((value << shift) as u8) & mask);
    }
}

/// Decodes a big-endian table (L1, L2 or refcount table) from bytes.
pub fn decode_table(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

/// Encodes a table as big-endian bytes.
pub fn encode_table(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_split_64k() {
        let g = Geometry {
            cluster_bits: 16,
            refcount_order: 4,
        };
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.refblock_entries(), 32768);
        assert_eq!(g.split_guest(0), (0, 0, 0));
        assert_eq!(g.split_guest(65536 + 5), (0, 1, 5));
        assert_eq!(g.split_guest(512 << 20), (1, 0, 0));
        assert_eq!(g.split_guest((512 << 20) * 3 + 65536 * 7 + 9), (3, 7, 9));
        assert_eq!(g.split_host(65536 * 32768 + 65536), (1, 1));
    }

    #[test]
    fn guest_split_512() {
        let g = Geometry {
            cluster_bits: 9,
            refcount_order: 4,
        };
        assert_eq!(g.l2_entries(), 64);
        assert_eq!(g.refblock_entries(), 256);
        assert_eq!(g.split_guest(64 * 512 + 513), (1, 1, 1));
        assert_eq!(g.align_up(513), 1024);
        assert_eq!(g.align_down(1023), 512);
    }

    #[test]
    fn l2_entry_decoding() {
        assert_eq!(L2Entry::decode(0, 3), L2Entry::Unallocated);
        assert_eq!(
            L2Entry::decode(L2Entry::encode_data(0x50000), 3),
            L2Entry::Data {
                host: 0x50000,
                copied: true
            }
        );
        assert_eq!(
            L2Entry::decode(0x50000, 3),
            L2Entry::Data {
                host: 0x50000,
                copied: false
            }
        );
        assert_eq!(
            L2Entry::decode(1, 3),
            L2Entry::Zero {
                prealloc: None,
                shared: false
            }
        );
        assert_eq!(
            L2Entry::decode(OFLAG_COPIED | 0x70000 | 1, 3),
            L2Entry::Zero {
                prealloc: Some(0x70000),
                shared: false
            }
        );
        assert_eq!(
            L2Entry::decode(0x70000 | 1, 3),
            L2Entry::Zero {
                prealloc: Some(0x70000),
                shared: true
            }
        );
        assert_eq!(
            L2Entry::decode(OFLAG_COMPRESSED | 0x1234, 3),
            L2Entry::Compressed
        );
        // v2 has no zero flag: bit 0 is reserved and ignored here.
        assert_eq!(
            L2Entry::decode(0x50000 | 1, 2),
            L2Entry::Data {
                host: 0x50000,
                copied: false
            }
        );
    }

    #[test]
    fn l1_entry_decoding() {
        assert_eq!(decode_l1(0), Ok(None));
        assert_eq!(decode_l1(encode_l1(0x30000)), Ok(Some(0x30000)));
        assert!(decode_l1(0x30000 | 1).is_err());
        assert!(decode_l1(0x30000 | (1 << 60)).is_err());
    }

    #[test]
    fn refcount_entries_all_widths() {
        for order in 0..=6u32 {
            let g = Geometry {
                cluster_bits: 9,
                refcount_order: order,
            };
            let mut block = vec![0u8; 512];
            let n = g.refblock_entries();
            let max = g.max_refcount();
            for i in 0..n {
                let v = (i * 7 + 1) & max;
                set_refcount(&mut block, i, order, v);
            }
            for i in 0..n {
                assert_eq!(
                    get_refcount(&block, i, order),
                    (i * 7 + 1) & max,
                    "order {order}"
                );
            }
            set_refcount(&mut block, n - 1, order, max);
            assert_eq!(get_refcount(&block, n - 1, order), max);
            assert_eq!(get_refcount(&block, n - 2, order), ((n - 2) * 7 + 1) & max);
        }
        // 16-bit refcounts are big endian.
        let mut block = vec![0u8; 8];
        set_refcount(&mut block, 1, 4, 0x0102);
        assert_eq!(block[2..4], [1, 2]);
        // 1-bit refcounts: entry 0 is bit 0.
        let mut block = vec![0u8; 1];
        set_refcount(&mut block, 0, 0, 1);
        set_refcount(&mut block, 3, 0, 1);
        assert_eq!(block[0], 0b1001);
    }

    #[test]
    fn table_codec() {
        let t = vec![1u64, 0x8000_0000_0003_0000, u64::MAX];
        assert_eq!(decode_table(&encode_table(&t)), t);
    }
}
