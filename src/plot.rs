//! `peft-rs plot`: training and evaluation loss against step, one line per
//! run, from each run's `metrics.jsonl`, drawn to a PNG.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use plotters::prelude::*;

/// The loss curves of one run.
#[derive(Debug, Clone, Default)]
pub struct RunCurves {
    /// The legend label (the run directory's name).
    pub label: String,
    /// (step, training loss).
    pub train: Vec<(f64, f64)>,
    /// (step, evaluation loss).
    pub eval: Vec<(f64, f64)>,
}

/// Reads `RUN/metrics.jsonl`.
pub fn read_run(dir: &Path) -> Result<RunCurves> {
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: cannot read (is {} a peft-rs train --output directory?)",
            path.display(),
            dir.display()
        )
    })?;
    let mut c = RunCurves {
        label: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string()),
        ..Default::default()
    };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not valid JSON", path.display(), i + 1))?;
        let Some(step) = v["step"].as_f64() else {
            bail!("{}:{}: no `step`", path.display(), i + 1);
        };
        if let Some(l) = v["loss"].as_f64().filter(|l| l.is_finite()) {
            c.train.push((step, l));
        }
        if let Some(l) = v["eval_loss"].as_f64().filter(|l| l.is_finite()) {
            c.eval.push((step, l));
        }
    }
    if c.train.is_empty() && c.eval.is_empty() {
        bail!("{}: no loss values to plot", path.display());
    }
    Ok(c)
}

/// Finds a TrueType font: `$PEFT_RS_FONT`, or a common system font.
fn load_font() -> Result<&'static [u8]> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PEFT_RS_FONT")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.extend(
        [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/Library/Fonts/Arial.ttf",
            "/System/Library/Fonts/Supplemental/Arial.ttf",
        ]
        .map(PathBuf::from),
    );
    for c in &candidates {
        if let Ok(bytes) = std::fs::read(c) {
            // plotters keeps registered fonts for the life of the process.
            return Ok(Box::leak(bytes.into_boxed_slice()));
        }
    }
    bail!("no TrueType font found for the plot labels: install fonts-dejavu-core, or set PEFT_RS_FONT to a .ttf file")
}

/// Draws the runs' training loss (solid) and evaluation loss (dashed
/// markers) against the optimizer step into a PNG of `width`×`height`.
pub fn plot(runs: &[RunCurves], output: &Path, title: &str, size: (u32, u32)) -> Result<()> {
    if runs.is_empty() {
        bail!("give at least one run directory");
    }
    plotters::style::register_font("sans-serif", FontStyle::Normal, load_font()?)
        .map_err(|_| anyhow::anyhow!("the font for the plot labels cannot be read"))?;
    let points = runs.iter().flat_map(|r| r.train.iter().chain(&r.eval));
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let tmp = output.with_file_name(format!(
        ".{}.tmp-{}.png",
        output
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 28))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..x_max, (y_min - pad)..(y_max + pad))?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("cross-entropy loss (nats per token)")
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        for (i, run) in runs.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            if !run.train.is_empty() {
                chart
                    .draw_series(LineSeries::new(
                        run.train.iter().copied(),
                        color.stroke_width(2),
                    ))?
                    .label(format!("{} train", run.label))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
            }
            if !run.eval.is_empty() {
                // Evaluation: dashed, with a marker at each evaluation, so it reads
                // apart from the training curve of the same colour.
                let style = color.stroke_width(2);
                chart
                    .draw_series(DashedLineSeries::new(run.eval.iter().copied(), 8, 5, style))?
                    .label(format!("{} eval (noise off)", run.label))
                    .legend(move |(x, y)| {
                        EmptyElement::at((x, y))
                            + PathElement::new(vec![(0, 0), (8, 0)], style)
                            + PathElement::new(vec![(12, 0), (20, 0)], style)
                    });
                chart.draw_series(run.eval.iter().map(|&p| Circle::new(p, 5, color.filled())))?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        root.present()?;
    }
    std::fs::rename(&tmp, output).with_context(|| format!("{}: cannot write", output.display()))?;
    Ok(())
}
