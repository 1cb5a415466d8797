//! Checkpoints: the current network, the optimiser states and the run's progress, written to a
//! temporary folder that replaces the previous checkpoint only once complete. Every file is
//! listed with its SHA-256 in `SHA256SUMS` (the format of `sha256sum -c`), checked on load, so
//! a damaged byte anywhere is an error rather than a run that trains on from corrupted state.

use std::io::Read;
use std::path::{Path, PathBuf};

use dnal_zoo::Network;

use sha2::{Digest, Sha256};

use crate::config::TrainConfig;
use burn::optim::OptimizerRecord;

use crate::error::{Result, TrainError};
use crate::phase::{OptimRecords, Phase, phase_epochs, phases};
use crate::progress::Progress;

const PROGRESS: &str = "progress.json";
const CONFIG: &str = "config.toml";
const MODEL: &str = "model";
const OPTIM_WEIGHTS: &str = "optim-weights.bpk";
const OPTIM_ALPHA: &str = "optim-alpha.bpk";
const CHECKSUMS: &str = "SHA256SUMS";

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
    write_checksums(&tmp)?;
    fail::fail_point!("checkpoint-write", |_| Err(ckpt_err(
        &tmp,
        "injected write failure (no space left on device)"
    )));
    // Make the new checkpoint durable before it replaces the old one: its files' contents
    // (written without a sync of their own), then the folder's entries. Otherwise a power cut
    // just after the swap could leave empty files in the only checkpoint.
    for name in files(&tmp)? {
        let path = tmp.join(name);
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| ckpt_err(&path, e))?;
    }
    if let Ok(f) = std::fs::File::open(&tmp) {
        let _ = f.sync_all();
    }
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(|e| ckpt_err(dir, e))?;
    }
    fail::fail_point!("checkpoint-swap", |_| Err(ckpt_err(
        dir,
        "injected failure between moving the old checkpoint away and the new one in"
    )));
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

/// Every file under `dir` (recursively), as paths relative to it with `/` separators, sorted.
fn files(dir: &Path) -> Result<Vec<String>> {
    fn walk(root: &Path, here: &Path, out: &mut Vec<String>) -> Result<()> {
        let entries = std::fs::read_dir(here).map_err(|e| ckpt_err(here, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| ckpt_err(here, e))?;
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out)?;
            } else {
                let rel = path.strip_prefix(root).expect("a path under the root");
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// The SHA-256 of a file, in lowercase hex.
fn sha256(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| ckpt_err(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| ckpt_err(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Lists every file of the checkpoint in `dir` with its SHA-256 in `SHA256SUMS` (done by
/// [`save`]; public for tools that rewrite a checkpoint's files on purpose).
pub fn write_checksums(dir: &Path) -> Result<()> {
    let mut text = String::new();
    for name in files(dir)? {
        if name != CHECKSUMS {
            text.push_str(&format!("{}  {name}\n", sha256(&dir.join(&name))?));
        }
    }
    let path = dir.join(CHECKSUMS);
    std::fs::write(&path, text).map_err(|e| ckpt_err(&path, e))
}

/// Checks every file of the checkpoint in `dir` against `SHA256SUMS`: each listed file must
/// exist with its recorded content.
pub fn verify(dir: &Path) -> Result<()> {
    let list = dir.join(CHECKSUMS);
    let text = std::fs::read_to_string(&list).map_err(|e| {
        ckpt_err(
            &list,
            format!("{e}; every checkpoint lists its files' checksums here, so this one is incomplete or damaged: start the run again without --resume"),
        )
    })?;
    let damaged = |path: &Path, what: &str| {
        ckpt_err(
            path,
            format!(
                "{what}; the checkpoint is damaged: resume from an intact copy, or start the run again without --resume"
            ),
        )
    };
    for (i, line) in text.lines().enumerate() {
        let (hash, name) = line
            .split_once("  ")
            .filter(|(h, n)| h.len() == 64 && !n.is_empty() && !n.contains(".."))
            .ok_or_else(|| damaged(&list, &format!("line {} is not `<sha256>  <file>`", i + 1)))?;
        let path = dir.join(name);
        if !path.is_file() {
            return Err(damaged(&path, "the file is missing"));
        }
        if sha256(&path)? != hash {
            return Err(damaged(
                &path,
                "its content does not match its checksum (changed since it was written)",
            ));
        }
    }
    for required in [PROGRESS, CONFIG] {
        if !text.lines().any(|l| l.ends_with(&format!("  {required}"))) {
            return Err(damaged(
                &dir.join(required),
                "the file is not listed in SHA256SUMS",
            ));
        }
    }
    Ok(())
}

/// Checks that `progress` can belong to a run of `cfg`: phase, epoch and counts in range, and
/// the epoch history consistent with them.
pub fn validate_progress(progress: &Progress, cfg: &TrainConfig, path: &Path) -> Result<()> {
    let bad = |message: String| {
        Err(ckpt_err(
            path,
            format!(
                "{message}; the file does not fit this run's recipe (damaged, or edited by hand): start the run again without --resume"
            ),
        ))
    };
    let phases = phases(cfg);
    if progress.phase_index > phases.len() {
        return bad(format!(
            "phase_index {} is out of range: the run has {} phases",
            progress.phase_index,
            phases.len()
        ));
    }
    if let Some(&phase) = phases.get(progress.phase_index) {
        let epochs = phase_epochs(cfg, phase);
        if progress.epochs_done > epochs {
            return bad(format!(
                "epochs_done {} is more than the {} epochs of the {} stage",
                progress.epochs_done,
                epochs,
                phase.name()
            ));
        }
        if !progress.entered && progress.epochs_done > 0 {
            return bad("epochs done in a stage that was not entered".into());
        }
        if let Some(partial) = &progress.partial {
            if !progress.entered || progress.epochs_done >= epochs {
                return bad("a stopped epoch in a stage with no epoch left".into());
            }
            if partial.batches_done == 0 || partial.seen < partial.correct {
                return bad("the stopped epoch's counts are inconsistent".into());
            }
        }
    } else if progress.entered || progress.epochs_done > 0 || progress.partial.is_some() {
        return bad("a finished run with a stage in progress".into());
    }
    // The history: every epoch of the finished phases, then the current phase's, in order.
    let mut expected = Vec::new();
    for (i, &phase) in phases.iter().enumerate().take(progress.phase_index + 1) {
        let done = if i < progress.phase_index {
            phase_epochs(cfg, phase)
        } else {
            progress.epochs_done
        };
        expected.extend((0..done).map(|e| (phase.name(), e)));
    }
    let found: Vec<(&str, usize)> = progress
        .history
        .iter()
        .map(|l| (l.stage.as_str(), l.epoch))
        .collect();
    if found != expected {
        return bad(format!(
            "the history holds {} epoch(s) that do not match the stages and epochs done ({} expected)",
            found.len(),
            expected.len()
        ));
    }
    if let Some(l) = progress.lambda
        && !(l.is_finite() && l >= 0.0)
    {
        return bad(format!("lambda {l} is not a finite number >= 0"));
    }
    let done = |phase| {
        phases
            .iter()
            .position(|&p| p == phase)
            .is_some_and(|i| i < progress.phase_index)
    };
    if done(Phase::Weights) && progress.dense.is_none() {
        return bad("the weight stage is done but its result is missing".into());
    }
    if (done(Phase::Arch) || done(Phase::Joint)) && progress.architecture.is_none() {
        return bad("the architecture stage is done but the architecture is missing".into());
    }
    Ok(())
}

/// The config a checkpoint was written with.
pub fn config(dir: &Path) -> Result<TrainConfig> {
    let dir = locate(dir)?;
    verify(&dir)?;
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
    validate_progress(&progress, cfg, &path)?;
    let entered_any = progress.phase_index > 0 || progress.entered;
    if entered_any && !dir.join(MODEL).is_dir() {
        return Err(ckpt_err(
            &dir.join(MODEL),
            "the network of a stage in progress is missing: the checkpoint is damaged; start the run again without --resume",
        ));
    }
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
    let optims = if progress.epochs_done > 0 || progress.partial.is_some() {
        Some((read(OPTIM_WEIGHTS)?, read(OPTIM_ALPHA)?))
    } else {
        None
    };
    Ok((progress, model, optims))
}
