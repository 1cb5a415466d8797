//! DNAL's core on a problem small enough to read in one screen.
//!
//! A two-layer network sees 32 input features, of which only 4 decide the label. Gates sit on
//! the inputs and on the 64 hidden units. The weight stage trains the network with the gates
//! in bypass; the architecture stage freezes the weights and learns one `alpha` per channel
//! under the paper's penalty while `beta` rises from 1 to 10^4; derivation keeps the channels
//! whose gate exceeds 0.9; a short final stage trains the derived network's weights. The
//! derived network keeps the 4 informative inputs and a few hidden units, with a fraction of
//! the MACs.
//!
//! Run: `cargo xtask demo` (or `cargo run --release -p dnal-core --example gate_demo`).

use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, GradientsParams, SgdConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;
use dnal_core::*;

const INPUTS: usize = 32;
const HIDDEN: usize = 64;
const INFORMATIVE: [usize; 4] = [3, 11, 19, 27];

#[derive(Module, Debug)]
struct Net {
    inputs: ChannelGate,
    fc1: Linear,
    hidden: ChannelGate,
    fc2: Linear,
}

impl Net {
    fn new(device: &Device) -> Self {
        Self {
            inputs: ChannelGateConfig::new(INPUTS).init(device),
            fc1: LinearConfig::new(INPUTS, HIDDEN).init(device),
            hidden: ChannelGateConfig::new(HIDDEN).init(device),
            fc2: LinearConfig::new(HIDDEN, 2).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = self
            .hidden
            .forward(self.fc1.forward(self.inputs.forward(x)));
        self.fc2.forward(relu(h))
    }

    fn cost_model() -> CostModel {
        let mut cost = CostModel::new();
        cost.gate("inputs", INPUTS).gate("hidden", HIDDEN);
        cost.linear("fc1", Width::gate("inputs"), Width::gate("hidden"))
            .linear("fc2", Width::gate("hidden"), Width::Fixed(2));
        cost
    }
}

impl GatedModel for Net {
    fn for_each_gate(&mut self, f: &mut dyn FnMut(&str, &mut ChannelGate)) {
        f("inputs", &mut self.inputs);
        f("hidden", &mut self.hidden);
    }
}

/// `n` samples: standard normal features; label 1 iff x3 + x11 - x19 + x27 > 0.
fn data(n: usize, device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    let x = Tensor::<2>::random(
        [n, INPUTS],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        device,
    );
    let signs = [1.0f32, 1.0, -1.0, 1.0];
    let mut w = vec![0.0f32; INPUTS];
    for (i, s) in INFORMATIVE.iter().zip(signs) {
        w[*i] = s;
    }
    let w = Tensor::<1>::from_data(TensorData::new(w, [INPUTS]), device);
    let score = (x.clone() * w.unsqueeze::<2>()).sum_dim(1).squeeze::<1>();
    (x, score.greater_elem(0.0).int())
}

fn accuracy(net: &Net, x: Tensor<2>, y: Tensor<1, Int>) -> f64 {
    let n = y.dims()[0] as f64;
    let correct = net.forward(x).argmax(1).squeeze::<1>().equal(y).int().sum();
    correct.into_scalar::<i64>() as f64 / n
}

/// What the demo found.
pub struct Outcome {
    /// Indices of the inputs the derived network keeps.
    pub kept_inputs: Vec<usize>,
    /// MACs before and after derivation.
    pub macs: (u64, u64),
    /// Test accuracy of the dense network and of the derived one after its final stage.
    pub accuracy: (f64, f64),
}

#[allow(dead_code)] // the integration test runs `run` without `main`
fn main() {
    run();
}

/// Runs the demo, printing each stage, and returns what it found.
pub fn run() -> Outcome {
    let device = Device::flex().autodiff();
    device.seed(7);
    let (x_train, y_train) = data(4096, &device);
    let (x_test, y_test) = data(1024, &device);
    let ce = CrossEntropyLossConfig::new().init(&device);
    let batches = |epoch: usize| {
        (0..4096 / 128).map(move |b| {
            let start = ((b + epoch * 7) % 32) * 128;
            start..start + 128
        })
    };

    // 1. Weight stage: gates in bypass.
    // Trains the weights with Adam (in masked and bypass mode, alpha receives no gradient).
    let train_weights = |mut net: Net, epochs: usize| {
        let mut adam = AdamConfig::new().init();
        for epoch in 0..epochs {
            for r in batches(epoch) {
                let x = x_train.clone().slice([r.clone(), 0..INPUTS]);
                let loss = ce.forward(net.forward(x), y_train.clone().slice([r]));
                let grads = GradientsParams::from_grads(loss.backward(), &net);
                net = adam.step(1e-2, net, grads);
            }
        }
        net
    };
    let net = train_weights(Net::new(&device), 10);
    let dense_acc = accuracy(&net.valid(), x_test.clone(), y_test.clone());
    println!(
        "weight stage:       test accuracy {:.1} %",
        100.0 * dense_acc
    );

    // 2. Architecture stage: alpha from 0, weights frozen, beta 1 -> 1e4 over 10 epochs.
    let schedule = Continuation::default();
    let penalty = SparsityPenalty::new(PenaltyConfig::paper(5e-2), None).expect("valid penalty");
    let mut net = net.with_alpha(0.0).with_gate_mode(GateMode::Search);
    let alpha_ids = net.alpha_ids();
    let mut sgd = SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_dampening(0.0)))
        .init();
    let epochs = 10;
    for epoch in 0..epochs {
        net = net.with_temperature(schedule.value(epoch, epochs));
        for r in batches(epoch) {
            let x = x_train.clone().slice([r.clone(), 0..INPUTS]);
            let loss = ce.forward(net.forward(x), y_train.clone().slice([r])) + penalty.loss(&net);
            let mut grads = loss.backward();
            let alpha_grads = GradientsParams::from_params(&mut grads, &net, &alpha_ids);
            net = sgd.step(0.1, net, alpha_grads);
        }
        let arch = derive_architecture(&net, DEFAULT_THRESHOLD).expect("valid threshold");
        println!(
            "architecture epoch {epoch}: beta {:>8.1}, open inputs {:>2}, open hidden {:>2}",
            schedule.value(epoch, epochs),
            arch.kept_width("inputs").unwrap_or(0),
            arch.kept_width("hidden").unwrap_or(0),
        );
    }

    // 3. Derivation.
    let arch = derive_architecture(&net, DEFAULT_THRESHOLD).expect("valid threshold");
    let net = arch
        .apply_masks(net)
        .expect("architecture derived from this model");
    println!("\n{}\n", arch.summary());
    println!(
        "kept inputs: {:?} (informative: {INFORMATIVE:?})",
        arch.gates["inputs"].kept
    );
    let cost = Net::cost_model();
    let (before, after) = (cost.cost(None), cost.cost(Some(&arch)));
    println!("\n{after}\n");
    let derived_acc = accuracy(&net.valid(), x_test.clone(), y_test.clone());

    // 4. Final stage: train the weights of the derived network (gates masked) a little more.
    let net = train_weights(net, 5);
    let final_acc = accuracy(&net.valid(), x_test, y_test);
    println!(
        "MACs {} -> {} ({:.1}x fewer), params {} -> {}",
        before.macs,
        after.macs,
        before.macs as f64 / after.macs.max(1) as f64,
        before.params,
        after.params,
    );
    println!(
        "test accuracy: dense {:.1} %, right after derivation {:.1} %, after the final stage {:.1} %",
        100.0 * dense_acc,
        100.0 * derived_acc,
        100.0 * final_acc
    );
    Outcome {
        kept_inputs: arch.gates["inputs"].kept.clone(),
        macs: (before.macs, after.macs),
        accuracy: (dense_acc, final_acc),
    }
}
