//! The whole pipeline on wgpu: every stage, derivation, pruning, evaluation and the report, on
//! a few hundred digits and the demo CNN at a quarter of its widths, following the same
//! trajectory as on flex; and dnal's CubeCL kernels against flex (`dnal_kernels::check`).
//!
//! Built only with `--features wgpu` (`cargo xtask test` runs it). Without a usable adapter the
//! test prints why it was skipped and passes, unless `DNAL_REQUIRE_WGPU=1` (set by CI, which
//! installs Mesa's software Vulkan) makes a missing adapter a failure.
#![cfg(feature = "wgpu")]

mod common;

use dnal_core::BackendKind;
use dnal_kernels::check::{self, Comparison};
use dnal_train::progress::paths;

use common::{demo, finished, history, opts};

/// Held by every test here for as long as it uses wgpu. The tests share one process's
/// autotune cache, where a key another test is still tuning runs its first candidate instead
/// (other rounding), and the reductions' finish setting, which a check that switches it
/// would change under another test's feet.
static GPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The wgpu device and the [`GPU`] lock, or `None` (the test skipped, saying why) where no
/// usable adapter is found; with `DNAL_REQUIRE_WGPU=1` (CI, which installs Mesa's software
/// Vulkan) a missing adapter fails the test instead.
fn wgpu_device() -> Option<(burn::prelude::Device, std::sync::MutexGuard<'static, ()>)> {
    let held = GPU
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match BackendKind::Wgpu.probe() {
        Ok(device) => Some((device, held)),
        Err(e) if std::env::var("DNAL_REQUIRE_WGPU").as_deref() == Ok("1") => {
            panic!("DNAL_REQUIRE_WGPU=1 but wgpu is unusable: {e}")
        }
        Err(e) => {
            eprintln!("skipped, no usable wgpu adapter: {e}");
            None
        }
    }
}

#[test]
fn the_pipeline_runs_on_wgpu_as_on_flex() {
    let Some((_device, _gpu)) = wgpu_device() else {
        return;
    };
    // Every batch of one size, so that each kernel is compiled once per network: 256 + 128
    // images in batches of 32. The demo CNN at a quarter of its widths (8-8-16-16, 15x fewer
    // MACs): on software Vulkan the convolutions, not the pipeline's logic, take the time.
    let cfg = demo(&[
        "model.width_multiplier=0.25",
        "data.train_limit=256",
        "data.test_limit=128",
        "data.batch_size=32",
        "data.eval_batch_size=32",
        "report.latency_batch=32",
        "weights.epochs=1",
        "arch.epochs=2",
        "final.epochs=1",
    ]);
    let run = |backend: BackendKind, graph: bool| {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path(), false, None);
        o.backend = backend;
        o.graph = graph;
        let report = finished(dnal_train::run(&cfg, &o).unwrap());
        assert!(dir.path().join(paths::PRUNED).join("model.bpk").is_file());
        let weights = tensors(&dir.path().join(paths::PRUNED));
        (report, history(dir.path()), weights)
    };
    let (gpu, gpu_log, gpu_weights) = run(BackendKind::Wgpu, false);
    // The weight and final stages' steps recorded once per epoch and replayed for the other
    // batches: the same run up to the last digits. Not to the bit: with fusion and autotune
    // the kernels a run gets depend on timing and on where the host reads results back, and
    // the replayed run reads back elsewhere than the plain one. On lavapipe, in some
    // processes (more often with `CUBECL_AUTOTUNE_SHORT_CIRCUIT=0`), the two had the same
    // training losses to the last digit and test losses that differed in the 9th, whichever
    // ran first. A replay that read stale inputs moved the weight stage's loss by 5 % (2.163
    // against 2.270).
    let (replayed, replayed_log, replayed_weights) = run(BackendKind::Wgpu, true);
    let (cpu, cpu_log, _) = run(BackendKind::Flex, false);
    assert!(gpu.pruned.is_some(), "the wgpu run derived and pruned");
    assert_same_run(&replayed_log, &gpu_log);
    assert!((replayed.baseline.top1 - gpu.baseline.top1).abs() <= 1.0);
    assert!(!gpu_weights.is_empty());
    assert_eq!(
        replayed_weights.keys().collect::<Vec<_>>(),
        gpu_weights.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &gpu_weights {
        let (r, g) = (le_floats(&replayed_weights[name]), le_floats(bytes));
        assert_eq!(r.len(), g.len(), "{name}");
        for (a, b) in r.iter().zip(&g) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{name}: {a} against {b}"
            );
        }
    }
    assert_eq!(gpu_log.len(), cpu_log.len());
    // Same seeded weights and data order; only the float rounding of the kernels differs.
    for (g, c) in gpu_log.iter().zip(&cpu_log) {
        let (g, c) = (g["loss"].as_f64().unwrap(), c["loss"].as_f64().unwrap());
        assert!(
            g.is_finite() && (g - c).abs() <= 0.02 * c.abs(),
            "loss {g} on wgpu, {c} on flex"
        );
    }
    let (g, c) = (gpu.baseline.top1, cpu.baseline.top1);
    assert!(
        (g - c).abs() <= 3.0,
        "dense top-1 {g} % on wgpu, {c} % on flex"
    );
}

/// Panics unless two runs' per-epoch records agree: the same fields, the same counts (open
/// gates per layer, MACs, epochs), accuracies within a point, and every other number within
/// a relative 1e-5.
fn assert_same_run(a: &[serde_json::Value], b: &[serde_json::Value]) {
    use serde_json::Value;
    fn same(key: &str, x: &Value, y: &Value) {
        match (x, y) {
            (Value::Number(m), Value::Number(n)) if m.is_u64() && n.is_u64() => {
                assert_eq!(m, n, "{key}")
            }
            (Value::Number(m), Value::Number(n)) => {
                let (m, n) = (m.as_f64().unwrap(), n.as_f64().unwrap());
                let within = if key.ends_with("top1") {
                    1.0
                } else {
                    1e-5 * n.abs().max(1e-3)
                };
                assert!((m - n).abs() <= within, "{key}: {m} against {n}");
            }
            (Value::Object(m), Value::Object(n)) => {
                assert_eq!(m.keys().collect::<Vec<_>>(), n.keys().collect::<Vec<_>>());
                for (k, v) in m {
                    same(&format!("{key}.{k}"), v, &n[k]);
                }
            }
            _ => assert_eq!(x, y, "{key}"),
        }
    }
    assert_eq!(a.len(), b.len(), "epochs recorded");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        same(&format!("record {i}"), x, y);
    }
}

/// Little-endian `f32` values (every tensor the saved networks hold is `F32`).
fn le_floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// The tensors of a saved network's `model.safetensors`: each name with its bytes. (The
/// file's header lists burn's metadata in no fixed order, so files are compared by content.)
fn tensors(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let file = std::fs::read(dir.join(dnal_zoo::network::SAFETENSORS_FILE)).unwrap();
    let len = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&file[8..8 + len]).unwrap();
    let data = &file[8 + len..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, entry)| {
            let at = &entry["data_offsets"];
            let (a, b) = (at[0].as_u64().unwrap(), at[1].as_u64().unwrap());
            (name.clone(), data[a as usize..b as usize].to_vec())
        })
        .collect()
}

/// Asserts that every comparison is within tolerance, listing those that are not.
fn all_within(comparisons: Vec<Comparison>) {
    assert!(!comparisons.is_empty());
    let failed: Vec<String> = comparisons
        .iter()
        .filter(|c| !c.ok())
        .map(|c| c.to_string())
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

fn flex() -> burn::prelude::Device {
    BackendKind::Flex.probe().unwrap()
}

/// BatchNorm's kernels with their reductions finished as `finish` says (for the whole
/// process, while the [`GPU`] lock keeps the other tests waiting), against flex; with
/// `depthwise`, the depthwise convolution's too (its weight gradient is such a reduction).
fn reductions_finished(finish: dnal_kernels::Finish, depthwise: bool) {
    if let Some((device, _gpu)) = wgpu_device() {
        dnal_kernels::set_reduction_finish(finish);
        let mut comparisons = check::batch_norm(&device, &flex());
        if depthwise {
            comparisons.extend(check::depthwise(&device, &flex()));
        }
        dnal_kernels::set_reduction_finish(dnal_kernels::Finish::Auto);
        all_within(comparisons);
    }
}

#[test]
fn batch_norm_kernels_on_wgpu_match_flex() {
    reductions_finished(dnal_kernels::Finish::Separate, false);
}

/// The kernels that finish a reduction in the launch of its partial sums, as cuda runs them
/// (BatchNorm's statistics and gradients, the depthwise weight gradient). WGSL does not
/// promise that one cube's writes reach another within a launch, so `auto` never takes them on
/// wgpu; a CPU driver's memory is coherent, so they are checked on a CPU adapter only
/// (`DNAL_WGPU_DEVICE=cpu`, as CI sets for its lavapipe).
#[test]
fn folded_reductions_on_a_cpu_adapter_match_flex() {
    if std::env::var("DNAL_WGPU_DEVICE").as_deref() == Ok("cpu") {
        reductions_finished(dnal_kernels::Finish::Folded, true);
    } else {
        eprintln!(
            "skipped: the folded kernels are checked on a CPU adapter (DNAL_WGPU_DEVICE=cpu)"
        );
    }
}

#[test]
fn depthwise_kernels_on_wgpu_match_burn_on_flex() {
    if let Some((device, _gpu)) = wgpu_device() {
        all_within(check::depthwise(&device, &flex()));
    }
}

#[test]
fn convolutions_on_wgpu_match_burn_on_flex() {
    if let Some((device, _gpu)) = wgpu_device() {
        all_within(check::convolution(&device, &flex()));
    }
}

#[test]
fn sgd_step_on_wgpu_matches_burn_on_flex() {
    if let Some((device, _gpu)) = wgpu_device() {
        all_within(check::sgd(&device, &flex()));
    }
}

#[test]
fn gate_factors_on_wgpu_match_burn_on_flex() {
    if let Some((device, _gpu)) = wgpu_device() {
        all_within(check::gates(&device, &flex()));
    }
}

#[test]
fn penalty_gradient_on_wgpu_matches_burn_on_flex() {
    if let Some((device, _gpu)) = wgpu_device() {
        all_within(check::penalty(&device, &flex()));
    }
}

/// The tally's buffer: values written at their places in one launch, twice into the same
/// buffer, the other places kept.
#[test]
fn values_written_into_a_buffer_on_wgpu_land_at_their_places() {
    if let Some((device, _gpu)) = wgpu_device() {
        let one = |v: f32| burn::prelude::Tensor::<1>::from_floats([v], &device);
        let read = |t: burn::prelude::Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
        let buffer = burn::prelude::Tensor::<1>::zeros([6], &device);
        let buffer =
            dnal_kernels::write_values(buffer, &[0, 2, 5], vec![one(1.5), one(2.5), one(-3.0)]);
        assert_eq!(read(buffer.clone()), vec![1.5, 0.0, 2.5, 0.0, 0.0, -3.0]);
        let buffer = dnal_kernels::write_values(buffer, &[1], vec![one(7.0)]);
        assert_eq!(read(buffer), vec![1.5, 7.0, 2.5, 0.0, 0.0, -3.0]);
    }
}

#[test]
fn loss_on_wgpu_matches_burn_on_flex() {
    if let Some((device, _gpu)) = wgpu_device() {
        all_within(check::loss(&device, &flex()));
    }
}

#[test]
fn channels_placed_on_wgpu_match_flex() {
    if let Some((device, _gpu)) = wgpu_device() {
        all_within(check::channels(&device, &flex()));
    }
}

/// A 3x3, a 1x1 and a depthwise convolution and a classifier: every kind of weight a
/// network steps.
#[derive(burn::module::Module, Debug)]
struct Kinds {
    full: dnal_zoo::ConvBnGate,
    pointwise: dnal_zoo::ConvBnGate,
    depthwise: dnal_zoo::ConvBnGate,
    classifier: burn::nn::Linear,
}

impl Kinds {
    fn new(device: &burn::prelude::Device) -> Self {
        use dnal_zoo::ConvBnGateConfig;
        Self {
            full: ConvBnGateConfig::new(3, 4).init(device),
            pointwise: ConvBnGateConfig::new(4, 6).with_kernel(1).init(device),
            depthwise: ConvBnGateConfig::new(6, 6)
                .with_depthwise(true)
                .init(device),
            classifier: burn::nn::LinearConfig::new(6, 10).init(device),
        }
    }

    fn forward(&self, x: burn::prelude::Tensor<4>) -> burn::prelude::Tensor<2> {
        use dnal_kernels::Activation::Relu;
        let x = self.full.forward_act(x, Relu);
        let x = self.pointwise.forward_act(x, Relu);
        let x = self.depthwise.forward_act(x, Relu);
        self.classifier.forward(dnal_kernels::global_avg_pool(x))
    }
}

/// A parameter: its shape, the strides of its memory and its values.
struct Parameter {
    dims: Vec<usize>,
    strides: Option<Vec<usize>>,
    values: Vec<f32>,
}

/// Every parameter of rank 2 or more of `net`, in module order.
fn parameters(net: &Kinds) -> Vec<Parameter> {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::prelude::Tensor;
    #[derive(Default)]
    struct Parameters(Vec<Parameter>);
    impl ModuleVisitor for Parameters {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if D >= 2 {
                let value = param.val();
                self.0.push(Parameter {
                    dims: value.dims().to_vec(),
                    strides: dnal_kernels::memory_strides(&value),
                    values: value.into_data().try_to_vec().unwrap(),
                });
            }
        }
    }
    let mut parameters = Parameters::default();
    net.visit(&mut parameters);
    parameters.0
}

/// A batch of 8x8 RGB images with fixed values, one per label.
fn batch(
    device: &burn::prelude::Device,
    labels: &[i64],
) -> (
    burn::prelude::Tensor<4>,
    burn::prelude::Tensor<1, burn::prelude::Int>,
) {
    use burn::prelude::{Int, Tensor, TensorData};
    let n = labels.len();
    let pixels = (0..n * 3 * 8 * 8)
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    let x = Tensor::<4>::from_data(TensorData::new(pixels, [n, 3, 8, 8]), device);
    let y = Tensor::<1, Int>::from_data(TensorData::new(labels.to_vec(), [n]), device);
    (x, y)
}

/// On a CubeCL device dnal's SGD keeps every parameter's memory layout, whatever layout its
/// gradient arrives in, and `sgd::lay_out` puts convolution weights channel-last (their
/// gradients' layout) before the first forward pass, their values unchanged. Then no step
/// changes any weight's strides, the first (stepped with a zero velocity) included: the layers
/// meet one weight layout throughout, and burn's autotune (whose keys include it) tunes each
/// of them once.
#[test]
fn weights_keep_one_memory_layout_from_the_first_step() {
    use burn::optim::GradientsParams;

    let Some((device, _gpu)) = wgpu_device() else {
        return;
    };
    let device = device.autodiff();
    let net = Kinds::new(&device);
    let dense = parameters(&net);
    let net = dnal_train::sgd::lay_out(net);
    let laid = parameters(&net);
    let values = |p: &[Parameter]| p.iter().map(|p| p.values.clone()).collect::<Vec<_>>();
    assert_eq!(values(&laid), values(&dense), "laying out changed values");
    // The 3x3 convolution's weight `[4, 3, 3, 3]`: `[C_out, k, k, C_in]` in memory.
    assert_eq!(laid[0].dims, [4, 3, 3, 3]);
    assert_eq!(laid[0].strides.as_deref(), Some(&[27, 1, 9, 3][..]));
    let layout = |p: Vec<Parameter>| {
        p.into_iter()
            .map(|p| (p.dims, p.strides))
            .collect::<Vec<_>>()
    };
    let laid = layout(laid);
    assert_eq!(laid.len(), 4, "{laid:?}");
    let (x, y) = batch(&device, &[1, 7]);
    let ce = burn::nn::loss::CrossEntropyLossConfig::new().init(&device);
    let mut sgd = dnal_train::sgd::Sgd::new(0.9, 5e-4);
    let mut net = net;
    for step in 1..=3 {
        let loss = ce.forward(net.forward(x.clone()), y.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        net = sgd.step(0.01, net, grads);
        assert_eq!(layout(parameters(&net)), laid, "after step {step}");
    }
}

/// A training step recorded once as a graph of launches (`burn::tensor::capture`; on wgpu
/// CubeCL re-encodes the recorded dispatches) and replayed trains as the steps themselves do:
/// dnal's SGD moves every parameter and velocity, and its BatchNorm kernels the running
/// statistics, in place, so each replay starts from where the last one left them. A step that
/// wrote any of them into new memory would replay from the recorded step's inputs.
#[test]
fn a_step_recorded_as_a_graph_replays_as_the_steps_it_stands_for() {
    let Some((device, _gpu)) = wgpu_device() else {
        return;
    };
    let device = device.autodiff();
    replays_as_its_steps(|| Kinds::new(&device), Kinds::forward, &device);
}

/// Six plain training steps of a network `build` makes against three warm-up steps of another
/// with the same values and three replays of its fourth, recorded: the same losses, parameters
/// and running statistics.
fn replays_as_its_steps<M>(
    build: impl Fn() -> M,
    forward: impl Fn(&M, burn::prelude::Tensor<4>) -> burn::prelude::Tensor<2>,
    device: &burn::prelude::Device,
) where
    M: burn::module::Module,
{
    use burn::optim::GradientsParams;

    let (x, y) = batch(device, &[1, 7, 3, 0]);
    let ce = burn::nn::loss::CrossEntropyLossConfig::new().init(device);
    replays_as_steps(
        build,
        || dnal_train::sgd::Sgd::new(0.9, 5e-4),
        |net, sgd| {
            let loss = ce.forward(forward(&net, x.clone()), y.clone());
            let grads = GradientsParams::from_grads(loss.backward(), &net);
            (sgd.step(0.05, net, grads), loss)
        },
        device,
    );
}

/// Six plain steps (`step` of a network `build` makes and of optimisers `optimisers` makes)
/// against three warm-up steps of another network with the same values and three replays of
/// its fourth, recorded: the same losses, and every float of the networks equal after them.
fn replays_as_steps<M, O>(
    build: impl Fn() -> M,
    optimisers: impl Fn() -> O,
    step: impl Fn(M, &mut O) -> (M, burn::prelude::Tensor<1>),
    device: &burn::prelude::Device,
) where
    M: burn::module::Module,
{
    let plain = dnal_train::sgd::lay_out(build());
    // The same values in a network of its own (a clone would share the running statistics'
    // state); the two share their first tensors, and each one's first step writes a copy.
    let recorded = build().load_record(plain.clone().into_record());
    // Six steps as they are.
    let (mut net, mut o) = (plain, optimisers());
    let mut losses: Vec<f32> = Vec::new();
    for _ in 0..6 {
        let (next, loss) = step(net, &mut o);
        net = next;
        losses.push(loss.into_scalar());
    }
    let last = dnal_train::graph_check::floats(&net);
    // Six steps recorded: three warm-up runs, then the recorded one replayed three times.
    let cell = std::cell::RefCell::new(Some((recorded, optimisers())));
    let graph_step = || {
        let (net, mut o) = cell.borrow_mut().take().unwrap();
        let (net, loss) = step(net, &mut o);
        *cell.borrow_mut() = Some((net, o));
        loss.inner()
    };
    // Recorded on the device under autodiff, whose backend records no graph itself.
    let mut graph = burn::tensor::capture(&device.clone().inner(), graph_step);
    assert!(graph.is_hardware(), "wgpu recorded no graph");
    // The recorded run records the launches without running them: the replays run steps 4-6.
    let mut replayed: Vec<f32> = Vec::new();
    for _ in 0..3 {
        // SAFETY: the graph reads and writes the step's inputs and the network and optimisers
        // in `cell`, all alive until it is dropped; nothing else runs meanwhile.
        #[allow(unsafe_code)]
        let loss = unsafe { graph.replay() };
        replayed.push(loss.clone().into_scalar());
    }
    drop(graph);
    let values = dnal_train::graph_check::floats(&cell.borrow().as_ref().unwrap().0);
    for (i, (a, b)) in losses[3..].iter().zip(&replayed).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
            "step {}: loss {a} vs {b}",
            i + 4
        );
    }
    assert_eq!(values.len(), last.len());
    for (k, (a, b)) in last.iter().zip(&values).enumerate() {
        let scale = a.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            diff <= 1e-5 * scale,
            "tensor {k} after six steps: {diff} apart"
        );
    }
}

/// `dnal-train check --only graph` on wgpu: the pipeline's own steps through its recorder
/// against the same steps issued one by one, for a weight, an architecture and a final stage.
#[test]
fn graph_check_on_wgpu_replays_as_plain_steps() {
    if let Some((device, _gpu)) = wgpu_device() {
        let comparisons = dnal_train::graph_check::graph(&device);
        assert_eq!(comparisons.len(), 6);
        all_within(comparisons);
    }
}

/// The architecture stage's step, recorded and replayed as `train --graph` does: gates
/// searching at a fixed temperature (their factors computed before the forward pass and given
/// as autodiff leaves, as training gives them on wgpu), cross-entropy plus the sparsity
/// penalty, alpha stepped by
/// its own SGD and the weights by theirs, for the paper's penalty (its gradient added to
/// alpha's after the backward pass, as training adds it on wgpu) and for the MACs-weighted,
/// tempered one with a MACs budget (through autodiff; active, and met, where its gradient is
/// zero).
#[test]
fn a_search_step_recorded_as_a_graph_replays_as_its_steps() {
    use burn::optim::GradientsParams;
    use dnal_core::{GateMode, GatedModel, MacsTarget, PenaltyConfig, SparsityPenalty};
    use dnal_core::{Relaxation, Weighting};
    use dnal_zoo::Network;

    let Some((device, _gpu)) = wgpu_device() else {
        return;
    };
    let device = device.autodiff();
    let config = dnal_zoo::PlainCnnConfig::new(3, 8, vec![4, 6], vec![0]).with_global_pool(true);
    let build = || {
        config
            .init(&device)
            .unwrap()
            .with_gate_mode(GateMode::Search)
            .with_temperature(3.0)
            .with_alpha(0.2)
    };
    let budget = |fraction| PenaltyConfig {
        relaxation: Relaxation::Tempered,
        weighting: Weighting::Macs,
        target: Some(MacsTarget::Excess { fraction }),
        ..PenaltyConfig::paper(0.5)
    };
    let (x, y) = batch(&device, &[1, 7, 3, 0]);
    for penalty in [PenaltyConfig::paper(0.05), budget(0.1), budget(0.9)] {
        let net = build();
        let penalty = SparsityPenalty::new(penalty, Some(&net.cost_model())).unwrap();
        let ids = net.alpha_ids();
        let folded = dnal_train::penalty::folds(&penalty, &net);
        assert_eq!(folded, penalty.per_channel(), "folded wherever it can be");
        // The gates' factors as leaves, as a searching step on wgpu takes them.
        assert!(
            dnal_train::leaves::fold(&net),
            "the factors are leaves on wgpu"
        );
        replays_as_steps(
            build,
            || {
                let sgd = || dnal_train::sgd::Sgd::new(0.9, 0.0);
                (sgd(), sgd())
            },
            |net, (alpha, weights)| {
                let (step, leaves) = dnal_train::leaves::install(&net);
                let logits = step.forward(x.clone());
                // Gone before the optimisers step: alpha then has no other handle, and SGD
                // writes it in place, where the recorded launches read it.
                drop(step);
                let (mut loss, _hits) = dnal_kernels::cross_entropy(logits, y.clone());
                if !folded {
                    loss = loss + penalty.loss(&net);
                }
                let mut grads = loss.backward();
                let carried = leaves.alpha_gradients(&mut grads);
                let mut g_alpha = GradientsParams::from_params(&mut grads, &net, &ids);
                carried.add_to(&mut g_alpha);
                if folded {
                    let value = dnal_train::penalty::add_gradients(&penalty, &net, &mut g_alpha);
                    loss = loss.detach() + value;
                }
                let rest = GradientsParams::from_grads(grads, &net);
                let net = alpha.step(0.05, net, g_alpha);
                (weights.step(0.05, net, rest), loss)
            },
            &device,
        );
    }
}

/// Exporting, classifying files and counting a network's MACs name no backend: in a build with
/// a GPU backend they still run on the CPU (burn's default device would be the GPU's, and on a
/// machine without its driver, a failure).
#[test]
fn host_side_work_stays_on_flex_in_a_gpu_build() {
    assert_ne!(burn::prelude::Device::default(), flex());
    assert_eq!(BackendKind::host_device(), flex());
}
