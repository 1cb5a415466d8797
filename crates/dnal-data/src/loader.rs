//! Batches for training and evaluation: a deterministic, parallel, prefetching loader, and
//! burn `Dataset`/`Batcher` implementations for use with burn's own `DataLoaderBuilder`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset, DatasetError};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rayon::prelude::*;

use crate::augment::{Normalize, Transform, example_rng, mix};
use crate::error::{DataError, Result};
use crate::image::{Example, Source};

/// A batch on a device: `[N, C, H, W]` normalised images and `[N]` labels.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Images.
    pub images: Tensor<4>,
    /// Class indices.
    pub labels: Tensor<1, Int>,
}

/// A batch in host memory, ready to be sent to a device.
#[derive(Clone, Debug, PartialEq)]
pub struct HostBatch {
    /// `N * C * H * W` normalised values, planar per image.
    pub images: Vec<f32>,
    /// `[N, C, H, W]`.
    pub shape: [usize; 4],
    /// Class indices.
    pub labels: Vec<i64>,
}

impl HostBatch {
    /// Builds a host batch from transformed images (all of one size).
    pub fn from_examples(examples: &[Example], normalize: &Normalize) -> Result<Self> {
        let first = &examples
            .first()
            .ok_or_else(|| DataError::invalid("batch", "no examples"))?
            .image;
        let (c, h, w) = (first.channels, first.height, first.width);
        if normalize.mean.len() != c || normalize.std.len() != c {
            return Err(DataError::invalid(
                "normalize",
                format!(
                    "{} means and {} deviations for {c}-channel images",
                    normalize.mean.len(),
                    normalize.std.len()
                ),
            ));
        }
        if let Some(odd) = examples
            .iter()
            .find(|e| (e.image.channels, e.image.height, e.image.width) != (c, h, w))
        {
            return Err(DataError::invalid(
                "transform",
                format!(
                    "images of different sizes in one batch ({h}x{w}x{c} and {}x{}x{}); use a resizing transform",
                    odd.image.height, odd.image.width, odd.image.channels
                ),
            ));
        }
        let per = c * h * w;
        let mut images = vec![0f32; per * examples.len()];
        images
            .par_chunks_mut(per)
            .zip(examples.par_iter())
            .for_each(|(out, e)| normalize.write_planar(&e.image, out));
        Ok(Self {
            images,
            shape: [examples.len(), c, h, w],
            labels: examples.iter().map(|e| e.label as i64).collect(),
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The batch cut into `parts` consecutive shares, in order, whose sizes differ by at most
    /// one (the first `len % parts` shares have one image more); with fewer images than parts,
    /// the last shares are empty.
    pub fn split(&self, parts: usize) -> Vec<HostBatch> {
        let parts = parts.max(1);
        let [n, c, h, w] = self.shape;
        let per = c * h * w;
        let (base, extra) = (n / parts, n % parts);
        let mut start = 0;
        (0..parts)
            .map(|p| {
                let len = base + usize::from(p < extra);
                let range = start..start + len;
                start += len;
                HostBatch {
                    images: self.images[range.start * per..range.end * per].to_vec(),
                    shape: [len, c, h, w],
                    labels: self.labels[range].to_vec(),
                }
            })
            .collect()
    }

    /// Copies the batch to `device`, keeping it on the host too (which costs a copy of the
    /// images on the calling thread first: [`into_device`](Self::into_device) where the host
    /// batch is not needed after).
    pub fn to_device(&self, device: &Device) -> Batch {
        self.clone().into_device(device)
    }

    /// Sends the batch to `device`, handing its buffers to the backend without copying them on
    /// the host (an ImageNet batch of 64 is 38.5 MB of images).
    pub fn into_device(self, device: &Device) -> Batch {
        let n = self.labels.len();
        Batch {
            images: Tensor::from_data(TensorData::new(self.images, self.shape), device),
            labels: Tensor::from_data(TensorData::new(self.labels, [n]), device),
        }
    }
}

/// How a [`Loader`] walks a data set.
#[derive(Clone, Debug, PartialEq)]
pub struct LoaderConfig {
    /// Examples per batch.
    pub batch_size: usize,
    /// Shuffle the order every epoch (a permutation that depends only on seed and epoch).
    pub shuffle: bool,
    /// Drop the last, smaller batch.
    pub drop_last: bool,
    /// Seed of the order and of the augmentation.
    pub seed: u64,
    /// Batches prepared ahead on a background thread.
    pub prefetch: usize,
}

impl LoaderConfig {
    /// Training defaults: shuffled, last partial batch dropped, 2 batches prefetched.
    pub fn train(batch_size: usize, seed: u64) -> Self {
        Self {
            batch_size,
            shuffle: true,
            drop_last: true,
            seed,
            prefetch: 2,
        }
    }

    /// Evaluation defaults: file order, every example.
    pub fn eval(batch_size: usize) -> Self {
        Self {
            batch_size,
            shuffle: false,
            drop_last: false,
            seed: 0,
            prefetch: 2,
        }
    }
}

/// A deterministic data loader. Epoch `e` always yields the same batches for the same seed:
/// the order is a permutation drawn from (seed, e), and example `i` is augmented with a
/// generator drawn from (seed, e, i). Examples of a batch are decoded and augmented in
/// parallel (rayon); the next batches are prepared on a background thread while the current
/// one is used.
#[derive(Clone)]
pub struct Loader {
    source: Arc<dyn Source>,
    transform: Transform,
    normalize: Normalize,
    config: LoaderConfig,
}

impl Loader {
    /// A loader over `source`. Fails on a zero batch size, bad transform parameters, or an empty
    /// data set.
    pub fn new(
        source: Arc<dyn Source>,
        transform: Transform,
        normalize: Normalize,
        config: LoaderConfig,
    ) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(DataError::invalid("batch_size", "must be at least 1"));
        }
        transform.validate()?;
        if source.is_empty() {
            return Err(DataError::invalid("dataset", "holds no examples"));
        }
        if normalize.mean.len() != source.channels() {
            return Err(DataError::invalid(
                "normalize",
                format!(
                    "{} channel means for {}-channel images",
                    normalize.mean.len(),
                    source.channels()
                ),
            ));
        }
        Ok(Self {
            source,
            transform,
            normalize,
            config,
        })
    }

    /// The data set.
    pub fn source(&self) -> &Arc<dyn Source> {
        &self.source
    }

    /// Number of examples in the data set.
    pub fn num_examples(&self) -> usize {
        self.source.len()
    }

    /// Examples seen per epoch.
    pub fn examples_per_epoch(&self) -> usize {
        if self.config.drop_last {
            self.len() * self.config.batch_size
        } else {
            self.source.len()
        }
    }

    /// Batches per epoch.
    pub fn len(&self) -> usize {
        let (n, b) = (self.source.len(), self.config.batch_size);
        if self.config.drop_last {
            (n / b).max(1)
        } else {
            n.div_ceil(b)
        }
    }

    /// Whether an epoch yields no batch (never: a loader needs at least one example).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The example order of `epoch`.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.source.len()).collect();
        if self.config.shuffle {
            let mut rng = example_rng(mix(self.config.seed) ^ 0x5eed, epoch, u64::MAX);
            order.shuffle(&mut rng);
        }
        order
    }

    /// Loads the examples at `indices` of the data set, augmented for `epoch`.
    pub fn load(&self, epoch: u64, indices: &[usize]) -> Result<HostBatch> {
        let examples = indices
            .par_iter()
            .map(|&i| {
                let mut e = self.source.example(i)?;
                let mut rng = example_rng(self.config.seed, epoch, i as u64);
                e.image = self.transform.apply(e.image, &mut rng);
                Ok(e)
            })
            .collect::<Result<Vec<_>>>()?;
        HostBatch::from_examples(&examples, &self.normalize)
    }

    /// The batches of `epoch`, prepared in the background.
    pub fn epoch(&self, epoch: u64) -> Batches {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `first` on (the same batches [`Loader::epoch`] yields
    /// after its first `first`), prepared in the background: an epoch resumed part-way.
    pub fn epoch_from(&self, epoch: u64, first: usize) -> Batches {
        let order = self.order(epoch);
        let b = self.config.batch_size;
        let mut chunks: Vec<Vec<usize>> = order.chunks(b).map(<[usize]>::to_vec).collect();
        if self.config.drop_last && chunks.len() > 1 && chunks.last().is_some_and(|c| c.len() < b) {
            chunks.pop();
        }
        chunks.drain(..first.min(chunks.len()));
        let (tx, rx) = sync_channel(self.config.prefetch.max(1));
        let loader = self.clone();
        std::thread::spawn(move || {
            for chunk in chunks {
                if tx.send(loader.load(epoch, &chunk)).is_err() {
                    return;
                }
            }
        });
        Batches { rx }
    }
}

/// The batches of one epoch, in order; see [`Loader::epoch`].
pub struct Batches {
    rx: Receiver<Result<HostBatch>>,
}

impl Iterator for Batches {
    type Item = Result<HostBatch>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

/// A burn [`Dataset`] that applies a transform to a [`Source`], seeded per (seed, epoch,
/// index) so that burn's multi-worker `DataLoader` gives the same images as one worker. Call
/// [`AugmentedDataset::set_epoch`] before each epoch.
pub struct AugmentedDataset<S> {
    source: S,
    transform: Transform,
    seed: u64,
    epoch: AtomicU64,
    size: [usize; 2],
}

impl<S: Source> AugmentedDataset<S> {
    /// Wraps `source`. Every example must come out of the transform at the size the first one
    /// does; one that does not is reported as an error by [`Dataset::get`].
    pub fn new(source: S, transform: Transform, seed: u64) -> Result<Self> {
        transform.validate()?;
        if source.is_empty() {
            return Err(DataError::invalid("dataset", "holds no examples"));
        }
        let first = source.example(0)?.image;
        let size = transform.output_size(first.height, first.width);
        Ok(Self {
            source,
            transform,
            seed,
            epoch: AtomicU64::new(0),
            size,
        })
    }

    /// Sets the epoch the next examples are drawn for.
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Relaxed);
    }
}

impl<S: Source> Dataset<Example> for AugmentedDataset<S> {
    fn get(&self, index: usize) -> Result<Example, DatasetError> {
        if index >= self.source.len() {
            return Err(DatasetError::new(DataError::invalid(
                "index",
                format!(
                    "{index} is past the end of a data set of {}",
                    self.source.len()
                ),
            )));
        }
        let mut e = self.source.example(index).map_err(DatasetError::new)?;
        let mut rng = example_rng(self.seed, self.epoch.load(Ordering::Relaxed), index as u64);
        e.image = self.transform.apply(e.image, &mut rng);
        if [e.image.height, e.image.width] != self.size {
            return Err(DatasetError::new(DataError::invalid(
                "transform",
                format!(
                    "example {index} is {}x{} after the transform, the others {}x{}; use a resizing transform",
                    e.image.height, e.image.width, self.size[0], self.size[1]
                ),
            )));
        }
        Ok(e)
    }
    fn len(&self) -> usize {
        self.source.len()
    }
}

/// A burn [`Batcher`] from examples (already transformed, all of one size) to a [`Batch`].
#[derive(Clone, Debug)]
pub struct ImageBatcher {
    normalize: Normalize,
}

impl ImageBatcher {
    /// A batcher with this normalisation.
    pub fn new(normalize: Normalize) -> Self {
        Self { normalize }
    }
}

impl Batcher<Example, Batch> for ImageBatcher {
    /// Batches examples of one size and channel count. burn's trait cannot return an error;
    /// [`AugmentedDataset`] guarantees the sizes (it rejects an example of another size with an
    /// error the data loader reports), so a mixed batch here is a programming error.
    fn batch(&self, items: Vec<Example>, device: &Device) -> Batch {
        HostBatch::from_examples(&items, &self.normalize)
            .unwrap_or_else(|e| panic!("ImageBatcher: {e}"))
            .into_device(device)
    }
}
