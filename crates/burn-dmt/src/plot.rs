//! The plots a run writes (`loss.png`, `memory.png`) and the experiment
//! suite's (`capacity.png`, ...), drawn with `plotters` on its bitmap
//! backend. Text is rendered with DejaVu Sans, bundled in
//! `assets/fonts` with its licence and registered with plotters' `ab_glyph`
//! renderer, so no system font is needed. Every chart has a title, labelled
//! axes with units and tick values, and a legend.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::distill::StepMetrics;
use crate::{DmtError, Result};

/// The family name the bundled font is registered under.
const FONT: &str = "sans-serif";

/// DejaVu Sans (Bitstream Vera licence, `assets/fonts/LICENSE`).
static DEJAVU_SANS: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// Colours of successive series.
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut ok = true;
    ONCE.call_once(|| ok = plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS).is_ok());
    if ok {
        Ok(())
    } else {
        Err(DmtError::InvalidArgument("the bundled font could not be read".into()))
    }
}

/// One named line of `(x, y)` points.
#[derive(Clone, Debug)]
pub struct Series {
    /// Its legend entry.
    pub name: String,
    /// Its points (non-finite ones are skipped).
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series of `ys` against 1, 2, 3, ...
    pub fn by_step(name: &str, ys: &[f64]) -> Self {
        Series {
            name: name.to_string(),
            points: ys.iter().enumerate().map(|(i, &y)| ((i + 1) as f64, y)).collect(),
        }
    }
}

/// What one chart shows.
#[derive(Clone, Debug)]
pub struct Chart<'a> {
    /// Title above the plot.
    pub title: &'a str,
    /// x-axis label, with its unit.
    pub x_label: &'a str,
    /// y-axis label, with its unit.
    pub y_label: &'a str,
    /// Base-10 logarithmic x axis.
    pub log_x: bool,
    /// The lines.
    pub series: Vec<Series>,
}

fn err(path: &Path) -> impl Fn(String) -> DmtError + '_ {
    move |e| DmtError::InvalidArgument(format!("drawing {}: {e}", path.display()))
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= 1e-9 * hi.abs().max(1.0) {
        // A flat series: a unit band around it.
        let pad = (0.1 * hi.abs()).max(1.0);
        return (lo - pad, hi + pad);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

/// A tick label: whole numbers without decimals, others with up to four
/// significant digits.
fn tick(v: &f64) -> String {
    if v.fract().abs() < 1e-9 || v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else {
        let digits = (3 - v.abs().log10().floor() as i32).clamp(0, 6) as usize;
        format!("{v:.digits$}")
    }
}

fn draw<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, chart: &Chart<'_>) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let (x0, x1) = range(chart.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
    let (y0, y1) = range(chart.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(chart.title, (FONT, 22))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(72);
    macro_rules! body {
        ($ctx:expr) => {{
            let mut ctx = $ctx;
            ctx.configure_mesh()
                .x_desc(chart.x_label)
                .y_desc(chart.y_label)
                .axis_desc_style((FONT, 16))
                .label_style((FONT, 13))
                .light_line_style(WHITE.mix(0.0))
                .x_label_formatter(&tick)
                .y_label_formatter(&tick)
                .draw()
                .map_err(|e| e.to_string())?;
            for (i, s) in chart.series.iter().enumerate() {
                let colour = PALETTE[i % PALETTE.len()];
                let points: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|(x, y)| x.is_finite() && y.is_finite())
                    .collect();
                let many = points.len() > 40;
                ctx.draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
                    .map_err(|e| e.to_string())?
                    .label(s.name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
                if !many {
                    ctx.draw_series(points.into_iter().map(|p| Circle::new(p, 3, colour.filled())))
                        .map_err(|e| e.to_string())?;
                }
            }
            ctx.configure_series_labels()
                .label_font((FONT, 13))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(|e| e.to_string())?;
        }};
    }
    if chart.log_x {
        let (lx0, lx1) = (x0.max(1e-12), x1.max(x0.max(1e-12) * 1.01));
        body!(
            builder
                .build_cartesian_2d((lx0..lx1).log_scale(), y0..y1)
                .map_err(|e| e.to_string())?
        );
    } else {
        body!(builder.build_cartesian_2d(x0..x1, y0..y1).map_err(|e| e.to_string())?);
    }
    Ok(())
}

/// Draws `charts` in a grid of `columns` into one PNG of `size` pixels.
pub fn charts(path: &Path, size: (u32, u32), columns: usize, charts: &[Chart<'_>]) -> Result<()> {
    register_font()?;
    let e = err(path);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let columns = columns.max(1);
    let rows = charts.len().div_ceil(columns).max(1);
    for (area, chart) in root.split_evenly((rows, columns)).iter().zip(charts) {
        draw(area, chart).map_err(&e)?;
    }
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}

/// `loss.png`: the training loss and its terms per step.
pub fn loss_curves(path: &Path, series: &[(&str, &[f64])]) -> Result<()> {
    let chart = Chart {
        title: "Training loss",
        x_label: "step",
        y_label: "loss (nats per token)",
        log_x: false,
        series: series.iter().map(|(n, ys)| Series::by_step(n, ys)).collect(),
    };
    charts(path, (960, 560), 1, &[chart])
}

/// `memory.png`: each memory layer's rows, and its inserts, merges and
/// evictions per step. Returns `false` (and draws nothing) when the run has
/// no memory layer.
pub fn memory_curves(path: &Path, steps: &[StepMetrics]) -> Result<bool> {
    let blocks: Vec<usize> = steps
        .first()
        .map_or(Vec::new(), |m| m.memory.iter().map(|l| l.block).collect());
    if blocks.is_empty() {
        return Ok(false);
    }
    let per_block = |f: fn(&crate::distill::LayerStep) -> f64| -> Vec<Series> {
        blocks
            .iter()
            .map(|&b| Series {
                name: format!("block {b}"),
                points: steps
                    .iter()
                    .filter_map(|m| m.memory.iter().find(|l| l.block == b).map(|l| (m.step as f64, f(l))))
                    .collect(),
            })
            .collect()
    };
    let chart = |title, y_label, series| Chart {
        title,
        x_label: "step",
        y_label,
        log_x: false,
        series,
    };
    charts(
        path,
        (1280, 880),
        2,
        &[
            chart("Memory rows per layer", "rows held", per_block(|l| l.rows as f64)),
            chart("New memories per step", "inserted", per_block(|l| l.inserted as f64)),
            chart(
                "Recombinations per step",
                "merged memories",
                per_block(|l| l.merged as f64),
            ),
            chart("Evictions per step (LRFU)", "evicted", per_block(|l| l.evicted as f64)),
        ],
    )?;
    Ok(true)
}
