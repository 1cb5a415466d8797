//! The weights' (and alpha's) optimiser: SGD with momentum (dampening 0) and L2 weight decay,
//! computing what burn's `Sgd` computes. A step takes every parameter at once
//! ([`dnal_kernels::sgd_momentum_steps`]: on cuda and wgpu one operation, one launch per group
//! of parameters) where burn's `ModuleOptimizer` steps them one by one, seven tensor operations
//! each. Its state is recorded as burn's `ModuleOptimizer` records an `Sgd`'s (each velocity
//! under `momentum.velocity`, with the parameter's rank and path), so checkpoints written with
//! either load into the other.

use std::collections::HashMap;

use burn::backend::{DispatchTensor, TensorMetadata};
use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::optim::{GradientsParams, OptimizerRecord};
use burn::prelude::*;
use burn::tensor::GradientCheckpointingStrategy;
use dnal_kernels::{
    Rate, decayed, sgd_momentum_step, sgd_momentum_steps, step_layout, steps_together,
};

/// SGD with momentum `momentum` (none at 0) and weight decay `weight_decay` (none at 0), and
/// each parameter's velocity.
#[derive(Clone)]
pub struct Sgd {
    momentum: f64,
    weight_decay: f64,
    velocities: HashMap<ParamId, Velocity>,
}

/// A parameter's velocity and the parameter's path in the module (for the record).
#[derive(Clone)]
struct Velocity {
    tensor: DispatchTensor,
    path: String,
}

/// Where burn's `Sgd` state keeps the velocity, and where `ModuleOptimizer` keeps a
/// parameter's rank, under the parameter's id.
const VELOCITY: &str = "momentum.velocity";
const RANK: &str = "__rank";

impl Sgd {
    /// The optimiser; `momentum` and `weight_decay` are used as given (0 turns either off).
    pub fn new(momentum: f64, weight_decay: f64) -> Self {
        Self {
            momentum,
            weight_decay,
            velocities: HashMap::new(),
        }
    }

    /// Whether a step writes each parameter and velocity over themselves on cuda and wgpu (the
    /// joint step of [`dnal_kernels::sgd_momentum_steps`]): with momentum. Without, each
    /// parameter steps alone through burn's operations, which may write it into new memory.
    pub fn writes_in_place(&self) -> bool {
        self.momentum != 0.0
    }

    /// One step with learning rate `lr` (a number, or a tensor holding it) of every parameter
    /// of `module` that `grads` has a gradient for.
    pub fn step<M: Module>(
        &mut self,
        lr: impl Into<Rate>,
        module: M,
        mut grads: GradientsParams,
    ) -> M {
        let lr = lr.into();
        let mut gather = Gather {
            sgd: self,
            grads: &mut grads,
            path: Vec::new(),
            together: Vec::new(),
            alone: HashMap::new(),
        };
        let module = module.map(&mut gather);
        let Gather {
            together, alone, ..
        } = gather;
        let mut slots = Vec::with_capacity(together.len());
        let mut keys = Vec::with_capacity(together.len());
        for Gathered {
            id,
            slot,
            path,
            context,
        } in together
        {
            slots.push(slot);
            keys.push((id, path, context));
        }
        let results = sgd_momentum_steps(slots, lr.clone(), self.momentum, self.weight_decay);
        let mut stepped = HashMap::with_capacity(keys.len());
        for ((id, path, context), [param, tensor]) in keys.into_iter().zip(results) {
            let velocity = Velocity { tensor, path };
            self.velocities.insert(id, velocity);
            stepped.insert(id, (param, context));
        }
        module.map(&mut Replace {
            sgd: self,
            lr,
            stepped,
            alone,
        })
    }

    /// One parameter's step on its own (no momentum, or a backend without the joint step,
    /// where the first step has no velocity yet), given the parameter itself rather than a
    /// copy of its handle, so that the backend may write the result over it. `path` names a
    /// parameter without a velocity yet.
    fn step_alone<const D: usize>(
        &mut self,
        lr: &Rate,
        id: ParamId,
        value: Tensor<D>,
        grad: Tensor<D>,
        path: Option<String>,
    ) -> Tensor<D> {
        let (momentum, decay) = (self.momentum, self.weight_decay);
        let value = value.to_device(&grad.device());
        if momentum == 0.0 {
            let grad = decayed(grad, &value, decay);
            return value - lr.times(grad);
        }
        let (value, velocity, path) = match self.velocities.remove(&id) {
            Some(Velocity { tensor, path }) => {
                let velocity = Tensor::<D>::from_dispatch(tensor).to_device(&grad.device());
                let (value, velocity) =
                    sgd_momentum_step(value, grad, velocity, lr.clone(), momentum, decay);
                (value, velocity, path)
            }
            // The first step's velocity is the (decayed) gradient itself.
            None => {
                let velocity = decayed(grad, &value, decay);
                let value = value - lr.times(velocity.clone());
                (value, velocity, path.unwrap_or_default())
            }
        };
        let tensor = velocity.into_dispatch();
        let velocity = Velocity { tensor, path };
        self.velocities.insert(id, velocity);
        value
    }

    /// The velocities as burn's `ModuleOptimizer` records an `Sgd`'s state.
    pub fn to_record(&self) -> OptimizerRecord {
        let mut ids: Vec<&ParamId> = self.velocities.keys().collect();
        ids.sort_by_key(|id| id.val());
        let mut tensors = Vec::with_capacity(ids.len());
        let mut writer_scalars = Vec::with_capacity(ids.len());
        let mut paths = Vec::with_capacity(ids.len());
        for id in ids {
            let velocity = &self.velocities[id];
            let key = id.val();
            let (bytes, shape, dtype) = into_data(velocity).into_parts();
            tensors.push(burn_pack::Tensor::new(
                format!("{key}.{VELOCITY}"),
                dtype,
                shape,
                Some(key),
                bytes,
            ));
            writer_scalars.push((format!("{key}.{RANK}"), velocity.tensor.shape().num_dims()));
            paths.push((key.to_string(), velocity.path.clone()));
        }
        let mut writer = burn_pack::Writer::new(tensors);
        for (key, rank) in writer_scalars {
            writer = writer.with_scalar(&key, burn_pack::Scalar::from(rank));
        }
        for (key, path) in paths {
            writer = writer.with_metadata(&key, &path);
        }
        let bytes = writer
            .into_bytes()
            .expect("an optimiser record in memory is always written");
        OptimizerRecord::from_bytes(bytes).expect("the record just written reads back")
    }

    /// The optimiser with the velocities of `record` (written by [`Sgd::to_record`] or by
    /// burn's `ModuleOptimizer` for its `Sgd`). They are read onto the host's device and
    /// moved to each parameter's device at its next step; a velocity the record does not
    /// hold starts again, as at a first step.
    pub fn load_record(mut self, record: OptimizerRecord) -> Self {
        self.velocities.clear();
        let Ok(reader) = record
            .into_bytes()
            .map_err(|e| e.to_string())
            .and_then(|bytes| burn_pack::Reader::from_bytes(bytes).map_err(|e| e.to_string()))
        else {
            return self;
        };
        let paths = reader.metadata().clone();
        let Ok(tensors) = reader.into_tensors() else {
            return self;
        };
        let device = dnal_core::BackendKind::host_device();
        for tensor in tensors {
            let Ok((name, dtype, shape, param_id, bytes)) = tensor.into_parts() else {
                continue;
            };
            let (Some(key), true) = (param_id, name.ends_with(&format!(".{VELOCITY}"))) else {
                continue;
            };
            let data = TensorData::from_bytes(bytes, shape, dtype);
            let Some(tensor) = from_data(data, &device) else {
                continue;
            };
            let path = paths.get(&key.to_string()).cloned().unwrap_or_default();
            let velocity = Velocity { tensor, path };
            self.velocities.insert(ParamId::from(key), velocity);
        }
        self
    }
}

/// A velocity's values.
fn into_data(velocity: &Velocity) -> TensorData {
    let t = velocity.tensor.clone();
    match t.shape().num_dims() {
        1 => Tensor::<1>::from_dispatch(t).into_data(),
        2 => Tensor::<2>::from_dispatch(t).into_data(),
        3 => Tensor::<3>::from_dispatch(t).into_data(),
        4 => Tensor::<4>::from_dispatch(t).into_data(),
        5 => Tensor::<5>::from_dispatch(t).into_data(),
        _ => Tensor::<6>::from_dispatch(t).into_data(),
    }
}

/// A tensor of `data`'s rank (1 to 6) on `device`.
fn from_data(data: TensorData, device: &Device) -> Option<DispatchTensor> {
    Some(match data.shape().num_dims() {
        1 => Tensor::<1>::from_data(data, device).into_dispatch(),
        2 => Tensor::<2>::from_data(data, device).into_dispatch(),
        3 => Tensor::<3>::from_data(data, device).into_dispatch(),
        4 => Tensor::<4>::from_data(data, device).into_dispatch(),
        5 => Tensor::<5>::from_data(data, device).into_dispatch(),
        6 => Tensor::<6>::from_data(data, device).into_dispatch(),
        _ => return None,
    })
}

/// `module` with its parameters in the memory layout in which [`Sgd`] steps them without
/// copies ([`dnal_kernels::step_layout`]: convolution weights channel-last on cuda and wgpu).
/// The steps keep every parameter's layout, so a module laid out before its first forward pass
/// meets one layout throughout and burn's autotune tunes each convolution once. Elsewhere the
/// module is returned as it is.
pub fn lay_out<M: Module>(module: M) -> M {
    module.map(&mut Layout)
}

/// The mapper of [`lay_out`].
struct Layout;

impl ModuleMapper for Layout {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if D != 4 || !steps_together(&param.val()) {
            return param;
        }
        let (id, value, mapper) = param.consume();
        let context = Context::capture(&value);
        let value = step_layout(value.inner());
        Param::from_mapped_value(id, context.restore(value, id), mapper)
    }
}

/// What autodiff knew of a parameter, put back on its new value (as burn's optimisers do): a
/// parameter lifted back with the defaults would meet its inputs under two checkpointing
/// strategies at the next forward pass.
struct Context {
    require_grad: bool,
    distributed: bool,
    checkpointing: Option<GradientCheckpointingStrategy>,
}

impl Context {
    fn capture<const D: usize>(parameter: &Tensor<D>) -> Self {
        Self {
            require_grad: parameter.is_require_grad(),
            distributed: parameter.is_distributed(),
            checkpointing: parameter.gradient_checkpointing_strategy(),
        }
    }

    fn restore<const D: usize>(self, updated: Tensor<D>, id: ParamId) -> Tensor<D> {
        let mut parameter = Tensor::from_inner(updated);
        if let Some(strategy) = self.checkpointing {
            parameter = parameter.with_gradient_checkpointing_strategy(strategy);
        }
        if self.require_grad {
            parameter = parameter.require_grad();
        }
        if self.distributed {
            parameter = parameter.set_distributed(id);
        }
        parameter
    }
}

/// The first pass of a step: every parameter with a gradient that [`steps_together`] taken out
/// of the module to step with the others (so that the step holds its only handle and writes it
/// in place; its gradient stands in for it until the second pass), every other one's gradient
/// kept for the second pass.
struct Gather<'a> {
    sgd: &'a mut Sgd,
    grads: &'a mut GradientsParams,
    path: Vec<String>,
    together: Vec<Gathered>,
    alone: HashMap<ParamId, (DispatchTensor, Option<String>)>,
}

impl ModuleMapper for Gather<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let id = param.id;
        let Some(grad) = self.grads.remove::<D>(id) else {
            return param;
        };
        let together = self.sgd.momentum != 0.0 && steps_together(&param.val());
        if !together {
            // A velocity keeps its parameter's path: the path is joined only for a new one.
            let new = self.sgd.momentum != 0.0 && !self.sgd.velocities.contains_key(&id);
            let path = new.then(|| self.path.join("."));
            self.alone.insert(id, (grad.into_dispatch(), path));
            return param;
        }
        let (id, value, mapper) = param.consume();
        let context = Context::capture(&value);
        let stand_in = grad.clone();
        let device = grad.device();
        let value = value.inner().to_device(&device);
        // Taken out of the map, so that the step holds its only handle and writes it in place.
        let (velocity, path) = match self.sgd.velocities.remove(&id) {
            Some(Velocity { tensor, path }) => {
                (Tensor::<D>::from_dispatch(tensor).to_device(&device), path)
            }
            // The first step's velocity is the (decayed) gradient itself: the step adds
            // `momentum * 0` to it. Stepped with the others, the parameter keeps its memory
            // layout from the first step on.
            None => (
                Tensor::<D>::zeros(value.shape(), &device),
                self.path.join("."),
            ),
        };
        let slot = [value, grad, velocity].map(Tensor::into_dispatch);
        self.together.push(Gathered {
            id,
            slot,
            path,
            context,
        });
        Param::from_mapped_value(id, stand_in, mapper)
    }
}

/// A parameter that steps together with the others: its `[param, grad, velocity]`, and what
/// the step's results are filed under.
struct Gathered {
    id: ParamId,
    slot: [DispatchTensor; 3],
    path: String,
    context: Context,
}

/// The second pass: each parameter stepped together put in its place, each other one with a
/// gradient stepped on its own.
struct Replace<'a> {
    sgd: &'a mut Sgd,
    lr: Rate,
    stepped: HashMap<ParamId, (DispatchTensor, Context)>,
    alone: HashMap<ParamId, (DispatchTensor, Option<String>)>,
}

impl ModuleMapper for Replace<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if let Some((value, context)) = self.stepped.remove(&param.id) {
            let (id, _, mapper) = param.consume();
            let value = context.restore(Tensor::<D>::from_dispatch(value), id);
            return Param::from_mapped_value(id, value, mapper);
        }
        let Some((grad, path)) = self.alone.remove(&param.id) else {
            return param;
        };
        let (id, value, mapper) = param.consume();
        let context = Context::capture(&value);
        let grad = Tensor::<D>::from_dispatch(grad);
        let value = self.sgd.step_alone(&self.lr, id, value.inner(), grad, path);
        Param::from_mapped_value(id, context.restore(value, id), mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::decay::WeightDecayConfig;
    use burn::optim::momentum::MomentumConfig;
    use burn::optim::{ModuleOptimizer, SgdConfig};

    fn device() -> Device {
        Device::flex().autodiff()
    }

    fn burn_sgd(momentum: f64, weight_decay: f32) -> ModuleOptimizer {
        let mut cfg = SgdConfig::new();
        if momentum > 0.0 {
            cfg = cfg.with_momentum(Some(
                MomentumConfig::new()
                    .with_momentum(momentum)
                    .with_dampening(0.0),
            ));
        }
        if weight_decay > 0.0 {
            cfg = cfg.with_weight_decay(Some(WeightDecayConfig::new(weight_decay)));
        }
        cfg.init()
    }

    /// The gradients of `sum((layer(x))^2)` for the `i`-th input.
    fn grads(layer: &Linear, i: usize) -> GradientsParams {
        let d = device();
        let x = Tensor::<2>::from_data(
            TensorData::new(
                (0..12)
                    .map(|k| ((k * 7 + i * 3) % 11) as f32 * 0.1 - 0.5)
                    .collect(),
                [3, 4],
            ),
            &d,
        );
        let loss = layer.forward(x).powi_scalar(2).sum();
        GradientsParams::from_grads(loss.backward(), layer)
    }

    fn ours(optim: &mut Sgd, layer: Linear, i: usize) -> Linear {
        let g = grads(&layer, i);
        optim.step(0.05, layer, g)
    }

    fn theirs(optim: &mut ModuleOptimizer, layer: Linear, i: usize) -> Linear {
        let g = grads(&layer, i);
        optim.step(0.05, layer, g)
    }

    fn values(layer: &Linear) -> Vec<f32> {
        let mut v = layer.weight.val().into_data().try_to_vec::<f32>().unwrap();
        v.extend(
            layer
                .bias
                .as_ref()
                .unwrap()
                .val()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap(),
        );
        v
    }

    fn assert_same(what: &str, a: &Linear, b: &Linear) {
        let (a, b) = (values(a), values(b));
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                "{what}: {x} vs {y}"
            );
        }
    }

    #[test]
    fn steps_as_burns_sgd_does() {
        for (momentum, decay) in [(0.9, 5e-4), (0.9, 0.0), (0.0, 5e-4), (0.0, 0.0)] {
            let layer = LinearConfig::new(4, 3).init(&device());
            let start = values(&layer);
            let mut mine = Sgd::new(momentum, decay as f64);
            let mut burns = burn_sgd(momentum, decay);
            let (mut a, mut b) = (layer.clone(), layer);
            for i in 0..4 {
                a = ours(&mut mine, a, i);
                b = theirs(&mut burns, b, i);
                assert_same(
                    &format!("momentum {momentum}, decay {decay}, step {i}"),
                    &a,
                    &b,
                );
            }
            assert!(values(&a) != start, "the steps moved the parameters");
        }
    }

    #[test]
    fn state_moves_between_burns_sgd_and_this_one() {
        let layer = LinearConfig::new(4, 3).init(&device());
        // Two steps of burn's, its state into ours; and the reverse.
        let mut burns = burn_sgd(0.9, 5e-4);
        let mut mine = Sgd::new(0.9, 5e-4);
        let (mut a, mut b) = (layer.clone(), layer);
        for i in 0..2 {
            a = theirs(&mut burns, a, i);
            b = ours(&mut mine, b, i);
        }
        let mut mine_resumed = Sgd::new(0.9, 5e-4).load_record(burns.to_record());
        let mut burns_resumed = burn_sgd(0.9, 5e-4).load_record(mine.to_record());
        assert_eq!(mine_resumed.velocities.len(), 2, "both velocities read");
        let a2 = ours(&mut mine_resumed, a.clone(), 2);
        let b2 = theirs(&mut burns_resumed, b.clone(), 2);
        let a3 = theirs(&mut burns, a, 2);
        let b3 = ours(&mut mine, b, 2);
        assert_same("burn's state resumed here", &a2, &a3);
        assert_same("this state resumed in burn's", &b2, &b3);
        // The record through bytes, as a checkpoint keeps it.
        let bytes = mine.to_record().into_bytes().unwrap();
        let reread = Sgd::new(0.9, 5e-4).load_record(OptimizerRecord::from_bytes(bytes).unwrap());
        for (id, v) in &mine.velocities {
            let w = &reread.velocities[id];
            let rank = |v: &Velocity| v.tensor.shape().num_dims();
            assert_eq!((rank(v), &v.path), (rank(w), &w.path));
            assert_eq!(into_data(v), into_data(w));
        }
    }
}
