//! The comparison methods' architectures: |gamma| is found for every gate of every family, the
//! magnitude choice keeps the largest values, and both land at the MACs asked for.

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use dnal_zoo::compare::{
    gate_gammas, magnitude_architecture, scaled_architecture, uniform_architecture,
};
use dnal_zoo::*;

mod common;
use common::*;

/// Every gate's BatchNorm is found, with one |gamma| per channel, in every family.
#[test]
fn every_family_exposes_the_gamma_of_every_gate() {
    let d = device();
    fn check<N: Network>(net: &N) {
        let gammas = gate_gammas(net).unwrap();
        let mut widths = Vec::new();
        net.visit_gates(&mut |name, gate| widths.push((name.to_string(), gate.channels())));
        assert_eq!(gammas.len(), widths.len());
        for (name, width) in widths {
            assert_eq!(gammas[&name].len(), width, "{name}");
        }
    }
    check(&PlainCnnConfig::mnist_cnn().init(&d).unwrap());
    check(&CifarResNetConfig::new(20, 10).unwrap().init(&d).unwrap());
    check(&MobileNetV2Config::cifar(10).init(&d).unwrap());
    check(&SuperNetConfig::tiny(16, 3, 10).init(&d).unwrap());
    check(
        &BottleneckResNetConfig::new(vec![1, 1, 1, 1], 10)
            .unwrap()
            .init(&d)
            .unwrap(),
    );
}

/// Scaling by a factor keeps the first `ceil(factor * width)` channels of every gate (at least
/// one) in every family, all of them at 1, and a factor outside (0, 1] is refused.
#[test]
fn scaling_keeps_the_first_channels_of_every_gate() {
    let d = device();
    fn check<N: Network>(net: &N) {
        let mut widths = Vec::new();
        net.visit_gates(&mut |name, gate| widths.push((name.to_string(), gate.channels())));
        for factor in [1.0, 0.5, 0.3, 1e-6] {
            let arch = scaled_architecture(net, factor).unwrap();
            for (name, width) in &widths {
                let keep = ((factor * *width as f64).ceil() as usize).max(1);
                let want: Vec<usize> = (0..keep).collect();
                assert_eq!(arch.gates[name].kept, want, "{name} at {factor}");
            }
        }
        for factor in [0.0, -0.5, 1.01, f64::NAN, f64::INFINITY] {
            assert!(scaled_architecture(net, factor).is_err(), "{factor}");
        }
    }
    check(&PlainCnnConfig::mnist_cnn().init(&d).unwrap());
    check(&CifarResNetConfig::new(20, 10).unwrap().init(&d).unwrap());
    check(&MobileNetV2Config::cifar(10).init(&d).unwrap());
    check(&SuperNetConfig::tiny(16, 3, 10).init(&d).unwrap());
}

/// Replaces every BatchNorm gamma by distinct pseudo-random values (a fresh network's are all 1,
/// so nothing would rank them).
struct RandomGammas {
    path: Vec<String>,
    seed: u64,
}

impl ModuleMapper for RandomGammas {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.path.last().map(String::as_str) != Some("gamma") {
            return param;
        }
        let (id, value, _) = param.consume();
        let n = value.shape().num_elements();
        self.seed += 1;
        let values = noise(n, self.seed, 0.1, 2.0);
        let t = Tensor::<1>::from_data(TensorData::new(values, [n]), &value.device());
        Param::initialized(id, t.reshape(value.shape()))
    }
}

/// Both choices come within a few percent of the MACs asked for, fewer MACs as the target falls.
#[test]
fn both_choices_land_at_the_target_macs() {
    let net = CifarResNetConfig::new(20, 10)
        .unwrap()
        .init(&device())
        .unwrap();
    let net = net.map(&mut RandomGammas {
        path: Vec::new(),
        seed: 7,
    });
    let full = net.cost_model().cost(None).macs;
    let mut last = (u64::MAX, u64::MAX);
    for fraction in [0.6, 0.3, 0.1] {
        let target = (full as f64 * fraction) as u64;
        let u = net
            .arch_cost(&uniform_architecture(&net, target).unwrap())
            .unwrap()
            .macs;
        let m = net
            .arch_cost(&magnitude_architecture(&net, target).unwrap())
            .unwrap()
            .macs;
        for (what, macs) in [("uniform", u), ("magnitude", m)] {
            let off = (macs as f64 - target as f64).abs() / target as f64;
            assert!(off < 0.05, "{what}: {macs} MACs for a target of {target}");
        }
        assert!(u < last.0 && m < last.1);
        last = (u, m);
    }
}

/// On a network whose gammas are set by hand, the magnitude choice keeps exactly the channels
/// above its threshold, across layers, and a main-path layer with none keeps its strongest.
#[test]
fn magnitude_keeps_the_largest_gammas_network_wide() {
    let d = device();
    let mut net = PlainCnnConfig::mnist_cnn().init(&d).unwrap();
    for (i, unit) in net.convs.iter_mut().enumerate() {
        let c = unit.out_channels();
        // Layer 0 holds the largest values, layer 3 the smallest.
        let values: Vec<f32> = (0..c)
            .map(|k| (4 - i) as f32 + k as f32 / c as f32)
            .collect();
        let gamma = Tensor::<1>::from_data(TensorData::new(values, [c]), &d);
        unit.bn.gamma = Param::from_tensor(gamma);
    }
    // Keep layer 0 whole: the MACs with only conv0's 32 channels and one of each other layer.
    let mut keep_first = dnal_core::Architecture::full(&net);
    for (name, g) in keep_first.gates.iter_mut() {
        if name != "conv0" {
            g.kept = vec![g.width - 1];
        }
    }
    let target = net.arch_cost(&keep_first).unwrap().macs;
    let arch = magnitude_architecture(&net, target).unwrap();
    assert_eq!(arch.gates["conv0"].kept, (0..32).collect::<Vec<_>>());
    for name in ["conv1", "conv2", "conv3"] {
        let g = &arch.gates[name];
        assert_eq!(
            g.kept,
            vec![g.width - 1],
            "{name} keeps its strongest channel"
        );
        assert!(g.forced_open);
    }
}
