//! The channel-wise module layer of DNAL: one learnable `alpha` per channel.

use burn::module::{Param, ParamId};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::sigmoid;
use serde::{Deserialize, Serialize};

/// What a [`ChannelGate`] does in its forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateMode {
    /// `y = x`: the weight stage, before any architecture is learned.
    #[default]
    Bypass,
    /// `y = x * sigmoid(beta * alpha) * mask`: the architecture stage.
    Search,
    /// `y = x * mask`: after derivation, no sigmoid.
    Masked,
}

/// Where a gate sits in the network, which decides whether it may close completely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateKind {
    /// On the main path: closing every channel would cut the network in two, so derivation
    /// keeps at least the strongest channel.
    #[default]
    Main,
    /// On a residual branch: it may close completely, and the block becomes an identity.
    Branch,
}

/// Configuration of a [`ChannelGate`].
#[derive(Config, Debug)]
pub struct ChannelGateConfig {
    /// Number of channels the gate governs.
    pub channels: usize,
    /// Whether the gate sits on the main path or on a residual branch.
    #[config(default = "GateKind::Main")]
    pub kind: GateKind,
    /// Initial value of every `alpha` (the architecture stage resets it to 0).
    #[config(default = 0.0)]
    pub alpha_init: f64,
    /// Initial temperature `beta`.
    #[config(default = 1.0)]
    pub temperature: f64,
}

impl ChannelGateConfig {
    /// Builds a gate in [`GateMode::Bypass`] with every channel open.
    pub fn init(&self, device: &Device) -> ChannelGate {
        let c = self.channels;
        ChannelGate {
            alpha: Param::from_tensor(Tensor::full([c], self.alpha_init, device)),
            mask: frozen(Tensor::ones([c], device)),
            temperature: frozen(Tensor::full([1], self.temperature, device)),
            kind: self.kind,
            mode: GateMode::Bypass,
        }
    }
}

/// A gate `sigmoid(beta * alpha_c) * m_c` on every channel `c` of its input.
///
/// `alpha` is trainable; the binary `mask` and the temperature `beta` are recorded with the
/// model but never receive gradients. The temperature is named `temperature`, not `beta`,
/// so that it is never confused with BatchNorm's shift parameter of that name.
#[derive(Module, Debug)]
pub struct ChannelGate {
    /// One architecture parameter per channel.
    pub alpha: Param<Tensor<1>>,
    /// 1 for a channel that exists, 0 for one removed by derivation.
    pub mask: Param<Tensor<1>>,
    /// The continuation temperature `beta`, shape `[1]`.
    pub temperature: Param<Tensor<1>>,
    /// Main path or residual branch; fixed by the model.
    #[module(skip)]
    pub kind: GateKind,
    /// What the forward pass does.
    #[module(skip)]
    pub mode: GateMode,
}

fn frozen(t: Tensor<1>) -> Param<Tensor<1>> {
    Param::from_tensor(t).set_require_grad(false)
}

impl ChannelGate {
    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.alpha.dims()[0]
    }

    /// Applies the gate to `[N, C]` or `[N, C, H, W]` (any rank >= 2, channels on axis 1).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let Some(factor) = self.factor() else {
            return x;
        };
        let mut shape = [1usize; D];
        shape[1] = self.channels();
        let factor = factor.reshape(shape);
        match x.dtype() {
            dtype if dtype == factor.dtype() => x * factor,
            dtype => x * factor.cast(dtype),
        }
    }

    /// The per-channel factor the forward pass multiplies by: `None` in bypass, the mask when
    /// masked, [`search_factor`](Self::search_factor) in search. A layer that can fold a factor
    /// into its own affine transform (BatchNorm) takes this instead of calling
    /// [`forward`](Self::forward).
    pub fn factor(&self) -> Option<Tensor<1>> {
        match self.mode {
            GateMode::Bypass => None,
            GateMode::Search => Some(self.search_factor()),
            GateMode::Masked => Some(self.mask.val()),
        }
    }

    /// `sigmoid(beta * alpha) * mask`, computed in f32 whatever the model's precision, so that
    /// `beta * alpha` of 1e6 and more stays finite in value and gradient.
    pub fn search_factor(&self) -> Tensor<1> {
        let alpha = to_f32(self.alpha.val());
        let beta = to_f32(self.temperature.val());
        sigmoid(alpha * beta) * to_f32(self.mask.val())
    }

    /// The temperature `beta` currently stored in the gate.
    pub fn temperature(&self) -> f64 {
        scalars(self.temperature.val())[0]
    }

    /// Sets the temperature (a frozen, recorded value).
    pub fn with_temperature(mut self, beta: f64) -> Self {
        self.temperature = self
            .temperature
            .map(|old| Tensor::full([1], beta, &old.device()));
        self
    }

    /// Sets the forward mode.
    pub fn with_mode(mut self, mode: GateMode) -> Self {
        self.mode = mode;
        self
    }

    /// Resets every `alpha` to `value` (0 when the architecture stage begins), keeping its ParamId.
    pub fn with_alpha(mut self, value: f64) -> Self {
        let c = self.channels();
        self.alpha = self.alpha.map(|old| {
            let trainable = old.is_require_grad();
            Tensor::full([c], value, &old.device()).set_require_grad(trainable)
        });
        self
    }

    /// Replaces the binary mask; `keep[c]` is whether channel `c` exists.
    pub fn with_mask(mut self, keep: &[bool]) -> Self {
        assert_eq!(
            keep.len(),
            self.channels(),
            "mask length must equal the gate width"
        );
        let values: Vec<f32> = keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
        let data = TensorData::new(values, [keep.len()]);
        self.mask = self.mask.map(|old| Tensor::from_data(data, &old.device()));
        self
    }

    /// The gate for one step with its factor given: its forward pass multiplies by `factor`
    /// (`[C]`) instead of computing [`search_factor`](Self::search_factor). A step that computes
    /// every searching gate's factor outside autodiff hands each in as an autodiff leaf and
    /// carries the leaf's gradient to alpha itself. The gate is masked with `factor` as its
    /// mask (under a new ParamId): a gate for that step's forward pass only, never to be saved.
    pub fn with_factor(mut self, factor: Tensor<1>) -> Self {
        self.mask = Param::from_tensor(factor);
        self.mode = GateMode::Masked;
        self
    }

    /// The ParamId of `alpha`, for the architecture optimiser.
    pub fn alpha_id(&self) -> ParamId {
        self.alpha.id
    }

    /// Reads `alpha`, `mask` and `beta` back to the host.
    pub fn state(&self) -> GateState {
        GateState {
            kind: self.kind,
            alpha: scalars(self.alpha.val()),
            mask: scalars(self.mask.val())
                .into_iter()
                .map(|m| m > 0.5)
                .collect(),
            temperature: self.temperature(),
        }
    }
}

/// A host copy of one gate, as derivation and reports need it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateState {
    /// Main path or residual branch.
    pub kind: GateKind,
    /// `alpha` per channel.
    pub alpha: Vec<f64>,
    /// Whether each channel still exists.
    pub mask: Vec<bool>,
    /// The temperature `beta`.
    pub temperature: f64,
}

impl GateState {
    /// `sigmoid(beta * alpha_c)` per channel (0 for a masked channel), evaluated stably in f64.
    pub fn openness(&self) -> Vec<f64> {
        self.alpha
            .iter()
            .zip(&self.mask)
            .map(|(&a, &m)| {
                if m {
                    stable_sigmoid(self.temperature * a)
                } else {
                    0.0
                }
            })
            .collect()
    }
}

/// `1 / (1 + e^-x)` without overflow for any finite `x`.
pub fn stable_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn to_f32<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    if t.dtype() == DType::F32 {
        t
    } else {
        t.cast(DType::F32)
    }
}

/// A small tensor's values as f64 on the host.
pub(crate) fn scalars<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data()
        .try_into_vec_as::<f64>()
        .expect("a float tensor converts to f64")
}
