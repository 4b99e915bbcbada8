//! The API's request and response bodies. Requests refuse unknown fields, so a misspelt option
//! is an error instead of a silent default.

use ckpt_format::{CheckpointOptions, DiskPolicy, IoPolicy, Metrics, Strategy};
use serde::{Deserialize, Serialize};

pub use crate::control::{Counters as CheckpointCounters, PausedBy};

/// A request body: JSON whose top-level fields each expect one type.
pub trait RequestBody: serde::de::DeserializeOwned {
    /// Each field, and what it expects, for error messages ("a string (one of ...)").
    const FIELDS: &'static [(&'static str, &'static str)];
}

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// The vCPUs run.
    Running,
    /// The vCPUs are parked.
    Paused,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmPatch {
    /// The state wanted.
    pub state: VmState,
}

impl RequestBody for VmPatch {
    const FIELDS: &'static [(&'static str, &'static str)] =
        &[("state", "a string (one of Paused, Running)")];
}

/// `GET /vm`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    /// Running or paused.
    pub state: VmState,
    /// Who holds the pause, when paused.
    pub paused_by: Option<PausedBy>,
    /// What the VM was built from.
    pub config: VmConfigInfo,
    /// The checkpoint being taken, if any.
    pub checkpoint_in_progress: Option<String>,
    /// The checkpoint the VM was restored from (by `cowvm restore` or a rollback), if any.
    pub restored_from: Option<String>,
    /// Milliseconds since the VM started (since its restore, for a restored VM).
    pub uptime_ms: u64,
    /// How a restored VM got its memory.
    #[serde(default)]
    pub restore: Option<RestoreInfo>,
}

/// How a restored VM got its memory.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct RestoreInfo {
    /// Memory served on demand by the page service (else read before the first instruction).
    pub lazy: bool,
    /// From the start of the restore until the vCPUs ran.
    pub first_instruction_us: u64,
    /// Faults that fetched a block of memory.
    pub faults_served: u64,
    /// Bytes installed for faults.
    pub bytes_by_fault: u64,
    /// Bytes installed by the prefetcher.
    pub bytes_prefetched: u64,
    /// From the restore until all of memory was resident, once it is.
    pub resident_after_us: Option<u64>,
}

impl From<vmm::RestoreStats> for RestoreInfo {
    fn from(s: vmm::RestoreStats) -> RestoreInfo {
        RestoreInfo {
            lazy: s.lazy,
            first_instruction_us: s.first_instruction_us,
            faults_served: s.pages.faults_served,
            bytes_by_fault: s.pages.bytes_by_fault,
            bytes_prefetched: s.pages.bytes_prefetched,
            resident_after_us: s.pages.resident_after_us,
        }
    }
}

/// The VM's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmConfigInfo {
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Kernel image.
    pub kernel: Option<String>,
    /// Kernel command line.
    pub cmdline: Option<String>,
}

/// Memory COW mechanism of a checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyArg {
    /// userfaultfd write protection.
    #[default]
    Uffd,
    /// A forked child writes its frozen view.
    Fork,
    /// Stop-and-copy baseline.
    Stop,
}

/// Disk I/O in flight at the checkpoint instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum IoArg {
    /// Resume at once; in-flight requests are recorded.
    #[default]
    Live,
    /// Resume after pending requests complete.
    Drain,
}

/// What happens to the parent disk image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DiskArg {
    /// The parent becomes the checkpoint's disk.
    #[default]
    Keep,
    /// The parent is copied for the checkpoint and the overlay committed back.
    CopyCommit,
}

/// `PUT /checkpoints`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointBody {
    /// The store: an absolute directory path, `raw:` and the absolute path of a file or block
    /// device, `mem:NAME` for RAM inside the server's process, or `s3://BUCKET/PREFIX`.
    pub out: String,
    /// The endpoint URL of an `s3://` store (default: the server's environment,
    /// `AWS_ENDPOINT_URL`, else AWS S3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    /// Memory COW mechanism.
    #[serde(default)]
    pub strategy: StrategyArg,
    /// Disk I/O policy.
    #[serde(default)]
    pub io: IoArg,
    /// Disk retention.
    #[serde(default)]
    pub disk: DiskArg,
    /// Makes the checkpoint incremental: the store of a complete checkpoint of this VM taken by
    /// this process, whose pages the guest has not written since are not written again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

impl RequestBody for CheckpointBody {
    const FIELDS: &'static [(&'static str, &'static str)] = &[
        ("out", "a string (a directory, raw:PATH or mem:NAME)"),
        (
            "parent",
            "a string (a directory, raw:PATH or s3://BUCKET/PREFIX)",
        ),
        ("strategy", "a string (one of uffd, fork, stop)"),
        ("io", "a string (one of live, drain)"),
        ("disk", "a string (one of keep, copy-commit)"),
    ];
}

impl CheckpointBody {
    /// The options in the checkpoint format's terms.
    pub fn options(&self) -> CheckpointOptions {
        CheckpointOptions {
            strategy: match self.strategy {
                StrategyArg::Uffd => Strategy::Uffd,
                StrategyArg::Fork => Strategy::Fork,
                StrategyArg::Stop => Strategy::Stop,
            },
            io: match self.io {
                IoArg::Live => IoPolicy::Live,
                IoArg::Drain => IoPolicy::Drain,
            },
            disk: match self.disk {
                DiskArg::Keep => DiskPolicy::Keep,
                DiskArg::CopyCommit => DiskPolicy::CopyCommit,
            },
        }
    }
}

/// `PUT /rollback`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// The checkpoint: an absolute directory path, `raw:` and an absolute path, `mem:NAME`, or
    /// `s3://BUCKET/PREFIX`.
    pub from: String,
    /// The endpoint URL of an `s3://` store (default: the server's environment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    /// Read and verify all memory before the restored VM runs.
    #[serde(default)]
    pub eager: bool,
}

impl RequestBody for RollbackBody {
    const FIELDS: &'static [(&'static str, &'static str)] = &[
        ("from", "a string (a directory, raw:PATH or mem:NAME)"),
        ("eager", "a boolean"),
    ];
}

/// `PUT /migration`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateBody {
    /// The destination, `tcp://HOST:PORT` (a `cowvm receive --listen`).
    pub to: String,
    /// `precopy`, `postcopy` or `hybrid` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<vmm::MigrationMode>,
    /// Pre-copy stops once what is left could be sent in this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<u64>,
    /// Copy every layer of each disk's chain to the destination (no shared storage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_disks: Option<bool>,
    /// Connect with TLS, trusting only the certificates in this PEM file (an absolute path on
    /// the VM's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// The name the destination's certificate must carry (default: the host of `to`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
}

impl RequestBody for MigrateBody {
    const FIELDS: &'static [(&'static str, &'static str)] = &[
        ("to", "a string (tcp://HOST:PORT)"),
        ("mode", "precopy, postcopy or hybrid"),
        ("max_downtime_ms", "a number of milliseconds"),
        ("copy_disks", "true or false"),
        ("tls_ca", "a string (an absolute path to a PEM file)"),
        ("tls_server_name", "a string (a DNS name or an IP address)"),
    ];
}

/// `DELETE /checkpoints`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteBody {
    /// The checkpoint: an absolute directory path or `mem:NAME`.
    pub path: String,
}

impl RequestBody for DeleteBody {
    const FIELDS: &'static [(&'static str, &'static str)] =
        &[("path", "a string (a directory or mem:NAME)")];
}

/// A disk layer merged into the layer above it and deleted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MergedLayer {
    /// Index of the disk.
    pub disk: usize,
    /// The layer deleted.
    pub layer: String,
    /// The layer above it, which took over its clusters.
    pub into: String,
    /// Bytes copied into `into`.
    pub bytes: u64,
}

/// The answer to `DELETE /checkpoints`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointDeleted {
    /// The checkpoint deleted, as requested.
    pub path: String,
    /// Disk layers no retained checkpoint needed any more, merged away.
    pub merged: Vec<MergedLayer>,
}

/// The answer to `PUT /rollback`, once the restored VM runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackDone {
    /// The checkpoint, as requested.
    pub from: String,
    /// Whether memory was read eagerly.
    pub eager: bool,
    /// Microseconds spent restoring the checkpoint.
    pub restore_us: u64,
    /// Microseconds from the pause of the old VM until the restored one runs.
    pub downtime_us: u64,
}

/// `?wait=true`: answer when the operation is over instead of at once.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    /// Wait for completion.
    #[serde(default)]
    pub wait: bool,
}

/// Where a checkpoint job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Being taken.
    Running,
    /// Complete: the store holds it with its completion marker.
    Complete,
    /// Failed: the store holds no complete checkpoint.
    Failed,
}

/// The phase of a running checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobPhase {
    /// Not started.
    Pending,
    /// Opening the store, arming write protection.
    Preparing,
    /// The VM is paused.
    Paused,
    /// Writing memory while the VM runs.
    Writing,
    /// Over (complete or failed).
    Done,
}

/// Pages and bytes saved so far.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct JobProgress {
    /// Pages saved.
    pub pages_done: u64,
    /// Pages in all.
    pub pages_total: u64,
    /// Bytes of guest memory saved.
    pub bytes_done: u64,
    /// Bytes of guest memory in all.
    pub bytes_total: u64,
}

/// `GET /checkpoints/{id}` (and an element of `GET /checkpoints`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointJob {
    /// The job's id.
    pub id: String,
    /// Running, complete or failed.
    pub status: JobStatus,
    /// Phase within the checkpoint protocol.
    pub phase: JobPhase,
    /// The store, as requested.
    pub out: String,
    /// Memory COW mechanism, as asked for.
    pub strategy: Strategy,
    /// The mechanism that ran, once complete: the one asked for, except that a clone on a
    /// shared image runs `uffd` as `fork` (userfaultfd cannot write-protect its mapping).
    pub strategy_used: Option<Strategy>,
    /// Disk I/O policy.
    pub io: IoPolicy,
    /// Disk retention.
    pub disk: DiskPolicy,
    /// When the job started, milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// Milliseconds since the start (until the end, once over).
    pub elapsed_ms: u64,
    /// Memory saved so far.
    pub progress: JobProgress,
    /// The checkpoint's metrics, once complete.
    pub metrics: Option<Metrics>,
    /// Why it failed.
    pub error: Option<String>,
}

/// `GET /version`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionInfo {
    /// `cowvm`.
    pub name: String,
    /// The cowvm version.
    pub version: String,
    /// The checkpoint format version this build writes.
    pub checkpoint_format: u32,
}

/// `GET /health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    /// `ok` while the VM runs or is paused.
    pub status: String,
    /// Running or paused.
    pub vm: VmState,
}

/// `GET /metrics`: counters of this VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmMetrics {
    /// Milliseconds since the VM started.
    pub uptime_ms: u64,
    /// vCPU exits to the VMM by reason.
    pub exits: vmm::ExitCounts,
    /// Per disk: the image in use and its counters.
    pub disks: Vec<DiskMetrics>,
    /// Checkpoint counters and the latest checkpoint's metrics.
    pub checkpoints: CheckpointCounters,
}

/// One disk's counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskMetrics {
    /// The image the guest writes now.
    pub path: std::path::PathBuf,
    /// Images switched to so far (one per checkpoint).
    pub generation: u64,
    /// Clusters allocated in that image.
    pub clusters_allocated: u64,
    /// Disk COW faults (clusters copied up from the backing chain) in that image.
    pub copy_ups: u64,
    /// Requests in flight.
    pub inflight: usize,
}

/// The body of every 4xx and 5xx answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A short code: `invalid_json`, `invalid_field`, `conflict`, `not_found`, ...
    pub error: String,
    /// What went wrong, for people.
    pub message: String,
    /// The request field at fault, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}
