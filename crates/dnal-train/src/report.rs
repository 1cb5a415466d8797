//! What a run tells its user: a line and a JSON line per epoch, `report.json`, `report.md` and
//! SVG plots.

use std::collections::BTreeMap;
use std::path::Path;

use dnal_core::BackendKind;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::{Baseline, TrainConfig};
use crate::error::{Result, TrainError};
use crate::pipeline::{EpochLog, Progress};

/// Accuracy and cost of one network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetSummary {
    /// Top-1 test accuracy, percent.
    pub top1: f64,
    /// Top-5 test accuracy, percent.
    pub top5: f64,
    /// Multiply-accumulates per image.
    pub macs: u64,
    /// Parameters (conv, BN, linear).
    pub params: u64,
}

/// Width of one gated layer before and after.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerWidths {
    /// Gate name.
    pub name: String,
    /// Channels before.
    pub before: usize,
    /// Channels kept.
    pub after: usize,
}

/// Latency of the dense and the pruned network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Dense network, median ms per batch.
    pub dense: f64,
    /// Pruned network, median ms per batch.
    pub pruned: Option<f64>,
    /// Batch size timed.
    pub batch: usize,
    /// Backend.
    pub backend: String,
}

/// Reductions of the pruned network relative to the baseline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reduction {
    /// MACs removed, percent.
    pub macs_pct: f64,
    /// Parameters removed, percent.
    pub params_pct: f64,
    /// Baseline MACs / pruned MACs.
    pub macs_ratio: f64,
    /// Baseline params / pruned params.
    pub params_ratio: f64,
    /// Baseline top-1 minus pruned top-1, points.
    pub top1_drop: f64,
    /// Dense latency / pruned latency.
    pub speedup: f64,
}

/// The machine-readable report (`report.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Run name.
    pub name: String,
    /// The unpruned baseline.
    pub baseline: NetSummary,
    /// What the baseline is (`weight-stage` or `extended`).
    pub baseline_kind: String,
    /// The pruned network after the final stage (absent for dense runs).
    pub pruned: Option<NetSummary>,
    /// Top-1 of the pruned network right after derivation, before the final stage.
    pub derived_top1: Option<f64>,
    /// Reductions (absent for dense runs).
    pub reduction: Option<Reduction>,
    /// Inference latency.
    pub latency_ms: Latency,
    /// Widths per gated layer.
    pub layers: Vec<LayerWidths>,
    /// The pruned network's structure beyond widths (markdown; the supernet's surviving
    /// candidates per block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structure: Option<String>,
    /// The same as a grid (plotted as `structure.svg`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structure_grid: Option<dnal_zoo::StructureGrid>,
    /// The resolved config.
    pub config: TrainConfig,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
}

impl Report {
    /// Assembles the report from a finished run.
    pub fn new(
        cfg: &TrainConfig,
        progress: &Progress,
        dense_ms: f64,
        pruned_ms: Option<f64>,
        backend: BackendKind,
    ) -> Result<Self> {
        let missing = |what: &str| TrainError::Checkpoint {
            path: "progress".into(),
            message: format!("the run has no {what} result; it did not finish"),
        };
        let (dense_acc, dense_cost) = progress.dense.clone().ok_or_else(|| missing("dense"))?;
        let base_acc = match (cfg.baseline, progress.baseline_extended) {
            (Baseline::Extended, Some(a)) => a,
            _ => dense_acc,
        };
        let baseline = NetSummary {
            top1: base_acc.top1,
            top5: base_acc.top5,
            macs: dense_cost.macs,
            params: dense_cost.params,
        };
        let pruned = progress.pruned.as_ref().map(|(a, c)| NetSummary {
            top1: a.top1,
            top5: a.top5,
            macs: c.macs,
            params: c.params,
        });
        let reduction = pruned.as_ref().map(|p| Reduction {
            macs_pct: 100.0 * (1.0 - p.macs as f64 / baseline.macs.max(1) as f64),
            params_pct: 100.0 * (1.0 - p.params as f64 / baseline.params.max(1) as f64),
            macs_ratio: baseline.macs as f64 / p.macs.max(1) as f64,
            params_ratio: baseline.params as f64 / p.params.max(1) as f64,
            top1_drop: baseline.top1 - p.top1,
            speedup: pruned_ms.map_or(1.0, |ms| dense_ms / ms.max(1e-9)),
        });
        let layers = match &progress.architecture {
            Some(arch) => progress
                .gate_order
                .iter()
                .filter_map(|name| arch.gates.get(name).map(|g| (name, g)))
                .map(|(name, g)| LayerWidths {
                    name: name.clone(),
                    before: g.width,
                    after: g.kept.len(),
                })
                .collect(),
            None => Vec::new(),
        };
        Ok(Self {
            name: cfg.name.clone(),
            baseline,
            baseline_kind: match cfg.baseline {
                Baseline::WeightStage => "weight-stage".into(),
                Baseline::Extended => "extended".into(),
            },
            pruned,
            derived_top1: progress.derived.map(|a| a.top1),
            reduction,
            latency_ms: Latency {
                dense: dense_ms,
                pruned: pruned_ms,
                batch: cfg.report.latency_batch,
                backend: backend.name().into(),
            },
            layers,
            structure: None,
            structure_grid: None,
            config: cfg.clone(),
            seconds: progress.seconds,
        })
    }

    /// Writes `report.json`, `report.md` and (if configured) the plots into `out`.
    pub fn write(&self, out: &Path, progress: &Progress) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("reports serialise");
        write_atomic(&out.join("report.json"), json.as_bytes())?;
        write_atomic(&out.join("report.md"), self.markdown().as_bytes())?;
        if self.config.report.plots {
            plot_curves(&out.join("curves.svg"), &progress.history)?;
            if !self.layers.is_empty() {
                plot_gates(&out.join("gates.svg"), &progress.history)?;
                plot_alpha(&out.join("alpha.svg"), &progress.final_alpha)?;
                plot_widths(&out.join("widths.svg"), &self.layers)?;
            }
            if let Some(grid) = &self.structure_grid {
                plot_grid(&out.join("structure.svg"), grid)?;
            }
        }
        Ok(())
    }

    /// The human-readable report.
    pub fn markdown(&self) -> String {
        let mut s = format!("# DNAL run `{}`\n\n", self.name);
        if !self.config.description.is_empty() {
            s += &format!("{}\n\n", self.config.description);
        }
        s += "| | top-1 % | top-5 % | MACs | params | latency (ms, batch ";
        s += &format!("{}) |\n|---|---|---|---|---|---|\n", self.latency_ms.batch);
        let b = &self.baseline;
        s += &format!(
            "| baseline ({}) | {:.2} | {:.2} | {} | {} | {:.2} |\n",
            self.baseline_kind,
            b.top1,
            b.top5,
            human(b.macs),
            human(b.params),
            self.latency_ms.dense
        );
        if let (Some(p), Some(r)) = (&self.pruned, &self.reduction) {
            s += &format!(
                "| pruned | {:.2} | {:.2} | {} | {} | {:.2} |\n\n",
                p.top1,
                p.top5,
                human(p.macs),
                human(p.params),
                self.latency_ms.pruned.unwrap_or(f64::NAN)
            );
            s += &format!(
                "MACs -{:.1} % ({:.2}x fewer), params -{:.1} % ({:.2}x fewer), top-1 {:+.2} points, measured speed-up {:.2}x on {}.\n",
                r.macs_pct,
                r.macs_ratio,
                r.params_pct,
                r.params_ratio,
                -r.top1_drop,
                r.speedup,
                self.latency_ms.backend
            );
            if let Some(d) = self.derived_top1 {
                s += &format!("Top-1 right after derivation, before the final stage: {d:.2} %.\n");
            }
            if let Some(structure) = &self.structure {
                s += "\n## Surviving candidates per block (expanded -> output channels)\n\n";
                s += structure;
            }
            s += "\n## Widths per gated layer\n\n| layer | before | after | kept |\n|---|---|---|---|\n";
            for l in &self.layers {
                s += &format!(
                    "| {} | {} | {} | {:.0} % |\n",
                    l.name,
                    l.before,
                    l.after,
                    100.0 * l.after as f64 / l.before.max(1) as f64
                );
            }
        }
        s += &format!(
            "\nWall time: {:.0} s. Config: `config.toml` in the checkpoint folder; per-epoch log: `metrics.jsonl`.\n",
            self.seconds
        );
        s
    }
}

/// 1.23M-style numbers.
pub fn human(v: u64) -> String {
    let v = v as f64;
    if v >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}K", v / 1e3)
    } else {
        format!("{v}")
    }
}

/// The one-line summary of an epoch printed on stderr.
pub fn epoch_line(l: &EpochLog) -> String {
    let mut s = format!(
        "[{:>8} {:>3}] loss {:.4}  train {:5.1} %  test {:5.1} %  lr {:.4}",
        l.stage,
        l.epoch + 1,
        l.loss,
        l.train_top1,
        l.test_top1,
        l.lr
    );
    if let Some(b) = l.beta {
        s += &format!(
            "  beta {b:.3e}  penalty {:.4}  open {}  MACs {}",
            l.penalty,
            l.open_gates,
            human(l.macs)
        );
    }
    s += &format!("  {:.1} s", l.seconds);
    s
}

/// A progress bar with rate and ETA (hidden when stderr is not a terminal or `quiet`).
pub fn progress_bar(quiet: bool, len: u64, prefix: &str) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>14} {bar:30} {pos}/{len} {per_sec} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

/// Rewrites `metrics.jsonl` from the history (so that it always matches the checkpoint).
pub fn write_metrics(path: &Path, history: &[EpochLog]) -> Result<()> {
    let mut text = String::new();
    for l in history {
        text += &serde_json::to_string(l).expect("logs serialise");
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    dnal_core::io::write_atomic(path, bytes).map_err(TrainError::from)
}

fn plot_err(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> TrainError + '_ {
    move |e| TrainError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// A value of an epoch's log, for plotting.
type Metric = fn(&EpochLog) -> f64;

fn plot_curves(path: &Path, history: &[EpochLog]) -> Result<()> {
    let err = plot_err(path);
    let root = SVGBackend::new(path, (900, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(350);
    let max_loss = history
        .iter()
        .map(|l| l.loss.max(l.test_loss))
        .fold(0.1, f64::max);
    let accuracy: [(&str, RGBColor, Metric); 2] = [
        ("train", BLUE, |l| l.train_top1),
        ("test", RED, |l| l.test_top1),
    ];
    let loss: [(&str, RGBColor, Metric); 2] = [
        ("train (CE + penalty)", BLUE, |l| l.loss),
        ("test CE", RED, |l| l.test_loss),
    ];
    epoch_chart(&top, "Accuracy (%)", 100.0, history, &accuracy).map_err(|e| err(&e))?;
    epoch_chart(&bottom, "Loss", max_loss * 1.05, history, &loss).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

/// Lines of per-epoch metrics over all stages, with a legend.
fn epoch_chart(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    caption: &str,
    y_max: f64,
    history: &[EpochLog],
    series: &[(&str, RGBColor, Metric)],
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let n = history.len().max(2) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(0f64..n, 0f64..y_max)?;
    chart.configure_mesh().x_desc("epoch (all stages)").draw()?;
    for &(label, color, f) in series {
        chart
            .draw_series(LineSeries::new(
                history
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (i as f64 + 1.0, f(l))),
                color,
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn plot_gates(path: &Path, history: &[EpochLog]) -> Result<()> {
    let err = plot_err(path);
    let search: Vec<&EpochLog> = history
        .iter()
        .filter(|l| !l.open_by_layer.is_empty())
        .collect();
    let mut series: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for (i, l) in search.iter().enumerate() {
        for (name, &open) in &l.open_by_layer {
            series
                .entry(name.as_str())
                .or_default()
                .push((i as f64 + 1.0, open as f64));
        }
    }
    let max = series.values().flatten().map(|p| p.1).fold(1.0, f64::max);
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Open gates per layer over the architecture epochs",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .right_y_label_area_size(10)
        .build_cartesian_2d(0.5f64..(search.len().max(1) as f64 + 0.5), 0f64..max * 1.05)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("architecture epoch")
        .y_desc("open channels")
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, points)) in series.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points, color))
            .map_err(|e| err(&e))?
            .label(name.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

fn plot_alpha(path: &Path, alpha: &[f64]) -> Result<()> {
    let err = plot_err(path);
    let lo = alpha.iter().cloned().fold(0.0, f64::min);
    let hi = alpha.iter().cloned().fold(0.0, f64::max);
    let bins = 40usize;
    let width = ((hi - lo) / bins as f64).max(1e-6);
    let mut counts = vec![0u32; bins];
    for &a in alpha {
        let b = (((a - lo) / width) as usize).min(bins - 1);
        counts[b] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(1).max(1);
    let root = SVGBackend::new(path, (900, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Final alpha (kept: alpha > 0)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(lo..(lo + width * bins as f64), 0u32..top + top / 10 + 1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("alpha")
        .y_desc("channels")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(counts.iter().enumerate().map(|(i, &c)| {
            let x0 = lo + i as f64 * width;
            let color = if x0 + width / 2.0 > 0.0 { GREEN } else { RED };
            Rectangle::new([(x0, 0), (x0 + width, c)], color.mix(0.7).filled())
        }))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

fn plot_widths(path: &Path, layers: &[LayerWidths]) -> Result<()> {
    let err = plot_err(path);
    let max = layers.iter().map(|l| l.before).max().unwrap_or(1) as f64;
    let root = SVGBackend::new(path, (900, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Channels per gated layer: before (grey), after (blue)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(0f64..layers.len() as f64, 0f64..max * 1.05)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("gated layer (in order)")
        .y_desc("channels")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(layers.iter().enumerate().map(|(i, l)| {
            Rectangle::new(
                [(i as f64 + 0.1, 0.0), (i as f64 + 0.9, l.before as f64)],
                BLACK.mix(0.2).filled(),
            )
        }))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(layers.iter().enumerate().map(|(i, l)| {
            Rectangle::new(
                [(i as f64 + 0.25, 0.0), (i as f64 + 0.75, l.after as f64)],
                BLUE.mix(0.8).filled(),
            )
        }))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

/// A heat grid of kept fractions: one row per block, one column per candidate; white = removed.
fn plot_grid(path: &Path, grid: &dnal_zoo::StructureGrid) -> Result<()> {
    let err = plot_err(path);
    let (rows, cols) = (grid.rows.len().max(1), grid.columns.len().max(1));
    let root =
        SVGBackend::new(path, (120 + 90 * cols as u32, 80 + 22 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Output channels kept per block and candidate (white: removed)",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0..cols, 0..rows)
        .map_err(|e| err(&e))?;
    let columns = grid.columns.clone();
    let row_names = grid.rows.clone();
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(cols)
        .y_labels(rows)
        .x_label_formatter(&|x| columns.get(*x).cloned().unwrap_or_default())
        .y_label_formatter(&|y| {
            let name: Option<&String> = rows.checked_sub(y + 1).and_then(|r| row_names.get(r));
            name.map_or_else(String::new, |n| n.to_string())
        })
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(grid.cells.iter().enumerate().flat_map(|(r, row)| {
            row.iter().enumerate().map(move |(c, &v)| {
                let y = rows - 1 - r;
                let color = if v <= 0.0 {
                    WHITE.mix(1.0)
                } else {
                    BLUE.mix(0.15 + 0.85 * v.min(1.0))
                };
                Rectangle::new([(c, y), (c + 1, y + 1)], color.filled())
            })
        }))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}
