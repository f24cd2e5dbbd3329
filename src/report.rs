//! The report of a sweep (`ferrotune report SWEEP_DIR`, also written at the end of `ferrotune sweep`):
//! one row per trial — the swept values, final train loss, best validation loss, CoQA EM and F1 (when
//! evaluated), trained-token fraction, tokens/s, wall time — as Markdown and CSV, and a PNG with the
//! training-loss curve of every trial and EM/F1 (or best validation loss) per trial, drawn with
//! plotters from the logged values (`metrics.jsonl`). Not here: running trials (`sweep.rs`).

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
    pub em: Option<f64>,
    pub f1: Option<f64>,
    pub trained_fraction: Option<f64>,
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
        for line in metrics.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            if let Some(l) = v["train/loss"].as_f64() {
                loss.insert(v["step"].as_u64().unwrap_or(0), l);
            }
            if let Some(l) = v["eval/loss"].as_f64() {
                row.best_val_loss = Some(row.best_val_loss.map_or(l, |b: f64| b.min(l)));
            }
            row.em = v["eval/em"].as_f64().or(row.em);
            row.f1 = v["eval/f1"].as_f64().or(row.f1);
            if let Some(x) = v["train/tokens_per_s"].as_f64() {
                tps += x;
                tps_n += 1;
            }
        }
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

/// Writes report.md, report.csv and report.png into the sweep directory.
pub fn write(dir: &Path) -> Result<Written> {
    let (index, rows) = collect(dir)?;
    let mut header: Vec<String> = vec!["trial".into()];
    header.extend(index.keys.iter().cloned());
    header.extend(
        ["status", "final_train_loss", "best_val_loss", "em", "f1", "trained_fraction", "tokens_per_s", "wall_s"]
            .map(String::from),
    );
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut c = vec![r.name.clone()];
            c.extend(r.values.iter().cloned());
            c.extend([
                r.status.clone(),
                cell(r.final_loss, 4),
                cell(r.best_val_loss, 4),
                cell(r.em, 1),
                cell(r.f1, 1),
                cell(r.trained_fraction, 3),
                cell(r.tokens_per_s, 1),
                cell(r.wall_s, 0),
            ]);
            c
        })
        .collect();
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
    md += "\nLoss curves per trial and EM/F1 per trial: report.png. Curves in TensorBoard: `tensorboard --logdir trials`.\n";
    std::fs::write(&markdown, md).with_context(|| format!("writing {}", markdown.display()))?;
    let png = dir.join("report.png");
    plot(&png, &index.keys, &rows).with_context(|| format!("drawing {}", png.display()))?;
    Ok(Written { markdown, csv, png })
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

    // Training loss per trial.
    let points: Vec<&(f64, f64)> = rows.iter().flat_map(|r| &r.loss).collect();
    let max_step = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.05).max(1e-3);
    // Headroom above the curves for the legend (about 20 px a trial of a ~480 px plot), so it covers none.
    let legend = ((rows.len() as f64 * 20.0 + 16.0) / 480.0).min(0.6);
    let top = hi + pad + (hi - lo + 2.0 * pad) * legend / (1.0 - legend);
    let mut chart = ChartBuilder::on(&left)
        .caption("training loss per trial", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..max_step, (lo - pad)..top)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc("train/loss")
        .x_labels((max_step as usize + 1).min(11))
        .x_label_formatter(&|x| if x.fract() == 0.0 { format!("{x:.0}") } else { format!("{x}") })
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, r) in rows.iter().enumerate() {
        let color = color(i);
        chart
            .draw_series(LineSeries::new(r.loss.iter().copied(), color.stroke_width(2)))
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

    // EM and F1 per trial (CoQA), or the best validation loss when no trial was scored.
    let scored = rows.iter().any(|r| r.em.is_some());
    let n = rows.len().max(1) as f64;
    let (title, y_max) = if scored {
        ("CoQA EM (left) and F1 (right) per trial", 100.0)
    } else {
        ("best validation loss per trial", rows.iter().filter_map(|r| r.best_val_loss).fold(1e-3, f64::max) * 1.1)
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
        .y_desc(if scored { "score (%)" } else { "eval/loss" })
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, r) in rows.iter().enumerate() {
        let x = i as f64;
        let color = color(i);
        let values: Vec<(f64, f64, f64)> = if scored {
            vec![(x + 0.1, x + 0.48, r.em.unwrap_or(0.0)), (x + 0.52, x + 0.9, r.f1.unwrap_or(0.0))]
        } else {
            vec![(x + 0.2, x + 0.8, r.best_val_loss.unwrap_or(0.0))]
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
