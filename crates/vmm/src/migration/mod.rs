//! Live migration over TCP (design.md §8): the VM moves to a `cowvm receive` process, on this
//! host or another, with a pause of about a millisecond.
//!
//! The source ([`send`]) connects, says what VM it is (memory size, vCPUs), and waits until the
//! destination has its memory and KVM VM ready. Then, by [`MigrationMode`]:
//! - **pre-copy** rounds send memory while the guest runs; KVM's dirty log (and the devices'
//!   own writes) say which pages were written since the previous round;
//! - **the pause** (~1 ms): vCPUs parked, disks frozen and switched to new COW files (so no
//!   layer is ever written by both hosts), device and vCPU state saved. It sends the switchover:
//!   the state, the disks (their frozen layers, which the destination puts its own COW files
//!   over) and the pages the destination still lacks. In `precopy` mode those pages are sent
//!   first, so it lacks none;
//! - the destination ([`receive`]) builds the VM and says it is ready; the source answers
//!   `Go` (from then on it never runs the guest again) and the destination starts the vCPUs;
//! - **post-copy**: pages still lacking are served by the destination's page service, which
//!   fetches the block of each first touch and prefetches the rest over the same connection;
//!   the source answers until the destination says every page is in place, then ends.
//!
//! Disks are on shared storage by default: the destination opens the frozen layers the source
//! names, if they lie in a directory it trusts. With [`MigrateOptions::copy_disks`] every layer
//! travels over the connection instead, most of it while the guest runs ([`disks`] says how).
//! The connection is plain TCP, or TLS with a pre-shared certificate ([`transport`]): the
//! destination presents its certificate, the source trusts only that one.
//!
//! Failures: before `Go` the source resumes as if nothing happened (the destination removes
//! what it made). After it, the destination owns the VM: if the source dies while pages are
//! still lacking, the destination cannot continue and stops with a message naming the source.

mod disks;
mod peer_pages;
mod receive;
mod send;
mod transport;
mod wire;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub(crate) use self::receive::receive;
pub use self::receive::ReceiveOptions;
pub(crate) use self::send::{migrate, SendContext};
pub use self::transport::{TlsError, TlsServer};
pub use self::wire::{Kind as FrameKind, WireError};
use crate::builder::VmError;
use crate::checkpoint::CheckpointError;
use crate::error::ErrorKind;
use crate::exit::VmExit;
use crate::memory::MemoryError;
use crate::page_service::PageServiceError;

/// How memory moves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationMode {
    /// Rounds of pages while the guest runs, the rest in the pause: the destination has every
    /// page when it starts, and the source can die at any time after `Go`.
    Precopy,
    /// Only device state in the pause: the destination starts at once and fetches memory from
    /// the source on first touch and in the background.
    Postcopy,
    /// A few pre-copy rounds, then post-copy for what is left.
    #[default]
    Hybrid,
}

impl FromStr for MigrationMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "precopy" => Ok(MigrationMode::Precopy),
            "postcopy" => Ok(MigrationMode::Postcopy),
            "hybrid" => Ok(MigrationMode::Hybrid),
            other => Err(format!(
                "unknown migration mode {other:?} (precopy, postcopy or hybrid)"
            )),
        }
    }
}

impl fmt::Display for MigrationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrationMode::Precopy => "precopy",
            MigrationMode::Postcopy => "postcopy",
            MigrationMode::Hybrid => "hybrid",
        })
    }
}

/// What `Vm::migrate` is asked to do.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The destination, `tcp://HOST:PORT`.
    pub to: String,
    /// How memory moves.
    pub mode: MigrationMode,
    /// Pre-copy stops once what is left could be sent in this time (`precopy`), once rounds
    /// stop shrinking (the guest writes about as fast as the stream sends), or after
    /// [`Self::max_rounds`].
    pub max_downtime: Duration,
    /// The most pre-copy rounds (after the first full pass) before the pause.
    pub max_rounds: u32,
    /// Send every layer of each disk's chain to the destination, which runs the VM on its own
    /// copy (no shared storage needed).
    pub copy_disks: bool,
    /// Connect with TLS, trusting only the certificates in this PEM file (the destination's
    /// certificate, or the CA that signed it). Plain TCP without it.
    pub tls_ca: Option<PathBuf>,
    /// The name the destination's certificate must carry (default: the host of [`Self::to`]).
    pub tls_server_name: Option<String>,
}

impl MigrateOptions {
    /// The defaults of `mode`: up to 30 rounds for `precopy`, 2 for `hybrid`; a 50 ms target.
    pub fn new(to: impl Into<String>, mode: MigrationMode) -> MigrateOptions {
        MigrateOptions {
            to: to.into(),
            mode,
            max_downtime: Duration::from_millis(50),
            max_rounds: match mode {
                MigrationMode::Precopy => 30,
                MigrationMode::Postcopy => 0,
                MigrationMode::Hybrid => 2,
            },
            copy_disks: false,
            tls_ca: None,
            tls_server_name: None,
        }
    }
}

/// What a migration did, as the source saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// The mode used.
    pub mode: MigrationMode,
    /// The destination.
    pub to: String,
    /// From the source's pause until the destination's vCPUs ran: the source's time until the
    /// destination's `Ready` arrived plus the destination's time from sending it until they
    /// ran (no clock is shared; the trip of `Ready` counts twice, so it errs long).
    pub downtime_us: u64,
    /// The source's pause until it sent the switchover (vCPUs parked, state saved).
    pub pause_us: u64,
    /// From the request until the destination owned every page.
    pub total_us: u64,
    /// Bytes of the migration stream written to the connection (before TLS encryption).
    pub bytes_sent: u64,
    /// Pre-copy rounds, the first full pass included.
    pub precopy_rounds: u32,
    /// Pages sent while the guest ran on the source.
    pub pages_precopied: u64,
    /// Pages sent in the pause (`precopy`).
    pub pages_in_pause: u64,
    /// Pages the destination lacked when it started (served post-copy).
    pub pages_postcopy: u64,
    /// With copied disks: bytes of disk layers sent while the guest ran on the source.
    #[serde(default)]
    pub disk_bytes_precopied: u64,
    /// With copied disks: bytes of disk layers sent in the pause (what the guest wrote during
    /// the pre-copy).
    #[serde(default)]
    pub disk_bytes_in_pause: u64,
}

/// Errors of a migration, on either side.
#[derive(Debug, Error)]
pub enum MigrationError {
    /// The destination address is not `tcp://HOST:PORT`.
    #[error("invalid migration address {0:?}: expected tcp://HOST:PORT")]
    Address(String),
    /// The destination cannot be reached.
    #[error("cannot connect to {to}")]
    Connect {
        /// The destination.
        to: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint or another migration of this VM is in progress.
    #[error("a checkpoint or migration of this VM is in progress")]
    Busy,
    /// The VM has ended.
    #[error("the VM has already ended: {0}")]
    Exited(VmExit),
    /// TLS: its certificates and settings, or the handshake.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The stream failed or carried something invalid.
    #[error("migration stream")]
    Wire(#[from] WireError),
    /// The destination refused the VM.
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    /// The source could not capture the VM (pause, state, disks).
    #[error("cannot capture the VM")]
    Capture(#[from] CheckpointError),
    /// The migration failed before the destination took over: the source runs on.
    #[error("migration to {to} failed; the VM runs on here")]
    Resumed {
        /// The destination.
        to: String,
        /// Cause.
        #[source]
        source: Box<MigrationError>,
    },
    /// The connection failed after the destination was told to run the VM: it may be running
    /// it, so the source stays stopped.
    #[error(
        "the connection to {to} failed after the destination was told to run the VM; this VM \
         stays stopped so that it never runs twice"
    )]
    HandedOver {
        /// The destination.
        to: String,
        /// Cause.
        #[source]
        source: Box<MigrationError>,
    },
    /// The incoming VM cannot run here.
    #[error("the incoming VM cannot run here: {0}")]
    Config(String),
    /// A disk the source names lies outside every directory this receiver trusts.
    #[error(
        "disk {index}: {path} lies outside every directory this receiver trusts; trust its \
         directory explicitly (--allow-dir) to use it"
    )]
    UntrustedDisk {
        /// Device index.
        index: usize,
        /// The disk as the source names it.
        path: std::path::PathBuf,
    },
    /// The source copies its disks and this receiver has nowhere to write them.
    #[error(
        "the source copies its disks and this receiver has no directory to write them in; \
         give it one (--disk-dir)"
    )]
    NoDiskDir,
    /// A layer of a disk cannot be read on the source.
    #[error("cannot read disk {index}'s layer {path}")]
    DiskRead {
        /// Device index.
        index: usize,
        /// The layer.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The copy of a disk layer cannot be written on the destination.
    #[error("cannot write the disk copy {path}")]
    DiskWrite {
        /// The copy (or the directory made for the copies).
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A copied qcow2 layer cannot be made to name the copy of its parent.
    #[error("cannot point the disk copy {path} at the copy of its parent")]
    DiskCopy {
        /// The copy.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: disk::Error,
    },
    /// The switchover names a disk of which no layer arrived.
    #[error("no layer of disk {0} arrived")]
    DiskMissing(usize),
    /// A disk's chain changed between the copy of its lower layers and the pause.
    #[error("disk {0}'s chain changed while its layers were being copied")]
    DiskChanged(usize),
    /// The disks' COW files cannot be made.
    #[error("cannot set up the disks")]
    Disks(#[source] crate::checkpoint::restore::RestoreError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Building the VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The page service of the destination.
    #[error("cannot start the page service")]
    PageService(#[from] PageServiceError),
    /// Guest memory cannot be read or written.
    #[error("guest memory access failed: {0}")]
    GuestMemory(String),
    /// Pre-copy needs KVM's dirty log.
    #[error("pre-copy needs KVM's dirty log")]
    DirtyLog(#[from] crate::checkpoint::dirty::DirtyLogRefusal),
    /// The VM's state does not encode or decode.
    #[error("the VM's device and vCPU state")]
    State(#[source] ckpt_format::Error),
    /// The source died or the connection broke while the destination still lacked pages.
    #[error("the migration source went away before all memory arrived")]
    SourceLost,
}

impl MigrationError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            MigrationError::Address(_) => ErrorKind::InvalidInput,
            MigrationError::Busy => ErrorKind::Conflict,
            MigrationError::Exited(_) => ErrorKind::VmExited,
            MigrationError::Resumed { source, .. } => source.kind(),
            MigrationError::Config(_)
            | MigrationError::UntrustedDisk { .. }
            | MigrationError::NoDiskDir => ErrorKind::InvalidInput,
            MigrationError::Capture(e) => e.kind(),
            MigrationError::Tls(e) => e.kind(),
            _ => ErrorKind::Internal,
        }
    }
}
