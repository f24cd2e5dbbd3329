//! The data commands (`check`, `preview`, `prepare`, `convert`): flags to plans, the data crate to do the
//! work, and what the user sees (reports, progress bars). They need no libtorch and run in the front
//! binary.

use crate::cli::{CheckArgs, Command, ConvertCommand, MaskArgs, PrepareArgs, PreviewArgs, TokenizerArgs};
use anyhow::{bail, Context, Result};
use ferrotune_data::check::{check_file, CheckOptions};
use ferrotune_data::encode::Encoder;
use ferrotune_data::mask::{MaskOptions, Strategy};
use ferrotune_data::pack::Overlong;
use ferrotune_data::prepare::{default_cache_path, prepare_to_file, PrepareOptions};
use ferrotune_data::preview::{marked, view, Marking};
use ferrotune_data::record::parse_line;
use ferrotune_data::source::Rows;
use std::io::{IsTerminal, Write};
use std::path::Path;

pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Check(a) => check(a),
        Command::Preview(a) => preview(a),
        Command::Prepare(a) => prepare(a),
        Command::Convert(ConvertCommand::Coqa(a)) => {
            not_an_input(&a.out, "--out", &[&a.input])?;
            let (stories, turns) = ferrotune_data::coqa::convert(&a.input, &a.out, &a.system)?;
            tracing::info!("wrote {} conversations ({turns} question/answer turns) to {}", stories, a.out.display());
            Ok(())
        }
        Command::Launch(a) => crate::launch::run(a),
        Command::Sweep(a) => crate::sweep::run(a),
        Command::Report(a) => {
            let w = crate::report::write(&a.dir)?;
            println!("wrote {}, {} and {}", w.markdown.display(), w.csv.display(), w.png.display());
            Ok(())
        }
        other => bail!("`{}` needs libtorch and runs in ferrotune-worker", other.name()),
    }
}

/// Refuses an output path that is (or, through links, resolves to) one of the command's inputs, before
/// anything is written: `prepare X --out X` overwrote its data.
pub fn not_an_input(out: &Path, flag: &str, inputs: &[&Path]) -> Result<()> {
    let Ok(o) = out.canonicalize().or_else(|_| {
        // Not there yet: its parent decides.
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        parent.canonicalize().map(|p| p.join(out.file_name().unwrap_or_default()))
    }) else {
        return Ok(());
    };
    for input in inputs {
        let Ok(i) = input.canonicalize() else { continue };
        if o == i {
            bail!("{flag} {} is the input {} itself; hint: write the output elsewhere", out.display(), input.display());
        }
    }
    Ok(())
}

/// Tokenizer and chat template of a model directory (see `Encoder::from_model_dir`).
pub fn encoder(dir: &Path, template: &str) -> Result<Encoder> {
    Ok(Encoder::from_model_dir(dir, template)?)
}

pub fn encoder_of(t: &TokenizerArgs) -> Result<Encoder> {
    encoder(&t.model, &t.template).with_context(|| format!("loading the tokenizer of {}", t.model.display()))
}

pub fn mask_options(m: &MaskArgs) -> Result<MaskOptions> {
    let Some(strategy) = Strategy::parse(&m.strategy) else {
        bail!("unknown masking strategy `{}`; expected one of all, assistant, boilerplate, last, auto", m.strategy)
    };
    Ok(MaskOptions { strategy, train_eot: !m.no_train_eot })
}

/// "1 line", "2 lines".
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn check(a: CheckArgs) -> Result<()> {
    let opts = CheckOptions { strict: a.strict, max_problems: a.max_problems };
    let enc = a.model.as_ref().map(|dir| encoder(dir, &a.template)).transpose();
    let report = enc.and_then(|enc| Ok(check_file(&a.file, &opts, enc.as_ref().map(|e| (e, a.max_seq_len)))?));
    let report = match report {
        Ok(r) => r,
        // The file (or the model) cannot be read at all: a usage/IO error (exit 2), not a file with
        // problems (exit 1).
        Err(e) => {
            if a.json {
                let j = serde_json::json!({"file": a.file, "ok": false, "error": e.to_string()});
                println!("{}", serde_json::to_string_pretty(&j)?);
            } else {
                eprintln!("error: {e}");
            }
            std::process::exit(2);
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let fmt = report.format.map(|f| f.to_string()).unwrap_or_else(|| "unknown".into());
        let (unit, units) = if report.unit == "row" { ("row", "rows") } else { ("line", "lines") };
        println!(
            "{}: {}, {}, format {fmt}",
            report.file.display(),
            count(report.lines, unit, units),
            count(report.valid_rows, "valid row", "valid rows")
        );
        for p in &report.problems {
            println!("  {p}");
        }
        if report.problems_total > report.problems.len() {
            let more = report.problems_total - report.problems.len();
            println!("  ... and {}", count(more, "more problem", "more problems"));
        }
        if let Some(t) = &report.tokens {
            println!(
                "tokens per row: min {}, mean {:.1}, p50 {}, p95 {}, max {}; {} longer than {}{}",
                t.min,
                t.mean,
                t.p50,
                t.p95,
                t.max,
                count(t.over_max_seq_len, "row", "rows"),
                t.max_seq_len,
                if t.over_lines.is_empty() { String::new() } else { format!(" ({units} {:?})", t.over_lines) }
            );
            println!("trained fraction by strategy (rows left with nothing to train):");
            for (s, f) in &t.trained_fraction {
                println!("  {s:<12} {:>6.1}%  ({})", 100.0 * f, t.untrained_rows[s]);
            }
        }
        let errors = report.problems_total - report.warnings_total;
        match (report.ok, report.warnings_total) {
            (true, 0) => println!("OK"),
            (true, w) => println!("OK ({})", count(w, "warning", "warnings")),
            (false, _) => println!("FAILED ({})", count(errors, "problem", "problems")),
        }
    }
    if !report.ok {
        std::process::exit(1);
    }
    Ok(())
}

fn preview(a: PreviewArgs) -> Result<()> {
    let enc = encoder_of(&a.tokenizer)?;
    let mask = mask_options(&a.mask)?;
    let marking = match a.color.as_str() {
        "always" => Marking::Color,
        "never" => Marking::Brackets,
        "auto" if std::io::stdout().is_terminal() => Marking::Color,
        "auto" => Marking::Brackets,
        other => bail!("--color must be auto, always or never, not `{other}`"),
    };
    let mut rows = Rows::open(&a.file)?;
    let unit = rows.unit.as_str();
    let mut out = std::io::stdout().lock();
    let mut buf = Vec::new();
    let mut shown = 0;
    while let Some(n) = rows.next_into(&mut buf, &a.file)? {
        if n <= a.skip {
            continue;
        }
        if shown == a.rows {
            break;
        }
        shown += 1;
        let line = std::str::from_utf8(&buf).map_err(|_| {
            anyhow::anyhow!("{}: {unit} {n}: not valid UTF-8; hint: run `ferrotune check`", a.file.display())
        })?;
        let record = parse_line(line, false)
            .map_err(|e| anyhow::anyhow!("{}: {unit} {n}: {e}; hint: run `ferrotune check`", a.file.display()))?;
        let v = view(&enc, &record, mask).with_context(|| format!("{}: {unit} {n}", a.file.display()))?;
        if a.json {
            let row = serde_json::json!({unit: n, "ids": v.ids, "labels": v.labels, "tokens": v.tokens, "kinds": v.tags.iter().map(|t| t.kind).collect::<Vec<_>>()});
            writeln!(out, "{row}")?;
        } else {
            let k = v.trained.iter().filter(|&&t| t).count();
            writeln!(out, "── {unit} {n} · {} tokens · {k} trained ({}) ──", v.ids.len(), mask.strategy)?;
            writeln!(out, "{}\n", marked(&enc, &record, mask, marking)?)?;
        }
    }
    Ok(())
}

fn prepare(a: PrepareArgs) -> Result<()> {
    let enc = encoder_of(&a.tokenizer)?;
    let overlong = match a.overlong.as_str() {
        "truncate" => Overlong::Truncate,
        "drop" => Overlong::Drop,
        other => bail!("--overlong must be truncate or drop, not `{other}`"),
    };
    anyhow::ensure!(a.max_seq_len >= 8, "--max-seq-len {} is too small", a.max_seq_len);
    let mut opts = PrepareOptions::new(mask_options(&a.mask)?, a.max_seq_len, overlong);
    if let Some(t) = a.threads {
        opts.threads = t;
    }
    let out = a.out.clone().unwrap_or_else(|| default_cache_path(&a.data, &opts));
    not_an_input(&out, "--out", &[&a.data, &a.tokenizer.model])?;
    let t0 = std::time::Instant::now();
    let bar = crate::logging::bytes_bar("preparing");
    let header = prepare_to_file(&a.data, &enc, &opts, &out, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    let s = &header.stats;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{} -> {}\n  {} samples ({} dropped with nothing to train, {} truncated, {} dropped as overlong) in {} rows of {}\n  {} tokens, {} trained ({:.1}%), packing efficiency {:.1}%, {:.0} tokens/s",
        a.data.display(),
        out.display(),
        s.samples,
        header.dropped_no_trained,
        s.truncated,
        s.dropped_overlong,
        s.rows,
        a.max_seq_len,
        s.tokens,
        s.trained_tokens,
        100.0 * s.trained_tokens as f64 / s.tokens.max(1) as f64,
        100.0 * s.efficiency,
        s.tokens as f64 / secs
    );
    Ok(())
}
