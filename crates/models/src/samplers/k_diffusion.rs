//! Heun, LMS, DPM2 and DPM2 ancestral: ports of diffusers `HeunDiscreteScheduler`,
//! `LMSDiscreteScheduler`, `KDPM2DiscreteScheduler` and `KDPM2AncestralDiscreteScheduler`,
//! its versions of k-diffusion's `sample_heun`, `sample_lms`, `sample_dpm_2` and
//! `sample_dpm_2_ancestral`.
//!
//! All four work on sigma-scaled latents like Euler: the UNet input is divided by
//! `sqrt(sigma^2 + 1)` and the first latents are `noise * init_noise_sigma`. Heun and the
//! DPM2 pair are second order: each step but the last takes two model evaluations, so
//! their timestep list has `2n - 1` entries and diffusers' `order` is 2 (image-to-image
//! starts at `2 * t_start`). The DPM2 pair evaluates its second point at the geometric
//! midpoint of the two sigmas; DPM2 ancestral adds noise drawn from the generator after
//! every second evaluation.

use candle_core::Tensor;

use super::config::BetaDefaults;
use super::euler::{add_noise_sigma, init_noise_sigma, pred_original, scale_input};
use super::schedule::{self, div, f32_tensor, mul, DiscreteSigmas, SigmaConversion};
use super::{bad_step_index, check_index, PredictionType, Sampler, SchedulerConfig};
use super::{TimestepSpacing, TorchRng};
use crate::Result;

/// The schedule every class here starts from: spacing default linspace, alphas without a
/// zero-SNR rescale (these classes have no such option), plus the beta defaults given.
fn base_schedule(
    cfg: &SchedulerConfig,
    n: usize,
    defaults: BetaDefaults,
) -> Result<(DiscreteSigmas, TimestepSpacing)> {
    let ac = schedule::alphas_cumprod(cfg, defaults, false, false)?;
    let spacing = cfg.spacing_or(TimestepSpacing::Linspace);
    Ok((schedule::discrete_sigmas(cfg, &ac, spacing, n), spacing))
}

/// `torch.cat([x[:1], x[1:].repeat_interleave(2), x[-1:]])`.
fn interleave_tail_doubled(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(2 * x.len());
    if let Some((first, rest)) = x.split_first() {
        out.push(*first);
        for &v in rest {
            out.extend([v, v]);
        }
        out.push(*rest.last().unwrap_or(first));
    }
    out
}

/// torch's `lerp(a, b, w)` for float32 scalars.
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        a + w * (b - a)
    } else {
        b - (b - a) * (1.0 - w)
    }
}

/// diffusers `HeunDiscreteScheduler`: an Euler step to the next sigma, then a second
/// evaluation there and the average of the two slopes (no churn).
#[derive(Debug)]
pub struct Heun {
    /// `[s0, s1, s1, s2, s2, ..., s_{n-1}, s_{n-1}, 0]`.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
    clip: Option<f32>,
    /// First-order state: (slope, dt, sample) of the pending Euler step.
    pending: Option<(Tensor, f32, Tensor)>,
    next_step: Option<usize>,
}

impl Heun {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        let (ds, spacing) = base_schedule(cfg, n, BetaDefaults::K_DIFFUSION)?;
        let mut s: Vec<f32> = ds.sigmas.iter().map(|&s| s as f32).collect();
        s.push(0.0);
        let mut sigmas = vec![s[0]];
        for &v in &s[1..s.len() - 1] {
            sigmas.extend([v, v]);
        }
        sigmas.push(0.0);
        let mut timesteps = vec![f64::from(ds.timesteps[0])];
        for &t in &ds.timesteps[1..] {
            timesteps.extend([f64::from(t), f64::from(t)]);
        }
        Ok(Heun {
            init_noise_sigma: init_noise_sigma(&sigmas, spacing),
            sigmas,
            timesteps,
            prediction_type: cfg.prediction_type,
            clip: cfg
                .clip_sample
                .unwrap_or(false)
                .then_some(cfg.clip_sample_range as f32),
            pending: None,
            next_step: None,
        })
    }
}

/// Refuses a step other than the next one once a run has started.
pub(crate) fn check_order(next: Option<usize>, step_index: usize) -> Result<()> {
    match next {
        Some(n) if n != step_index => Err(bad_step_index(
            step_index,
            &format!("step {n} (the steps of this sampler run in order)"),
        )),
        _ => Ok(()),
    }
}

impl Sampler for Heun {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn order(&self) -> usize {
        2
    }

    fn init_noise_sigma(&self) -> f64 {
        f64::from(self.init_noise_sigma)
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        scale_input(sample, self.sigmas[step_index])
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        add_noise_sigma(original, noise, self.sigmas[step_index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _rng: &mut TorchRng,
    ) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        check_order(self.next_step, step_index)?;
        let i = step_index;
        let model_output = f32_tensor(model_output)?;
        let sample = f32_tensor(sample)?;
        let prev = match self.pending.take() {
            None => {
                let (sigma, sigma_next) = (self.sigmas[i], self.sigmas[i + 1]);
                let x0 = pred_original(self.prediction_type, &model_output, &sample, sigma)?;
                let x0 = clip(x0, self.clip)?;
                let derivative = div(&(&sample - x0)?, sigma)?;
                let dt = sigma_next - sigma;
                let prev = (&sample + mul(&derivative, dt)?)?;
                self.pending = Some((derivative, dt, sample));
                prev
            }
            Some((prev_derivative, dt, first_sample)) => {
                let sigma_next = self.sigmas[i];
                let x0 = pred_original(self.prediction_type, &model_output, &sample, sigma_next)?;
                let x0 = clip(x0, self.clip)?;
                let derivative = div(&(&sample - x0)?, sigma_next)?;
                let derivative = div(&(prev_derivative + derivative)?, 2.0)?;
                (first_sample + mul(&derivative, dt)?)?
            }
        };
        self.next_step = Some(i + 1);
        Ok(prev)
    }
}

fn clip(x: Tensor, range: Option<f32>) -> Result<Tensor> {
    Ok(match range {
        Some(r) => x.clamp(-r, r)?,
        None => x,
    })
}

/// diffusers `LMSDiscreteScheduler`: linear multistep on the slopes of up to the last four
/// steps, with coefficients that integrate the Lagrange basis polynomials over the step.
#[derive(Debug)]
pub struct Lms {
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
    /// The slopes of the last steps, oldest first (at most 4).
    derivatives: Vec<Tensor>,
    next_step: Option<usize>,
}

/// The order `step` uses (its `order` argument's default).
const LMS_ORDER: usize = 4;

impl Lms {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        let (ds, spacing) = base_schedule(cfg, n, BetaDefaults::DDPM)?;
        let sigmas: Vec<f32> = ds
            .sigmas
            .iter()
            .map(|&s| s as f32)
            .chain(std::iter::once(0.0))
            .collect();
        Ok(Lms {
            init_noise_sigma: init_noise_sigma(&sigmas, spacing),
            sigmas,
            timesteps: ds.timesteps.iter().map(|&t| f64::from(t)).collect(),
            prediction_type: cfg.prediction_type,
            derivatives: Vec::new(),
            next_step: None,
        })
    }

    /// `get_lms_coefficient(order, t, current_order)`: the integral from `sigmas[t]` to
    /// `sigmas[t + 1]` of the Lagrange basis polynomial of node `t - current_order` over
    /// the nodes `t, t - 1, ..., t - order + 1`. diffusers integrates numerically
    /// (`scipy.integrate.quad`); the polynomial has degree at most 3, which 3-point
    /// Gauss-Legendre integrates exactly.
    fn coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let s = |k: usize| f64::from(self.sigmas[k]);
        let basis = |tau: f64| {
            (0..order)
                .filter(|&k| k != current)
                .map(|k| (tau - s(t - k)) / (s(t - current) - s(t - k)))
                .product::<f64>()
        };
        let (a, b) = (s(t), s(t + 1));
        let (mid, half) = (0.5 * (a + b), 0.5 * (b - a));
        let x = (0.6f64).sqrt();
        let nodes = [(-x, 5.0 / 9.0), (0.0, 8.0 / 9.0), (x, 5.0 / 9.0)];
        nodes
            .iter()
            .map(|&(u, w)| w * basis(mid + half * u))
            .sum::<f64>()
            * half
    }
}

impl Sampler for Lms {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        f64::from(self.init_noise_sigma)
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        scale_input(sample, self.sigmas[step_index])
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        add_noise_sigma(original, noise, self.sigmas[step_index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _rng: &mut TorchRng,
    ) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        check_order(self.next_step, step_index)?;
        let i = step_index;
        let model_output = f32_tensor(model_output)?;
        let sample = f32_tensor(sample)?;
        let sigma = self.sigmas[i];
        let x0 = pred_original(self.prediction_type, &model_output, &sample, sigma)?;
        let derivative = div(&(&sample - x0)?, sigma)?;
        self.derivatives.push(derivative);
        if self.derivatives.len() > LMS_ORDER {
            self.derivatives.remove(0);
        }
        // diffusers caps the order by the step index, not by the slopes it holds.
        let order = (i + 1).min(LMS_ORDER);
        let mut sum: Option<Tensor> = None;
        for (current, d) in (0..order).zip(self.derivatives.iter().rev()) {
            let term = mul(d, self.coefficient(order, i, current) as f32)?;
            sum = Some(match sum {
                None => term,
                Some(acc) => (acc + term)?,
            });
        }
        self.next_step = Some(i + 1);
        match sum {
            Some(sum) => Ok((sample + sum)?),
            None => Ok(sample),
        }
    }
}

/// The shared state of the DPM2 pair: doubled sigma tables and the pending first half.
#[derive(Debug)]
struct Dpm2Tables {
    sigmas: Vec<f32>,
    sigmas_interpol: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
}

/// The timesteps of the DPM2 pair: the UNet timesteps (float32, or float64 from the sigma
/// conversions, then rounded to float32 by the UNet as diffusers' is) and the fractional
/// timesteps of the interpolated sigmas.
fn dpm2_timesteps(
    cfg: &SchedulerConfig,
    ds: &DiscreteSigmas,
    interpol: &[f32],
    interpol_range: std::ops::Range<usize>,
) -> Vec<f64> {
    // With Karras sigmas both classes round the timesteps (float64); the others keep the
    // fractional value, in float64 for a conversion and float32 without one.
    let conversion = SigmaConversion::from_config(cfg);
    let base: Vec<f64> = ds
        .timesteps
        .iter()
        .zip(&ds.sigmas)
        .map(|(&t, &s)| match conversion {
            Some(SigmaConversion::Karras) => {
                schedule::sigma_to_t(s, &ds.log_sigmas).round_ties_even()
            }
            Some(_) => schedule::sigma_to_t(s, &ds.log_sigmas),
            None => f64::from(t),
        })
        .collect();
    let f32_timesteps = conversion.is_none();
    let interp: Vec<f64> = interpol[interpol_range]
        .iter()
        .map(|&s| {
            let t = schedule::sigma_to_t(f64::from(s), &ds.log_sigmas);
            if f32_timesteps {
                f64::from(t as f32)
            } else {
                t
            }
        })
        .collect();
    let mut out = vec![base[0]];
    for (ti, t) in interp.iter().zip(&base[1..]) {
        out.extend([*ti, *t]);
    }
    out
}

impl Dpm2Tables {
    fn new(cfg: &SchedulerConfig, n: usize, ancestral: bool) -> Result<(Self, Vec<f32>, Vec<f32>)> {
        let (ds, spacing) = base_schedule(cfg, n, BetaDefaults::K_DIFFUSION)?;
        let sigmas: Vec<f32> = ds
            .sigmas
            .iter()
            .map(|&s| s as f32)
            .chain(std::iter::once(0.0))
            .collect();
        let len = sigmas.len();
        let (interpol, up, down) = if ancestral {
            let mut up = vec![0f32; len];
            let mut down = vec![0f32; len];
            for k in 0..len {
                let next = if k + 1 < len { sigmas[k + 1] } else { 0.0 };
                let s = sigmas[k];
                up[k] = (next * next * (s * s - next * next) / (s * s)).sqrt();
                down[k] = (next * next - up[k] * up[k]).sqrt();
            }
            down[len - 1] = 0.0;
            let mut interpol: Vec<f32> = (0..len)
                .map(|k| lerp(sigmas[k].ln(), down[k].ln(), 0.5).exp())
                .collect();
            for v in interpol.iter_mut().skip(len.saturating_sub(2)) {
                *v = 0.0;
            }
            (interpol, up, down)
        } else {
            // sigmas.roll(1): the previous sigma, the first taking the last (0).
            let interpol: Vec<f32> = (0..len)
                .map(|k| {
                    let prev = sigmas[(k + len - 1) % len];
                    lerp(sigmas[k].ln(), prev.ln(), 0.5).exp()
                })
                .collect();
            (interpol, Vec::new(), Vec::new())
        };
        let range = if ancestral { 0..len - 2 } else { 1..len - 1 };
        let timesteps = dpm2_timesteps(cfg, &ds, &interpol, range);
        let sigmas_d = interleave_tail_doubled(&sigmas);
        Ok((
            Dpm2Tables {
                init_noise_sigma: init_noise_sigma(&sigmas_d, spacing),
                sigmas: sigmas_d,
                sigmas_interpol: interleave_tail_doubled(&interpol),
                timesteps,
                prediction_type: cfg.prediction_type,
            },
            interleave_tail_doubled(&up),
            interleave_tail_doubled(&down),
        ))
    }
}

/// diffusers `KDPM2DiscreteScheduler` (k-diffusion's DPM-Solver-2 / `sample_dpm_2`).
#[derive(Debug)]
pub struct Dpm2 {
    t: Dpm2Tables,
    /// The sample of the pending first half.
    pending: Option<Tensor>,
    next_step: Option<usize>,
}

impl Dpm2 {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        let (t, _, _) = Dpm2Tables::new(cfg, n, false)?;
        Ok(Dpm2 {
            t,
            pending: None,
            next_step: None,
        })
    }
}

impl Sampler for Dpm2 {
    fn timesteps(&self) -> &[f64] {
        &self.t.timesteps
    }

    fn order(&self) -> usize {
        2
    }

    fn init_noise_sigma(&self) -> f64 {
        f64::from(self.t.init_noise_sigma)
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.t.timesteps.len())?;
        let sigma = if self.pending.is_none() {
            self.t.sigmas[step_index]
        } else {
            self.t.sigmas_interpol[step_index]
        };
        scale_input(sample, sigma)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.t.timesteps.len())?;
        add_noise_sigma(original, noise, self.t.sigmas[step_index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _rng: &mut TorchRng,
    ) -> Result<Tensor> {
        check_index(step_index, self.t.timesteps.len())?;
        check_order(self.next_step, step_index)?;
        let i = step_index;
        let model_output = f32_tensor(model_output)?;
        let sample = f32_tensor(sample)?;
        let pt = self.t.prediction_type;
        let prev = match self.pending.take() {
            None => {
                let sigma = self.t.sigmas[i];
                let sigma_interpol = self.t.sigmas_interpol[i + 1];
                let x0 = pred_original(pt, &model_output, &sample, sigma)?;
                let derivative = div(&(&sample - x0)?, sigma)?;
                let prev = (&sample + mul(&derivative, sigma_interpol - sigma)?)?;
                self.pending = Some(sample);
                prev
            }
            Some(first_sample) => {
                let sigma = self.t.sigmas[i - 1];
                let sigma_interpol = self.t.sigmas_interpol[i];
                let sigma_next = self.t.sigmas[i];
                let x0 = pred_original(pt, &model_output, &sample, sigma_interpol)?;
                let derivative = div(&(&sample - x0)?, sigma_interpol)?;
                (first_sample + mul(&derivative, sigma_next - sigma)?)?
            }
        };
        self.next_step = Some(i + 1);
        Ok(prev)
    }
}

/// diffusers `KDPM2AncestralDiscreteScheduler` (k-diffusion's `sample_dpm_2_ancestral`):
/// DPM2 towards `sigma_down`, then noise of size `sigma_up` drawn from the generator.
#[derive(Debug)]
pub struct Dpm2Ancestral {
    t: Dpm2Tables,
    sigmas_up: Vec<f32>,
    sigmas_down: Vec<f32>,
    pending: Option<Tensor>,
    next_step: Option<usize>,
}

impl Dpm2Ancestral {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        let (t, sigmas_up, sigmas_down) = Dpm2Tables::new(cfg, n, true)?;
        Ok(Dpm2Ancestral {
            t,
            sigmas_up,
            sigmas_down,
            pending: None,
            next_step: None,
        })
    }
}

impl Sampler for Dpm2Ancestral {
    fn timesteps(&self) -> &[f64] {
        &self.t.timesteps
    }

    fn order(&self) -> usize {
        2
    }

    fn init_noise_sigma(&self) -> f64 {
        f64::from(self.t.init_noise_sigma)
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.t.timesteps.len())?;
        let sigma = match (self.pending.is_none(), step_index) {
            (true, _) => self.t.sigmas[step_index],
            (false, 0) => return Err(bad_step_index(0, "a first-order step")),
            (false, i) => self.t.sigmas_interpol[i - 1],
        };
        scale_input(sample, sigma)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.t.timesteps.len())?;
        add_noise_sigma(original, noise, self.t.sigmas[step_index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut TorchRng,
    ) -> Result<Tensor> {
        check_index(step_index, self.t.timesteps.len())?;
        check_order(self.next_step, step_index)?;
        let i = step_index;
        let model_output = f32_tensor(model_output)?;
        let sample = f32_tensor(sample)?;
        let pt = self.t.prediction_type;
        let prev = match self.pending.take() {
            None => {
                let sigma = self.t.sigmas[i];
                let sigma_interpol = self.t.sigmas_interpol[i];
                let x0 = pred_original(pt, &model_output, &sample, sigma)?;
                let derivative = div(&(&sample - x0)?, sigma)?;
                let prev = (&sample + mul(&derivative, sigma_interpol - sigma)?)?;
                self.pending = Some(sample);
                prev
            }
            Some(first_sample) => {
                let sigma = self.t.sigmas[i - 1];
                let sigma_interpol = self.t.sigmas_interpol[i - 1];
                let sigma_up = self.sigmas_up[i - 1];
                let sigma_down = self.sigmas_down[i - 1];
                let x0 = pred_original(pt, &model_output, &sample, sigma_interpol)?;
                let derivative = div(&(&sample - x0)?, sigma_interpol)?;
                let prev = (first_sample + mul(&derivative, sigma_down - sigma)?)?;
                let noise = rng.randn(model_output.dims(), model_output.device())?;
                (prev + mul(&noise, sigma_up)?)?
            }
        };
        self.next_step = Some(i + 1);
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_lerp_rule() {
        assert_eq!(lerp(1.0, 3.0, 0.5), 2.0);
        assert_eq!(lerp(f32::NEG_INFINITY, 0.0, 0.5), f32::NEG_INFINITY);
        assert!(lerp(0.0, f32::NEG_INFINITY, 0.5).is_nan());
    }

    #[test]
    fn lms_coefficients_integrate_the_basis() {
        let cfg = SchedulerConfig::default();
        let mut lms = Lms::new(&cfg, 10).expect("lms");
        lms.sigmas = vec![4.0, 3.0, 2.0, 1.0, 0.0];
        // Order 1: the integral of 1 over [s2, s3] = -1.
        assert!((lms.coefficient(1, 2, 0) + 1.0).abs() < 1e-15);
        // Order 2 weights sum to the interval length.
        let sum: f64 = (0..2).map(|c| lms.coefficient(2, 2, c)).sum();
        assert!((sum + 1.0).abs() < 1e-12);
        // Adams-Bashforth 2 on a uniform grid: 3/2 and -1/2 of the step.
        assert!((lms.coefficient(2, 2, 0) + 1.5).abs() < 1e-12);
        assert!((lms.coefficient(2, 2, 1) - 0.5).abs() < 1e-12);
    }
}
