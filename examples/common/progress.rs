//! How the examples show what the library reports: `tracing` events printed
//! one per line on stderr by tracing-subscriber's `fmt` layer (level from
//! `RUST_LOG`, `info` by default), and an `indicatif` bar driven by the
//! events that carry `step` and `steps` fields (the training loops' progress
//! events). Lines are printed above the bar (`ProgressBar::suspend`), and the
//! bar draws only on a terminal, so logs piped to a file hold the lines alone.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressStyle};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber and returns the bar it drives (hidden until
/// the first progress event).
pub fn init() -> ProgressBar {
    let bar = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template("step {pos}/{len} [{bar:30}] {elapsed_precise} (eta {eta})") {
        bar.set_style(style.progress_chars("=> "));
    }
    let lines = bar.clone();
    let fmt = tracing_subscriber::fmt::layer()
        .without_time()
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(move || Line(lines.clone(), Vec::new()))
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")));
    // A second `init` (or another subscriber already set) keeps the first.
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(StepBar(bar.clone()))
        .try_init();
    bar
}

/// One formatted event, written to stderr above the bar when dropped.
struct Line(ProgressBar, Vec<u8>);

impl Write for Line {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.1.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let text = std::mem::take(&mut self.1);
        self.0.suspend(|| {
            let _ = std::io::stderr().lock().write_all(&text);
        });
    }
}

/// Moves the bar to the `step` of `steps` an event reports.
struct StepBar(ProgressBar);

#[derive(Default)]
struct Steps {
    step: Option<u64>,
    steps: Option<u64>,
}

impl Visit for Steps {
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "step" => self.step = Some(value),
            "steps" => self.steps = Some(value),
            _ => {}
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        if let Ok(v) = u64::try_from(value) {
            self.record_u64(field, v);
        }
    }
    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

impl<S: Subscriber> Layer<S> for StepBar {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut s = Steps::default();
        event.record(&mut s);
        if let (Some(step), Some(steps)) = (s.step, s.steps) {
            // A new loop (the attention-only baseline after the student, say).
            if self.0.is_finished() || step < self.0.position() {
                self.0.reset();
            }
            self.0.set_length(steps);
            self.0.set_position(step);
            if step >= steps {
                self.0.finish_and_clear();
            }
        }
    }
}
