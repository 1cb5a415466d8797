//! Derivation: from learned gates to a discrete architecture (the kept channels of every gate).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::gate::{GateKind, GateMode, GateState};
use crate::gated::GatedModel;
use crate::io::write_atomic;

/// The paper's derivation threshold on `sigmoid(beta * alpha)`.
pub const DEFAULT_THRESHOLD: f64 = 0.9;

/// The channels one gate keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateArchitecture {
    /// Main path or residual branch.
    pub kind: GateKind,
    /// Width of the gate before derivation.
    pub width: usize,
    /// Indices (ascending) of the channels kept.
    pub kept: Vec<usize>,
    /// True when every channel fell below the threshold on a main-path gate and the strongest
    /// one was kept so that the network stays connected.
    #[serde(default)]
    pub forced_open: bool,
}

impl GateArchitecture {
    /// Every channel of a gate of `width` kept.
    pub fn full(kind: GateKind, width: usize) -> Self {
        Self {
            kind,
            width,
            kept: (0..width).collect(),
            forced_open: false,
        }
    }

    /// Per channel, whether it is kept.
    pub fn keep_mask(&self) -> Vec<bool> {
        let mut mask = vec![false; self.width];
        for &c in &self.kept {
            mask[c] = true;
        }
        mask
    }

    /// True when the gate kept nothing (only possible on a residual branch).
    pub fn is_closed(&self) -> bool {
        self.kept.is_empty()
    }
}

/// A discrete architecture: for every gate (by name), the channels it keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Architecture {
    /// The threshold on `sigmoid(beta * alpha)` this architecture was derived with.
    pub threshold: f64,
    /// Per gate name, what it keeps.
    pub gates: BTreeMap<String, GateArchitecture>,
}

impl Architecture {
    /// Rounds every gate's kept count up to a multiple of `multiple` (never past the gate's
    /// width) with its strongest closed channels: largest `alpha` in `states`, the lower index
    /// first on a tie, channels that no longer exist never. A gate that keeps nothing stays
    /// closed. Hardware runs such widths better (vector lanes, tensor-core tiles); the paper
    /// does not round (`multiple = 1`). Returns the channels added back.
    pub fn round_widths<'a>(
        &mut self,
        states: impl IntoIterator<Item = (&'a str, &'a GateState)>,
        multiple: usize,
    ) -> Result<usize> {
        if multiple == 0 {
            return Err(CoreError::invalid(
                "arch.round_to",
                "0 is not a width multiple; use 1 (no rounding), 8 or 16",
            ));
        }
        let mut added = 0;
        for (name, state) in states {
            let gate = self.gates.get_mut(name).ok_or_else(|| {
                CoreError::ArchitectureMismatch(format!("the architecture has no gate `{name}`"))
            })?;
            let n = gate.kept.len();
            let target = n.div_ceil(multiple) * multiple;
            let available = state.mask.iter().filter(|&&m| m).count();
            let target = target.min(gate.width).min(available.max(n));
            if n == 0 || target <= n {
                continue;
            }
            let mut closed: Vec<usize> = (0..gate.width)
                .filter(|c| state.mask.get(*c).copied().unwrap_or(false))
                .filter(|c| gate.kept.binary_search(c).is_err())
                .collect();
            closed.sort_by(|&a, &b| state.alpha[b].total_cmp(&state.alpha[a]).then(a.cmp(&b)));
            gate.kept.extend(closed.into_iter().take(target - n));
            gate.kept.sort_unstable();
            added += gate.kept.len() - n;
        }
        Ok(added)
    }

    /// The architecture that keeps every channel of `model`.
    pub fn full<M: GatedModel>(model: &M) -> Self {
        let mut gates = BTreeMap::new();
        model.visit_gates(&mut |name, gate| {
            gates.insert(
                name.to_string(),
                GateArchitecture::full(gate.kind, gate.channels()),
            );
        });
        Self {
            threshold: DEFAULT_THRESHOLD,
            gates,
        }
    }

    /// Kept width of the gate `name`, if the architecture has it.
    pub fn kept_width(&self, name: &str) -> Option<usize> {
        self.gates.get(name).map(|g| g.kept.len())
    }

    /// Kept channels over all gates.
    pub fn kept_channels(&self) -> usize {
        self.gates.values().map(|g| g.kept.len()).sum()
    }

    /// Channels over all gates before derivation.
    pub fn total_channels(&self) -> usize {
        self.gates.values().map(|g| g.width).sum()
    }

    /// Serialises to pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("an architecture always serialises")
    }

    /// Parses JSON, checking every gate's indices.
    pub fn from_json(text: &str) -> Result<Self> {
        let arch: Self = serde_json::from_str(text).map_err(|e| CoreError::Json {
            what: "architecture".into(),
            source: e,
        })?;
        arch.validate()?;
        Ok(arch)
    }

    /// Writes the JSON to `path` atomically (temp file, then rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        write_atomic(path.as_ref(), self.to_json().as_bytes())
    }

    /// Reads an architecture written by [`Architecture::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| CoreError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_json(&text).map_err(|e| e.in_file(path))
    }

    /// Checks the threshold and every gate's indices (done by [`Architecture::from_json`]; for
    /// an architecture deserialised as part of another document).
    pub fn validate(&self) -> Result<()> {
        if !(self.threshold > 0.0 && self.threshold < 1.0) {
            return Err(CoreError::InvalidValue {
                key: "threshold".into(),
                message: format!("{} is outside (0, 1)", self.threshold),
            });
        }
        for (name, g) in &self.gates {
            let sorted = g.kept.windows(2).all(|w| w[0] < w[1]);
            let in_range = g.kept.iter().all(|&c| c < g.width);
            if !sorted || !in_range {
                return Err(CoreError::InvalidValue {
                    key: format!("gates.{name}.kept"),
                    message: format!(
                        "must be strictly increasing channel indices below the width {}",
                        g.width
                    ),
                });
            }
            if g.kind == GateKind::Main && g.kept.is_empty() {
                return Err(CoreError::InvalidValue {
                    key: format!("gates.{name}.kept"),
                    message: "a main-path gate must keep at least one channel".into(),
                });
            }
        }
        Ok(())
    }

    /// Checks that this architecture has exactly the gates (names and widths) of `model`.
    pub fn check_matches<M: GatedModel>(&self, model: &M) -> Result<()> {
        let mut problems = Vec::new();
        let mut in_model = std::collections::BTreeSet::new();
        model.visit_gates(&mut |name, gate| {
            in_model.insert(name.to_string());
            match self.gates.get(name) {
                None => problems.push(format!("gate `{name}` is missing")),
                Some(g) if g.width != gate.channels() => problems.push(format!(
                    "gate `{name}` has width {} in the architecture but {} in the model",
                    g.width,
                    gate.channels()
                )),
                Some(_) => {}
            }
        });
        let extra: Vec<&str> = self
            .gates
            .keys()
            .filter(|n| !in_model.contains(*n))
            .map(String::as_str)
            .collect();
        if !extra.is_empty() {
            problems.push(format!("the model has no gate(s) `{}`", extra.join("`, `")));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(CoreError::ArchitectureMismatch(problems.join("; ")))
        }
    }

    /// Writes this architecture's masks into `model` and switches its gates to
    /// [`GateMode::Masked`]: the masked network computes what the pruned one will.
    pub fn apply_masks<M: GatedModel>(&self, model: M) -> Result<M> {
        self.check_matches(&model)?;
        Ok(model.map_gates(&mut |name, gate| {
            let mask = self.gates[name].keep_mask();
            gate.with_mask(&mask).with_mode(GateMode::Masked)
        }))
    }

    /// One line per gate: name, kind, width before -> after, and notes.
    pub fn summary(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name_w = self.gates.keys().map(String::len).max().unwrap_or(4).max(4);
        writeln!(
            f,
            "{:<name_w$}  {:<6}  {:>6} -> {:<6}  note",
            "gate", "kind", "before", "after"
        )?;
        for (name, g) in &self.gates {
            let kind = match g.kind {
                GateKind::Main => "main",
                GateKind::Branch => "branch",
            };
            let note = if g.forced_open {
                "all channels below threshold; strongest kept to keep the network connected"
            } else if g.is_closed() {
                "closed: the residual branch is removed, the block is an identity"
            } else {
                ""
            };
            writeln!(
                f,
                "{name:<name_w$}  {kind:<6}  {:>6} -> {:<6}  {note}",
                g.width,
                g.kept.len()
            )?;
        }
        write!(
            f,
            "kept {} of {} gated channels (threshold {})",
            self.kept_channels(),
            self.total_channels(),
            self.threshold
        )
    }
}

/// Derives the architecture of `model`: channel `c` of a gate is kept iff
/// `sigmoid(beta * alpha_c) > threshold` (and it was not already masked).
pub fn derive_architecture<M: GatedModel>(model: &M, threshold: f64) -> Result<Architecture> {
    let states = model.gate_states();
    derive_from_states(states.iter().map(|(n, s)| (n.as_str(), s)), threshold)
}

/// [`derive_architecture`] on host copies of the gates.
pub fn derive_from_states<'a>(
    states: impl IntoIterator<Item = (&'a str, &'a GateState)>,
    threshold: f64,
) -> Result<Architecture> {
    if !(threshold > 0.0 && threshold < 1.0) {
        return Err(CoreError::InvalidValue {
            key: "threshold".into(),
            message: format!("{threshold} is outside (0, 1); the paper uses 0.9"),
        });
    }
    let mut gates = BTreeMap::new();
    for (name, state) in states {
        let open = state.openness();
        let mut kept: Vec<usize> = (0..open.len()).filter(|&c| open[c] > threshold).collect();
        let mut forced_open = false;
        if kept.is_empty() && state.kind == GateKind::Main && !open.is_empty() {
            // The strongest channel among those that still exist, by alpha (the openness of
            // every channel may have saturated to exactly 0).
            let strongest = (0..open.len())
                .filter(|&c| state.mask[c])
                .max_by(|&a, &b| state.alpha[a].total_cmp(&state.alpha[b]))
                .unwrap_or(0);
            kept.push(strongest);
            forced_open = true;
        }
        let arch = GateArchitecture {
            kind: state.kind,
            width: open.len(),
            kept,
            forced_open,
        };
        if gates.insert(name.to_string(), arch).is_some() {
            return Err(CoreError::ArchitectureMismatch(format!(
                "two gates are named `{name}`"
            )));
        }
    }
    Ok(Architecture { threshold, gates })
}
