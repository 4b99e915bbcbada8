//! QEMU driven over QMP for the comparisons: boot the same guest, checkpoint it with
//! stop-and-copy or the `background-snapshot` migration capability (userfaultfd write-protect),
//! restore it with `-incoming`, migrate it live to another QEMU (pre-copy, post-copy). QEMU's
//! serial console is copied into [`Stamps`] as it arrives.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thiserror::Error;

use crate::bench::common::Stamps;

/// The QEMU binary this benchmark drives.
pub const QEMU: &str = "qemu-system-x86_64";

/// How long QEMU may take to open its QMP socket.
const QMP_WAIT: Duration = Duration::from_secs(30);
/// `max-bandwidth` for a migration without limit: 1 TiB/s, in bytes per second.
const UNTHROTTLED: u64 = 1 << 40;
/// How long a migration to a file may take.
const MIGRATE_WAIT: Duration = Duration::from_secs(300);

/// Errors of driving QEMU.
#[derive(Debug, Error)]
pub enum QemuError {
    /// `qemu-system-x86_64` is not on `PATH`.
    #[error("{QEMU} not found: apt-get install qemu-system-x86")]
    NotFound,
    /// QEMU could not be started.
    #[error("cannot start {QEMU}")]
    Spawn(#[source] std::io::Error),
    /// QEMU never opened its QMP socket (its log says why).
    #[error("QEMU did not open its QMP socket {sock} (log: {log})")]
    NoSocket {
        /// The socket path.
        sock: PathBuf,
        /// QEMU's standard error.
        log: PathBuf,
    },
    /// Reading or writing the QMP socket.
    #[error("QMP I/O")]
    Io(#[from] std::io::Error),
    /// A QMP line that is not JSON.
    #[error("QMP sent something that is not JSON")]
    Json(#[from] serde_json::Error),
    /// QEMU closed the QMP connection.
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// A command failed.
    #[error("QMP {command}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's description of the error.
        desc: String,
    },
    /// A migration ended in a state other than `completed`.
    #[error("migration {status}: {desc}")]
    Migration {
        /// Final status.
        status: String,
        /// QEMU's error description, if any.
        desc: String,
    },
    /// A migration took too long.
    #[error("migration did not complete within {0:?}")]
    Timeout(Duration),
}

/// Fails with [`QemuError::NotFound`] unless `qemu-system-x86_64` is on `PATH`.
pub fn check_installed() -> Result<(), QemuError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|d| d.join(QEMU).is_file()) {
        Ok(())
    } else {
        Err(QemuError::NotFound)
    }
}

/// QEMU's version line (`QEMU emulator version …`).
pub fn version() -> String {
    Command::new(QEMU)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A QMP connection: line-delimited JSON, asynchronous events interleaved with replies.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(stream: UnixStream) -> Result<Self, QemuError> {
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        qmp.read_message()?; // the greeting
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, QemuError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QemuError::Closed);
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs `command` and returns its `return` value, skipping events.
    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QemuError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        writeln!(self.writer, "{msg}")?;
        loop {
            let mut reply = self.read_message()?;
            if let Some(ret) = reply.get_mut("return") {
                return Ok(ret.take());
            }
            if let Some(err) = reply.get("error") {
                return Err(QemuError::Command {
                    command: command.into(),
                    desc: err["desc"].as_str().unwrap_or("no description").into(),
                });
            }
            // Anything else is an asynchronous event (STOP, RESUME, MIGRATION, …).
        }
    }
}

/// What QEMU says about a finished migration.
pub struct MigrationReport {
    /// `downtime` (the VM stop QEMU itself needed), in microseconds, when reported.
    pub downtime_us: Option<u64>,
    /// `total-time`: from the `migrate` command until complete, in microseconds.
    pub total_us: Option<u64>,
    /// `ram.transferred`: bytes of the migration stream.
    pub bytes: Option<u64>,
    /// `ram.dirty-sync-count`: the dirty bitmap syncs (one at the start, one each time QEMU
    /// looks again at what the guest wrote, one at the switch-over).
    pub dirty_syncs: Option<u64>,
}

/// One look at a migration under way.
pub enum MigrationState {
    /// Not complete yet; the dirty bitmap syncs so far (2 once the first pass is over).
    Active { dirty_syncs: u64 },
    /// Complete.
    Completed(MigrationReport),
}

/// The largest `downtime-limit` QEMU accepts (2000 s), in milliseconds: a pre-copy given it
/// stops the VM and copies the rest at its next look at what is left.
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

/// A running QEMU with the test guest.
pub struct Qemu {
    child: Child,
    qmp: Qmp,
    console: Option<JoinHandle<()>>,
    /// The guest's progress stamps.
    pub stamps: Stamps,
}

/// How to start QEMU.
#[derive(Clone, Copy)]
pub struct QemuConfig<'a> {
    /// The guest kernel (PVH ELF).
    pub kernel: &'a Path,
    /// Guest memory in bytes.
    pub mem: u64,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Directory for the QMP socket and QEMU's log.
    pub dir: &'a Path,
    /// Wait for a migration stream at this `-incoming` address (`exec:cat FILE`,
    /// `tcp:HOST:PORT`) instead of booting.
    pub incoming: Option<&'a str>,
}

impl Qemu {
    /// Starts QEMU on KVM. The `pc` machine puts 3 GiB of RAM below 4 GiB, as cowvm does, so
    /// the guest's working set is the same on both systems.
    pub fn start(config: &QemuConfig<'_>) -> Result<Qemu, QemuError> {
        let sock = config.dir.join("qmp.sock");
        let log = config.dir.join("qemu.log");
        std::fs::remove_file(&sock).ok();
        let mut cmd = Command::new(QEMU);
        cmd.args([
            "-accel",
            "kvm",
            "-M",
            "pc",
            "-cpu",
            "host,-arch-capabilities",
        ])
        .args(["-m", &format!("{}M", config.mem >> 20)])
        .args(["-display", "none", "-monitor", "none", "-nodefaults"])
        .args(["-no-user-config", "-no-reboot", "-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .arg("-kernel")
        .arg(config.kernel)
        .args(["-append", config.cmdline]);
        if let Some(uri) = config.incoming {
            cmd.args(["-incoming", uri]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .map_err(QemuError::Spawn)?;
        let stamps = Stamps::default();
        let console = child.stdout.take().map(|mut out| {
            let mut sink = stamps.clone();
            std::thread::spawn(move || {
                // Ends when QEMU exits; the copy itself cannot fail on the sink side.
                let _ = std::io::copy(&mut out, &mut sink);
            })
        });
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < QMP_WAIT && child.try_wait()?.is_none() => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => {
                    // Reap QEMU here: no `Qemu` exists yet to do it on drop.
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(QemuError::NoSocket { sock, log });
                }
            }
        };
        Ok(Qemu {
            qmp: Qmp::connect(stream)?,
            child,
            console,
            stamps,
        })
    }

    /// Starts QEMU restoring the migration stream in `file` (`-incoming`) and returns once the
    /// VM runs (all of the stream read).
    pub fn restore(config: &QemuConfig<'_>, file: &Path) -> Result<Qemu, QemuError> {
        let uri = format!("exec:cat {}", file.display());
        let mut vm = Qemu::start(&QemuConfig {
            incoming: Some(&uri),
            ..*config
        })?;
        vm.finish_incoming()?;
        Ok(vm)
    }

    /// Lifts QEMU's migration bandwidth limit (`max-bandwidth`, 128 MiB/s by default), so that
    /// saving a stopped VM runs at the speed of the host.
    pub fn unthrottle_migration(&mut self) -> Result<(), QemuError> {
        self.qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": UNTHROTTLED })),
        )?;
        Ok(())
    }

    /// Sets the longest pause a pre-copy may take to copy what is left (`downtime-limit`,
    /// 300 ms by default); QEMU applies a new value at its next look at what is left.
    pub fn set_downtime_limit(&mut self, ms: u64) -> Result<(), QemuError> {
        self.qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "downtime-limit": ms })),
        )?;
        Ok(())
    }

    /// Enables QEMU's live snapshot: migration with userfaultfd write-protect of guest memory.
    pub fn enable_background_snapshot(&mut self) -> Result<(), QemuError> {
        self.enable_capability("background-snapshot")
    }

    /// Allows post-copy (`postcopy-ram`): needed on both the source and the destination.
    pub fn enable_postcopy(&mut self) -> Result<(), QemuError> {
        self.enable_capability("postcopy-ram")
    }

    fn enable_capability(&mut self, capability: &str) -> Result<(), QemuError> {
        self.qmp.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": capability, "state": true}]})),
        )?;
        Ok(())
    }

    /// Stops the vCPUs.
    pub fn stop(&mut self) -> Result<(), QemuError> {
        self.qmp.execute("stop", None).map(drop)
    }

    /// Resumes the vCPUs.
    pub fn cont(&mut self) -> Result<(), QemuError> {
        self.qmp.execute("cont", None).map(drop)
    }

    /// Migrates the VM into `file` and waits until QEMU reports the migration complete.
    pub fn migrate_to_file(&mut self, file: &Path) -> Result<MigrationReport, QemuError> {
        self.start_migration(&format!("exec:cat > {}", file.display()))?;
        let start = Instant::now();
        loop {
            match self.migration_state()? {
                MigrationState::Completed(report) => return Ok(report),
                _ if start.elapsed() > MIGRATE_WAIT => {
                    return Err(QemuError::Timeout(MIGRATE_WAIT))
                }
                MigrationState::Active { .. } => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    /// Starts migrating the VM to `uri` (`exec:CMD`, `tcp:HOST:PORT`) and returns at once.
    pub fn start_migration(&mut self, uri: &str) -> Result<(), QemuError> {
        self.qmp
            .execute("migrate", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// Switches a migration under way to post-copy: the destination runs the VM at once and
    /// fetches the pages not sent yet as it touches them (`postcopy-ram` enabled on both).
    pub fn start_postcopy(&mut self) -> Result<(), QemuError> {
        self.qmp.execute("migrate-start-postcopy", None).map(drop)
    }

    /// Where the migration stands (`query-migrate`); a failed or cancelled one is an error.
    pub fn migration_state(&mut self) -> Result<MigrationState, QemuError> {
        let info = self.qmp.execute("query-migrate", None)?;
        let ram = &info["ram"];
        match info["status"].as_str().unwrap_or("") {
            "completed" => Ok(MigrationState::Completed(MigrationReport {
                downtime_us: info["downtime"].as_u64().map(|ms| ms * 1000),
                total_us: info["total-time"].as_u64().map(|ms| ms * 1000),
                bytes: ram["transferred"].as_u64(),
                dirty_syncs: ram["dirty-sync-count"].as_u64(),
            })),
            status @ ("failed" | "cancelled") => Err(QemuError::Migration {
                status: status.into(),
                desc: info["error-desc"].as_str().unwrap_or("").into(),
            }),
            _ => Ok(MigrationState::Active {
                dirty_syncs: ram["dirty-sync-count"].as_u64().unwrap_or(0),
            }),
        }
    }

    /// Waits for an incoming migration (`-incoming`) to complete, then runs the VM if QEMU
    /// left it paused (a source stopped for stop-and-copy migrates a stopped VM).
    pub fn finish_incoming(&mut self) -> Result<(), QemuError> {
        let start = Instant::now();
        loop {
            let status = self.qmp.execute("query-status", None)?;
            match status["status"].as_str().unwrap_or("") {
                "running" => return Ok(()),
                "inmigrate" if start.elapsed() > MIGRATE_WAIT => {
                    return Err(QemuError::Timeout(MIGRATE_WAIT))
                }
                "inmigrate" => std::thread::sleep(Duration::from_millis(1)),
                _ => return self.cont(),
            }
        }
    }

    /// Whether QEMU's process is still alive.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        // Best effort: a QEMU that already exited makes both calls fail harmlessly.
        let _ = self.qmp.execute("quit", None);
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(console) = self.console.take() {
            let _ = console.join();
        }
    }
}
