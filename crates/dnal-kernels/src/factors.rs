//! A searching gate's factor `m * sigmoid(t * alpha)` (mask `m`, temperature `t`) computed
//! outside autodiff, and the gradient it receives carried back to alpha by its closed form,
//! `df * t * m * s * (1 - s)` with `s = sigmoid(t * alpha)`. A step that hands each factor to
//! its layer as an autodiff leaf leaves the chain out of the graph, where on the CubeCL
//! backends it costs a fused launch per gate each way; here every gate takes one operation
//! each way on cuda and wgpu (f32; `cube/factors.rs`), burn's tensor operations elsewhere.

use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::sigmoid;

/// One searching gate's tensors (values; not tracked by autodiff).
#[derive(Clone)]
pub struct GateChain {
    /// The gate's alpha, `[C]`.
    pub alpha: Tensor<1>,
    /// The gate's mask, `[C]`.
    pub mask: Tensor<1>,
    /// The gate's temperature `t`, `[1]`.
    pub temperature: Tensor<1>,
}

impl GateChain {
    /// Every tensor on the CubeCL path (f32 on cuda or wgpu, dnal's kernels on).
    #[cfg(feature = "cube")]
    fn on_cube(&self) -> bool {
        [&self.alpha, &self.mask, &self.temperature]
            .into_iter()
            .all(crate::takes_cube_path)
    }

    /// `sigmoid(t * alpha)` in f32.
    fn sigmoid(&self) -> Tensor<1> {
        sigmoid(f32(self.alpha.clone()) * f32(self.temperature.clone()))
    }
}

/// Each gate's factor `m * sigmoid(t * alpha)` (f32, not tracked), in the gates' order.
pub fn gate_factors(gates: &[GateChain]) -> Vec<Tensor<1>> {
    if gates.is_empty() {
        return Vec::new();
    }
    #[cfg(feature = "cube")]
    if gates.iter().all(GateChain::on_cube) {
        return cube_steps(gates, None);
    }
    gates
        .iter()
        .map(|g| g.sigmoid() * f32(g.mask.clone()))
        .collect()
}

/// Each gate's alpha gradient from its factor's gradient `dfactors[k]` (`[C]`), in f32, in the
/// gates' order.
pub fn factor_gradients(gates: &[GateChain], dfactors: Vec<Tensor<1>>) -> Vec<Tensor<1>> {
    assert_eq!(gates.len(), dfactors.len(), "one factor gradient per gate");
    if gates.is_empty() {
        return Vec::new();
    }
    let dfactors: Vec<Tensor<1>> = dfactors.into_iter().map(f32).collect();
    #[cfg(feature = "cube")]
    if gates.iter().all(GateChain::on_cube) && dfactors.iter().all(crate::takes_cube_path) {
        return cube_steps(gates, Some(dfactors));
    }
    gates
        .iter()
        .zip(dfactors)
        .map(|(g, df)| {
            let s = g.sigmoid();
            let slope = s.clone() * s.neg().add_scalar(1.0) * f32(g.mask.clone());
            df * slope * f32(g.temperature.clone())
        })
        .collect()
}

fn f32(t: Tensor<1>) -> Tensor<1> {
    if t.dtype() == DType::F32 {
        t
    } else {
        t.cast(DType::F32)
    }
}

/// [`gate_factors`] (no `dfactors`) or [`factor_gradients`] as one CubeCL operation.
#[cfg(feature = "cube")]
fn cube_steps(gates: &[GateChain], dfactors: Option<Vec<Tensor<1>>>) -> Vec<Tensor<1>> {
    use crate::sgd::{cube_dispatch, cube_float};
    let fused = |x: Tensor<1>| cube_float(x.into_dispatch()).expect("checked by the caller");
    let chains = gates
        .iter()
        .map(|g| [g.alpha.clone(), g.mask.clone(), g.temperature.clone()].map(fused))
        .collect();
    let dfactors = dfactors.map(|d| d.into_iter().map(fused).collect());
    crate::cube::factor_steps(chains, dfactors)
        .into_iter()
        .map(|t| Tensor::from_dispatch(cube_dispatch(t)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], device: &Device) -> Tensor<1> {
        Tensor::<1>::from_floats(v, device)
    }

    fn values(t: Tensor<1>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// Gates of 1 to 4 channels, a masked channel, temperatures 1 to 10^4 (saturated gates,
    /// whose gradient is 0 and never NaN): the factors equal the gate's own, and the gradients
    /// autodiff's through `mask * sigmoid(t * alpha)` and the slope by central differences.
    #[test]
    fn factors_and_gradients_are_autodiffs() {
        let alphas = [vec![0.3, -1.2, 2.0], vec![0.05], vec![1.5, -0.7, 0.0, 0.2]];
        let masks = [vec![1.0, 0.0, 1.0], vec![1.0], vec![1.0; 4]];
        let temps = [1.0, 3.0, 1e4];
        let dfs = [vec![0.1, 0.2, -0.3], vec![2.0], vec![-1.0, 0.5, 0.25, 4.0]];
        let plain = Device::default();
        let gates: Vec<GateChain> = (0..3)
            .map(|k| GateChain {
                alpha: t(&alphas[k], &plain),
                mask: t(&masks[k], &plain),
                temperature: t(&[temps[k]], &plain),
            })
            .collect();
        let factors = gate_factors(&gates);
        let dfactors = dfs.iter().map(|d| t(d, &plain)).collect();
        let grads = factor_gradients(&gates, dfactors);
        let device = plain.clone().autodiff();
        for k in 0..3 {
            let alpha = t(&alphas[k], &device).require_grad();
            let f = sigmoid(alpha.clone().mul_scalar(temps[k])) * t(&masks[k], &device);
            let want = values(f.clone());
            let backward = (f * t(&dfs[k], &device)).sum().backward();
            let want_grad = values(alpha.grad(&backward).unwrap());
            let (got, got_grad) = (values(factors[k].clone()), values(grads[k].clone()));
            for (g, w) in got.iter().zip(&want).chain(got_grad.iter().zip(&want_grad)) {
                assert!(g.is_finite() && (g - w).abs() <= 1e-6, "{g} against {w}");
            }
        }
        // The slope of sum(df * factor) along alpha[0][0], by central differences.
        let h = 1e-2;
        let at = |d: f32| {
            let mut gate = gates[0].clone();
            let mut a = alphas[0].clone();
            a[0] += d;
            gate.alpha = t(&a, &plain);
            let f = values(gate_factors(&[gate]).remove(0));
            f.iter().zip(&dfs[0]).map(|(f, d)| f * d).sum::<f32>()
        };
        let slope = (at(h) - at(-h)) / (2.0 * h);
        let got = values(grads[0].clone())[0];
        assert!((slope - got).abs() <= 1e-3, "{slope} against {got}");
    }
}
