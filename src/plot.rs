//! `peft-rs plot`: training and evaluation loss against step, one line per
//! run, from each run's `metrics.jsonl`, drawn to a PNG.

use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{Ranged, ValueFormatter};

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
    let text = peft_adapters::fsio::read_regular_string(
        &path,
        1 << 30,
        &format!(
            "metrics (is {} a peft-rs train --output directory?)",
            dir.display()
        ),
    )?;
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

/// How a picture is drawn.
#[derive(Debug, Clone)]
pub struct PlotOptions {
    /// The title above the chart.
    pub title: String,
    /// Width and height in pixels.
    pub size: (u32, u32),
    /// A logarithmic loss axis (losses must be positive).
    pub log_y: bool,
}

/// The smallest and largest pictures drawn (a 100000×100000 PNG would need 30 GB).
pub const SIZE_RANGE: std::ops::RangeInclusive<u32> = 100..=8192;

/// Losses beyond this magnitude are a diverged run: they are drawn at the
/// edge of the chart instead of stretching the axis (±1e308 would make the
/// axis span overflow).
const LOSS_LIMIT: f64 = 1e6;

/// The loss axis: the range of the plotted values, padded, with diverged
/// values left out. Returns (low, high, points left out).
fn y_range(values: impl Iterator<Item = f64>, log_y: bool) -> Result<(f64, f64, usize)> {
    let (mut lo, mut hi, mut out) = (f64::INFINITY, f64::NEG_INFINITY, 0);
    for y in values {
        if y.abs() > LOSS_LIMIT || (log_y && y <= 0.0) {
            out += 1;
            continue;
        }
        lo = lo.min(y);
        hi = hi.max(y);
    }
    if !lo.is_finite() {
        bail!(
            "every loss value is beyond ±{LOSS_LIMIT:e}{}: nothing to draw",
            if log_y {
                " or not positive (--log-y)"
            } else {
                ""
            }
        );
    }
    if log_y {
        // A tenth of a decade of room on both sides.
        let f = ((hi / lo).powf(0.05)).max(1.02);
        return Ok((lo / f, hi * f, out));
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    Ok((lo - pad, hi + pad, out))
}

/// Checks that `output` may be written: a PNG we can replace or a new file,
/// never a directory or somebody's other file.
fn check_output(output: &Path) -> Result<()> {
    if output.extension().and_then(|e| e.to_str()) != Some("png") {
        bail!("{}: --output must be a .png file", output.display());
    }
    match std::fs::symlink_metadata(output) {
        Err(_) => Ok(()),
        Ok(m) if m.is_file() => {
            let mut head = [0u8; 8];
            let is_png = std::fs::File::open(output)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
                .is_ok()
                && &head[1..4] == b"PNG";
            if is_png {
                Ok(())
            } else {
                bail!(
                    "{}: exists and is not a PNG picture; peft-rs replaces only its own pictures — choose another --output",
                    output.display()
                )
            }
        }
        Ok(_) => bail!(
            "{}: exists and is not a file; choose another --output",
            output.display()
        ),
    }
}

/// Draws the runs' training loss (solid) and evaluation loss (dashed
/// markers) against the optimizer step into a PNG, written to a temporary
/// file and renamed.
pub fn plot(runs: &[RunCurves], output: &Path, opts: &PlotOptions) -> Result<()> {
    if runs.is_empty() {
        bail!("give at least one run directory");
    }
    let (w, h) = opts.size;
    if !SIZE_RANGE.contains(&w) || !SIZE_RANGE.contains(&h) {
        bail!(
            "--width {w} --height {h}: each must be between {} and {} pixels",
            SIZE_RANGE.start(),
            SIZE_RANGE.end()
        );
    }
    check_output(output)?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, load_font()?)
        .map_err(|_| anyhow::anyhow!("the font for the plot labels cannot be read"))?;
    let points = || runs.iter().flat_map(|r| r.train.iter().chain(&r.eval));
    let x_max = points().map(|p| p.0).fold(1.0f64, f64::max);
    let (y_lo, y_hi, left_out) = y_range(points().map(|p| p.1), opts.log_y)?;
    if left_out > 0 {
        eprintln!(
            "note: {left_out} loss value(s) beyond ±{LOSS_LIMIT:e}{} are drawn at the chart's edge",
            if opts.log_y { " or not positive" } else { "" }
        );
    }
    let clip = |(x, y): (f64, f64)| (x, y.clamp(y_lo, y_hi));
    // The PNG encoder is chosen by the extension, so the temporary name keeps it.
    let tmp = output.with_file_name(format!(
        ".{}.tmp-{}.png",
        output
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let drawn = (|| -> Result<()> {
        let root = BitMapBackend::new(&tmp, opts.size).into_drawing_area();
        root.fill(&WHITE)?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(&opts.title, ("sans-serif", 28))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(70);
        if opts.log_y {
            let mut chart = builder.build_cartesian_2d(0f64..x_max, (y_lo..y_hi).log_scale())?;
            draw_runs(
                &mut chart,
                runs,
                &clip,
                "cross-entropy loss (nats per token, log scale)",
            )?;
        } else {
            let mut chart = builder.build_cartesian_2d(0f64..x_max, y_lo..y_hi)?;
            draw_runs(
                &mut chart,
                runs,
                &clip,
                "cross-entropy loss (nats per token)",
            )?;
        }
        root.present()?;
        Ok(())
    })();
    let published = drawn.and_then(|()| std::fs::rename(&tmp, output).map_err(Into::into));
    if let Err(e) = published {
        let _ = std::fs::remove_file(&tmp);
        bail!("{}: cannot write the picture: {e:#}", output.display());
    }
    Ok(())
}

fn draw_runs<'a, DB, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    runs: &[RunCurves],
    clip: &dyn Fn((f64, f64)) -> (f64, f64),
    y_desc: &str,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(y_desc)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for (i, run) in runs.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        if !run.train.is_empty() {
            chart
                .draw_series(LineSeries::new(
                    run.train.iter().copied().map(clip),
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
                .draw_series(DashedLineSeries::new(
                    run.eval.iter().copied().map(clip),
                    8,
                    5,
                    style,
                ))?
                .label(format!("{} eval (noise off)", run.label))
                .legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (8, 0)], style)
                        + PathElement::new(vec![(12, 0), (20, 0)], style)
                });
            chart.draw_series(
                run.eval
                    .iter()
                    .copied()
                    .map(clip)
                    .map(|p| Circle::new(p, 5, color.filled())),
            )?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}
