//! The kernel of the project's 2D convolution on the CPU, reading its weights where they are.
//!
//! candle's CPU conv2d re-lays out the kernel on every call and builds its im2col matrix
//! element by element in tiles of 512 output pixels. This one reads the kernel where it is, in
//! one of two ways:
//! - f32 images at least [`TAP_MIN_WIDTH`] wide: no im2col matrix at all. With the input
//!   zero-padded once, the output computed over the padded width (the k - 1 extra columns per
//!   row are dropped at the end) is a sum over the k x k taps of
//!   `W_tap (c_out x c_in) x X_shifted (c_in x oh * padded width)`, where each `X_shifted` is
//!   the padded input itself read from offset `kh * padded width + kw`: a plain strided
//!   matrix. So the convolution is k x k accumulating calls of the `gemm` crate (the GEMM
//!   candle's matmul runs on) without im2col's 9x copy: SD 1.5 VAE decode at 512x512 18.3 s ->
//!   15.0 s (2-core EPYC, f32).
//! - otherwise, the im2col matrix of a band of output rows, built with strided block copies,
//!   and one matmul per band.
//!
//! - f32 3x3 kernels on images at least [`WINOGRAD_MIN_SIZE`] on each side, unless turned off
//!   with [`set_conv_algorithm`]: Winograd's F(4x4, 3x3) (see [`super::winograd`]), a quarter
//!   of the multiplications.
//!
//! - f32 1x1 kernels: one GEMM per image ([`Pointwise`]).
//!
//! Other devices and dtypes, strided and padded 1x1 convolutions use candle's implementation.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_gemm::{cpu_bf16, gemm_parallelism, matmul, Lhs, PackedB, Start};
use super::winograd;

/// Largest im2col band, in elements (64 MB in f32).
const BAND_ELEMENTS: usize = 1 << 24;

/// Narrowest image the f32 tap convolution takes: on narrower ones its k - 1 dropped columns
/// per row and its k x k passes over the output cost more than building the im2col matrix
/// (SD 1.5 UNet, whose images are 64 wide at most: 11.5 s per step with im2col, 12.4 s with
/// taps; 2-core EPYC).
const TAP_MIN_WIDTH: usize = 96;

/// Smallest image side the Winograd path takes: below it the 36 GEMMs have too few tiles and
/// the weight transform dominates (SD 1.5 UNet step, 2-core EPYC: 10.36 s from side 8,
/// 8.78 s from 16, 9.47 s from 32).
const WINOGRAD_MIN_SIZE: usize = 16;

/// How 3x3 f32 convolutions are computed on the CPU, for the whole process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvAlgorithm {
    /// Winograd's F(4x4, 3x3) where the image is large enough, direct elsewhere.
    Winograd,
    /// Direct convolution only (tap GEMMs or im2col), summing the same products as PyTorch.
    Direct,
}

static WINOGRAD_OFF: AtomicBool = AtomicBool::new(false);

/// Chooses how 3x3 f32 convolutions are computed from now on.
pub fn set_conv_algorithm(algorithm: ConvAlgorithm) {
    WINOGRAD_OFF.store(algorithm == ConvAlgorithm::Direct, Ordering::Relaxed);
}

/// How 3x3 f32 convolutions are computed.
pub fn conv_algorithm() -> ConvAlgorithm {
    if WINOGRAD_OFF.load(Ordering::Relaxed) {
        ConvAlgorithm::Direct
    } else {
        ConvAlgorithm::Winograd
    }
}

/// Whether a 3x3 f32 convolution over an `h` x `w` image goes through Winograd.
fn takes_winograd(k: usize, h: usize, w: usize) -> bool {
    k == 3 && h.min(w) >= WINOGRAD_MIN_SIZE && conv_algorithm() == ConvAlgorithm::Winograd
}

/// A convolution with no adapters: the base layer of [`super::conv::Conv2d`] and the down
/// projection of LoCon adapters (kept apart from both so that neither imports the other).
#[derive(Debug, Clone)]
pub struct CpuConv2d {
    inner: candle_nn::Conv2d,
    /// Whether the fast paths apply (a square stride-1 kernel larger than 1x1 on the CPU).
    fast: bool,
    /// A 1x1 f32 kernel on the CPU (no padding, stride 1): one GEMM per image.
    pointwise: bool,
    /// f32: the tap convolution, which reads the weights where they are.
    taps: Option<TapConv>,
    k: usize,
    padding: usize,
}

impl CpuConv2d {
    pub fn new(inner: candle_nn::Conv2d) -> candle_core::Result<Self> {
        let cfg = *inner.config();
        let (_, _, kh, kw) = inner.weight().dims4()?;
        let plain = inner.weight().device().is_cpu()
            && kh == kw
            && cfg.stride == 1
            && cfg.dilation == 1
            && cfg.groups == 1;
        let fast = plain && kh > 1;
        let f32 = inner.weight().dtype() == DType::F32;
        let pointwise = plain && kh == 1 && cfg.padding == 0 && f32;
        let taps = if (fast || pointwise) && f32 {
            let bias = inner.bias().map(|b| b.to_vec1::<f32>()).transpose()?;
            Some(TapConv {
                bias: bias.map(std::sync::Arc::new),
                padding: cfg.padding,
            })
        } else {
            None
        };
        Ok(Self {
            inner,
            fast,
            pointwise,
            taps,
            k: kh,
            padding: cfg.padding,
        })
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The image is at least as large as the kernel once padded.
    fn fits(&self, xs: &Tensor) -> candle_core::Result<bool> {
        let (_, _, h, w) = xs.dims4()?;
        let (k, p) = (self.k, self.padding);
        Ok(h + 2 * p >= k && w + 2 * p >= k)
    }
}

impl Module for CpuConv2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let weight = self.inner.weight();
        let on_cpu_f32 = xs.device().is_cpu() && xs.dtype() == DType::F32;
        if let (true, true, Some(taps)) = (self.pointwise, on_cpu_f32, &self.taps) {
            return xs
                .contiguous()?
                .apply_op2_no_bwd(&weight.contiguous()?, &Pointwise(taps.clone(), cpu_bf16()));
        }
        if !self.fast || !xs.device().is_cpu() || xs.dtype() != weight.dtype() || !self.fits(xs)? {
            return self.inner.forward(xs);
        }
        let (_, _, h, w) = xs.dims4()?;
        match &self.taps {
            Some(taps) if takes_winograd(self.k, h, w) => xs
                .contiguous()?
                .apply_op2_no_bwd(&weight.contiguous()?, &Winograd(taps.clone())),
            Some(taps) if w >= TAP_MIN_WIDTH => xs
                .contiguous()?
                .apply_op2_no_bwd(&weight.contiguous()?, taps),
            _ => self.banded(xs),
        }
    }
}

impl CpuConv2d {
    /// The im2col matrix of a band of output rows at a time, one matmul per band.
    fn banded(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c_in, h, w) = xs.dims4()?;
        let (k, p) = (self.k, self.padding);
        let (oh, ow) = (h + 2 * p - k + 1, w + 2 * p - k + 1);
        let c_out = self.inner.weight().dim(0)?;
        let kk = k * k * c_in;
        // The weights as they are, (c_out, c_in * k * k): the im2col rows are (c_in, kh, kw).
        let flat = self.inner.weight().contiguous()?.reshape((c_out, kk))?;
        let padded = xs.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
        let rows = (BAND_ELEMENTS / (kk * ow)).clamp(1, oh);
        let mut items = Vec::with_capacity(b);
        for i in 0..b {
            let x = padded.get(i)?;
            let mut bands = Vec::with_capacity(oh.div_ceil(rows));
            let mut r0 = 0;
            while r0 < oh {
                let n = rows.min(oh - r0);
                let mut taps = Vec::with_capacity(k * k);
                for kh in 0..k {
                    for kw in 0..k {
                        taps.push(x.narrow(1, r0 + kh, n)?.narrow(2, kw, ow)?);
                    }
                }
                let cols = Tensor::stack(&taps, 1)?.reshape((kk, n * ow))?;
                bands.push(flat.matmul(&cols)?);
                r0 += n;
            }
            items.push(Tensor::cat(&bands, 1)?.reshape((c_out, oh, ow))?);
        }
        let out = Tensor::stack(&items, 0)?;
        match self.inner.bias() {
            Some(bias) => out.broadcast_add(&bias.reshape((1, c_out, 1, 1))?),
            None => Ok(out),
        }
    }
}

/// The operands of a convolution op.
struct ConvOperands<'a> {
    src: &'a [f32],
    weight: &'a [f32],
    /// The input's (b, c_in, h, w).
    dims: [usize; 4],
    c_out: usize,
    k: usize,
}

/// The f32 input and weights of a convolution op, checked to agree on c_in and to be a square
/// kernel of a size `k_ok` accepts.
fn conv_operands<'a>(
    op: &str,
    (storage, layout): (&'a CpuStorage, &Layout),
    (weight, weight_layout): (&'a CpuStorage, &Layout),
    k_ok: impl Fn(usize) -> bool,
) -> candle_core::Result<ConvOperands<'a>> {
    let src = super::contiguous_f32(op, storage, layout)?;
    let weight = super::contiguous_f32(op, weight, weight_layout)?;
    let (b, c_in, h, w) = layout.shape().dims4()?;
    let (c_out, w_in, k, k2) = weight_layout.shape().dims4()?;
    if c_in != w_in || k != k2 || !k_ok(k) {
        candle_core::bail!("{op}: input of {c_in} channels, kernel {w_in} x {k} x {k2}");
    }
    Ok(ConvOperands {
        src,
        weight,
        dims: [b, c_in, h, w],
        c_out,
        k,
    })
}

/// A stride-1 square f32 convolution as k x k accumulating GEMMs over the padded input (see
/// the module doc), reading the (c_out, c_in, k, k) weights in place.
#[derive(Debug, Clone)]
struct TapConv {
    bias: Option<std::sync::Arc<Vec<f32>>>,
    padding: usize,
}

impl CustomOp2 for TapConv {
    fn name(&self) -> &'static str {
        "sd-tap-conv2d"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ConvOperands {
            src,
            weight,
            dims: [b, c_in, h, w],
            c_out,
            k,
        } = conv_operands(
            self.name(),
            (storage, layout),
            (weight, weight_layout),
            |_| true,
        )?;
        let p = self.padding;
        let (hp, wp) = (h + 2 * p, w + 2 * p);
        let (oh, ow) = (hp + 1 - k, wp + 1 - k);
        let n = oh * wp;
        let mut out = Vec::with_capacity(b * c_out * oh * ow);
        // The padded image, with k - 1 spare zeros: the last tap reads that far past the last
        // plane, into columns that are dropped.
        let mut padded = vec![0f32; c_in * hp * wp + k - 1];
        let mut acc = Vec::<f32>::with_capacity(c_out * n);
        let parallelism = gemm_parallelism();
        for image in src.chunks(c_in * h * w) {
            padded[..c_in * hp * wp]
                .par_chunks_mut(hp * wp)
                .zip(image.par_chunks(h * w))
                .for_each(|(plane, src)| {
                    for (r, row) in src.chunks(w).enumerate() {
                        plane[(r + p) * wp + p..(r + p) * wp + p + w].copy_from_slice(row);
                    }
                });
            for tap in 0..k * k {
                let offset = (tap / k) * wp + tap % k;
                // SAFETY: dst is c_out x n with row stride n, inside `acc`'s capacity; lhs
                // element (co, ci) is weight[tap + (co * c_in + ci) * k * k], at most its last
                // element; rhs element (ci, j) is padded[offset + ci * hp * wp + j], whose
                // largest index (c_in - 1) * hp * wp + (k - 1) * (wp + 1) + n - 1 =
                // c_in * hp * wp + k - 2 is inside `padded`.
                unsafe {
                    gemm::gemm(
                        c_out,
                        n,
                        c_in,
                        acc.as_mut_ptr(),
                        1,
                        n as isize,
                        tap > 0,
                        weight.as_ptr().add(tap),
                        (k * k) as isize,
                        (c_in * k * k) as isize,
                        padded.as_ptr().add(offset),
                        1,
                        (hp * wp) as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        parallelism,
                    )
                };
            }
            // SAFETY: the first tap's GEMM (read_dst false) wrote all c_out * n elements.
            unsafe { acc.set_len(c_out * n) };
            let first = out.len();
            out.spare_capacity_mut()[..c_out * oh * ow]
                .par_chunks_mut(oh * ow)
                .zip(acc.par_chunks(n))
                .enumerate()
                .for_each(|(co, (dst, rows))| {
                    let bias = self.bias.as_ref().map_or(0.0, |b| b[co]);
                    for (d, s) in dst.chunks_mut(ow).zip(rows.chunks(wp)) {
                        for (d, s) in d.iter_mut().zip(&s[..ow]) {
                            d.write(s + bias);
                        }
                    }
                });
            // SAFETY: the loop above wrote the c_out * oh * ow elements after `first`.
            unsafe { out.set_len(first + c_out * oh * ow) };
            acc.clear();
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c_out, oh, ow))))
    }
}

/// A 1x1 stride-1 f32 convolution: `W (c_out x c_in) x X (c_in x h * w)` per image, one GEMM
/// into the output with the bias already in place (candle's conv2d copies the input into an
/// im2col matrix and re-lays out the kernel on every call). With `true`, the products have
/// bf16 operands ([`super::cpu_gemm`]).
#[derive(Debug, Clone)]
struct Pointwise(TapConv, bool);

impl CustomOp2 for Pointwise {
    fn name(&self) -> &'static str {
        "sd-pointwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ConvOperands {
            src,
            weight,
            dims: [b, c_in, h, w],
            c_out,
            ..
        } = conv_operands(
            self.name(),
            (storage, layout),
            (weight, weight_layout),
            |k| k == 1,
        )?;
        let n = h * w;
        let mut out = vec![0f32; b * c_out * n];
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), Shape::from((b, c_out, h, w))));
        }
        if let Some(bias) = &self.0.bias {
            out.par_chunks_mut(n)
                .enumerate()
                .for_each(|(i, plane)| plane.fill(bias[i % c_out]));
        }
        if c_in == 0 {
            return Ok((CpuStorage::F32(out), Shape::from((b, c_out, h, w))));
        }
        let parallelism = gemm_parallelism();
        for (dst, image) in out.chunks_mut(c_out * n).zip(src.chunks(c_in * n)) {
            if self.1 {
                let image = PackedB::new(image, c_in, n, n, 1);
                let weight = Lhs {
                    data: weight,
                    m: c_out,
                    ld: c_in,
                };
                matmul(weight, &image, Start::Existing, dst);
                continue;
            }
            // SAFETY: dst is c_out x n (row stride n), lhs the (c_out, c_in) weights (row
            // stride c_in), rhs the (c_in, n) image (row stride n): all inside their slices.
            unsafe {
                gemm::gemm(
                    c_out,
                    n,
                    c_in,
                    dst.as_mut_ptr(),
                    1,
                    n as isize,
                    true,
                    weight.as_ptr(),
                    1,
                    c_in as isize,
                    image.as_ptr(),
                    1,
                    n as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                )
            };
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c_out, h, w))))
    }
}

/// A 3x3 stride-1 f32 convolution by Winograd's F(4x4, 3x3) (see [`super::winograd`]).
#[derive(Debug, Clone)]
struct Winograd(TapConv);

impl CustomOp2 for Winograd {
    fn name(&self) -> &'static str {
        "sd-winograd-conv2d"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ConvOperands {
            src,
            weight,
            dims: [b, c_in, h, w],
            c_out,
            ..
        } = conv_operands(
            self.name(),
            (storage, layout),
            (weight, weight_layout),
            |k| k == 3,
        )?;
        let p = self.0.padding;
        if h + 2 * p < 3 || w + 2 * p < 3 {
            candle_core::bail!(
                "{}: a {h} x {w} input padded by {p} is smaller than 3 x 3",
                self.name()
            );
        }
        let dims = winograd::Dims {
            b,
            c_in,
            h,
            w,
            c_out,
        };
        let bias = self.0.bias.as_deref().map(Vec::as_slice);
        let (out, oh, ow) = winograd::conv3x3(src, dims, weight, bias, p);
        Ok((CpuStorage::F32(out), Shape::from((b, c_out, oh, ow))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    use crate::modules::max_abs_diff as max_diff;

    #[test]
    fn matches_candle_conv2d() {
        let dev = Device::Cpu;
        let mut rng = crate::samplers::TorchRng::new(3);
        for (c_in, c_out, h, w, k, p) in [
            (3, 5, 7, 9, 3, 1),
            (4, 6, 5, 4, 3, 0),
            (2, 3, 6, 6, 5, 2),
            (8, 4, 1, 1, 3, 1),
        ] {
            let x = rng.randn(&[2, c_in, h, w], &dev).unwrap();
            let wt = rng.randn(&[c_out, c_in, k, k], &dev).unwrap();
            let bias = rng
                .randn(&[c_out + 16], &dev)
                .unwrap()
                .narrow(0, 0, c_out)
                .unwrap();
            let cfg = candle_nn::Conv2dConfig {
                padding: p,
                ..Default::default()
            };
            let reference = candle_nn::Conv2d::new(wt, Some(bias), cfg);
            let ours = CpuConv2d::new(reference.clone()).unwrap();
            assert!(ours.fast && ours.taps.is_some());
            let want = reference.forward(&x).unwrap();
            let got = ours.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = max_diff(&got, &want);
            assert!(
                d < 1e-4,
                "conv {c_in}->{c_out} {h}x{w} k{k} p{p}: differs by {d}"
            );
            // The tap convolution at these (narrow) widths too.
            let tapped = x
                .apply_op2_no_bwd(reference.weight(), ours.taps.as_ref().unwrap())
                .unwrap();
            let d = max_diff(&tapped, &want);
            assert!(
                d < 1e-4,
                "taps {c_in}->{c_out} {h}x{w} k{k} p{p}: differs by {d}"
            );
            // f16 weights take the banded im2col path.
            let half = |t: &Tensor| t.to_dtype(candle_core::DType::F16).unwrap();
            let reference16 =
                candle_nn::Conv2d::new(half(reference.weight()), reference.bias().map(half), cfg);
            let ours16 = CpuConv2d::new(reference16.clone()).unwrap();
            assert!(ours16.fast && ours16.taps.is_none());
            let d = max_diff(
                &ours16
                    .forward(&half(&x))
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap(),
                &reference16
                    .forward(&half(&x))
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap(),
            );
            assert!(d < 0.1, "f16 conv {c_in}->{c_out} k{k}: differs by {d}");
        }
    }

    /// Images of 16 and more a side take the Winograd path (the process default) through the
    /// layer, with and without bias, odd channel counts and partial edge tiles.
    #[test]
    fn winograd_layer_matches_candle_conv2d() {
        let dev = Device::Cpu;
        let mut rng = crate::samplers::TorchRng::new(5);
        for (c_in, c_out, h, w, bias) in [(3, 5, 16, 16, true), (17, 9, 18, 21, false)] {
            let x = rng.randn(&[2, c_in, h, w], &dev).unwrap();
            // Weights at PyTorch's initial scale: outputs of about unit size.
            let scale = 1.0 / (9.0 * c_in as f64).sqrt();
            let wt = (rng.randn(&[c_out, c_in, 3, 3], &dev).unwrap() * scale).unwrap();
            let b = bias.then(|| rng.randn(&[c_out], &dev).unwrap());
            let cfg = candle_nn::Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            let reference = candle_nn::Conv2d::new(wt, b, cfg);
            let ours = CpuConv2d::new(reference.clone()).unwrap();
            assert!(takes_winograd(3, h, w));
            let d = max_diff(&ours.forward(&x).unwrap(), &reference.forward(&x).unwrap());
            assert!(d < 1e-4, "winograd {c_in}->{c_out} {h}x{w}: differs by {d}");
        }
        assert!(!takes_winograd(3, 15, 64) && !takes_winograd(5, 64, 64));
        // An empty batch gives an empty output.
        let reference = candle_nn::Conv2d::new(
            rng.randn(&[5, 3, 3, 3], &dev).unwrap(),
            None,
            candle_nn::Conv2dConfig {
                padding: 1,
                ..Default::default()
            },
        );
        let x = Tensor::zeros((0, 3, 16, 16), DType::F32, &dev).unwrap();
        let out = CpuConv2d::new(reference).unwrap().forward(&x).unwrap();
        assert_eq!(out.dims(), &[0, 5, 16, 16]);
    }

    /// 1x1 kernels, with and without bias, through the layer's GEMM path.
    #[test]
    fn pointwise_matches_candle_conv2d() {
        let dev = Device::Cpu;
        let mut rng = crate::samplers::TorchRng::new(6);
        for (c_in, c_out, h, w, bias) in [(3, 5, 7, 9, true), (17, 4, 1, 13, false)] {
            let x = rng.randn(&[2, c_in, h, w], &dev).unwrap();
            let wt = rng.randn(&[c_out, c_in, 1, 1], &dev).unwrap();
            let b = bias.then(|| rng.randn(&[c_out], &dev).unwrap());
            let reference = candle_nn::Conv2d::new(wt, b, Default::default());
            let ours = CpuConv2d::new(reference.clone()).unwrap();
            assert!(ours.pointwise && !ours.fast);
            let d = max_diff(&ours.forward(&x).unwrap(), &reference.forward(&x).unwrap());
            assert!(d < 1e-5, "1x1 {c_in}->{c_out} {h}x{w}: differs by {d}");
        }
        // An empty image is an empty output, not a panic.
        let reference = candle_nn::Conv2d::new(
            rng.randn(&[5, 3, 1, 1], &dev).unwrap(),
            Some(rng.randn(&[5], &dev).unwrap()),
            Default::default(),
        );
        let x = Tensor::zeros((1, 3, 0, 4), DType::F32, &dev).unwrap();
        let out = CpuConv2d::new(reference).unwrap().forward(&x).unwrap();
        assert_eq!(out.dims(), &[1, 5, 0, 4]);
    }

    /// With bf16 products: candle's conv2d of the rounded image and weights, the bias exact.
    #[test]
    fn pointwise_bf16_rounds_the_operands() {
        use crate::modules::bf16_rounded;
        let dev = Device::Cpu;
        let mut rng = crate::samplers::TorchRng::new(16);
        for (c_in, c_out, h, w) in [(3, 5, 7, 9), (77, 33, 5, 13)] {
            let x = rng.randn(&[2, c_in, h, w], &dev).unwrap();
            let wt = rng.randn(&[c_out, c_in, 1, 1], &dev).unwrap();
            let b = rng.randn(&[c_out], &dev).unwrap();
            let ours = CpuConv2d::new(candle_nn::Conv2d::new(
                wt.clone(),
                Some(b.clone()),
                Default::default(),
            ))
            .unwrap();
            let taps = ours.taps.clone().expect("f32 taps");
            let got = x.apply_op2_no_bwd(&wt, &Pointwise(taps, true)).unwrap();
            let rounded = candle_nn::Conv2d::new(bf16_rounded(&wt), Some(b), Default::default());
            let want = rounded.forward(&bf16_rounded(&x)).unwrap();
            let d = max_diff(&got, &want);
            assert!(
                d < 1e-4,
                "1x1 {c_in}->{c_out} {h}x{w} in bf16: differs by {d}"
            );
            // And the rounding shows: f32 products differ by more.
            let f32_diff = max_diff(&got, &ours.forward(&x).unwrap());
            assert!(f32_diff > 1e-4, "bf16 equals f32 ({f32_diff})");
        }
    }

    /// `cargo test --release -p sd-models --lib conv_kernel::tests::pointwise_timing --
    /// --ignored --nocapture`: the SD 1.5 UNet's 64x64 1x1 projection, ours and candle's.
    #[test]
    #[ignore]
    fn pointwise_timing() {
        let dev = Device::Cpu;
        let mut rng = crate::samplers::TorchRng::new(6);
        let x = rng.randn(&[2, 320, 64, 64], &dev).unwrap();
        let wt = rng.randn(&[320, 320, 1, 1], &dev).unwrap();
        let bias = rng.randn(&[320], &dev).unwrap();
        let reference = candle_nn::Conv2d::new(wt, Some(bias), Default::default());
        let ours = CpuConv2d::new(reference.clone()).unwrap();
        for _ in 0..5 {
            let t = std::time::Instant::now();
            ours.forward(&x).unwrap();
            let mine = t.elapsed();
            let t = std::time::Instant::now();
            reference.forward(&x).unwrap();
            println!("ours {mine:?}, candle {:?}", t.elapsed());
        }
    }

    #[test]
    fn bands_cover_every_output_row() {
        // 64 input channels: K = 576, so 300 output columns give bands of 97 rows.
        let dev = Device::Cpu;
        let mut rng = crate::samplers::TorchRng::new(4);
        let x = rng.randn(&[1, 64, 300, 300], &dev).unwrap();
        let wt = rng.randn(&[8, 64, 3, 3], &dev).unwrap();
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let reference = candle_nn::Conv2d::new(wt, None, cfg);
        let ours = CpuConv2d::new(reference.clone()).unwrap();
        let d = max_diff(&ours.forward(&x).unwrap(), &reference.forward(&x).unwrap());
        assert!(d < 1e-3, "banded conv differs by {d}");
    }
}
