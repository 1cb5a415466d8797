//! `dnal-train predict`: a run's saved network on image files, each preprocessed as the run's
//! evaluation preprocessed its test images, and the most likely classes with their
//! probabilities.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use dnal_data::Transform;
use dnal_zoo::Network;
use rand::SeedableRng;
use serde::Serialize;

use crate::data::{Eval, eval_preprocessing};
use crate::error::{Result, TrainError};
use crate::export::{Which, run_config};
use crate::progress::paths;
use crate::registry::WithType;

/// One class of a prediction.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Guess {
    /// Class index.
    pub index: usize,
    /// Class name (`classes.txt`).
    pub class: String,
    /// Softmax probability.
    pub probability: f64,
}

/// The most likely classes of one image, best first.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prediction {
    /// The image file.
    pub file: PathBuf,
    /// The top classes.
    pub top: Vec<Guess>,
}

/// What `predict` does.
#[derive(Clone, Debug)]
pub struct PredictOptions {
    /// Which saved network.
    pub which: Which,
    /// Classes per image.
    pub top: usize,
    /// No progress bar.
    pub quiet: bool,
}

/// Classifies the images `inputs` (files, or folders whose files are all read) with the run in
/// `run`. Returns the predictions of the images that could be read, in input order, and one
/// line per input that could not (naming the file).
pub fn predict(
    run: &Path,
    inputs: &[PathBuf],
    opts: &PredictOptions,
) -> Result<(Vec<Prediction>, Vec<String>)> {
    let cfg = run_config(run)?;
    let dir = run.join(opts.which.folder());
    if !dir.is_dir() {
        return Err(TrainError::Checkpoint {
            path: dir,
            message: "the run has no such network (yet)".into(),
        });
    }
    let eval = eval_preprocessing(&cfg.data);
    let classes: Vec<String> = std::fs::read_to_string(run.join(paths::CLASSES))
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default();
    let (files, mut errors) = expand(inputs);
    let plane = eval.channels * eval.size * eval.size;
    let mut images = Vec::with_capacity(files.len() * plane);
    let mut read = Vec::with_capacity(files.len());
    for file in files {
        match preprocess(&file, &eval, &mut images) {
            Ok(()) => read.push(file),
            Err(e) => errors.push(format!("{}: {e}", file.display())),
        }
    }
    let batch = cfg.data.eval_batch_size.max(1);
    let bar = crate::report::progress_bar(
        opts.quiet || read.len() <= batch,
        read.len() as u64,
        "predict",
    );
    let logits = cfg.model.name.with_type(Forward {
        dir: &dir,
        images: &images,
        shape: [eval.channels, eval.size, eval.size],
        batch,
        bar: &bar,
    })?;
    bar.finish_and_clear();
    let width = logits.len() / read.len().max(1);
    let predictions = read
        .into_iter()
        .zip(logits.chunks(width.max(1)))
        .map(|(file, row)| Prediction {
            file,
            top: top_k(row, opts.top, &classes),
        })
        .collect();
    Ok((predictions, errors))
}

/// The files of `inputs` (a folder's files in name order) and a line per input that does not
/// exist.
fn expand(inputs: &[PathBuf]) -> (Vec<PathBuf>, Vec<String>) {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for input in inputs {
        if input.is_dir() {
            match std::fs::read_dir(input) {
                Ok(entries) => {
                    let mut inside: Vec<PathBuf> = entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.is_file())
                        .collect();
                    inside.sort();
                    files.extend(inside);
                }
                Err(e) => errors.push(format!("{}: cannot list the folder: {e}", input.display())),
            }
        } else if input.is_file() {
            files.push(input.clone());
        } else {
            errors.push(format!("{}: no such file or folder", input.display()));
        }
    }
    (files, errors)
}

/// Decodes `file`, brings it to the network's input size as the evaluation did, normalises it
/// and appends it (planar) to `out`.
fn preprocess(file: &Path, eval: &Eval, out: &mut Vec<f32>) -> Result<()> {
    let image = dnal_data::folder::decode(file, eval.channels)?;
    // The fixed-size data sets were evaluated as they are: another size is resized to theirs.
    let transform = match (&eval.transform, image.height, image.width) {
        (Transform::Identity, h, w) if h != eval.size || w != eval.size => {
            Transform::ResizeCenterCrop {
                resize: eval.size,
                crop: eval.size,
            }
        }
        (t, _, _) => t.clone(),
    };
    // Evaluation transforms are deterministic; the generator is never drawn from.
    let image = transform.apply(image, &mut rand::rngs::StdRng::seed_from_u64(0));
    let start = out.len();
    out.resize(start + eval.channels * eval.size * eval.size, 0.0);
    eval.normalize.write_planar(&image, &mut out[start..]);
    Ok(())
}

/// The `k` most likely classes of one row of logits, with softmax probabilities.
fn top_k(logits: &[f32], k: usize, classes: &[String]) -> Vec<Guess> {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let exp: Vec<f64> = logits.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(k.max(1))
        .map(|index| Guess {
            index,
            class: classes
                .get(index)
                .cloned()
                .unwrap_or_else(|| index.to_string()),
            probability: exp[index] / sum,
        })
        .collect()
}

struct Forward<'a> {
    dir: &'a Path,
    images: &'a [f32],
    shape: [usize; 3],
    batch: usize,
    bar: &'a indicatif::ProgressBar,
}

impl WithType for Forward<'_> {
    type Output = Vec<f32>;

    fn run<N: Network>(self) -> Result<Vec<f32>> {
        let device = Device::default();
        let net: N = dnal_zoo::load(self.dir, |c| N::build(c, &device))?;
        let net = net.valid();
        let plane: usize = self.shape.iter().product();
        let mut logits = Vec::new();
        for chunk in self.images.chunks(self.batch * plane) {
            let n = chunk.len() / plane;
            let [c, h, w] = self.shape;
            let x = Tensor::<4>::from_data(TensorData::new(chunk.to_vec(), [n, c, h, w]), &device);
            let y: Vec<f32> = net
                .forward(x)
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .map_err(|e| TrainError::Checkpoint {
                    path: self.dir.to_path_buf(),
                    message: format!("the network's output is unreadable: {e:?}"),
                })?;
            logits.extend(y);
            self.bar.inc(n as u64);
        }
        Ok(logits)
    }
}
