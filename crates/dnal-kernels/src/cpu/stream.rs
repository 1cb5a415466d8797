//! A residual stream's channel passes on `f32` slices in NCHW order: a unit's output added
//! into some of the stream's channels with the activation applied to the whole stream
//! ([`add_into_channels`]; in training from BatchNorm's input, [`normalize_into_channels`]),
//! and a stream's channels picked, moved or zero-filled, optionally
//! subsampled ([`select_channels`]: widening a stream into the next stage's, a shortcut).

use super::clamp::Clamp;
use crate::planes::{each_plane_mut, par_planes, par_planes_zeroed};
use crate::simd::widest_simd;

/// For each channel of a stream, the unit output channel added into it, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSources(Vec<Option<usize>>);

impl StreamSources {
    /// Output channel `r` goes to stream channel `channels[r]` of `width`; panics if a channel
    /// is outside the stream or named twice.
    pub fn new(channels: &[usize], width: usize) -> Self {
        let mut source = vec![None; width];
        for (r, &ch) in channels.iter().enumerate() {
            assert!(
                ch < width && source[ch].is_none(),
                "channels inside the stream, once each"
            );
            source[ch] = Some(r);
        }
        Self(source)
    }

    /// Stream channels.
    pub fn width(&self) -> usize {
        self.0.len()
    }

    /// Unit output channels (those added somewhere).
    pub fn outputs(&self) -> usize {
        self.0.iter().flatten().count()
    }
}

/// `stream = clamp(stream + y)` where `y` (`[N, k, L]`, `k = sources.outputs()`) goes into
/// the stream's channels as `sources` says, and the other channels are only clamped; `stream`
/// is `[N, C, L]` with `[C, L]` given. Plane by plane, in parallel above the planes' threshold.
pub fn add_into_channels(
    stream: &mut [f32],
    [c, l]: [usize; 2],
    y: &[f32],
    sources: &StreamSources,
    clamp: Clamp,
) {
    assert_eq!(sources.width(), c, "one source entry per stream channel");
    let k = sources.outputs();
    assert_eq!(
        y.len() * c,
        stream.len() * k,
        "one output channel per stream channel it is added into"
    );
    each_plane_mut(stream, l, |i, plane| {
        let (image, ch) = (i / c, i % c);
        match sources.0[ch].map(|r| &y[(image * k + r) * l..][..l]) {
            // The bounds are copied before each loop: read through the closure's captures in
            // the loop (the stores into the plane could alias them), the clamp compiled to a
            // gather.
            Some(a) => widest_simd!({
                let bounds = clamp;
                for (v, &a) in plane.iter_mut().zip(a) {
                    *v = bounds.apply(*v + a);
                }
            }),
            None => widest_simd!({
                let bounds = clamp;
                for v in plane.iter_mut() {
                    *v = bounds.apply(*v);
                }
            }),
        }
    });
}

/// `clamp(stream + scatter(x * scale + shift))` as a new tensor shaped like `stream`
/// (`[N, C, L]`, `[C, L]` given): BatchNorm's output of `x` (`[N, k, L]`, its affine transform
/// per channel of `x`) added into the stream's channels as `sources` says, every channel of
/// the sum then clamped. The values are those of the normalisation, the add and the clamp as
/// separate passes (`x * scale + shift` rounded first, then added), in one pass over the
/// stream.
pub fn normalize_into_channels(
    stream: &[f32],
    [c, l]: [usize; 2],
    x: &[f32],
    (scale, shift): (&[f32], &[f32]),
    sources: &StreamSources,
    clamp: Clamp,
) -> Vec<f32> {
    assert_eq!(sources.width(), c, "one source entry per stream channel");
    let k = sources.outputs();
    assert_eq!(
        x.len() * c,
        stream.len() * k,
        "one input channel per stream channel it is added into"
    );
    let l = l.max(1);
    par_planes(stream.len(), l, |i| {
        let (image, ch) = (i / c, i % c);
        let s = &stream[i * l..][..l];
        // A plane no channel goes into reads itself as the (unused) input.
        let (xs, m, b, add) = match sources.0[ch] {
            Some(r) => (&x[(image * k + r) * l..][..l], scale[r], shift[r], true),
            None => (s, 0.0, 0.0, false),
        };
        s.iter().zip(xs).map(move |(&s, &xv)| {
            if add {
                clamp.apply(s + (xv * m + b))
            } else {
                clamp.apply(s)
            }
        })
    })
}

/// `x` (`[N, C, H, W]`, `[C, H, W]` given) as `[N, sources.len(), OH, OW]`: output channel
/// `o` is input channel `sources[o]` subsampled by `stride` (every `stride`-th row and column
/// from the first, as a 1x1 convolution with that stride reads it), or zeros where it is
/// `None`.
pub fn select_channels(
    x: &[f32],
    [c, h, w]: [usize; 3],
    sources: &[Option<usize>],
    stride: usize,
) -> Vec<f32> {
    assert!(stride > 0, "a stride of at least 1");
    assert!(
        sources.iter().flatten().all(|&s| s < c),
        "channels inside the input"
    );
    let (oh, ow) = (h.div_ceil(stride), w.div_ceil(stride));
    let (ip, op, co) = (h * w, oh * ow, sources.len());
    let n = x.len() / (c * ip).max(1);
    par_planes_zeroed(n * co * op, op.max(1), |i, out| {
        let (image, o) = (i / co, i % co);
        let Some(from) = sources[o] else { return };
        let plane = &x[(image * c + from) * ip..][..ip];
        if stride == 1 {
            out.copy_from_slice(plane);
            return;
        }
        for (row, dst) in out.chunks_mut(ow).enumerate() {
            let src = &plane[row * stride * w..][..w];
            for (d, s) in dst.iter_mut().zip(src.iter().step_by(stride)) {
                *d = *s;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_into_the_named_channels_and_clamps_the_rest() {
        // Two images, a stream of three channels of two values, one output channel into
        // channel 2.
        let mut stream = vec![
            -1.0, 2.0, 3.0, -4.0, 5.0, -6.0, 1.0, 1.0, -1.0, -1.0, 0.5, 0.5,
        ];
        let y = vec![10.0, -10.0, 1.0, 2.0];
        let relu = Clamp {
            lo: 0.0,
            hi: f32::INFINITY,
        };
        add_into_channels(&mut stream, [3, 2], &y, &StreamSources::new(&[2], 3), relu);
        assert_eq!(
            stream,
            [0.0, 2.0, 3.0, 0.0, 15.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.5, 2.5]
        );
    }

    #[test]
    fn selects_moves_zero_fills_and_subsamples() {
        // One image of two 3x3 channels.
        let x: Vec<f32> = (0..18).map(|v| v as f32).collect();
        let y = select_channels(&x, [2, 3, 3], &[None, Some(1), Some(0)], 2);
        assert_eq!(
            y,
            [
                0.0, 0.0, 0.0, 0.0, 9.0, 11.0, 15.0, 17.0, 0.0, 2.0, 6.0, 8.0
            ]
        );
        assert_eq!(select_channels(&x, [2, 3, 3], &[Some(1)], 1), x[9..]);
    }

    #[test]
    #[should_panic(expected = "once each")]
    fn a_channel_named_twice_is_refused() {
        StreamSources::new(&[1, 1], 3);
    }
}
