//! Building the training and test loaders of a run from its data section.

use std::path::PathBuf;
use std::sync::Arc;

use dnal_data::{
    CifarKind, DataError, IdxKind, ImageFolder, ImageSet, Loader, LoaderConfig, Normalize, Source,
    Split, Transform,
};

use crate::config::{DataConfig, DatasetName};
use crate::error::Result;

/// The loaders of a run and what the model needs to know about the images.
pub struct RunData {
    /// Shuffled, augmented training batches.
    pub train: Loader,
    /// Test batches in file order.
    pub test: Loader,
    /// Channels of the images.
    pub channels: usize,
    /// Side of the (square) images the model sees.
    pub image_size: usize,
    /// Class names.
    pub classes: Vec<String>,
}

/// Where downloaded data sets live by default: `$DNAL_DATA`, else `data/`.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("DNAL_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("data"))
}

/// Channels, image side and class count of a data set, known without reading it (except for
/// image folders when `num_classes` is not given: their classes are their sub-folders).
/// A fixed data set's `model.num_classes` must be its own class count.
pub fn shape_of(cfg: &DataConfig, num_classes: Option<usize>) -> Result<(usize, usize, usize)> {
    let fixed = |channels: usize, size: usize, classes: usize| match num_classes {
        Some(n) if n != classes => Err(DataError::invalid(
            "model.num_classes",
            format!(
                "{n}, but this data set has {classes} classes; leave the key out (it defaults to the data set's)"
            ),
        )),
        _ => Ok((channels, size, classes)),
    };
    Ok(match cfg.dataset {
        DatasetName::Mnist5k | DatasetName::Mnist | DatasetName::FashionMnist => fixed(1, 28, 10)?,
        DatasetName::Cifar10 => fixed(3, 32, 10)?,
        DatasetName::Cifar100 => fixed(3, 32, 100)?,
        DatasetName::ImageFolder => {
            let classes = match num_classes {
                Some(n) => n,
                None => {
                    let root = cfg.path.clone().ok_or_else(|| DataError::invalid(
                        "data.path",
                        "an image-folder data set needs data.path (root/train/<class>/*, root/val/<class>/*)",
                    ))?;
                    ImageFolder::open(&root, Split::Train)?.classes().len()
                }
            };
            (3, cfg.crop_size, classes)
        }
    })
}

/// How a run's evaluation turns a decoded image into the network's input (and how
/// `dnal-train predict` does).
pub struct Eval {
    /// Channels the images decode to (1: grey, 3: RGB).
    pub channels: usize,
    /// Side of the square input.
    pub size: usize,
    /// Resizing and cropping (none for the fixed-size data sets).
    pub transform: Transform,
    /// Per-channel normalisation.
    pub normalize: Normalize,
}

/// The evaluation preprocessing of the data set `cfg` names.
pub fn eval_preprocessing(cfg: &DataConfig) -> Eval {
    let (channels, size, transform, normalize) = match cfg.dataset {
        DatasetName::Mnist5k | DatasetName::Mnist | DatasetName::FashionMnist => {
            (1, 28, Transform::Identity, Normalize::mnist())
        }
        DatasetName::Cifar10 => (3, 32, Transform::Identity, Normalize::cifar10()),
        DatasetName::Cifar100 => (3, 32, Transform::Identity, Normalize::cifar100()),
        DatasetName::ImageFolder => (
            3,
            cfg.crop_size,
            Transform::ResizeCenterCrop {
                resize: cfg.crop_size * 8 / 7,
                crop: cfg.crop_size,
            },
            Normalize::imagenet(),
        ),
    };
    Eval {
        channels,
        size,
        transform,
        normalize,
    }
}

/// Opens the data set and builds both loaders, for a network of `num_classes` outputs (`None`:
/// the data set's count).
pub fn load(cfg: &DataConfig, num_classes: Option<usize>, seed: u64) -> Result<RunData> {
    let data_dir = || cfg.path.clone().unwrap_or_else(default_data_dir);
    let limit = |set: ImageSet, n: Option<usize>| match n {
        Some(n) if n < set.len() => {
            let per_class = n.div_ceil(set.classes().len()).max(1);
            set.balanced_head(per_class)
        }
        _ => set,
    };
    let in_memory = |train: ImageSet, test: ImageSet| -> (Arc<dyn Source>, Arc<dyn Source>) {
        (
            Arc::new(limit(train, cfg.train_limit)),
            Arc::new(limit(test, cfg.test_limit)),
        )
    };
    let (train, test, train_tf) = match cfg.dataset {
        DatasetName::Mnist5k => {
            let (train, test) = match &cfg.path {
                Some(p) => (
                    dnal_data::bundled_mnist_from(p, Split::Train)?,
                    dnal_data::bundled_mnist_from(p, Split::Test)?,
                ),
                None => (
                    dnal_data::bundled_mnist(Split::Train)?,
                    dnal_data::bundled_mnist(Split::Test)?,
                ),
            };
            let (a, b) = in_memory(train, test);
            (a, b, Transform::Identity)
        }
        DatasetName::Mnist | DatasetName::FashionMnist => {
            let kind = if cfg.dataset == DatasetName::Mnist {
                IdxKind::Mnist
            } else {
                IdxKind::FashionMnist
            };
            let dir = data_dir();
            let (a, b) = in_memory(
                dnal_data::load_idx(kind, &dir, Split::Train)?,
                dnal_data::load_idx(kind, &dir, Split::Test)?,
            );
            (a, b, Transform::Identity)
        }
        DatasetName::Cifar10 | DatasetName::Cifar100 => {
            let kind = if cfg.dataset == DatasetName::Cifar10 {
                CifarKind::Cifar10
            } else {
                CifarKind::Cifar100
            };
            let dir = data_dir();
            let (a, b) = in_memory(
                dnal_data::load_cifar(kind, &dir, Split::Train)?,
                dnal_data::load_cifar(kind, &dir, Split::Test)?,
            );
            let aug = if cfg.augment {
                Transform::cifar_train()
            } else {
                Transform::Identity
            };
            (a, b, aug)
        }
        DatasetName::ImageFolder => {
            let root = cfg.path.clone().ok_or_else(|| DataError::invalid(
                "data.path",
                "an image-folder data set needs data.path (root/train/<class>/*, root/val/<class>/*)",
            ))?;
            let per_class = |set: &ImageFolder, n: Option<usize>| {
                n.map(|n| n.div_ceil(set.classes().len()).max(1))
            };
            let mut train = ImageFolder::open(&root, Split::Train)?;
            if let Some(k) = per_class(&train, cfg.train_limit) {
                train = train.balanced_head(k);
            }
            // Labels are the training split's class indices in both splits.
            let mut test = ImageFolder::open_like(&root, Split::Test, &train)?;
            if let Some(k) = per_class(&test, cfg.test_limit) {
                test = test.balanced_head(k);
            }
            let size = cfg.crop_size;
            let train_tf = if cfg.augment {
                Transform::RandomResizedCrop {
                    size,
                    scale: cfg.crop_scale,
                }
            } else {
                Transform::ResizeCenterCrop {
                    resize: size,
                    crop: size,
                }
            };
            (
                Arc::new(train) as Arc<dyn Source>,
                Arc::new(test) as Arc<dyn Source>,
                train_tf,
            )
        }
    };
    let Eval {
        transform: test_tf,
        normalize,
        size,
        ..
    } = eval_preprocessing(cfg);
    let channels = train.channels();
    let classes = train.classes().to_vec();
    if let Some(n) = num_classes.filter(|&n| n < classes.len()) {
        return Err(DataError::invalid(
            "model.num_classes",
            format!(
                "{n}, but the data set has {} classes (its labels reach {}); give at least {0}, or leave the key out",
                classes.len(),
                classes.len() - 1
            ),
        )
        .into());
    }
    Ok(RunData {
        train: Loader::new(
            train,
            train_tf,
            normalize.clone(),
            LoaderConfig::train(cfg.batch_size, seed),
        )?,
        test: Loader::new(
            test,
            test_tf,
            normalize,
            LoaderConfig::eval(cfg.eval_batch_size),
        )?,
        channels,
        image_size: size,
        classes,
    })
}
