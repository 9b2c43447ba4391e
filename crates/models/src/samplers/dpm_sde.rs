//! DPM++ SDE: port of diffusers `DPMSolverSDEScheduler` (k-diffusion's `sample_dpmpp_sde`,
//! r = 1/2, eta = 1), with our [`BrownianTree`](super::brownian) in place of torchsde's.
//!
//! Each step but the last takes two model evaluations: an ancestral DPM-Solver++ half step
//! to the log-sigma midpoint, then the full step from the midpoint's denoised estimate, each
//! adding Brownian noise over its own interval. The last step (to sigma 0) is an Euler step.
//! Timesteps and sigmas are laid out like Heun's (`2n - 1` entries, order 2).

use candle_core::Tensor;

use super::brownian::BrownianTree;
use super::config::BetaDefaults;
use super::euler::{add_noise_sigma, init_noise_sigma, pred_original, scale_input};
use super::schedule::{self, div, f32_tensor, mul, SigmaConversion};
use super::{
    bad_step_index, check_index, PredictionType, Sampler, SchedulerConfig, TimestepSpacing,
    TorchRng,
};
use crate::Result;

/// The `s_noise` range we take: 0 (no fresh noise) to 2 (k-diffusion sets none; A1111's
/// setting goes to 1.1).
pub fn check_s_noise(s_noise: f64) -> Result<f64> {
    if (0.0..=2.0).contains(&s_noise) {
        Ok(s_noise)
    } else {
        Err(crate::Error::invalid(
            "s_noise",
            format!("must be between 0 and 2, got {s_noise}"),
        ))
    }
}

/// `t = -log(sigma)` and back, float32 as diffusers' 0-d tensors.
fn t_fn(sigma: f32) -> f32 {
    -sigma.ln()
}

fn sigma_fn(t: f32) -> f32 {
    (-t).exp()
}

/// diffusers `DPMSolverSDEScheduler` with our Brownian tree.
#[derive(Debug)]
pub struct DpmPpSde {
    /// `[s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]`.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
    tree: Option<BrownianTree>,
    /// The pending first half: the step's input sample and the midpoint sigma.
    pending: Option<(Tensor, f32)>,
    next_step: Option<usize>,
    /// The step's `s_noise` (a Python float in diffusers).
    s_noise: f64,
}

impl DpmPpSde {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        let ac = schedule::alphas_cumprod(cfg, BetaDefaults::K_DIFFUSION, false, false)?;
        let spacing = cfg.spacing_or(TimestepSpacing::Linspace);
        let ds = schedule::discrete_sigmas(cfg, &ac, spacing, n);
        // The midpoints' timesteps from the float64 sigmas (numpy), before the float32 cast.
        let second: Vec<f64> = ds
            .sigmas
            .windows(2)
            .map(|w| {
                let (t, t_next) = (-w[0].ln(), -w[1].ln());
                let proposed = t + (t_next - t) * 0.5;
                schedule::sigma_to_t((-proposed).exp(), &ds.log_sigmas)
            })
            .collect();
        // Without a conversion the timesteps are a float32 array and the midpoints are cast
        // into it; after one they stay float64.
        let f32_timesteps = SigmaConversion::from_config(cfg).is_none();
        let base: Vec<f64> = if f32_timesteps {
            ds.timesteps.iter().map(|&t| f64::from(t)).collect()
        } else {
            ds.sigmas
                .iter()
                .map(|&s| schedule::sigma_to_t(s, &ds.log_sigmas))
                .collect()
        };
        let mut timesteps = vec![base[0]];
        for (mid, &t) in second.iter().zip(&base[1..]) {
            let mid = if f32_timesteps {
                f64::from(*mid as f32)
            } else {
                *mid
            };
            timesteps.extend([mid, t]);
        }
        let s: Vec<f32> = ds.sigmas.iter().map(|&s| s as f32).collect();
        let mut sigmas = vec![s[0]];
        for &v in &s[1..] {
            sigmas.extend([v, v]);
        }
        sigmas.push(0.0);
        Ok(DpmPpSde {
            init_noise_sigma: init_noise_sigma(&sigmas, spacing),
            sigmas,
            timesteps,
            prediction_type: cfg.prediction_type,
            tree: None,
            pending: None,
            next_step: None,
            s_noise: 1.0,
        })
    }

    /// The Brownian tree over the positive sigmas, built at the first step from `rng`
    /// (where diffusers builds its noise sampler).
    fn build_tree(&mut self, sample: &Tensor, rng: &mut TorchRng) -> Result<()> {
        if self.tree.is_none() {
            let positive = self.sigmas.iter().copied().filter(|&s| s > 0.0);
            let min = positive.fold(f32::INFINITY, f32::min);
            let max = self
                .sigmas
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            self.tree = Some(BrownianTree::new(
                f64::from(min),
                f64::from(max),
                sample.dims(),
                sample.device(),
                rng,
            )?);
        }
        Ok(())
    }
}

impl Sampler for DpmPpSde {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn set_s_noise(&mut self, s_noise: f64) -> Result<()> {
        self.s_noise = check_s_noise(s_noise)?;
        Ok(())
    }

    fn order(&self) -> usize {
        2
    }

    fn init_noise_sigma(&self) -> f64 {
        f64::from(self.init_noise_sigma)
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let sigma = match &self.pending {
            None => self.sigmas[step_index],
            Some((_, mid)) => *mid,
        };
        scale_input(sample, sigma)
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
        rng: &mut TorchRng,
    ) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        super::k_diffusion::check_order(self.next_step, step_index)?;
        let i = step_index;
        let model_output = f32_tensor(model_output)?;
        let sample = f32_tensor(sample)?;
        self.build_tree(&sample, rng)?;
        let first = self.pending.is_none();
        let (sigma, sigma_next) = if first {
            (self.sigmas[i], self.sigmas[i + 1])
        } else {
            (self.sigmas[i - 1], self.sigmas[i])
        };
        let (t, t_next) = (t_fn(sigma), t_fn(sigma_next));
        let t_proposed = t + (t_next - t) * 0.5;
        let sigma_input = if first { sigma } else { sigma_fn(t_proposed) };
        let x0 = pred_original(self.prediction_type, &model_output, &sample, sigma_input)?;
        self.next_step = Some(i + 1);
        if sigma_next == 0.0 {
            let derivative = div(&(&sample - x0)?, sigma)?;
            return Ok((&sample + mul(&derivative, sigma_next - sigma)?)?);
        }
        let (t_next, start) = match self.pending.take() {
            None => (t_proposed, sample.clone()),
            Some((stored, _)) => (t_next, stored),
        };
        let sigma_from = sigma_fn(t);
        let sigma_to = sigma_fn(t_next);
        let sigma_up = sigma_to.min(
            (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
                / (sigma_from * sigma_from))
                .sqrt(),
        );
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        let ancestral_t = t_fn(sigma_down);
        let prev = (mul(&start, sigma_fn(ancestral_t) / sigma_fn(t))?
            - mul(&x0, (t - ancestral_t).exp_m1())?)?;
        let noise = match &mut self.tree {
            Some(tree) => tree.noise(f64::from(sigma_from), f64::from(sigma_to))?,
            None => return Err(bad_step_index(i, "a step after the noise tree is built")),
        };
        let prev = (prev + mul(&mul(&noise, self.s_noise as f32)?, sigma_up)?)?;
        if first {
            self.pending = Some((start, sigma_to));
        }
        Ok(prev)
    }
}

/// One step of DPM++ 2S a: its float32 scalars, as k-diffusion computes them.
#[derive(Debug, Clone, Copy)]
struct Step2s {
    sigma: f32,
    sigma_next: f32,
    sigma_up: f32,
    sigma_down: f32,
    /// The midpoint evaluation (absent where `sigma_down == 0`: an Euler step).
    mid: Option<Mid>,
}

#[derive(Debug, Clone, Copy)]
struct Mid {
    sigma_s: f32,
    ratio_s: f32,
    c_s: f32,
    ratio_next: f32,
    c_next: f32,
}

/// DPM++ 2S a: k-diffusion's `sample_dpmpp_2s_ancestral` (eta = 1, s_noise = 1), which
/// diffusers has no class for. Each step: a DPM-Solver++ single-step second-order move to
/// `sigma_down` through the log-sigma midpoint (two model evaluations), then fresh noise of
/// size `sigma_up` drawn from the generator; the last step is an Euler step to 0.
///
/// The tables follow `EulerAncestralDiscreteScheduler` (its betas and zero-SNR option,
/// spacing, float32 sigmas with a final 0), with Karras / exponential / beta sigmas as
/// `KDPM2AncestralDiscreteScheduler` converts them; the reference numbers come from
/// k-diffusion's definition, written as a scheduler in `scripts/make_sampler_fixtures.py`
/// and checked there against k-diffusion 0.1.1 bit for bit.
#[derive(Debug)]
pub struct DpmPp2sAncestral {
    steps: Vec<Step2s>,
    /// (step, stage) per model evaluation.
    calls: Vec<(usize, u8)>,
    timesteps: Vec<f64>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
    /// The step's input while its midpoint evaluation is pending.
    pending: Option<Tensor>,
    next_step: Option<usize>,
    s_noise: f64,
}

impl DpmPp2sAncestral {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        let ac =
            schedule::alphas_cumprod(cfg, BetaDefaults::DDPM, cfg.rescale_betas_zero_snr, true)?;
        let spacing = cfg.spacing_or(TimestepSpacing::Linspace);
        let ds = schedule::discrete_sigmas(cfg, &ac, spacing, n);
        let conversion = SigmaConversion::from_config(cfg);
        // Timesteps: float32 without a conversion, float64 with one (Karras rounded).
        let base: Vec<f64> = match conversion {
            None => ds.timesteps.iter().map(|&t| f64::from(t)).collect(),
            Some(c) => ds
                .sigmas
                .iter()
                .map(|&s| {
                    let t = schedule::sigma_to_t(s, &ds.log_sigmas);
                    if c == SigmaConversion::Karras {
                        t.round_ties_even()
                    } else {
                        t
                    }
                })
                .collect(),
        };
        let sigmas: Vec<f32> = ds
            .sigmas
            .iter()
            .map(|&s| s as f32)
            .chain(std::iter::once(0.0))
            .collect();
        // (Trailing spacing gives n + 1 sigmas for some n, as numpy's arange does: every one
        // is a step, as k-diffusion walks the whole sigma list.)
        let count = sigmas.len() - 1;
        let mut steps = Vec::with_capacity(count);
        let mut calls = Vec::with_capacity(2 * count);
        let mut timesteps = Vec::with_capacity(2 * count);
        for i in 0..count {
            let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
            let up = (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next)
                / (sigma * sigma))
                .sqrt();
            // Python's min(sigma_next, up): `up` only where it is smaller.
            let sigma_up = if up < sigma_next { up } else { sigma_next };
            let sigma_down = (sigma_next * sigma_next - sigma_up * sigma_up).sqrt();
            calls.push((i, 0));
            timesteps.push(base[i]);
            let mid = (sigma_down != 0.0).then(|| {
                let t = -sigma.ln();
                let t_next = -sigma_down.ln();
                let h = t_next - t;
                let s = t + 0.5 * h;
                Mid {
                    sigma_s: (-s).exp(),
                    ratio_s: (-s).exp() / (-t).exp(),
                    c_s: (-h * 0.5).exp_m1(),
                    ratio_next: (-t_next).exp() / (-t).exp(),
                    c_next: (-h).exp_m1(),
                }
            });
            if let Some(m) = &mid {
                let t_s = schedule::sigma_to_t(f64::from(m.sigma_s), &ds.log_sigmas);
                calls.push((i, 1));
                timesteps.push(if conversion.is_none() {
                    f64::from(t_s as f32)
                } else {
                    t_s
                });
            }
            steps.push(Step2s {
                sigma,
                sigma_next,
                sigma_up,
                sigma_down,
                mid,
            });
        }
        Ok(DpmPp2sAncestral {
            init_noise_sigma: init_noise_sigma(&sigmas, spacing),
            steps,
            calls,
            timesteps,
            prediction_type: cfg.prediction_type,
            pending: None,
            next_step: None,
            s_noise: 1.0,
        })
    }

    /// The sigma the model sees at evaluation `k`.
    fn sigma_in(&self, k: usize) -> f32 {
        let (i, stage) = self.calls[k];
        let p = &self.steps[i];
        match (stage, &p.mid) {
            (1, Some(m)) => m.sigma_s,
            _ => p.sigma,
        }
    }

    /// `x + randn * s_noise * sigma_up` where `sigma_next > 0` (one draw of the whole
    /// latent).
    fn noise(&self, x: Tensor, p: &Step2s, rng: &mut TorchRng) -> Result<Tensor> {
        if p.sigma_next > 0.0 {
            let z = mul(&rng.randn(x.dims(), x.device())?, self.s_noise as f32)?;
            return Ok((x + mul(&z, p.sigma_up)?)?);
        }
        Ok(x)
    }
}

impl Sampler for DpmPp2sAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn set_s_noise(&mut self, s_noise: f64) -> Result<()> {
        self.s_noise = check_s_noise(s_noise)?;
        Ok(())
    }

    fn order(&self) -> usize {
        2
    }

    fn init_noise_sigma(&self) -> f64 {
        f64::from(self.init_noise_sigma)
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let sigma = self.sigma_in(step_index);
        scale_input(sample, sigma)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        add_noise_sigma(original, noise, self.sigma_in(step_index))
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut TorchRng,
    ) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        super::k_diffusion::check_order(self.next_step, step_index)?;
        let (i, stage) = self.calls[step_index];
        let p = self.steps[i];
        let model_output = f32_tensor(model_output)?;
        let sample = f32_tensor(sample)?;
        self.next_step = Some(step_index + 1);
        let pt = self.prediction_type;
        match (stage, p.mid, self.pending.take()) {
            (0, Some(m), _) => {
                let denoised = pred_original(pt, &model_output, &sample, p.sigma)?;
                let x2 = (mul(&sample, m.ratio_s)? - mul(&denoised, m.c_s)?)?;
                self.pending = Some(sample);
                Ok(x2)
            }
            (0, None, _) => {
                let denoised = pred_original(pt, &model_output, &sample, p.sigma)?;
                let d = div(&(&sample - denoised)?, p.sigma)?;
                let x = (&sample + mul(&d, p.sigma_down - p.sigma)?)?;
                self.noise(x, &p, rng)
            }
            (_, Some(m), Some(start)) => {
                let denoised = pred_original(pt, &model_output, &sample, m.sigma_s)?;
                let x = (mul(&start, m.ratio_next)? - mul(&denoised, m.c_next)?)?;
                self.noise(x, &p, rng)
            }
            _ => Err(bad_step_index(step_index, "a first evaluation of its step")),
        }
    }
}
