//! The weights' optimiser: SGD with momentum (dampening 0) and L2 weight decay, computing what
//! burn's `Sgd` computes, with each parameter's momentum step one operation
//! ([`dnal_kernels::sgd_momentum_step`]: one launch on the CubeCL backends, in place) where
//! burn's issues seven. Its state is recorded under the names burn's `Sgd` uses
//! (`momentum.velocity`), so checkpoints written with either load into the other.

use burn::optim::{LearningRate, Optimizer, RecordState, StateSink, StateSource, join_path};
use burn::prelude::*;
use dnal_kernels::{decayed, sgd_momentum_step};

/// SGD with momentum `momentum` (none at 0) and weight decay `weight_decay` (none at 0).
#[derive(Clone, Debug)]
pub struct Sgd {
    momentum: f64,
    weight_decay: f64,
}

impl Sgd {
    /// The optimiser; `momentum` and `weight_decay` are used as given (0 turns either off).
    pub fn new(momentum: f64, weight_decay: f64) -> Self {
        Self {
            momentum,
            weight_decay,
        }
    }
}

/// A parameter's velocity, from its first step on (none without momentum).
#[derive(Clone)]
pub struct SgdState<const D: usize> {
    velocity: Option<Tensor<D>>,
}

/// Where burn's `SgdState` keeps the velocity: its `momentum` field's `velocity`.
const MOMENTUM: &str = "momentum";
const VELOCITY: &str = "velocity";

impl<const D: usize> RecordState for SgdState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        if let Some(velocity) = &self.velocity {
            let path = join_path(prefix, MOMENTUM);
            out.push_tensor(&path, VELOCITY, velocity.clone().into_data());
        }
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let path = join_path(prefix, MOMENTUM);
        let velocity = src
            .take_tensor(&path, VELOCITY)
            .map(|data| Tensor::from_data(data, device));
        Some(Self { velocity })
    }
}

impl Optimizer for Sgd {
    type State<const D: usize> = SgdState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let velocity = state.and_then(|s| s.velocity);
        if self.momentum == 0.0 {
            let grad = decayed(grad, &tensor, self.weight_decay);
            return (
                tensor - grad.mul_scalar(lr),
                Some(SgdState { velocity: None }),
            );
        }
        let (tensor, velocity) = match velocity {
            Some(velocity) => {
                sgd_momentum_step(tensor, grad, velocity, lr, self.momentum, self.weight_decay)
            }
            // The first step's velocity is the (decayed) gradient itself.
            None => {
                let velocity = decayed(grad, &tensor, self.weight_decay);
                (tensor - velocity.clone().mul_scalar(lr), velocity)
            }
        };
        let velocity = Some(velocity);
        (tensor, Some(SgdState { velocity }))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        SgdState {
            velocity: state.velocity.map(|v| v.to_device(device)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::decay::WeightDecayConfig;
    use burn::optim::momentum::MomentumConfig;
    use burn::optim::{GradientsParams, ModuleOptimizer, SgdConfig};

    fn device() -> Device {
        Device::flex().autodiff()
    }

    fn burn_sgd(momentum: f64, weight_decay: f32) -> ModuleOptimizer {
        let mut cfg = SgdConfig::new();
        if momentum > 0.0 {
            cfg = cfg.with_momentum(Some(
                MomentumConfig::new()
                    .with_momentum(momentum)
                    .with_dampening(0.0),
            ));
        }
        if weight_decay > 0.0 {
            cfg = cfg.with_weight_decay(Some(WeightDecayConfig::new(weight_decay)));
        }
        cfg.init()
    }

    /// One step of `optim` on `layer` with the gradients of `sum((layer(x))^2)` for the `i`-th
    /// input.
    fn step(optim: &mut ModuleOptimizer, layer: Linear, i: usize) -> Linear {
        let d = device();
        let x = Tensor::<2>::from_data(
            TensorData::new(
                (0..12)
                    .map(|k| ((k * 7 + i * 3) % 11) as f32 * 0.1 - 0.5)
                    .collect(),
                [3, 4],
            ),
            &d,
        );
        let loss = layer.forward(x).powi_scalar(2).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &layer);
        optim.step(0.05, layer, grads)
    }

    fn values(layer: &Linear) -> Vec<f32> {
        let mut v = layer.weight.val().into_data().try_to_vec::<f32>().unwrap();
        v.extend(
            layer
                .bias
                .as_ref()
                .unwrap()
                .val()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap(),
        );
        v
    }

    fn assert_same(what: &str, a: &Linear, b: &Linear) {
        let (a, b) = (values(a), values(b));
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                "{what}: {x} vs {y}"
            );
        }
    }

    #[test]
    fn steps_as_burns_sgd_does() {
        for (momentum, decay) in [(0.9, 5e-4), (0.9, 0.0), (0.0, 5e-4), (0.0, 0.0)] {
            let layer = LinearConfig::new(4, 3).init(&device());
            let start = values(&layer);
            let mut ours = ModuleOptimizer::from(Sgd::new(momentum, decay as f64));
            let mut theirs = burn_sgd(momentum, decay);
            let (mut a, mut b) = (layer.clone(), layer);
            for i in 0..4 {
                a = step(&mut ours, a, i);
                b = step(&mut theirs, b, i);
                assert_same(
                    &format!("momentum {momentum}, decay {decay}, step {i}"),
                    &a,
                    &b,
                );
            }
            assert!(values(&a) != start, "the steps moved the parameters");
        }
    }

    #[test]
    fn state_moves_between_burns_sgd_and_this_one() {
        let layer = LinearConfig::new(4, 3).init(&device());
        // Two steps of burn's, its state into ours; and the reverse.
        let mut theirs = burn_sgd(0.9, 5e-4);
        let mut ours = ModuleOptimizer::from(Sgd::new(0.9, 5e-4));
        let (mut a, mut b) = (layer.clone(), layer);
        for i in 0..2 {
            a = step(&mut theirs, a, i);
            b = step(&mut ours, b, i);
        }
        let mut ours_resumed =
            ModuleOptimizer::from(Sgd::new(0.9, 5e-4)).load_record(theirs.to_record());
        let mut theirs_resumed = burn_sgd(0.9, 5e-4).load_record(ours.to_record());
        let a2 = step(&mut ours_resumed, a.clone(), 2);
        let b2 = step(&mut theirs_resumed, b.clone(), 2);
        let a3 = step(&mut theirs, a, 2);
        let b3 = step(&mut ours, b, 2);
        assert_same("burn's state resumed here", &a2, &a3);
        assert_same("this state resumed in burn's", &b2, &b3);
    }
}
