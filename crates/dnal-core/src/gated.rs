//! Networks whose channels are governed by [`ChannelGate`]s, and what a trainer does to all of
//! their gates at once.

use std::collections::BTreeSet;

use burn::module::{Module, ParamId};

use crate::gate::{ChannelGate, GateMode, GateState};

/// A network with named channel gates.
///
/// Models implement one traversal, [`Self::for_each_gate`]; every operation a trainer needs
/// (read the gates, set the mode or `beta`, reset `alpha`, list the alpha ParamIds, apply an
/// architecture) is provided on top of it, so it is written once for every model.
pub trait GatedModel: Module + Sized {
    /// Calls `f` on every gate with its stable name (e.g. `stage1.block0.conv1`), in network
    /// order; `f` may replace the gate.
    fn for_each_gate(&mut self, f: &mut dyn FnMut(&str, &mut ChannelGate));

    /// Calls `f` on every gate with its name, in the order of [`Self::for_each_gate`].
    fn visit_gates(&self, f: &mut dyn FnMut(&str, &ChannelGate)) {
        // The walk takes `&mut`; a clone of a module shares its tensors, nothing is copied.
        self.clone().for_each_gate(&mut |name, gate| f(name, gate));
    }

    /// Rebuilds the model with `f` applied to every gate, in the order of
    /// [`Self::for_each_gate`].
    fn map_gates(mut self, f: &mut dyn FnMut(&str, ChannelGate) -> ChannelGate) -> Self {
        self.for_each_gate(&mut |name, gate| *gate = f(name, gate.clone()));
        self
    }

    /// Names of all gates, in network order.
    fn gate_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        self.visit_gates(&mut |name, _| names.push(name.to_string()));
        names
    }

    /// Host copies of every gate, in network order.
    fn gate_states(&self) -> Vec<(String, GateState)> {
        let mut states = Vec::new();
        self.visit_gates(&mut |name, gate| states.push((name.to_string(), gate.state())));
        states
    }

    /// Total number of gated channels (masked ones included).
    fn gated_channels(&self) -> usize {
        let mut n = 0;
        self.visit_gates(&mut |_, gate| n += gate.channels());
        n
    }

    /// The ParamIds of every gate's `alpha`, for an optimiser of their own.
    fn alpha_ids(&self) -> Vec<ParamId> {
        let mut ids = Vec::new();
        self.visit_gates(&mut |_, gate| ids.push(gate.alpha_id()));
        ids
    }

    /// Sets every gate's forward mode.
    fn with_gate_mode(self, mode: GateMode) -> Self {
        self.map_gates(&mut |_, gate| gate.with_mode(mode))
    }

    /// Sets every gate's temperature `beta`.
    fn with_temperature(self, beta: f64) -> Self {
        self.map_gates(&mut |_, gate| gate.with_temperature(beta))
    }

    /// Resets every gate's `alpha` (to 0 when the architecture stage begins).
    fn with_alpha(self, value: f64) -> Self {
        self.map_gates(&mut |_, gate| gate.with_alpha(value))
    }

    /// Whether any two gates share a name (a model bug that would make architectures ambiguous).
    fn duplicate_gate_names(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        let mut dups = Vec::new();
        self.visit_gates(&mut |name, _| {
            if !seen.insert(name.to_string()) {
                dups.push(name.to_string());
            }
        });
        dups
    }
}
