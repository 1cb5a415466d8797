//! What every network of the zoo provides beyond [`GatedModel`]: its config of widths, its
//! cost model, physical pruning, and saving/loading without the original network.

use std::path::{Path, PathBuf};

use burn::module::ParamGroup;
use burn::prelude::*;
use dnal_core::io::{write_atomic, write_atomic_with};
use dnal_core::{Architecture, CostModel, CostReport, GatedModel};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Result, ZooError};
use crate::graph::Graph;
use crate::pretrained::KeyRules;

/// File names inside a saved-model folder.
pub const CONFIG_FILE: &str = "config.json";
/// The burnpack weights are `model.bpk`.
pub const WEIGHTS_STEM: &str = "model";

/// A grid of values in [0, 1] with labelled rows and columns (for instance, per block and
/// candidate operation, the fraction of output channels kept; 0 = removed).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StructureGrid {
    /// Row labels.
    pub rows: Vec<String>,
    /// Column labels.
    pub columns: Vec<String>,
    /// `cells[row][column]`.
    pub cells: Vec<Vec<f64>>,
}

/// How a family's cost model counts (see [`Network::released_cost_model`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Counting {
    /// What the pruned network computes.
    Exact,
    /// As the authors' released code counts a masked network.
    Released,
}

/// A network of the zoo: an image classifier with channel gates.
pub trait Network: GatedModel {
    /// The config of widths the network is built from.
    type Config: Serialize + DeserializeOwned + Clone + std::fmt::Debug + Send + Sync;

    /// Builds a network from its config (gates in bypass, fresh weights).
    fn build(config: &Self::Config, device: &Device) -> Result<Self>;

    /// Logits `[N, classes]` of images `[N, C, H, W]`.
    fn forward(&self, images: Tensor<4>) -> Tensor<2>;

    /// The classifier's parameters (the layers after the last gate), which DNAL's architecture
    /// stage may keep training while the rest of the weights are frozen. By default the
    /// parameters of the `classifier` field.
    fn classifier_group(&self) -> ParamGroup {
        ParamGroup::from_regex(r"^classifier\.").expect("a valid pattern")
    }

    /// The config this network is an instance of (after pruning: the pruned widths).
    fn config(&self) -> &Self::Config;

    /// Its layers for MACs/params counting.
    fn cost_model(&self) -> CostModel;

    /// Its layers counted as the authors' released code counts a masked network, where that
    /// differs from [`Network::cost_model`] (`docs/FIDELITY.md`, residual outputs): a
    /// convolution that follows a residual block reads only the channels the block's output gate
    /// keeps, although the shortcut still carries the others, and an ungated shortcut
    /// convolution counts in full. Price an architecture with `.cost(Some(arch))` on the gated
    /// network, before pruning. `None` (the default): the released code counts like dnal, or
    /// has no such network.
    fn released_cost_model(&self) -> Option<CostModel> {
        None
    }

    /// The eval-mode computation as a graph of plain operations, BatchNorm and gates folded
    /// (for export; `dnal-onnx` writes it as ONNX).
    fn inference_graph(&self) -> Result<Graph>;

    /// How torchvision's state-dict keys for this family become this network's module paths
    /// (VGG-16-BN, ResNet-50, MobileNetV2; see [`crate::pretrained`]); `None` where torchvision
    /// has no such network.
    fn torchvision_keys(&self) -> Option<KeyRules> {
        None
    }

    /// Derives the architecture this network's gates describe (default:
    /// [`dnal_core::derive_architecture`]; a family with extra structural rules adds them).
    fn derive(&self, threshold: f64) -> Result<Architecture> {
        Ok(dnal_core::derive_architecture(self, threshold)?)
    }

    /// A markdown description of the (pruned) network's structure for reports, if the family
    /// has more to say than the widths per gate (the supernet lists its surviving candidates).
    fn describe(&self) -> Option<String> {
        None
    }

    /// The same as a grid of kept fractions for a plot (the supernet: blocks x candidates).
    fn structure_grid(&self) -> Option<StructureGrid> {
        None
    }

    /// MACs and parameters of the network `arch` derives from this one (its kept channels). By
    /// default the cost of a pruned copy, which is exact for every family (residual streams are
    /// unions of kept channels, which a product of gate widths cannot express); a family whose
    /// cost model is exact under any architecture overrides it with the cheaper
    /// `cost_model().cost(Some(arch))`.
    fn arch_cost(&self, arch: &Architecture) -> Result<CostReport> {
        Ok(self.clone().prune(arch)?.cost_model().cost(None))
    }

    /// Removes every channel `arch` does not keep: the result is the same type, built from a
    /// config with the kept widths, and in eval mode computes what the masked network computes.
    fn prune(self, arch: &Architecture) -> Result<Self>;
}

/// Physically removes the channels `arch` drops (see [`Network::prune`]).
pub fn prune<N: Network>(model: N, arch: &Architecture) -> Result<N> {
    model.prune(arch)
}

/// Makes every BatchNorm's running statistics current. burn keeps a running state's last
/// update aside (per thread) until something synchronises it, and a record is written from the
/// synchronised value: without this, a network saved in the middle of an epoch would be saved
/// with statistics one step old, and a run resumed from it would not end where an
/// uninterrupted one does. `valid()` synchronises every running state it passes (the states
/// are shared with `model`); its result is not needed.
fn sync_running_stats<N: Network>(model: &N) {
    let _ = model.valid();
}

/// Saves `model` into `dir`: `config.json` (its widths) and `model.bpk` (burnpack weights), each
/// written to a temporary file and renamed.
pub fn save<N: Network>(model: &N, dir: &Path) -> Result<()> {
    sync_running_stats(model);
    let config = serde_json::to_string_pretty(model.config()).expect("configs serialise");
    write_atomic(&dir.join(CONFIG_FILE), config.as_bytes())?;
    let model = model.clone();
    write_atomic_with(&weights_path(dir), |tmp| {
        model.save_file(tmp).map_err(|e| ZooError::Record {
            path: tmp.to_path_buf(),
            message: e.to_string(),
        })
    })
}

/// Also writes the weights as `model.safetensors` into `dir` (keys are module paths such as
/// `convs.0.conv.weight`), for tools outside burn; temporary file, then rename.
pub fn save_safetensors<N: Network>(model: &N, dir: &Path) -> Result<()> {
    use burn::store::{ModuleSnapshot, SafetensorsStore};
    let path = dir.join(SAFETENSORS_FILE);
    sync_running_stats(model);
    write_atomic_with(&path, |tmp| {
        let mut store = SafetensorsStore::from_file(tmp).overwrite(true);
        model.save_into(&mut store).map_err(|e| ZooError::Record {
            path: path.clone(),
            message: format!("cannot write safetensors: {e}"),
        })
    })
}

/// Loads a model from `config.json` and `model.safetensors` (written by [`save_safetensors`]),
/// refusing tensors that are missing or of another shape.
pub fn load_safetensors<N: Network>(
    dir: &Path,
    build: impl FnOnce(&N::Config) -> Result<N>,
) -> Result<N> {
    use burn::store::{ModuleSnapshot, SafetensorsStore, SafetensorsStoreError};
    let config = read_config::<N>(dir)?;
    let mut model = build(&config)?;
    let path = dir.join(SAFETENSORS_FILE);
    if !path.exists() {
        return Err(ZooError::Record {
            path,
            message: "missing safetensors file".into(),
        });
    }
    let mut store = SafetensorsStore::from_file(&path);
    let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        model
            .load_from(&mut store)
            .map(|r| (r.is_success() && r.missing.is_empty(), r.to_string()))
    }));
    let fail = |message: String| ZooError::Record {
        path: path.clone(),
        message,
    };
    match applied {
        Ok(Ok((true, _))) => Ok(model),
        Ok(Ok((false, report))) => Err(fail(format!(
            "tensors do not fit the network of config.json: {report}"
        ))),
        // The file could not be read as safetensors at all: cut short or overwritten.
        Ok(Err(e @ (SafetensorsStoreError::Safetensors(_) | SafetensorsStoreError::Io(_)))) => {
            Err(fail(unreadable(
                "safetensors",
                e,
                "write it again from the run's model.bpk",
            )))
        }
        Ok(Err(e)) => Err(fail(format!(
            "tensors do not fit the network of config.json: {e}"
        ))),
        Err(_) => Err(fail("corrupt or incompatible safetensors file".into())),
    }
}

/// The safetensors file of a saved-model folder.
pub const SAFETENSORS_FILE: &str = "model.safetensors";

/// The weights file of a saved-model folder.
pub fn weights_path(dir: &Path) -> PathBuf {
    dir.join(format!("{WEIGHTS_STEM}.bpk"))
}

/// Loads a model saved by [`save`]: builds the network from `config.json` with `build`, then
/// reads `model.bpk` into it, refusing weights of another architecture.
pub fn load<N: Network>(dir: &Path, build: impl FnOnce(&N::Config) -> Result<N>) -> Result<N> {
    let config = read_config::<N>(dir)?;
    let model = build(&config)?;
    let weights = weights_path(dir);
    if !weights.exists() {
        return Err(ZooError::Record {
            path: weights,
            message: "missing weights file".into(),
        });
    }
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        model.try_load_file(&weights)
    }));
    match loaded {
        Ok(Ok(model)) => Ok(model),
        // The file could not be read as a record at all: cut short or overwritten.
        Ok(Err(burn::store::RecordError::Io(e))) => Err(ZooError::Record {
            path: weights,
            message: unreadable("weights", e, "train the run again"),
        }),
        Ok(Err(e)) => Err(ZooError::Record {
            path: weights,
            message: format!("weights do not fit the network of config.json: {e}"),
        }),
        Err(_) => Err(ZooError::Record {
            path: weights,
            message: "corrupt or incompatible weights file".into(),
        }),
    }
}

/// The message for a `kind` file that cannot be read at all (cut short or overwritten), with
/// `fix` as the alternative to restoring it.
fn unreadable(kind: &str, e: impl std::fmt::Display, fix: &str) -> String {
    format!("not a readable {kind} file, truncated or corrupt ({e}); restore it, or {fix}")
}

fn read_config<N: Network>(dir: &Path) -> Result<N::Config> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|e| ZooError::Record {
        path: config_path.clone(),
        message: format!(
            "cannot read the network config ({e}); is this a folder written by `save`?"
        ),
    })?;
    serde_json::from_str(&text).map_err(|e| ZooError::Record {
        path: config_path.clone(),
        message: format!("not a config of this network: {e}"),
    })
}

/// Parameters of conv, BN (gamma, beta) and
/// linear layers, the quantity the cost model counts (gate parameters are not part of it).
pub fn counted_params<M: Module>(model: &M) -> usize {
    struct Counter(usize, Vec<String>);
    impl burn::module::ModuleVisitor for Counter {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.1.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.1.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            // The derive enters a "module" named after every field, parameters included.
            let leaf = self.1.last().map(String::as_str).unwrap_or("");
            let in_gate = self.1.iter().any(|p| p == "gate");
            if !in_gate && matches!(leaf, "weight" | "bias" | "gamma" | "beta") {
                self.0 += param.shape().num_elements();
            }
        }
    }
    let mut c = Counter(0, Vec::new());
    model.visit(&mut c);
    c.0
}
