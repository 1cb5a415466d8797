//! How dnal's CubeCL reductions over the batch (BatchNorm's channel statistics and their
//! gradients, the depthwise convolution's weight gradient) split a channel's elements among
//! cubes and units, and how their partial sums are added up at the end: by a second launch,
//! or, where the runtime hands one cube's writes to another within a launch, by the cube that
//! stores its partial sums last ([`Reduction::folds`]).

use std::sync::{Mutex, PoisonError};

use burn::tensor::StreamId;
use burn_cubecl::CubeDevice;
use burn_cubecl::cubecl::ir::features::AtomicUsage;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::server::Handle;
use burn_cubecl::cubecl::{self, calculate_cube_count_elemwise};
use burn_cubecl::tensor::CubeTensor;

use crate::Finish;

/// Most units per cube of the reduction kernels.
const MAX_BLOCK: usize = 256;
/// Fewest units per cube of the reduction kernels (a warp on NVIDIA).
const MIN_BLOCK: usize = 32;
/// Most cubes along one channel of a reduction.
const MAX_SPLITS: usize = 1024;
/// Elements each unit of a reduction adds up, where the channel is long enough.
const PER_UNIT: usize = 16;

/// How the reduction kernels cover `channels` channels of `count` elements each.
pub(super) struct Reduction {
    /// Units per cube (a power of two).
    pub(super) block: u32,
    /// Channels per cube (a power of two dividing `block`): 1 in channel-first memory; in
    /// channel-last memory enough for contiguous reads, up to `block`.
    pub(super) width: usize,
    /// Cubes along each channel.
    pub(super) splits: usize,
    /// Cubes across the channels.
    pub(super) groups: usize,
}

impl Reduction {
    /// A short channel (late layers, small batches) gets one small cube, so that units do not
    /// idle through the reduction's barriers; a long one cubes of 256 units, each unit adding
    /// about 16 elements, up to 1024 cubes along it (ResNet-50's first stage at batch 64,
    /// 64 channel-last channels of 802,816 elements, four lanes each: 1024 cubes of 196 rows
    /// per unit). The statistics kernel then adds up at most 1024 partial sums per channel.
    pub(super) fn new(channels: usize, count: usize, channel_last: bool) -> Self {
        let width = if channel_last {
            channels.next_power_of_two().min(MAX_BLOCK)
        } else {
            1
        };
        let lanes = count.div_ceil(4).next_power_of_two();
        let block = (width * lanes).clamp(MIN_BLOCK, MAX_BLOCK);
        let splits = count
            .div_ceil(block / width * PER_UNIT)
            .clamp(1, MAX_SPLITS);
        Reduction {
            block: block as u32,
            width,
            splits,
            groups: channels.div_ceil(width),
        }
    }

    /// The launch grid: `splits` cubes along each channel, `groups` across.
    pub(super) fn cubes(&self) -> CubeCount {
        CubeCount::new_2d(self.splits as u32, self.groups as u32)
    }

    /// Whether the reduction is finished in the launch that makes its partial sums, by the
    /// last of each group's cubes to store them ([`last_to_arrive`]), rather than by a second
    /// launch: as [`crate::set_reduction_finish`] says, by default where the runtime makes one
    /// cube's writes visible to another within a launch (cuda; not WGSL) and the finishing
    /// cube's share is small, at most 128 partial sums per unit (64 of BatchNorm's pairs).
    /// That share is work one cube does while the rest of the device waits; a second launch
    /// spreads it over one cube per channel, at the cost of one more launch, which a
    /// host-bound step pays for. `sums` is how many partial sums each cube stores per channel
    /// (BatchNorm's 2, the depthwise weight gradient's one per tap).
    pub(super) fn folds(&self, client: &cubecl::client::Client, sums: usize) -> bool {
        match crate::reduction_finish() {
            Finish::Separate => false,
            Finish::Folded => true,
            Finish::Auto => {
                let properties = client.properties();
                let counter = Type::atomic(u32::elem_type_native());
                properties.features.device_memory_scope
                    && properties
                        .atomic_type_usage(counter)
                        .contains(AtomicUsage::Add)
                    && self.width * self.splits * sums <= FOLD_SUMS_PER_UNIT * self.block as usize
            }
        }
    }
}

/// Most partial sums per unit that the cube finishing a folded reduction adds up.
const FOLD_SUMS_PER_UNIT: usize = 128;

/// The arrival counters of folded reductions on one device and stream: zero between launches
/// (the last cube to arrive at a counter sets it back), so one buffer serves the launches of
/// its stream one after another.
struct Arrivals {
    device: CubeDevice,
    stream: StreamId,
    counters: Handle,
    len: usize,
}

static ARRIVALS: Mutex<Vec<Arrivals>> = Mutex::new(Vec::new());

/// Fewest arrival counters reserved per device and stream.
const MIN_ARRIVALS: usize = 1024;

/// `groups` arrival counters at zero on `like`'s device, for a launch on the current stream.
pub(super) fn arrivals(like: &CubeTensor, groups: usize) -> BufferArg {
    let stream = StreamId::current();
    let mut all = ARRIVALS.lock().unwrap_or_else(PoisonError::into_inner);
    let at = all
        .iter()
        .position(|a| a.device == like.device && a.stream == stream);
    let counters = match at {
        Some(i) if all[i].len >= groups => all[i].counters.clone(),
        _ => {
            let len = groups.next_power_of_two().max(MIN_ARRIVALS);
            let counters = like
                .client
                .create_from_slice(u32::as_bytes(&vec![0u32; len]));
            let arrivals = Arrivals {
                device: like.device.clone(),
                stream,
                counters: counters.clone(),
                len,
            };
            match at {
                Some(i) => all[i] = arrivals,
                None => all.push(arrivals),
            }
            counters
        }
    };
    // SAFETY: the buffer holds at least `groups` counters.
    #[allow(unsafe_code)]
    unsafe {
        BufferArg::from_raw_parts(counters, groups)
    }
}

/// Whether this cube is the last of the `CUBE_COUNT_X` cubes of its group (counter `group`) to
/// get here, the same in every unit (a value control flow with barriers may depend on, WGSL's
/// uniformity included). What the group's cubes stored before they got here is visible to the
/// last one after it, where the runtime promises device memory scope (see
/// [`Reduction::folds`]). The last cube sets the counter back to zero for the next launch.
#[cube]
pub(super) fn last_to_arrive(counters: &mut [Atomic<u32>], group: usize) -> bool {
    let mut arrived = Shared::<[u32]>::new_slice(1usize);
    // Release: this cube's stores reach the device before it is counted.
    sync_storage();
    if UNIT_POS == 0 {
        arrived[0] = counters[group].fetch_add(1u32);
    }
    // Acquire: the stores of the cubes counted before are visible here.
    sync_storage();
    let last = workgroup_uniform_load(&arrived[0]) == CUBE_COUNT_X - 1;
    if last && UNIT_POS == 0 {
        counters[group].store(0u32);
    }
    last
}

/// Most units per cube of the kernels that finish a reduction, one cube per result.
const FINISH_UNITS: usize = 64;

/// The launch of a kernel that finishes `results` reductions of `splits` partial sums each:
/// one cube per result, of as many units as there are sums, up to 64 (a power of two, also
/// the kernel's compile-time `units`).
pub(super) fn finishing(
    client: &cubecl::client::Client,
    results: usize,
    splits: usize,
) -> (CubeCount, CubeDim, u32) {
    let units = splits.next_power_of_two().min(FINISH_UNITS) as u32;
    (
        calculate_cube_count_elemwise(client, results, CubeDim::new_1d(1)),
        CubeDim::new_1d(units),
        units,
    )
}

/// The sum of `values[first + i * step]` for `i < len`, added by the cube's `units` units
/// together: unit `u` adds the terms `u`, `u + units`, ... (neighbouring units, neighbouring
/// terms), then the units' totals are added in shared memory; valid in unit 0 (the others
/// hold a part). One unit adding up to 1,024 partial sums one after another, neighbouring
/// results' sums far apart in memory, took about 23 microseconds per launch on an H200.
#[cube]
pub(super) fn cube_sum(
    values: &[f32],
    first: usize,
    step: usize,
    len: usize,
    #[comptime] units: u32,
) -> f32 {
    let u = UNIT_POS_X as usize;
    let mut sum = 0.0f32;
    let mut i = u;
    while i < len {
        sum += values[first + i * step];
        i += units as usize;
    }
    let mut shared = Shared::<[f32]>::new_slice(units as usize);
    shared[u] = sum;
    sync_cube();
    // The cube's size read at run time: a variable started from a compile-time value would be
    // a constant the loop cannot halve.
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if u < half {
            let v = shared[u] + shared[u + half];
            shared[u] = v;
        }
        sync_cube();
        half /= 2;
    }
    shared[u]
}
