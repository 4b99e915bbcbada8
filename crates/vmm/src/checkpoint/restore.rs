//! Restoring a checkpoint into a new VM (design.md §5): verify before use, serve memory lazily
//! (or read it eagerly), load vCPU, VM and device state, and run.
//!
//! Guest memory is always private anonymous memory, never a mapping of the checkpoint's files,
//! so nothing written to them after the restore began reaches the guest. By default it is
//! filled on demand by the [page service](crate::page_service): the VM runs within milliseconds
//! whatever its size, every page is verified against the page index before the guest can see
//! it, zero pages are never read from the store, and a prefetcher makes all of memory resident
//! at store speed. `--eager` restores read and verify every page before the first guest
//! instruction. Clones map one verified, sealed image of the memory copy-on-write.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ckpt_format::{Checkpoint, DiskFormat, PageState, PAGE_SIZE};
use disk::Format;
use thiserror::Error;
use tracing::{debug, info, info_span};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::disk_cow::overlay_path;
use super::StoreSpec;
use crate::builder::{
    self, Console, Machine, MachineState, Parts, Start, VmError, VmSummary, MAX_VCPUS,
};
use crate::devices::virtio::block::DiskConfig;
use crate::error::ErrorKind;
use crate::exit::ExitNotifier;
use crate::kvm::state::restore_vm;
use crate::kvm::KvmVm;
use crate::memory::{self, HugePages, MemoryError};
use crate::page_service::{
    CheckpointBlocks, PageService, PageServiceError, PageServiceStats, ServiceSpec, SharedImage,
    SharedImageError,
};

/// Errors of restoring a checkpoint. Nothing is started when one is returned.
#[derive(Debug, Error)]
pub enum RestoreError {
    /// The checkpoint is missing, incomplete, truncated, corrupt or of a newer format.
    #[error("cannot restore checkpoint {store}")]
    Open {
        /// The store.
        store: String,
        /// What is wrong with it.
        #[source]
        source: ckpt_format::Error,
    },
    /// The checkpoint asks for a VM this host or this VMM cannot provide.
    #[error("checkpoint {store} cannot be restored here: {reason}")]
    Config {
        /// The store.
        store: String,
        /// Why.
        reason: String,
    },
    /// The state section does not decode.
    #[error("checkpoint state section does not decode")]
    State(#[source] ckpt_format::Error),
    /// A memory page does not match its hash (eager restore).
    #[error("checkpoint memory is corrupt")]
    Memory(#[source] ckpt_format::Error),
    /// Writing guest memory failed (eager restore).
    #[error("cannot write guest memory")]
    Map(#[source] std::io::Error),
    /// The page service cannot start.
    #[error("cannot start the page service")]
    PageService(#[from] PageServiceError),
    /// The shared image of clones cannot be made or mapped.
    #[error(transparent)]
    Shared(#[from] SharedImageError),
    /// Guest memory.
    #[error(transparent)]
    GuestMemory(#[from] MemoryError),
    /// Building the VM from the saved state.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A disk's fresh COW file over the checkpoint's disk cannot be made.
    #[error("disk {index}: cannot create a COW file over the checkpoint's disk {path}")]
    DiskOverlay {
        /// Device index.
        index: usize,
        /// The checkpoint's disk.
        path: PathBuf,
        /// Cause.
        #[source]
        source: disk::Error,
    },
    /// A checkpoint disk the manifest names lies outside every trusted directory.
    #[error(
        "disk {index}: {path} lies outside the checkpoint's directory and every directory named \
         at restore time; trust its directory explicitly (--allow-dir) to use it"
    )]
    UntrustedDisk {
        /// Device index.
        index: usize,
        /// The disk as the manifest names it.
        path: PathBuf,
    },
    /// A checkpoint disk the manifest names cannot be resolved.
    #[error("disk {index}: cannot resolve the checkpoint's disk {path}")]
    DiskPath {
        /// Device index.
        index: usize,
        /// The disk as the manifest names it.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl RestoreError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RestoreError::Open { .. }
            | RestoreError::Config { .. }
            | RestoreError::State(_)
            | RestoreError::Memory(_)
            | RestoreError::UntrustedDisk { .. }
            | RestoreError::DiskPath { .. } => ErrorKind::InvalidInput,
            RestoreError::Vm(e) => e.kind(),
            _ => ErrorKind::Internal,
        }
    }
}

/// How a restored VM got its memory, for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Memory served on demand by the page service (else read eagerly).
    pub lazy: bool,
    /// From the start of the restore until the vCPUs started.
    pub first_instruction_us: u64,
    /// What the page service did (zero after an eager restore).
    pub pages: PageServiceStats,
}

/// What a VM keeps of its restore: the page service, while it may still be serving memory.
#[derive(Debug)]
pub(crate) struct RestoreRecord {
    first_instruction_us: u64,
    service: Option<Arc<PageService>>,
}

impl RestoreRecord {
    pub(crate) fn new(first_instruction_us: u64, service: Option<Arc<PageService>>) -> Self {
        RestoreRecord {
            first_instruction_us,
            service,
        }
    }

    pub(crate) fn stats(&self) -> RestoreStats {
        RestoreStats {
            lazy: self.service.is_some(),
            first_instruction_us: self.first_instruction_us,
            pages: self.service.as_ref().map(|s| s.stats()).unwrap_or_default(),
        }
    }

    /// The page service, if memory is served lazily.
    pub(crate) fn page_service(&self) -> Option<&PageService> {
        self.service.as_deref()
    }
}

/// Where a restored VM's memory comes from.
pub(crate) enum MemoryMode<'a> {
    /// Served on first touch by the page service.
    Lazy,
    /// Read and verified before the first instruction.
    Eager,
    /// A private mapping of a verified, sealed image shared with other clones.
    Shared(&'a SharedImage),
    /// Served on first touch, in the memory and KVM VM of a standby (taken from it only once
    /// the checkpoint proves to fit).
    Standby(&'a mut Standby),
}

/// The parts of a VM that do not depend on the checkpoint it will run: guest memory
/// (anonymous, empty), the KVM VM with that memory registered, and its vCPUs.
struct Prepared {
    memory: GuestMemoryMmap,
    vm: KvmVm,
    made: builder::NewVcpus,
}

/// A VM made before the checkpoint it will run is known: memory, the KVM VM and the vCPUs of
/// a given shape. Creating a KVM VM and registering its memory takes milliseconds per GiB on
/// some hosts, the larger part of a restore's path to the first instruction; a standby pays it
/// in advance, so that its restore only loads state and starts the vCPUs.
/// Memory is served lazily, as by a default restore.
pub struct Standby {
    mem_size: u64,
    vcpus: u8,
    prepared: Option<Prepared>,
}

impl Standby {
    /// Makes a standby VM of `mem_size` bytes and `vcpus` vCPUs.
    pub fn new(mem_size: u64, vcpus: u8) -> Result<Standby, VmError> {
        if !(1..=MAX_VCPUS).contains(&vcpus) {
            return Err(VmError::VcpuCount(vcpus));
        }
        let memory = memory::create_guest_memory(mem_size, HugePages::Thp)?;
        let vm = KvmVm::new(&memory)?;
        let made = builder::create_vcpus(&vm, vcpus)?;
        Ok(Standby {
            mem_size,
            vcpus,
            prepared: Some(Prepared { memory, vm, made }),
        })
    }

    /// Guest memory, in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// vCPUs.
    pub fn vcpus(&self) -> u8 {
        self.vcpus
    }

    /// Whether a restore has used it (it makes one VM only).
    pub fn is_used(&self) -> bool {
        self.prepared.is_none()
    }

    /// Restores the checkpoint in `store` on this standby: see [`crate::Vm::restore_standby`].
    pub(crate) fn restore(
        &mut self,
        store: &StoreSpec,
        options: RestoreOptions,
    ) -> Result<(Machine, RestoreRecord), RestoreError> {
        if options.eager {
            return Err(RestoreError::Config {
                store: store.describe(),
                reason: "a standby VM serves memory on first touch; an eager restore makes its \
                         own VM"
                    .into(),
            });
        }
        restore(store, options, MemoryMode::Standby(self))
    }
}

/// How to restore.
#[derive(Debug)]
pub struct RestoreOptions {
    /// Where the restored VM's console goes.
    pub console: Console,
    /// Read and verify all memory before running, into anonymous memory.
    pub eager: bool,
    /// Where the disks' fresh COW files go (default: next to each checkpoint disk).
    pub disk_dir: Option<PathBuf>,
    /// Directories trusted to hold the checkpoint's disks (and their backing files) besides
    /// the checkpoint's own directory and `disk_dir`. A disk the manifest names anywhere else
    /// is refused.
    pub allow_dirs: Vec<PathBuf>,
}

/// Reads and verifies all of memory into fresh anonymous memory, which asks the host for
/// transparent huge pages: the guest then runs on 2 MiB mappings from its first instruction,
/// where 4 KiB ones would cost it a KVM fault per page as it first touches them (on the
/// development host, its first pass over 1 GiB took 0.9 s instead of 0.15 s). Runs of zero pages
/// are left untouched: fresh memory is zero.
fn eager_memory(ckpt: &Checkpoint, mem_size: u64) -> Result<GuestMemoryMmap, RestoreError> {
    const CHUNK_PAGES: u64 = 256;
    let mem = memory::create_guest_memory(mem_size, HugePages::Thp)?;
    let index = ckpt.page_index().map_err(RestoreError::Memory)?;
    let mut buf = vec![0u8; (CHUNK_PAGES as usize) * PAGE_SIZE];
    let mut image_offset = 0u64;
    for (gpa, len) in memory::ram_ranges(mem_size) {
        let mut done = 0u64;
        while done < len as u64 {
            let n = CHUNK_PAGES.min((len as u64 - done) / PAGE_SIZE as u64);
            let bytes = &mut buf[..(n as usize) * PAGE_SIZE];
            let first = (image_offset + done) / PAGE_SIZE as u64;
            let zero = |p: u64| index.entry(p).is_some_and(|e| e.state == PageState::Zero);
            if (first..first + n).all(zero) {
                done += n * PAGE_SIZE as u64;
                continue;
            }
            ckpt.read_pages(first, bytes)
                .map_err(RestoreError::Memory)?;
            for (i, page) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
                ckpt.verify_page(first + i as u64, page)
                    .map_err(RestoreError::Memory)?;
            }
            mem.write_slice(bytes, GuestAddress(gpa.0 + done))
                .map_err(|_| RestoreError::Map(std::io::Error::other("guest memory write")))?;
            done += n * PAGE_SIZE as u64;
        }
        image_offset += len as u64;
    }
    Ok(mem)
}

/// Checks the parts of the configuration this host must provide.
fn check_config(ckpt: &Checkpoint, store: &str) -> Result<(u64, u8), RestoreError> {
    let config = &ckpt.manifest().vm;
    let bad = |reason: String| RestoreError::Config {
        store: store.to_string(),
        reason,
    };
    memory::validate_size(config.mem_size).map_err(|e| bad(e.to_string()))?;
    if config.mem_size != ckpt.manifest().memory.mem_size {
        return Err(bad(format!(
            "the VM configuration says {} bytes of memory but the image holds {}",
            config.mem_size,
            ckpt.manifest().memory.mem_size
        )));
    }
    let vcpus = u8::try_from(config.vcpus)
        .ok()
        .filter(|v| (1..=MAX_VCPUS).contains(v))
        .ok_or_else(|| {
            bad(format!(
                "{} vCPUs (1 to {MAX_VCPUS} supported)",
                config.vcpus
            ))
        })?;
    Ok((config.mem_size, vcpus))
}

/// Gives each checkpoint disk a fresh COW file, so the checkpoint stays immutable; the
/// devices are rebuilt on them from their saved state, and their in-flight requests are
/// re-submitted when the device thread starts.
pub(crate) fn disk_overlays(
    disks: &[ckpt_format::DiskConfig],
    state: &MachineState,
    disk_dir: Option<&Path>,
    trusted: &[PathBuf],
) -> Result<Vec<DiskConfig>, RestoreError> {
    let saved = &state.devices.blocks;
    if disks.len() != saved.len() {
        return Err(RestoreError::Config {
            store: "checkpoint".into(),
            reason: format!(
                "{} disks in the configuration but {} disk states",
                disks.len(),
                saved.len()
            ),
        });
    }
    let tag = format!(
        "restore-{}-{}",
        std::process::id(),
        RESTORES.fetch_add(1, Ordering::Relaxed)
    );
    disks
        .iter()
        .zip(saved)
        .enumerate()
        .map(|(index, (d, state))| {
            let mut overlay = overlay_path(&d.path, &tag);
            if let Some(dir) = disk_dir {
                overlay = dir.join(overlay.file_name().expect("overlay paths have a file name"));
            }
            let format = match d.format {
                DiskFormat::Qcow2 => Format::Qcow2,
                DiskFormat::Raw => Format::Raw,
            };
            let config = DiskConfig {
                path: overlay,
                readonly: d.readonly,
                delay_ms: state.disk.delay_ms,
                allow_dirs: trusted.to_vec(),
            };
            disk::create_qcow2(
                &config.path,
                &disk::CreateOptions {
                    backing: Some((&d.path, format)),
                    backing_policy: config.backing_policy(),
                    ..disk::CreateOptions::default()
                },
            )
            .map_err(|source| RestoreError::DiskOverlay {
                index,
                path: d.path.clone(),
                source,
            })?;
            Ok(config)
        })
        .collect()
}

/// The directories a checkpoint's disks may lie in (M7): the checkpoint's own directory,
/// `disk_dir` and the directories the caller names, each resolved. A manifest is not an
/// authenticator (anyone can edit it and recompute its checksum), so every disk it names is
/// checked against them before anything is created.
fn trusted_dirs(
    ckpt: &Checkpoint,
    store: &StoreSpec,
    options: &RestoreOptions,
) -> Result<Vec<PathBuf>, RestoreError> {
    let own = match store {
        StoreSpec::Dir(dir) => Some(dir.as_path()),
        StoreSpec::Raw(_) | StoreSpec::Mem(_) | StoreSpec::S3(_) => None,
    };
    let mut trusted: Vec<PathBuf> = own
        .into_iter()
        .chain(options.disk_dir.as_deref())
        .chain(options.allow_dirs.iter().map(PathBuf::as_path))
        .filter_map(|dir| std::fs::canonicalize(dir).ok())
        .collect();
    trusted.dedup();
    for (index, d) in ckpt.manifest().vm.disks.iter().enumerate() {
        let real = std::fs::canonicalize(&d.path).map_err(|source| RestoreError::DiskPath {
            index,
            path: d.path.clone(),
            source,
        })?;
        if !trusted.iter().any(|dir| real.starts_with(dir)) {
            return Err(RestoreError::UntrustedDisk {
                index,
                path: d.path.clone(),
            });
        }
    }
    Ok(trusted)
}

/// Takes the parts of `standby` for a checkpoint of `shape` (memory, vCPUs) and loads the
/// checkpoint's VM-wide state into its KVM VM. A checkpoint of another shape, or whose page
/// index is bad, leaves the standby as it was.
fn on_standby(
    standby: &mut Standby,
    ckpt: &Checkpoint,
    shape: (u64, u8),
    name: &str,
    state: &MachineState,
) -> Result<(GuestMemoryMmap, KvmVm, builder::NewVcpus), RestoreError> {
    let bad = |reason: String| RestoreError::Config {
        store: name.to_string(),
        reason,
    };
    if standby.is_used() {
        return Err(bad("the standby VM has already been used".into()));
    }
    let have = (standby.mem_size, standby.vcpus);
    if have != shape {
        return Err(bad(format!(
            "the standby VM has {} bytes of memory and {} vCPUs, the checkpoint {} and {}",
            have.0, have.1, shape.0, shape.1
        )));
    }
    if !ckpt.has_index_segments() {
        ckpt.page_index().map_err(|source| RestoreError::Open {
            store: name.to_string(),
            source,
        })?;
    }
    let prepared = standby.prepared.take().expect("checked above");
    restore_vm(&prepared.vm.fd, &state.vm).map_err(|e| RestoreError::Vm(e.into()))?;
    Ok((prepared.memory, prepared.vm, prepared.made))
}

/// Distinguishes the COW files of several restores in one process (clones).
static RESTORES: AtomicU64 = AtomicU64::new(0);

/// Loads and verifies the memory of the checkpoint in `store` once, for clones.
pub(crate) fn load_shared_image(store: &StoreSpec) -> Result<SharedImage, RestoreError> {
    let ckpt = Checkpoint::open(store.store().as_ref()).map_err(|source| RestoreError::Open {
        store: store.describe(),
        source,
    })?;
    Ok(SharedImage::load(&ckpt)?)
}

/// Creates the VM while another thread reads and verifies the page index.
fn create_vm_reading_index(
    ckpt: &Checkpoint,
    memory: &GuestMemoryMmap,
    state: &MachineState,
    open_err: impl Fn(ckpt_format::Error) -> RestoreError,
) -> Result<KvmVm, RestoreError> {
    std::thread::scope(|s| {
        let index = s.spawn(|| ckpt.page_index().map(|_| ()));
        let vm = builder::create_vm(memory, Some(state));
        index
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            .map_err(open_err)?;
        vm.map_err(|e| RestoreError::Vm(e.into()))
    })
}

/// Restores the checkpoint in `store` into a new running machine, with its memory from `mode`.
pub(crate) fn restore(
    store: &StoreSpec,
    options: RestoreOptions,
    mode: MemoryMode<'_>,
) -> Result<(Machine, RestoreRecord), RestoreError> {
    let started = Instant::now();
    let name = store.describe();
    let span = info_span!("restore", store = %name, eager = options.eager);
    let _enter = span.enter();
    let open_err = |source| RestoreError::Open {
        store: name.clone(),
        source,
    };
    // What the path to the first instruction costs, phase by phase (RUST_LOG=debug).
    let phase = |done: &'static str| debug!(done, us = started.elapsed().as_micros() as u64);
    let ckpt = Checkpoint::open_deferred(store.store().as_ref()).map_err(open_err)?;
    phase("open");
    let (mem_size, vcpus) = check_config(&ckpt, &name)?;
    let trusted = trusted_dirs(&ckpt, store, &options)?;
    let state: MachineState = ckpt.decode_state().map_err(RestoreError::State)?;
    if state.vcpus.len() != usize::from(vcpus) {
        return Err(RestoreError::Config {
            store: name,
            reason: format!("{} vCPU states for {vcpus} vCPUs", state.vcpus.len()),
        });
    }

    phase("state");
    let lazy = matches!(mode, MemoryMode::Lazy | MemoryMode::Standby(_));
    let mut standby = None;
    let memory = match mode {
        MemoryMode::Eager => {
            ckpt.page_index().map_err(open_err)?;
            eager_memory(&ckpt, mem_size)?
        }
        MemoryMode::Lazy => memory::create_guest_memory(mem_size, HugePages::Thp)?,
        MemoryMode::Shared(image) if image.mem_size() == mem_size => image.map()?,
        MemoryMode::Shared(image) => {
            return Err(RestoreError::Config {
                store: name,
                reason: format!(
                    "the shared image holds {} bytes of memory, the checkpoint {mem_size}",
                    image.mem_size()
                ),
            })
        }
        MemoryMode::Standby(made_ahead) => {
            let (memory, vm, made) =
                on_standby(made_ahead, &ckpt, (mem_size, vcpus), &name, &state)?;
            standby = Some((vm, made));
            memory
        }
    };
    phase("memory");
    let (vm, made) = match standby {
        Some((vm, made)) => (vm, Some(made)),
        // A lazy restore of a checkpoint with checksums of its index's segments starts the
        // guest without the index: the page service verifies each block against its segments
        // until the prefetcher has read the whole index. Otherwise the index (9 bytes per page)
        // is read and verified while KVM registers the memory, and a bad index is refused
        // before the first guest instruction.
        None if lazy && ckpt.has_index_segments() => (
            builder::create_vm(&memory, Some(&state)).map_err(|e| RestoreError::Vm(e.into()))?,
            None,
        ),
        None => (
            create_vm_reading_index(&ckpt, &memory, &state, open_err)?,
            None,
        ),
    };
    phase("vm");
    let ckpt = Arc::new(ckpt);
    let exit = Arc::new(ExitNotifier::default());
    // Before anything touches guest memory: restoring the devices reads their queues.
    let service = if lazy {
        Some(Arc::new(PageService::start(ServiceSpec {
            regions: memory::ram_regions(&memory),
            source: Arc::new(CheckpointBlocks {
                checkpoint: ckpt.clone(),
                source: ckpt.clone(),
                store: name.clone(),
            }),
            role: "restored VM",
            hot_pages: ckpt.manifest().memory.hot_pages.clone(),
            exit: exit.clone(),
            reservoir: None,
        })?))
    } else {
        None
    };
    phase("page service");
    let disks = disk_overlays(
        &ckpt.manifest().vm.disks,
        &state,
        options.disk_dir.as_deref(),
        &trusted,
    )?;
    phase("disks");
    let config = &ckpt.manifest().vm;
    let parts = Parts {
        summary: VmSummary {
            mem_size,
            vcpus,
            kernel: config.kernel.clone(),
            cmdline: config.cmdline.clone(),
        },
        memory,
        vm,
        exit,
        console: options.console,
        disks: &disks,
        vcpus: made,
    };
    let machine = builder::assemble(parts, Start::Restore(&state))?;
    let first_instruction_us = started.elapsed().as_micros() as u64;
    // Once the vCPUs run: until then it would compete with their start.
    if let Some(service) = &service {
        service.prefetch()?;
    }
    info!(first_instruction_us, lazy, "VM restored");
    Ok((
        machine,
        RestoreRecord {
            first_instruction_us,
            service,
        },
    ))
}
