//! The kernel of the project's 2D convolution: on the CPU it keeps its weights in matmul
//! layout.
//!
//! candle's CPU conv2d re-lays out the kernel on every call and builds its im2col matrix
//! element by element in tiles of 512 output pixels. This one flattens the kernel once, builds
//! the im2col matrix of a band of output rows with strided block copies, and runs one matmul
//! per band. Other devices, strided and 1x1 convolutions use candle's implementation.

use candle_core::{Module, Tensor};

/// Largest im2col band, in elements (64 MB in f32).
const BAND_ELEMENTS: usize = 1 << 24;

/// A convolution with no adapters: the base layer of [`super::conv::Conv2d`] and the down
/// projection of LoCon adapters (kept apart from both so that neither imports the other).
#[derive(Debug, Clone)]
pub struct CpuConv2d {
    inner: candle_nn::Conv2d,
    /// The kernel as (c_out, k * k * c_in), ordered (kh, kw, c_in), when the fast path applies.
    flat: Option<Tensor>,
    k: usize,
    padding: usize,
}

impl CpuConv2d {
    pub fn new(inner: candle_nn::Conv2d) -> candle_core::Result<Self> {
        let cfg = *inner.config();
        let (c_out, c_in, kh, kw) = inner.weight().dims4()?;
        let fast = inner.weight().device().is_cpu()
            && kh == kw
            && kh > 1
            && cfg.stride == 1
            && cfg.dilation == 1
            && cfg.groups == 1;
        let flat = if fast {
            Some(
                inner
                    .weight()
                    .permute((0, 2, 3, 1))?
                    .reshape((c_out, kh * kw * c_in))?
                    .contiguous()?,
            )
        } else {
            None
        };
        Ok(Self {
            inner,
            flat,
            k: kh,
            padding: cfg.padding,
        })
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
}

impl Module for CpuConv2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let flat = match &self.flat {
            Some(f) if xs.device().is_cpu() && xs.dtype() == f.dtype() => f,
            _ => return self.inner.forward(xs),
        };
        let (b, c_in, h, w) = xs.dims4()?;
        let (k, p) = (self.k, self.padding);
        if h + 2 * p < k || w + 2 * p < k {
            return self.inner.forward(xs);
        }
        let (oh, ow) = (h + 2 * p - k + 1, w + 2 * p - k + 1);
        let c_out = flat.dim(0)?;
        let kk = k * k * c_in;
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
                let cols = Tensor::cat(&taps, 0)?.reshape((kk, n * ow))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

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
            assert!(ours.flat.is_some());
            let want = reference.forward(&x).unwrap();
            let got = ours.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = max_diff(&got, &want);
            assert!(
                d < 1e-4,
                "conv {c_in}->{c_out} {h}x{w} k{k} p{p}: differs by {d}"
            );
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
