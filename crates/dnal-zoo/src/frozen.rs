//! A network frozen for inference on the CPU: its [`Graph`] (BatchNorm and gates folded into
//! the convolutions) lowered to a list of steps over host buffers, run by `dnal-kernels`'
//! fixed-weight layers without burn's tensors, modules or caches. What a deployment runs at
//! batch 1, where a burn forward pays per layer for parameter handles, device moves,
//! dispatch and cache lookups.
//!
//! The lowering undoes what the graph spells out for exporters: a convolution with zero
//! filters at some outputs (a branch that writes some positions of a residual stream) computes
//! only its other filters and adds them into those positions; a 1x1 convolution of 0/1
//! weights (widening, subsampling or tapping a stream) becomes a channel copy; an activation is
//! applied as its convolution's (or sum's) output is written, and a sum into a stream is done
//! in the stream's buffer when nothing reads the stream afterwards.

use std::borrow::Cow;

use burn::prelude::*;
use dnal_kernels::cpu::{self, Clamp, StreamSources};
use dnal_kernels::frozen::{FrozenConv, FrozenLinear};

use crate::error::{Result, ZooError};
use crate::graph::{ConvSpec, Graph, Op, Value};
use crate::network::Network;

/// A network's eval-mode computation with fixed weights, ready to run on host slices.
pub struct FrozenNetwork {
    input: [usize; 3],
    classes: usize,
    steps: Vec<Step>,
    /// Per-image shape of each graph value (the input and one per node).
    shapes: Vec<Shape>,
    output: Value,
    /// Whether some layer shares the work of one image among rayon's threads
    /// (`FrozenConv::shares_one_image`).
    shares_one_image: bool,
}

/// What a step computes.
enum Kind {
    /// `clamp(conv(x) + residual)`.
    Conv {
        input: Value,
        conv: FrozenConv,
        residual: Option<Value>,
        clamp: Clamp,
    },
    /// `clamp(stream + conv(x) at some channels)`; no convolution when it keeps no output, a
    /// stream of zeros when there is none.
    Into {
        input: Value,
        conv: Option<FrozenConv>,
        stream: Option<Value>,
        sources: StreamSources,
        clamp: Clamp,
    },
    /// Channels copied (or zero), subsampled by `stride`.
    Select {
        input: Value,
        sources: Vec<Option<usize>>,
        stride: usize,
    },
    /// `clamp(a + b)`.
    Add { a: Value, b: Value, clamp: Clamp },
    /// `clamp(x)`.
    Clamp { input: Value, clamp: Clamp },
    /// Max pooling `[kernel, stride, padding]`.
    MaxPool { input: Value, window: [usize; 3] },
    /// Mean of each map.
    GlobalAvgPool(Value),
    /// The same values, seen as `[N, F]`.
    Flatten(Value),
    /// `x W + b`.
    Linear { input: Value, linear: FrozenLinear },
}

/// A step, the value it writes, and the values whose last reader it is.
struct Step {
    kind: Kind,
    output: Value,
    /// Values no later step reads (dropped after this one; a stream among them is added
    /// into in place).
    last: Vec<Value>,
}

/// Per-image shape of a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Map([usize; 3]),
    Flat(usize),
}

impl Shape {
    fn len(self) -> usize {
        match self {
            Self::Map(s) => s.iter().product(),
            Self::Flat(f) => f,
        }
    }
}

impl FrozenNetwork {
    /// `net`'s eval-mode computation (running statistics, gate factors), frozen.
    pub fn new<N: Network>(net: &N) -> Result<Self> {
        Self::from_graph(&net.inference_graph()?)
    }

    /// A graph's computation, lowered (see the module's documentation).
    pub fn from_graph(graph: &Graph) -> Result<Self> {
        Lowering::new(graph).run()
    }

    /// `[C, H, W]` of one input image.
    pub fn input_shape(&self) -> [usize; 3] {
        self.input
    }

    /// Logits per image.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Steps it runs (after fusion).
    pub fn steps(&self) -> usize {
        self.steps.len()
    }

    /// Logits `[N, classes]` (row-major) of images `[N, C, H, W]` (row-major).
    pub fn forward(&self, images: &[f32]) -> Result<Vec<f32>> {
        let image: usize = self.input.iter().product();
        if images.is_empty() || !images.len().is_multiple_of(image) {
            return Err(ZooError::Input(format!(
                "{} values are not a whole, non-zero number of {:?} images; pass [N, C, H, W] \
                 row-major",
                images.len(),
                self.input
            )));
        }
        let batch = images.len() / image;
        let forward = || {
            let mut values: Vec<Option<Cow<[f32]>>> = vec![None; self.shapes.len()];
            values[0] = Some(Cow::Borrowed(images));
            for step in &self.steps {
                let out = self.run(step, batch, &mut values);
                for &v in &step.last {
                    values[v] = None;
                }
                values[step.output] = Some(Cow::Owned(out));
            }
            values[self.output]
                .take()
                .expect("the output is computed")
                .into_owned()
        };
        // Where layers share their work among rayon's threads, the forward runs on one of
        // them, which then takes part in each layer's work instead of waiting for the others
        // to wake (a thread outside the pool only waits); otherwise on this thread, sparing
        // the hand-off into the pool and back.
        Ok(if batch > 1 || self.shares_one_image {
            rayon::scope(|_| forward())
        } else {
            forward()
        })
    }

    /// [`FrozenNetwork::forward`] on a tensor `[N, C, H, W]`, giving `[N, classes]` on the
    /// same device.
    pub fn forward_tensor(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        let [n, c, h, w] = images.dims();
        if [c, h, w] != self.input {
            return Err(ZooError::Input(format!(
                "images of {:?}, but the network takes {:?}",
                [c, h, w],
                self.input
            )));
        }
        let device = images.device();
        let data = images
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| ZooError::Input(format!("images that are not numbers: {e:?}")))?;
        let logits = self.forward(&data)?;
        Ok(Tensor::from_data(
            TensorData::new(logits, [n, self.classes]),
            &device,
        ))
    }

    fn run(&self, step: &Step, batch: usize, values: &mut [Option<Cow<[f32]>>]) -> Vec<f32> {
        let map = |v: Value| match self.shapes[v] {
            Shape::Map(chw) => chw,
            Shape::Flat(_) => unreachable!("the lowering checked that value {v} is a map"),
        };
        let get = |v: Value| -> &[f32] { values[v].as_deref().expect("a value computed earlier") };
        match &step.kind {
            Kind::Conv {
                input,
                conv,
                residual,
                clamp,
            } => conv.forward(get(*input), *clamp, residual.map(get)),
            Kind::Into {
                input,
                conv,
                stream,
                sources,
                clamp,
            } => {
                let y = conv
                    .as_ref()
                    .map(|c| c.forward(get(*input), Clamp::NONE, None));
                let [width, h, w] = map(step.output);
                let mut s = match stream {
                    // The stream's own buffer when this is its last reader.
                    Some(s) if step.last.contains(s) => {
                        values[*s].take().expect("a stream").into_owned()
                    }
                    Some(s) => get(*s).to_vec(),
                    None => vec![0.0; batch * width * h * w],
                };
                let y = y.as_deref().unwrap_or(&[]);
                cpu::add_into_channels(&mut s, [width, h * w], y, sources, *clamp);
                s
            }
            Kind::Select {
                input,
                sources,
                stride,
            } => cpu::select_channels(get(*input), map(*input), sources, *stride),
            Kind::Add { a, b, clamp } => {
                let (a, b, clamp) = (get(*a), get(*b), *clamp);
                a.iter().zip(b).map(|(a, b)| clamp.apply(a + b)).collect()
            }
            Kind::Clamp { input, clamp } => {
                let clamp = *clamp;
                get(*input).iter().map(|&v| clamp.apply(v)).collect()
            }
            Kind::MaxPool { input, window } => {
                let [c, h, w] = map(*input);
                cpu::max_pool_values(get(*input), batch * c, [h, w], *window)
            }
            Kind::GlobalAvgPool(input) => {
                let [c, h, w] = map(*input);
                cpu::global_avg_pool_values(get(*input), batch * c, h * w)
            }
            Kind::Flatten(input) => match values[*input].take() {
                Some(v) if step.last.contains(input) => v.into_owned(),
                Some(v) => {
                    let copy = v.to_vec();
                    values[*input] = Some(v);
                    copy
                }
                None => unreachable!("a value computed earlier"),
            },
            Kind::Linear { input, linear } => linear.forward(get(*input)),
        }
    }
}

/// A convolution as the lowering sees it.
enum ConvClass {
    /// A 1x1 convolution of 0/1 weights, at most one 1 per output, no bias: a channel copy.
    Select(Vec<Option<usize>>),
    /// Some outputs have zero filters and bias: only `kept` are computed.
    Sparse(Vec<usize>),
    /// Every output computed.
    Dense,
}

fn classify(spec: &ConvSpec) -> ConvClass {
    let [out, per_in, kh, kw] = spec.shape;
    let filter = per_in * kh * kw;
    let rows = || spec.weight.chunks(filter.max(1)).take(out);
    let no_bias = spec.bias.iter().all(|&b| b == 0.0);
    if kh == 1 && kw == 1 && spec.groups == 1 && spec.padding == 0 && no_bias {
        let sources: Option<Vec<Option<usize>>> = rows()
            .map(|row| {
                let mut one = None;
                for (i, &w) in row.iter().enumerate() {
                    match w {
                        0.0 => {}
                        1.0 if one.is_none() => one = Some(i),
                        _ => return None,
                    }
                }
                Some(one)
            })
            .collect();
        if let Some(sources) = sources {
            return ConvClass::Select(sources);
        }
    }
    let kept: Vec<usize> = rows()
        .zip(&spec.bias)
        .enumerate()
        .filter(|(_, (row, b))| **b != 0.0 || row.iter().any(|&w| w != 0.0))
        .map(|(o, _)| o)
        .collect();
    if kept.len() < out && spec.groups == 1 {
        ConvClass::Sparse(kept)
    } else {
        ConvClass::Dense
    }
}

/// The graph, its readers per value, and what has been fused so far.
struct Lowering<'g> {
    graph: &'g Graph,
    /// Nodes that read each value (once per operand).
    readers: Vec<Vec<usize>>,
    /// Nodes computed as part of an earlier node's step.
    absorbed: Vec<bool>,
    shapes: Vec<Shape>,
}

impl<'g> Lowering<'g> {
    fn new(graph: &'g Graph) -> Self {
        let mut readers = vec![Vec::new(); graph.nodes.len() + 1];
        for (i, node) in graph.nodes.iter().enumerate() {
            for v in operands(&node.op) {
                readers[v].push(i);
            }
        }
        Self {
            graph,
            readers,
            absorbed: vec![false; graph.nodes.len()],
            // Filled in node order (a fused step's shape at its last node's value).
            shapes: std::iter::once(Shape::Map(graph.input))
                .chain(graph.nodes.iter().map(|_| Shape::Flat(0)))
                .collect(),
        }
    }

    fn op(&self, v: Value) -> Option<&'g Op> {
        v.checked_sub(1).map(|i| &self.graph.nodes[i].op)
    }

    /// The only reader of `v`, if it has exactly one.
    fn sole_reader(&self, v: Value) -> Option<usize> {
        match self.readers[v][..] {
            [r] => Some(r),
            _ => None,
        }
    }

    /// The activation node that alone reads `v`, absorbed: its clamp and value.
    fn fuse_act(&mut self, v: Value) -> (Clamp, Value) {
        let Some(r) = self.sole_reader(v).filter(|&r| !self.absorbed[r]) else {
            return (Clamp::NONE, v);
        };
        let clamp = match self.graph.nodes[r].op {
            Op::Relu(_) => dnal_kernels::Activation::Relu.clamp(),
            Op::Relu6(_) => dnal_kernels::Activation::Relu6.clamp(),
            _ => return (Clamp::NONE, v),
        };
        self.absorbed[r] = true;
        (clamp, r + 1)
    }

    /// For a convolution's value `v`, the sum that alone reads it, if the convolution should
    /// take it: the sum's other operand and the sum's value. A sum of two convolutions goes
    /// to the one that keeps fewer outputs (a branch into a stream, not a full-width
    /// shortcut), or to the later one.
    fn fuse_add(&mut self, v: Value) -> Option<(Value, Value)> {
        let r = self.sole_reader(v).filter(|&r| !self.absorbed[r])?;
        let Op::Add(a, b) = self.graph.nodes[r].op else {
            return None;
        };
        let other = if a == v { b } else { a };
        if other == v {
            return None;
        }
        if let Some(Op::Conv { conv, .. }) = self.op(other)
            && self.sole_reader(other) == Some(r)
            && other > v
        {
            let sparse = |c: &ConvSpec| matches!(classify(c), ConvClass::Sparse(_));
            let Some(Op::Conv { conv: mine, .. }) = self.op(v) else {
                return None;
            };
            if sparse(conv) && !sparse(mine) {
                return None;
            }
        }
        self.absorbed[r] = true;
        Some((other, r + 1))
    }

    fn name(&self, i: usize) -> &str {
        &self.graph.nodes[i].name
    }

    fn map(&self, i: usize, v: Value) -> Result<[usize; 3]> {
        match self.shapes[v] {
            Shape::Map(chw) => Ok(chw),
            Shape::Flat(_) => Err(self.error(i, "reads a flattened value as a map")),
        }
    }

    fn error(&self, i: usize, what: &str) -> ZooError {
        ZooError::Config(format!("graph node {}: {what}", self.name(i)))
    }

    fn run(mut self) -> Result<FrozenNetwork> {
        let graph = self.graph;
        // (position of the step's last node, step kind, its value, its per-image shape).
        let mut planned: Vec<(usize, Kind, Value, Shape)> = Vec::new();
        for (i, node) in graph.nodes.iter().enumerate() {
            if self.absorbed[i] {
                continue;
            }
            let v = i + 1;
            let (kind, out, shape) = match &node.op {
                Op::Conv { input, conv } => self.conv(i, *input, conv)?,
                Op::Relu(x) | Op::Relu6(x) => {
                    let act = match node.op {
                        Op::Relu(_) => dnal_kernels::Activation::Relu,
                        _ => dnal_kernels::Activation::Relu6,
                    };
                    let kind = Kind::Clamp {
                        input: *x,
                        clamp: act.clamp(),
                    };
                    (kind, v, self.shapes[*x])
                }
                Op::Add(a, b) => {
                    if self.shapes[*a] != self.shapes[*b] {
                        return Err(self.error(i, "adds values of different shapes"));
                    }
                    let shape = self.shapes[*a];
                    let (clamp, out) = self.fuse_act(v);
                    (
                        Kind::Add {
                            a: *a,
                            b: *b,
                            clamp,
                        },
                        out,
                        shape,
                    )
                }
                Op::MaxPool {
                    input,
                    kernel,
                    stride,
                    padding,
                } => {
                    let [c, h, w] = self.map(i, *input)?;
                    let (k, s, p) = (*kernel, *stride, *padding);
                    if k == 0 || s == 0 || h + 2 * p < k || w + 2 * p < k {
                        return Err(self.error(i, "a max pool whose window does not fit"));
                    }
                    let out = |n: usize| (n + 2 * p - k) / s + 1;
                    let kind = Kind::MaxPool {
                        input: *input,
                        window: [k, s, p],
                    };
                    (kind, v, Shape::Map([c, out(h), out(w)]))
                }
                Op::GlobalAvgPool(x) => {
                    let [c, _, _] = self.map(i, *x)?;
                    (Kind::GlobalAvgPool(*x), v, Shape::Map([c, 1, 1]))
                }
                Op::Flatten(x) => {
                    let len = self.shapes[*x].len();
                    (Kind::Flatten(*x), v, Shape::Flat(len))
                }
                Op::Linear {
                    input,
                    weight,
                    shape: [inputs, outputs],
                    bias,
                } => {
                    if self.shapes[*input] != Shape::Flat(*inputs) || bias.len() != *outputs {
                        return Err(self.error(i, "a linear layer that does not fit its input"));
                    }
                    let linear = FrozenLinear::new(weight.clone(), bias.clone(), *inputs)
                        .map_err(|e| self.error(i, &e))?;
                    let kind = Kind::Linear {
                        input: *input,
                        linear,
                    };
                    (kind, v, Shape::Flat(*outputs))
                }
            };
            self.shapes[out] = shape;
            planned.push((out - 1, kind, out, shape));
        }
        let output = graph.output();
        if output == 0 || self.shapes[output] != Shape::Flat(graph.classes) {
            return Err(ZooError::Config(format!(
                "the graph's output is not {} logits per image",
                graph.classes
            )));
        }
        // Steps run where their last node stands, so that every value they read is there.
        planned.sort_by_key(|p| p.0);
        let mut last_reader = vec![None; self.shapes.len()];
        for (s, (_, kind, _, _)) in planned.iter().enumerate() {
            for v in reads(kind) {
                last_reader[v] = Some(s);
            }
        }
        let steps: Vec<Step> = planned
            .into_iter()
            .enumerate()
            .map(|(s, (_, kind, output, _))| {
                let mut last: Vec<Value> = reads(&kind)
                    .filter(|&v| last_reader[v] == Some(s) && v != graph.output())
                    .collect();
                last.dedup();
                Step { kind, output, last }
            })
            .collect();
        let shares_one_image = steps.iter().any(|step| match &step.kind {
            Kind::Conv { conv, .. }
            | Kind::Into {
                conv: Some(conv), ..
            } => conv.shares_one_image(),
            _ => false,
        });
        Ok(FrozenNetwork {
            input: graph.input,
            classes: graph.classes,
            steps,
            shapes: self.shapes,
            output,
            shares_one_image,
        })
    }

    /// Node `i`, a convolution of `input`, with what it absorbs.
    fn conv(&mut self, i: usize, input: Value, spec: &ConvSpec) -> Result<(Kind, Value, Shape)> {
        let v = i + 1;
        let chw = self.map(i, input)?;
        let [width, per_in, kh, kw] = spec.shape;
        let name = self.name(i).to_string();
        let error = |e: String| ZooError::Config(format!("graph node {name}: {e}"));
        let params = [spec.stride, spec.padding, spec.groups];
        let shape = Shape::Map(FrozenConv::out_chw_of(spec.shape, params, chw).map_err(error)?);
        let frozen = |w: Vec<f32>, b: Vec<f32>, rows: usize| {
            FrozenConv::new(w, b, [rows, per_in, kh, kw], params, chw).map_err(error)
        };
        let kept = match classify(spec) {
            // A copy keeps its activation as a step of its own (no family clamps one).
            ConvClass::Select(sources) => {
                let stride = spec.stride;
                let select = Kind::Select {
                    input,
                    sources,
                    stride,
                };
                return Ok((select, v, shape));
            }
            ConvClass::Sparse(kept) => Some(kept),
            ConvClass::Dense => None,
        };
        let (other, after_add) = match self.fuse_add(v) {
            Some((other, sum)) => (Some(other), sum),
            None => (None, v),
        };
        let (clamp, out) = self.fuse_act(after_add);
        let kind = match kept {
            Some(kept) => {
                let filter = per_in * kh * kw;
                let weight: Vec<f32> = kept
                    .iter()
                    .flat_map(|&o| spec.weight[o * filter..(o + 1) * filter].iter().copied())
                    .collect();
                let bias = kept.iter().map(|&o| spec.bias[o]).collect();
                let conv = match kept.len() {
                    0 => None,
                    k => Some(frozen(weight, bias, k)?),
                };
                Kind::Into {
                    input,
                    conv,
                    stream: other,
                    sources: StreamSources::new(&kept, width),
                    clamp,
                }
            }
            None => Kind::Conv {
                input,
                conv: frozen(spec.weight.clone(), spec.bias.clone(), width)?,
                residual: other,
                clamp,
            },
        };
        Ok((kind, out, shape))
    }
}

/// The values an operation reads.
fn operands(op: &Op) -> Vec<Value> {
    match op {
        Op::Conv { input, .. }
        | Op::MaxPool { input, .. }
        | Op::Linear { input, .. }
        | Op::Relu(input)
        | Op::Relu6(input)
        | Op::GlobalAvgPool(input)
        | Op::Flatten(input) => vec![*input],
        Op::Add(a, b) => vec![*a, *b],
    }
}

/// The values a step reads.
fn reads(kind: &Kind) -> impl Iterator<Item = Value> + '_ {
    let (a, b): (Value, Option<Value>) = match kind {
        Kind::Conv {
            input, residual, ..
        } => (*input, *residual),
        Kind::Into { input, stream, .. } => (*input, *stream),
        Kind::Add { a, b, .. } => (*a, Some(*b)),
        Kind::Select { input, .. }
        | Kind::Clamp { input, .. }
        | Kind::MaxPool { input, .. }
        | Kind::Linear { input, .. }
        | Kind::GlobalAvgPool(input)
        | Kind::Flatten(input) => (*input, None),
    };
    std::iter::once(a).chain(b)
}
