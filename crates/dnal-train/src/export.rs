//! A run's saved network (pruned or dense) as an ONNX model (`dnal-train export`, and
//! `pruned.onnx` at the end of every run), with the run's class names and config in the model's
//! metadata.

use std::path::{Path, PathBuf};

use dnal_zoo::Network;

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::progress::paths;
use crate::registry::WithType;
use crate::report::Report;

/// Which of a run's saved networks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// After the final stage.
    Pruned,
    /// After the weight stage.
    Dense,
}

impl Which {
    /// `pruned` or `dense`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "pruned" => Ok(Which::Pruned),
            "dense" => Ok(Which::Dense),
            other => Err(TrainError::from(dnal_core::CoreError::invalid(
                "--which",
                format!("`{other}` is not a saved network; use pruned or dense"),
            ))),
        }
    }

    /// The run's folder of that network.
    pub fn folder(self) -> &'static str {
        match self {
            Which::Pruned => paths::PRUNED,
            Which::Dense => paths::DENSE,
        }
    }

    /// The folder of this network in the run `run`, or an error saying when a run has it.
    pub fn saved_in(self, run: &Path) -> Result<PathBuf> {
        let dir = run.join(self.folder());
        if dir.is_dir() {
            return Ok(dir);
        }
        Err(TrainError::Checkpoint {
            path: dir,
            message: format!(
                "the run has no {} network (yet); --which dense is saved after the weight stage, pruned after the final stage",
                self.folder()
            ),
        })
    }
}

/// The ONNX file of the run in `run`'s network `which`, at `out` (default
/// `<run>/<which>.onnx`; an existing folder gets `<which>.onnx` in it); returns where it was
/// written.
pub fn export_run(run: &Path, which: Which, out: Option<&Path>, opset: i64) -> Result<PathBuf> {
    dnal_onnx::check_opset(opset)?;
    let cfg = run_config(run)?;
    let dir = which.saved_in(run)?;
    // A folder given as --out gets the file of the default name.
    let target = match out {
        Some(dir) if dir.is_dir() => dir.join(file_name(which)),
        Some(file) => file.to_path_buf(),
        None => default_path(run, which),
    };
    let opts = options(run, &cfg, which, opset);
    cfg.model.name.with_type(Load {
        dir: &dir,
        target: &target,
        opts: &opts,
    })?;
    Ok(target)
}

/// Writes `net`, the run's network `which`, as `<run>/<which>.onnx`.
pub fn write<N: Network>(net: &N, run: &Path, cfg: &TrainConfig, which: Which) -> Result<PathBuf> {
    let target = default_path(run, which);
    let opts = options(run, cfg, which, dnal_onnx::DEFAULT_OPSET);
    dnal_onnx::export(net, &target, &opts)?;
    Ok(target)
}

fn default_path(run: &Path, which: Which) -> PathBuf {
    run.join(file_name(which))
}

/// `pruned.onnx` or `dense.onnx`.
fn file_name(which: Which) -> String {
    format!("{}.onnx", which.folder())
}

/// The model's metadata: class names (one per line, from `classes.txt`), the network, and the
/// run's config (whose `[data]` says how images were normalised).
fn options(run: &Path, cfg: &TrainConfig, which: Which, opset: i64) -> dnal_onnx::ExportOptions {
    let mut metadata = vec![
        ("dnal.network".to_string(), which.folder().to_string()),
        ("dnal.config".to_string(), cfg.to_toml()),
    ];
    if let Ok(classes) = std::fs::read_to_string(run.join(paths::CLASSES)) {
        metadata.push(("dnal.classes".to_string(), classes));
    }
    dnal_onnx::ExportOptions { opset, metadata }
}

/// The config of the run in `run`: its report's, or, for an unfinished run, its checkpoint's.
pub(crate) fn run_config(run: &Path) -> Result<TrainConfig> {
    let report = run.join("report.json");
    if report.is_file() {
        let text = std::fs::read_to_string(&report).map_err(dnal_core::CoreError::io(&report))?;
        let parsed: Report = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
            path: report.clone(),
            message: format!("not a run report ({e}); is this a dnal run folder?"),
        })?;
        return Ok(parsed.config);
    }
    if !run.join(paths::CHECKPOINT).is_dir() {
        return Err(TrainError::Checkpoint {
            path: run.to_path_buf(),
            message: "not a run folder: it has neither report.json nor a checkpoint".into(),
        });
    }
    crate::checkpoint::config(&run.join(paths::CHECKPOINT))
}

struct Load<'a> {
    dir: &'a Path,
    target: &'a Path,
    opts: &'a dnal_onnx::ExportOptions,
}

impl WithType for Load<'_> {
    type Output = ();

    fn run<N: Network>(self) -> Result<()> {
        let device = dnal_core::BackendKind::host_device();
        let net: N = dnal_zoo::load(self.dir, |c| N::build(c, &device))?;
        dnal_onnx::export(&net, self.target, self.opts)?;
        Ok(())
    }
}
