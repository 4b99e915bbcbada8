//! SVG plots for the benchmarks (plotters' SVG backend: no system fonts or C libraries needed).

use std::path::Path;

use anyhow::{anyhow, Context};
use plotters::prelude::*;

/// One named line of (x, y) points.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points in drawing order.
    pub points: Vec<(f64, f64)>,
}

/// Axis and title texts of a line chart.
pub struct Chart<'a> {
    /// Title above the plot.
    pub title: &'a str,
    /// X axis description.
    pub x_label: &'a str,
    /// Y axis description.
    pub y_label: &'a str,
    /// Logarithmic X axis.
    pub log_x: bool,
}

fn bounds(series: &[Series], pick: impl Fn(&(f64, f64)) -> f64) -> (f64, f64) {
    let values = series.iter().flat_map(|s| s.points.iter().map(&pick));
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo.is_finite() && hi > lo {
        (lo, hi)
    } else {
        (0.0, 1.0)
    }
}

/// Draws `series` as lines with markers into an SVG file at `path`.
pub fn line_chart(path: &Path, chart: &Chart<'_>, series: &[Series]) -> anyhow::Result<()> {
    draw_chart(path, chart, series, false)
}

/// As [`line_chart`], with a logarithmic Y axis (for values spanning several decades).
pub fn line_chart_log_y(path: &Path, chart: &Chart<'_>, series: &[Series]) -> anyhow::Result<()> {
    draw_chart(path, chart, series, true)
}

fn draw_chart(
    path: &Path,
    chart: &Chart<'_>,
    series: &[Series],
    log_y: bool,
) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("plot {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (x0, x1) = bounds(series, |p| p.0);
    let (y0, y1) = bounds(series, |p| p.1);
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64);
    let palette = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK];
    macro_rules! draw {
        ($ctx:expr) => {{
            let mut ctx = $ctx;
            ctx.configure_mesh()
                .x_desc(chart.x_label)
                .y_desc(chart.y_label)
                .draw()
                .map_err(|e| err(&e))?;
            for (i, s) in series.iter().enumerate() {
                let color = palette[i % palette.len()];
                ctx.draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label(s.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
                ctx.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(|e| err(&e))?;
            }
            ctx.configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(&e))?;
        }};
    }
    let y_log = (y0.max(1e-9) / 2.0)..(y1 * 2.0);
    if chart.log_x && log_y {
        draw!(builder
            .build_cartesian_2d((x0.max(1e-9)..x1).log_scale(), y_log.log_scale())
            .map_err(|e| err(&e))?);
    } else if chart.log_x {
        draw!(builder
            .build_cartesian_2d((x0.max(1e-9)..x1).log_scale(), 0.0..y1 * 1.1)
            .map_err(|e| err(&e))?);
    } else if log_y {
        draw!(builder
            .build_cartesian_2d(x0..x1, y_log.log_scale())
            .map_err(|e| err(&e))?);
    } else {
        draw!(builder
            .build_cartesian_2d(x0..x1, 0.0..y1 * 1.1)
            .map_err(|e| err(&e))?);
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
