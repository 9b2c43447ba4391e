//! Group normalisation, optionally followed by SiLU, as one operation on f32 CPU tensors.
//!
//! candle-nn's `GroupNorm` is a chain of tensor operations, each with an output the size of its
//! input (centred values, their squares, the normalised values, times the weight, plus the
//! bias), and the SiLU after it a sixth: at the SDXL VAE's 1024x1024 stage they are 1 GB each,
//! and three of them live at once set the decode's peak (5.1 GB of live blocks against 2.6 GB
//! with this operation). Here each (image, group) takes two reads for its mean and variance
//! (both summed in f64, centred before squaring) and one read and one write for
//! `x * scale + shift` per channel (`scale = weight / sqrt(var + eps)`, as PyTorch's CPU
//! kernel computes it), SiLU applied on the way. Other devices and dtypes use candle-nn's.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::activation;

/// diffusers' `GroupNorm` (affine), with a fused SiLU.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// A group norm of `channels` in `groups` with weights `weight` and `bias` from `vb`.
pub fn group_norm(
    groups: usize,
    channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> candle_core::Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    Ok(GroupNorm {
        inner,
        weight,
        bias,
        groups,
        eps,
    })
}

impl GroupNorm {
    /// The group norm followed by SiLU.
    pub fn forward_silu(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if self.fused(xs) {
            self.apply(xs, true)
        } else {
            activation::silu(&self.inner.forward(xs)?)
        }
    }

    fn fused(&self, xs: &Tensor) -> bool {
        xs.device().is_cpu()
            && xs.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && self.bias.dtype() == DType::F32
            && xs.rank() >= 3
    }

    fn apply(&self, xs: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let op = FusedGroupNorm {
            groups: self.groups,
            eps: self.eps,
            silu,
        };
        xs.contiguous()?
            .apply_op3_no_bwd(&self.weight.contiguous()?, &self.bias.contiguous()?, &op)
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if self.fused(xs) {
            self.apply(xs, false)
        } else {
            self.inner.forward(xs)
        }
    }
}

struct FusedGroupNorm {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// Values normalised at a time before SiLU (on the stack).
const BLOCK: usize = 1024;

impl CustomOp3 for FusedGroupNorm {
    fn name(&self) -> &'static str {
        "sd-group-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = x_layout.dims();
        let (batch, channels) = (dims[0], dims[1]);
        let plane: usize = dims[2..].iter().product();
        if self.groups == 0
            || channels % self.groups != 0
            || w_layout.shape().elem_count() != channels
            || b_layout.shape().elem_count() != channels
        {
            candle_core::bail!(
                "sd-group-norm: {channels} channels in {} groups, weight {:?}, bias {:?}",
                self.groups,
                w_layout.dims(),
                b_layout.dims()
            );
        }
        let x = super::contiguous_f32(self.name(), x, x_layout)?;
        let w = super::contiguous_f32(self.name(), w, w_layout)?;
        let b = super::contiguous_f32(self.name(), b, b_layout)?;
        let per_group = channels / self.groups * plane;
        let mut out = Vec::<f32>::with_capacity(x.len());
        if per_group > 0 {
            out.spare_capacity_mut()[..batch * channels * plane]
                .par_chunks_mut(per_group)
                .zip(x.par_chunks(per_group))
                .enumerate()
                .for_each(|(unit, (dst, src))| {
                    let c0 = unit % self.groups * (channels / self.groups);
                    let (mean, var) = moments(src);
                    let rstd = 1.0 / (var + self.eps).sqrt();
                    for (c, (dst, src)) in dst.chunks_mut(plane).zip(src.chunks(plane)).enumerate()
                    {
                        let scale = rstd * w[c0 + c] as f64;
                        let shift = b[c0 + c] as f64 - mean * scale;
                        affine(src, dst, scale as f32, shift as f32, self.silu);
                    }
                });
        }
        // SAFETY: the chunks cover the output and `affine` wrote every element.
        unsafe { out.set_len(x.len()) };
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

/// Mean and (biased) variance of `xs`, summed in f64 over blocks of f32 partial sums, the
/// variance from values centred on the mean.
fn moments(xs: &[f32]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs
        .chunks(BLOCK)
        .map(|c| lane_sum(c, |x| x) as f64)
        .sum::<f64>()
        / n;
    let centre = mean as f32;
    let var = xs
        .chunks(BLOCK)
        .map(|c| lane_sum(c, |x| (x - centre) * (x - centre)) as f64)
        .sum::<f64>()
        / n;
    (mean, var)
}

/// The sum of `f(x)` over `xs`, in 16 f32 lanes that the compiler vectorises.
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += f(*x);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|x| f(*x)).sum();
    lanes.iter().sum::<f32>() + tail
}

/// `dst = x * scale + shift`, then SiLU if `silu`.
fn affine(src: &[f32], dst: &mut [MaybeUninit<f32>], scale: f32, shift: f32, silu: bool) {
    if !silu {
        for (d, x) in dst.iter_mut().zip(src) {
            d.write(x * scale + shift);
        }
        return;
    }
    let mut block = [0f32; BLOCK];
    for (dst, src) in dst.chunks_mut(BLOCK).zip(src.chunks(BLOCK)) {
        let block = &mut block[..src.len()];
        for (y, x) in block.iter_mut().zip(src) {
            *y = x * scale + shift;
        }
        activation::silu_slice(block, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn norm(groups: usize, channels: usize, seed: u64) -> GroupNorm {
        let dev = Device::Cpu;
        let mut rng = crate::samplers::TorchRng::new(seed);
        let weight = (rng.randn(&[channels], &dev).unwrap() + 1.0).unwrap();
        let bias = rng.randn(&[channels], &dev).unwrap();
        let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, 1e-6)
            .unwrap();
        GroupNorm {
            inner,
            weight,
            bias,
            groups,
            eps: 1e-6,
        }
    }

    #[test]
    fn matches_candle_with_and_without_silu() {
        let dev = Device::Cpu;
        let mut rng = crate::samplers::TorchRng::new(9);
        // Odd planes and channel counts, a plane longer than a block, an offset mean, rank 3
        // and 4, and a strided input.
        for (shape, groups) in [
            (vec![2, 6, 5, 7], 3),
            (vec![1, 32, 33, 35], 8),
            (vec![3, 10, 1], 5),
            (vec![2, 4, 2100], 2),
        ] {
            let g = norm(groups, shape[1], 3);
            let x = ((rng.randn(&shape, &dev).unwrap() * 3.0).unwrap() + 5.0).unwrap();
            for x in [
                x.clone(),
                x.transpose(0, 1)
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap(),
            ] {
                let want = g.inner.forward(&x).unwrap();
                let got = g.forward(&x).unwrap();
                assert_eq!(got.dims(), want.dims());
                let d = crate::modules::max_abs_diff(&got, &want);
                assert!(d < 2e-5, "{shape:?}: differs from candle by {d}");
                let got = g.forward_silu(&x).unwrap();
                let d = crate::modules::max_abs_diff(&got, &want.silu().unwrap());
                assert!(d < 2e-5, "{shape:?} with SiLU: differs from candle by {d}");
            }
        }
    }

    #[test]
    fn variance_of_values_far_from_zero() {
        // A mean 1e4 times the spread: sums of squares about zero would lose it in f32.
        let xs: Vec<f32> = (0..5000).map(|i| 1e4 + (i % 7) as f32 - 3.0).collect();
        let (mean, var) = moments(&xs);
        let exact_mean = xs.iter().map(|x| *x as f64).sum::<f64>() / 5000.0;
        let exact_var = xs
            .iter()
            .map(|x| (*x as f64 - exact_mean).powi(2))
            .sum::<f64>()
            / 5000.0;
        assert!(
            (mean - exact_mean).abs() < 1e-6,
            "{mean} against {exact_mean}"
        );
        assert!(
            (var - exact_var).abs() < 1e-4 * exact_var,
            "{var} against {exact_var}"
        );
    }

    #[test]
    fn bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let g = norm(4, 8, 1);
        let x = Tensor::zeros((2, 6, 3, 3), DType::F32, &dev).unwrap();
        assert!(g.forward(&x).is_err());
        let empty = Tensor::zeros((0, 8, 3, 3), DType::F32, &dev).unwrap();
        assert_eq!(g.forward(&empty).unwrap().dims(), &[0, 8, 3, 3]);
    }
}
