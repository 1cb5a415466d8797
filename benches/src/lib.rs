//! Shared helpers for dnal's criterion benchmarks (the benchmarks are in `benches/benches/`).

use burn::prelude::*;
use dnal_core::BackendKind;

/// Sets the process up as the trainer's `main` does (freed memory kept for reuse, subnormal
/// floats flushed to zero); every benchmark and example sets the trainer's allocator
/// (`dnal_kernels::global_allocator!()`) and calls this first.
pub fn set_up_as_the_trainer() {
    dnal_kernels::allocator::keep_freed_memory();
    dnal_kernels::subnormals::flush_subnormals();
}

/// The CPU backends compiled into this build, with their devices.
pub fn cpu_backends() -> Vec<(BackendKind, Device)> {
    [BackendKind::Flex, BackendKind::Ndarray]
        .into_iter()
        .filter_map(|b| b.device().ok().map(|d| (b, d)))
        .collect()
}

/// A training batch of CIFAR shapes: `batch` random images `[batch, 3, 32, 32]` and labels
/// cycling through 10 classes.
pub fn cifar_batch(batch: usize, device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
    let x = image_batch(batch, [3, 32, 32], device);
    let labels = (0..batch as i64).map(|i| i % 10).collect();
    let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [batch]), device);
    (x, y)
}

/// `batch` random images of shape `image` (`[channels, height, width]`).
pub fn image_batch(batch: usize, image: [usize; 3], device: &Device) -> Tensor<4> {
    let [c, h, w] = image;
    Tensor::<4>::random(
        [batch, c, h, w],
        burn::tensor::Distribution::Default,
        device,
    )
}

/// Gate states like a searched network's: every gate keeps a different fraction (15 to 60 %)
/// of its channels, at irregular widths, with alphas that rank the closed channels. A fixed
/// pseudo-random draw from `seed`. Derive them with `dnal_core::derive_from_states`, round
/// them with `Architecture::round_widths`.
pub fn searched_states<M: dnal_core::GatedModel>(
    model: &M,
    seed: u64,
) -> Vec<(String, dnal_core::GateState)> {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    model
        .gate_states()
        .into_iter()
        .map(|(name, mut state)| {
            let closed = 0.4 + 0.45 * next();
            state.alpha = state.alpha.iter().map(|_| next() - closed).collect();
            state.temperature = 1e4;
            (name, state)
        })
        .collect()
}

/// Writes `n` photo-like RGB JPEGs of ImageNet's typical size (500x375, quality 90) into `dir`
/// as `0.JPEG`, `1.JPEG`, ... and returns their paths. Each image is fractal value noise (octaves
/// of random lattices, amplitude halving with frequency, so its spectrum falls off like a
/// photograph's) in three correlated colour channels, with a few hard-edged shapes and
/// sensor-like noise; a fixed draw from `seed`. Such images encode to about 70 KB, like photos
/// (smooth gradients encode to far less and decode faster).
pub fn photo_jpegs(dir: &std::path::Path, n: usize, seed: u64) -> Vec<std::path::PathBuf> {
    let (w, h) = (500usize, 375usize);
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f32 / (1u64 << 53) as f32
    };
    (0..n)
        .map(|i| {
            let mut plane = vec![[0f32; 3]; w * h];
            let mut amp = 1.0f32;
            for cell in [96usize, 48, 24, 12, 6, 3, 2] {
                let (gw, gh) = (w / cell + 2, h / cell + 2);
                let lattice: Vec<[f32; 3]> = (0..gw * gh)
                    .map(|_| {
                        let v = next() - 0.5;
                        [v + 0.3 * (next() - 0.5), v, v + 0.3 * (next() - 0.5)]
                    })
                    .collect();
                for y in 0..h {
                    let (fy, ty) = (y / cell, (y % cell) as f32 / cell as f32);
                    for x in 0..w {
                        let (fx, tx) = (x / cell, (x % cell) as f32 / cell as f32);
                        let at = |gx: usize, gy: usize| lattice[gy * gw + gx];
                        let (a, b) = (at(fx, fy), at(fx + 1, fy));
                        let (c, d) = (at(fx, fy + 1), at(fx + 1, fy + 1));
                        for k in 0..3 {
                            let top = a[k] + (b[k] - a[k]) * tx;
                            let bottom = c[k] + (d[k] - c[k]) * tx;
                            plane[y * w + x][k] += amp * (top + (bottom - top) * ty);
                        }
                    }
                }
                amp *= 0.7;
            }
            for _ in 0..6 {
                let (cx, cy, r) = (next() * w as f32, next() * h as f32, 10.0 + next() * 60.0);
                let shade = [next() - 0.5, next() - 0.5, next() - 0.5];
                for y in 0..h {
                    for x in 0..w {
                        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                        if dx * dx + dy * dy < r * r {
                            for k in 0..3 {
                                plane[y * w + x][k] += shade[k];
                            }
                        }
                    }
                }
            }
            let mut pixels = Vec::with_capacity(w * h * 3);
            for p in &plane {
                for v in p {
                    let noise = (next() - 0.5) * 0.1;
                    pixels.push(((0.5 + 0.6 * (v + noise)) * 255.0).clamp(0.0, 255.0) as u8);
                }
            }
            let path = dir.join(format!("{i}.JPEG"));
            let file = std::fs::File::create(&path).expect("a writable folder");
            let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(
                std::io::BufWriter::new(file),
                90,
            );
            encoder
                .encode(&pixels, w as u32, h as u32, image::ExtendedColorType::Rgb8)
                .expect("an encodable image");
            path
        })
        .collect()
}
