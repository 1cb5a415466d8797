//! A depthwise convolution (one `k x k` filter per channel, no bias) on `f32` slices in NCHW
//! order, plane by plane: the inference forward with BatchNorm's affine transform and the
//! activation fused ([`depthwise_forward_affine`]), the input gradient and the weight gradient.
//!
//! With stride 1 and an output as large as the input (MobileNetV2's 3x3 with padding 1) the
//! forward reads each input plane directly (AVX-512 or AVX2): a vector of 16 consecutive output
//! positions (flattened, so that on small maps it spans several rows) sums each tap's input
//! shifted by the tap's flattened offset, with the lanes whose input falls outside the plane
//! masked off, as dnal's direct convolution does. AVX2 has no mask registers, and choosing per
//! 8 lanes between a skip, a plain and a masked load cost more than the copy below on maps of
//! 16x16 and wider; on maps whose rows are whole 8-lane vectors it goes row by row instead,
//! where only a row's first and last vectors need a mask. Otherwise it copies each input plane,
//! zero-padded, into a scratch buffer split into the stride's phases (for stride 2: even and
//! odd rows and columns, split by shuffles), so that every filter tap reads a
//! contiguous run, and computes the outputs as one flat run over the padded row pitch
//! (`avx512.rs`, `avx2.rs`); the columns past each output row's end are computed and dropped.
//!
//! With AVX-512 or AVX2 the backward passes keep their sums in registers as well. At stride 1
//! with a same-size output the input gradient is the forward's convolution of the output
//! gradient with each filter turned by 180 degrees; the weight gradient reads the planes as
//! the forward does, each output-gradient vector times every tap's masked input, one sum per
//! tap (AVX-512, 3x3 and 5x5 filters), or on rows of whole 8-lane vectors sums a filter row's
//! taps together, one output-gradient load serving them all (AVX2). Elsewhere both go through
//! the phase planes: a
//! weight-gradient tap is a dot product of the output gradient, laid out on the planes' pitch,
//! with the run of the planes the forward reads for it, and the input gradient is the flat
//! forward transposed (each phase plane of the gradient a stride-1 correlation of the output
//! gradient with that phase's taps), interleaved back into rows. In plain code they are row
//! operations: an input-gradient row gains `w * (output-gradient row)` for each filter tap, and
//! a weight-gradient tap is a sum of row dot products, so the inner loops run over contiguous
//! slices (with stride 1) and vectorize.
//! Each value is summed in one fixed order (for the weight gradient, images in order), whatever
//! the number of threads.

use rayon::prelude::*;
use std::cell::RefCell;

use crate::cpu::Clamp;
use crate::planes::par_planes_zeroed;
#[cfg(target_arch = "x86_64")]
use crate::simd::Isa;
use crate::simd::widest_simd;

/// The shape of a depthwise convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DepthwiseGeometry {
    /// Channels (filters).
    pub channels: usize,
    /// Input `[H, W]`.
    pub in_hw: [usize; 2],
    /// Filter side `k`.
    pub kernel: usize,
    /// Stride on both axes.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl DepthwiseGeometry {
    /// Output `[OH, OW]`.
    pub fn out_hw(&self) -> [usize; 2] {
        self.in_hw
            .map(|n| (n + 2 * self.padding).saturating_sub(self.kernel) / self.stride + 1)
    }

    fn in_plane(&self) -> usize {
        self.in_hw[0] * self.in_hw[1]
    }

    fn out_plane(&self) -> usize {
        let [oh, ow] = self.out_hw();
        oh * ow
    }

    /// The outputs `lo..hi` along an axis whose input index `o * stride + tap - padding` lies in
    /// `0..input`.
    fn valid(&self, tap: usize, input: usize, output: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        let lo = p.saturating_sub(tap).div_ceil(s);
        let hi = (input + p).saturating_sub(tap).div_ceil(s).min(output);
        (lo, hi.max(lo))
    }

    /// For each column tap `kx`: the output columns `lo..hi` it reaches and the input column of
    /// output `lo` (computed once per convolution, not per row).
    fn column_taps(&self) -> Vec<Tap> {
        let [_, w] = self.in_hw;
        let [_, ow] = self.out_hw();
        (0..self.kernel)
            .map(|kx| {
                let (lo, hi) = self.valid(kx, w, ow);
                Tap {
                    lo,
                    hi,
                    first: (lo * self.stride + kx).saturating_sub(self.padding),
                }
            })
            .collect()
    }
}

#[cfg(target_arch = "x86_64")]
impl DepthwiseGeometry {
    /// The direct kernels' tap masks of one plane at stride 1 (shared per process), with which
    /// the "same" kernels read a plane straight, the lanes outside it masked off.
    fn plane_taps(&self) -> std::sync::Arc<crate::direct::Taps> {
        crate::direct::Taps::shared(&crate::cpu::ConvGeometry {
            in_channels: 1,
            out_channels: 1,
            in_hw: self.in_hw,
            kernel: self.kernel,
            stride: 1,
            padding: self.padding,
        })
    }
}

/// Where one column tap of the filter applies along a row.
#[derive(Clone, Copy, Debug)]
struct Tap {
    /// First output column it reaches.
    lo: usize,
    /// One past the last.
    hi: usize,
    /// The input column read for output `lo`.
    first: usize,
}

/// Outputs computed side by side in the forward's inner loop (one AVX-512 register).
const RUN: usize = 16;

/// Where the forward reads: the scratch layout of one padded input plane split into the
/// stride's phases, and each filter tap's offset into it.
#[derive(Clone, Debug)]
struct PhasePlanes {
    /// Row pitch of every phase plane (columns of the padded plane per phase, rounded up).
    pitch: usize,
    /// Values per phase plane (rows times pitch, with room for a last run read past the end).
    len: usize,
    /// For each tap `ky * k + kx`: its phase plane's start plus `(ky / s) * pitch + kx / s`.
    taps: Vec<usize>,
    /// Outputs computed per plane: `OH * pitch`, rounded up to a whole run.
    flat: usize,
}

impl DepthwiseGeometry {
    fn phase_planes(&self) -> PhasePlanes {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let [h, w] = self.in_hw;
        let [oh, _] = self.out_hw();
        let pitch = (w + 2 * p).div_ceil(s);
        let rows = (h + 2 * p).div_ceil(s).max(oh + (k - 1) / s);
        let flat = (oh * pitch).div_ceil(RUN) * RUN;
        // Every read stays inside its phase plane: the last run starts below `flat` and a
        // tap adds at most `(k - 1) / s` rows and columns.
        let len = (rows * pitch).max(flat + ((k - 1) / s) * (pitch + 1));
        let taps = (0..k * k)
            .map(|t| {
                let (ky, kx) = (t / k, t % k);
                ((ky % s) * s + kx % s) * len + (ky / s) * pitch + kx / s
            })
            .collect();
        PhasePlanes {
            pitch,
            len,
            taps,
            flat,
        }
    }
}

/// The forward's per-thread scratch: the phase planes, then the flat outputs, and the geometry
/// the phase planes were laid out for. Every plane of one geometry writes the same positions
/// (the input's), so the padding stays zero from one plane to the next and the buffer is
/// zeroed only when the geometry changes.
#[derive(Default)]
struct Scratch {
    values: Vec<f32>,
    geometry: Option<DepthwiseGeometry>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    /// [`input_grad_phases`]' scratch: the output gradient on the planes' pitch, then the
    /// input gradient's phase planes.
    static GRAD_SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// `clamp(conv(x, w) * scale + shift)` per channel, in inference: `x` `[N, C, H, W]`, `w`
/// `[C, k, k]`, `scale` and `shift` `[C]`, result `[N, C, OH, OW]`. Planes in parallel; each
/// output sums its taps row by row, whatever the number of threads.
pub fn depthwise_forward_affine(
    x: &[f32],
    w: &[f32],
    scale: &[f32],
    shift: &[f32],
    clamp: Clamp,
    g: &DepthwiseGeometry,
) -> Vec<f32> {
    let (ip, op, kk) = (g.in_plane(), g.out_plane(), g.kernel * g.kernel);
    let planes = x.len() / ip.max(1);
    #[cfg(target_arch = "x86_64")]
    if let Some(isa) =
        crate::simd::isa().filter(|_| g.stride == 1 && g.out_hw() == g.in_hw && ip > 0)
    {
        // Stride 1, output as large as the input: every tap reads the plane itself, shifted,
        // with the lanes outside it masked off, so there is nothing to copy first.
        let taps = g.plane_taps();
        return par_planes_zeroed(planes * op, op, |i, out| {
            let c = i % g.channels;
            let (x, w, affine) = (
                &x[i * ip..(i + 1) * ip],
                &w[c * kk..(c + 1) * kk],
                (scale[c], shift[c]),
            );
            // SAFETY: the CPU runs `isa` (`isa()`); `taps` are those of the plane's geometry.
            #[allow(unsafe_code)]
            unsafe {
                match isa {
                    Isa::Avx512 => avx512::forward_same(x, w, affine, clamp, &taps, out),
                    Isa::Avx2 if avx2::takes_rows(g.in_hw, g.kernel) => {
                        let plane = avx2::RowPlane {
                            x,
                            w,
                            affine,
                            clamp,
                            hw: g.in_hw,
                            kernel: g.kernel,
                        };
                        avx2::forward_rows(&plane, out)
                    }
                    Isa::Avx2 => avx2::forward_same(x, w, affine, clamp, &taps, out),
                }
            };
        });
    }
    let layout = g.phase_planes();
    let phases = g.stride * g.stride;
    par_planes_zeroed(planes * op, op, |i, out| {
        let c = i % g.channels;
        let (x, w) = (&x[i * ip..(i + 1) * ip], &w[c * kk..(c + 1) * kk]);
        SCRATCH.with_borrow_mut(|scratch| {
            // The channel count does not change the layout of one plane.
            let same = DepthwiseGeometry { channels: 0, ..*g };
            if scratch.geometry != Some(same) {
                scratch.values.clear();
                scratch
                    .values
                    .resize(phases * layout.len + layout.flat, 0.0);
                scratch.geometry = Some(same);
            }
            let (planes, flat) = scratch.values.split_at_mut(phases * layout.len);
            fill_phases(x, g, &layout, planes);
            forward_flat_widest(planes, w, (scale[c], shift[c]), clamp, &layout, flat);
            let [oh, ow] = g.out_hw();
            for oy in 0..oh {
                out[oy * ow..(oy + 1) * ow]
                    .copy_from_slice(&flat[oy * layout.pitch..oy * layout.pitch + ow]);
            }
        });
    })
}

/// Where the rows of a stride-2 plane go in its phase planes: row `iy`'s even inputs
/// (`ix = 2j`) to phase column `p % 2` from column `p / 2`, its odd ones to phase column
/// `(p + 1) % 2` from column `(p + 1) / 2`, in phase row `(iy + p) % 2` at row `(iy + p) / 2`.
#[cfg(target_arch = "x86_64")]
struct Stride2Rows {
    hw: [usize; 2],
    padding: usize,
    /// Values from one phase plane to the next.
    len: usize,
    /// Values from one row of a phase plane to the next.
    pitch: usize,
}

#[cfg(target_arch = "x86_64")]
impl Stride2Rows {
    /// The rows of `g`'s plane (stride 2, at least two columns) in phase planes `len` values
    /// apart with rows `pitch` apart; panics unless every row's two runs lie inside `planes`
    /// values.
    fn new(g: &DepthwiseGeometry, [len, pitch]: [usize; 2], planes: usize) -> Self {
        assert!(g.stride == 2 && g.in_hw[1] >= 2);
        let rows = Self {
            hw: g.in_hw,
            padding: g.padding,
            len,
            pitch,
        };
        // Later rows of one phase row lie further into their planes, so the plane's last two
        // rows reach furthest.
        let [h, w] = rows.hw;
        for iy in h.saturating_sub(2)..h {
            let [even, odd] = rows.starts(iy);
            assert!(
                even + w.div_ceil(2) <= planes && odd + w / 2 <= planes,
                "phase planes too short"
            );
        }
        rows
    }

    /// Where row `iy`'s even and odd inputs start.
    fn starts(&self, iy: usize) -> [usize; 2] {
        let (p, py) = (self.padding, iy + self.padding);
        let at = |b: usize, column: usize| {
            ((py % 2) * 2 + b) * self.len + (py / 2) * self.pitch + column
        };
        [at(p % 2, p / 2), at((p + 1) % 2, p.div_ceil(2))]
    }
}

/// Copies the input plane `x` into the (zeroed) phase planes: padded value `(y, x)` goes to
/// phase `(y % s, x % s)` at row `y / s`, column `x / s`.
fn fill_phases(x: &[f32], g: &DepthwiseGeometry, layout: &PhasePlanes, planes: &mut [f32]) {
    let ([h, w], s, p) = (g.in_hw, g.stride, g.padding);
    #[cfg(target_arch = "x86_64")]
    if crate::simd::isa().is_some() && s == 2 && w >= 2 {
        // AVX2 on AVX-512 CPUs too: an AVX-512 version (masked loads, two permutes and masked
        // stores per 32 inputs) took twice as long on 16-column rows.
        let rows = Stride2Rows::new(g, [layout.len, layout.pitch], planes.len());
        // SAFETY: the CPU has AVX2 (`isa()`; AVX-512 implies it); `rows` checked the runs
        // against `planes`.
        #[allow(unsafe_code)]
        unsafe {
            avx2::fill_stride2(x, &rows, planes)
        };
        return;
    }
    for iy in 0..h {
        let (py, row) = (iy + p, &x[iy * w..(iy + 1) * w]);
        if s == 1 {
            let start = py * layout.pitch + p;
            planes[start..start + w].copy_from_slice(row);
            continue;
        }
        // Phase column `b` holds the inputs `ix` with `(ix + p) % s == b`, from column
        // `(first + p) / s` on.
        for b in 0..s {
            let first = (b + s - p % s) % s;
            if first >= w {
                continue;
            }
            let start = ((py % s) * s + b) * layout.len + (py / s) * layout.pitch + (first + p) / s;
            for (d, &v) in planes[start..]
                .iter_mut()
                .zip(row[first..].iter().step_by(s))
            {
                *d = v;
            }
        }
    }
}

/// [`forward_flat`], in AVX-512 or AVX2 where the CPU has them. (Written with intrinsics: the
/// plain loop, compiled for AVX-512, stayed scalar.)
fn forward_flat_widest(
    planes: &[f32],
    w: &[f32],
    affine: (f32, f32),
    clamp: Clamp,
    layout: &PhasePlanes,
    flat: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    match crate::simd::isa() {
        // SAFETY: the CPU has AVX-512F (`isa()`).
        #[allow(unsafe_code)]
        Some(Isa::Avx512) => unsafe {
            return avx512::forward_flat(planes, w, affine, clamp, &layout.taps, flat);
        },
        // SAFETY: the CPU has AVX2 and FMA (`isa()`).
        #[allow(unsafe_code)]
        Some(Isa::Avx2) => unsafe {
            return avx2::forward_flat(planes, w, affine, clamp, &layout.taps, flat);
        },
        None => {}
    }
    forward_flat(planes, w, affine, clamp, layout, flat)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512;

/// Checks what the `forward_same` kernels read and write (one plane `x`, its output `out`,
/// the filter `w` and the taps of the plane's map) and returns how many of the plane's
/// vectors the kernels take four at a time.
#[cfg(target_arch = "x86_64")]
fn check_same(x: &[f32], w: &[f32], taps: &crate::direct::Taps, out: &[f32]) -> usize {
    let (l, k, vectors) = (x.len(), taps.taps, taps.lanes.len());
    assert!(out.len() == l && vectors == l.div_ceil(RUN) && w.len() == k);
    assert!(taps.offsets.len() == k && taps.masks.len() == vectors * k);
    vectors / 4 * 4
}

/// Checks what the flat forward kernels read and write: whole runs of flat outputs, and phase
/// planes long enough for every tap of every run (`max(taps) + flat.len() <= planes.len()`).
#[cfg(target_arch = "x86_64")]
fn check_flat(planes: &[f32], w: &[f32], taps: &[usize], flat: &[f32]) {
    let last_tap = taps.iter().copied().max().unwrap_or(0);
    assert!(
        flat.len().is_multiple_of(RUN)
            && last_tap + flat.len() <= planes.len()
            && w.len() == taps.len(),
        "phase planes too short for the flat outputs"
    );
}

/// The flat outputs `0..layout.flat` of one plane, run by run: every tap's contribution summed
/// in tap order, then the affine transform and the clamp.
#[inline(always)]
fn forward_flat(
    planes: &[f32],
    w: &[f32],
    (scale, shift): (f32, f32),
    clamp: Clamp,
    layout: &PhasePlanes,
    flat: &mut [f32],
) {
    for (r, dst) in flat.chunks_exact_mut(RUN).enumerate() {
        let o = r * RUN;
        let mut acc = [0.0f32; RUN];
        for (&tap, &wv) in layout.taps.iter().zip(w) {
            let src = &planes[tap + o..tap + o + RUN];
            for j in 0..RUN {
                acc[j] += wv * src[j];
            }
        }
        for j in 0..RUN {
            dst[j] = clamp.apply(acc[j] * scale + shift);
        }
    }
}

/// The input gradient: `dy` `[N, C, OH, OW]`, `w` `[C, k, k]`, result `[N, C, H, W]`.
pub fn depthwise_input_grad(dy: &[f32], w: &[f32], g: &DepthwiseGeometry) -> Vec<f32> {
    let (ip, op, kk) = (g.in_plane(), g.out_plane(), g.kernel * g.kernel);
    let planes = dy.len() / op.max(1);
    #[cfg(target_arch = "x86_64")]
    if crate::simd::isa().is_some() && g.stride == 1 && g.out_hw() == g.in_hw {
        // At stride 1 with a same-size output the input gradient is the same convolution of
        // the output gradient with each filter turned by 180 degrees (its taps reversed),
        // which the forward's kernels compute with the sums in registers; the row loop below
        // reads and writes the input-gradient row once per tap.
        let turned: Vec<f32> = w
            .chunks_exact(kk)
            .flat_map(|f| f.iter().rev().copied())
            .collect();
        let (ones, zeros) = (vec![1.0; g.channels], vec![0.0; g.channels]);
        return depthwise_forward_affine(dy, &turned, &ones, &zeros, Clamp::NONE, g);
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(isa) = crate::simd::isa().filter(|_| ip > 0 && kk <= MAX_TAPS) {
        return input_grad_phases(isa, dy, w, g);
    }
    let taps = g.column_taps();
    par_planes_zeroed(planes * ip, ip, |i, out| {
        let c = i % g.channels;
        let (dy, w) = (&dy[i * op..(i + 1) * op], &w[c * kk..(c + 1) * kk]);
        widest_simd!(input_grad_plane(dy, w, g, &taps, out));
    })
}

/// The input gradient through the forward's phase planes, transposed: phase plane `b` of the
/// padded input's gradient is a stride-1 correlation of the output gradient (on the planes'
/// row pitch, zero past each row's end and around it) with the taps that read phase `b`, which
/// the flat forward kernel computes with the sums in registers; then the phase planes are
/// interleaved back into the input's rows (the inverse of [`fill_phases`]).
/// Most taps [`input_grad_phases`] gives one phase plane (kernels up to 15 x 15, stride 1).
#[cfg(target_arch = "x86_64")]
const MAX_TAPS: usize = 225;

#[cfg(target_arch = "x86_64")]
fn input_grad_phases(isa: Isa, dy: &[f32], w: &[f32], g: &DepthwiseGeometry) -> Vec<f32> {
    let (ip, op, kk) = (g.in_plane(), g.out_plane(), g.kernel * g.kernel);
    let planes = dy.len() / op.max(1);
    let layout = g.phase_planes();
    let [_, ow] = g.out_hw();
    let phases = g.stride * g.stride;
    // Each tap's phase plane and offset in it; a read `margin` before a plane's start lands in
    // the zeros in front of the output gradient.
    let placed: Vec<(usize, usize)> = layout
        .taps
        .iter()
        .map(|&t| (t / layout.len, t % layout.len))
        .collect();
    let margin = placed.iter().map(|&(_, at)| at).max().unwrap_or(0);
    // For each phase, its taps (indices into the filter) and their reads into the output
    // gradient.
    let by_phase: Vec<(Vec<usize>, Vec<usize>)> = (0..phases)
        .map(|phase| {
            placed
                .iter()
                .enumerate()
                .filter(|(_, (p, _))| *p == phase)
                .map(|(t, &(_, at))| (t, margin - at))
                .unzip()
        })
        .collect();
    let run = layout.len.div_ceil(RUN) * RUN;
    let grad_len = margin + run.max(layout.flat);
    par_planes_zeroed(planes * ip, ip, |i, out| {
        let c = i % g.channels;
        let (dy, w) = (&dy[i * op..(i + 1) * op], &w[c * kk..(c + 1) * kk]);
        GRAD_SCRATCH.with_borrow_mut(|scratch| {
            let same = DepthwiseGeometry { channels: 0, ..*g };
            if scratch.geometry != Some(same) {
                scratch.values.clear();
                scratch.values.resize(grad_len + phases * run, 0.0);
                scratch.geometry = Some(same);
            }
            let (grad, gplanes) = scratch.values.split_at_mut(grad_len);
            for (oy, row) in dy.chunks_exact(ow).enumerate() {
                let at = margin + oy * layout.pitch;
                grad[at..at + ow].copy_from_slice(row);
            }
            let mut wp = [0.0f32; MAX_TAPS];
            for ((indices, taps), dst) in by_phase.iter().zip(gplanes.chunks_exact_mut(run)) {
                for (v, &t) in wp.iter_mut().zip(indices) {
                    *v = w[t];
                }
                let wp = &wp[..taps.len()];
                // SAFETY: the CPU runs `isa` (`isa()`); the kernels check the sizes.
                #[allow(unsafe_code)]
                unsafe {
                    match isa {
                        Isa::Avx512 => {
                            avx512::forward_flat(grad, wp, (1.0, 0.0), Clamp::NONE, taps, dst)
                        }
                        Isa::Avx2 => {
                            avx2::forward_flat(grad, wp, (1.0, 0.0), Clamp::NONE, taps, dst)
                        }
                    }
                };
            }
            gather_phases(gplanes, run, g, &layout, out);
        });
        // The next plane's rows land where these did; the zeros around them stay.
    })
}

/// Copies the padded input positions of the phase planes `planes` (each `run` values apart)
/// back into the plane `x`: the inverse of [`fill_phases`].
#[cfg(target_arch = "x86_64")]
fn gather_phases(
    planes: &[f32],
    run: usize,
    g: &DepthwiseGeometry,
    layout: &PhasePlanes,
    x: &mut [f32],
) {
    let ([h, w], s, p) = (g.in_hw, g.stride, g.padding);
    if s == 2 && w >= 2 {
        let rows = Stride2Rows::new(g, [run, layout.pitch], planes.len());
        // SAFETY: the caller runs AVX2 or AVX-512, which implies AVX2 (`isa()`); `rows` checked
        // the runs against `planes`.
        #[allow(unsafe_code)]
        unsafe {
            avx2::merge_stride2(planes, &rows, x)
        };
        return;
    }
    let at = |py: usize, b: usize, column: usize| {
        ((py % s) * s + b) * run + (py / s) * layout.pitch + column
    };
    for (iy, row) in x.chunks_exact_mut(w).enumerate().take(h) {
        let py = iy + p;
        if s == 1 {
            let start = at(py, 0, p);
            row.copy_from_slice(&planes[start..start + w]);
        } else {
            for (ix, v) in row.iter_mut().enumerate() {
                let px = ix + p;
                *v = planes[at(py, px % s, px / s)];
            }
        }
    }
}

#[inline(always)]
fn input_grad_plane(dy: &[f32], w: &[f32], g: &DepthwiseGeometry, taps: &[Tap], dx: &mut [f32]) {
    let ([h, wd], [oh, ow], k, s, p) = (g.in_hw, g.out_hw(), g.kernel, g.stride, g.padding);
    for oy in 0..oh {
        let grow = &dy[oy * ow..(oy + 1) * ow];
        for ky in 0..k {
            let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&iy| iy < h) else {
                continue;
            };
            let drow = &mut dx[iy * wd..(iy + 1) * wd];
            for (kx, &Tap { lo, hi, first }) in taps.iter().enumerate() {
                if lo == hi {
                    continue;
                }
                let wv = w[ky * k + kx];
                if s == 1 {
                    for (d, gv) in drow[first..].iter_mut().zip(&grow[lo..hi]) {
                        *d += wv * gv;
                    }
                } else {
                    for (d, gv) in drow[first..].iter_mut().step_by(s).zip(&grow[lo..hi]) {
                        *d += wv * gv;
                    }
                }
            }
        }
    }
}

/// Partial sums kept side by side in the weight gradient's dot products, so that they
/// vectorize; always added in the same order.
const LANES: usize = 16;

/// The weight gradient: `x` `[N, C, H, W]`, `dy` `[N, C, OH, OW]`, result `[C, k, k]`. Channels
/// in parallel; each sums its images in order.
pub fn depthwise_weight_grad(x: &[f32], dy: &[f32], g: &DepthwiseGeometry) -> Vec<f32> {
    let (ip, op, kk, c) = (g.in_plane(), g.out_plane(), g.kernel * g.kernel, g.channels);
    let n = x.len() / (ip * c).max(1);
    let mut dw = vec![0.0f32; c * kk];
    let taps = g.column_taps();
    #[cfg(target_arch = "x86_64")]
    if crate::simd::isa() == Some(Isa::Avx512)
        && g.stride == 1
        && g.out_hw() == g.in_hw
        && matches!(g.kernel, 3 | 5)
        && ip > 0
    {
        // Straight from the planes with the taps' masks, as the forward reads them, one sum per
        // tap in a register (25 of AVX-512's 32 for a 5x5 filter).
        let taps = g.plane_taps();
        dw.par_chunks_mut(kk).enumerate().for_each(|(ch, out)| {
            let (x, dy, planes) = (&x[ch * ip..], &dy[ch * ip..], (n, c * ip));
            // SAFETY: the CPU has AVX-512F (`isa()`); `taps` are those of the planes' map.
            #[allow(unsafe_code)]
            unsafe {
                if kk == 9 {
                    avx512::weight_grad_same::<9>(x, dy, planes, &taps, out)
                } else {
                    avx512::weight_grad_same::<25>(x, dy, planes, &taps, out)
                }
            };
        });
        return dw;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::isa().is_some()
        && g.stride == 1
        && g.out_hw() == g.in_hw
        && matches!(g.kernel, 3 | 5 | 7)
        && avx2::takes_rows(g.in_hw, g.kernel)
    {
        dw.par_chunks_mut(kk).enumerate().for_each(|(ch, out)| {
            for image in 0..n {
                let plane = image * c + ch;
                let (x, dy) = (
                    &x[plane * ip..(plane + 1) * ip],
                    &dy[plane * op..(plane + 1) * op],
                );
                // SAFETY: the CPU has AVX2 and FMA (`isa()`; AVX-512 implies them).
                #[allow(unsafe_code)]
                unsafe {
                    avx2::weight_grad_rows(x, dy, g.in_hw, g.kernel, out)
                };
            }
        });
        return dw;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::isa().is_some() {
        // Other maps and strides: each tap's sum is a dot product of the output gradient,
        // laid out on the phase planes' row pitch (zero past each row's end), with the run of
        // the input's phase planes the forward reads for that tap.
        let layout = g.phase_planes();
        let [oh, ow] = g.out_hw();
        dw.par_chunks_mut(kk).enumerate().for_each(|(ch, out)| {
            let mut planes = vec![0.0f32; g.stride * g.stride * layout.len];
            let mut grad = vec![0.0f32; layout.flat];
            let mut sums = vec![[0.0f32; avx2::TAP_SUMS]; kk];
            for image in 0..n {
                let plane = image * c + ch;
                fill_phases(&x[plane * ip..(plane + 1) * ip], g, &layout, &mut planes);
                for (oy, row) in dy[plane * op..(plane + 1) * op]
                    .chunks_exact(ow)
                    .enumerate()
                {
                    grad[oy * layout.pitch..oy * layout.pitch + ow].copy_from_slice(row);
                }
                debug_assert!(oh * layout.pitch <= layout.flat);
                // SAFETY: the CPU has AVX2 and FMA (`isa()`; AVX-512 implies them).
                #[allow(unsafe_code)]
                unsafe {
                    avx2::tap_dots(&planes, &grad, &layout.taps, &mut sums)
                };
            }
            for (o, lanes) in out.iter_mut().zip(&sums) {
                *o += lanes.iter().sum::<f32>();
            }
        });
        return dw;
    }
    dw.par_chunks_mut(kk).enumerate().for_each(|(ch, out)| {
        widest_simd!({
            for image in 0..n {
                let plane = image * c + ch;
                let x = &x[plane * ip..(plane + 1) * ip];
                let dy = &dy[plane * op..(plane + 1) * op];
                weight_grad_plane(x, dy, g, &taps, out);
            }
        })
    });
    dw
}

#[inline(always)]
fn weight_grad_plane(x: &[f32], dy: &[f32], g: &DepthwiseGeometry, taps: &[Tap], dw: &mut [f32]) {
    let ([h, wd], [oh, ow], k, s, p) = (g.in_hw, g.out_hw(), g.kernel, g.stride, g.padding);
    for ky in 0..k {
        for (kx, &Tap { lo, hi, first }) in taps.iter().enumerate() {
            if lo == hi {
                continue;
            }
            let mut lanes = [0.0f32; LANES];
            let mut tail = 0.0f32;
            for oy in 0..oh {
                let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&iy| iy < h) else {
                    continue;
                };
                let grow = &dy[oy * ow + lo..oy * ow + hi];
                let irow = &x[iy * wd + first..];
                if s == 1 {
                    let mut gs = grow.chunks_exact(LANES);
                    let mut is = irow.chunks_exact(LANES);
                    for (gc, ic) in (&mut gs).zip(&mut is) {
                        for l in 0..LANES {
                            lanes[l] += gc[l] * ic[l];
                        }
                    }
                    for (gv, iv) in gs
                        .remainder()
                        .iter()
                        .zip(&irow[grow.len() / LANES * LANES..])
                    {
                        tail += gv * iv;
                    }
                } else {
                    for (gv, iv) in grow.iter().zip(irow.iter().step_by(s)) {
                        tail += gv * iv;
                    }
                }
            }
            dw[ky * k + kx] += lanes.iter().sum::<f32>() + tail;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plane of `len` values from a fixed pseudo-random draw.
    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn the_vector_runs_and_the_plain_loop_agree() {
        for (kernel, stride, padding, hw) in
            [(3, 1, 1, [8, 8]), (3, 2, 1, [9, 7]), (5, 1, 2, [4, 4])]
        {
            let g = DepthwiseGeometry {
                channels: 1,
                in_hw: hw,
                kernel,
                stride,
                padding,
            };
            let layout = g.phase_planes();
            let phases = stride * stride;
            let mut planes = vec![0.0; phases * layout.len];
            fill_phases(&values(hw[0] * hw[1], 3), &g, &layout, &mut planes);
            let w = values(kernel * kernel, 5);
            let clamp = Clamp { lo: 0.0, hi: 6.0 };
            let mut plain = vec![0.0; layout.flat];
            let mut widest = vec![0.0; layout.flat];
            forward_flat(&planes, &w, (1.5, 0.25), clamp, &layout, &mut plain);
            forward_flat_widest(&planes, &w, (1.5, 0.25), clamp, &layout, &mut widest);
            for (a, b) in plain.iter().zip(&widest) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn a_nan_input_stays_nan_through_the_clamp() {
        let g = DepthwiseGeometry {
            channels: 1,
            in_hw: [4, 4],
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        let mut x = vec![0.5; 16];
        x[5] = f32::NAN;
        let y = depthwise_forward_affine(
            &x,
            &[1.0; 9],
            &[1.0],
            &[0.0],
            Clamp { lo: 0.0, hi: 6.0 },
            &g,
        );
        // Output (1, 1) and its neighbours read the NaN; the corners far from it do not.
        assert!(y[5].is_nan() && y[0].is_nan());
        assert_eq!(y[15], 4.0 * 0.5);
    }
}
