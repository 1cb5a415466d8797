//! Data for DNAL: CIFAR-10/100 (official binary files or their archive), MNIST and
//! Fashion-MNIST IDX files, the bundled real MNIST sample, ImageNet-style image folders;
//! seeded augmentation (CIFAR pad-crop-flip, ImageNet RandomResizedCrop and centre crop);
//! a deterministic parallel loader; burn `Dataset`/`Batcher` implementations; and downloads
//! with checksums.
//!
//! ```no_run
//! use std::sync::Arc;
//! use dnal_data::{Loader, LoaderConfig, Normalize, Split, Transform, bundled_mnist};
//!
//! let train = bundled_mnist(Split::Train)?; // 4,000 real digits, sha256-checked
//! let loader = Loader::new(
//!     Arc::new(train),
//!     Transform::Identity,
//!     Normalize::mnist(),
//!     LoaderConfig::train(64, 42),
//! )?;
//! for batch in loader.epoch(0) {
//!     let batch = batch?; // HostBatch: [64, 1, 28, 28] f32 + labels
//!     let _on_device = batch.to_device(&Default::default());
//! }
//! # Ok::<(), dnal_data::DataError>(())
//! ```

pub mod augment;
pub mod cifar;
pub mod download;
pub mod error;
pub mod folder;
pub mod image;
pub mod loader;
pub mod mnist;

pub use augment::{Normalize, Transform, example_rng};
pub use cifar::{CifarKind, load_cifar, load_cifar_sized};
pub use download::{Archive, download};
pub use error::{DataError, Result};
pub use folder::ImageFolder;
pub use image::{Example, Image, ImageSet, Source};
pub use loader::{AugmentedDataset, Batch, Batches, HostBatch, ImageBatcher, Loader, LoaderConfig};
pub use mnist::{IdxKind, bundled_mnist, bundled_mnist_from, datasets_dir, load_idx};

/// Training or test part of a data set (`val` for image folders).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// The training set.
    Train,
    /// The test (validation) set.
    Test,
}
