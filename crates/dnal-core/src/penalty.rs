//! The sparsity penalty of the architecture stage.
//!
//! The paper's penalty is `lambda * sum over all gated channels of sigmoid(alpha_c)`. Beyond the
//! paper (no DNAL release has them): the same sum on `sigmoid(beta * alpha_c)`, a MACs-weighted
//! sum where each channel weighs what it costs, and a MACs target.

use std::collections::BTreeMap;

use burn::module::ParamId;
use burn::prelude::*;
use burn::tensor::activation::{relu, sigmoid};
use serde::{Deserialize, Serialize};

use crate::backend::BackendKind;
use crate::cost::{CostModel, Width};
use crate::error::{CoreError, Result};
use crate::gate::ChannelGate;
use crate::gated::GatedModel;

/// Which relaxation of a channel's presence the penalty sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relaxation {
    /// `sigmoid(alpha)`, as in the released code (the paper's penalty).
    #[default]
    Sigmoid,
    /// `sigmoid(beta * alpha)`, the gate value itself (beyond the paper).
    Tempered,
}

/// How channels are weighted in the sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// Every channel weighs 1 (the paper).
    #[default]
    Uniform,
    /// Each channel weighs the MACs it costs at full width, normalised to a mean of 1 over all
    /// gated channels, so that `lambda` keeps the paper's scale (beyond the paper).
    Macs,
}

/// A MACs budget (beyond the paper).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum MacsTarget {
    /// Penalise only the MACs above `fraction` of the full network's:
    /// `lambda / m * relu(F(s) - fraction * F_full)`, where `F(s)` is the network's MACs with
    /// each gate's width replaced by its soft width (the sum of its relaxed gate values), and
    /// `m` the mean marginal MACs of a channel, so a channel's gradient at full width is
    /// `lambda` times its MACs weight, as with [`Weighting::Macs`].
    Excess {
        /// Target MACs as a fraction of the full network's, in (0, 1].
        fraction: f64,
    },
    /// Keep the paper's penalty, and after every epoch move `lambda` toward the value that
    /// reaches the target: `lambda *= exp(rate * (current - fraction) / fraction)`, where
    /// `current` is the MACs fraction of the architecture derived at that point.
    Adaptive {
        /// Target MACs as a fraction of the full network's, in (0, 1].
        fraction: f64,
        /// How fast lambda moves (1.0 doubles lambda at about 70 % over the target).
        rate: f64,
    },
}

/// Configuration of the sparsity penalty.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PenaltyConfig {
    /// The penalty's coefficient (paper: 1e-5 ... 5e-4).
    pub lambda: f64,
    /// `sigmoid(alpha)` (paper) or `sigmoid(beta * alpha)`.
    #[serde(default)]
    pub relaxation: Relaxation,
    /// Uniform (paper) or MACs-weighted.
    #[serde(default)]
    pub weighting: Weighting,
    /// Optional MACs budget.
    #[serde(default)]
    pub target: Option<MacsTarget>,
}

impl PenaltyConfig {
    /// The paper's penalty with coefficient `lambda`.
    pub fn paper(lambda: f64) -> Self {
        Self {
            lambda,
            relaxation: Relaxation::Sigmoid,
            weighting: Weighting::Uniform,
            target: None,
        }
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, message: String| {
            Err(CoreError::InvalidValue {
                key: key.into(),
                message,
            })
        };
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return bad(
                "penalty.lambda",
                format!("{} must be finite and >= 0", self.lambda),
            );
        }
        match self.target {
            Some(MacsTarget::Excess { fraction }) | Some(MacsTarget::Adaptive { fraction, .. })
                if !(fraction > 0.0 && fraction <= 1.0) =>
            {
                bad(
                    "penalty.target.fraction",
                    format!("{fraction} is outside (0, 1]"),
                )
            }
            Some(MacsTarget::Adaptive { rate, .. }) if !(rate.is_finite() && rate > 0.0) => bad(
                "penalty.target.rate",
                format!("{rate} must be finite and > 0"),
            ),
            _ => Ok(()),
        }
    }

    fn needs_cost_model(&self) -> bool {
        self.weighting == Weighting::Macs || matches!(self.target, Some(MacsTarget::Excess { .. }))
    }
}

/// One gate's part of a penalty whose gradient is per channel ([`SparsityPenalty::gate_terms`]).
#[derive(Debug, Clone)]
pub struct GateTerm {
    /// The id of the gate's alpha.
    pub alpha_id: ParamId,
    /// Alpha's values, `[C]` (not tracked by autodiff).
    pub alpha: Tensor<1>,
    /// The gate's mask, `[C]`.
    pub mask: Tensor<1>,
    /// The penalty's coefficient times the gate's weight.
    pub coefficient: f64,
    /// The gate's temperature (`[1]`) where the penalty sums `sigmoid(beta * alpha)`; none for
    /// `sigmoid(alpha)`.
    pub temperature: Option<Tensor<1>>,
}

/// The penalty, ready to be added to the loss of the architecture stage.
#[derive(Debug, Clone)]
pub struct SparsityPenalty {
    config: PenaltyConfig,
    lambda: f64,
    weights: BTreeMap<String, f64>,
    cost: Option<CostModel>,
    full_macs: f64,
    mean_marginal: f64,
}

impl SparsityPenalty {
    /// Builds the penalty. `cost` is required by MACs weighting and by the `Excess` target.
    pub fn new(config: PenaltyConfig, cost: Option<&CostModel>) -> Result<Self> {
        config.validate()?;
        let mut penalty = Self {
            config,
            lambda: config.lambda,
            weights: BTreeMap::new(),
            cost: None,
            full_macs: 0.0,
            mean_marginal: 1.0,
        };
        if !config.needs_cost_model() {
            return Ok(penalty);
        }
        let cost = cost.ok_or_else(|| CoreError::InvalidValue {
            key: "penalty".into(),
            message: "MACs weighting and a MACs `excess` target need the model's cost model".into(),
        })?;
        cost.validate()?;
        let marginal = cost.marginal_macs();
        let channels: usize = cost.gates.values().sum();
        let total: f64 = marginal.iter().map(|(g, m)| m * cost.gates[g] as f64).sum();
        if channels == 0 || total <= 0.0 {
            return Err(CoreError::InvalidValue {
                key: "penalty".into(),
                message: "the cost model has no gated MACs to weight by".into(),
            });
        }
        penalty.mean_marginal = total / channels as f64;
        penalty.weights = marginal
            .into_iter()
            .map(|(g, m)| (g, m / penalty.mean_marginal))
            .collect();
        penalty.full_macs = cost.cost(None).macs as f64;
        penalty.cost = Some(cost.clone());
        Ok(penalty)
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &PenaltyConfig {
        &self.config
    }

    /// The current coefficient (changes only in the `Adaptive` target mode).
    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    /// The weight of one channel of `gate` (1 unless MACs-weighted).
    pub fn weight(&self, gate: &str) -> f64 {
        match self.config.weighting {
            Weighting::Uniform => 1.0,
            Weighting::Macs => self.weights.get(gate).copied().unwrap_or(1.0),
        }
    }

    fn relaxed(&self, gate: &ChannelGate) -> Tensor<1> {
        match self.config.relaxation {
            Relaxation::Sigmoid => sigmoid(gate.alpha.val()) * gate.mask.val(),
            Relaxation::Tempered => gate.search_factor(),
        }
    }

    /// Whether the penalty's gradient with respect to each alpha depends on that alpha alone
    /// (every mode but the MACs `excess` target, whose gradient goes through the network's soft
    /// MACs), so that [`Self::gate_terms`] describes it.
    pub fn per_channel(&self) -> bool {
        !matches!(self.config.target, Some(MacsTarget::Excess { .. }))
    }

    /// The penalty gate by gate, for adding its gradient to alpha's after the backward pass
    /// instead of through [`Self::loss`]: `sum over gates of coefficient * sum over channels of
    /// mask * sigmoid(temperature * alpha)`, the temperature 1 for the paper's relaxation.
    /// `None` where the gradient is not per channel ([`Self::per_channel`]).
    pub fn gate_terms<M: GatedModel>(&self, model: &M) -> Option<Vec<GateTerm>> {
        if !self.per_channel() {
            return None;
        }
        let mut terms = Vec::new();
        model.visit_gates(&mut |name, gate| {
            terms.push(GateTerm {
                alpha_id: gate.alpha_id(),
                alpha: gate.alpha.val().detach(),
                mask: gate.mask.val().detach(),
                coefficient: self.lambda * self.weight(name),
                temperature: (self.config.relaxation == Relaxation::Tempered)
                    .then(|| gate.temperature.val().detach()),
            })
        });
        Some(terms)
    }

    /// The penalty term for `model`'s gates (shape `[1]`), differentiable w.r.t. every alpha.
    pub fn loss<M: GatedModel>(&self, model: &M) -> Tensor<1> {
        let mut relaxed: Vec<(String, Tensor<1>)> = Vec::new();
        model.visit_gates(&mut |name, gate| relaxed.push((name.to_string(), self.relaxed(gate))));
        let device = match relaxed.first() {
            Some((_, t)) => t.device(),
            None => {
                // No gates: a zero on the device of the model's parameters.
                let device = model.devices().into_iter().next();
                return Tensor::zeros([1], &device.unwrap_or_else(BackendKind::host_device));
            }
        };
        if let (Some(MacsTarget::Excess { fraction }), Some(cost)) =
            (self.config.target, &self.cost)
        {
            let soft: BTreeMap<String, Tensor<1>> =
                relaxed.into_iter().map(|(n, t)| (n, t.sum())).collect();
            let macs = soft_macs(cost, &soft, &device);
            let excess = relu(macs.sub_scalar(fraction * self.full_macs));
            return excess.mul_scalar(self.lambda / self.mean_marginal);
        }
        let mut total = Tensor::zeros([1], &device);
        for (name, t) in relaxed {
            total = total + t.sum().mul_scalar(self.weight(&name));
        }
        total.mul_scalar(self.lambda)
    }

    /// After an epoch, in the `Adaptive` target mode, moves lambda toward the target given the
    /// MACs fraction of the currently derived architecture. Returns the new lambda.
    pub fn adapt(&mut self, macs_fraction: f64) -> f64 {
        if let Some(MacsTarget::Adaptive { fraction, rate }) = self.config.target
            && macs_fraction.is_finite()
        {
            let step = (rate * (macs_fraction - fraction) / fraction).clamp(-5.0, 5.0);
            let base = self.config.lambda.max(f64::MIN_POSITIVE);
            self.lambda = (self.lambda * step.exp()).clamp(base * 1e-3, base * 1e3);
        }
        self.lambda
    }

    /// Restores a lambda saved in a checkpoint.
    pub fn set_lambda(&mut self, lambda: f64) {
        self.lambda = lambda;
    }
}

/// The network's MACs with each gate's width replaced by `widths[gate]` (a `[1]` tensor).
pub fn soft_macs(
    cost: &CostModel,
    widths: &BTreeMap<String, Tensor<1>>,
    device: &Device,
) -> Tensor<1> {
    let mut total = Tensor::zeros([1], device);
    for term in cost.macs_terms() {
        let mut constant = term.coef;
        let mut product: Option<Tensor<1>> = None;
        for factor in &term.factors {
            let soft = match factor {
                Width::Fixed(_) => None,
                Width::Gate(g) => widths.get(g).cloned(),
            };
            match soft {
                Some(t) => product = Some(product.map_or(t.clone(), |p| p * t)),
                None => {
                    constant *= match factor {
                        Width::Fixed(n) => *n as f64,
                        Width::Gate(g) => cost.gates.get(g).copied().unwrap_or(0) as f64,
                    }
                }
            }
        }
        total = match product {
            Some(p) => total + p.mul_scalar(constant),
            None => total.add_scalar(constant),
        };
    }
    total
}
