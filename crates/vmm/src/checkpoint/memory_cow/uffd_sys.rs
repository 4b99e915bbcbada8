//! A minimal userfaultfd binding: write-protect mode (live checkpoints) and missing-page mode
//! (the restore page service).
//!
//! The `userfaultfd` crate generates its bindings with bindgen (libclang at build time) and does
//! not know `UFFD_FEATURE_WP_UNPOPULATED`, which this code needs: without it, a page that was
//! never touched before the checkpoint cannot be write-protected, and the guest's first write to
//! it would go unseen. The kernel ABI below is from `include/uapi/linux/userfaultfd.h`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

const UFFD_API: u64 = 0xaa;
const PAGE: usize = 4096;
const UFFDIO: u32 = 0xaa;
/// `uffd_msg.arg.pagefault.flags`: the fault is a write-protect fault.
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// Write-protect faults are reported with the WP flag.
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// Write protection also applies to pages that were never populated (none PTEs), so even a
/// never-touched page faults on its first write. Linux 6.4 and later.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Pages of this process can be moved into registered memory (`UFFDIO_MOVE`). Linux 6.8 and
/// later.
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;
/// `UFFDIO_REGISTER_MODE_MISSING`: report faults on pages that are not mapped at all.
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffdio_copy { __u64 dst; __u64 src; __u64 len; __u64 mode; __s64 copy; }`: the
/// kernel writes into `copy` the bytes copied, or a negated errno. Mode 0 wakes the threads
/// waiting on the range once the pages are in (`UFFDIO_COPY_MODE_DONTWAKE` would not).
#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_move { __u64 dst; __u64 src; __u64 len; __u64 mode; __s64 move; }`: the
/// kernel writes into `moved` the bytes moved, or a negated errno. Mode 0 wakes the waiters.
#[repr(C)]
#[derive(Default)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    moved: i64,
}

/// `struct uffdio_zeropage { struct uffdio_range range; __u64 mode; __s64 zeropage; }`: maps the
/// shared zero page over the range; `zeropage` is the bytes done or a negated errno.
#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (32 bytes, packed); only the page-fault arm is read.
#[repr(C, packed)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    feat: u64,
}

ioctl_iowr_nr!(UFFDIO_API_IOCTL, UFFDIO, 0x3f, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
ioctl_iowr_nr!(UFFDIO_MOVE, UFFDIO, 0x05, UffdioMove);
ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, UFFDIO, 0x06, UffdioWriteprotect);

/// A userfaultfd file descriptor, non-blocking.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

/// A write-protect fault: the host address that was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WpFault {
    /// The faulting address (page aligned by the kernel unless EXACT_ADDRESS was asked for).
    pub address: u64,
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Opens a userfaultfd that reports write-protect faults, requiring `features`.
    pub fn new(features: u64) -> io::Result<Uffd> {
        // SAFETY: the userfaultfd syscall takes only flags and returns a new fd or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `uffdio_api`, which `api` is.
        check(unsafe { ioctl_with_mut_ref(&fd, UFFDIO_API_IOCTL(), &mut api) })?;
        Ok(Uffd { fd })
    }

    /// Registers `[start, start + len)` for write-protect tracking.
    pub fn register_wp(&self, start: usize, len: usize) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register`; the kernel validates
        // that the range is mapped memory of this process.
        check(unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_REGISTER(), &mut reg) })
    }

    /// Registers `[start, start + len)` for missing-page faults: every first touch of a page
    /// (by a vCPU through KVM, by the VMM, or by the kernel on its behalf) waits until a page is
    /// installed with [`copy`](Self::copy) or [`zero`](Self::zero).
    pub fn register_missing(&self, start: usize, len: usize) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register`; the kernel validates
        // that the range is mapped memory of this process.
        check(unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_REGISTER(), &mut reg) })
    }

    /// Installs `src` at `dst` (page aligned, a whole number of pages) and wakes the threads
    /// waiting on that range. Pages already present are skipped: the kernel stops a copy at the
    /// first one with `EEXIST`, reporting the bytes copied before it, and the copy resumes after
    /// it. Returns the bytes this call installed.
    pub fn copy(&self, dst: usize, src: &[u8]) -> io::Result<u64> {
        let mut done = 0usize;
        let mut installed = 0u64;
        while done < src.len() {
            let mut op = UffdioCopy {
                dst: (dst + done) as u64,
                src: src[done..].as_ptr() as u64,
                len: (src.len() - done) as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads `len` bytes from `src`, which `src[done..]` holds, and
            // writes them only into registered, missing pages of this process.
            let rc = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_COPY(), &mut op) };
            let copied = usize::try_from(op.copy.max(0)).unwrap_or(0);
            done += copied;
            installed += copied as u64;
            if rc < 0 {
                done += skip_after_failure()?;
            }
        }
        Ok(installed)
    }

    /// Moves the pages mapped at `[src, src + len)` of this process to the registered, missing
    /// range at `dst` and wakes the threads waiting there: page-table entries change hands, the
    /// bytes stay where they are, and a transparent huge page at 2 MiB-aligned addresses moves
    /// whole. Returns the bytes moved, which may stop short of `len` (a page already present
    /// at `dst`, a page the kernel will not move): the rest stays at `src`.
    pub fn move_pages(&self, dst: usize, src: usize, len: usize) -> u64 {
        let mut op = UffdioMove {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode: 0,
            moved: 0,
        };
        // SAFETY: UFFDIO_MOVE reads and writes one `uffdio_move`; it only remaps pages of this
        // process from `src`, which the caller owns and reads no more, into registered,
        // missing pages at `dst`.
        unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_MOVE(), &mut op) };
        u64::try_from(op.moved.max(0)).unwrap_or(0)
    }

    /// Maps the zero page over `[start, start + len)` and wakes the waiting threads; pages
    /// already present are skipped as in [`copy`](Self::copy).
    pub fn zero(&self, start: usize, len: usize) -> io::Result<()> {
        let mut done = 0usize;
        while done < len {
            let mut op = UffdioZeropage {
                range: UffdioRange {
                    start: (start + done) as u64,
                    len: (len - done) as u64,
                },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE reads and writes one `uffdio_zeropage`; it only maps the
            // zero page into registered, missing pages.
            let rc = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_ZEROPAGE(), &mut op) };
            done += usize::try_from(op.zeropage.max(0)).unwrap_or(0);
            if rc < 0 {
                done += skip_after_failure()?;
            }
        }
        Ok(())
    }

    /// Unregisters a range registered before.
    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        let range = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_UNREGISTER reads one `uffdio_range`.
        check(unsafe { ioctl_with_ref(&self.fd, UFFDIO_UNREGISTER(), &range) })
    }

    /// Write-protects (`protect`) or unprotects a range. Unprotecting wakes the threads blocked
    /// on a fault in it.
    pub fn write_protect(&self, start: usize, len: usize, protect: bool) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads and writes one `uffdio_writeprotect`; protection
        // changes never touch page contents.
        check(unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_WRITEPROTECT(), &mut wp) })
    }

    /// Wakes threads blocked on faults in a range that is already writable.
    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let range = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_WAKE reads one `uffdio_range`.
        check(unsafe { ioctl_with_ref(&self.fd, UFFDIO_WAKE(), &range) })
    }

    /// Reads the pending write-protect faults into `out` (non-blocking; empty when none).
    pub fn read_faults(&self, out: &mut Vec<WpFault>) -> io::Result<()> {
        self.read_messages(|flags, address| {
            if flags & UFFD_PAGEFAULT_FLAG_WP != 0 {
                out.push(WpFault { address });
            }
        })
    }

    /// Reads the addresses of pending missing-page faults into `out` (non-blocking).
    pub fn read_missing(&self, out: &mut Vec<u64>) -> io::Result<()> {
        self.read_messages(|flags, address| {
            if flags & UFFD_PAGEFAULT_FLAG_WP == 0 {
                out.push(address);
            }
        })
    }

    /// Reads pending page-fault messages, calling `each(flags, address)`.
    fn read_messages(&self, mut each: impl FnMut(u64, u64)) -> io::Result<()> {
        let mut msgs = [UffdMsg::default(); 32];
        let size = std::mem::size_of_val(&msgs);
        // SAFETY: reads at most `size` bytes into `msgs`, a plain array of packed PODs.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), msgs.as_mut_ptr().cast(), size) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(()),
                _ => Err(err),
            };
        }
        let count = n as usize / std::mem::size_of::<UffdMsg>();
        for msg in &msgs[..count] {
            let (event, flags, address) = (msg.event, msg.flags, msg.address);
            if event == UFFD_EVENT_PAGEFAULT {
                each(flags, address);
            }
        }
        Ok(())
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// After a failed `UFFDIO_COPY` or `UFFDIO_ZEROPAGE`: how far to skip before trying again, or
/// the error.
fn skip_after_failure() -> io::Result<usize> {
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // Present already (installed before, or a racing copy): skip that page.
        Some(libc::EEXIST) => Ok(PAGE),
        // The mm is changing (e.g. a fork): retry.
        Some(libc::EAGAIN) => Ok(0),
        _ => Err(err),
    }
}
