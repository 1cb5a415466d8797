//! The gates' side of the architecture stage: the sparsity penalty's gradient and the
//! searching gates' factors with their gradients.

use super::*;

/// The sparsity penalty's gradient added to alpha's ([`crate::penalty_gradients`]) for 40
/// gates of 1 to 79 channels (more gates than one CubeCL launch takes), some channels masked:
/// with `sigmoid(alpha)`, and with `sigmoid(beta * alpha)` at temperatures from 1 to 10^4
/// (gates saturated both ways); and with every fifth gradient also held outside, which must
/// keep its values.
pub fn penalty(device: &Device, reference: &Device) -> Vec<Comparison> {
    let names = ["gradients", "penalty", "held gradients"];
    let mut out = Vec::new();
    for (case, tempered) in [
        ("sigmoid(alpha)", false),
        ("sigmoid(beta * alpha), beta 1 to 1e4", true),
    ] {
        let case = format!("sparsity penalty's gradient of 40 gates, {case}");
        let run = |d: &Device| penalty_case(tempered, d);
        out.extend(compare(
            TOLERANCE,
            &case,
            &names,
            run(device),
            run(reference),
        ));
    }
    out
}

/// One [`penalty`] case: the gradients and the held ones concatenated, and the penalty.
fn penalty_case(tempered: bool, device: &Device) -> Result<Vec<Vec<f32>>, String> {
    let mut terms = Vec::new();
    let mut held = Vec::new();
    for (g, gate) in test_gates(device).into_iter().enumerate() {
        let grad = wave_tensor(gate.alpha.dims()[0], 0.7 + g as f32, 0.1, device);
        if g % 5 == 0 {
            held.push(grad.clone());
        }
        terms.push(crate::PenaltyTerm {
            alpha: gate.alpha,
            grad,
            mask: gate.mask,
            coefficient: 0.5 * (1 + g % 3) as f64,
            temperature: tempered.then_some(gate.temperature),
        });
    }
    let (grads, value) = crate::penalty_gradients(terms);
    Ok(vec![concat(grads)?, values(value)?, concat(held)?])
}

/// The searching gates' factors `mask * sigmoid(beta * alpha)` and alpha's gradients through
/// them ([`crate::gate_factors`], [`crate::factor_gradients`]): 40 gates of 1 to 79 channels
/// (several launches where a launch binds few gates), masked channels, temperatures 1 to 1e4
/// (saturated gates, whose gradient is 0).
pub fn gates(device: &Device, reference: &Device) -> Vec<Comparison> {
    compare(
        TOLERANCE,
        "40 searching gates, temperatures 1 to 1e4",
        &["factors", "alpha's gradients through the factors"],
        gates_case(device),
        gates_case(reference),
    )
}

/// The [`gates()`] case: every gate's factor, then every gate's alpha gradient, concatenated.
fn gates_case(device: &Device) -> Result<Vec<Vec<f32>>, String> {
    let chains = test_gates(device);
    let dfactors = (0..chains.len())
        .map(|g| wave_tensor(chains[g].alpha.dims()[0], 0.9 + g as f32, 2.0, device))
        .collect();
    let factors = crate::gate_factors(&chains);
    let grads = crate::factor_gradients(&chains, dfactors);
    Ok(vec![concat(factors)?, concat(grads)?])
}

/// 40 gates of 1 to 79 channels (more than one CubeCL launch takes), every fourth channel
/// masked at a shifting place, alphas up to +-4 and temperatures 1, 3, 37 and 10^4 in turn.
fn test_gates(device: &Device) -> Vec<crate::GateChain> {
    (0..40)
        .map(|g| {
            let n = 1 + (g * 37) % 79;
            let mask: Vec<f32> = (0..n)
                .map(|c| if (c + g) % 4 == 3 { 0.0 } else { 1.0 })
                .collect();
            let beta = [1.0, 3.0, 37.0, 1e4][g % 4];
            crate::GateChain {
                alpha: wave_tensor(n, 0.3 + g as f32, 4.0, device),
                mask: Tensor::from_data(TensorData::new(mask, [n]), device),
                temperature: Tensor::<1>::from_floats([beta], device),
            }
        })
        .collect()
}

/// `[n]` values of [`wave`] times `scale`.
fn wave_tensor(n: usize, seed: f32, scale: f32, device: &Device) -> Tensor<1> {
    let v: Vec<f32> = wave(n, seed).into_iter().map(|x| x * scale).collect();
    Tensor::<1>::from_data(TensorData::new(v, [n]), device)
}

/// Tensors' values one after another.
fn concat(ts: Vec<Tensor<1>>) -> Result<Vec<f32>, String> {
    Ok(ts
        .into_iter()
        .map(values)
        .collect::<Result<Vec<_>, _>>()?
        .concat())
}
