//! A Brownian tree: the noise of DPM++ SDE, `(W(u') - W(u)) / sqrt(|u' - u|)` for a Brownian
//! motion `W` over `u = log(sigma)` that is a function of the seed alone, so the noise between
//! two sigmas hardly changes when the step count does.
//!
//! diffusers and k-diffusion draw it from `torchsde.BrownianTree`, whose construction (its own
//! splittable generator and interval cache) is not reproducible outside torchsde; this is our
//! own, simpler tree with the same purpose, written so that a few lines of Python reproduce
//! it exactly (`scripts/make_sampler_fixtures.py`, "brownian-tree-v2"):
//!
//! - the root seed is one draw from the request's generator (`randint(0, 2^31)`, which takes
//!   two 32-bit outputs and keeps the low 31 bits of the second);
//! - `W` is known on the grid of `2^12 + 1` points evenly spaced in `log(sigma)` between the
//!   smallest and the largest sigma: `W(0) = 0`, `W(end) = sqrt(u1 - u0) z(mix(root))`, and
//!   every other grid point by bisection, each midpoint drawn from the Brownian bridge between
//!   its interval's ends, `(W(a) + W(b)) / 2 + sqrt((b - a) h / 4) z(node)` with the node seeds
//!   a SplitMix64 walk (`left = mix(2 node)`, `right = mix(2 node + 1)`, first `mix(root ^ 1)`);
//! - a sigma is snapped to the nearest grid point (log in float64, round half to even), so a
//!   last-bit difference in a sigma (float32 `log` / `exp` are not correctly rounded in torch)
//!   does not change the noise unless it sits on the half-way point between two grid points;
//! - each `z(seed)` is `torch.randn(shape, generator=manual_seed(seed))`, float32.
//!
//! The noise over any two grid points is exactly standard normal, and noises over disjoint
//! intervals are independent, as for a Brownian motion; not bit-identical to torchsde's. Two
//! sigmas closer than half a grid cell (0.08% of sigma for SD's range) give zero noise.

use candle_core::{DType, Device, Tensor};

use super::schedule::mul;
use super::TorchRng;
use crate::Result;

/// Bisection levels: the grid has `2^LEVELS` cells.
const LEVELS: u32 = 12;

/// SplitMix64's finaliser (wrapping arithmetic on u64).
fn mix(x: u64) -> u64 {
    let x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let z = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A Brownian motion over `log(sigma)` with values of one latent shape.
#[derive(Debug)]
pub(crate) struct BrownianTree {
    u0: f64,
    /// The grid step in `log(sigma)`.
    h: f64,
    root: u64,
    shape: Vec<usize>,
    device: Device,
    w_end: Tensor,
    /// `W` at the midpoints of the last query's path (grid index, value): the next query
    /// shares most of it.
    path: Vec<(usize, Tensor)>,
}

impl BrownianTree {
    /// The tree over `[sigma_min, sigma_max]`, its root seed drawn from `rng`.
    pub(crate) fn new(
        sigma_min: f64,
        sigma_max: f64,
        shape: &[usize],
        device: &Device,
        rng: &mut TorchRng,
    ) -> Result<Self> {
        rng.next_u32();
        let root = u64::from(rng.next_u32() & 0x7fff_ffff);
        let (u0, u1) = (sigma_min.ln(), sigma_max.ln());
        let w_end = mul(
            &Self::normal(mix(root), shape, device)?,
            (u1 - u0).sqrt() as f32,
        )?;
        Ok(BrownianTree {
            u0,
            h: (u1 - u0) / f64::from(1u32 << LEVELS),
            root,
            shape: shape.to_vec(),
            device: device.clone(),
            w_end,
            path: Vec::new(),
        })
    }

    fn normal(seed: u64, shape: &[usize], device: &Device) -> Result<Tensor> {
        TorchRng::new(seed).randn(shape, device)
    }

    /// The grid index nearest to `sigma`.
    fn index(&self, sigma: f64) -> usize {
        let last = 1usize << LEVELS;
        if self.h.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return 0;
        }
        let k = ((sigma.ln() - self.u0) / self.h).round_ties_even();
        if k.is_nan() || k <= 0.0 {
            0
        } else {
            (k as usize).min(last)
        }
    }

    /// `W` at grid index `k`.
    fn w(&mut self, k: usize) -> Result<Tensor> {
        let (mut a, mut b) = (0usize, 1usize << LEVELS);
        let mut wa = Tensor::zeros(self.shape.as_slice(), DType::F32, &self.device)?;
        let mut wb = self.w_end.clone();
        let mut node = mix(self.root ^ 1);
        let mut path = Vec::with_capacity(LEVELS as usize);
        loop {
            if k == a {
                break;
            }
            if k == b {
                wa = wb;
                break;
            }
            let m = (a + b) / 2;
            let wm = match self.path.iter().find(|(i, _)| *i == m) {
                Some((_, w)) => w.clone(),
                None => {
                    let z = Self::normal(node, &self.shape, &self.device)?;
                    let sd = ((b - a) as f64 * self.h * 0.25).sqrt() as f32;
                    (mul(&(&wa + &wb)?, 0.5)? + mul(&z, sd)?)?
                }
            };
            path.push((m, wm.clone()));
            if k < m {
                (b, wb, node) = (m, wm, mix(node.wrapping_mul(2)));
            } else {
                (a, wa, node) = (m, wm, mix(node.wrapping_mul(2).wrapping_add(1)));
            }
        }
        self.path = path;
        Ok(wa)
    }

    /// The noise from `sigma` to `sigma_next`: `(W(next) - W(here)) / sqrt(|next - here| h)`
    /// at their grid points; zero when both snap to the same point.
    pub(crate) fn noise(&mut self, sigma: f64, sigma_next: f64) -> Result<Tensor> {
        let (k, k_next) = (self.index(sigma), self.index(sigma_next));
        if k == k_next {
            return Ok(Tensor::zeros(
                self.shape.as_slice(),
                DType::F32,
                &self.device,
            )?);
        }
        let scale = 1.0 / ((k.abs_diff(k_next) as f64) * self.h).sqrt();
        let (w_next, w) = (self.w(k_next)?, self.w(k)?);
        mul(&(w_next - w)?, scale as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_finaliser() {
        // SplitMix64 from state 0: the first output is 0xE220A8397B1DCDAF.
        assert_eq!(mix(0), 0xE220_A839_7B1D_CDAF);
    }

    fn values(t: Tensor) -> Vec<f32> {
        t.to_vec1().expect("vec")
    }

    #[test]
    fn noise_is_standard_and_consistent() {
        let dev = Device::Cpu;
        let mut tree =
            BrownianTree::new(0.03, 14.6, &[4096], &dev, &mut TorchRng::new(1)).expect("tree");
        let v = values(tree.noise(14.6, 3.0).expect("noise"));
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.08,
            "{mean} {var}"
        );
        // The same query gives the same noise whatever came between; the reversed
        // interval its negation; a last-bit change of a sigma changes nothing.
        let _ = tree.noise(0.5, 0.2).expect("noise");
        assert_eq!(v, values(tree.noise(14.6, 3.0).expect("noise")));
        let nudged = f64::from(f32::from_bits(3.0f32.to_bits() + 1));
        assert_eq!(v, values(tree.noise(14.6, nudged).expect("noise")));
        let back = values(tree.noise(3.0, 14.6).expect("noise"));
        assert!(v.iter().zip(&back).all(|(a, b)| *a == -*b));
        // Increments over adjacent intervals add up: W(c) - W(a) = (W(c) - W(b)) + (W(b) - W(a)).
        let (a, b, c) = (tree.index(14.6), tree.index(5.0), tree.index(1.0));
        let w = |tree: &mut BrownianTree, k| tree.w(k).expect("w");
        let whole = (w(&mut tree, c) - w(&mut tree, a)).expect("sub");
        let parts = ((w(&mut tree, c) - w(&mut tree, b)).expect("sub")
            + (w(&mut tree, b) - w(&mut tree, a)).expect("sub"))
        .expect("add");
        let d = (whole - parts)
            .expect("sub")
            .abs()
            .expect("abs")
            .max(0)
            .expect("max")
            .to_scalar::<f32>()
            .expect("scalar");
        assert!(d < 1e-5, "{d}");
        assert_eq!(
            values(tree.noise(2.0, 2.0).expect("noise")),
            vec![0.0; 4096]
        );
    }
}
