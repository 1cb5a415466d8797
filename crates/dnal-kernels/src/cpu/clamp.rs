//! The activation of a conv -> BN unit as a clamp, and the form in which BatchNorm's backward
//! applies its gradient.

/// An activation that clamps to `[lo, hi]` (ReLU: `[0, inf]`, ReLU6: `[0, 6]`), applied with
/// BatchNorm so that it costs no pass of its own. NaN passes through unchanged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clamp {
    /// Lower bound.
    pub lo: f32,
    /// Upper bound.
    pub hi: f32,
}

impl Clamp {
    /// No clamp (the identity).
    pub const NONE: Clamp = Clamp {
        lo: f32::NEG_INFINITY,
        hi: f32::INFINITY,
    };

    /// Whether this is the identity.
    pub fn is_none(self) -> bool {
        self == Self::NONE
    }

    /// `v` clamped to `[lo, hi]`. Always inlined, so that it vectorizes inside
    /// `widest_simd!` bodies.
    #[inline(always)]
    pub fn apply(self, v: f32) -> f32 {
        if v < self.lo {
            self.lo
        } else if v > self.hi {
            self.hi
        } else {
            v
        }
    }

    /// Whether the gradient flows through an output `y` (strictly inside the bounds, as
    /// burn's ReLU backward has it).
    #[inline]
    pub fn passes(self, y: f32) -> bool {
        y > self.lo && y < self.hi
    }
}

/// The clamp a BatchNorm applied to its affine output `x * scale + shift` (per channel, as
/// [`normalize`](super::normalize) computes it without a residual): its backward passes recompute the clamp's
/// gradient mask from `x` with the same arithmetic, bit for bit, instead of reading the output.
#[derive(Debug, Clone, Copy)]
pub struct ClampOf<'a> {
    /// Per-channel factor.
    pub scale: &'a [f32],
    /// Per-channel offset.
    pub shift: &'a [f32],
    /// The activation.
    pub clamp: Clamp,
}

/// The clamp whose gradient BatchNorm's backward applies to its output gradient first, or
/// `None` when nothing was clamped.
pub type ClampGrad<'a> = Option<ClampOf<'a>>;
