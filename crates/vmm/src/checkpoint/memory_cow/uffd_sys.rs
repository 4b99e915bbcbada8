//! A minimal userfaultfd binding: write-protect mode only.
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
const UFFDIO: u32 = 0xaa;
/// `uffd_msg.arg.pagefault.flags`: the fault is a write-protect fault.
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// Write-protect faults are reported with the WP flag.
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// Write protection also applies to pages that were never populated (none PTEs), so even a
/// never-touched page faults on its first write. Linux 6.4 and later.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
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
ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, UFFDIO, 0x06, UffdioWriteprotect);

/// A userfaultfd file descriptor, non-blocking, set up for write-protect faults.
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
            if event == UFFD_EVENT_PAGEFAULT && flags & UFFD_PAGEFAULT_FLAG_WP != 0 {
                out.push(WpFault { address });
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
