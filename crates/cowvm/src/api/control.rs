//! The controller of one running VM: who holds a pause, which checkpoint is being taken, the
//! table of checkpoint jobs, and which VM is current (a rollback replaces it). The API server
//! and the periodic checkpoint trigger both go through it, so their requests cannot conflict
//! behind each other's back.
//!
//! Locks: `gate` (pause, checkpoint and rollback decisions) is taken before `current` and
//! `jobs`, never the other way round, and none is held across an `await`. Operations that
//! block (a pause waits for every vCPU to park; a checkpoint runs for seconds; a rollback
//! restores a VM) run off the async workers. A request works on the VM that was current when
//! it began ([`Controller::vm`] hands out an `Arc`), so a rollback never pulls a VM from under
//! it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ckpt_format::{CheckpointOptions, Manifest, MemStore, Store, PAGE_SIZE};
use thiserror::Error;
use tokio::sync::watch;
use tracing::{info, warn};
use vmm::checkpoint::restore::{RestoreError, RestoreOptions};
use vmm::checkpoint::{CheckpointError, CheckpointRequest, Phase, Progress, StoreSpec};
use vmm::kvm::vcpu::HeldPause;
use vmm::{Console, Vm, VmError};

use super::model::{
    CheckpointBody, CheckpointCounters, CheckpointJob, JobPhase, JobProgress, JobStatus, PausedBy,
    VmConfigInfo, VmInfo, VmState,
};

/// Finished jobs kept for `GET /checkpoints` (older ones are forgotten, not deleted).
const KEPT_JOBS: usize = 256;

/// Why a control request is refused or failed.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The request conflicts with the VM's state.
    #[error("{0}")]
    Conflict(String),
    /// The VM has exited.
    #[error("the VM has exited: {0}")]
    Exited(String),
    /// The store refused the checkpoint before it began.
    #[error("{0}")]
    StoreConflict(String),
    /// The store cannot be used (missing, not writable, too small).
    #[error("{0}")]
    BadStore(String),
    /// Pausing failed.
    #[error("cannot pause the VM")]
    Pause(#[source] VmError),
    /// A checkpoint thread could not be started.
    #[error("cannot start the checkpoint thread")]
    Spawn(#[source] std::io::Error),
    /// The checkpoint failed in the VMM.
    #[error("{0}")]
    Checkpoint(String),
    /// The checkpoint to roll back to cannot be restored; the VM runs on.
    #[error("cannot roll back")]
    Restore(#[source] RestoreError),
}

/// Who holds the VM now.
#[derive(Default)]
struct Gate {
    /// A client's pause.
    held: Option<HeldPause>,
    /// The job whose checkpoint is running.
    running: Option<Arc<Job>>,
    /// The process is stopping the VM (a signal): no rollback may start another.
    stopping: bool,
}

/// How the VM of a rollback is set up, as the process's own VM was: where its console
/// continues and where its disks' fresh COW files go.
#[derive(Debug, Clone, Default)]
pub struct RollbackSettings {
    /// The console file, appended to; standard output if none.
    pub console: Option<PathBuf>,
    /// Directory of the disks' COW files; next to the checkpoint's disks if none.
    pub disk_dir: Option<PathBuf>,
}

/// The VM the controller drives now.
#[derive(Clone)]
struct Current {
    vm: Arc<Vm>,
    started: Instant,
    /// The checkpoint it was restored from, as the client named it.
    restored_from: Option<String>,
}

/// What a rollback took.
#[derive(Debug, Clone, Copy)]
pub struct RolledBack {
    /// `Vm::restore` alone.
    pub restore: Duration,
    /// From the pause of the old VM until the new one runs.
    pub downtime: Duration,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Complete.
    Complete(Box<Manifest>),
    /// Failed (before or after the pause).
    Failed {
        /// The store refused before anything was written (an existing checkpoint, a bad path).
        refused_by_store: Option<bool>,
        /// Why.
        message: String,
    },
}

/// One checkpoint, running or over.
#[derive(Debug)]
pub struct Job {
    id: u64,
    body: CheckpointBody,
    started_unix_ms: u64,
    started: Instant,
    progress: Progress,
    end: Mutex<Option<(Outcome, Duration)>>,
    done: watch::Sender<bool>,
}

impl Job {
    /// The job's id as the API shows it.
    pub fn id(&self) -> String {
        self.id.to_string()
    }

    /// The outcome, once over.
    pub fn outcome(&self) -> Option<Outcome> {
        lock(&self.end).as_ref().map(|(o, _)| o.clone())
    }

    /// Whether the checkpoint is past its preparation (store opened, memory armed) or over.
    pub fn prepared(&self) -> bool {
        !matches!(self.progress.phase(), Phase::Pending | Phase::Preparing)
            || lock(&self.end).is_some()
    }

    /// Waits until the job is over.
    pub async fn finished(&self) {
        let mut rx = self.done.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|done| *done).await;
    }

    /// The job as the API shows it.
    pub fn view(&self) -> CheckpointJob {
        let end = lock(&self.end).clone();
        let (done, total) = self.progress.pages();
        let page = PAGE_SIZE as u64;
        let (status, metrics, error, elapsed) = match end {
            None => (JobStatus::Running, None, None, self.started.elapsed()),
            Some((Outcome::Complete(m), took)) => {
                (JobStatus::Complete, Some(m.metrics.clone()), None, took)
            }
            Some((Outcome::Failed { message, .. }, took)) => {
                (JobStatus::Failed, None, Some(message), took)
            }
        };
        let phase = match self.progress.phase() {
            Phase::Pending => JobPhase::Pending,
            Phase::Preparing => JobPhase::Preparing,
            Phase::Paused => JobPhase::Paused,
            Phase::Writing => JobPhase::Writing,
            Phase::Done | Phase::Failed => JobPhase::Done,
        };
        CheckpointJob {
            id: self.id(),
            status,
            phase,
            out: self.body.out.clone(),
            strategy: self.body.strategy,
            io: self.body.io,
            disk: self.body.disk,
            started_unix_ms: self.started_unix_ms,
            elapsed_ms: elapsed.as_millis() as u64,
            progress: JobProgress {
                pages_done: done,
                pages_total: total,
                bytes_done: done * page,
                bytes_total: total * page,
            },
            metrics,
            error,
        }
    }
}

#[derive(Default)]
struct Jobs {
    next: u64,
    table: BTreeMap<u64, Arc<Job>>,
    counters: CheckpointCounters,
}

/// The controller of one VM (the current one, after rollbacks).
pub struct Controller {
    current: RwLock<Current>,
    settings: RollbackSettings,
    gate: Mutex<Gate>,
    /// A rollback is replacing the VM. Set and cleared with the gate held (decisions read it
    /// there), an atomic so that [`Controller::info`] need not wait for the gate (a pause holds
    /// it while the vCPUs park).
    rolling_back: AtomicBool,
    jobs: Mutex<Jobs>,
    /// RAM stores (`mem:NAME`) by name: they live as long as this process.
    mem_stores: Mutex<HashMap<String, Arc<MemStore>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Classifies a checkpoint failure for a request still waiting for the store to accept it:
/// `Some(true)` the store holds a checkpoint already, `Some(false)` the store path is unusable
/// (missing, not a directory, not writable, too small), `None` a failure of the VMM or the
/// host (including a full disk).
fn store_refusal(e: &CheckpointError) -> Option<bool> {
    match e {
        CheckpointError::Store { source, .. } => match source {
            ckpt_format::Error::CheckpointExists { .. } => Some(true),
            ckpt_format::Error::StoreFull { .. } => None,
            _ => Some(false),
        },
        _ => None,
    }
}

/// The whole chain of an error, on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl Controller {
    /// A controller for `vm` (restored from the checkpoint `restored_from`, if it was); a
    /// rollback sets its VM up with `settings`.
    pub fn new(
        vm: Arc<Vm>,
        restored_from: Option<String>,
        settings: RollbackSettings,
    ) -> Controller {
        Controller {
            current: RwLock::new(Current {
                vm,
                started: Instant::now(),
                restored_from,
            }),
            settings,
            gate: Mutex::new(Gate::default()),
            rolling_back: AtomicBool::new(false),
            jobs: Mutex::new(Jobs {
                next: 1,
                ..Jobs::default()
            }),
            mem_stores: Mutex::default(),
        }
    }

    /// The RAM store `name` for a new checkpoint: a fresh one, unless `name` holds a complete
    /// checkpoint already or one being written (an incomplete one, from a failed checkpoint,
    /// is replaced).
    pub fn mem_store_for_checkpoint(&self, name: &str) -> Result<StoreSpec, ControlError> {
        let mut stores = lock(&self.mem_stores);
        if let Some(store) = stores.get(name) {
            let complete = store
                .open()
                .and_then(|r| r.read_commit())
                .is_ok_and(|c| c.is_some());
            if complete {
                return Err(ControlError::StoreConflict(format!(
                    "mem:{name} already holds a complete checkpoint"
                )));
            }
            // Another request or a checkpoint in progress holds it.
            if Arc::strong_count(store) > 1 {
                return Err(ControlError::StoreConflict(format!(
                    "mem:{name} is being written by a checkpoint in progress"
                )));
            }
        }
        let store = Arc::new(MemStore::new().map_err(|e| ControlError::BadStore(e.to_string()))?);
        stores.insert(name.to_string(), store.clone());
        Ok(StoreSpec::Mem(store))
    }

    /// The RAM store `name`, for a rollback.
    pub fn mem_store(&self, name: &str) -> Option<StoreSpec> {
        lock(&self.mem_stores)
            .get(name)
            .map(|s| StoreSpec::Mem(s.clone()))
    }

    fn current(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The current VM.
    pub fn vm(&self) -> Arc<Vm> {
        self.current().vm
    }

    fn check_alive(&self) -> Result<(), ControlError> {
        match self.vm().exit_status() {
            Some(exit) => Err(ControlError::Exited(exit.to_string())),
            None => Ok(()),
        }
    }

    /// The VM's state and configuration.
    pub fn info(&self) -> VmInfo {
        let running = lock(&self.jobs)
            .table
            .values()
            .find(|j| lock(&j.end).is_none())
            .map(|j| j.id());
        let current = self.current();
        let paused = current.vm.is_paused();
        let s = current.vm.summary();
        VmInfo {
            state: if paused {
                VmState::Paused
            } else {
                VmState::Running
            },
            paused_by: match (paused, &running) {
                (false, _) => None,
                (true, Some(_)) => Some(PausedBy::Checkpoint),
                (true, None) if self.rolling_back.load(Ordering::Acquire) => {
                    Some(PausedBy::Rollback)
                }
                (true, None) => Some(PausedBy::Api),
            },
            config: VmConfigInfo {
                mem_size: s.mem_size,
                vcpus: s.vcpus,
                kernel: s.kernel.as_ref().map(|k| k.display().to_string()),
                cmdline: s.cmdline.clone(),
            },
            checkpoint_in_progress: running,
            restored_from: current.restored_from,
            uptime_ms: current.started.elapsed().as_millis() as u64,
            restore: current.vm.restore_stats().map(Into::into),
        }
    }

    /// Milliseconds since the current VM started.
    pub fn uptime_ms(&self) -> u64 {
        self.current().started.elapsed().as_millis() as u64
    }

    /// Pauses the VM until [`resume`](Self::resume). Blocks until every vCPU is parked.
    pub fn pause(&self) -> Result<Duration, ControlError> {
        self.check_alive()?;
        let mut gate = lock(&self.gate);
        if let Some(job) = &gate.running {
            return Err(ControlError::Conflict(format!(
                "checkpoint {} is in progress; pause after it completes",
                job.id()
            )));
        }
        if self.rolling_back.load(Ordering::Acquire) {
            return Err(ControlError::Conflict("a rollback is in progress".into()));
        }
        if gate.held.is_some() {
            return Err(ControlError::Conflict("the VM is already paused".into()));
        }
        let held = self.vm().pause_held().map_err(ControlError::Pause)?;
        let took = held.took();
        gate.held = Some(held);
        info!(pause_us = took.as_micros() as u64, "VM paused by the API");
        Ok(took)
    }

    /// Resumes a VM paused by [`pause`](Self::pause).
    pub fn resume(&self) -> Result<(), ControlError> {
        self.check_alive()?;
        let mut gate = lock(&self.gate);
        match gate.held.take() {
            Some(held) => {
                drop(held);
                info!("VM resumed by the API");
                Ok(())
            }
            None if self.rolling_back.load(Ordering::Acquire) => Err(ControlError::Conflict(
                "the VM is paused by a rollback, which replaces it".into(),
            )),
            None if self.vm().is_paused() => Err(ControlError::Conflict(
                "the VM is paused by a checkpoint, which resumes it itself".into(),
            )),
            None => Err(ControlError::Conflict("the VM is running".into())),
        }
    }

    /// Starts a checkpoint on its own thread and returns its job at once.
    pub fn start_checkpoint(
        self: &Arc<Self>,
        body: CheckpointBody,
        store: StoreSpec,
    ) -> Result<Arc<Job>, ControlError> {
        self.check_alive()?;
        let mut gate = lock(&self.gate);
        if let Some(job) = &gate.running {
            return Err(ControlError::Conflict(format!(
                "checkpoint {} is in progress",
                job.id()
            )));
        }
        if self.rolling_back.load(Ordering::Acquire) {
            return Err(ControlError::Conflict("a rollback is in progress".into()));
        }
        if gate.held.is_some() {
            return Err(ControlError::Conflict(
                "the VM is paused; resume it before taking a checkpoint".into(),
            ));
        }
        let options: CheckpointOptions = body.options();
        let job = {
            let mut jobs = lock(&self.jobs);
            let id = jobs.next;
            jobs.next += 1;
            let job = Arc::new(Job {
                id,
                body,
                started_unix_ms: unix_ms(),
                started: Instant::now(),
                progress: Progress::default(),
                end: Mutex::new(None),
                done: watch::Sender::new(false),
            });
            jobs.table.insert(id, job.clone());
            job
        };
        let request = CheckpointRequest {
            store,
            options,
            pause_probe: None,
        };
        let this = self.clone();
        let vm = self.vm();
        let worker = job.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("checkpoint-{}", job.id))
            .spawn(move || {
                let result = vm.checkpoint(&request, &worker.progress);
                this.finish(&worker, result);
                // Whoever waits for the job may then drop the VM: release it first.
                drop(vm);
                drop(this);
                worker.done.send_replace(true);
            });
        if let Err(e) = spawned {
            lock(&self.jobs).table.remove(&job.id);
            return Err(ControlError::Spawn(e));
        }
        gate.running = Some(job.clone());
        Ok(job)
    }

    /// Records the end of a job and lets the next checkpoint or pause in.
    fn finish(&self, job: &Arc<Job>, result: Result<Manifest, CheckpointError>) {
        let mut gate = lock(&self.gate);
        let took = job.started.elapsed();
        let outcome = match result {
            Ok(manifest) => {
                info!(id = job.id, out = %job.body.out, total_us = manifest.metrics.total_us, "checkpoint complete");
                Outcome::Complete(Box::new(manifest))
            }
            Err(e) => {
                let message = chain(&e);
                warn!(id = job.id, out = %job.body.out, "checkpoint failed: {message}");
                Outcome::Failed {
                    refused_by_store: store_refusal(&e),
                    message,
                }
            }
        };
        {
            let mut jobs = lock(&self.jobs);
            match &outcome {
                Outcome::Complete(m) => {
                    let c = &mut jobs.counters;
                    c.complete += 1;
                    c.bytes_written += m.metrics.bytes_written;
                    c.max_pause_us = c.max_pause_us.max(m.metrics.pause_us);
                    c.last = Some(m.metrics.clone());
                }
                // A store that refused before anything began is a bad request, not a failure.
                Outcome::Failed {
                    refused_by_store: None,
                    ..
                } => jobs.counters.failed += 1,
                Outcome::Failed { .. } => {}
            }
            let finished: Vec<u64> = jobs
                .table
                .iter()
                .filter(|(id, j)| **id != job.id && lock(&j.end).is_some())
                .map(|(id, _)| *id)
                .collect();
            for id in finished
                .iter()
                .take(finished.len().saturating_sub(KEPT_JOBS))
            {
                jobs.table.remove(id);
            }
        }
        *lock(&job.end) = Some((outcome, took));
        if gate.running.as_ref().is_some_and(|j| j.id == job.id) {
            gate.running = None;
        }
    }

    /// Forgets a job that never got going (the store refused it), so that its id is not
    /// listed for a request that was answered with an error.
    pub fn forget(&self, job: &Job) {
        lock(&self.jobs).table.remove(&job.id);
    }

    /// A job by its id.
    pub fn job(&self, id: &str) -> Option<Arc<Job>> {
        let id: u64 = id.parse().ok()?;
        lock(&self.jobs).table.get(&id).cloned()
    }

    /// Every job kept, oldest first.
    pub fn jobs(&self) -> Vec<Arc<Job>> {
        lock(&self.jobs).table.values().cloned().collect()
    }

    /// Checkpoint counters.
    pub fn counters(&self) -> CheckpointCounters {
        lock(&self.jobs).counters.clone()
    }

    /// The running job, if any.
    pub fn running(&self) -> Option<Arc<Job>> {
        lock(&self.gate).running.clone()
    }

    /// Drops a client's pause (when the VM ends, so that the vCPU threads can be joined).
    pub fn release_pause(&self) {
        lock(&self.gate).held = None;
    }

    /// Stops the current VM for good (a signal): a rollback in progress stops the VM it
    /// restores, and no other may start.
    pub fn stop(&self) {
        let mut gate = lock(&self.gate);
        gate.stopping = true;
        self.vm().stop();
    }

    /// Returns the running VM to the checkpoint in `store` (named `from` by the client) without
    /// a new process: the checkpoint is restored into a new VM, which becomes current, and the
    /// old VM is stopped. Refused while a checkpoint runs or a client holds a pause. If the
    /// checkpoint is incomplete or corrupt, `Vm::restore` refuses it and the old VM resumes as
    /// it was.
    pub fn rollback(
        &self,
        store: &StoreSpec,
        from: &str,
        eager: bool,
    ) -> Result<RolledBack, ControlError> {
        self.check_alive()?;
        let old = {
            let gate = lock(&self.gate);
            if gate.stopping {
                return Err(ControlError::Conflict("the VM is stopping".into()));
            }
            if self.rolling_back.load(Ordering::Acquire) {
                return Err(ControlError::Conflict("a rollback is in progress".into()));
            }
            if let Some(job) = &gate.running {
                return Err(ControlError::Conflict(format!(
                    "checkpoint {} is in progress; roll back after it completes",
                    job.id()
                )));
            }
            if gate.held.is_some() {
                return Err(ControlError::Conflict(
                    "the VM is paused; resume it before rolling back".into(),
                ));
            }
            self.rolling_back.store(true, Ordering::Release);
            self.vm()
        };
        let result = self.replace(&old, store, from, eager);
        let _gate = lock(&self.gate);
        self.rolling_back.store(false, Ordering::Release);
        result
    }

    fn replace(
        &self,
        old: &Arc<Vm>,
        store: &StoreSpec,
        from: &str,
        eager: bool,
    ) -> Result<RolledBack, ControlError> {
        let start = Instant::now();
        // The restored VM runs as soon as it exists, so the old one is paused first: the two
        // never run together, and the old one's last partial line reaches the console before
        // the new one writes. If the restore fails, dropping the pause resumes it untouched.
        let pause = old.pause_held().map_err(ControlError::Pause)?;
        if let Err(e) = old.flush_console() {
            warn!("cannot flush the console of the VM rolled back: {e}");
        }
        let options = RestoreOptions {
            console: match &self.settings.console {
                Some(path) => Console::Append(path.clone()),
                None => Console::Stdout,
            },
            eager,
            disk_dir: self.settings.disk_dir.clone(),
        };
        let restore_start = Instant::now();
        let new = Arc::new(Vm::restore(store, options).map_err(ControlError::Restore)?);
        let restore = restore_start.elapsed();
        let stopping = {
            let gate = lock(&self.gate);
            // The process waits for the current VM: it moves to the new one here, before the
            // old one stops, so the old VM's end does not end the process.
            *self.current.write().unwrap_or_else(|p| p.into_inner()) = Current {
                vm: new.clone(),
                started: Instant::now(),
                restored_from: Some(from.to_string()),
            };
            gate.stopping
        };
        // `retire` makes the old vCPU threads exit, so dropping the pause does not resume them.
        old.retire();
        drop(pause);
        if stopping {
            new.stop();
        }
        let took = RolledBack {
            restore,
            downtime: start.elapsed(),
        };
        info!(
            from,
            eager,
            restore_us = took.restore.as_micros() as u64,
            downtime_us = took.downtime.as_micros() as u64,
            "VM rolled back"
        );
        Ok(took)
    }
}

impl ControlError {
    /// Turns a failed job's outcome into the error a synchronous request reports.
    pub fn from_outcome(refused_by_store: Option<bool>, message: String) -> ControlError {
        match refused_by_store {
            Some(true) => ControlError::StoreConflict(message),
            Some(false) => ControlError::BadStore(message),
            None => ControlError::Checkpoint(message),
        }
    }
}
