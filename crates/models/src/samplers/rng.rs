//! Torch-compatible CPU random number generator (mt19937 + torch randn).
//!
//! `TorchRng::new(seed)` behaves like `torch.Generator("cpu").manual_seed(seed)` and
//! [`TorchRng::randn_vec`] draws the same float32 numbers as `torch.randn(n, generator=g)`,
//! including how the generator state carries over between calls. What torch does (PyTorch
//! 2.x, `aten/src/ATen/native/cpu/DistributionTemplates.h`, checked against torch 2.15):
//!
//! - The engine is a 32-bit Mersenne Twister seeded with the low 32 bits of the seed
//!   (`manual_seed(2**32 + 5)` equals `manual_seed(5)`).
//! - Tensors of 16 or more elements: every element first gets a uniform float
//!   `(next_u32 & 0xFFFFFF) * 2^-24`; then each full block of 16 is turned into normals with
//!   Box-Muller (`j < 8`: `sqrt(-2 ln(1 - u[j])) * cos(2 pi u[j + 8])`, `j + 8`: the same with
//!   `sin`); if the length is not a multiple of 16 the last 16 elements are drawn again as
//!   uniforms and transformed the same way. On x86 torch does this math with AVX2 float
//!   polynomials (Pommier's `avx_mathfun` `log256_ps` / `sincos256_ps`, compiled with fused
//!   multiply-adds); we evaluate the same polynomials in the same order so the numbers match
//!   bit for bit, not just to 1e-6.
//! - Tensors of fewer than 16 elements take a scalar path: each element is a double-precision
//!   Box-Muller sample from two 53-bit uniforms (each from two u32 draws); the `sin` half of
//!   every pair is cached in the generator and returned by the next scalar draw, even by a
//!   later `randn` call.

use candle_core::{Device, Tensor};

const N: usize = 624;
const M: usize = 397;

/// A `torch.Generator("cpu")` look-alike: mt19937 state plus torch's cached normal sample.
#[derive(Clone, Debug)]
pub struct TorchRng {
    state: Box<[u32; N]>,
    index: usize,
    /// The second Box-Muller value of the last scalar-path pair (torch's
    /// `next_double_normal_sample`), handed out by the next scalar-path draw.
    next_normal: Option<f64>,
}

impl TorchRng {
    /// Equivalent of `torch.Generator("cpu").manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        let mut state = Box::new([0u32; N]);
        // torch's mt19937 keeps only the low 32 bits of the seed.
        state[0] = seed as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        TorchRng {
            state,
            index: N,
            next_normal: None,
        }
    }

    fn twist(&mut self) {
        let mt = &mut self.state;
        for i in 0..N {
            let y = (mt[i] & 0x8000_0000) | (mt[(i + 1) % N] & 0x7fff_ffff);
            let mut v = mt[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            mt[i] = v;
        }
        self.index = 0;
    }

    /// The next raw 32-bit output of the Mersenne Twister.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// torch's `uniform_real_distribution<float>(0, 1)`: 24 random bits scaled by 2^-24.
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// torch's `uniform_real_distribution<double>(0, 1)`: 53 bits of `random64()`, where
    /// `random64()` puts the first u32 draw in the high half.
    fn uniform_f64(&mut self) -> f64 {
        let hi = u64::from(self.next_u32());
        let lo = u64::from(self.next_u32());
        let v = (hi << 32) | lo;
        (v & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// torch's `normal_distribution<double>` (mean 0, std 1) with the generator's cache.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (1.0 - u2).ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// Equivalent of `torch.randn(n, generator=g, dtype=torch.float32)`.
    pub fn randn_vec(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            normal_fill_16(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            normal_fill_16(tail);
        }
        data
    }

    /// Equivalent of `torch.randn(shape, generator=g, dtype=torch.float32)`, placed on
    /// `device` (the numbers are always drawn on the CPU, as diffusers' `randn_tensor` does
    /// with a CPU generator).
    pub fn randn(&mut self, shape: &[usize], device: &Device) -> crate::Result<Tensor> {
        let n = shape.iter().product();
        let data = self.randn_vec(n);
        Ok(Tensor::from_vec(data, shape, device)?)
    }
}

/// Box-Muller on one block of 16 uniforms, the way torch's `normal_fill_16_AVX2` computes it.
fn normal_fill_16(data: &mut [f32]) {
    const TWO_PI: f32 = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * log_ps(u1)).sqrt();
        let theta = TWO_PI * u2;
        let (sin, cos) = sincos_ps(theta);
        data[j] = radius * cos;
        data[j + 8] = radius * sin;
    }
}

/// Natural logarithm as in `avx_mathfun.h` `log256_ps` (cephes polynomial), for x in (0, 1].
/// The multiply-adds that the compiler fuses in torch's build are fused here too.
/// (The constants are spelled as in the cephes / avx_mathfun sources.)
#[allow(clippy::excessive_precision)]
fn log_ps(x: f32) -> f32 {
    // cephes' SQRTHF, 0.707106781186547524.
    const SQRTHF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const P: [f32; 9] = [
        7.0376836292E-2,
        -1.1514610310E-1,
        1.1676998740E-1,
        -1.2420140846E-1,
        1.4249322787E-1,
        -1.6668057665E-1,
        2.0000714765E-1,
        -2.4999993993E-1,
        3.3333331174E-1,
    ];
    const Q1: f32 = -2.12194440e-4;
    const Q2: f32 = 0.693359375;

    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32;
    let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    e += 1.0;
    let mask = x < SQRTHF;
    let tmp = if mask { x } else { 0.0 };
    x -= 1.0;
    if mask {
        e -= 1.0;
    }
    x += tmp;
    let z = x * x;
    let mut y = P[0];
    for &c in &P[1..] {
        y = y.mul_add(x, c);
    }
    y *= x;
    y = y.mul_add(z, e * Q1);
    y = z.mul_add(-0.5, y);
    x += y;
    e.mul_add(Q2, x)
}

/// Sine and cosine as in `avx_mathfun.h` `sincos256_ps` (cephes), returns `(sin, cos)`.
#[allow(clippy::excessive_precision)]
fn sincos_ps(x: f32) -> (f32, f32) {
    const FOPI: f32 = 1.27323954473516; // 4 / pi
    const DP1: f32 = -0.78515625;
    const DP2: f32 = -2.4187564849853515625e-4;
    const DP3: f32 = -3.77489497744594108e-8;
    const COSCOF: [f32; 3] = [
        2.443315711809948E-005,
        -1.388731625493765E-003,
        4.166664568298827E-002,
    ];
    const SINCOF: [f32; 3] = [-1.9515295891E-4, 8.3321608736E-3, -1.6666654611E-1];

    let mut sign_sin = x < 0.0;
    let mut x = x.abs();
    let mut j = (x * FOPI) as i32;
    j = (j + 1) & !1;
    let y = j as f32;
    let swap_sign_sin = j & 4 != 0;
    let poly_mask = j & 2 == 0;
    x = y.mul_add(DP1, x);
    x = y.mul_add(DP2, x);
    x = y.mul_add(DP3, x);
    let sign_cos = (!(j - 2)) & 4 != 0;
    sign_sin ^= swap_sign_sin;

    let z = x * x;
    let mut yc = COSCOF[0];
    yc = yc.mul_add(z, COSCOF[1]);
    yc = yc.mul_add(z, COSCOF[2]);
    yc *= z;
    yc = yc.mul_add(z, -(z * 0.5));
    yc += 1.0;

    let mut ys = SINCOF[0];
    ys = ys.mul_add(z, SINCOF[1]);
    ys = ys.mul_add(z, SINCOF[2]);
    ys *= z;
    ys = ys.mul_add(x, x);

    let (s, c) = if poly_mask { (ys, yc) } else { (yc, ys) };
    (if sign_sin { -s } else { s }, if sign_cos { -c } else { c })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_reference_output() {
        // The C++ standard requires the 10000th output of mt19937 seeded with 5489 to be
        // 4123659995.
        let mut rng = TorchRng::new(5489);
        let mut v = 0;
        for _ in 0..10_000 {
            v = rng.next_u32();
        }
        assert_eq!(v, 4_123_659_995);
    }

    #[test]
    fn seed_uses_low_32_bits() {
        let a = TorchRng::new(5).randn_vec(40);
        let b = TorchRng::new((1 << 32) + 5).randn_vec(40);
        assert_eq!(a, b);
    }

    #[test]
    fn math_is_close_to_libm() {
        for i in 1..=1000 {
            let u = i as f32 / 1000.0;
            assert!((log_ps(u) - u.ln()).abs() <= 2e-7 * (1.0 + u.ln().abs()));
            let t = u * 6.3;
            let (s, c) = sincos_ps(t);
            assert!((s - t.sin()).abs() < 2e-7, "sin {t}");
            assert!((c - t.cos()).abs() < 2e-7, "cos {t}");
        }
    }
}
