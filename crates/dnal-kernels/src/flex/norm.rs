//! BatchNorm in training on flex tensors: the forward pass with the activation and a residual
//! (shaped like the output, or a stream it is added into) fused, and the gradients of its
//! backward passes.

use super::{NormOutput, f32s, per_channel, select_planes, tensor, vec_of};
use crate::cpu::{self, Clamp};
use burn::backend::Flex;
use burn::backend::flex::FlexTensor;

pub(super) fn inv_std(variance: &[f32], epsilon: f64) -> Vec<f32> {
    variance
        .iter()
        .map(|&v| (1.0 / (f64::from(v) + epsilon).sqrt()) as f32)
        .collect()
}

pub(super) fn norm_forward(
    x: &FlexTensor,
    (a, b): (&FlexTensor, &FlexTensor),
    residual: Option<&FlexTensor>,
    epsilon: f64,
    clamp: Clamp,
) -> NormOutput<Flex> {
    let x = f32s(x);
    let (c, l) = per_channel(&x);
    let xv = x.storage::<f32>();
    let ((mean, var), (scale, shift)) = batch_affine(xv, (c, l), (a, b), epsilon);
    let residual = residual.map(f32s);
    let res = residual.as_ref().map(|t| t.storage::<f32>());
    let y = cpu::normalize(xv, c, l, (&scale, &shift), res, clamp);
    NormOutput {
        output: tensor(y, x.layout().shape()),
        mean: tensor(mean, &[c]),
        variance: tensor(var, &[c]),
    }
}

/// [`norm_forward`] whose output is added into the channels `channels` of `stream`
/// (`[N, C, H, W]`, a residual stream a pruned block writes part of), every channel of the sum
/// then clamped: the output is shaped like the stream, the statistics are `x`'s.
pub(super) fn norm_forward_into(
    x: &FlexTensor,
    (a, b): (&FlexTensor, &FlexTensor),
    stream: &FlexTensor,
    channels: &[usize],
    epsilon: f64,
    clamp: Clamp,
) -> NormOutput<Flex> {
    let x = f32s(x);
    let (c, l) = per_channel(&x);
    let xv = x.storage::<f32>();
    let ((mean, var), (scale, shift)) = batch_affine(xv, (c, l), (a, b), epsilon);
    let stream = f32s(stream);
    let (width, stream_l) = per_channel(&stream);
    assert_eq!(stream_l, l, "a stream with BatchNorm's input's maps");
    let sources = cpu::StreamSources::new(channels, width);
    let y = cpu::normalize_into_channels(
        stream.storage::<f32>(),
        [width, l],
        xv,
        (&scale, &shift),
        &sources,
        clamp,
    );
    NormOutput {
        output: tensor(y, stream.layout().shape()),
        mean: tensor(mean, &[c]),
        variance: tensor(var, &[c]),
    }
}

/// The gradients of [`norm_forward_into`] for the output gradient `grad`: `(dx, da, db,
/// dstream)`, `dx` only when asked for. The stream's gradient is `grad` passed back through
/// the clamp (given the output `y`); BatchNorm's output gradient is that at `channels`.
/// `state`'s clamp is the identity (the clamp came after the add).
pub(super) fn norm_grads_into(
    state: NormState,
    grad: FlexTensor,
    want_x: bool,
    (y, channels, clamp): (FlexTensor, &[usize], Clamp),
) -> (Option<FlexTensor>, FlexTensor, FlexTensor, FlexTensor) {
    let grad = f32s(&grad);
    let through = if clamp.is_none() {
        grad
    } else {
        let (_, l) = per_channel(&grad);
        let y = f32s(&y);
        let g = cpu::through_clamp(grad.storage::<f32>(), y.storage::<f32>(), l, clamp);
        tensor(g, grad.layout().shape())
    };
    let sources: Vec<Option<usize>> = channels.iter().map(|&c| Some(c)).collect();
    let g = select_planes(&through, &sources);
    let (dx, da, db, _) = norm_grads(state, g, want_x, None);
    (dx, da, db, through)
}

/// Per-channel pairs: `(mean, variance)` or `(scale, shift)`.
type PerChannel = (Vec<f32>, Vec<f32>);

/// The batch's `(mean, variance)` per channel of `xv` (`[N, C, L]`, `(C, L)` given) and
/// BatchNorm's `(scale, shift)` from them and the affine parameters `a`, `b`.
fn batch_affine(
    xv: &[f32],
    (c, l): (usize, usize),
    (a, b): (&FlexTensor, &FlexTensor),
    epsilon: f64,
) -> (PerChannel, PerChannel) {
    let (mean, var) = cpu::channel_stats(xv, c, l);
    let affine = norm_affine(&vec_of(a), &vec_of(b), &mean, &var, epsilon);
    ((mean, var), affine)
}

/// BatchNorm's per-channel `(scale, shift)`: `y = x * scale + shift`, `scale = a * inv_std`,
/// `shift = b - mean * scale` (the forward pass and the backward's recomputed clamp mask use
/// this one function, so they agree bit for bit).
pub(super) fn norm_affine(
    a: &[f32],
    b: &[f32],
    mean: &[f32],
    var: &[f32],
    epsilon: f64,
) -> (Vec<f32>, Vec<f32>) {
    let r = inv_std(var, epsilon);
    let scale: Vec<f32> = a.iter().zip(&r).map(|(a, r)| a * r).collect();
    let shift = b
        .iter()
        .zip(mean)
        .zip(&scale)
        .map(|((b, m), s)| b - m * s)
        .collect();
    (scale, shift)
}

/// What the BatchNorm backward passes keep: input, `a`, `b`, batch mean, batch variance,
/// epsilon, and the clamp (its gradient mask is recomputed from the input).
pub(super) type NormState = (
    FlexTensor,
    FlexTensor,
    FlexTensor,
    FlexTensor,
    FlexTensor,
    f64,
    Clamp,
);

/// `(dx, da, db, g)` of BatchNorm for the output gradient `grad`, passed back through the
/// state's clamp first (`g`, the clamp's input gradient); `dx` only when asked for. With
/// `output`, the clamp's input included a residual, so its mask comes from the output, and the
/// pass that applies it also sums what the weight gradients need; without, the mask is
/// recomputed from the input.
pub(super) fn norm_grads(
    state: NormState,
    grad: FlexTensor,
    want_x: bool,
    output: Option<FlexTensor>,
) -> (Option<FlexTensor>, FlexTensor, FlexTensor, FlexTensor) {
    let (x, a, b, mean, var, epsilon, clamp) = state;
    let grad = f32s(&grad);
    let x = f32s(&x);
    let (c, l) = per_channel(&x);
    let (xv, gv) = (x.storage::<f32>(), grad.storage::<f32>());
    let (a, mean, var) = (vec_of(&a), vec_of(&mean), vec_of(&var));
    let r = inv_std(&var, epsilon);
    let stats = (&mean[..], r.as_slice());
    let (scale, shift) = norm_affine(&a, &vec_of(&b), &mean, &var, epsilon);
    let (through, (sum_dy, sum_dy_xhat), mask) = match output {
        Some(y) if !clamp.is_none() => {
            let y = f32s(&y);
            let (g, sd, sdx) =
                cpu::through_clamp_grad_sums(gv, y.storage::<f32>(), xv, c, l, stats, clamp);
            (Some(g), (sd, sdx), None)
        }
        _ => {
            let mask = (!clamp.is_none()).then_some(cpu::ClampOf {
                scale: &scale,
                shift: &shift,
                clamp,
            });
            (
                None,
                cpu::batch_norm_grad_sums(xv, gv, c, l, stats, mask),
                mask,
            )
        }
    };
    let dx = want_x.then(|| {
        let sums = (sum_dy.as_slice(), sum_dy_xhat.as_slice());
        let gv = through.as_deref().unwrap_or(gv);
        let dx = cpu::batch_norm_input_grad(xv, gv, c, l, stats, &a, sums, mask);
        tensor(dx, x.layout().shape())
    });
    let g = match through {
        Some(g) => tensor(g, x.layout().shape()),
        None => grad,
    };
    (dx, tensor(sum_dy_xhat, &[c]), tensor(sum_dy, &[c]), g)
}
