//! Initial weights come from the run's own generator: the same seed gives the same network
//! whatever else drew from burn's process-wide generator, with burn's default distribution.

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use dnal_zoo::{CifarResNetConfig, Network, PlainCnn, PlainCnnConfig, SuperNet, SuperNetConfig};

/// Every float parameter's values, in module order, with the shapes of the weights.
#[derive(Default)]
struct Values {
    all: Vec<Vec<f32>>,
    weights: Vec<(Vec<usize>, Vec<f32>)>,
}

impl ModuleVisitor for Values {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let dims = t.dims().to_vec();
        let v = t.into_data().try_to_vec::<f32>().unwrap();
        if D == 4 {
            self.weights.push((dims, v.clone()));
        }
        self.all.push(v);
    }
}

fn values<M: Module>(m: &M) -> Values {
    let mut v = Values::default();
    m.visit(&mut v);
    v
}

/// Builds with `build`, draws with `seed`, with burn's generator disturbed in between.
fn drawn<M: Module>(build: impl Fn() -> M, seed: u64, disturb: u64) -> Values {
    let device = Device::default();
    device.seed(disturb);
    let _ = Tensor::<1>::random([1000 + disturb as usize], Default::default(), &device).into_data();
    let m = dnal_zoo::init::seeded(build(), seed);
    device.seed(disturb + 1);
    values(&m)
}

fn check<M: Module>(name: &str, build: impl Fn() -> M) {
    let a = drawn(&build, 7, 1);
    let b = drawn(&build, 7, 2);
    let c = drawn(&build, 8, 1);
    assert_eq!(a.all, b.all, "{name}: same seed, other draws in between");
    assert_ne!(a.all, c.all, "{name}: another seed");
    assert!(!a.weights.is_empty());
    for (dims, w) in &a.weights {
        // [out, in / groups, kh, kw]: burn's KaimingUniform bound 1 / sqrt(fan_in).
        let bound = 1.0 / ((dims[1] * dims[2] * dims[3]) as f32).sqrt();
        assert!(w.iter().all(|x| x.abs() <= bound), "{name} {dims:?}");
        let mean_abs = w.iter().map(|x| x.abs()).sum::<f32>() / w.len() as f32;
        if w.len() >= 256 {
            assert!(
                (mean_abs / bound - 0.5).abs() < 0.1,
                "{name} {dims:?}: {mean_abs}"
            );
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_network_whatever_else_draws() {
    let device = Device::default();
    check("mnist cnn", || {
        <PlainCnn as Network>::build(&PlainCnnConfig::mnist_cnn(), &device).unwrap()
    });
    check("resnet-20", || {
        CifarResNetConfig::new(20, 10)
            .unwrap()
            .init(&device)
            .unwrap()
    });
    check("tiny supernet", || {
        <SuperNet as Network>::build(&SuperNetConfig::tiny(16, 3, 4), &device).unwrap()
    });
}
