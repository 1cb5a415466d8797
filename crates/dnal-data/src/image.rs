//! Images held in memory and data sets made of them.

use std::path::Path;

use burn::data::dataset::{Dataset, DatasetError};

use crate::error::{DataError, Result};

/// One 8-bit image, stored row-major with interleaved channels (`[H, W, C]`, the layout of the
/// `image` crate), `C` = 1 (grey) or 3 (RGB).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// Channels per pixel (1 or 3).
    pub channels: usize,
    /// `height * width * channels` bytes.
    pub pixels: Vec<u8>,
}

impl Image {
    /// An image from its parts; the buffer length must match.
    pub fn new(height: usize, width: usize, channels: usize, pixels: Vec<u8>) -> Self {
        debug_assert_eq!(pixels.len(), height * width * channels);
        Self {
            height,
            width,
            channels,
            pixels,
        }
    }

    /// An image from a planar (`[C, H, W]`) buffer, the layout of the CIFAR files.
    pub fn from_planar(channels: usize, height: usize, width: usize, planar: &[u8]) -> Self {
        let plane = height * width;
        let mut pixels = vec![0u8; plane * channels];
        for c in 0..channels {
            for (p, &v) in planar[c * plane..(c + 1) * plane].iter().enumerate() {
                pixels[p * channels + c] = v;
            }
        }
        Self::new(height, width, channels, pixels)
    }

    /// The pixel value at row `y`, column `x`, channel `c`.
    pub fn at(&self, y: usize, x: usize, c: usize) -> u8 {
        self.pixels[(y * self.width + x) * self.channels + c]
    }
}

/// One labelled example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// The image.
    pub image: Image,
    /// The class index.
    pub label: usize,
}

/// A labelled image data set with images of one size, held in memory (CIFAR, MNIST).
#[derive(Clone, Debug)]
pub struct ImageSet {
    height: usize,
    width: usize,
    channels: usize,
    pixels: Vec<u8>,
    labels: Vec<u16>,
    classes: Vec<String>,
}

impl ImageSet {
    /// A data set from interleaved pixels (`[N, H, W, C]`), labels and class names. Fails if the
    /// sizes disagree or a label is not below the number of classes.
    pub fn new(
        [height, width, channels]: [usize; 3],
        pixels: Vec<u8>,
        labels: Vec<u16>,
        classes: Vec<String>,
    ) -> Result<Self> {
        let per = height * width * channels;
        if per == 0 || pixels.len() != per * labels.len() {
            return Err(DataError::invalid(
                "pixels",
                format!(
                    "{} bytes for {} images of {height}x{width}x{channels}",
                    pixels.len(),
                    labels.len()
                ),
            ));
        }
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= classes.len()) {
            return Err(DataError::invalid(
                "labels",
                format!("label {bad} with only {} classes", classes.len()),
            ));
        }
        Ok(Self {
            height,
            width,
            channels,
            pixels,
            labels,
            classes,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the set has no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// `[height, width, channels]` of every image.
    pub fn shape(&self) -> [usize; 3] {
        [self.height, self.width, self.channels]
    }

    /// Class names, indexed by label.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// All labels in order.
    pub fn labels(&self) -> impl ExactSizeIterator<Item = usize> + '_ {
        self.labels.iter().map(|&l| l as usize)
    }

    /// Example `index` (panics if out of range, like slice indexing).
    pub fn example(&self, index: usize) -> Example {
        let per = self.height * self.width * self.channels;
        Example {
            image: Image::new(
                self.height,
                self.width,
                self.channels,
                self.pixels[index * per..(index + 1) * per].to_vec(),
            ),
            label: self.labels[index] as usize,
        }
    }

    /// The examples at `indices`, in that order, as a new set.
    pub fn subset(&self, indices: &[usize]) -> Self {
        let per = self.height * self.width * self.channels;
        let mut pixels = Vec::with_capacity(per * indices.len());
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            pixels.extend_from_slice(&self.pixels[i * per..(i + 1) * per]);
            labels.push(self.labels[i]);
        }
        Self {
            pixels,
            labels,
            classes: self.classes.clone(),
            ..*self
        }
    }

    /// The first `per_class` examples of every class, in file order (a class-balanced subset).
    pub fn balanced_head(&self, per_class: usize) -> Self {
        let mut taken = vec![0usize; self.classes.len()];
        let indices: Vec<usize> = (0..self.len())
            .filter(|&i| {
                let l = self.labels[i] as usize;
                taken[l] += 1;
                taken[l] <= per_class
            })
            .collect();
        self.subset(&indices)
    }

    /// Images per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }
}

impl Dataset<Example> for ImageSet {
    fn get(&self, index: usize) -> Result<Example, DatasetError> {
        if index >= self.len() {
            return Err(DatasetError::new(DataError::invalid(
                "index",
                format!("{index} is past the end of a data set of {}", self.len()),
            )));
        }
        Ok(self.example(index))
    }

    fn len(&self) -> usize {
        self.labels.len()
    }
}

/// Where a data set's examples come from: an [`ImageSet`] in memory, or an image folder decoded
/// on demand. The loader reads examples through this trait, in parallel.
pub trait Source: Send + Sync {
    /// Number of examples.
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Example `index`, decoded.
    fn example(&self, index: usize) -> Result<Example>;
    /// Class names, indexed by label.
    fn classes(&self) -> &[String];
    /// Channels per image.
    fn channels(&self) -> usize;
}

impl Source for ImageSet {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn example(&self, index: usize) -> Result<Example> {
        Ok(ImageSet::example(self, index))
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn channels(&self) -> usize {
        self.channels
    }
}

/// Numeric class names `"0"`, `"1"`, ... for a data set without a names file.
pub fn numbered_classes(n: usize) -> Vec<String> {
    (0..n).map(|i| i.to_string()).collect()
}

/// Reads a whole file, or names it in the error.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    if !path.exists() {
        return Err(DataError::Missing {
            path: path.to_path_buf(),
            hint: "no such file".into(),
        });
    }
    if path.is_dir() {
        return Err(DataError::format(path, "a folder where a file is expected"));
    }
    std::fs::read(path).map_err(DataError::io(path))
}

/// Inflates a gzip buffer, or names the file in the error.
pub(crate) fn gunzip(path: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| DataError::format(path, format!("corrupt gzip data: {e}")))?;
    Ok(out)
}

/// Whether a buffer starts with the gzip magic bytes.
pub(crate) fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}
