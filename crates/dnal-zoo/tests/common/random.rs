//! Random BatchNorm statistics and affine parameters and random gate alphas for any network,
//! so that every folding of an eval-mode computation is exercised. Shared with `dnal-onnx`'s
//! tests (included there by path).

use burn::module::{ModuleMapper, Param};
use burn::prelude::*;
use dnal_zoo::Network;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Random BatchNorm statistics and affine parameters, random gate alphas.
pub struct Randomise {
    rng: StdRng,
    path: Vec<(String, String)>,
}

impl ModuleMapper for Randomise {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push((name.into(), container_type.into()));
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some((field, owner)) = self.path.last().cloned() else {
            return param;
        };
        let (lo, hi) = match (owner.as_str(), field.as_str()) {
            ("Struct:BatchNorm", "running_var") => (0.5, 2.0),
            ("Struct:BatchNorm", "gamma") => (0.5, 1.5),
            ("Struct:BatchNorm", _) => (-0.3, 0.3),
            ("Struct:ChannelGate", "alpha") => (-1.0, 1.0),
            _ => return param,
        };
        let rng = &mut self.rng;
        param.map(|t| {
            let shape = t.shape();
            let n = shape.num_elements();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
            Tensor::from_data(TensorData::new(v, shape), &t.device())
        })
    }
}

pub fn randomised<N: Network>(net: N, seed: u64) -> N {
    let net = dnal_zoo::init::seeded(net, seed);
    net.map(&mut Randomise {
        rng: StdRng::seed_from_u64(seed + 1),
        path: Vec::new(),
    })
}
