//! The spread over seeds of `memory study`: reads the `continual.csv` of
//! several studies (one per seed: its own student and its own windows),
//! takes each method's end point, and reports per method and setting the
//! mean and sample standard deviation of the changes of cross-entropy and
//! of the memory runs' shares of full finetuning's, each share taken
//! against the best full-finetuning run of the same seed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use crate::stats::mean_sd;

/// Options of `memory spread`.
#[derive(clap::Args, Debug)]
pub struct SpreadArgs {
    /// The studies' CSV files (`continual.csv`), one per seed.
    #[arg(required = true, num_args = 2..)]
    studies: Vec<PathBuf>,
    /// The report to write (Markdown).
    #[arg(long, default_value = "docs/results/continual-seeds.md")]
    out: PathBuf,
}

/// One run's end point: (Δ new, Δ original), in nats.
type End = (f64, f64);

/// A study's runs: `(method, setting)` and its end point.
type Ends = Vec<((String, String), End)>;

/// `(method, setting) → end point` of one study, in the CSV's order.
fn ends(path: &PathBuf) -> Result<Ends, Box<dyn std::error::Error>> {
    // `memory study` writes unquoted fields: no method or setting holds a comma.
    let text = std::fs::read_to_string(path)?;
    let mut first: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
    let mut out: Ends = Vec::new();
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let row: Vec<&str> = line.split(',').collect();
        let field = |i: usize| {
            row.get(i)
                .copied()
                .ok_or_else(|| format!("{}: the row {line:?} has no field {i}", path.display()))
        };
        let key = (field(0)?.to_string(), field(1)?.to_string());
        let (n, o): (f64, f64) = (field(3)?.parse()?, field(4)?.parse()?);
        let start = *first.entry(key.clone()).or_insert((n, o));
        let end = (n - start.0, o - start.1);
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some((_, e)) => *e = end,
            None => out.push((key, end)),
        }
    }
    if out.is_empty() {
        return Err(format!("{}: no runs", path.display()).into());
    }
    Ok(out)
}

/// Writes the report.
pub fn run(a: SpreadArgs) -> Result<(), Box<dyn std::error::Error>> {
    let studies: Vec<Ends> = a.studies.iter().map(ends).collect::<Result<_, _>>()?;
    // Each seed's best full finetuning: the largest reduction on the new text.
    let mut full: Vec<End> = Vec::new();
    for (s, path) in studies.iter().zip(&a.studies) {
        let best = s
            .iter()
            .filter(|((m, _), _)| m == "finetune: all weights")
            .map(|(_, e)| *e)
            .min_by(|x, y| x.0.total_cmp(&y.0))
            .ok_or_else(|| format!("{}: no full-finetuning run to compare with", path.display()))?;
        full.push(best);
    }
    // Rows present in every study, in the first one's order.
    let keys: Vec<(String, String)> = studies[0]
        .iter()
        .map(|(k, _)| k.clone())
        .filter(|k| studies.iter().all(|s| s.iter().any(|(x, _)| x == k)))
        .collect();
    let mut md = String::new();
    writeln!(md, "# Learning against forgetting over seeds\n")?;
    writeln!(
        md,
        "Command: `cargo run --release --example memory -- {}`. Studies (one per seed: its student trained by \
         `distill_gpt2 --seed S`, every method's windows drawn with `memory study --seed S`):\n",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    )?;
    for (p, f) in a.studies.iter().zip(&full) {
        writeln!(
            md,
            "- `{}`: best full finetuning Δ new {:.4}, Δ original {:+.4}",
            p.display(),
            f.0,
            f.1
        )?;
    }
    writeln!(
        md,
        "\nMean ± sample standard deviation over the {} seeds. Shares: of the same seed's best full finetuning \
         (goal: at least 80% of its reduction on the new text with at most 20% of its increase on the original; \
         an increase below zero counts as zero). `goal met` counts the seeds where both hold.\n",
        studies.len()
    )?;
    writeln!(
        md,
        "| method | setting | Δ new (nats) | Δ original (nats) | share of the reduction | share of the increase | goal met |"
    )?;
    writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    for key in &keys {
        let per: Vec<End> = studies
            .iter()
            .map(|s| {
                s.iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, e)| *e)
                    .unwrap_or((f64::NAN, f64::NAN))
            })
            .collect();
        let (dn, dns) = mean_sd(&per.iter().map(|e| e.0).collect::<Vec<_>>());
        let (dor, dos) = mean_sd(&per.iter().map(|e| e.1).collect::<Vec<_>>());
        let memory = key.0.starts_with("memory");
        let shares: Vec<(f64, f64)> = per
            .iter()
            .zip(&full)
            .map(|(e, f)| (e.0 / f.0, e.1.max(0.0) / f.1.max(1e-9)))
            .collect();
        let (ln, lns) = mean_sd(&shares.iter().map(|s| s.0).collect::<Vec<_>>());
        let (fo, fos) = mean_sd(&shares.iter().map(|s| s.1).collect::<Vec<_>>());
        let met = shares.iter().filter(|s| s.0 >= 0.8 && s.1 <= 0.2).count();
        // The goal concerns the memory runs only.
        let goal = if memory {
            format!("{met} of {}", studies.len())
        } else {
            "—".into()
        };
        writeln!(
            md,
            "| {} | {} | {dn:.4} ± {dns:.4} | {dor:+.4} ± {dos:.4} | {:.1}% ± {:.1} | {:.1}% ± {:.1} | {goal} |",
            key.0,
            key.1,
            100.0 * ln,
            100.0 * lns,
            100.0 * fo,
            100.0 * fos,
        )?;
    }
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.out, md)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
