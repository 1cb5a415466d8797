//! What a run tells its user: a line and a JSON line per epoch, `report.json`, `report.md` and
//! SVG plots.

use std::path::Path;

use dnal_core::BackendKind;
use serde::{Deserialize, Serialize};

use crate::config::{Baseline, TrainConfig};
use crate::error::{Result, TrainError};
use crate::plots;
use crate::progress::{EpochLog, Progress};

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
    /// MACs as the authors' released code counts them, where that differs (ResNet-50,
    /// MobileNetV2: channels a residual output closes are also taken from the next conv's
    /// input; `docs/FIDELITY.md`); the figure to compare with the paper's rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macs_released: Option<u64>,
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
    /// Top-1 of the pruned network right after derivation, before the final stage (after
    /// BatchNorm recalibration, where it runs).
    pub derived_top1: Option<f64>,
    /// The same with the BatchNorm statistics the network had when derived (absent without
    /// recalibration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derived_top1_before_recalibration: Option<f64>,
    /// Channels that `arch.round_to` added back after thresholding (absent without rounding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounding_added: Option<usize>,
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
            macs_released: None,
        };
        let pruned = progress.pruned.as_ref().map(|(a, c)| NetSummary {
            top1: a.top1,
            top5: a.top5,
            macs: c.macs,
            params: c.params,
            macs_released: progress.released_macs,
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
            derived_top1_before_recalibration: progress
                .derived_before_recalibration
                .map(|a| a.top1),
            rounding_added: progress.rounding_added,
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
        dnal_core::io::write_atomic(&out.join("report.json"), json.as_bytes())?;
        dnal_core::io::write_atomic(&out.join("report.md"), self.markdown().as_bytes())?;
        if self.config.report.plots {
            plots::plot_curves(&out.join("curves.svg"), &progress.history)?;
            if !self.layers.is_empty() {
                plots::plot_gates(&out.join("gates.svg"), &progress.history)?;
                plots::plot_alpha(&out.join("alpha.svg"), &progress.final_alpha)?;
                plots::plot_widths(
                    &out.join("widths.svg"),
                    &self
                        .layers
                        .iter()
                        .map(|l| (l.before, l.after))
                        .collect::<Vec<_>>(),
                )?;
            }
            if let Some(grid) = &self.structure_grid {
                plots::plot_grid(&out.join("structure.svg"), grid)?;
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
            if let Some(m) = p.macs_released {
                s += &format!(
                    "Counted as the released code counts (a closed residual output also leaves the next conv's input): {} MACs, -{:.1} %.\n",
                    human(m),
                    100.0 * (1.0 - m as f64 / b.macs.max(1) as f64)
                );
            }
            if let Some(n) = self.rounding_added {
                s += &format!(
                    "Widths rounded up to multiples of {} (arch.round_to): {n} channels added back after thresholding.\n",
                    self.config.arch.round_to
                );
            }
            match (self.derived_top1, self.derived_top1_before_recalibration) {
                (Some(d), Some(stale)) => {
                    s += &format!(
                        "Top-1 right after derivation, before the final stage: {d:.2} % with BatchNorm statistics re-estimated on {} training batches ({stale:.2} % with the statistics it had when derived).\n",
                        self.config.arch.bn_recalibration_batches
                    );
                }
                (Some(d), None) => {
                    s += &format!(
                        "Top-1 right after derivation, before the final stage: {d:.2} %.\n"
                    );
                }
                _ => {}
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
    Ok(dnal_core::io::write_atomic(path, text.as_bytes())?)
}
