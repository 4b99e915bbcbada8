//! Guest physical memory: private anonymous mappings laid out around the 32-bit MMIO hole.
//!
//! Memory is `MAP_PRIVATE | MAP_ANONYMOUS` on purpose: the `fork` checkpoint strategy relies on
//! the kernel's copy-on-write of private pages to freeze the child's view of guest memory.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Start of the 32-bit MMIO hole: RAM above this address is relocated above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// Guest page size used for memory accounting and checkpoints.
pub const PAGE_SIZE: u64 = 4096;
/// Smallest guest memory we accept: room for the boot structures and a small guest.
pub const MIN_MEM_SIZE: u64 = 16 << 20;
/// Largest guest memory we accept (bounded by the guest physical address width we expose).
pub const MAX_MEM_SIZE: u64 = 1 << 40;

/// Errors of guest memory setup.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The size string is not a number with an optional K/M/G/T suffix.
    #[error("invalid memory size {0:?}: expected a number with an optional K, M, G or T suffix")]
    BadSize(String),
    /// The size is outside the accepted range or not page aligned.
    #[error("memory size {size} bytes is out of range: it must be a multiple of 4 KiB between {min} and {max} bytes")]
    SizeOutOfRange {
        /// Requested size.
        size: u64,
        /// Smallest accepted size.
        min: u64,
        /// Largest accepted size.
        max: u64,
    },
    /// mmap of guest memory failed.
    #[error("cannot map {size} bytes of guest memory")]
    Map {
        /// Requested size.
        size: u64,
        /// Cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// madvise(MADV_HUGEPAGE or MADV_NOHUGEPAGE) failed.
    #[error("cannot change the transparent huge page policy of guest memory")]
    HugePages(#[source] std::io::Error),
}

/// A memory size given on the command line, such as `512M` or `2G`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSize(pub u64);

impl FromStr for MemSize {
    type Err = MemoryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || MemoryError::BadSize(s.to_string());
        let t = s.trim();
        let (digits, shift) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let shift = match c.to_ascii_uppercase() {
                    'K' => 10,
                    'M' => 20,
                    'G' => 30,
                    'T' => 40,
                    _ => return Err(bad()),
                };
                (&t[..i], shift)
            }
            _ => (t, 0),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        n.checked_mul(1u64 << shift).map(MemSize).ok_or_else(bad)
    }
}

impl fmt::Display for MemSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if n >= 1 << shift && n % (1 << shift) == 0 {
                return write!(f, "{}{}", n >> shift, suffix);
            }
        }
        write!(f, "{n}")
    }
}

/// Whether guest memory asks the host for transparent huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HugePages {
    /// Plain 4 KiB pages (the host may still use THP if it is set to `always`).
    #[default]
    None,
    /// `madvise(MADV_HUGEPAGE)` on all guest memory.
    Thp,
}

/// The guest-physical ranges that hold RAM for a VM of `size` bytes.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (
                GuestAddress(MMIO_HOLE_END),
                (size - MMIO_HOLE_START) as usize,
            ),
        ]
    }
}

/// Checks that `size` is a usable guest memory size.
pub fn validate_size(size: u64) -> Result<(), MemoryError> {
    if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&size) || size % PAGE_SIZE != 0 {
        return Err(MemoryError::SizeOutOfRange {
            size,
            min: MIN_MEM_SIZE,
            max: MAX_MEM_SIZE,
        });
    }
    Ok(())
}

/// Maps guest memory of `size` bytes as private anonymous memory.
pub fn create_guest_memory(size: u64, huge: HugePages) -> Result<GuestMemoryMmap, MemoryError> {
    validate_size(size)?;
    let mem = GuestMemoryMmap::from_ranges(&ram_ranges(size))
        .map_err(|source| MemoryError::Map { size, source })?;
    if huge == HugePages::Thp {
        set_huge_pages(&mem, libc::MADV_HUGEPAGE)?;
    }
    Ok(mem)
}

/// The span of a transparent huge page (host addresses, aligned): the kernel maps a whole span
/// at the first write into it when it has a huge page to give, and khugepaged may later fill in
/// a span that has some pages present. Either makes pages present that nothing wrote.
pub(crate) const HUGE_SPAN: u64 = 2 << 20;

/// Stops transparent huge pages in `mem` from now on: no span is mapped whole or filled in any
/// more, so a page that is not present stays so until it is written (huge pages mapped already
/// stay).
pub(crate) fn stop_huge_pages(mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    set_huge_pages(mem, libc::MADV_NOHUGEPAGE)
}

/// Applies the huge page `advice` (`MADV_HUGEPAGE` or `MADV_NOHUGEPAGE`) to all of `mem`.
fn set_huge_pages(mem: &GuestMemoryMmap, advice: libc::c_int) -> Result<(), MemoryError> {
    for region in mem.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .expect("offset 0 lies in every region");
        // SAFETY: the range is exactly one mapping owned by `mem`; the huge page advice only
        // changes the kernel's page size policy for it and never its contents.
        let rc = unsafe { libc::madvise(host.cast(), region.len() as usize, advice) };
        if rc != 0 {
            return Err(MemoryError::HugePages(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// One RAM region as the checkpoint code sees it: where it is in the guest, in this process, and
/// in the memory image (the concatenation of all regions, page i at byte i * 4096).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Host virtual address of the first byte (a mapping owned by the VM's `GuestMemoryMmap`).
    pub host: usize,
    /// Length in bytes (a multiple of the page size).
    pub len: u64,
    /// Offset of the first byte in the memory image.
    pub image_offset: u64,
}

impl RamRegion {
    /// First image page of the region.
    pub fn first_page(&self) -> u64 {
        self.image_offset / PAGE_SIZE
    }

    /// Number of pages in the region.
    pub fn pages(&self) -> u64 {
        self.len / PAGE_SIZE
    }

    /// Host address of image page `page`, which must lie in this region.
    pub fn host_of_page(&self, page: u64) -> usize {
        self.host + ((page - self.first_page()) * PAGE_SIZE) as usize
    }

    /// The image page at host address `addr`, if it lies in this region.
    pub fn page_of_host(&self, addr: usize) -> Option<u64> {
        let off = addr.checked_sub(self.host)? as u64;
        (off < self.len).then(|| self.first_page() + off / PAGE_SIZE)
    }
}

/// The RAM regions of `mem` in image order.
pub fn ram_regions(mem: &GuestMemoryMmap) -> Vec<RamRegion> {
    let mut image_offset = 0;
    mem.iter()
        .map(|r| {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("offset 0 lies in every region") as usize;
            let region = RamRegion {
                gpa: r.start_addr().raw_value(),
                host,
                len: r.len(),
                image_offset,
            };
            image_offset += r.len();
            region
        })
        .collect()
}

/// Whether each of `count` pages from host address `host` is populated (mapped, or swapped
/// out), read from this process's page map (`map`: `/proc/self/pagemap`). A page of private
/// anonymous memory that is not populated reads as zero.
pub(crate) fn populated(
    map: &std::fs::File,
    host: usize,
    count: u64,
) -> std::io::Result<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let mut entries = vec![0u8; (count * 8) as usize];
    map.read_exact_at(&mut entries, host as u64 / PAGE_SIZE * 8)?;
    Ok(entries
        .chunks_exact(8)
        .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")) & (PRESENT | SWAPPED) != 0)
        .collect())
}

/// Total RAM bytes of `mem`.
pub fn ram_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!("512M".parse::<MemSize>().unwrap().0, 512 << 20);
        assert_eq!("2G".parse::<MemSize>().unwrap().0, 2 << 30);
        assert_eq!("2g".parse::<MemSize>().unwrap().0, 2 << 30);
        assert_eq!("4096".parse::<MemSize>().unwrap().0, 4096);
        assert_eq!("64K".parse::<MemSize>().unwrap().0, 64 << 10);
        for bad in [
            "",
            "M",
            "12Q",
            "-1G",
            "1.5G",
            "99999999999999999999T",
            "1 G",
        ] {
            assert!(bad.parse::<MemSize>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(MemSize(2 << 30).to_string(), "2G");
        assert_eq!(MemSize(4097).to_string(), "4097");
    }

    #[test]
    fn validates_sizes() {
        assert!(validate_size(256 << 20).is_ok());
        assert!(validate_size(1 << 20).is_err());
        assert!(validate_size((256 << 20) + 1).is_err());
        assert!(validate_size(2 << 40).is_err());
    }

    #[test]
    fn splits_ram_around_the_mmio_hole() {
        assert_eq!(ram_ranges(1 << 30), vec![(GuestAddress(0), 1 << 30)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(r[1], (GuestAddress(1 << 32), (1 << 30) as usize));
    }

    #[test]
    fn maps_private_memory() {
        let mem = create_guest_memory(64 << 20, HugePages::Thp).unwrap();
        assert_eq!(ram_size(&mem), 64 << 20);
        assert_eq!(mem.last_addr().unchecked_add(1).raw_value(), 64 << 20);
    }
}
