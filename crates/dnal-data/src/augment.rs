//! Augmentation and normalisation, deterministic for a given (seed, epoch, index).

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
                let mut out = crop_resize(&image, top, left, h, w, size, size);
                if rng.random_bool(0.5) {
                    flip_in_place(&mut out);
                }
                out
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

/// Mirrors the image left to right.
fn flip_in_place(image: &mut Image) {
    let (w, c) = (image.width, image.channels);
    for row in image.pixels.chunks_exact_mut(w * c) {
        for x in 0..w / 2 {
            let (left, right) = row.split_at_mut((w - 1 - x) * c);
            left[x * c..(x + 1) * c].swap_with_slice(&mut right[..c]);
        }
    }
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

/// Crops a window and resizes it with an antialiased bilinear filter (a triangle whose support
/// widens with the reduction: Pillow's `BILINEAR`, and so torchvision's on PIL images), with
/// `fast_image_resize`'s SIMD kernels.
fn crop_resize(
    image: &Image,
    top: usize,
    left: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
) -> Image {
    use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer, images};
    let c = image.channels;
    let cut = || {
        let mut window = Vec::with_capacity(h * w * c);
        for y in top..top + h {
            let start = (y * image.width + left) * c;
            window.extend_from_slice(&image.pixels[start..start + w * c]);
        }
        Image::new(h, w, c, window)
    };
    if h == out_h && w == out_w {
        return cut();
    }
    let pixel = match c {
        1 => PixelType::U8,
        2 => PixelType::U8x2,
        3 => PixelType::U8x3,
        4 => PixelType::U8x4,
        _ => {
            // More channels than a pixel type holds: one plane at a time.
            let window = cut();
            let planes: Vec<Image> = (0..c)
                .map(|k| {
                    let plane = window.pixels.iter().skip(k).step_by(c).copied().collect();
                    crop_resize(&Image::new(h, w, 1, plane), 0, 0, h, w, out_h, out_w)
                })
                .collect();
            let pixels = (0..out_h * out_w)
                .flat_map(|i| planes.iter().map(move |p| p.pixels[i]))
                .collect();
            return Image::new(out_h, out_w, c, pixels);
        }
    };
    let full = images::ImageRef::new(
        image.width as u32,
        image.height as u32,
        &image.pixels,
        pixel,
    )
    .expect("an image's buffer holds its pixels");
    // A view of the window, which the filter treats as the whole image, as torchvision's
    // `resized_crop` on a PIL image cuts before resizing (a crop box in the resize options
    // would blend in the pixels around the window at its edges).
    let window = images::CroppedImage::new(&full, left as u32, top as u32, w as u32, h as u32)
        .expect("a window inside the image");
    let mut dst = images::Image::new(out_w as u32, out_h as u32, pixel);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    thread_local! {
        // The resizer keeps its buffers between images.
        static RESIZER: std::cell::RefCell<Resizer> = std::cell::RefCell::new(Resizer::new());
    }
    RESIZER
        .with(|r| r.borrow_mut().resize(&window, &mut dst, &options))
        .expect("matching pixel types");
    Image::new(out_h, out_w, c, dst.into_vec())
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
        let affine = |ch: usize| {
            let scale = 1.0 / (255.0 * self.std[ch]);
            (scale, self.mean[ch] / self.std[ch])
        };
        if c == 3 {
            // One pass over the interleaved pixels, writing the three planes.
            let (r, rest) = out[..3 * plane].split_at_mut(plane);
            let (g, b) = rest.split_at_mut(plane);
            let [(sr, hr), (sg, hg), (sb, hb)] = [affine(0), affine(1), affine(2)];
            for ((px, (r, g)), b) in image
                .pixels
                .chunks_exact(3)
                .zip(r.iter_mut().zip(g.iter_mut()))
                .zip(b.iter_mut())
            {
                *r = px[0] as f32 * sr - hr;
                *g = px[1] as f32 * sg - hg;
                *b = px[2] as f32 * sb - hb;
            }
            return;
        }
        for ch in 0..c {
            let (scale, shift) = affine(ch);
            let dst = &mut out[ch * plane..(ch + 1) * plane];
            for (d, v) in dst.iter_mut().zip(image.pixels.iter().skip(ch).step_by(c)) {
                *d = *v as f32 * scale - shift;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A textured test image: a smooth ramp per channel plus a pseudo-random pattern.
    fn textured(h: usize, w: usize, c: usize) -> Image {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let pixels = (0..h * w * c)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let (p, k) = (i / c, i % c);
                // Below 256 for the sizes used: no wrap-around edges.
                let ramp = (p % w + p / w / 2 + 20 * k) as u64;
                (ramp + (s >> 58)).min(255) as u8
            })
            .collect();
        Image::new(h, w, c, pixels)
    }

    /// The `image` crate's triangle filter (the same antialiased bilinear) on the cut window.
    fn reference(img: &Image, top: usize, left: usize, h: usize, w: usize, out: usize) -> Vec<u8> {
        let c = img.channels;
        let mut window = Vec::new();
        for y in top..top + h {
            let start = (y * img.width + left) * c;
            window.extend_from_slice(&img.pixels[start..start + w * c]);
        }
        let filter = image::imageops::FilterType::Triangle;
        let (o, w, h) = (out as u32, w as u32, h as u32);
        match c {
            1 => image::imageops::resize(
                &image::GrayImage::from_raw(w, h, window).unwrap(),
                o,
                o,
                filter,
            )
            .into_raw(),
            _ => image::imageops::resize(
                &image::RgbImage::from_raw(w, h, window).unwrap(),
                o,
                o,
                filter,
            )
            .into_raw(),
        }
    }

    #[test]
    fn crop_resize_is_antialiased_bilinear() {
        for c in [1, 3] {
            let img = textured(120, 160, c);
            // Down by about 3.4 (antialiased), and up by about 1.6.
            for (top, left, h, w, out) in [(10, 20, 96, 110, 32), (50, 60, 20, 22, 35)] {
                let got = crop_resize(&img, top, left, h, w, out, out);
                assert_eq!((got.height, got.width, got.channels), (out, out, c));
                let want = reference(&img, top, left, h, w, out);
                let worst = got
                    .pixels
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| a.abs_diff(*b))
                    .max()
                    .unwrap();
                assert!(
                    worst <= 2,
                    "{c} channels, window {h}x{w} -> {out}: off by {worst}"
                );
            }
        }
    }

    #[test]
    fn flips_and_normalises() {
        let img = textured(3, 5, 3);
        let mut flipped = img.clone();
        flip_in_place(&mut flipped);
        for y in 0..3 {
            for x in 0..5 {
                let (a, b) = ((y * 5 + x) * 3, (y * 5 + 4 - x) * 3);
                assert_eq!(flipped.pixels[a..a + 3], img.pixels[b..b + 3]);
            }
        }
        let norm = Normalize::imagenet();
        let mut out = vec![0f32; 3 * 15];
        norm.write_planar(&img, &mut out);
        for p in 0..15 {
            for ch in 0..3 {
                let want = (img.pixels[p * 3 + ch] as f32 / 255.0 - norm.mean[ch]) / norm.std[ch];
                assert!((out[ch * 15 + p] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn many_channels_resize_plane_by_plane() {
        let img = textured(40, 50, 5);
        let got = crop_resize(&img, 3, 4, 30, 36, 16, 16);
        for k in [0, 4] {
            let plane = img.pixels.iter().skip(k).step_by(5).copied().collect();
            let plane = crop_resize(&Image::new(40, 50, 1, plane), 3, 4, 30, 36, 16, 16);
            let channel: Vec<u8> = got.pixels.iter().skip(k).step_by(5).copied().collect();
            assert_eq!(channel, plane.pixels);
        }
    }
}
