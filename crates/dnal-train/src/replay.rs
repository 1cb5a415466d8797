//! Training steps recorded once as a graph of device launches and replayed (`train --graph`,
//! cuda and wgpu): a step issued by the host costs it far more than the device's time on small
//! networks (every operation passes through autodiff, fusion and CubeCL's server), while a
//! replay is one dispatch on cuda (a CUDA graph) and a re-encoding of the recorded launches on
//! wgpu.
//!
//! A [`Recorder`] serves one epoch of a phase that trains the weights alone (no search): it
//! runs [`WARMUP`] steps as usual (kernels compiled and tuned, memory pools filled), records
//! the next one, and replays it for every batch after. A replay reads and writes the buffers of
//! the recording, so each batch's images and labels and each step's learning rate are written
//! into the recorded input buffers first ([`dnal_kernels::overwrite`]); the weights, velocities
//! and BatchNorm statistics are updated in place by the step itself, and the loss and hits come
//! out in the recorded output buffers. Every step, warm-up, recorded or replayed, computes what
//! an unrecorded step computes, in the same order: a run with `--graph` is the run without it,
//! up to the rounding of the kernels burn's fusion and autotune pick for each.

use burn::backend::{Backend, BackendGraph, Dispatch};
use burn::prelude::*;
use dnal_data::HostBatch;
use dnal_kernels::{Rate, overwrite};
use dnal_zoo::Network;

use crate::error::{Result, TrainError};
use crate::replicas::{StepSpec, device_step};
use crate::sgd::Sgd;

/// Steps run as usual before the recording: the first of a phase differs (no velocity yet),
/// and burn's fusion settles on its fused kernels only from the second run of a sequence on.
pub(crate) const WARMUP: usize = 3;

/// The recorded step's input buffers.
struct Inputs {
    images: Tensor<4>,
    /// The labels as f32 (the overwrite works on floats), cast back inside the step.
    labels: Tensor<1>,
    lr: Tensor<1>,
}

/// One epoch's recorded step (see the module's documentation).
pub(crate) struct Recorder {
    /// The network's device without autodiff, whose stream records and replays.
    device: Device,
    inputs: Option<Inputs>,
    /// Steps run since the capture was prepared.
    warm: usize,
    graph: Option<BackendGraph<Dispatch>>,
    /// The recorded step's loss and hits, overwritten by every replay.
    output: Option<(Tensor<1>, Tensor<1>)>,
    /// A batch of another shape came (a last, smaller batch): the rest of the epoch is not
    /// recorded.
    done: bool,
}

impl Recorder {
    /// A recorder for the training device `device` (with or without autodiff).
    pub fn new(device: &Device) -> Self {
        Self {
            device: device.clone().inner(),
            inputs: None,
            warm: 0,
            graph: None,
            output: None,
            done: false,
        }
    }

    /// One step of `net` on `batch` with `sgd` at learning rate `lr`: the network after it,
    /// and the batch's loss and correct predictions (on the device).
    pub fn step<N: Network>(
        &mut self,
        net: N,
        batch: &HostBatch,
        sgd: &mut Sgd,
        lr: f64,
    ) -> Result<(N, Tensor<1>, Tensor<1>)> {
        let fits = self
            .inputs
            .as_ref()
            .is_none_or(|i| i.images.dims() == batch.shape);
        if self.done || !fits {
            self.finish();
            self.done = true;
            let b = batch.to_device(&self.device);
            return Ok(weight_step(net, b.images.autodiff(), b.labels, sgd, lr));
        }
        self.refresh(batch, lr)?;
        if self.warm < WARMUP {
            self.warm += 1;
            return Ok(self.run(net, sgd));
        }
        let dispatch = self.device.as_dispatch();
        let net = match self.graph {
            Some(_) => net,
            None => {
                Dispatch::graph_start_capture(dispatch).map_err(|e| failed("start", e))?;
                let (net, loss, hits) = self.run(net, sgd);
                let graph =
                    Dispatch::graph_stop_capture(dispatch).map_err(|e| failed("seal", e))?;
                self.graph = Some(graph);
                self.output = Some((loss, hits));
                net
            }
        };
        let graph = self.graph.as_ref().expect("recorded above");
        // SAFETY: the recording read and wrote the input buffers (held by `self`), the
        // network's parameters, velocities and running statistics (held by `net` and `sgd`,
        // which only this recording's replays and steps of this recorder touch for the rest of
        // the epoch) and its own outputs and intermediates (held by `self` and the graph). All
        // stay alive until `finish`, and every write of an input is issued on this stream,
        // before the replay.
        #[allow(unsafe_code)]
        unsafe { Dispatch::graph_replay(dispatch, graph) }.map_err(|e| failed("replay", e))?;
        let (loss, hits) = self.output.clone().expect("recorded with the graph");
        Ok((net, loss, hits))
    }

    /// `batch` and `lr` written into the input buffers (made from the first batch).
    fn refresh(&mut self, batch: &HostBatch, lr: f64) -> Result<()> {
        let b = batch.to_device(&self.device);
        let lr = Tensor::<1>::from_data(TensorData::new(vec![lr as f32], [1]), &self.device);
        let labels = b.labels.float();
        self.inputs = Some(match self.inputs.take() {
            None => {
                Dispatch::graph_prepare(self.device.as_dispatch())
                    .map_err(|e| failed("prepare", e))?;
                Inputs {
                    images: b.images,
                    labels,
                    lr,
                }
            }
            Some(i) => Inputs {
                images: overwrite(i.images, b.images),
                labels: overwrite(i.labels, labels),
                lr: overwrite(i.lr, lr),
            },
        });
        Ok(())
    }

    /// The step itself, on the input buffers.
    fn run<N: Network>(&self, net: N, sgd: &mut Sgd) -> (N, Tensor<1>, Tensor<1>) {
        let inputs = self.inputs.as_ref().expect("refreshed before a step");
        let images = inputs.images.clone().autodiff();
        let labels = inputs.labels.clone().int();
        weight_step(net, images, labels, sgd, Rate::Held(inputs.lr.clone()))
    }

    /// Ends the recording: the graph released, or a capture prepared but never opened closed.
    pub fn finish(&mut self) {
        if self.graph.take().is_none() && self.inputs.is_some() && !self.done {
            // Closing a capture that was prepared but not opened answers an error by design;
            // the stream is free again either way.
            let _ = Dispatch::graph_stop_capture(self.device.as_dispatch());
        }
        self.output = None;
        self.inputs = None;
        self.done = true;
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Forward, backward and the SGD step of a phase that trains the weights alone: the network
/// after it, and the batch's loss and correct predictions.
fn weight_step<N: Network>(
    net: N,
    images: Tensor<4>,
    labels: Tensor<1, Int>,
    sgd: &mut Sgd,
    lr: impl Into<Rate>,
) -> (N, Tensor<1>, Tensor<1>) {
    let spec = StepSpec {
        penalty: None,
        alpha_ids: None,
    };
    let out = device_step(&net, images, labels, &spec, None);
    (sgd.step(lr, net, out.rest), out.loss, out.hits)
}

fn failed(what: &str, e: impl std::fmt::Debug) -> TrainError {
    TrainError::from(dnal_core::CoreError::Backend(format!(
        "could not {what} the recorded training step: {e:?}; train without --graph"
    )))
}
