//! Checkpoints: the current network, the optimiser states and the run's progress, written to a
//! temporary folder that replaces the previous checkpoint only once complete.

use std::path::{Path, PathBuf};

use burn::optim::OptimizerRecord;
use dnal_zoo::Network;

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::pipeline::Progress;

/// The optimiser states of the weights and of alpha.
pub type OptimRecords = (Option<OptimizerRecord>, Option<OptimizerRecord>);

const PROGRESS: &str = "progress.json";
const CONFIG: &str = "config.toml";
const MODEL: &str = "model";
const OPTIM_WEIGHTS: &str = "optim-weights.bpk";
const OPTIM_ALPHA: &str = "optim-alpha.bpk";

fn ckpt_err(path: &Path, message: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    dir.with_file_name(format!("{name}.{suffix}"))
}

/// Writes a checkpoint into `dir`: first into `dir.tmp`, then the old checkpoint is moved to
/// `dir.old`, the new one into place, and the old one deleted. At every instant one complete
/// checkpoint exists (`dir`, or `dir.old` during the swap).
pub fn save<N: Network>(
    dir: &Path,
    cfg: &TrainConfig,
    progress: &Progress,
    model: Option<&N>,
    optims: Option<OptimRecords>,
) -> Result<()> {
    let tmp = sibling(dir, "tmp");
    let old = sibling(dir, "old");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ckpt_err(&tmp, e))?;
    let json = serde_json::to_string_pretty(progress).expect("progress serialises");
    std::fs::write(tmp.join(PROGRESS), json).map_err(|e| ckpt_err(&tmp, e))?;
    std::fs::write(tmp.join(CONFIG), cfg.to_toml()).map_err(|e| ckpt_err(&tmp, e))?;
    if let Some(m) = model {
        dnal_zoo::save(m, &tmp.join(MODEL))?;
    }
    if let Some((w, a)) = optims {
        for (rec, name) in [(w, OPTIM_WEIGHTS), (a, OPTIM_ALPHA)] {
            if let Some(rec) = rec {
                let path = tmp.join(name);
                rec.save(&path).map_err(|e| ckpt_err(&path, e))?;
            }
        }
    }
    // Make the new checkpoint durable before it replaces the old one.
    if let Ok(f) = std::fs::File::open(&tmp) {
        let _ = f.sync_all();
    }
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(|e| ckpt_err(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| ckpt_err(dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The checkpoint folder to resume from: `dir`, or `dir.old` if a swap was interrupted.
pub fn locate(dir: &Path) -> Result<PathBuf> {
    for candidate in [dir.to_path_buf(), sibling(dir, "old")] {
        if candidate.join(PROGRESS).is_file() {
            return Ok(candidate);
        }
    }
    Err(ckpt_err(
        dir,
        "no checkpoint here (expected progress.json); start the run without --resume, or pass the output folder of an earlier run",
    ))
}

/// The config a checkpoint was written with.
pub fn config(dir: &Path) -> Result<TrainConfig> {
    let dir = locate(dir)?;
    let path = dir.join(CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| ckpt_err(&path, e))?;
    TrainConfig::from_toml(&text, &path.display().to_string())
}

/// Reads a checkpoint: progress, the network (if one was saved) and the optimiser states.
pub fn load<N: Network>(
    dir: &Path,
    cfg: &TrainConfig,
    load_model: impl Fn(&Path) -> Result<N>,
) -> Result<(Progress, Option<N>, Option<OptimRecords>)> {
    let dir = locate(dir)?;
    let saved = config(&dir)?;
    if &saved != cfg {
        return Err(ckpt_err(
            &dir,
            "it was written with another config; resume with the same preset and overrides (or only --resume DIR, which reads the config from the checkpoint)",
        ));
    }
    let path = dir.join(PROGRESS);
    let text = std::fs::read_to_string(&path).map_err(|e| ckpt_err(&path, e))?;
    let progress: Progress = serde_json::from_str(&text)
        .map_err(|e| ckpt_err(&path, format!("corrupt progress file: {e}")))?;
    let model = if dir.join(MODEL).is_dir() {
        Some(load_model(&dir.join(MODEL))?)
    } else {
        None
    };
    let read = |name: &str| -> Result<Option<OptimizerRecord>> {
        let p = dir.join(name);
        if p.is_file() {
            OptimizerRecord::load(&p)
                .map(Some)
                .map_err(|e| ckpt_err(&p, format!("corrupt optimiser state: {e}")))
        } else {
            Ok(None)
        }
    };
    let optims = if progress.epochs_done > 0 {
        Some((read(OPTIM_WEIGHTS)?, read(OPTIM_ALPHA)?))
    } else {
        None
    };
    Ok((progress, model, optims))
}
