//! The report of a sweep (`ferrotune report SWEEP_DIR`, also written at the end of `ferrotune sweep`):
//! first the base model (its evaluation at step 0, before any update), then one row per trial — the
//! swept values, the response loss (the same tokens for every strategy, so it compares across trials),
//! CoQA EM and F1, each with its change against the base, then the strategy's own best validation
//! loss, final train loss, trained-token fraction, the data's instruction/response token ratio, where
//! the trial stopped, tokens/s, wall time — as Markdown and CSV; where trials differ only by
//! `train.seed`, a summary with mean and standard deviation; and a PNG with the response-loss curve of
//! every trial and EM/F1 (or response loss) per trial, drawn with plotters from the logged values
//! (`metrics.jsonl`). Not here: running trials (`sweep.rs`).

use crate::sweep::{read_status, short_label, SweepIndex};
use anyhow::{Context, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// What one trial logged.
#[derive(Debug, Default, Clone)]
pub struct TrialRow {
    pub name: String,
    /// The swept values, in the sweep's key order.
    pub values: Vec<String>,
    pub status: String,
    /// (step, train/loss) for every logged step.
    pub loss: Vec<(f64, f64)>,
    pub final_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    /// (step, eval/response_loss) at every evaluation, step 0 (the base model) included.
    pub response: Vec<(f64, f64)>,
    /// The last evaluation's response loss, EM and F1.
    pub response_loss: Option<f64>,
    pub em: Option<f64>,
    pub f1: Option<f64>,
    /// The base model's response loss, EM and F1 (the step-0 evaluation).
    pub base: (Option<f64>, Option<f64>, Option<f64>),
    pub trained_fraction: Option<f64>,
    /// Instruction tokens per response token of the training data (under the response mask).
    pub instruction_ratio: Option<f64>,
    /// The step early stopping ended the trial at, and the steps planned.
    pub stopped_at: Option<u64>,
    pub planned_steps: Option<u64>,
    pub tokens_per_s: Option<f64>,
    pub wall_s: Option<f64>,
}

impl TrialRow {
    /// The swept values, as a legend label.
    pub fn label(&self, keys: &[String]) -> String {
        keys.iter().zip(&self.values).map(|(k, v)| short_label(k, v)).collect::<Vec<_>>().join(" ")
    }
}

pub struct Written {
    pub markdown: PathBuf,
    pub csv: PathBuf,
    pub png: PathBuf,
}

/// Reads every trial of the sweep in `dir`.
pub fn collect(dir: &Path) -> Result<(SweepIndex, Vec<TrialRow>)> {
    let index_path = dir.join("sweep.json");
    let index: SweepIndex = serde_json::from_str(
        &std::fs::read_to_string(&index_path)
            .with_context(|| format!("{}: not a sweep directory (no sweep.json)", dir.display()))?,
    )
    .with_context(|| format!("{}", index_path.display()))?;
    let mut rows = vec![];
    for t in &index.trials {
        let run = dir.join("trials").join(&t.name);
        let mut row = TrialRow {
            name: t.name.clone(),
            values: t.values.iter().map(|(_, v)| v.clone()).collect(),
            status: read_status(&run).map_or("not run".into(), |s| s.status),
            wall_s: read_status(&run).map(|s| s.wall_s),
            ..Default::default()
        };
        let metrics_path = run.join("metrics.jsonl");
        let metrics = std::fs::read_to_string(&metrics_path).unwrap_or_default();
        if metrics.is_empty() && row.status != "not run" {
            tracing::warn!("trial {}: no metrics in {}", t.name, metrics_path.display());
        }
        let (mut tps, mut tps_n) = (0.0, 0);
        // By step: a restart drops the steps logged after its checkpoint; should any remain (a failed
        // rewrite, or a file from before that), the latest value wins.
        let mut loss = std::collections::BTreeMap::new();
        let mut response = std::collections::BTreeMap::new();
        for line in metrics.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            let step = v["step"].as_u64().unwrap_or(0);
            if let Some(l) = v["train/loss"].as_f64() {
                loss.insert(step, l);
            }
            if let Some(l) = v["eval/loss"].as_f64().filter(|_| step > 0) {
                row.best_val_loss = Some(row.best_val_loss.map_or(l, |b: f64| b.min(l)));
            }
            if let Some(l) = v["eval/response_loss"].as_f64() {
                response.insert(step, l);
            }
            if step == 0 {
                row.base = (
                    v["eval/response_loss"].as_f64().or(row.base.0),
                    v["eval/em"].as_f64().or(row.base.1),
                    v["eval/f1"].as_f64().or(row.base.2),
                );
                if let (Some(t), Some(r)) = (v["data/tokens"].as_f64(), v["data/response_tokens"].as_f64()) {
                    row.instruction_ratio = (r > 0.0).then(|| (t - r) / r);
                }
            } else {
                row.em = v["eval/em"].as_f64().or(row.em);
                row.f1 = v["eval/f1"].as_f64().or(row.f1);
            }
            if let Some(s) = v["train/early_stop"].as_f64() {
                row.stopped_at = Some(s as u64);
            }
            if let Some(x) = v["train/tokens_per_s"].as_f64() {
                tps += x;
                tps_n += 1;
            }
        }
        row.response = response.into_iter().map(|(s, l)| (s as f64, l)).collect();
        row.response_loss = row.response.iter().rev().find(|p| p.0 > 0.0).map(|p| p.1);
        row.planned_steps = std::fs::read_to_string(run.join("plan.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|p| p["total_steps"].as_u64());
        row.loss = loss.into_iter().map(|(s, l)| (s as f64, l)).collect();
        row.final_loss = row.loss.last().map(|&(_, l)| l);
        row.tokens_per_s = (tps_n > 0).then(|| tps / tps_n as f64);
        if let Ok(cache) = ferrotune_data::cache::TokenCache::open(&run.join("cache/train.ftcache")) {
            let s = &cache.header.stats;
            row.trained_fraction = (s.tokens > 0).then(|| s.trained_tokens as f64 / s.tokens as f64);
        }
        rows.push(row);
    }
    Ok((index, rows))
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or(String::new(), |x| format!("{x:.digits$}"))
}

fn delta(v: Option<f64>, base: Option<f64>, digits: usize) -> String {
    match (v, base) {
        (Some(v), Some(b)) => format!("{:+.digits$}", v - b),
        _ => String::new(),
    }
}

/// Mean and sample standard deviation of the values present, as "m ± s (n)".
fn spread(values: &[Option<f64>], digits: usize) -> String {
    let v: Vec<f64> = values.iter().flatten().copied().collect();
    if v.is_empty() {
        return String::new();
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let sd =
        if v.len() > 1 { (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt() } else { 0.0 };
    format!("{m:.digits$} ± {sd:.digits$} ({})", v.len())
}

/// Writes report.md, report.csv and report.png into the sweep directory.
pub fn write(dir: &Path) -> Result<Written> {
    let (index, rows) = collect(dir)?;
    let mut header: Vec<String> = vec!["trial".into()];
    header.extend(index.keys.iter().cloned());
    header.extend(
        [
            "response_loss",
            "Δ_response_loss",
            "em",
            "Δ_em",
            "f1",
            "Δ_f1",
            "best_own_val_loss",
            "final_train_loss",
            "trained_fraction",
            "instruction_per_response_token",
            "stopped",
            "status",
            "tokens_per_s",
            "wall_s",
        ]
        .map(String::from),
    );
    let mut table: Vec<Vec<String>> = vec![];
    // The base model: the first trial's step-0 evaluation (every trial evaluates the same model there
    // unless the sweep changes model.path or the validation data; each row's Δ is against its own).
    if let Some(b) = rows.iter().find(|r| r.base.0.is_some()) {
        let mut c = vec!["base model (step 0)".to_string()];
        c.extend(index.keys.iter().map(|_| String::new()));
        c.extend([cell(b.base.0, 4), String::new(), cell(b.base.1, 1), String::new(), cell(b.base.2, 1)]);
        c.extend(std::iter::repeat_n(String::new(), header.len() - c.len()));
        table.push(c);
    }
    for r in &rows {
        let mut c = vec![r.name.clone()];
        c.extend(r.values.iter().cloned());
        let stopped = match (r.stopped_at, r.planned_steps) {
            (Some(s), Some(t)) => format!("early at {s}/{t}"),
            (Some(s), None) => format!("early at {s}"),
            (None, _) => String::new(),
        };
        c.extend([
            cell(r.response_loss, 4),
            delta(r.response_loss, r.base.0, 4),
            cell(r.em, 1),
            delta(r.em, r.base.1, 1),
            cell(r.f1, 1),
            delta(r.f1, r.base.2, 1),
            cell(r.best_val_loss, 4),
            cell(r.final_loss, 4),
            cell(r.trained_fraction, 3),
            cell(r.instruction_ratio, 2),
            stopped,
            r.status.clone(),
            cell(r.tokens_per_s, 1),
            cell(r.wall_s, 0),
        ]);
        table.push(c);
    }
    let csv = dir.join("report.csv");
    let quote =
        |s: &String| if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.clone() };
    let mut text = header.iter().map(quote).collect::<Vec<_>>().join(",") + "\n";
    for r in &table {
        text += &(r.iter().map(quote).collect::<Vec<_>>().join(",") + "\n");
    }
    std::fs::write(&csv, text).with_context(|| format!("writing {}", csv.display()))?;
    let markdown = dir.join("report.md");
    let mut md = format!("# Sweep `{}`\n\n", index.name);
    md += &format!("| {} |\n|{}|\n", header.join(" | "), vec!["---"; header.len()].join("|"));
    for r in &table {
        md += &format!("| {} |\n", r.join(" | "));
    }
    md += &seed_summary(&index.keys, &rows);
    md += "\nresponse_loss: mean loss over assistant content and end-of-turn tokens of the validation set, the same tokens for every strategy (and the base model), so it compares across trials; best_own_val_loss is each strategy's own masked loss and does not. Δ: against the base model. instruction_per_response_token: the training data's non-response tokens per response token. Response-loss curves and EM/F1 per trial: report.png. Curves in TensorBoard: `tensorboard --logdir trials`.\n";
    std::fs::write(&markdown, md).with_context(|| format!("writing {}", markdown.display()))?;
    let png = dir.join("report.png");
    plot(&png, &index.keys, &rows).with_context(|| format!("drawing {}", png.display()))?;
    Ok(Written { markdown, csv, png })
}

/// Where the sweep varies `train.seed`: trials grouped by their other values, with the mean and
/// spread of response loss, EM and F1 over seeds.
fn seed_summary(keys: &[String], rows: &[TrialRow]) -> String {
    let Some(seed) = keys.iter().position(|k| k == "train.seed") else { return String::new() };
    let mut groups: Vec<(Vec<String>, Vec<&TrialRow>)> = vec![];
    for r in rows {
        let others: Vec<String> =
            r.values.iter().enumerate().filter(|(i, _)| *i != seed).map(|(_, v)| v.clone()).collect();
        match groups.iter_mut().find(|(k, _)| *k == others) {
            Some((_, g)) => g.push(r),
            None => groups.push((others, vec![r])),
        }
    }
    let names: Vec<&String> = keys.iter().enumerate().filter(|(i, _)| *i != seed).map(|(_, k)| k).collect();
    let mut md = format!(
        "\nOver seeds (mean ± standard deviation (trials)):\n\n| {} | response_loss | em | f1 |\n|{}|\n",
        names.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" | "),
        vec!["---"; names.len() + 3].join("|")
    );
    for (values, g) in groups {
        let col = |f: &dyn Fn(&TrialRow) -> Option<f64>, d| spread(&g.iter().map(|r| f(r)).collect::<Vec<_>>(), d);
        md += &format!(
            "| {} | {} | {} | {} |\n",
            values.join(" | "),
            col(&|r| r.response_loss, 4),
            col(&|r| r.em, 1),
            col(&|r| r.f1, 1)
        );
    }
    md
}

const FONT: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");

/// Trial colours: matplotlib's tab10 cycle, which ML engineers read at a glance (and which stays
/// legible on white, unlike a pale yellow).
fn color(i: usize) -> RGBAColor {
    const TAB10: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = TAB10[i % TAB10.len()];
    RGBColor(r, g, b).to_rgba()
}

fn plot(path: &Path, keys: &[String], rows: &[TrialRow]) -> Result<()> {
    // Registering twice (a second report in one process) is harmless.
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
    let root = BitMapBackend::new(path, (1400, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(760);

    // Response loss per trial, from the base model (step 0) on; the training loss where none was
    // evaluated.
    let evaluated = rows.iter().any(|r| !r.response.is_empty());
    let curve = |r: &TrialRow| if evaluated { r.response.clone() } else { r.loss.clone() };
    let points: Vec<(f64, f64)> = rows.iter().flat_map(curve).collect();
    let max_step = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.05).max(1e-3);
    // Headroom above the curves for the legend (about 20 px a trial of a ~480 px plot), so it covers none.
    let legend = ((rows.len() as f64 * 20.0 + 16.0) / 480.0).min(0.6);
    let top = hi + pad + (hi - lo + 2.0 * pad) * legend / (1.0 - legend);
    let mut chart = ChartBuilder::on(&left)
        .caption(
            if evaluated { "response loss per trial (validation)" } else { "training loss per trial" },
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..max_step, (lo - pad)..top)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc(if evaluated { "eval/response_loss" } else { "train/loss" })
        .x_labels((max_step as usize + 1).min(11))
        .x_label_formatter(&|x| if x.fract() == 0.0 { format!("{x:.0}") } else { format!("{x}") })
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, r) in rows.iter().enumerate() {
        let color = color(i);
        chart
            .draw_series(LineSeries::new(curve(r), color.stroke_width(2)).point_size(if evaluated { 4 } else { 0 }))
            .map_err(|e| err(&e))?
            .label(r.label(keys))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(&e))?;

    // EM and F1 per trial (CoQA), or the final response loss when no trial was scored.
    let scored = rows.iter().any(|r| r.em.is_some());
    let n = rows.len().max(1) as f64;
    let (title, y_max) = if scored {
        ("CoQA EM (left) and F1 (right) per trial", 100.0)
    } else {
        ("response loss per trial", rows.iter().filter_map(|r| r.response_loss).fold(1e-3, f64::max) * 1.1)
    };
    let mut bars = ChartBuilder::on(&right)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..n, 0.0..y_max)
        .map_err(|e| err(&e))?;
    bars.configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(if scored { "score (%)" } else { "eval/response_loss" })
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, r) in rows.iter().enumerate() {
        let x = i as f64;
        let color = color(i);
        let values: Vec<(f64, f64, f64)> = if scored {
            vec![(x + 0.1, x + 0.48, r.em.unwrap_or(0.0)), (x + 0.52, x + 0.9, r.f1.unwrap_or(0.0))]
        } else {
            vec![(x + 0.2, x + 0.8, r.response_loss.unwrap_or(0.0))]
        };
        for (j, &(x0, x1, v)) in values.iter().enumerate() {
            let fill = if j == 0 { color.filled() } else { color.mix(0.5).filled() };
            bars.draw_series(std::iter::once(Rectangle::new([(x0, 0.0), (x1, v)], fill))).map_err(|e| err(&e))?;
            let (px, py) = bars.backend_coord(&((x0 + x1) / 2.0, v));
            let text = if scored { format!("{v:.1}") } else { format!("{v:.3}") };
            root.draw(&Text::new(text, (px - 14, py - 18), ("sans-serif", 14).into_font())).map_err(|e| err(&e))?;
        }
        let (px, py) = bars.backend_coord(&(x + 0.5, 0.0));
        let label = r.values.join(" ");
        root.draw(&Text::new(label.clone(), (px - 4 * label.len() as i32, py + 8), ("sans-serif", 15).into_font()))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: &[&str], response: f64, em: f64) -> TrialRow {
        TrialRow {
            values: values.iter().map(|s| s.to_string()).collect(),
            response_loss: Some(response),
            em: Some(em),
            ..Default::default()
        }
    }

    #[test]
    fn trials_differing_only_by_seed_are_summarised_with_mean_and_spread() {
        let keys = vec!["data.strategy".to_string(), "train.seed".to_string()];
        let rows = [row(&["all", "1"], 1.0, 10.0), row(&["all", "2"], 1.2, 14.0), row(&["last", "1"], 2.0, 20.0)];
        let md = seed_summary(&keys, &rows);
        // mean 1.1, sample standard deviation 0.1414; EM 12 ± 2.8; one trial: spread 0.
        assert!(md.contains("| all | 1.1000 ± 0.1414 (2) | 12.0 ± 2.8 (2) |  |"), "{md}");
        assert!(md.contains("| last | 2.0000 ± 0.0000 (1) | 20.0 ± 0.0 (1) |  |"), "{md}");
        assert_eq!(seed_summary(&keys[..1], &rows), "", "no seed key, no summary");
    }
}
