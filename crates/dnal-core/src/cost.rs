//! The MACs/parameters cost model (`docs/METHOD.md` §5): multiply-accumulates of conv and linear
//! layers over kept channels, parameters including the two BatchNorm parameters per channel.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::architecture::Architecture;
use crate::error::{CoreError, Result};

/// A number of channels: fixed, or whatever a gate keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Width {
    /// Not gated (e.g. the 3 input channels, or the classes of a classifier).
    Fixed(usize),
    /// The channels kept by the named gate.
    Gate(String),
}

impl Width {
    /// Shorthand for [`Width::Gate`].
    pub fn gate(name: impl Into<String>) -> Self {
        Width::Gate(name.into())
    }
}

/// Grouping of a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Groups {
    /// A fixed number of groups (1 for an ordinary convolution).
    Count(usize),
    /// One group per channel: input and output widths are the same channels.
    Depthwise,
}

/// What a layer computes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LayerKind {
    /// 2-D convolution producing an `out_hw` feature map.
    Conv2d {
        /// Kernel height and width.
        kernel: [usize; 2],
        /// Grouping.
        groups: Groups,
        /// Whether the convolution has a bias.
        bias: bool,
        /// Output height and width.
        out_hw: [usize; 2],
    },
    /// BatchNorm: no MACs, two parameters per channel.
    BatchNorm,
    /// Fully connected layer.
    Linear {
        /// Whether the layer has a bias.
        bias: bool,
    },
}

/// One layer of a network as the cost model sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSpec {
    /// Name shown in the summary.
    pub name: String,
    /// The computation.
    pub kind: LayerKind,
    /// Input channels (for BatchNorm and depthwise convs, the same as the output).
    pub input: Width,
    /// Output channels.
    pub output: Width,
}

/// A network's layers with the gates that set their widths.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// Full width of every gate.
    pub gates: BTreeMap<String, usize>,
    /// Layers in network order.
    pub layers: Vec<LayerSpec>,
}

/// A product `coef * width_1 * ... * width_n`; a layer's MACs are a sum of these.
#[derive(Debug, Clone, PartialEq)]
pub struct MacsTerm {
    /// Constant factor.
    pub coef: f64,
    /// Widths multiplied.
    pub factors: Vec<Width>,
}

/// Cost of one layer before and after derivation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerCost {
    /// Layer name.
    pub name: String,
    /// Input channels before and after.
    pub input: (usize, usize),
    /// Output channels before and after.
    pub output: (usize, usize),
    /// MACs after.
    pub macs: u64,
    /// Parameters after.
    pub params: u64,
}

/// Cost of a network under an architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostReport {
    /// Per layer.
    pub layers: Vec<LayerCost>,
    /// Total MACs.
    pub macs: u64,
    /// Total parameters.
    pub params: u64,
}

impl CostModel {
    /// An empty model.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a gate and its full width.
    pub fn gate(&mut self, name: impl Into<String>, width: usize) -> &mut Self {
        self.gates.insert(name.into(), width);
        self
    }

    /// Adds a convolution.
    pub fn conv(
        &mut self,
        name: impl Into<String>,
        input: Width,
        output: Width,
        kernel: [usize; 2],
        groups: Groups,
        out_hw: [usize; 2],
    ) -> &mut Self {
        self.push(
            name,
            LayerKind::Conv2d {
                kernel,
                groups,
                bias: false,
                out_hw,
            },
            input,
            output,
        )
    }

    /// Adds a BatchNorm over `width` channels.
    pub fn batch_norm(&mut self, name: impl Into<String>, width: Width) -> &mut Self {
        self.push(name, LayerKind::BatchNorm, width.clone(), width)
    }

    /// Adds a linear layer with bias.
    pub fn linear(&mut self, name: impl Into<String>, input: Width, output: Width) -> &mut Self {
        self.push(name, LayerKind::Linear { bias: true }, input, output)
    }

    /// Adds any layer.
    pub fn push(
        &mut self,
        name: impl Into<String>,
        kind: LayerKind,
        input: Width,
        output: Width,
    ) -> &mut Self {
        self.layers.push(LayerSpec {
            name: name.into(),
            kind,
            input,
            output,
        });
        self
    }

    /// Checks that every gate a layer refers to is declared.
    pub fn validate(&self) -> Result<()> {
        for layer in &self.layers {
            for w in [&layer.input, &layer.output] {
                if let Width::Gate(g) = w
                    && !self.gates.contains_key(g)
                {
                    return Err(CoreError::UnknownGate {
                        layer: layer.name.clone(),
                        gate: g.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    fn full_width(&self, w: &Width) -> usize {
        match w {
            Width::Fixed(n) => *n,
            Width::Gate(g) => self.gates.get(g).copied().unwrap_or(0),
        }
    }

    fn kept_width(&self, w: &Width, arch: Option<&Architecture>) -> usize {
        match (w, arch) {
            (Width::Gate(g), Some(a)) => a.kept_width(g).unwrap_or_else(|| self.full_width(w)),
            _ => self.full_width(w),
        }
    }

    /// MACs of one layer as a sum of width products.
    pub fn layer_terms(layer: &LayerSpec) -> Vec<MacsTerm> {
        match &layer.kind {
            LayerKind::Conv2d {
                kernel,
                groups,
                out_hw,
                ..
            } => {
                let spatial = (kernel[0] * kernel[1] * out_hw[0] * out_hw[1]) as f64;
                match groups {
                    Groups::Depthwise => {
                        vec![MacsTerm {
                            coef: spatial,
                            factors: vec![layer.output.clone()],
                        }]
                    }
                    Groups::Count(g) => vec![MacsTerm {
                        coef: spatial / *g as f64,
                        factors: vec![layer.input.clone(), layer.output.clone()],
                    }],
                }
            }
            LayerKind::BatchNorm => Vec::new(),
            LayerKind::Linear { .. } => vec![MacsTerm {
                coef: 1.0,
                factors: vec![layer.input.clone(), layer.output.clone()],
            }],
        }
    }

    /// The whole network's MACs as a sum of width products.
    pub fn macs_terms(&self) -> Vec<MacsTerm> {
        self.layers.iter().flat_map(Self::layer_terms).collect()
    }

    fn layer_cost(&self, layer: &LayerSpec, arch: Option<&Architecture>) -> LayerCost {
        let (cin_full, cout_full) = (
            self.full_width(&layer.input),
            self.full_width(&layer.output),
        );
        let (cin, cout) = (
            self.kept_width(&layer.input, arch),
            self.kept_width(&layer.output, arch),
        );
        let (macs, params) = match &layer.kind {
            LayerKind::Conv2d {
                kernel,
                groups,
                bias,
                out_hw,
            } => {
                let k = (kernel[0] * kernel[1]) as u64;
                let per_filter_in = match groups {
                    Groups::Depthwise => 1,
                    Groups::Count(g) => (cin / g) as u64,
                };
                let weights = k * per_filter_in * cout as u64;
                let spatial = (out_hw[0] * out_hw[1]) as u64;
                (
                    weights * spatial,
                    weights + if *bias { cout as u64 } else { 0 },
                )
            }
            LayerKind::BatchNorm => (0, 2 * cout as u64),
            LayerKind::Linear { bias } => {
                let w = (cin * cout) as u64;
                (w, w + if *bias { cout as u64 } else { 0 })
            }
        };
        LayerCost {
            name: layer.name.clone(),
            input: (cin_full, cin),
            output: (cout_full, cout),
            macs,
            params,
        }
    }

    /// MACs and parameters of every layer under `arch` (`None`: the full network).
    pub fn cost(&self, arch: Option<&Architecture>) -> CostReport {
        let layers: Vec<LayerCost> = self
            .layers
            .iter()
            .map(|l| self.layer_cost(l, arch))
            .collect();
        CostReport {
            macs: layers.iter().map(|l| l.macs).sum(),
            params: layers.iter().map(|l| l.params).sum(),
            layers,
        }
    }

    /// For each gate, the MACs one more channel of it costs at full width (d MACs / d width).
    pub fn marginal_macs(&self) -> BTreeMap<String, f64> {
        let mut out: BTreeMap<String, f64> = self.gates.keys().map(|g| (g.clone(), 0.0)).collect();
        for term in self.macs_terms() {
            for (i, f) in term.factors.iter().enumerate() {
                if let Width::Gate(g) = f {
                    let others: f64 = term
                        .factors
                        .iter()
                        .enumerate()
                        .filter(|&(j, _)| j != i)
                        .map(|(_, w)| self.full_width(w) as f64)
                        .product();
                    *out.entry(g.clone()).or_default() += term.coef * others;
                }
            }
        }
        out
    }

    /// Full width of a gate, if declared.
    pub fn gate_width(&self, name: &str) -> Option<usize> {
        self.gates.get(name).copied()
    }
}

impl fmt::Display for CostReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name_w = self
            .layers
            .iter()
            .map(|l| l.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        writeln!(
            f,
            "{:<name_w$}  {:>13}  {:>13}  {:>14}  {:>11}",
            "layer", "in", "out", "MACs", "params"
        )?;
        for l in &self.layers {
            writeln!(
                f,
                "{:<name_w$}  {:>13}  {:>13}  {:>14}  {:>11}",
                l.name,
                format!("{} -> {}", l.input.0, l.input.1),
                format!("{} -> {}", l.output.0, l.output.1),
                l.macs,
                l.params
            )?;
        }
        write!(
            f,
            "{:<name_w$}  {:>13}  {:>13}  {:>14}  {:>11}",
            "total", "", "", self.macs, self.params
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::architecture::GateArchitecture;
    use crate::gate::GateKind;

    /// conv 3->8 (3x3, 16x16 out, gated "a"), BN, depthwise 3x3 on "a" at 8x8, conv 1x1 a->b,
    /// linear b -> 10.
    fn toy() -> CostModel {
        let mut m = CostModel::new();
        m.gate("a", 8).gate("b", 4);
        m.conv(
            "conv1",
            Width::Fixed(3),
            Width::gate("a"),
            [3, 3],
            Groups::Count(1),
            [16, 16],
        )
        .batch_norm("bn1", Width::gate("a"))
        .conv(
            "dw",
            Width::gate("a"),
            Width::gate("a"),
            [3, 3],
            Groups::Depthwise,
            [8, 8],
        )
        .conv(
            "pw",
            Width::gate("a"),
            Width::gate("b"),
            [1, 1],
            Groups::Count(1),
            [8, 8],
        )
        .linear("fc", Width::gate("b"), Width::Fixed(10));
        m
    }

    #[test]
    fn full_cost_by_hand() {
        let r = toy().cost(None);
        let conv1 = 16 * 16 * 3 * 9 * 8;
        let dw = 8 * 8 * 9 * 8;
        let pw = 8 * 8 * 8 * 4;
        let fc = 4 * 10;
        assert_eq!(r.macs, (conv1 + dw + pw + fc) as u64);
        let params = 3 * 9 * 8 + 2 * 8 + 9 * 8 + 8 * 4 + (4 * 10 + 10);
        assert_eq!(r.params, params as u64);
        assert_eq!(r.layers[2].macs, dw as u64);
    }

    #[test]
    fn pruned_cost_by_hand() {
        let mut gates = BTreeMap::new();
        gates.insert(
            "a".into(),
            GateArchitecture {
                kind: GateKind::Main,
                width: 8,
                kept: vec![0, 2, 5],
                forced_open: false,
            },
        );
        gates.insert(
            "b".into(),
            GateArchitecture {
                kind: GateKind::Main,
                width: 4,
                kept: vec![1],
                forced_open: false,
            },
        );
        let arch = Architecture {
            threshold: 0.9,
            gates,
        };
        let r = toy().cost(Some(&arch));
        let macs = 16 * 16 * 3 * 9 * 3 + 8 * 8 * 9 * 3 + 8 * 8 * 3 + 10;
        assert_eq!(r.macs, macs as u64);
        assert_eq!(r.params, (3 * 9 * 3 + 2 * 3 + 9 * 3 + 3 + 10 + 10) as u64);
        assert_eq!(r.layers[3].input, (8, 3));
        assert_eq!(r.layers[3].output, (4, 1));
        let table = r.to_string();
        assert!(
            table.contains("pw") && table.contains("8 -> 3") && table.contains("total"),
            "{table}"
        );
    }

    #[test]
    fn grouped_conv_divides_input_channels() {
        let mut m = CostModel::new();
        m.conv(
            "g",
            Width::Fixed(8),
            Width::Fixed(16),
            [3, 3],
            Groups::Count(4),
            [4, 4],
        );
        let r = m.cost(None);
        assert_eq!(r.macs, 4 * 4 * 9 * 2 * 16);
        assert_eq!(r.params, 9 * 2 * 16);
    }

    #[test]
    fn marginal_macs_is_the_derivative() {
        let m = toy();
        let marginal = m.marginal_macs();
        let conv1 = 16.0 * 16.0 * 3.0 * 9.0;
        let dw = 8.0 * 8.0 * 9.0;
        let pw_a = 8.0 * 8.0 * 4.0;
        assert_eq!(marginal["a"], conv1 + dw + pw_a);
        assert_eq!(marginal["b"], 8.0 * 8.0 * 8.0 + 10.0);
        // The terms reproduce the total.
        let from_terms: f64 = m
            .macs_terms()
            .iter()
            .map(|t| {
                t.coef
                    * t.factors
                        .iter()
                        .map(|w| m.full_width(w) as f64)
                        .product::<f64>()
            })
            .sum();
        assert_eq!(from_terms as u64, m.cost(None).macs);
    }

    #[test]
    fn unknown_gate_is_reported() {
        let mut m = CostModel::new();
        m.batch_norm("bn", Width::gate("nope"));
        let err = m.validate().unwrap_err().to_string();
        assert!(err.contains("bn") && err.contains("nope"), "{err}");
    }
}
