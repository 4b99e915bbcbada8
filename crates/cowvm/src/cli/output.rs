//! Human output: aligned tables, sizes, durations, progress bars.

use std::io::Write;

use ckpt_format::Metrics;
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Prints `key value` rows with the values aligned.
pub fn table(rows: &[(&str, String)]) {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    for (k, v) in rows {
        // A closed stdout (a pipe to `head`) is not an error worth reporting.
        let _ = writeln!(out, "{k:<width$}  {v}");
    }
}

/// Microseconds as milliseconds text.
pub fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

/// Bytes as binary-prefixed text.
pub fn bytes(n: u64) -> String {
    HumanBytes(n).to_string()
}

/// The rows of a checkpoint's metrics.
pub fn metric_rows(m: &Metrics) -> Vec<(&'static str, String)> {
    let stall = |us: Option<u64>| us.map_or_else(|| "not measured".to_string(), ms);
    let mut rows = Vec::new();
    // A manifest written before the figure existed holds 0.
    if m.guest_lost_us > 0 || m.pause_us == 0 {
        rows.push((
            "guest time lost",
            format!("{} (estimate)", ms(m.guest_lost_us)),
        ));
    }
    rows.extend([
        ("pause", ms(m.pause_us)),
        ("fault stalls", stall(m.stall_us)),
        ("longest stall", stall(m.max_stall_us)),
        ("write-out", ms(m.write_out_us)),
        ("total", ms(m.total_us)),
        ("bytes written", bytes(m.bytes_written)),
        ("pages saved by fault", m.pages_saved_by_fault.to_string()),
        (
            "pages saved in background",
            m.pages_saved_in_background.to_string(),
        ),
        ("zero pages", m.zero_pages.to_string()),
    ]);
    if m.pages_in_parent > 0 {
        rows.push(("pages in parent", m.pages_in_parent.to_string()));
    }
    if !m.phases_us.is_empty() {
        let phases: Vec<String> = m
            .phases_us
            .iter()
            .map(|(name, us)| format!("{name} {}", ms(*us)))
            .collect();
        rows.push(("phases", phases.join(", ")));
    }
    rows
}

/// A byte progress bar on standard error, drawn only when it is a terminal.
pub fn byte_bar(total: u64, message: &'static str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    )
    .expect("the template is valid")
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(message);
    bar
}
