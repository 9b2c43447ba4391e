//! diffusers' `ResnetBlock2D` (default time-scale-shift, SiLU), shared by the UNet (with a
//! time embedding) and the VAE (without).

use candle_core::{Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::adapter::{linear, Linear};

use super::conv::Conv2d;
use super::group_norm::{group_norm, GroupNorm};
use crate::Result;

/// A convolution with "same" padding for odd kernels.
pub fn conv(cin: usize, cout: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: k / 2,
        stride,
        ..Default::default()
    };
    let inner = candle_nn::conv2d(cin, cout, k, cfg, vb.clone())?;
    Ok(Conv2d::adaptable(inner, &vb)?)
}

#[derive(Debug)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// The shape of one resnet block.
pub struct ResnetSpec {
    pub cin: usize,
    pub cout: usize,
    /// Width of the time embedding, if the block takes one.
    pub temb: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock {
    pub fn new(vb: VarBuilder, s: &ResnetSpec) -> Result<Self> {
        let shortcut = if s.cin != s.cout {
            Some(conv(s.cin, s.cout, 1, 1, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        let time_emb_proj = match s.temb {
            Some(t) => Some(linear(t, s.cout, vb.pp("time_emb_proj"))?),
            None => None,
        };
        Ok(Self {
            norm1: group_norm(s.groups, s.cin, s.eps, vb.pp("norm1"))?,
            conv1: conv(s.cin, s.cout, 3, 1, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: group_norm(s.groups, s.cout, s.eps, vb.pp("norm2"))?,
            conv2: conv(s.cout, s.cout, 3, 1, vb.pp("conv2"))?,
            shortcut,
            output_scale_factor: s.output_scale_factor,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(xs)?,
            None => xs.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}
