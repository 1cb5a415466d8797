//! A network's eval-mode forward as inference code runs it (`dnal-train predict`, a report's
//! latency): frozen ([`crate::FrozenNetwork`]) where the images are f32 on flex and dnal's
//! kernels are on, burn's forward otherwise (other backends and dtypes, or with the kernels
//! turned off).

use burn::prelude::*;

use crate::error::Result;
use crate::network::Network;

/// A network ready for inference.
pub struct Inference<N> {
    net: N,
    #[cfg(feature = "flex")]
    frozen: Option<crate::FrozenNetwork>,
}

impl<N: Network> Inference<N> {
    /// `net` in eval mode, also frozen when `device` is flex (and the network's graph freezes:
    /// every family's does).
    pub fn new(net: &N, device: &Device) -> Result<Self> {
        let net = net.valid();
        #[cfg(feature = "flex")]
        {
            let frozen = if dnal_kernels::is_flex(device) {
                Some(crate::FrozenNetwork::new(&net)?)
            } else {
                None
            };
            Ok(Self { net, frozen })
        }
        #[cfg(not(feature = "flex"))]
        {
            let _ = device;
            Ok(Self { net })
        }
    }

    /// Logits `[N, classes]` of images `[N, C, H, W]`.
    pub fn forward(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        #[cfg(feature = "flex")]
        if let Some(frozen) = &self.frozen
            && dnal_kernels::takes_fast_path(&images)
        {
            return frozen.forward_tensor(images);
        }
        Ok(self.net.forward(images))
    }

    /// Whether [`Inference::forward`] runs the frozen network on f32 flex images.
    pub fn is_frozen(&self) -> bool {
        #[cfg(feature = "flex")]
        {
            self.frozen.is_some()
        }
        #[cfg(not(feature = "flex"))]
        {
            false
        }
    }
}
