//! A sparsity penalty of the form `sum over gates of c * sum over channels of m * sigmoid(t *
//! alpha)` (coefficient `c`, temperature `t`, mask `m` per gate) added to alpha's gradients
//! after the backward pass rather than through autodiff: its gradient is per channel and has a
//! closed form, `c * t * m * s * (1 - s)` with `s = sigmoid(t * alpha)`. On cuda and wgpu (f32)
//! every gate's share takes one CubeCL operation (`cube/penalty.rs`); elsewhere burn's tensor
//! operations, gate by gate.

use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::sigmoid;

/// One gate's part of the penalty.
pub struct PenaltyTerm {
    /// The gate's alpha, `[C]` (its values; not tracked by autodiff).
    pub alpha: Tensor<1>,
    /// Alpha's gradient from the backward pass, `[C]`.
    pub grad: Tensor<1>,
    /// The gate's mask, `[C]` (1 for a channel that is still searched, 0 for one removed).
    pub mask: Tensor<1>,
    /// `c`: the penalty's coefficient times the gate's weight.
    pub coefficient: f64,
    /// `t`: the gate's temperature (`[1]`) for `sigmoid(beta * alpha)`, none for
    /// `sigmoid(alpha)`. Either every term has one or none has.
    pub temperature: Option<Tensor<1>>,
}

/// Whether gates whose alpha is like `alpha` (f32 on cuda or wgpu, dnal's kernels on) take one
/// operation for all of them in [`penalty_gradients`], [`crate::gate_factors`] and
/// [`crate::factor_gradients`], where autodiff takes several per gate.
pub fn gate_operations_fold(alpha: &Tensor<1>) -> bool {
    #[cfg(feature = "cube")]
    return crate::takes_cube_path(alpha);
    #[cfg(not(feature = "cube"))]
    {
        let _ = alpha;
        false
    }
}

/// Each term's gradient with the penalty's added, in the terms' order, and the penalty itself
/// (`[1]`, f32). Computed in f32, each gradient returned in its own precision.
pub fn penalty_gradients(terms: Vec<PenaltyTerm>) -> (Vec<Tensor<1>>, Tensor<1>) {
    let Some(first) = terms.first() else {
        panic!("penalty_gradients: no gates");
    };
    #[cfg(feature = "cube")]
    if terms.iter().all(|t| {
        [&t.alpha, &t.grad, &t.mask]
            .into_iter()
            .chain(&t.temperature)
            .all(crate::takes_cube_path)
    }) {
        return cube_gradients(terms);
    }
    let device = first.alpha.device();
    let mut total = Tensor::<1>::zeros([1], &device).cast(DType::F32);
    let mut grads = Vec::with_capacity(terms.len());
    for term in terms {
        let dtype = term.grad.dtype();
        let t = term.temperature.map(f32);
        let x = match &t {
            Some(t) => f32(term.alpha) * t.clone(),
            None => f32(term.alpha),
        };
        let s = sigmoid(x);
        let masked = s.clone() * f32(term.mask);
        let mut added = (masked.clone() * s.neg().add_scalar(1.0)).mul_scalar(term.coefficient);
        if let Some(t) = t {
            added = added * t;
        }
        grads.push((f32(term.grad) + added).cast(dtype));
        total = total + masked.sum().mul_scalar(term.coefficient);
    }
    (grads, total)
}

fn f32(t: Tensor<1>) -> Tensor<1> {
    if t.dtype() == DType::F32 {
        t
    } else {
        t.cast(DType::F32)
    }
}

/// [`penalty_gradients`] as one CubeCL operation (and the sum of the channels' shares).
#[cfg(feature = "cube")]
fn cube_gradients(terms: Vec<PenaltyTerm>) -> (Vec<Tensor<1>>, Tensor<1>) {
    use crate::sgd::{cube_dispatch, cube_float};
    let fused = |x: Tensor<1>| cube_float(x.into_dispatch()).expect("checked by the caller");
    let tempered = terms[0].temperature.is_some();
    let mut slots = Vec::with_capacity(terms.len());
    let mut coefficients = Vec::with_capacity(terms.len());
    let mut temperatures = Vec::with_capacity(terms.len());
    for t in terms {
        assert_eq!(
            t.temperature.is_some(),
            tempered,
            "penalty_gradients: every gate tempered or none"
        );
        slots.push([t.alpha, t.grad, t.mask].map(fused));
        coefficients.push(t.coefficient as f32);
        temperatures.extend(t.temperature.map(fused));
    }
    let temperatures = tempered.then_some(temperatures);
    let (grads, shares) = crate::cube::penalty_steps(slots, coefficients, temperatures);
    let grads = grads
        .into_iter()
        .map(|g| Tensor::from_dispatch(cube_dispatch(g)))
        .collect();
    let shares = Tensor::<1>::from_dispatch(cube_dispatch(shares));
    (grads, shares.sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gates' alphas, masks, coefficients, temperatures (or none) and incoming gradients.
    #[derive(Clone)]
    struct Gates {
        alphas: Vec<Vec<f32>>,
        masks: Vec<Vec<f32>>,
        coefficients: Vec<f64>,
        temperatures: Option<Vec<f32>>,
        grads: Vec<Vec<f32>>,
    }

    impl Gates {
        /// `sum over gates of c * sum(m * sigmoid(t * alpha))` through autodiff, as the loss
        /// computes it: the incoming gradients plus its own, and its value.
        fn through_autodiff(&self) -> (Vec<Vec<f32>>, f32) {
            let device = Device::default().autodiff();
            let mut total = Tensor::<1>::zeros([1], &device);
            let mut params = Vec::new();
            for (g, alpha) in self.alphas.iter().enumerate() {
                let a = Tensor::<1>::from_floats(alpha.as_slice(), &device).require_grad();
                let x = match &self.temperatures {
                    Some(t) => a.clone().mul_scalar(t[g]),
                    None => a.clone(),
                };
                let m = Tensor::<1>::from_floats(self.masks[g].as_slice(), &device);
                total = total + (sigmoid(x) * m).sum().mul_scalar(self.coefficients[g]);
                params.push(a);
            }
            let grads = total.backward();
            let got = params
                .iter()
                .zip(&self.grads)
                .map(|(a, g0)| {
                    let g = a.grad(&grads).unwrap().into_data();
                    let g = g.try_to_vec::<f32>().unwrap();
                    g.iter().zip(g0).map(|(g, g0)| g + g0).collect()
                })
                .collect();
            (got, total.into_scalar())
        }

        /// The same through [`penalty_gradients`].
        fn folded(&self) -> (Vec<Vec<f32>>, f32) {
            let device = Device::default();
            let t = |v: &[f32]| Tensor::<1>::from_floats(v, &device);
            let terms = (0..self.alphas.len())
                .map(|g| PenaltyTerm {
                    alpha: t(&self.alphas[g]),
                    grad: t(&self.grads[g]),
                    mask: t(&self.masks[g]),
                    coefficient: self.coefficients[g],
                    temperature: self.temperatures.as_ref().map(|ts| t(&[ts[g]])),
                })
                .collect();
            let (grads, value) = penalty_gradients(terms);
            let grads = grads
                .into_iter()
                .map(|g| g.into_data().try_to_vec::<f32>().unwrap())
                .collect();
            (grads, value.into_scalar())
        }
    }

    /// Three gates, one channel masked, temperatures up to 10^4 (saturated gates, whose
    /// gradient is 0 and never NaN): the gradients and the penalty of autodiff, and the
    /// gradient of one channel by central differences of the penalty.
    #[test]
    fn the_added_gradient_is_autodiffs_and_the_penalty_s_slope() {
        for temperatures in [None, Some(vec![1.0, 3.0, 1e4])] {
            let gates = Gates {
                alphas: vec![
                    vec![0.3, -1.2, 2.0],
                    vec![0.05, -0.4],
                    vec![1.5, -0.7, 0.0, 0.2],
                ],
                masks: vec![vec![1.0, 0.0, 1.0], vec![1.0, 1.0], vec![1.0; 4]],
                coefficients: vec![0.5, 2.0, 0.25],
                temperatures,
                grads: vec![
                    vec![0.1, 0.2, -0.3],
                    vec![0.0, 1.0],
                    vec![-1.0, 0.5, 0.25, 0.0],
                ],
            };
            let (want, want_value) = gates.through_autodiff();
            let (got, value) = gates.folded();
            assert!((value - want_value).abs() <= 1e-6 * want_value.abs());
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!(g.is_finite() && (g - w).abs() <= 1e-6, "{g} against {w}");
            }
            // The penalty's slope along alpha[1][0], by central differences.
            let h = 1e-2;
            let at = |d: f32| {
                let mut moved = gates.clone();
                moved.alphas[1][0] += d;
                moved.folded().1
            };
            let slope = (at(h) - at(-h)) / (2.0 * h);
            let added = got[1][0] - gates.grads[1][0];
            assert!((slope - added).abs() <= 1e-3, "{slope} against {added}");
        }
    }
}
