//! Human-readable output: aligned tables (comfy-table) and short renderings
//! of vectors, tags and sizes.

use std::collections::BTreeMap;

use comfy_table::presets::NOTHING;
use comfy_table::{ContentArrangement, Table as Comfy};

/// A table printed with aligned columns and no borders.
pub struct Table {
    inner: Comfy,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Self {
        let mut inner = Comfy::new();
        inner
            .load_preset(NOTHING)
            .set_content_arrangement(ContentArrangement::Disabled)
            .set_header(headers.iter().map(|h| h.to_string()));
        Table { inner }
    }

    /// Adds a row.
    pub fn row<I: IntoIterator<Item = String>>(&mut self, cells: I) {
        self.inner.add_row(cells.into_iter().collect::<Vec<_>>());
    }

    /// Prints the table with its header.
    pub fn print(&self) {
        print_lines(&self.inner.to_string());
    }

    /// Prints the rows only (a two-column list of names and values).
    pub fn print_headless(self) {
        // The empty header renders as a blank line, which is dropped.
        print_lines(&self.inner.to_string());
    }
}

/// Prints rendered table lines without their padding at the end, and
/// without blank lines.
fn print_lines(text: &str) {
    for line in text.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
        println!("{line}");
    }
}

/// A size in bytes as people read it.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit} ({n} bytes)")
}

/// Tags as `name` (or `name×count` when counted more than once), comma-separated.
pub fn tags(tags: &BTreeMap<String, u64>) -> String {
    tags.iter()
        .map(|(t, &n)| if n == 1 { t.clone() } else { format!("{t}×{n}") })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A vector: every number with `full`, else its first four and its norm.
pub fn vector(v: &[f32], full: bool) -> String {
    const HEAD: usize = 4;
    if full || v.len() <= HEAD {
        return format!("[{}]", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", "));
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    format!(
        "[{}, … {} more] ‖·‖ {norm:.4}",
        v[..HEAD]
            .iter()
            .map(|x| format!("{x:.4}"))
            .collect::<Vec<_>>()
            .join(", "),
        v.len() - HEAD
    )
}
