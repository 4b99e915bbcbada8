//! Checksums: xxh3-64 for sections and pages, and the zero-page test.
//!
//! Why xxh3-64: it hashes at well over 10 GB/s per core with plain SSE2 (the default x86_64
//! target), so hashing every page on the write path never limits a checkpoint that runs at disk
//! speed; crc32c is slower without the SSE4.2 instruction and gives only 32 bits, too few to
//! tell pages apart in a multi-GiB image. It is not cryptographic: it detects corruption, not
//! tampering.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::PAGE_SIZE;

/// xxh3-64 of `bytes` (seed 0): the checksum of sections and the hash of pages.
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// The hash of an all-zero page, as recorded in the page index for zero pages.
pub fn zero_page_hash() -> u64 {
    static HASH: OnceLock<u64> = OnceLock::new();
    *HASH.get_or_init(|| checksum(&[0u8; PAGE_SIZE]))
}

/// Whether every byte of `buf` is zero.
///
/// ORs 64-byte blocks of native words (the compiler turns this into vector loads) and stops at
/// the first block that is not zero, so a data page usually costs only its first cache line.
pub fn page_is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(64);
    for block in &mut blocks {
        let mut acc = 0u64;
        for word in block.chunks_exact(8) {
            acc |= u64::from_ne_bytes(word.try_into().expect("chunks_exact(8) yields 8 bytes"));
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// A section checksum as it appears in the manifest: `"xxh3:0123456789abcdef"`.
///
/// A hex string rather than a JSON number because a u64 does not survive JavaScript-style JSON
/// tools (53-bit doubles), and the prefix names the algorithm should another one be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Checksum(pub u64);

impl Checksum {
    /// The checksum of `bytes`.
    pub fn of(bytes: &[u8]) -> Checksum {
        Checksum(checksum(bytes))
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "xxh3:{:016x}", self.0)
    }
}

impl FromStr for Checksum {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix("xxh3:")
            .ok_or_else(|| format!("unknown checksum algorithm in {s:?}"))?;
        if hex.len() != 16 {
            return Err(format!("checksum {s:?} is not 16 hex digits"));
        }
        u64::from_str_radix(hex, 16)
            .map(Checksum)
            .map_err(|e| format!("checksum {s:?}: {e}"))
    }
}

impl Serialize for Checksum {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Checksum {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut page = [0u8; PAGE_SIZE];
        assert!(page_is_zero(&page));
        for pos in [0, 7, 63, 64, 2000, PAGE_SIZE - 1] {
            page[pos] = 1;
            assert!(!page_is_zero(&page), "byte {pos}");
            page[pos] = 0;
        }
        assert!(page_is_zero(&[]));
        assert!(!page_is_zero(&[0, 0, 0, 1]));
    }

    #[test]
    fn checksum_text_round_trip() {
        let c = Checksum(0x0123_4567_89ab_cdef);
        assert_eq!(c.to_string(), "xxh3:0123456789abcdef");
        assert_eq!("xxh3:0123456789abcdef".parse::<Checksum>(), Ok(c));
        assert!("crc:0123456789abcdef".parse::<Checksum>().is_err());
        assert!("xxh3:0123".parse::<Checksum>().is_err());
    }

    #[test]
    fn zero_hash_is_hash_of_zero_page() {
        assert_eq!(zero_page_hash(), checksum(&vec![0u8; PAGE_SIZE]));
    }
}
