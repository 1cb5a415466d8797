//! The presets: one TOML recipe per model and data set (in this crate's `configs/`, compiled
//! into the binary), a row of the paper's tables being a recipe plus its lambda.

use crate::config::{TrainConfig, apply_overrides};
use crate::error::{Result, TrainError};

/// A recipe file.
#[derive(Clone, Copy, Debug)]
pub struct Recipe {
    /// Its name (file stem).
    pub name: &'static str,
    /// Its TOML text.
    pub text: &'static str,
}

/// Every recipe of `configs/`, in name order (listed by `build.rs`).
pub const RECIPES: &[Recipe] = include!(concat!(env!("OUT_DIR"), "/recipes.rs"));

/// One runnable preset.
#[derive(Clone, Debug, PartialEq)]
pub struct Preset {
    /// `recipe`, `recipe-l<lambda>` or `recipe-baseline`.
    pub name: String,
    /// The recipe it comes from.
    pub recipe: &'static str,
    /// The lambda it sets, if any.
    pub lambda: Option<f64>,
    /// The unpruned baseline row.
    pub dense: bool,
    /// What it reproduces.
    pub description: String,
}

/// The `[presets]` table of a recipe.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PresetTable {
    #[serde(default)]
    lambdas: Vec<f64>,
    #[serde(default)]
    baseline: bool,
    /// Epochs of the `-baseline` preset's training (the paper's baseline schedule); default:
    /// the weight stage's.
    #[serde(default)]
    baseline_epochs: Option<usize>,
    /// The `-baseline` preset's learning-rate schedule (a `weights.schedule` table); default:
    /// the weight stage's.
    #[serde(default)]
    baseline_schedule: Option<toml::Value>,
    #[serde(default)]
    paper: std::collections::BTreeMap<String, String>,
}

/// Formats a lambda the way preset names spell it: `1e-4`, `5e-5`.
pub fn lambda_label(lambda: f64) -> String {
    format!("{lambda:e}")
}

fn split(recipe: &Recipe) -> Result<(toml::Table, PresetTable)> {
    let mut table: toml::Table = toml::from_str(recipe.text).map_err(|e| TrainError::Config {
        origin: format!("configs/{}.toml", recipe.name),
        message: e.to_string(),
    })?;
    let presets = match table.remove("presets") {
        Some(v) => v
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::Config {
                origin: format!("configs/{}.toml [presets]", recipe.name),
                message: e.to_string(),
            })?,
        None => PresetTable::default(),
    };
    Ok((table, presets))
}

/// The lambdas of recipe `name`'s `[presets]` and its published rows by lambda label (and
/// `baseline`).
pub fn lambdas_and_paper(
    name: &str,
) -> Result<(Vec<f64>, std::collections::BTreeMap<String, String>)> {
    let recipe =
        RECIPES
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| TrainError::UnknownRecipe {
                name: name.into(),
                known: RECIPES
                    .iter()
                    .map(|r| r.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
    let (_, p) = split(recipe)?;
    Ok((p.lambdas, p.paper))
}

/// Every preset of every recipe.
pub fn presets() -> Result<Vec<Preset>> {
    let mut out = Vec::new();
    for r in RECIPES {
        let (table, p) = split(r)?;
        let desc = table
            .get("description")
            .and_then(|d| d.as_str())
            .unwrap_or("")
            .to_string();
        out.push(Preset {
            name: r.name.into(),
            recipe: r.name,
            lambda: None,
            dense: false,
            description: desc.clone(),
        });
        for &l in &p.lambdas {
            let label = lambda_label(l);
            let paper = p
                .paper
                .get(&label)
                .map(|s| format!(" (paper: {s})"))
                .unwrap_or_default();
            out.push(Preset {
                name: format!("{}-l{label}", r.name),
                recipe: r.name,
                lambda: Some(l),
                dense: false,
                description: format!("lambda = {label}{paper}"),
            });
        }
        if p.baseline {
            let paper = p
                .paper
                .get("baseline")
                .map(|s| format!(" (paper: {s})"))
                .unwrap_or_default();
            out.push(Preset {
                name: format!("{}-baseline", r.name),
                recipe: r.name,
                lambda: None,
                dense: true,
                description: format!("unpruned baseline{paper}"),
            });
        }
    }
    Ok(out)
}

/// The TOML tree of a preset, with its name, lambda or dense mode applied.
pub fn preset_value(name: &str) -> Result<toml::Value> {
    let all = presets()?;
    let Some(p) = all.iter().find(|p| p.name == name) else {
        let close: Vec<&str> = all
            .iter()
            .map(|p| p.name.as_str())
            .filter(|n| n.starts_with(name.split('-').next().unwrap_or(name)))
            .take(5)
            .collect();
        return Err(TrainError::UnknownPreset {
            name: name.into(),
            suggestion: if close.is_empty() {
                String::new()
            } else {
                format!("; similar: {}", close.join(", "))
            },
        });
    };
    let recipe = RECIPES
        .iter()
        .find(|r| r.name == p.recipe)
        .expect("listed recipe");
    let (table, presets) = split(recipe)?;
    let mut value = toml::Value::Table(table);
    let mut sets = vec![format!("name=\"{}\"", p.name)];
    if let Some(l) = p.lambda {
        sets.push(format!("arch.penalty.lambda={l:e}"));
    }
    if p.dense {
        sets.push("mode=\"dense\"".into());
        if let Some(epochs) = presets.baseline_epochs {
            sets.push(format!("weights.epochs={epochs}"));
            // A cosine that the DNAL weight stage leaves part-way runs its whole course here.
            let spans = value
                .get("weights")
                .and_then(|w| w.get("schedule"))
                .and_then(|s| s.get("span"))
                .is_some();
            if spans {
                sets.push(format!("weights.schedule.span={epochs}"));
            }
        }
    }
    apply_overrides(&mut value, &sets)?;
    if let (true, Some(schedule)) = (p.dense, presets.baseline_schedule)
        && let Some(weights) = value.get_mut("weights").and_then(|w| w.as_table_mut())
    {
        weights.insert("schedule".into(), schedule);
    }
    Ok(value)
}

/// Resolves a run config: a preset (default `mnist-demo`) or a file, then overrides.
pub fn resolve(
    preset: Option<&str>,
    file: Option<&std::path::Path>,
    overrides: &[String],
) -> Result<TrainConfig> {
    let (mut value, origin) = match (preset, file) {
        (_, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(dnal_core::CoreError::io(path))?;
            let table: toml::Table = toml::from_str(&text).map_err(|e| TrainError::Config {
                origin: path.display().to_string(),
                message: e.to_string(),
            })?;
            (toml::Value::Table(table), path.display().to_string())
        }
        (p, None) => {
            let name = p.unwrap_or("mnist-demo");
            (preset_value(name)?, format!("preset {name}"))
        }
    };
    if let Some(t) = value.as_table_mut() {
        t.remove("presets");
    }
    apply_overrides(&mut value, overrides)?;
    let origin = if overrides.is_empty() {
        origin
    } else {
        format!("{origin} with --set {}", overrides.join(" "))
    };
    TrainConfig::from_value(value, &origin)
}
