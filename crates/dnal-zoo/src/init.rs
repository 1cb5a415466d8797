//! Initial weights drawn from a generator of the run's own.
//!
//! burn draws a new parameter's random values from its backend's generator, which is one per
//! process (flex keeps it in a global), and it draws lazily, at a parameter's first use. A seeded
//! run that drew its weights through burn would therefore depend on every other draw in the
//! process: another run, a network built to print its summary, anything that touches a fresh
//! parameter on another thread between the run's `seed` and its own draws. [`seeded`] replaces
//! that: every random weight of the zoo's networks (the convolutions' and the linear layers'; the
//! other parameters are constants) is drawn from a ChaCha generator seeded by the run, with the
//! distribution burn's defaults use, so a run's initial network depends on its seed and its
//! architecture only.

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `model` with every convolution and linear weight and bias drawn anew from a generator seeded
/// with `seed`, in module order: uniform on `(-b, b)` with `b = 1 / sqrt(fan_in)`, burn's
/// default (`KaimingUniform` with gain `1 / sqrt(3)`) for `Conv2d` and `Linear`.
pub fn seeded<M: Module>(model: M, seed: u64) -> M {
    let mut draw = Draw {
        rng: StdRng::seed_from_u64(seed),
        path: Vec::new(),
        fan_in: 0,
    };
    model.map(&mut draw)
}

struct Draw {
    rng: StdRng,
    /// (field, type of the struct that holds it) of every module entered.
    path: Vec<(String, String)>,
    /// Fan-in of the layer whose weight was drawn last (its bias comes after it).
    fan_in: usize,
}

impl ModuleMapper for Draw {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path
            .push((name.to_string(), container_type.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some((field, owner)) = self.path.last() else {
            return param;
        };
        let dims = param.lazy_shape().to_vec();
        let fan_in = match (owner.as_str(), field.as_str()) {
            // [out, in / groups, kh, kw]
            ("Struct:Conv2d", "weight") => dims[1..].iter().product(),
            // [in, out] (burn's default row layout)
            ("Struct:Linear", "weight") => dims[0],
            ("Struct:Conv2d" | "Struct:Linear", "bias") => self.fan_in,
            _ => return param,
        };
        if field == "weight" {
            self.fan_in = fan_in;
        }
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        let count: usize = dims.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| self.rng.random_range(-bound..bound) as f32)
            .collect();
        let device = param.lazy_device();
        let tensor = Tensor::<D>::from_data(TensorData::new(values, dims), &device);
        Param::initialized(param.id, tensor).set_require_grad(true)
    }
}
