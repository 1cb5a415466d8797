//! SGD's momentum step: one parameter, many stepped together, a rate held in a tensor,
//! gradients that are slices of larger tensors.

use super::*;

/// SGD's momentum step ([`crate::sgd_momentum_step`]) over three steps, each output the next
/// step's input: lengths of one, an odd few, and more than a cube's units; a gradient that is
/// a transposed view (not contiguous) and one that is a slice; copies of the parameter and
/// velocity kept before the last step, which must keep their values (on the CubeCL backends
/// the velocity is written in place only where nothing else holds it); 45 parameters
/// stepped together ([`crate::sgd_momentum_steps`]), more than one launch takes; and a rate
/// held in a tensor.
pub fn sgd(device: &Device, reference: &Device) -> Vec<Comparison> {
    let steps = ["param", "velocity"];
    let kept = ["param", "velocity", "kept param", "kept velocity"];
    let held = ["param", "velocity", "held copies"];
    type Run<'a> = &'a dyn Fn(&Device) -> Result<Vec<Vec<f32>>, String>;
    let mut out = Vec::new();
    let mut add = |case: &str, names: &[&'static str], run: Run| {
        out.extend(compare(TOLERANCE, case, names, run(device), run(reference)));
    };
    for n in [1, 7, 4099] {
        let case = format!("SGD step of [{n}]");
        add(&case, &steps, &|d| sgd_case([n], false, false, d));
    }
    add(
        "SGD step of [16, 27] with a transposed gradient",
        &steps,
        &|d| sgd_case([16, 27], true, false, d),
    );
    add(
        "SGD step of [16, 27] with a sliced gradient",
        &steps,
        &sliced_grad_sgd_case,
    );
    add("SGD step of [16, 27] with copies kept", &kept, &|d| {
        sgd_case([16, 27], false, true, d)
    });
    add(
        "SGD step of 45 parameters together (ranks 1, 2, 4; permuted gradients)",
        &held,
        &sgd_group_case,
    );
    add(
        "SGD step of [16, 27] at a rate held in a tensor, rewritten before each step",
        &steps,
        &held_rate_sgd_case,
    );
    out
}

/// Three steps of a `[16, 27]` parameter at rates 0.1, 0.05 and 0.2, each written into one
/// `[1]` tensor ([`crate::overwrite`]) that the step reads ([`crate::Rate::Held`]), as a step
/// recorded as a graph reads its rate.
fn held_rate_sgd_case(device: &Device) -> Result<Vec<Vec<f32>>, String> {
    let tensor =
        |seed: f32| Tensor::<2>::from_data(TensorData::new(wave(16 * 27, seed), [16, 27]), device);
    let (mut param, mut velocity) = (tensor(0.3), tensor(1.7));
    let rate_of = |lr: f32| Tensor::<1>::from_data(TensorData::new(vec![lr], [1]), device);
    let mut rate = rate_of(1.0);
    for (step, lr) in [0.1, 0.05, 0.2].into_iter().enumerate() {
        rate = crate::overwrite(rate, rate_of(lr));
        let grad = tensor(2.9 + step as f32);
        let held = crate::Rate::Held(rate.clone());
        (param, velocity) = crate::sgd_momentum_step(param, grad, velocity, held, 0.9, 5e-4);
    }
    Ok(vec![values(param)?, values(velocity)?])
}

/// Three steps of a `[16, 27]` parameter whose gradient is a slice of a wider tensor (its
/// memory has gaps, so no layout of the parameter matches it).
fn sliced_grad_sgd_case(device: &Device) -> Result<Vec<Vec<f32>>, String> {
    let tensor = |shape: [usize; 2], seed: f32| {
        Tensor::<2>::from_data(
            TensorData::new(wave(shape[0] * shape[1], seed), shape),
            device,
        )
    };
    let (mut param, mut velocity) = (tensor([16, 27], 0.3), tensor([16, 27], 1.7));
    for step in 0..3 {
        let grad = tensor([16, 30], 2.9 + step as f32).slice([0..16, 2..29]);
        (param, velocity) = crate::sgd_momentum_step(param, grad, velocity, 0.1, 0.9, 5e-4);
    }
    Ok(vec![values(param)?, values(velocity)?])
}

/// Three steps of [`crate::sgd_momentum_steps`] over 45 parameters at once (more than one
/// launch takes on a CubeCL device), of ranks 1, 2 and 4, every third gradient a permuted
/// view as the convolutions' are, every fifth parameter and every seventh velocity also held
/// outside; the parameters', velocities' and held copies' values, each concatenated in order.
fn sgd_group_case(device: &Device) -> Result<Vec<Vec<f32>>, String> {
    use burn::backend::DispatchTensor;
    let tensor = |shape: &[usize], seed: f32| -> DispatchTensor {
        let n = shape.iter().product();
        let data = TensorData::new(wave(n, seed), shape.to_vec());
        match shape.len() {
            1 => Tensor::<1>::from_data(data, device).into_dispatch(),
            2 => Tensor::<2>::from_data(data, device).into_dispatch(),
            _ => Tensor::<4>::from_data(data, device).into_dispatch(),
        }
    };
    let shape = |k: usize| -> Vec<usize> {
        match k % 3 {
            0 => vec![3 + k, 2, 3, 3],
            1 => vec![5 + 2 * k],
            _ => vec![k + 1, 7],
        }
    };
    // A gradient of `shape` whose memory is laid out with its first axis last.
    let grad = |shape: &[usize], seed: f32| -> DispatchTensor {
        if shape.len() != 4 {
            return tensor(shape, seed);
        }
        let t = Tensor::<4>::from_dispatch(tensor(&[shape[1], shape[2], shape[3], shape[0]], seed));
        t.permute([3, 0, 1, 2]).into_dispatch()
    };
    let count = 45;
    let mut params: Vec<DispatchTensor> = (0..count)
        .map(|k| tensor(&shape(k), 0.3 + k as f32))
        .collect();
    let mut velocities: Vec<DispatchTensor> = (0..count)
        .map(|k| tensor(&shape(k), 1.7 + k as f32))
        .collect();
    let mut held = Vec::new();
    for step in 0..3 {
        let slots = params
            .into_iter()
            .zip(velocities)
            .enumerate()
            .map(|(k, (p, v))| {
                let seed = 2.9 + (step * count + k) as f32;
                let g = if k % 3 == 0 {
                    grad(&shape(k), seed)
                } else {
                    tensor(&shape(k), seed)
                };
                if k % 5 == 0 {
                    held.push(p.clone());
                }
                if k % 7 == 0 {
                    held.push(v.clone());
                }
                [p, g, v]
            })
            .collect();
        (params, velocities) = (Vec::new(), Vec::new());
        for [p, v] in crate::sgd_momentum_steps(slots, 0.1, 0.9, 5e-4) {
            params.push(p);
            velocities.push(v);
        }
    }
    let flat = |ts: Vec<DispatchTensor>| -> Result<Vec<f32>, String> {
        let mut out = Vec::new();
        for t in ts {
            out.extend(values(Tensor::<1>::from_dispatch(t))?);
        }
        Ok(out)
    };
    Ok(vec![flat(params)?, flat(velocities)?, flat(held)?])
}

fn sgd_case<const D: usize>(
    shape: [usize; D],
    transposed_grad: bool,
    keep: bool,
    device: &Device,
) -> Result<Vec<Vec<f32>>, String> {
    let n = shape.iter().product();
    let tensor = |shape: [usize; D], seed: f32| {
        Tensor::<D>::from_data(TensorData::new(wave(n, seed), shape), device)
    };
    let (mut param, mut velocity) = (tensor(shape, 0.3), tensor(shape, 1.7));
    let mut kept = None;
    for step in 0..3 {
        let seed = 2.9 + step as f32;
        let grad = if transposed_grad {
            let mut swapped = shape;
            swapped.swap(0, D - 1);
            tensor(swapped, seed).swap_dims(0, D - 1)
        } else {
            tensor(shape, seed)
        };
        if keep && step == 2 {
            kept = Some((param.clone(), velocity.clone()));
        }
        (param, velocity) = crate::sgd_momentum_step(param, grad, velocity, 0.1, 0.9, 5e-4);
    }
    let mut out = vec![values(param)?, values(velocity)?];
    if let Some((param, velocity)) = kept {
        out.extend([values(param)?, values(velocity)?]);
    }
    Ok(out)
}
