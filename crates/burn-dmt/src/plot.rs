//! `loss.png` of a distillation run, drawn with `plotters` (bitmap backend,
//! no text: the report states the axes and colours, so no font is needed).

use std::path::Path;

use plotters::prelude::*;

use crate::{DmtError, Result};

/// The colours of the curves, in the order of `series`, as the report names them.
pub const COLOURS: [(&str, RGBColor); 3] = [("blue", BLUE), ("red", RED), ("green", GREEN)];

/// Draws up to three series against the step (x from 1 to the longest
/// series, y linear from the smallest to the largest value, with a 5%
/// margin) into an 800 × 480 PNG at `path`. Returns the y range.
pub fn loss_curves(path: &Path, series: &[&[f64]]) -> Result<(f64, f64)> {
    let err = |e: String| DmtError::InvalidArgument(format!("drawing {}: {e}", path.display()));
    let n = series.iter().map(|s| s.len()).max().unwrap_or(0).max(2);
    let finite = series.iter().flat_map(|s| s.iter()).copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo.is_finite() {
        (lo, hi.max(lo + 1e-9))
    } else {
        (0.0, 1.0)
    };
    let pad = 0.05 * (hi - lo);
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let area = root.margin(20, 20, 20, 20);
    let mut chart = ChartBuilder::on(&area)
        .build_cartesian_2d(1f64..n as f64, (lo - pad)..(hi + pad))
        .map_err(|e| err(e.to_string()))?;
    chart
        .plotting_area()
        .draw(&Rectangle::new(
            [(1.0, lo - pad), (n as f64, hi + pad)],
            ShapeStyle::from(&BLACK).stroke_width(1),
        ))
        .map_err(|e| err(e.to_string()))?;
    for (s, (_, colour)) in series.iter().zip(COLOURS) {
        let points = s
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, v)| ((i + 1) as f64, *v));
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok((lo, hi))
}
