//! One checkpoint job: what was asked, its progress, and how it ended.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ckpt_format::{CheckpointOptions, Manifest, StoreAddress};
use tokio::sync::watch;
use vmm::ErrorKind;
use vmm::{CheckpointError, Progress};

use super::lock;

/// A checkpoint as requested: where it goes and how it is taken.
#[derive(Debug, Clone)]
pub struct CheckpointSpec {
    /// The store, as the client named it.
    pub store: StoreAddress,
    /// The endpoint of an S3 store, if not the environment's.
    pub s3_endpoint: Option<String>,
    /// Strategy and policies.
    pub options: CheckpointOptions,
    /// The parent of an incremental checkpoint (reached through `s3_endpoint` too).
    pub parent: Option<StoreAddress>,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Complete.
    Complete(Box<Manifest>),
    /// Failed (before or after the pause).
    Failed(Arc<CheckpointError>),
}

/// Whether the store refused the checkpoint before anything was written (an existing
/// checkpoint, an unusable path): the request's fault, not a failure of the VMM.
pub fn refused_by_store(e: &CheckpointError) -> bool {
    matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::AlreadyExists)
}

/// Where a job is, for those who wait on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    /// Opening the store, arming memory protection.
    Starting,
    /// The store has accepted the checkpoint and the VM is paused for it (or was).
    Prepared,
    /// Complete or failed.
    Over,
}

/// One checkpoint, running or over.
#[derive(Debug)]
pub struct Job {
    id: u64,
    spec: CheckpointSpec,
    started_unix_ms: u64,
    started: Instant,
    progress: Progress,
    end: Mutex<Option<(Outcome, Duration)>>,
    stage: watch::Sender<Stage>,
}

impl Job {
    pub(super) fn new(id: u64, spec: CheckpointSpec, started_unix_ms: u64) -> Job {
        Job {
            id,
            spec,
            started_unix_ms,
            started: Instant::now(),
            progress: Progress::default(),
            end: Mutex::new(None),
            stage: watch::Sender::new(Stage::Starting),
        }
    }

    /// The job's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// What was asked.
    pub fn spec(&self) -> &CheckpointSpec {
        &self.spec
    }

    /// When the job started, milliseconds since the Unix epoch.
    pub fn started_unix_ms(&self) -> u64 {
        self.started_unix_ms
    }

    /// The checkpoint's progress.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// How it ended and how long it took, once over.
    pub fn end(&self) -> Option<(Outcome, Duration)> {
        lock(&self.end).clone()
    }

    /// Whether the job is over.
    pub fn is_over(&self) -> bool {
        lock(&self.end).is_some()
    }

    /// Time since the start (until the end, once over).
    pub fn elapsed(&self) -> Duration {
        lock(&self.end)
            .as_ref()
            .map_or_else(|| self.started.elapsed(), |(_, took)| *took)
    }

    pub(super) fn since_start(&self) -> Duration {
        self.started.elapsed()
    }

    /// Notes that the checkpoint is past its preparation (the store accepted it).
    pub(super) fn mark_prepared(&self) {
        self.stage.send_if_modified(|stage| {
            let earlier = *stage < Stage::Prepared;
            if earlier {
                *stage = Stage::Prepared;
            }
            earlier
        });
    }

    /// Records how the job ended and wakes whoever waits on it.
    pub(super) fn set_end(&self, outcome: Outcome, took: Duration) {
        *lock(&self.end) = Some((outcome, took));
    }

    /// Wakes whoever waits for the end (once the job has released the VM).
    pub(super) fn mark_over(&self) {
        self.stage.send_replace(Stage::Over);
    }

    /// Waits until the checkpoint is past its preparation or over.
    pub async fn prepared(&self) {
        self.wait_for(Stage::Prepared).await;
    }

    /// Waits until the job is over.
    pub async fn finished(&self) {
        self.wait_for(Stage::Over).await;
    }

    async fn wait_for(&self, stage: Stage) {
        let mut rx = self.stage.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|s| *s >= stage).await;
    }
}
