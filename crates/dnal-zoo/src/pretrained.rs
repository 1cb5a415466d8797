//! Weights from elsewhere: a PyTorch checkpoint (`.pth`/`.pt`), a safetensors file or a
//! burnpack file (a dnal run's `model.bpk`), its
//! tensor names rewritten into dnal's module paths by a [`KeyMap`], loaded into a full-width
//! network through burn-store (which also transposes linear weights and renames BatchNorm's
//! `weight`/`bias` for files in PyTorch's layout).
//!
//! dnal's convolutions have no bias: where a file's convolution has one and a BatchNorm
//! follows (torchvision's VGG), the bias is folded into BatchNorm's running mean
//! (`mean - bias`), which changes nothing in evaluation and nothing in training either (a
//! batch's statistics remove a constant shift).
//!
//! Every tensor of the network must come from the file except the gates' own parameters and
//! what the caller excludes, and every tensor of the file must land somewhere unless a rule
//! ignores it: anything else is an error that lists the names, so a half-loaded network never
//! starts training.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{
    ApplyResult, BurnpackStore, ModuleAdapter, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter,
    PytorchStore, SafetensorsStore,
};
use burn::tensor::{DType, TensorData};
use regex::Regex;
use serde::Deserialize;

use crate::error::{Result, ZooError};
use crate::network::Network;

/// Source keys every map drops: PyTorch's BatchNorm step counter has no counterpart.
const ALWAYS_IGNORED: &str = r"(^|\.)num_batches_tracked$";

/// The gates' own tensors, which no outside file has: they keep their initial values.
const GATE_TENSORS: &str = r"(^|\.)gate\.(alpha|mask|temperature)$";

/// How the names of a weights file become dnal's module paths.
#[derive(Clone, Debug)]
pub enum KeyMap {
    /// torchvision's names for the network's family (VGG-16-BN, ResNet-50, MobileNetV2), from
    /// [`Network::torchvision_keys`].
    Torchvision,
    /// The file already uses dnal's names and burn's layout (a run's `model.safetensors`).
    Dnal,
    /// Rules read from a mapping file (see [`KeyRules`]).
    Rules(KeyRules),
}

/// The layout of the file's tensors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// PyTorch's: linear weights `[out, in]`, BatchNorm's `weight`/`bias`.
    #[default]
    Pytorch,
    /// burn's (and dnal's own files): linear weights `[in, out]`, BatchNorm's `gamma`/`beta`.
    Burn,
}

/// A key map as data: the format of a mapping file (TOML).
///
/// ```toml
/// top_level_key = "model"          # .pth only: the checkpoint's entry holding the weights
/// base = "torchvision"             # optional: the family's torchvision rules follow these
/// layout = "pytorch"               # or "burn"
/// ignore = ['^aux_head\.']         # source keys (regexes) that are dropped
/// [[rename]]                       # the first rule whose `from` matches rewrites the key
/// from = '^module\.backbone\.layer(\d)\.'
/// to = 'blocks.$1.'
/// ```
///
/// A key no rule matches keeps its name. `from` is a regular expression (Rust's `regex`
/// syntax); `to` may use its groups as `$1` or `${name}`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRules {
    /// The entry of a `.pth` checkpoint that holds the state dict (e.g. `state_dict`, `model`).
    #[serde(default)]
    pub top_level_key: Option<String>,
    /// Rules tried after this file's own (`torchvision`: the family's torchvision map).
    #[serde(default)]
    pub base: Option<Base>,
    /// Layout of the tensors.
    #[serde(default)]
    pub layout: Layout,
    /// Source keys dropped before renaming.
    #[serde(default)]
    pub ignore: Vec<String>,
    /// Renaming rules, tried in order.
    #[serde(default)]
    pub rename: Vec<Rename>,
}

/// Built-in rules a mapping file can extend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Base {
    /// [`Network::torchvision_keys`].
    Torchvision,
}

/// One renaming rule of [`KeyRules`].
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rename {
    /// Regular expression matched against the source key.
    pub from: String,
    /// Its replacement.
    pub to: String,
}

impl Rename {
    /// A rule that rewrites the prefix `from.` into `to.` (both plain module paths).
    pub fn prefix(from: &str, to: &str) -> Self {
        Self {
            from: format!("^{}\\.", regex::escape(from)),
            to: format!("{to}."),
        }
    }
}

impl Rename {
    /// The two rules of a conv -> BN unit: the source's conv and BN prefixes into dnal's
    /// `{ours}.conv` and `{ours}.bn`.
    pub fn conv_bn(conv: &str, bn: &str, ours: &str) -> [Self; 2] {
        [
            Self::prefix(conv, &format!("{ours}.conv")),
            Self::prefix(bn, &format!("{ours}.bn")),
        ]
    }
}

impl KeyRules {
    /// Reads a mapping file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| record(path, e.to_string()))?;
        toml::from_str(&text).map_err(|e| {
            record(
                path,
                format!("not a key-mapping file (see the weights.init_keys docs): {e}"),
            )
        })
    }

    /// The rules compiled, to rename keys one by one (without a `base`, which needs a network).
    pub fn mapper(&self) -> Result<KeyMapper> {
        self.compile(Path::new("key map"))
    }

    fn compile(&self, origin: &Path) -> Result<KeyMapper> {
        let re = |p: &str| {
            Regex::new(p)
                .map_err(|e| record(origin, format!("bad pattern `{p}` in the key map: {e}")))
        };
        Ok(KeyMapper {
            ignore: std::iter::once(ALWAYS_IGNORED)
                .chain(self.ignore.iter().map(String::as_str))
                .map(re)
                .collect::<Result<_>>()?,
            rename: self
                .rename
                .iter()
                .map(|r| Ok((re(&r.from)?, r.to.clone())))
                .collect::<Result<_>>()?,
        })
    }
}

/// Compiled [`KeyRules`].
pub struct KeyMapper {
    ignore: Vec<Regex>,
    rename: Vec<(Regex, String)>,
}

impl KeyMapper {
    /// The network path the source key `key` is loaded into; `None` if it is ignored.
    pub fn target(&self, key: &str) -> Option<String> {
        if self.ignore.iter().any(|r| r.is_match(key)) {
            return None;
        }
        Some(
            self.rename
                .iter()
                .find(|(r, _)| r.is_match(key))
                .map_or_else(
                    || key.to_string(),
                    |(r, to)| r.replace(key, to.as_str()).into_owned(),
                ),
        )
    }
}

/// What [`load_pretrained`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Loaded {
    /// Tensors loaded into the network.
    pub applied: usize,
    /// Source keys dropped by the map's `ignore` rules (and PyTorch's BatchNorm counters).
    pub ignored: Vec<String>,
    /// Network tensors left at their initial values because the caller excluded them.
    pub excluded: Vec<String>,
}

impl std::fmt::Display for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tensors loaded, {} file entries ignored",
            self.applied,
            self.ignored.len()
        )?;
        if !self.excluded.is_empty() {
            write!(f, ", {} left at their initial values", self.excluded.len())?;
        }
        Ok(())
    }
}

/// Checks what [`load_pretrained`] needs before anything is read: that `path` is a file, that
/// `keys` applies to `model`'s family and compiles, and that `exclude` are patterns. A run
/// calls it before it loads its data, so that a wrong path fails at once.
pub fn check_pretrained<N: Network>(
    model: &N,
    path: &Path,
    keys: &KeyMap,
    exclude: &[String],
) -> Result<()> {
    resolve(model, path, keys, exclude).map(|_| ())
}

/// A weights file's key rules, compiled, and the compiled exclusions.
struct Resolved {
    rules: KeyRules,
    mapper: KeyMapper,
    exclude: Vec<Regex>,
}

fn resolve<N: Network>(
    model: &N,
    path: &Path,
    keys: &KeyMap,
    exclude: &[String],
) -> Result<Resolved> {
    if path.is_dir() {
        return Err(record(
            path,
            "a folder, not a weights file: name the .pth, .pt, .safetensors or .bpk file".into(),
        ));
    }
    if !path.is_file() {
        return Err(record(path, "no such file".into()));
    }
    let torchvision = || {
        model.torchvision_keys().ok_or_else(|| {
            record(
                path,
                "this network has no torchvision counterpart; name a key-mapping file in \
                 weights.init_keys"
                    .into(),
            )
        })
    };
    let rules = match keys {
        KeyMap::Torchvision => torchvision()?,
        KeyMap::Dnal => KeyRules {
            layout: Layout::Burn,
            ..KeyRules::default()
        },
        KeyMap::Rules(r) => match r.base {
            None => r.clone(),
            Some(Base::Torchvision) => {
                let base = torchvision()?;
                let mut r = r.clone();
                r.ignore.extend(base.ignore);
                r.rename.extend(base.rename);
                r
            }
        },
    };
    let mapper = rules.compile(path)?;
    let exclude = exclude
        .iter()
        .map(|p| {
            Regex::new(p).map_err(|e| {
                ZooError::Config(format!("bad pattern `{p}` in weights.init_exclude: {e}"))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Resolved {
        rules,
        mapper,
        exclude,
    })
}

/// Loads the tensors of `path` into `model` (a full-width network), renamed by `keys`; the
/// network's tensors whose path matches one of `exclude` (regexes over dnal's paths, e.g.
/// `^classifier\.` to train a new classifier) keep their values, as do the gates'.
pub fn load_pretrained<N: Network>(
    mut model: N,
    path: &Path,
    keys: &KeyMap,
    exclude: &[String],
) -> Result<(N, Loaded)> {
    let Resolved {
        rules,
        mapper,
        exclude,
    } = resolve(&model, path, keys, exclude)?;
    let excluded = |name: &str| exclude.iter().any(|r| r.is_match(name));

    let source = read_tensors(path, rules.top_level_key.as_deref())?;
    let mut loaded = Loaded::default();
    let mut origin: BTreeMap<String, String> = BTreeMap::new();
    let mut tensors = Vec::with_capacity(source.len());
    for (key, mut tensor) in source {
        let Some(name) = mapper.target(&key) else {
            loaded.ignored.push(key);
            continue;
        };
        if excluded(&name) {
            continue;
        }
        if let Some(first) = origin.insert(name.clone(), key.clone()) {
            return Err(record(
                path,
                format!("`{first}` and `{key}` both map to `{name}`; fix the key map"),
            ));
        }
        tensor.name = name;
        tensors.push(tensor);
    }

    let tensors = fold_conv_biases(tensors).map_err(|e| record(path, e))?;

    let adapter: Option<Box<dyn ModuleAdapter>> = match rules.layout {
        Layout::Pytorch => Some(Box::new(PyTorchToBurnAdapter)),
        Layout::Burn => None,
    };
    let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let result = model.apply(tensors, None, adapter, true);
        (model, result)
    }));
    let (model, result) =
        applied.map_err(|_| record(path, "a tensor of the file cannot be read".into()))?;
    loaded.excluded = check(path, &result, &origin, |name| excluded(name)).map_err(|e| {
        match (result.applied.is_empty(), common_root(&result.unused)) {
            (true, Some(root)) => record(
                path,
                format!(
                    "{}\nEvery tensor sits under `{root}.`: name it as top_level_key in a \
                     key-mapping file (with base = \"torchvision\" to keep the family's names)",
                    message(e)
                ),
            ),
            _ => e,
        }
    })?;
    loaded.applied = result.applied.len();
    Ok((model, loaded))
}

/// Turns burn-store's result into an error listing what does not fit; returns the network
/// tensors left out on purpose.
fn check(
    path: &Path,
    result: &ApplyResult,
    origin: &BTreeMap<String, String>,
    excluded: impl Fn(&str) -> bool,
) -> Result<Vec<String>> {
    let gate = Regex::new(GATE_TENSORS).expect("a valid pattern");
    let from = |name: &str| match origin.get(name) {
        Some(key) if key != name => format!("{name} (from `{key}`)"),
        _ => name.to_string(),
    };
    let mut problems = Vec::new();
    for e in &result.errors {
        problems.push(match e {
            burn::store::ApplyError::ShapeMismatch {
                path,
                expected,
                found,
            } => format!(
                "{}: the network has shape {:?}, the file {:?}",
                from(path),
                expected.as_slice(),
                found.as_slice()
            ),
            other => other.to_string(),
        });
    }
    let mut left_out = Vec::new();
    let mut missing = Vec::new();
    for (name, _) in &result.missing {
        if gate.is_match(name) {
            continue;
        }
        if excluded(name) {
            left_out.push(name.clone());
        } else {
            missing.push(name.clone());
        }
    }
    if !missing.is_empty() {
        problems.push(format!(
            "not in the file: {} (exclude them with weights.init_exclude to keep their initial values)",
            listing(&missing)
        ));
    }
    let unused: Vec<String> = result.unused.iter().map(|n| from(n)).collect();
    if !unused.is_empty() {
        problems.push(format!(
            "no place in the network for: {} (wrong network or key map?)",
            listing(&unused)
        ));
    }
    if problems.is_empty() {
        Ok(left_out)
    } else {
        Err(record(
            path,
            format!(
                "the weights do not fit the network:\n  {}",
                problems.join("\n  ")
            ),
        ))
    }
}

/// Subtracts each `P.conv.bias` from `P.bn.running_mean` and drops the bias, for dnal's
/// bias-free convolutions.
fn fold_conv_biases(mut tensors: Vec<PackTensor>) -> std::result::Result<Vec<PackTensor>, String> {
    let index: BTreeMap<String, usize> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    for (name, &b) in &index {
        let Some(unit) = name.strip_suffix(".conv.bias") else {
            continue;
        };
        let Some(&m) = index.get(&format!("{unit}.bn.running_mean")) else {
            continue;
        };
        let values = |t: &PackTensor| {
            let data = TensorData::from_bytes(
                t.to_bytes().map_err(|e| format!("{}: {e}", t.name))?,
                t.shape.clone(),
                t.dtype,
            );
            data.convert::<f32>()
                .try_to_vec::<f32>()
                .map_err(|e| format!("{}: {e:?}", t.name))
        };
        let bias = values(&tensors[b])?;
        let mean = values(&tensors[m])?;
        if bias.len() != mean.len() {
            return Err(format!(
                "{name} has {} values, {unit}.bn.running_mean {}",
                bias.len(),
                mean.len()
            ));
        }
        let folded: Vec<f32> = mean.iter().zip(&bias).map(|(m, b)| m - b).collect();
        let shape = tensors[m].shape.clone();
        let data = TensorData::new(folded, shape.clone());
        tensors[m] = PackTensor::new(
            tensors[m].name.clone(),
            DType::F32,
            shape,
            None,
            data.into_bytes(),
        );
        tensors[b].name.clear();
    }
    tensors.retain(|t| !t.name.is_empty());
    Ok(tensors)
}

/// The first path segment all of `names` share, if they share one.
fn common_root(names: &[String]) -> Option<String> {
    let root = names.first()?.split('.').next()?;
    names
        .iter()
        .all(|n| n.starts_with(&format!("{root}.")))
        .then(|| root.to_string())
}

fn message(e: ZooError) -> String {
    match e {
        ZooError::Record { message, .. } => message,
        other => other.to_string(),
    }
}

/// The first names of a list and how many more there are.
fn listing(names: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut s = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s += &format!(" and {} more", names.len() - SHOWN);
    }
    s
}

/// The tensors of a `.pth`/`.pt` or `.safetensors` file, by name.
fn read_tensors(path: &Path, top_level_key: Option<&str>) -> Result<BTreeMap<String, PackTensor>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let read = std::panic::catch_unwind(|| match ext.as_str() {
        "pth" | "pt" | "bin" | "tar" => {
            let mut store = PytorchStore::from_file(path).map_indices_contiguous(false);
            if let Some(key) = top_level_key {
                store = store.with_top_level_key(key);
            }
            store.get_all_tensors().cloned().map_err(|e| {
                let hint = if top_level_key.is_none() {
                    " (a checkpoint that holds more than the weights needs top_level_key in a \
                     key-mapping file)"
                } else {
                    ""
                };
                format!("not a readable PyTorch checkpoint: {e}{hint}")
            })
        }
        "safetensors" => SafetensorsStore::from_file(path)
            .get_all_tensors()
            .cloned()
            .map_err(|e| format!("not a readable safetensors file: {e}")),
        "bpk" => BurnpackStore::from_file(path)
            .get_all_tensors()
            .cloned()
            .map_err(|e| format!("not a readable burnpack file: {e}")),
        _ => Err(
            "weights are read from .pth/.pt (PyTorch), .safetensors or .bpk (burnpack) files"
                .to_string(),
        ),
    });
    match read {
        Ok(Ok(t)) if t.is_empty() => Err(record(path, "the file holds no tensors".into())),
        Ok(Ok(t)) => Ok(t),
        Ok(Err(message)) => Err(record(path, message)),
        Err(_) => Err(record(path, "corrupt or truncated weights file".into())),
    }
}

fn record(path: &Path, message: String) -> ZooError {
    ZooError::Record {
        path: PathBuf::from(path),
        message,
    }
}
