//! A small mutation-fuzzing harness that runs on stable Rust, as ordinary `#[test]`s.
//!
//! ```no_run
//! #[test]
//! fn fuzz_my_parser() {
//!     let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/my-parser");
//!     let report = fuzzkit::run("my-parser", corpus, |data| {
//!         let _ = my_parser(data); // any Err is fine; a panic or a hang is a bug
//!     });
//!     assert!(report.iterations > 0);
//! }
//! # fn my_parser(_: &[u8]) -> Result<(), ()> { Ok(()) }
//! ```
//!
//! [`run`] feeds the target every file of the seed corpus, then mutations of them (bit flips,
//! byte and integer overwrites with boundary values, splices of two seeds, insertions,
//! deletions, truncation) drawn from a seeded PRNG, until its time is up. A target that needs
//! structure beyond raw bytes (operations to apply, offsets to read) can draw it from its
//! input with [`arbitrary::Unstructured`], re-exported here, so the input alone replays it.
//!
//! Environment:
//! * `COWVM_FUZZ_SECS` — seconds per target (default 2: fast enough for CI; set hours locally).
//! * `COWVM_FUZZ_SEED` — the PRNG seed (default: from the clock; the report prints it).
//! * `COWVM_FUZZ_TIMEOUT_SECS` — one input running longer is a hang (default 20).
//! * `COWVM_FUZZ_REPLAY` — a file: run only that input (a saved crash), then stop.
//!
//! A panicking input is saved to `target/fuzz-crashes/<target>/crash-<hash>` and the panic is
//! raised again with that path; a hanging one is saved as `hang-<hash>` and the process exits
//! with status 1 (a hung thread cannot be stopped). Add the saved file to the corpus as the
//! regression test once the bug is fixed.

#![forbid(unsafe_code)]

mod mutate;

use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use arbitrary;

use mutate::{Mutator, Rng};

/// What a fuzzing run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub target: String,
    /// Inputs run, seeds included.
    pub iterations: u64,
    /// Seed corpus files run.
    pub seeds: usize,
    pub elapsed: Duration,
    /// The PRNG seed (set `COWVM_FUZZ_SEED` to it to run the same inputs again).
    pub seed: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fuzz {}: {} iterations ({} seeds) in {:.1} s, COWVM_FUZZ_SEED={}",
            self.target,
            self.iterations,
            self.seeds,
            self.elapsed.as_secs_f64(),
            self.seed
        )
    }
}

struct Config {
    duration: Duration,
    seed: u64,
    timeout: Duration,
    replay: Option<PathBuf>,
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a whole number")),
    )
}

impl Config {
    fn from_env() -> Config {
        let clock = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Config {
            duration: Duration::from_secs_f64(
                std::env::var("COWVM_FUZZ_SECS")
                    .ok()
                    .and_then(|s| s.parse::<f64>().ok())
                    .unwrap_or(2.0),
            ),
            seed: env_u64("COWVM_FUZZ_SEED")
                .unwrap_or((clock.as_nanos() as u64) ^ u64::from(std::process::id())),
            timeout: Duration::from_secs(env_u64("COWVM_FUZZ_TIMEOUT_SECS").unwrap_or(20)),
            replay: std::env::var_os("COWVM_FUZZ_REPLAY").map(PathBuf::from),
        }
    }
}

/// Reads every file of `dir` (sorted by name). A missing directory is an empty corpus.
fn load_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display())))
        .collect()
}

/// `target/` of the workspace: the ancestor of the test binary that cargo marked with
/// `CACHEDIR.TAG`, else `CARGO_TARGET_DIR`, else `./target`.
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .find(|d| d.join("CACHEDIR.TAG").is_file())
                .map(Path::to_owned)
        })
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// FNV-1a: names a saved input by its content.
fn content_hash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn save_input(target: &str, kind: &str, data: &[u8]) -> PathBuf {
    let dir = target_dir().join("fuzz-crashes").join(target);
    let path = dir.join(format!("{kind}-{:016x}", content_hash(data)));
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, data)) {
        eprintln!(
            "fuzz {target}: cannot save the input to {}: {e}",
            path.display()
        );
    }
    path
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// The input being run and since when, watched by a thread that reports hangs.
struct Watchdog {
    current: Arc<Mutex<Vec<u8>>>,
    started_ms: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    origin: Instant,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(target: &str, timeout: Duration) -> Watchdog {
        let current = Arc::new(Mutex::new(Vec::new()));
        let started_ms = Arc::new(AtomicU64::new(u64::MAX));
        let done = Arc::new(AtomicBool::new(false));
        let origin = Instant::now();
        let (cur, started, stop, name) = (
            Arc::clone(&current),
            Arc::clone(&started_ms),
            Arc::clone(&done),
            target.to_owned(),
        );
        let thread = std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let since = started.load(Ordering::Relaxed);
                let now = origin.elapsed().as_millis() as u64;
                if since != u64::MAX && now.saturating_sub(since) > timeout.as_millis() as u64 {
                    let data = cur.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let path = save_input(&name, "hang", &data);
                    eprintln!(
                        "fuzz {name}: an input ran over {} s: saved to {}",
                        timeout.as_secs(),
                        path.display()
                    );
                    std::process::exit(1);
                }
            }
        });
        Watchdog {
            current,
            started_ms,
            done,
            origin,
            thread: Some(thread),
        }
    }

    fn begin(&self, data: &[u8]) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        current.clear();
        current.extend_from_slice(data);
        drop(current);
        self.started_ms
            .store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn end(&self) {
        self.started_ms.store(u64::MAX, Ordering::Relaxed);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `f` on the seed corpus in `corpus_dir`, then on mutations of it until
/// `COWVM_FUZZ_SECS` have passed, and returns what it did (also printed to stderr).
///
/// `target` names the target in reports and in `target/fuzz-crashes/<target>/`. `f` must
/// treat its input as untrusted: returning (whatever the result) is a pass, a panic or a
/// hang is a failure. On a panic the input is saved and the panic raised again with its path.
pub fn run(target: &str, corpus_dir: impl AsRef<Path>, f: impl Fn(&[u8])) -> Report {
    let config = Config::from_env();
    let start = Instant::now();
    let watchdog = Watchdog::start(target, config.timeout);
    let run_one = |data: &[u8], iteration: u64| {
        watchdog.begin(data);
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| f(data)));
        watchdog.end();
        if let Err(payload) = outcome {
            let path = save_input(target, "crash", data);
            panic!(
                "fuzz {target}: input {iteration} (COWVM_FUZZ_SEED={}) panicked: {}; input saved to {}",
                config.seed,
                panic_message(payload.as_ref()),
                path.display()
            );
        }
    };
    if let Some(path) = &config.replay {
        let data =
            std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        run_one(&data, 0);
        let report = Report {
            target: target.to_owned(),
            iterations: 1,
            seeds: 0,
            elapsed: start.elapsed(),
            seed: config.seed,
        };
        eprintln!("{report} (replayed {})", path.display());
        return report;
    }
    let mut corpus = load_corpus(corpus_dir.as_ref());
    let seeds = corpus.len();
    let mut iterations = 0;
    for data in &corpus {
        run_one(data, iterations);
        iterations += 1;
    }
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let mut mutator = Mutator::new(Rng::new(config.seed), &corpus);
    let mut input = Vec::new();
    while start.elapsed() < config.duration {
        mutator.next_input(&corpus, &mut input);
        run_one(&input, iterations);
        iterations += 1;
    }
    let report = Report {
        target: target.to_owned(),
        iterations,
        seeds,
        elapsed: start.elapsed(),
        seed: config.seed,
    };
    eprintln!("{report}");
    report
}
