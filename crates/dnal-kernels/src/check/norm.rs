//! The training BatchNorm: output, batch and running statistics and gradients, gated or
//! not, with a residual, added into a wider stream, and through `batch_norm` on a module.

use super::*;

/// The BatchNorm comparisons: a module's output and running statistics over two training
/// calls, then the bare operation's output, statistics and gradients over shapes whose
/// reductions take several cubes per channel and several rounds per unit, short channels
/// (one cube of 32 or 64 units), channel counts that are not powers of two and more channels
/// than a cube's units in channel-last memory, 625 cubes along each channel (ResNet-50-like:
/// 64 channel-last channels, four lanes each), odd planes, a large common offset (the
/// variance must not cancel), and gated: a gate's factor (some of it zero) multiplying the
/// transform, with its gradient.
pub fn batch_norm(device: &Device, reference: &Device) -> Vec<Comparison> {
    let mut out = compare(
        TOLERANCE,
        "a BatchNorm module, two training calls",
        &["output 1", "output 2", "running mean", "running variance"],
        batch_norm_module(device),
        batch_norm_module(reference),
    );
    use Activation::*;
    for (shape, act, residual, offset, channel_last, gated) in [
        ([4, 3, 40, 40], Relu, false, 0.0, false, false),
        ([4, 3, 40, 40], Relu6, true, 0.0, false, true),
        ([3, 5, 7, 7], Identity, true, 0.0, false, false),
        ([2, 4, 9, 11], Relu, true, 1000.0, false, true),
        ([4, 6, 20, 20], Relu, false, 0.0, true, true),
        ([3, 5, 9, 11], Relu6, true, 0.0, true, false),
        ([2, 9, 4, 4], Relu, true, 0.0, true, false),
        ([2, 300, 3, 3], Relu, true, 0.0, true, true),
        // A gated BatchNorm of one channel (a layer a high penalty thinned to one).
        ([8, 1, 5, 5], Relu, false, 0.0, true, true),
        // A ResNet-56 first-stage unit: 64 cubes along each channel, 16 lanes per channel,
        // whose last cube finishes the reduction where it folds (cuda by default).
        ([16, 16, 32, 32], Relu, true, 0.0, true, false),
        ([16, 16, 32, 32], Relu, false, 0.0, true, true),
        ([4, 64, 100, 100], Relu, false, 0.0, true, false),
        // VGG-16's hidden classifier layer: a batch of 512 features as 1x1 planes.
        ([128, 512, 1, 1], Relu, false, 0.0, false, true),
    ] {
        let run =
            |d: &Device| batch_norm_case(d, shape, act, residual, offset, channel_last, gated);
        let mut names = vec!["output", "mean", "variance", "dx", "da", "db"];
        names.extend(residual.then_some("dresidual"));
        names.extend(gated.then_some("dfactor"));
        out.extend(compare(
            TOLERANCE,
            &format!(
                "BatchNorm {shape:?} {act:?} residual {residual} offset {offset} \
                 channel-last {channel_last} gated {gated}"
            ),
            &names,
            run(device),
            run(reference),
        ));
    }
    // Added into some channels of a wider stream (a pruned residual block's last unit):
    // scattered and consecutive positions, either memory layout for each of the two inputs.
    const INTO: [&str; 8] = [
        "output", "mean", "variance", "dx", "da", "db", "dstream", "dfactor",
    ];
    for (shape, width, pos, act, x_cl, s_cl, gated) in [
        ([3, 4, 6, 5], 7, &[0, 2, 3, 6][..], Relu, false, false, true),
        ([2, 3, 9, 11], 8, &[2, 3, 4][..], Relu6, false, true, false),
        (
            [4, 5, 7, 7],
            9,
            &[8, 1, 4, 5, 0][..],
            Identity,
            true,
            false,
            false,
        ),
        (
            [16, 6, 8, 8],
            10,
            &[1, 3, 5, 7, 8, 9][..],
            Relu,
            true,
            true,
            true,
        ),
    ] {
        let run = |d: &Device| batch_norm_into_case(d, shape, width, pos, act, [x_cl, s_cl], gated);
        out.extend(compare(
            TOLERANCE,
            &format!(
                "BatchNorm {shape:?} into {pos:?} of {width} {act:?} channel-last {x_cl}, \
                 stream channel-last {s_cl}, gated {gated}"
            ),
            &INTO[..if gated { 8 } else { 7 }],
            run(device),
            run(reference),
        ));
    }
    out
}

/// Training BatchNorm added into the channels `pos` of a `width`-channel stream, then the
/// activation, on `device`: output, batch statistics, and the gradients of `sum(y * w)` for
/// the input, `a`, `b`, the stream and, `gated`, the gate's factor; `[x, stream]` held
/// channel-last where `cl` says.
fn batch_norm_into_case(
    device: &Device,
    [n, c, h, w]: [usize; 4],
    width: usize,
    pos: &[usize],
    act: Activation,
    cl: [bool; 2],
    gated: bool,
) -> Result<Vec<Vec<f32>>, String> {
    let device = device.clone().autodiff();
    let (len, stream_len) = (n * c * h * w, n * width * h * w);
    let x = Tensor::<4>::from_data(TensorData::new(wave(len, 1.5), [n, c, h, w]), &device);
    let s = Tensor::<4>::from_data(
        TensorData::new(wave(stream_len, 2.5), [n, width, h, w]),
        &device,
    );
    let x = laid_out(x.mul_scalar(3.0).add_scalar(0.25), cl[0]).require_grad();
    let s = laid_out(s, cl[1]).require_grad();
    let one = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [c]), &device);
    let a = one(wave(c, 2.0).iter().map(|v| v + 1.0).collect()).require_grad();
    let b = one(wave(c, 3.0)).require_grad();
    let f = one(gate_factor(c)).require_grad();
    let affine = crate::norm::Affine {
        a: a.clone(),
        b: b.clone(),
        factor: gated.then(|| f.clone()),
    };
    let t = crate::norm::batch_norm_train_residual(
        x.clone(),
        affine,
        1e-5,
        act,
        crate::norm::Residual::Into(s.clone(), pos),
        None,
    );
    let weights = Tensor::<4>::from_data(
        TensorData::new(wave(stream_len, 5.0), [n, width, h, w]),
        &device,
    );
    let grads = (t.output.clone() * weights).sum().backward();
    let mut out = vec![
        values(t.output)?,
        values(t.mean)?,
        values(t.variance)?,
        grad_of(&x, &grads)?,
        grad_of(&a, &grads)?,
        grad_of(&b, &grads)?,
        grad_of(&s, &grads)?,
    ];
    if gated {
        out.push(grad_of(&f, &grads)?);
    }
    Ok(out)
}

/// A gate's factor over `c` channels: values in `[0, 1]`, every fourth channel closed (zero).
fn gate_factor(c: usize) -> Vec<f32> {
    wave(c, 6.0)
        .iter()
        .enumerate()
        .map(|(i, v)| if i % 4 == 1 { 0.0 } else { 0.5 + 0.5 * v })
        .collect()
}

/// A BatchNorm module's output and running statistics after two training calls on `device`.
fn batch_norm_module(device: &Device) -> Result<Vec<Vec<f32>>, String> {
    let device = device.clone().autodiff();
    let [n, c, h, w] = [3, 4, 6, 5];
    let bn = BatchNormConfig::new(c).with_momentum(0.3).init(&device);
    let factor = Tensor::<1>::from_data(TensorData::new(wave(c, 6.0), [c]), &device);
    let mut out = Vec::new();
    for seed in [7.0, 8.0] {
        let xv = wave(n * c * h * w, seed)
            .iter()
            .map(|v| 2.0 * v + 0.5)
            .collect();
        let x = Tensor::<4>::from_data(TensorData::new(xv, [n, c, h, w]), &device);
        out.push(values(crate::batch_norm(
            &bn,
            Some(factor.clone()),
            Activation::Relu,
            x,
        ))?);
    }
    for state in [&bn.running_mean, &bn.running_var] {
        out.push(values(state.value_sync())?);
    }
    Ok(out)
}

/// Training BatchNorm (with a residual, an activation, a gate's factor) on `device`: output,
/// batch mean and variance, and the gradients of `sum(y * w)` for the input, `a`, `b`, the
/// residual and the factor.
fn batch_norm_case(
    device: &Device,
    [n, c, h, w]: [usize; 4],
    act: Activation,
    residual: bool,
    offset: f32,
    channel_last: bool,
    gated: bool,
) -> Result<Vec<Vec<f32>>, String> {
    let device = device.clone().autodiff();
    let len = n * c * h * w;
    let four = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [n, c, h, w]), &device);
    let one = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [c]), &device);
    // Channels of different means and spreads, on a common offset.
    let xv = wave(len, 1.0)
        .into_iter()
        .enumerate()
        .map(|(i, v)| offset + v * (1.0 + (i / (h * w) % c) as f32) + (i / (h * w) % c) as f32)
        .collect();
    let x = laid_out(four(xv), channel_last).require_grad();
    let a = one(wave(c, 2.0).iter().map(|v| v + 1.0).collect()).require_grad();
    let b = one(wave(c, 3.0)).require_grad();
    let r = four(wave(len, 4.0)).require_grad();
    let f = one(gate_factor(c)).require_grad();
    let (y, mean, var) = if gated {
        let affine = crate::norm::Affine {
            a: a.clone(),
            b: b.clone(),
            factor: Some(f.clone()),
        };
        let residual = match residual {
            true => crate::norm::Residual::Whole(r.clone()),
            false => crate::norm::Residual::None,
        };
        crate::norm::batch_norm_train_residual(x.clone(), affine, 1e-5, act, residual, None)
            .statistics()
    } else if residual {
        crate::batch_norm_add_train(x.clone(), a.clone(), b.clone(), r.clone(), 1e-5, act)
    } else {
        crate::batch_norm_train(x.clone(), a.clone(), b.clone(), 1e-5, act)
    };
    // Channel-last, the output's gradient arrives channel-last too.
    let weights = four(wave(len, 5.0));
    let grads = if channel_last {
        (y.clone().permute([0, 2, 3, 1]) * weights.permute([0, 2, 3, 1]))
            .sum()
            .backward()
    } else {
        (y.clone() * weights).sum().backward()
    };
    let mut out = vec![
        values(y)?,
        values(mean)?,
        values(var)?,
        grad_of(&x, &grads)?,
        grad_of(&a, &grads)?,
        grad_of(&b, &grads)?,
    ];
    if residual {
        out.push(grad_of(&r, &grads)?);
    }
    if gated {
        out.push(grad_of(&f, &grads)?);
    }
    Ok(out)
}
