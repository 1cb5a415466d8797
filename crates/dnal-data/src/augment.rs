//! Augmentation and normalisation, deterministic for a given (seed, epoch, index).

use image::imageops::FilterType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{DataError, Result};
use crate::image::Image;

/// The random generator for one example of one epoch: the same (seed, epoch, index) always
/// gives the same augmentation, whatever thread or worker reads it.
pub fn example_rng(seed: u64, epoch: u64, index: u64) -> StdRng {
    StdRng::seed_from_u64(mix(mix(mix(0x9e37_79b9_7f4a_7c15 ^ seed) ^ epoch) ^ index))
}

/// SplitMix64 finaliser: a well-spread 64-bit hash.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What is done to an image before it is batched.
#[derive(Clone, Debug, PartialEq)]
pub enum Transform {
    /// Nothing (images must all have the same size).
    Identity,
    /// Zero-pad by `pad` on every side, take a random window of the original size, and flip
    /// horizontally with probability 0.5 (the CIFAR training augmentation with `pad = 4`).
    PadCropFlip {
        /// Padding in pixels.
        pad: usize,
    },
    /// torchvision's RandomResizedCrop: a random window of `scale` of the area and an aspect ratio
    /// in [3/4, 4/3], resized (bilinear) to `size` x `size`, then a horizontal flip with p = 0.5.
    RandomResizedCrop {
        /// Output side.
        size: usize,
        /// Area fraction range (0.08-1 by default; 0.2-1 in the MobileNetV2 recipe).
        scale: (f64, f64),
    },
    /// Resize the shorter side to `resize`, then take the centre `crop` x `crop` (ImageNet test:
    /// 256 and 224).
    ResizeCenterCrop {
        /// Shorter side after resizing.
        resize: usize,
        /// Output side.
        crop: usize,
    },
}

impl Transform {
    /// CIFAR training augmentation: pad 4, random 32x32 crop, flip.
    pub fn cifar_train() -> Self {
        Self::PadCropFlip { pad: 4 }
    }

    /// ImageNet training augmentation with the given area range.
    pub fn imagenet_train(scale: (f64, f64)) -> Self {
        Self::RandomResizedCrop { size: 224, scale }
    }

    /// ImageNet evaluation: resize 256, centre crop 224.
    pub fn imagenet_test() -> Self {
        Self::ResizeCenterCrop {
            resize: 256,
            crop: 224,
        }
    }

    /// Checks the parameters.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Transform::RandomResizedCrop {
                size,
                scale: (lo, hi),
            } => {
                if size == 0 {
                    return Err(DataError::invalid("crop size", "must be positive"));
                }
                if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
                    return Err(DataError::invalid(
                        "scale",
                        format!("({lo}, {hi}) must satisfy 0 < min <= max <= 1"),
                    ));
                }
            }
            Transform::ResizeCenterCrop { resize, crop } if crop == 0 || crop > resize => {
                return Err(DataError::invalid(
                    "crop",
                    format!("{crop} must be positive and at most the resize {resize}"),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// The output `[height, width]` for an input of that size.
    pub fn output_size(&self, height: usize, width: usize) -> [usize; 2] {
        match *self {
            Transform::Identity | Transform::PadCropFlip { .. } => [height, width],
            Transform::RandomResizedCrop { size, .. } => [size, size],
            Transform::ResizeCenterCrop { crop, .. } => [crop, crop],
        }
    }

    /// Applies the transform with `rng`.
    pub fn apply(&self, image: Image, rng: &mut impl Rng) -> Image {
        match *self {
            Transform::Identity => image,
            Transform::PadCropFlip { pad } => pad_crop_flip(&image, pad, rng),
            Transform::RandomResizedCrop { size, scale } => {
                let (top, left, h, w) =
                    random_resized_window(image.height, image.width, scale, rng);
                let out = crop_resize(&image, top, left, h, w, size, size);
                if rng.random_bool(0.5) {
                    flip(&out)
                } else {
                    out
                }
            }
            Transform::ResizeCenterCrop { resize, crop } => {
                // Resizing the shorter side to `resize` scales by resize / short, so the centre
                // crop covers crop * short / resize source pixels: cut those, then resize once.
                let short = image.height.min(image.width);
                let side = ((crop * short) as f64 / resize as f64).round() as usize;
                let side = side.clamp(1, short);
                let top = (image.height - side) / 2;
                let left = (image.width - side) / 2;
                crop_resize(&image, top, left, side, side, crop, crop)
            }
        }
    }
}

fn pad_crop_flip(image: &Image, pad: usize, rng: &mut impl Rng) -> Image {
    let (h, w, c) = (image.height, image.width, image.channels);
    let dy = rng.random_range(0..=2 * pad) as isize - pad as isize;
    let dx = rng.random_range(0..=2 * pad) as isize - pad as isize;
    let flip = rng.random_bool(0.5);
    let mut out = vec![0u8; h * w * c];
    for y in 0..h {
        let sy = y as isize + dy;
        if sy < 0 || sy >= h as isize {
            continue;
        }
        for x in 0..w {
            let ox = if flip { w - 1 - x } else { x };
            let sx = x as isize + dx;
            if sx < 0 || sx >= w as isize {
                continue;
            }
            let src = (sy as usize * w + sx as usize) * c;
            let dst = (y * w + ox) * c;
            out[dst..dst + c].copy_from_slice(&image.pixels[src..src + c]);
        }
    }
    Image::new(h, w, c, out)
}

fn flip(image: &Image) -> Image {
    let (h, w, c) = (image.height, image.width, image.channels);
    let mut out = vec![0u8; h * w * c];
    for y in 0..h {
        for x in 0..w {
            let src = (y * w + x) * c;
            let dst = (y * w + w - 1 - x) * c;
            out[dst..dst + c].copy_from_slice(&image.pixels[src..src + c]);
        }
    }
    Image::new(h, w, c, out)
}

/// torchvision's window choice: up to 10 tries at a random area and aspect ratio, else the
/// centre crop with the aspect ratio clamped to [3/4, 4/3].
fn random_resized_window(
    height: usize,
    width: usize,
    (lo, hi): (f64, f64),
    rng: &mut impl Rng,
) -> (usize, usize, usize, usize) {
    let area = (height * width) as f64;
    let (lr_lo, lr_hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(lo..=hi);
        let ratio = rng.random_range(lr_lo..=lr_hi).exp();
        let w = (target * ratio).sqrt().round() as usize;
        let h = (target / ratio).sqrt().round() as usize;
        if w > 0 && h > 0 && w <= width && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return (top, left, h, w);
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (h, w) = if in_ratio < 3.0 / 4.0 {
        (((width as f64) / (3.0 / 4.0)).round() as usize, width)
    } else if in_ratio > 4.0 / 3.0 {
        (height, ((height as f64) * (4.0 / 3.0)).round() as usize)
    } else {
        (height, width)
    };
    let (h, w) = (h.clamp(1, height), w.clamp(1, width));
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// Crops a window and resizes it (bilinear) with the `image` crate.
fn crop_resize(
    image: &Image,
    top: usize,
    left: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
) -> Image {
    let c = image.channels;
    let mut window = Vec::with_capacity(h * w * c);
    for y in top..top + h {
        let start = (y * image.width + left) * c;
        window.extend_from_slice(&image.pixels[start..start + w * c]);
    }
    if h == out_h && w == out_w {
        return Image::new(h, w, c, window);
    }
    let (ow, oh) = (out_w as u32, out_h as u32);
    let pixels = if c == 3 {
        let buf = image::RgbImage::from_raw(w as u32, h as u32, window).expect("window size");
        image::imageops::resize(&buf, ow, oh, FilterType::Triangle).into_raw()
    } else {
        let buf = image::GrayImage::from_raw(w as u32, h as u32, window).expect("window size");
        image::imageops::resize(&buf, ow, oh, FilterType::Triangle).into_raw()
    };
    Image::new(out_h, out_w, c, pixels)
}

/// Per-channel normalisation `(x / 255 - mean) / std`, output planar (`[C, H, W]`) f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    /// Mean per channel, on the 0-1 scale.
    pub mean: Vec<f32>,
    /// Standard deviation per channel, on the 0-1 scale.
    pub std: Vec<f32>,
}

impl Normalize {
    /// CIFAR-10 statistics.
    pub fn cifar10() -> Self {
        Self {
            mean: vec![0.4914, 0.4822, 0.4465],
            std: vec![0.2470, 0.2435, 0.2616],
        }
    }

    /// CIFAR-100 statistics.
    pub fn cifar100() -> Self {
        Self {
            mean: vec![0.5071, 0.4865, 0.4409],
            std: vec![0.2673, 0.2564, 0.2762],
        }
    }

    /// ImageNet statistics.
    pub fn imagenet() -> Self {
        Self {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        }
    }

    /// MNIST statistics.
    pub fn mnist() -> Self {
        Self {
            mean: vec![0.1307],
            std: vec![0.3081],
        }
    }

    /// Writes `image` normalised and planar into `out` (`C * H * W` values).
    pub fn write_planar(&self, image: &Image, out: &mut [f32]) {
        let plane = image.height * image.width;
        let c = image.channels;
        for ch in 0..c {
            let scale = 1.0 / (255.0 * self.std[ch]);
            let shift = self.mean[ch] / self.std[ch];
            let dst = &mut out[ch * plane..(ch + 1) * plane];
            for (p, d) in dst.iter_mut().enumerate() {
                *d = image.pixels[p * c + ch] as f32 * scale - shift;
            }
        }
    }
}
