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

pub mod job;
pub mod periodic;
mod retention;
pub mod supervise;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ckpt_format::{
    DirStore, DiskPolicy, Manifest, MemStore, Metrics, RawStore, S3Location, S3Store, Store,
    StoreAddress,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};
use vmm::{ChainError, CheckpointError, CheckpointRequest, ParentSpec, StoreSpec};
use vmm::{Console, ErrorKind, Vm, VmError, VmExit};
use vmm::{HeldPause, MigrateOptions, MigrationError, MigrationReport};
use vmm::{RestoreError, RestoreOptions};

pub use self::job::{refused_by_store, CheckpointSpec, Job, Outcome};

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
    Exited(VmExit),
    /// The store already holds a complete checkpoint (named as the client named it).
    #[error("{0} already holds a complete checkpoint")]
    StoreComplete(String),
    /// A checkpoint in progress is writing the RAM store.
    #[error("{0} is being written by a checkpoint in progress")]
    StoreBusy(StoreAddress),
    /// No RAM store of that name in this process.
    #[error("no RAM checkpoint {0} in this process")]
    NoMemStore(StoreAddress),
    /// A RAM store cannot be made.
    #[error("{0}")]
    MemStore(ckpt_format::Error),
    /// `copy-commit` copies the disks into the store, which must be a directory.
    #[error("disk copy-commit needs a directory store (out) to hold the disk copy")]
    CopyCommitNeedsDir,
    /// A RAM store named as the parent of an incremental checkpoint.
    #[error(
        "a RAM checkpoint (mem:NAME) cannot be a parent: no other process could read the chain"
    )]
    MemParent,
    /// Pausing failed.
    #[error("cannot pause the VM")]
    Pause(#[source] VmError),
    /// A checkpoint thread could not be started.
    #[error("cannot start the checkpoint thread")]
    Spawn(#[source] std::io::Error),
    /// The checkpoint failed (or its store refused it).
    #[error(transparent)]
    Checkpoint(Arc<CheckpointError>),
    /// The checkpoint to roll back to cannot be restored; the VM runs on.
    #[error("cannot roll back")]
    Restore(#[source] RestoreError),
    /// The store to delete holds no complete checkpoint (nothing is deleted).
    #[error("{store} holds no complete checkpoint")]
    NotACheckpoint {
        /// The store, as the client named it.
        store: String,
        /// Why it cannot be read as one.
        #[source]
        source: ckpt_format::Error,
    },
    /// Only directory and RAM checkpoints are deleted.
    #[error("{0} is not a directory or RAM checkpoint: cowvm deletes only those")]
    NotDeletable(StoreAddress),
    /// The checkpoint's files cannot be removed.
    #[error("cannot delete {store}")]
    Delete {
        /// The store.
        store: String,
        /// Cause.
        #[source]
        source: ckpt_format::Error,
    },
    /// The migration failed (the VM runs on, unless the error says it was handed over).
    #[error(transparent)]
    Migrate(MigrationError),
    /// The checkpoint is deleted, but merging the disk layers it needed failed.
    #[error("checkpoint deleted; merging its disk layers failed")]
    Merge(#[source] ChainError),
}

impl ControlError {
    /// The kind of failure, for the answer to a client.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ControlError::Conflict(_) => ErrorKind::Conflict,
            ControlError::Exited(_) => ErrorKind::VmExited,
            ControlError::StoreComplete(_) | ControlError::StoreBusy(_) => ErrorKind::AlreadyExists,
            ControlError::NoMemStore(_)
            | ControlError::MemStore(_)
            | ControlError::CopyCommitNeedsDir
            | ControlError::NotACheckpoint { .. }
            | ControlError::NotDeletable(_)
            | ControlError::MemParent => ErrorKind::InvalidInput,
            ControlError::Delete { .. } => ErrorKind::Internal,
            ControlError::Merge(e) => e.kind(),
            ControlError::Pause(e) => e.kind(),
            ControlError::Spawn(_) => ErrorKind::Internal,
            ControlError::Checkpoint(e) => e.kind(),
            ControlError::Restore(e) => e.kind(),
            ControlError::Migrate(e) => e.kind(),
        }
    }
}

/// What a request wants of the VM, for the refusals of a busy VM.
#[derive(Debug, Clone, Copy)]
enum Wants {
    Pause,
    Checkpoint,
    Rollback,
}

/// Who holds the VM now.
#[derive(Default)]
struct Gate {
    /// A client's pause.
    held: Option<HeldPause>,
    /// The job whose checkpoint is running.
    running: Option<Arc<Job>>,
    /// The process is stopping the VM (a signal) or its VM has ended: no checkpoint, pause or
    /// rollback may start.
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
    /// Directories trusted to hold checkpoint disks besides the checkpoint's directory,
    /// `disk_dir` and the running VM's own disk directories.
    pub allow_dirs: Vec<PathBuf>,
}

/// The VM the controller drives now.
#[derive(Clone)]
struct Current {
    vm: Arc<Vm>,
    started: Instant,
    /// The checkpoint it was restored from, as the client named it.
    restored_from: Option<StoreAddress>,
}

/// What a rollback took.
#[derive(Debug, Clone, Copy)]
pub struct RolledBack {
    /// `Vm::restore` alone.
    pub restore: Duration,
    /// From the pause of the old VM until the new one runs.
    pub downtime: Duration,
}

#[derive(Default)]
struct Jobs {
    next: u64,
    table: BTreeMap<u64, Arc<Job>>,
    counters: Counters,
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
    /// Migrations under way: the VM ends at the hand-over, but the process must serve the
    /// destination's pages until it owns them all.
    migrations: tokio::sync::watch::Sender<usize>,
}

/// Runs `f` when dropped.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

/// The store of a directory, raw or S3 address; an S3 store reaches `s3_endpoint` if given,
/// else the endpoint of the environment (`AWS_ENDPOINT_URL`, else AWS). A RAM store exists
/// only in the controller of the process that took it: none here.
pub fn named_store(address: &StoreAddress, s3_endpoint: Option<&str>) -> Option<StoreSpec> {
    match address {
        StoreAddress::Dir(p) => Some(StoreSpec::Dir(p.clone())),
        StoreAddress::Raw(p) => Some(StoreSpec::Raw(p.clone())),
        StoreAddress::Mem(_) => None,
        StoreAddress::S3 { .. } => {
            let location = S3Location::parse(&address.to_string())
                .expect("a parsed s3:// address is a valid location");
            let store = S3Store::new(location);
            Some(StoreSpec::S3(match s3_endpoint {
                Some(url) => store.endpoint(url),
                None => store,
            }))
        }
    }
}

/// Whether `store` holds a complete checkpoint.
fn holds_checkpoint(store: &dyn Store) -> bool {
    store
        .open()
        .and_then(|r| r.read_commit())
        .is_ok_and(|c| c.is_some())
}

/// Who holds a pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PausedBy {
    /// A client, with `PATCH /vm`.
    Api,
    /// A checkpoint in its pause phase.
    Checkpoint,
    /// A rollback, while it restores the VM that replaces this one.
    Rollback,
}

/// The controller's view of its VM.
#[derive(Debug, Clone)]
pub struct Status {
    /// Who holds the pause, if the VM is paused.
    pub paused: Option<PausedBy>,
    /// The checkpoint being taken, if any.
    pub checkpoint_in_progress: Option<u64>,
    /// The checkpoint the VM was restored from, if any.
    pub restored_from: Option<StoreAddress>,
    /// Time since the VM started (since its restore, for a restored VM).
    pub uptime: Duration,
}

/// Checkpoint counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Checkpoints completed.
    pub complete: u64,
    /// Checkpoints failed.
    pub failed: u64,
    /// Bytes written by completed checkpoints.
    pub bytes_written: u64,
    /// The longest pause of a completed checkpoint, in microseconds.
    pub max_pause_us: u64,
    /// Metrics of the latest completed checkpoint.
    pub last: Option<Metrics>,
}

impl Controller {
    /// A controller for `vm` (restored from the checkpoint `restored_from`, if it was); a
    /// rollback sets its VM up with `settings`.
    pub fn new(
        vm: Arc<Vm>,
        restored_from: Option<StoreAddress>,
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
            migrations: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The store a new checkpoint writes `address` into, refused if it already holds a
    /// complete checkpoint (the store refuses too, but only once the job has started).
    fn store_for_checkpoint(
        &self,
        address: &StoreAddress,
        s3_endpoint: Option<&str>,
    ) -> Result<StoreSpec, ControlError> {
        let (complete, path) = match address {
            StoreAddress::Mem(name) => return self.fresh_mem_store(address, name),
            // One request fewer to a remote store: its own refusal comes as early.
            StoreAddress::S3 { .. } => {
                return Ok(named_store(address, s3_endpoint).expect("an S3 store"))
            }
            StoreAddress::Dir(p) => (DirStore::new(p).is_complete(), p),
            StoreAddress::Raw(p) => (holds_checkpoint(&RawStore::new(p)), p),
        };
        if complete {
            return Err(ControlError::StoreComplete(path.display().to_string()));
        }
        Ok(named_store(address, None).expect("a directory or raw store is a named store"))
    }

    /// A fresh RAM store `name`, unless that name holds a complete checkpoint already or one
    /// being written (an incomplete one, from a failed checkpoint, is replaced).
    fn fresh_mem_store(
        &self,
        address: &StoreAddress,
        name: &str,
    ) -> Result<StoreSpec, ControlError> {
        let mut stores = lock(&self.mem_stores);
        if let Some(store) = stores.get(name) {
            if holds_checkpoint(store.as_ref()) {
                return Err(ControlError::StoreComplete(address.to_string()));
            }
            // Another request or a checkpoint in progress holds it.
            if Arc::strong_count(store) > 1 {
                return Err(ControlError::StoreBusy(address.clone()));
            }
        }
        let store = Arc::new(MemStore::new().map_err(ControlError::MemStore)?);
        stores.insert(name.to_string(), store.clone());
        Ok(StoreSpec::Mem(store))
    }

    /// The store of a checkpoint to roll back to.
    fn store_for_rollback(
        &self,
        address: &StoreAddress,
        s3_endpoint: Option<&str>,
    ) -> Result<StoreSpec, ControlError> {
        let spec = match address {
            StoreAddress::Mem(name) => lock(&self.mem_stores)
                .get(name)
                .map(|s| StoreSpec::Mem(s.clone())),
            _ => named_store(address, s3_endpoint),
        };
        spec.ok_or_else(|| ControlError::NoMemStore(address.clone()))
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
            Some(exit) => Err(ControlError::Exited(exit)),
            None => Ok(()),
        }
    }

    /// Who holds the VM and where it came from.
    pub fn status(&self) -> Status {
        let running = lock(&self.jobs)
            .table
            .values()
            .find(|j| !j.is_over())
            .map(|j| j.id());
        let current = self.current();
        let paused = current.vm.is_paused().then(|| match running {
            Some(_) => PausedBy::Checkpoint,
            None if self.rolling_back.load(Ordering::Acquire) => PausedBy::Rollback,
            None => PausedBy::Api,
        });
        Status {
            paused,
            checkpoint_in_progress: running,
            restored_from: current.restored_from,
            uptime: current.started.elapsed(),
        }
    }

    /// Refuses what a request `wants` while a checkpoint, a rollback or a client's pause
    /// holds the VM (at most one of them does).
    fn refuse_if_busy(&self, gate: &Gate, wants: Wants) -> Result<(), ControlError> {
        let busy = if gate.stopping {
            "the VM is stopping".to_string()
        } else if let Some(job) = &gate.running {
            let then = match wants {
                Wants::Pause => "; pause after it completes",
                Wants::Checkpoint => "",
                Wants::Rollback => "; roll back after it completes",
            };
            format!("checkpoint {} is in progress{then}", job.id())
        } else if self.rolling_back.load(Ordering::Acquire) {
            "a rollback is in progress".to_string()
        } else if gate.held.is_some() {
            match wants {
                Wants::Pause => "the VM is already paused",
                Wants::Checkpoint => "the VM is paused; resume it before taking a checkpoint",
                Wants::Rollback => "the VM is paused; resume it before rolling back",
            }
            .to_string()
        } else {
            return Ok(());
        };
        Err(ControlError::Conflict(busy))
    }

    /// Pauses the VM until [`resume`](Self::resume). Blocks until every vCPU is parked.
    pub fn pause(&self) -> Result<Duration, ControlError> {
        self.check_alive()?;
        let mut gate = lock(&self.gate);
        self.refuse_if_busy(&gate, Wants::Pause)?;
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
        spec: CheckpointSpec,
    ) -> Result<Arc<Job>, ControlError> {
        if spec.options.disk == DiskPolicy::CopyCommit
            && !matches!(spec.store, StoreAddress::Dir(_))
        {
            return Err(ControlError::CopyCommitNeedsDir);
        }
        let store = self.store_for_checkpoint(&spec.store, spec.s3_endpoint.as_deref())?;
        let parent = match &spec.parent {
            None => None,
            Some(address) => Some(ParentSpec {
                address: address.to_string(),
                store: named_store(address, spec.s3_endpoint.as_deref())
                    .ok_or(ControlError::MemParent)?,
            }),
        };
        self.check_alive()?;
        let mut gate = lock(&self.gate);
        self.refuse_if_busy(&gate, Wants::Checkpoint)?;
        let options = spec.options;
        let job = {
            let mut jobs = lock(&self.jobs);
            let id = jobs.next;
            jobs.next += 1;
            let job = Arc::new(Job::new(id, spec, unix_ms()));
            jobs.table.insert(id, job.clone());
            job
        };
        let prepared = job.clone();
        let request = CheckpointRequest {
            store,
            options,
            // Called in the pause: the store has accepted the checkpoint by then.
            pause_probe: Some(Arc::new(move |_| prepared.mark_prepared())),
            parent,
        };
        let this = self.clone();
        let vm = self.vm();
        let worker = job.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("checkpoint-{}", job.id()))
            .spawn(move || {
                let result = vm.checkpoint(&request, worker.progress());
                this.finish(&worker, result);
                // Whoever waits for the job may then drop the VM: release it first.
                drop(request);
                drop(vm);
                drop(this);
                worker.mark_over();
            });
        if let Err(e) = spawned {
            lock(&self.jobs).table.remove(&job.id());
            return Err(ControlError::Spawn(e));
        }
        gate.running = Some(job.clone());
        Ok(job)
    }

    /// Records the end of a job and lets the next checkpoint or pause in.
    fn finish(&self, job: &Arc<Job>, result: Result<Manifest, CheckpointError>) {
        let mut gate = lock(&self.gate);
        let took = job.since_start();
        let out = &job.spec().store;
        let outcome = match result {
            Ok(manifest) => {
                info!(id = job.id(), %out, total_us = manifest.metrics.total_us, "checkpoint complete");
                Outcome::Complete(Box::new(manifest))
            }
            Err(e) => {
                warn!(id = job.id(), %out, "checkpoint failed: {}", chain(&e));
                Outcome::Failed(Arc::new(e))
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
                Outcome::Failed(e) if refused_by_store(e) => {}
                Outcome::Failed(_) => jobs.counters.failed += 1,
            }
            let finished: Vec<u64> = jobs
                .table
                .iter()
                .filter(|(id, j)| **id != job.id() && j.is_over())
                .map(|(id, _)| *id)
                .collect();
            for id in finished
                .iter()
                .take(finished.len().saturating_sub(KEPT_JOBS))
            {
                jobs.table.remove(id);
            }
        }
        job.set_end(outcome, took);
        if gate.running.as_ref().is_some_and(|j| j.id() == job.id()) {
            gate.running = None;
        }
    }

    /// Forgets a job that never got going (the store refused it), so that its id is not
    /// listed for a request that was answered with an error.
    pub fn forget(&self, job: &Job) {
        lock(&self.jobs).table.remove(&job.id());
    }

    /// A job by its id.
    pub fn job(&self, id: u64) -> Option<Arc<Job>> {
        lock(&self.jobs).table.get(&id).cloned()
    }

    /// Every job kept, oldest first.
    pub fn jobs(&self) -> Vec<Arc<Job>> {
        lock(&self.jobs).table.values().cloned().collect()
    }

    /// Checkpoint counters.
    pub fn counters(&self) -> Counters {
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

    /// Lets nothing new start once the process's VM has ended, so that the checkpoint in
    /// progress, if any, is the last: the process waits for it before it exits.
    pub fn close(&self) {
        lock(&self.gate).stopping = true;
    }

    /// Stops the current VM for good (a signal): a rollback in progress stops the VM it
    /// restores, and no other may start.
    pub fn stop(&self) {
        let mut gate = lock(&self.gate);
        gate.stopping = true;
        self.vm().stop();
    }

    /// Returns the running VM to the checkpoint at `from` without a new process: the
    /// checkpoint is restored into a new VM, which becomes current, and the old VM is stopped.
    /// Refused while a checkpoint runs or a client holds a pause. If the checkpoint is
    /// incomplete or corrupt, `Vm::restore` refuses it and the old VM resumes as it was.
    pub fn rollback(
        &self,
        from: &StoreAddress,
        s3_endpoint: Option<&str>,
        eager: bool,
    ) -> Result<RolledBack, ControlError> {
        let store = self.store_for_rollback(from, s3_endpoint)?;
        self.check_alive()?;
        let old = {
            let gate = lock(&self.gate);
            self.refuse_if_busy(&gate, Wants::Rollback)?;
            self.rolling_back.store(true, Ordering::Release);
            self.vm()
        };
        let result = self.replace(&old, &store, from, eager);
        let _gate = lock(&self.gate);
        self.rolling_back.store(false, Ordering::Release);
        result
    }

    /// Moves the VM to the `cowvm receive` at `options.to`; answers once the destination owns
    /// every page (the VM then ends here, and with it the process). Refused while a checkpoint
    /// runs, a client holds a pause or a rollback runs.
    pub fn migrate(&self, options: &MigrateOptions) -> Result<MigrationReport, ControlError> {
        self.check_alive()?;
        let vm = {
            let gate = lock(&self.gate);
            self.refuse_if_busy(&gate, Wants::Checkpoint)?;
            self.vm()
        };
        self.migrations.send_modify(|n| *n += 1);
        // Counted down however the call ends.
        let _migrating = OnDrop(|| self.migrations.send_modify(|n| *n -= 1));
        vm.migrate(options).map_err(ControlError::Migrate)
    }

    /// Waits until no migration is under way (one that moved the VM answers once the
    /// destination owns every page, which can take long after the VM ended here).
    pub async fn migrations_finished(&self) {
        // The sender lives in `self`: the wait ends only when the count does.
        let _ = self.migrations.subscribe().wait_for(|&n| n == 0).await;
    }

    fn replace(
        &self,
        old: &Arc<Vm>,
        store: &StoreSpec,
        from: &StoreAddress,
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
            allow_dirs: self
                .settings
                .allow_dirs
                .iter()
                .cloned()
                .chain(own_disk_dirs(old))
                .collect(),
        };
        let restore_start = Instant::now();
        let new = Arc::new(Vm::restore(store, options).map_err(ControlError::Restore)?);
        new.set_cow_budget(old.cow_budget());
        if old.logs_writes() {
            new.log_writes();
        }
        let restore = restore_start.elapsed();
        let stopping = {
            let gate = lock(&self.gate);
            // The process waits for the current VM: it moves to the new one here, before the
            // old one stops, so the old VM's end does not end the process.
            *self.current.write().unwrap_or_else(|p| p.into_inner()) = Current {
                vm: new.clone(),
                started: Instant::now(),
                restored_from: Some(from.clone()),
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
            %from,
            eager,
            restore_us = took.restore.as_micros() as u64,
            downtime_us = took.downtime.as_micros() as u64,
            "VM rolled back"
        );
        Ok(took)
    }
}

/// The directories of a running VM's disk images and the directories their backing files may
/// use: a rollback inside the VM's process trusts them, since the VM made its checkpoints'
/// disks there.
fn own_disk_dirs(vm: &Vm) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for info in vm.disks().iter().filter_map(|d| d.image_info().ok()) {
        let parents = info
            .chain
            .iter()
            .filter_map(|entry| entry.path.parent())
            .map(|dir| match dir.as_os_str().is_empty() {
                true => Path::new(".").to_path_buf(),
                false => dir.to_path_buf(),
            });
        dirs.extend(parents);
        dirs.extend(info.backing_policy.allowed_dirs().iter().cloned());
    }
    dirs.sort();
    dirs.dedup();
    dirs
}
