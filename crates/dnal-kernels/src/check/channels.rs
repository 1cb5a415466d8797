//! Channels placed into a wider stream and read back out of it.

use super::*;

/// The placement of a tensor's channels into a wider stream ([`crate::channels::place`]):
/// output and input gradient, subsampled by 2 (a CIFAR ResNet's shortcut, odd planes whose
/// last row and column are kept) or not, positions in one run or scattered, in either memory
/// layout.
pub fn channels(device: &Device, reference: &Device) -> Vec<Comparison> {
    let mut out = Vec::new();
    for (shape, width, pos, stride, channel_last) in [
        ([2, 3, 5, 5], 8, &[2, 3, 4][..], 2, false),
        ([2, 3, 5, 5], 8, &[1, 4, 6][..], 1, true),
        ([2, 5, 6, 6], 7, &[0, 1, 2, 3, 4][..], 2, false),
        ([3, 6, 7, 9], 10, &[9, 0, 3, 5, 7, 2][..], 2, true),
        // A ResNet-56 stage entry: 16 channels into the middle of 32, 32x32 to 16x16.
        (
            [4, 16, 32, 32],
            32,
            &(8..24).collect::<Vec<_>>()[..],
            2,
            true,
        ),
    ] {
        let run = |d: &Device| place_case(d, shape, width, pos, stride, channel_last);
        out.extend(compare(
            TOLERANCE,
            &format!(
                "{shape:?} placed at {pos:?} of {width}, stride {stride}, \
                 channel-last {channel_last}"
            ),
            &["output", "dx"],
            run(device),
            run(reference),
        ));
    }
    out
}

/// [`crate::channels::place`] on `device`: the output and the gradient of `sum(y * w)` for
/// the input, held channel-last where `channel_last` says.
fn place_case(
    device: &Device,
    [n, c, h, w]: [usize; 4],
    width: usize,
    pos: &[usize],
    stride: usize,
    channel_last: bool,
) -> Result<Vec<Vec<f32>>, String> {
    let device = device.clone().autodiff();
    let x = Tensor::<4>::from_data(
        TensorData::new(wave(n * c * h * w, 1.7), [n, c, h, w]),
        &device,
    );
    let x = laid_out(x, channel_last).require_grad();
    let y = crate::channels::place(x.clone(), pos, width, stride);
    let len = y.shape().num_elements();
    let weights = Tensor::<4>::from_data(TensorData::new(wave(len, 4.5), y.dims()), &device);
    let grads = (y.clone() * weights).sum().backward();
    Ok(vec![values(y)?, grad_of(&x, &grads)?])
}
