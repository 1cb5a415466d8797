//! From a recipe's model name to a network type, so that the generic pipeline runs on it.

use dnal_zoo::Network;

use crate::config::TrainConfig;
use crate::data;
use crate::error::Result;
use crate::pipeline::{Outcome, RunOptions, Runner};
use crate::registry::{ImageShape, WithNetwork};

/// The image shape of `cfg`'s data set.
fn shape(cfg: &TrainConfig) -> Result<ImageShape> {
    let (channels, size, classes) = data::shape_of(&cfg.data, cfg.model.num_classes)?;
    Ok(ImageShape {
        channels,
        size,
        classes,
    })
}

/// The resolved config and a summary of the network (gates, widths, MACs, parameters), without
/// reading any data (except the class folders of an image-folder data set).
pub fn dry_run(cfg: &TrainConfig) -> Result<String> {
    cfg.model.name.with(shape(cfg)?, Scaled(cfg, Summary(cfg)))
}

struct Summary<'a>(&'a TrainConfig);

impl WithNetwork for Summary<'_> {
    type Output = String;

    fn run<N: Network>(self, net_cfg: N::Config) -> Result<String> {
        summary::<N>(self.0, &net_cfg)
    }
}

fn summary<N: Network>(cfg: &TrainConfig, net_cfg: &N::Config) -> Result<String> {
    let device = dnal_core::BackendKind::host_device();
    let model = N::build(net_cfg, &device)?;
    let cost = model.cost_model().cost(None);
    let mut s = format!(
        "# resolved config\n{}\n# network: {:?}\n",
        cfg.to_toml(),
        cfg.model.name
    );
    s += &format!(
        "{} gated layers, {} gated channels; {} MACs, {} parameters per image\n\n",
        model.gate_names().len(),
        model.gated_channels(),
        cost.macs,
        cost.params
    );
    s += &cost.to_string();
    Ok(s)
}

/// Runs the pipeline of `cfg` (loading its data set).
pub fn run(cfg: &TrainConfig, opts: &RunOptions) -> Result<Outcome> {
    cfg.model
        .name
        .with(shape(cfg)?, Scaled(cfg, Train(cfg, opts)))
}

/// `F` on the network that `model.width_multiplier` asks for: every gated width scaled, built
/// as the pruning of the full network to those widths describes it.
struct Scaled<'a, F>(&'a TrainConfig, F);

impl<F: WithNetwork> WithNetwork for Scaled<'_, F> {
    type Output = F::Output;

    fn run<N: Network>(self, net_cfg: N::Config) -> Result<F::Output> {
        let Scaled(cfg, f) = self;
        let factor = cfg.model.width_multiplier;
        if factor == 1.0 {
            return f.run::<N>(net_cfg);
        }
        let full = N::build(&net_cfg, &dnal_core::BackendKind::host_device())?;
        let arch = dnal_zoo::compare::scaled_architecture(&full, factor)?;
        let thin = full.prune(&arch)?.config().clone();
        f.run::<N>(thin)
    }
}

struct Train<'a>(&'a TrainConfig, &'a RunOptions);

impl WithNetwork for Train<'_> {
    type Output = Outcome;

    fn run<N: Network>(self, net_cfg: N::Config) -> Result<Outcome> {
        let Train(cfg, opts) = self;
        Runner::<N>::preflight(cfg, &net_cfg, opts)?;
        let data = data::load(&cfg.data, cfg.model.num_classes, cfg.seed)?;
        Runner::<N>::new(cfg, net_cfg, &data, opts)?.run()
    }
}
