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

/// Classifies the images `inputs` (files, or folders whose image files are all read, sub-folders
/// too) with the run in
/// `run`. Returns the predictions of the images that could be read, in input order, and one
/// line per input that could not (naming the file).
pub fn predict(
    run: &Path,
    inputs: &[PathBuf],
    opts: &PredictOptions,
) -> Result<(Vec<Prediction>, Vec<String>)> {
    if opts.top == 0 {
        return Err(TrainError::from(dnal_core::CoreError::invalid(
            "--top",
            "0 classes per image: it must be at least 1",
        )));
    }
    let cfg = run_config(run)?;
    let dir = opts.which.saved_in(run)?;
    let eval = eval_preprocessing(&cfg.data);
    let classes: Vec<String> = std::fs::read_to_string(run.join(paths::CLASSES))
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default();
    let (files, errors) = expand(inputs);
    let batch = cfg.data.eval_batch_size.max(1);
    let bar = crate::report::progress_bar(
        opts.quiet || files.len() <= batch,
        files.len() as u64,
        "predict",
    );
    let (predictions, errors) = cfg.model.name.with_type(Forward {
        dir: &dir,
        files: &files,
        eval: &eval,
        batch,
        top: opts.top,
        classes: &classes,
        bar: &bar,
        errors,
    })?;
    bar.finish_and_clear();
    Ok((predictions, errors))
}

/// The files of `inputs`: a file as given, a folder's image files (by extension) in name order,
/// its sub-folders' after its own; and a line per input that does not exist, per folder that
/// cannot be listed and per folder that holds no image.
fn expand(inputs: &[PathBuf]) -> (Vec<PathBuf>, Vec<String>) {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let (found, unreadable) = dnal_data::folder::image_files(input);
            errors.extend(unreadable.iter().map(|e| e.to_string()));
            if found.is_empty() && unreadable.is_empty() {
                errors.push(format!(
                    "{}: no image file in this folder or below it (looked for .{})",
                    input.display(),
                    dnal_data::folder::IMAGE_EXTENSIONS.join(", .")
                ));
            }
            files.extend(found);
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

/// `error`'s message, led by the file's name unless it names the file already.
fn naming(file: &Path, error: impl std::fmt::Display) -> String {
    let (name, message) = (file.display().to_string(), error.to_string());
    if message.contains(&name) {
        message
    } else {
        format!("{name}: {message}")
    }
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

/// Loads the network, then reads, preprocesses and classifies the files one batch at a time
/// (a folder of any size needs one batch of images in memory).
struct Forward<'a> {
    dir: &'a Path,
    files: &'a [PathBuf],
    eval: &'a Eval,
    batch: usize,
    top: usize,
    classes: &'a [String],
    bar: &'a indicatif::ProgressBar,
    errors: Vec<String>,
}

impl WithType for Forward<'_> {
    type Output = (Vec<Prediction>, Vec<String>);

    fn run<N: Network>(mut self) -> Result<Self::Output> {
        let device = dnal_core::BackendKind::host_device();
        let net: N = dnal_zoo::load(self.dir, |c| N::build(c, &device))?;
        let net = dnal_zoo::Inference::new(&net, &device)?;
        let shape = [self.eval.channels, self.eval.size, self.eval.size];
        let mut predictions = Vec::with_capacity(self.files.len());
        for chunk in self.files.chunks(self.batch) {
            let mut images = Vec::new();
            let mut read = Vec::with_capacity(chunk.len());
            for file in chunk {
                match preprocess(file, self.eval, &mut images) {
                    Ok(()) => read.push(file.clone()),
                    Err(e) => self.errors.push(naming(file, e)),
                }
            }
            self.bar.inc(chunk.len() as u64);
            if read.is_empty() {
                continue;
            }
            let [c, h, w] = shape;
            let x = Tensor::<4>::from_data(TensorData::new(images, [read.len(), c, h, w]), &device);
            let logits: Vec<f32> = net
                .forward(x)?
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .map_err(|e| TrainError::Checkpoint {
                    path: self.dir.to_path_buf(),
                    message: format!("the network's output is unreadable: {e:?}"),
                })?;
            let width = logits.len() / read.len();
            predictions.extend(
                read.into_iter()
                    .zip(logits.chunks(width))
                    .map(|(file, row)| Prediction {
                        file,
                        top: top_k(row, self.top, self.classes),
                    }),
            );
        }
        Ok((predictions, self.errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_give_their_image_files_sub_folders_included() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("images");
        for file in [
            "a.png",
            "notes.txt",
            "sub/b.JPG",
            "sub/deeper/c.webp",
            "z.jpeg",
        ] {
            let path = root.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"").unwrap();
        }
        std::fs::create_dir_all(root.join("empty")).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&root, root.join("sub/loop")).unwrap();
        let named = root.join("notes.txt");
        let (files, errors) = expand(&[root.clone(), named.clone(), root.join("empty")]);
        let expected: Vec<PathBuf> = ["a.png", "z.jpeg", "sub/b.JPG", "sub/deeper/c.webp"]
            .iter()
            .map(|f| root.join(f))
            .chain([named])
            .collect();
        assert_eq!(files, expected);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("empty") && errors[0].contains("no image file"),
            "{errors:?}"
        );
    }
}
