//! SiLU, exact (erf) GELU, tanh GELU and quick GELU with vectorised exponentials, for f32
//! tensors on the CPU.
//!
//! candle evaluates them per element with the C library's scalar `expf` / libm's `erff` /
//! `tanhf`: the GEGLU feed-forward's erf was 4.5% of an SD 1.5 UNet step, the tanh GELU of
//! FLUX's MLPs 7% of a FLUX transformer call (perf, 2-core EPYC). These use the
//! exponential of [`super::softmax`] (8 or 16 lanes, chosen at run time) and split the tensor
//! over rayon's threads; other devices, dtypes and CPUs without AVX2 use candle's ops.
//!
//! erf is Abramowitz and Stegun's 7.1.26, `1 - t (a1 + t (a2 + ... a5 t)) exp(-x^2)` with
//! `t = 1 / (1 + p |x|)`: 1.5e-7 from the exact erf in exact arithmetic, 6e-7 at most once
//! evaluated in f32 (near 0 the result is a difference of numbers near 1). GELU
//! `x (1 + erf(x / sqrt 2)) / 2` is then within 6e-7 x |x| / 2 + 3e-7 x |GELU| of the exact
//! value (tested below against f64): a few ulp of the activations' scale, far below the
//! rounding of the matrix products around it.
//!
//! The tanh GELU, `x (1 + tanh(u)) / 2` with `u = sqrt(2 / pi) (x + 0.044715 x^3)`, is computed
//! as `x / (1 + exp(-2u))`, the same function (`1 + tanh(u) = 2 / (1 + exp(-2u))`) in the form of
//! SiLU: no cancellation, within a few ulp of the exact value (tested below). Quick GELU
//! (CLIP's `quick_gelu`, `x sigmoid(1.702 x)`) is `x / (1 + exp(-1.702 x))` in one pass instead
//! of candle's three ops and scalar `expf`.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::softmax::{simd_level, Simd};

/// SiLU, x * sigmoid(x).
pub fn silu(xs: &Tensor) -> candle_core::Result<Tensor> {
    if fast(xs) {
        xs.contiguous()?.apply_op1_no_bwd(&Elementwise(Kind::Silu))
    } else {
        xs.silu()
    }
}

/// GELU with the exact erf, as `torch.nn.functional.gelu`.
pub fn gelu_erf(xs: &Tensor) -> candle_core::Result<Tensor> {
    if fast(xs) {
        xs.contiguous()?
            .apply_op1_no_bwd(&Elementwise(Kind::GeluErf))
    } else {
        xs.gelu_erf()
    }
}

/// GELU with the tanh approximation, as `torch.nn.functional.gelu(x, approximate="tanh")` and
/// candle's `gelu`.
pub fn gelu_tanh(xs: &Tensor) -> candle_core::Result<Tensor> {
    if fast(xs) {
        xs.contiguous()?
            .apply_op1_no_bwd(&Elementwise(Kind::GeluTanh))
    } else {
        xs.gelu()
    }
}

/// Quick GELU, `x sigmoid(1.702 x)`, as transformers' `quick_gelu`.
pub fn quick_gelu(xs: &Tensor) -> candle_core::Result<Tensor> {
    if fast(xs) {
        xs.contiguous()?
            .apply_op1_no_bwd(&Elementwise(Kind::QuickGelu))
    } else {
        xs * candle_nn::ops::sigmoid(&(xs * QUICK as f64)?)?
    }
}

/// SiLU of `src` into `dst` (as long), at the CPU's SIMD level.
pub(crate) fn silu_slice(src: &[f32], dst: &mut [std::mem::MaybeUninit<f32>]) {
    apply(Kind::Silu, simd_level(), src, dst)
}

fn fast(xs: &Tensor) -> bool {
    xs.device().is_cpu() && xs.dtype() == DType::F32 && simd_level() != Simd::None
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Silu,
    GeluErf,
    GeluTanh,
    QuickGelu,
}

struct Elementwise(Kind);

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

impl CustomOp1 for Elementwise {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Silu => "sd-silu",
            Kind::GeluErf => "sd-gelu-erf",
            Kind::GeluTanh => "sd-gelu-tanh",
            Kind::QuickGelu => "sd-quick-gelu",
        }
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = super::contiguous_f32(self.name(), storage, layout)?;
        let mut dst = Vec::with_capacity(src.len());
        let level = simd_level();
        dst.spare_capacity_mut()[..src.len()]
            .par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| apply(self.0, level, s, d));
        // SAFETY: `apply` wrote every element.
        unsafe { dst.set_len(src.len()) };
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

fn apply(kind: Kind, level: Simd, src: &[f32], dst: &mut [std::mem::MaybeUninit<f32>]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level was detected on this CPU.
        Simd::Avx512 => unsafe { x86::apply_avx512(kind, src, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Simd::Avx2 => unsafe { x86::apply_avx2(kind, src, dst) },
        _ => {
            for (d, s) in dst.iter_mut().zip(src) {
                d.write(scalar(kind, *s));
            }
        }
    }
}

const A: [f32; 5] = [
    0.254_829_6,
    -0.284_496_74,
    1.421_413_8,
    -1.453_152_1,
    1.061_405_4,
];
const P: f32 = 0.327_591_1;
/// The tanh GELU's `-2 sqrt(2 / pi)` and cubic coefficient.
const MINUS_2_SQRT_2_OVER_PI: f32 = -1.595_769;
const CUBIC: f32 = 0.044_715;
/// Quick GELU's factor.
const QUICK: f32 = 1.702;

fn scalar(kind: Kind, x: f32) -> f32 {
    match kind {
        Kind::Silu => x / (1.0 + (-x).exp()),
        Kind::GeluErf => {
            let z = x * std::f32::consts::FRAC_1_SQRT_2;
            let a = z.abs();
            let t = 1.0 / (1.0 + P * a);
            let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
            let erf = (1.0 - poly * (-a * a).exp()).copysign(z);
            0.5 * x * (1.0 + erf)
        }
        Kind::GeluTanh => {
            let minus_2u = MINUS_2_SQRT_2_OVER_PI * (x + CUBIC * x * x * x);
            x / (1.0 + minus_2u.exp())
        }
        Kind::QuickGelu => x / (1.0 + (-QUICK * x).exp()),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::super::softmax::x86::{exp256, exp512};
    use super::{Kind, A, CUBIC, MINUS_2_SQRT_2_OVER_PI, P, QUICK};

    #[target_feature(enable = "avx2,fma")]
    unsafe fn one256(kind: Kind, x: __m256) -> __m256 {
        let one = _mm256_set1_ps(1.0);
        match kind {
            Kind::Silu => {
                let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), x));
                _mm256_div_ps(x, _mm256_add_ps(one, e))
            }
            Kind::GeluErf => {
                let z = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
                let sign = _mm256_and_ps(z, _mm256_set1_ps(-0.0));
                let a = _mm256_andnot_ps(_mm256_set1_ps(-0.0), z);
                let t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(P), a, one));
                let mut poly = _mm256_set1_ps(A[4]);
                for c in A[..4].iter().rev() {
                    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(*c));
                }
                poly = _mm256_mul_ps(poly, t);
                let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
                let erf = _mm256_or_ps(_mm256_fnmadd_ps(poly, e, one), sign);
                _mm256_mul_ps(
                    _mm256_mul_ps(_mm256_set1_ps(0.5), x),
                    _mm256_add_ps(one, erf),
                )
            }
            Kind::GeluTanh => {
                let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
                let inner = _mm256_fmadd_ps(_mm256_set1_ps(CUBIC), x3, x);
                let e = exp256(_mm256_mul_ps(_mm256_set1_ps(MINUS_2_SQRT_2_OVER_PI), inner));
                _mm256_div_ps(x, _mm256_add_ps(one, e))
            }
            Kind::QuickGelu => {
                let e = exp256(_mm256_mul_ps(_mm256_set1_ps(-QUICK), x));
                _mm256_div_ps(x, _mm256_add_ps(one, e))
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn one512(kind: Kind, x: __m512) -> __m512 {
        let one = _mm512_set1_ps(1.0);
        match kind {
            Kind::Silu => {
                let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
                _mm512_div_ps(x, _mm512_add_ps(one, e))
            }
            Kind::GeluErf => {
                let z = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
                let sign_bit = _mm512_set1_epi32(i32::MIN);
                let zi = _mm512_castps_si512(z);
                let sign = _mm512_and_si512(zi, sign_bit);
                let a = _mm512_castsi512_ps(_mm512_andnot_si512(sign_bit, zi));
                let t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(P), a, one));
                let mut poly = _mm512_set1_ps(A[4]);
                for c in A[..4].iter().rev() {
                    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(*c));
                }
                poly = _mm512_mul_ps(poly, t);
                let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
                let y = _mm512_castps_si512(_mm512_fnmadd_ps(poly, e, one));
                let erf = _mm512_castsi512_ps(_mm512_or_si512(y, sign));
                _mm512_mul_ps(
                    _mm512_mul_ps(_mm512_set1_ps(0.5), x),
                    _mm512_add_ps(one, erf),
                )
            }
            Kind::GeluTanh => {
                let x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
                let inner = _mm512_fmadd_ps(_mm512_set1_ps(CUBIC), x3, x);
                let e = exp512(_mm512_mul_ps(_mm512_set1_ps(MINUS_2_SQRT_2_OVER_PI), inner));
                _mm512_div_ps(x, _mm512_add_ps(one, e))
            }
            Kind::QuickGelu => {
                let e = exp512(_mm512_mul_ps(_mm512_set1_ps(-QUICK), x));
                _mm512_div_ps(x, _mm512_add_ps(one, e))
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn apply_avx2(kind: Kind, src: &[f32], dst: &mut [MaybeUninit<f32>]) {
        let body = src.len() - src.len() % 8;
        for i in (0..body).step_by(8) {
            let y = one256(kind, _mm256_loadu_ps(src.as_ptr().add(i)));
            _mm256_storeu_ps(dst.as_mut_ptr().add(i).cast(), y);
        }
        for (d, s) in dst[body..].iter_mut().zip(&src[body..]) {
            d.write(super::scalar(kind, *s));
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn apply_avx512(kind: Kind, src: &[f32], dst: &mut [MaybeUninit<f32>]) {
        let body = src.len() - src.len() % 16;
        for i in (0..body).step_by(16) {
            let y = one512(kind, _mm512_loadu_ps(src.as_ptr().add(i)));
            _mm512_storeu_ps(dst.as_mut_ptr().add(i).cast(), y);
        }
        if body < src.len() {
            let mask: __mmask16 = (1u16 << (src.len() - body)) - 1;
            let x = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(body));
            _mm512_mask_storeu_ps(dst.as_mut_ptr().add(body).cast(), mask, one512(kind, x));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn exact(kind: Kind, x: f32) -> f64 {
        let x = x as f64;
        match kind {
            Kind::Silu => x / (1.0 + (-x).exp()),
            // erf from its series / continued fraction is not in std: use statrs'.
            Kind::GeluErf => {
                0.5 * x * (1.0 + statrs::function::erf::erf(x / std::f64::consts::SQRT_2))
            }
            Kind::GeluTanh => {
                let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                0.5 * x * (1.0 + u.tanh())
            }
            Kind::QuickGelu => x / (1.0 + (-(super::QUICK as f64) * x).exp()),
        }
    }

    #[test]
    fn within_the_stated_error_of_the_exact_functions_at_every_level() {
        // -12..12 in uneven steps, and a length that leaves a tail at every width.
        let xs: Vec<f32> = (0..24_001)
            .map(|i| -12.0 + i as f32 * 0.001_000_3)
            .collect();
        for kind in [Kind::Silu, Kind::GeluErf, Kind::GeluTanh, Kind::QuickGelu] {
            for level in super::super::softmax::available_levels() {
                let mut out = vec![std::mem::MaybeUninit::new(f32::NAN); xs.len()];
                apply(kind, level, &xs, &mut out);
                for (x, y) in xs.iter().zip(&out) {
                    // SAFETY: `apply` wrote every element (and they were initialised anyway).
                    let y = unsafe { y.assume_init() } as f64;
                    let want = exact(kind, *x);
                    let tol = match kind {
                        Kind::Silu => 4e-7 * want.abs() + 1e-30,
                        Kind::GeluErf => 6e-7 * 0.5 * (*x as f64).abs() + 3e-7 * want.abs() + 1e-30,
                        Kind::GeluTanh => 4e-7 * (*x as f64).abs() + 1e-30,
                        Kind::QuickGelu => 4e-7 * (*x as f64).abs() + 1e-30,
                    };
                    assert!(
                        (y - want).abs() <= tol,
                        "{kind:?} {level:?} at {x}: {y} against {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn tensor_ops_match_candle_on_strided_input() {
        let dev = Device::Cpu;
        let mut rng = crate::samplers::TorchRng::new(5);
        let x = (rng.randn(&[3, 7, 37], &dev).unwrap() * 3.0)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        for (got, want) in [
            (silu(&x).unwrap(), x.silu().unwrap()),
            (gelu_erf(&x).unwrap(), x.gelu_erf().unwrap()),
            (gelu_tanh(&x).unwrap(), x.gelu().unwrap()),
            (
                quick_gelu(&x).unwrap(),
                (&x * candle_nn::ops::sigmoid(&(&x * 1.702).unwrap()).unwrap()).unwrap(),
            ),
        ] {
            assert_eq!(got.dims(), want.dims());
            let d = crate::modules::max_abs_diff(&got, &want);
            assert!(d < 2e-6, "differs from candle by {d}");
        }
    }
}
