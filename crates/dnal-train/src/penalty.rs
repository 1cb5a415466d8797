//! Where a searching step's sparsity penalty enters. Through autodiff (in the loss), it costs a
//! reduction and a few element-wise operations per gate each way, and an addition per gate
//! where its gradient meets the gate's own: about 135 launches of ResNet-56's search step on
//! wgpu. Where its gradient is per channel (every mode but the MACs `excess` target) and
//! alpha lives on cuda or wgpu, it is instead added to alpha's gradients after the backward
//! pass, every gate in one operation ([`dnal_kernels::penalty_gradients`]); the step is the
//! same up to float rounding.

use burn::optim::GradientsParams;
use burn::prelude::*;
use dnal_core::{GatedModel, SparsityPenalty};
use dnal_kernels::{PenaltyTerm, gate_operations_fold, penalty_gradients};

/// Whether `net`'s searching steps add `penalty`'s gradient with [`add_gradients`] rather than
/// through the loss.
pub fn folds<M: GatedModel>(penalty: &SparsityPenalty, net: &M) -> bool {
    let mut alpha = None;
    net.visit_gates(&mut |_, gate| {
        alpha.get_or_insert_with(|| gate.alpha.val());
    });
    penalty.per_channel() && alpha.is_some_and(|a| gate_operations_fold(&a))
}

/// Adds the gradient of `penalty` at `net`'s alphas to their gradients in `grads` (a gate
/// without one gets the penalty's alone) and returns the penalty, `[1]` on `net`'s device (not
/// tracked by autodiff). For a penalty whose gradient is per channel
/// ([`SparsityPenalty::per_channel`]).
pub fn add_gradients<M: GatedModel>(
    penalty: &SparsityPenalty,
    net: &M,
    grads: &mut GradientsParams,
) -> Tensor<1> {
    let gates = penalty
        .gate_terms(net)
        .expect("add_gradients takes a penalty whose gradient is per channel");
    if gates.is_empty() {
        // No gates: the penalty's own zero on the network's device.
        return penalty.loss(net).detach();
    }
    let mut ids = Vec::with_capacity(gates.len());
    let terms = gates
        .into_iter()
        .map(|g| {
            let alpha = g.alpha.inner();
            let grad = grads
                .remove::<1>(g.alpha_id)
                .unwrap_or_else(|| alpha.zeros_like());
            ids.push(g.alpha_id);
            PenaltyTerm {
                alpha,
                grad,
                mask: g.mask.inner(),
                coefficient: g.coefficient,
                temperature: g.temperature.map(Tensor::inner),
            }
        })
        .collect();
    let (added, value) = penalty_gradients(terms);
    for (id, grad) in ids.into_iter().zip(added) {
        grads.register(id, grad);
    }
    Tensor::from_inner(value)
}
