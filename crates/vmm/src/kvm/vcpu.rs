//! vCPU threads: one thread per vCPU, each a small state machine (Running / Paused / Exiting)
//! driven by a shared [`VcpuControl`].
//!
//! A pause sets the target state, then kicks every vCPU thread with a real-time signal. The
//! signal handler sets `kvm_run.immediate_exit`, so a thread that was about to enter `KVM_RUN`
//! returns at once instead of sleeping in the guest; a thread already inside `KVM_RUN` is
//! interrupted by the signal itself (`KVM_RUN` returns `EINTR`). Each thread then parks on a
//! condition variable, and the pausing thread waits until all are parked.
//!
//! On a busy host both hand-overs can wait for the scheduler, milliseconds each: a vCPU thread
//! that another thread has preempted takes its kick only when it next runs, and a pausing
//! thread asleep, woken by the last vCPU to park, waits for the thread on its core to reach the
//! end of its time slice. So the vCPU threads and the pausing thread run at real-time
//! priority until all vCPUs are parked ([`crate::sched`]).

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use thiserror::Error;
use tracing::{debug, error, warn};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::state::KvmVcpu;
use crate::devices::Bus;
use crate::exit::{ExitNotifier, VmExit};
use crate::sched::{RaisedHere, Scheduling};

/// Errors of the vCPU control path.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// Registering the kick signal handler failed.
    #[error("cannot register the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// Spawning a vCPU thread failed.
    #[error("cannot spawn the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
    /// Not every vCPU parked in time.
    #[error("vCPUs did not pause within {0:?} ({1} of {2} parked)")]
    PauseTimeout(Duration, usize, usize),
    /// The VM is exiting, so it cannot be paused or resumed.
    #[error("the VM is exiting")]
    Exiting,
    /// The VM is already paused.
    #[error("the VM is already paused")]
    AlreadyPaused,
}

/// What the vCPU threads are asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Run,
    Pause,
    Exit,
}

#[derive(Debug)]
struct ControlState {
    target: Target,
    parked: usize,
}

/// State shared by the VMM and its vCPU threads.
/// Exits of all vCPUs to the VMM, by reason.
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port I/O.
    pub io: AtomicU64,
    /// MMIO not handled in the kernel.
    pub mmio: AtomicU64,
    /// `KVM_RUN` interrupted by a kick (pause, stop).
    pub kicked: AtomicU64,
    /// Anything else that let the vCPU continue (halt, interrupt window).
    pub other: AtomicU64,
}

/// A snapshot of a vCPU's exit counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitCounts {
    /// Port I/O exits.
    pub io: u64,
    /// MMIO exits.
    pub mmio: u64,
    /// Kicks out of `KVM_RUN`.
    pub kicked: u64,
    /// Other exits.
    pub other: u64,
}

impl ExitCounters {
    /// The counts now.
    pub fn get(&self) -> ExitCounts {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExitCounts {
            io: load(&self.io),
            mmio: load(&self.mmio),
            kicked: load(&self.kicked),
            other: load(&self.other),
        }
    }
}

pub struct VcpuControl {
    exits: ExitCounters,
    state: Mutex<ControlState>,
    changed: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
    fds: Vec<Arc<Mutex<KvmVcpu>>>,
}

impl std::fmt::Debug for VcpuControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuControl")
            .field("vcpus", &self.fds.len())
            .finish()
    }
}

/// How long a pause may take before the VMM gives up; far above the microseconds it takes.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

thread_local! {
    /// `kvm_run.immediate_exit` of the vCPU that runs on this thread, for the kick handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: the pointer is set by this thread's vCPU loop to a field of its own mapped
        // `kvm_run`, and reset to null before that mapping goes away. A volatile byte store is
        // async-signal-safe.
        unsafe { std::ptr::write_volatile(flag, 1) };
    }
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn register_kick_handler() -> Result<(), VcpuError> {
    static REGISTER: Once = Once::new();
    let mut result = Ok(());
    REGISTER.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::Signal);
    });
    result
}

/// Proof that the VM is paused; resumes the vCPUs when dropped, so an early return cannot leave
/// the VM frozen.
#[derive(Debug)]
pub struct PauseGuard<'a> {
    control: &'a VcpuControl,
}

impl PauseGuard<'_> {
    /// Resumes the vCPUs now. Returns the instant they were told to run: the end of the pause
    /// (this thread may be preempted by a vCPU it woke before it returns).
    pub fn resume(self) -> Instant {
        self.control.resume_all()
    }

    /// The vCPUs, for reading or writing their state while they cannot run.
    pub fn vcpus(&self) -> impl Iterator<Item = MutexGuard<'_, KvmVcpu>> {
        self.control
            .fds
            .iter()
            .map(|fd| fd.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        self.control.resume_all();
    }
}

/// A pause owned rather than borrowed (an API client pauses, a later request resumes); the
/// vCPUs resume when it is dropped, so a controller that goes away cannot leave the VM frozen.
#[derive(Debug)]
pub struct HeldPause {
    control: Arc<VcpuControl>,
    took: Duration,
}

impl HeldPause {
    /// How long it took from the pause request until every vCPU was parked.
    pub fn took(&self) -> Duration {
        self.took
    }
}

impl Drop for HeldPause {
    fn drop(&mut self) {
        self.control.resume_all();
    }
}

impl VcpuControl {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Exits to the VMM so far, by reason.
    pub fn exits(&self) -> ExitCounts {
        self.exits.get()
    }

    /// Number of vCPUs.
    pub fn count(&self) -> usize {
        self.fds.len()
    }

    /// Whether the vCPUs are paused (or asked to pause).
    pub fn is_paused(&self) -> bool {
        self.lock().target == Target::Pause
    }

    /// Kicks every vCPU thread out of `KVM_RUN`; with `raise`, raised to real-time priority
    /// first (see the module docs), under the threads lock so that none is joined meanwhile.
    /// Returns the scheduling of each thread raised, for
    /// [`restore_scheduling`](Self::restore_scheduling).
    fn kick_all(&self, raise: bool) -> Vec<Scheduling> {
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        let mut raised = Vec::new();
        for thread in threads.iter() {
            if raise {
                // SAFETY: the handle is in `threads`, which join empties under this lock
                // before joining, and `restore_scheduling` checks it is still there.
                raised.extend(unsafe { Scheduling::raise(thread.as_pthread_t()) });
            }
            // A thread that has already finished cannot be signalled; that is fine, it is not
            // running guest code either.
            if let Err(e) = thread.kill(kick_signal()) {
                debug!("kick of a vCPU thread failed: {e}");
            }
        }
        raised
    }

    /// Puts the threads of `raised` back to the scheduling they had, each only while it is
    /// still one of this VM's vCPU threads (not joined since).
    fn restore_scheduling(&self, raised: Vec<Scheduling>) {
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        for r in raised {
            if threads.iter().any(|t| t.as_pthread_t() == r.thread()) {
                // SAFETY: its handle is still in `threads` under this lock: not joined.
                unsafe { r.restore() };
            }
        }
    }

    /// Stops every vCPU and waits until all are parked outside `KVM_RUN`.
    pub fn pause(&self) -> Result<PauseGuard<'_>, VcpuError> {
        self.park_all()?;
        Ok(PauseGuard { control: self })
    }

    /// Like [`pause`](Self::pause), for a pause that outlives any one scope: a controller
    /// holds the [`HeldPause`] between a pause request and a later resume request.
    pub fn pause_held(self: &Arc<Self>) -> Result<HeldPause, VcpuError> {
        let took = self.park_all()?;
        Ok(HeldPause {
            control: self.clone(),
            took,
        })
    }

    /// Sets the target to Paused, kicks the vCPUs and waits until all are parked. Returns how
    /// long that took. Only one pause exists at a time (a second gets `AlreadyPaused`), so
    /// the one guard that results is the only one that resumes.
    fn park_all(&self) -> Result<Duration, VcpuError> {
        let start = Instant::now();
        {
            let mut st = self.lock();
            match st.target {
                Target::Exit => return Err(VcpuError::Exiting),
                Target::Pause => return Err(VcpuError::AlreadyPaused),
                Target::Run => st.target = Target::Pause,
            }
        }
        let here = RaisedHere::new();
        let raised = self.kick_all(true);
        let st = self.lock();
        let (st, timeout) = self
            .changed
            .wait_timeout_while(st, PAUSE_TIMEOUT, |st| {
                st.parked < self.count() && st.target == Target::Pause
            })
            .unwrap_or_else(|p| p.into_inner());
        drop(st);
        self.restore_scheduling(raised);
        drop(here);
        let st = self.lock();
        if st.target == Target::Exit {
            return Err(VcpuError::Exiting);
        }
        if timeout.timed_out() {
            let parked = st.parked;
            drop(st);
            self.resume_all();
            return Err(VcpuError::PauseTimeout(PAUSE_TIMEOUT, parked, self.count()));
        }
        Ok(start.elapsed())
    }

    /// Lets the vCPUs run; returns the instant they were told to. The lock is released before
    /// they are woken, so a woken vCPU does not wait for it.
    fn resume_all(&self) -> Instant {
        let mut st = self.lock();
        let paused = st.target == Target::Pause;
        if paused {
            st.target = Target::Run;
        }
        drop(st);
        let at = Instant::now();
        if paused {
            self.changed.notify_all();
        }
        at
    }

    /// Asks every vCPU thread to exit and kicks them.
    pub fn request_exit(&self) {
        self.lock().target = Target::Exit;
        self.changed.notify_all();
        self.kick_all(false);
    }

    /// Waits for every vCPU thread to finish.
    pub fn join(&self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for thread in threads {
            if thread.join().is_err() {
                error!("a vCPU thread panicked");
            }
        }
    }

    /// Blocks the calling vCPU thread while the VM is paused. Returns false if it must exit.
    ///
    /// Before parking, `settle` runs (without the lock) to bring the vCPU to a state that can
    /// be saved.
    fn wait_while_paused(&self, settle: impl FnOnce()) -> bool {
        let mut st = self.lock();
        if st.target == Target::Pause {
            drop(st);
            settle();
            st = self.lock();
        }
        if st.target == Target::Pause {
            st.parked += 1;
            self.changed.notify_all();
            while st.target == Target::Pause {
                st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.parked -= 1;
        }
        st.target != Target::Exit
    }
}

/// A vCPU ready to run on its own thread.
pub struct Vcpu {
    /// Index of the vCPU (its APIC id).
    pub id: u8,
    /// The KVM vCPU; locked by its thread around each `KVM_RUN`, so the VMM can reach it while
    /// the vCPU is paused.
    pub fd: Arc<Mutex<KvmVcpu>>,
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
}

/// What the run loop does after an exit.
enum Next {
    Continue,
    Stop(VmExit),
}

impl Vcpu {
    fn run_once(&self, fd: &mut KvmVcpu, exits: &ExitCounters) -> Next {
        let count = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                count(&exits.io);
                self.pio.write(u64::from(port), data);
                Next::Continue
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                count(&exits.io);
                self.pio.read(u64::from(port), data);
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                count(&exits.mmio);
                self.mmio.write(addr, data);
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                count(&exits.mmio);
                self.mmio.read(addr, data);
                Next::Continue
            }
            Ok(VcpuExit::Intr) | Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) => {
                count(&exits.other);
                Next::Continue
            }
            Ok(VcpuExit::Shutdown) => Next::Stop(VmExit::TripleFault {
                vcpu: self.id,
                registers: crate::exit::describe_registers(fd),
            }),
            Ok(VcpuExit::SystemEvent(kind, _)) => Next::Stop(VmExit::SystemEvent(kind)),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Next::Stop(VmExit::Fatal(format!(
                "KVM could not enter vCPU {} (hardware entry failure reason {reason:#x} on host CPU {cpu})",
                self.id
            ))),
            Ok(VcpuExit::InternalError) => Next::Stop(VmExit::Fatal(format!(
                "KVM internal error on vCPU {} (an instruction KVM cannot emulate?): {}",
                self.id,
                crate::exit::describe_registers(fd)
            ))),
            Ok(other) => Next::Stop(VmExit::Fatal(format!(
                "unexpected KVM exit on vCPU {}: {other:?}",
                self.id
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                count(&exits.kicked);
                fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => Next::Stop(VmExit::Fatal(format!("KVM_RUN failed on vCPU {}: {e}", self.id))),
        }
    }

    fn run_loop(self, control: Arc<VcpuControl>, exit: Arc<ExitNotifier>) {
        let flag: *mut u8 = &mut self.lock_fd().get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(flag));
        while control.wait_while_paused(|| self.settle()) {
            let next = self.run_once(&mut self.lock_fd(), &control.exits);
            if let Next::Stop(reason) = next {
                warn_if_fatal(&reason);
                exit.notify(reason);
                control.request_exit();
                break;
            }
        }
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
        debug!(vcpu = self.id, "vCPU thread exits");
    }
}

impl Vcpu {
    /// Completes the I/O of the last exit inside KVM. The kernel finishes a port I/O or MMIO
    /// instruction (loads the value read, advances RIP, continues a string operation) only when
    /// `KVM_RUN` is next entered; state read before that is not consistent (KVM API docs,
    /// `KVM_EXIT_IO`). `KVM_RUN` with `immediate_exit` set completes it and returns `EINTR`
    /// without running guest code.
    fn settle(&self) {
        let mut fd = self.lock_fd();
        fd.set_kvm_immediate_exit(1);
        match fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => warn!(
                vcpu = self.id,
                "settling the vCPU before a pause failed: {e}"
            ),
            Ok(exit) => warn!(vcpu = self.id, "unexpected exit while settling: {exit:?}"),
        }
        fd.set_kvm_immediate_exit(0);
    }

    fn lock_fd(&self) -> MutexGuard<'_, KvmVcpu> {
        self.fd.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn warn_if_fatal(reason: &VmExit) {
    if !matches!(reason, VmExit::Guest(_)) {
        warn!("VM stops: {reason}");
    }
}

/// Starts one thread per vCPU; they run until the VM exits.
pub fn start_vcpus(
    vcpus: Vec<Vcpu>,
    exit: Arc<ExitNotifier>,
) -> Result<Arc<VcpuControl>, VcpuError> {
    register_kick_handler()?;
    let control = Arc::new(VcpuControl {
        exits: ExitCounters::default(),
        state: Mutex::new(ControlState {
            target: Target::Run,
            parked: 0,
        }),
        changed: Condvar::new(),
        threads: Mutex::new(Vec::new()),
        fds: vcpus.iter().map(|v| v.fd.clone()).collect(),
    });
    for vcpu in vcpus {
        let id = vcpu.id;
        let (c, e) = (control.clone(), exit.clone());
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu.run_loop(c, e));
        match handle {
            Ok(h) => control
                .threads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(h),
            Err(err) => {
                control.request_exit();
                control.join();
                return Err(VcpuError::Spawn(id, err));
            }
        }
    }
    Ok(control)
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("id", &self.id).finish()
    }
}
