//! A searching step's gate factors as autodiff leaves. Each searching gate's factor `mask *
//! sigmoid(beta * alpha)` is computed before the forward pass, every gate in one operation
//! ([`dnal_kernels::gate_factors`]), and handed to its gate as a leaf; after the backward pass
//! the leaves' gradients are carried to alpha's by the chain's closed form, again in one
//! operation ([`dnal_kernels::factor_gradients`]). Through autodiff each gate's chain is a
//! fused launch of its own forward and another backward on cuda and wgpu (the BatchNorm
//! operation the factor feeds keeps fusion from merging them): about 70 launches of
//! ResNet-56's search step. The step is the same up to float rounding.

use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Gradients;
use dnal_core::{GateMode, GatedModel};
use dnal_kernels::{GateChain, factor_gradients, gate_factors, gate_operations_fold};

/// Whether `net`'s steps take their searching gates' factors as leaves: there are searching
/// gates, and their alphas are f32 on cuda or wgpu with dnal's kernels on.
pub fn fold<M: GatedModel>(net: &M) -> bool {
    let mut alpha = None;
    net.visit_gates(&mut |_, gate| {
        if gate.mode == GateMode::Search {
            alpha.get_or_insert_with(|| gate.alpha.val());
        }
    });
    alpha.is_some_and(|a| gate_operations_fold(&a))
}

/// The leaves a step's network holds in place of its searching gates' factors.
pub struct Leaves {
    /// Per searching gate: its alpha's id, its chain, and the leaf its forward pass used.
    gates: Vec<(ParamId, GateChain, Tensor<1>)>,
}

/// `net` with every searching gate's factor computed and given as an autodiff leaf (the
/// network for one step's forward pass; its BatchNorm running statistics are `net`'s), and the
/// leaves. Drop the network before the optimisers step: it holds alpha too, and SGD writes a
/// parameter in place only where nothing else holds it (a step recorded as a graph reads
/// alpha where the first step left it).
pub fn install<M: GatedModel>(net: &M) -> (M, Leaves) {
    let mut ids = Vec::new();
    let mut chains = Vec::new();
    net.visit_gates(&mut |_, gate| {
        if gate.mode == GateMode::Search {
            ids.push(gate.alpha_id());
            chains.push(GateChain {
                alpha: gate.alpha.val().inner(),
                mask: gate.mask.val().inner(),
                temperature: gate.temperature.val().inner(),
            });
        }
    });
    let mut factors = gate_factors(&chains).into_iter();
    let mut leaves = Vec::with_capacity(chains.len());
    let step = net.clone().map_gates(&mut |_, gate| {
        if gate.mode != GateMode::Search {
            return gate;
        }
        let factor = factors.next().expect("one factor per searching gate");
        let gate = gate.with_factor(Tensor::from_inner(factor).require_grad());
        // The leaf as the gate holds it, which is what the graph records.
        leaves.push(gate.mask.val());
        gate
    });
    let gates = ids
        .into_iter()
        .zip(chains)
        .zip(leaves)
        .map(|((id, chain), leaf)| (id, chain, leaf))
        .collect();
    (step, Leaves { gates })
}

impl Leaves {
    /// Takes the leaves' gradients out of the backward pass's `grads` and carries them to
    /// alpha: alpha's gradient through each searching gate's factor.
    pub fn alpha_gradients(self, grads: &mut Gradients) -> AlphaGradients {
        let mut ids = Vec::with_capacity(self.gates.len());
        let mut chains = Vec::with_capacity(self.gates.len());
        let mut dfactors = Vec::with_capacity(self.gates.len());
        for (id, chain, leaf) in self.gates {
            // A gate whose layer did not run gets none.
            let df = leaf
                .grad_remove(grads)
                .unwrap_or_else(|| chain.alpha.zeros_like());
            ids.push(id);
            chains.push(chain);
            dfactors.push(df);
        }
        let grads = factor_gradients(&chains, dfactors)
            .into_iter()
            .zip(&chains)
            .map(|(g, chain)| g.cast(chain.alpha.dtype()));
        AlphaGradients {
            grads: ids.into_iter().zip(grads).collect(),
        }
    }
}

/// Alpha's gradients through the searching gates' factors, by alpha's id.
pub struct AlphaGradients {
    grads: Vec<(ParamId, Tensor<1>)>,
}

impl AlphaGradients {
    /// Adds them to alpha's gradients in `grads` (a gate without one gets its own alone).
    pub fn add_to(self, grads: &mut GradientsParams) {
        for (id, grad) in self.grads {
            let grad = match grads.remove::<1>(id) {
                Some(held) => held + grad,
                None => grad,
            };
            grads.register(id, grad);
        }
    }
}
