//! Two simple ways to choose which channels to keep, to compare DNAL with at equal MACs
//! (beyond the paper): every gated width scaled by one factor ([`uniform_architecture`]), and
//! the channels with the largest |BatchNorm gamma| under one global threshold, as network
//! slimming ranks them ([`magnitude_architecture`]). Both give an [`Architecture`] with the
//! same structural rules as DNAL's derivation (a main-path gate keeps at least its strongest
//! channel, a branch gate may close), priced by [`Network::arch_cost`].

use std::collections::BTreeMap;

use burn::module::{ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use dnal_core::{Architecture, GateKind, GateState, derive_from_states};

use crate::error::{Result, ZooError};
use crate::network::Network;

/// `beta` of the step-like gate states the choices are expressed as: `sigmoid(beta * a)` is 0
/// or 1 for the scores' margins.
const STEP: f64 = 1e9;

/// The architecture that keeps channel `c` of gate `g` when `score[g][c] > 0`, with DNAL's
/// derivation rules.
fn keep_positive(
    gates: &[(String, GateKind)],
    scores: &BTreeMap<String, Vec<f64>>,
) -> Result<Architecture> {
    let states: Vec<(String, GateState)> = gates
        .iter()
        .map(|(name, kind)| {
            let alpha = scores[name].clone();
            let state = GateState {
                kind: *kind,
                mask: vec![true; alpha.len()],
                alpha,
                temperature: STEP,
            };
            (name.clone(), state)
        })
        .collect();
    Ok(derive_from_states(
        states.iter().map(|(n, s)| (n.as_str(), s)),
        0.5,
    )?)
}

fn gate_kinds<N: Network>(net: &N) -> Vec<(String, GateKind)> {
    let mut gates = Vec::new();
    net.visit_gates(&mut |name, gate| gates.push((name.to_string(), gate.kind)));
    gates
}

/// Of the candidates `0..n` (ordered so that MACs do not fall as the index grows), the one whose
/// architecture's MACs are closest to `target` (the larger on a tie), found by bisection.
fn closest<N: Network>(
    net: &N,
    n: usize,
    target: u64,
    arch: impl Fn(usize) -> Result<Architecture>,
) -> Result<Architecture> {
    let macs = |i: usize| -> Result<u64> { Ok(net.arch_cost(&arch(i)?)?.macs) };
    let (mut lo, mut hi) = (0, n - 1);
    // The first candidate with MACs >= target, or the last.
    while lo < hi {
        let mid = (lo + hi) / 2;
        if macs(mid)? >= target {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let best = if lo > 0 && target.abs_diff(macs(lo - 1)?) < target.abs_diff(macs(lo)?) {
        lo - 1
    } else {
        lo
    };
    arch(best)
}

/// The architecture that keeps the first `ceil(factor * width)` channels (at least one) of
/// every gate: the network with every gated width scaled by `factor`, in `(0, 1]`.
pub fn scaled_architecture<N: Network>(net: &N, factor: f64) -> Result<Architecture> {
    if !(factor > 0.0 && factor <= 1.0) {
        return Err(ZooError::Config(format!(
            "a width factor must be in (0, 1], got {factor}"
        )));
    }
    let gates = gate_kinds(net);
    let mut scores = BTreeMap::new();
    net.visit_gates(&mut |name, gate| {
        let w = gate.channels();
        let keep = ((factor * w as f64).ceil() as usize).clamp(1, w.max(1));
        let s = (0..w).map(|c| if c < keep { 1.0 } else { -1.0 }).collect();
        scores.insert(name.to_string(), s);
    });
    keep_positive(&gates, &scores)
}

/// The architecture that keeps the first `ceil(r * width)` channels (at least one) of every
/// gate, `r` chosen among steps of 1/1000 so that its MACs are the closest to `target_macs`.
pub fn uniform_architecture<N: Network>(net: &N, target_macs: u64) -> Result<Architecture> {
    const STEPS: usize = 1000;
    closest(net, STEPS, target_macs, |i| {
        scaled_architecture(net, (i + 1) as f64 / STEPS as f64)
    })
}

/// The architecture that keeps the channels whose BatchNorm (the one each gate follows) has
/// the largest |gamma|, under one threshold for the whole network chosen so that its MACs are
/// the closest to `target_macs`.
pub fn magnitude_architecture<N: Network>(net: &N, target_macs: u64) -> Result<Architecture> {
    let gates = gate_kinds(net);
    let gammas = gate_gammas(net)?;
    let mut levels: Vec<f64> = gammas.values().flatten().copied().collect();
    levels.sort_by(f64::total_cmp);
    levels.dedup();
    // Candidate i keeps the values among the i + 1 largest distinct ones (the last, every
    // value). A dropped channel's score still grows with its |gamma|, so that a main-path gate
    // that loses every channel keeps its strongest, as DNAL's derivation does.
    let n = levels.len().max(1);
    closest(net, n, target_macs, |i| {
        let t = levels
            .get(levels.len().saturating_sub(i + 1))
            .copied()
            .unwrap_or(0.0);
        let scores = gammas
            .iter()
            .map(|(name, g)| {
                let s = g
                    .iter()
                    .map(|&v| if v >= t { 1.0 + v } else { v - t - 1.0 })
                    .collect();
                (name.clone(), s)
            })
            .collect();
        keep_positive(&gates, &scores)
    })
}

/// |gamma| of the BatchNorm each gate follows, by gate name: in every network of the zoo a gate
/// is the `gate` of a unit whose BatchNorm is its `bn`.
pub fn gate_gammas<N: Network>(net: &N) -> Result<BTreeMap<String, Vec<f64>>> {
    let mut alphas = BTreeMap::new();
    net.visit_gates(&mut |name, gate| {
        alphas.insert(gate.alpha_id(), name.to_string());
    });
    let mut visitor = Paths::default();
    net.visit(&mut visitor);
    let mut out = BTreeMap::new();
    for (unit, id) in &visitor.alphas {
        let Some(name) = alphas.get(id) else { continue };
        let gamma = visitor.gammas.get(unit).ok_or_else(|| {
            ZooError::Config(format!("gate `{name}` has no BatchNorm `{unit}.bn`"))
        })?;
        out.insert(name.clone(), gamma.iter().map(|v| v.abs()).collect());
    }
    if out.len() != alphas.len() {
        return Err(ZooError::Config(format!(
            "found the BatchNorm of {} of {} gates",
            out.len(),
            alphas.len()
        )));
    }
    Ok(out)
}

/// The module path of every gate's alpha and every BatchNorm's gamma, by the unit they are in.
#[derive(Default)]
struct Paths {
    path: Vec<String>,
    alphas: BTreeMap<String, ParamId>,
    gammas: BTreeMap<String, Vec<f64>>,
}

impl ModuleVisitor for Paths {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let n = self.path.len();
        if n < 2 {
            return;
        }
        let unit = self.path[..n - 2].join(".");
        match (self.path[n - 2].as_str(), self.path[n - 1].as_str()) {
            ("gate", "alpha") => {
                self.alphas.insert(unit, param.id);
            }
            ("bn", "gamma") => {
                let values = param.val().into_data().iter::<f64>().collect();
                self.gammas.insert(unit, values);
            }
            _ => {}
        }
    }
}
