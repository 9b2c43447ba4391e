//! DDIM: port of diffusers `DDIMScheduler`, with the pipelines' `eta` (default 0: no noise;
//! above 0, `eta * sqrt(variance) * z` with `z` drawn from the generator after each step).
//!
//! Quirk kept from diffusers: the "previous" timestep of a step is always
//! `t - num_train_timesteps // num_inference_steps`, whatever the timestep spacing, so with
//! `trailing` / `linspace` spacing it is not the next timestep of the loop.

use candle_core::Tensor;

use super::config::BetaDefaults;
use super::schedule::{self, div, f32_tensor, mul};
use super::{check_index, PredictionType, Sampler, SchedulerConfig, TimestepSpacing, TorchRng};
use crate::{Error, Result};

/// The pipelines' `eta` range (diffusers asserts it for TCD; DDIM's formula needs it).
pub fn check_eta(eta: f64) -> Result<()> {
    if (0.0..=1.0).contains(&eta) {
        Ok(())
    } else {
        Err(Error::invalid(
            "eta",
            format!("must be between 0 and 1, got {eta}"),
        ))
    }
}

/// DDIM. `scale_model_input` is the identity; `init_noise_sigma` is 1.
#[derive(Debug)]
pub struct Ddim {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// (t, prev_t) per loop index.
    plan: Vec<(i64, i64)>,
    timesteps: Vec<f64>,
    prediction_type: PredictionType,
    /// `Some(range)` when `clip_sample` is on.
    clip: Option<f32>,
    /// A Python float in diffusers (float64), multiplied into float32 scalars.
    eta: f64,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        if cfg.thresholding {
            return Err(cfg.unsupported("thresholding", true, "DDIM"));
        }
        let ac =
            schedule::alphas_cumprod(cfg, BetaDefaults::DDPM, cfg.rescale_betas_zero_snr, false)?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            ac[0]
        };
        let spacing = cfg.spacing_or(TimestepSpacing::Leading);
        let ts = schedule::int_timesteps(spacing, cfg.num_train_timesteps, n, cfg.steps_offset);
        let ratio = (cfg.num_train_timesteps / n) as i64;
        let plan: Vec<(i64, i64)> = ts.iter().map(|&t| (t, t - ratio)).collect();
        schedule::check_timesteps_in_range(cfg, "DDIM", ts.iter().copied())?;
        Ok(Ddim {
            alphas_cumprod: ac,
            final_alpha_cumprod,
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            plan,
            prediction_type: cfg.prediction_type,
            clip: cfg
                .clip_sample
                .unwrap_or(true)
                .then_some(cfg.clip_sample_range as f32),
            eta: 0.0,
        })
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let t = self.timesteps[step_index] as usize;
        schedule::add_noise_alpha(&self.alphas_cumprod, t, original, noise)
    }

    fn set_eta(&mut self, eta: f64) -> Result<()> {
        check_eta(eta)?;
        self.eta = eta;
        Ok(())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut TorchRng,
    ) -> Result<Tensor> {
        check_index(step_index, self.plan.len())?;
        let (t, prev_t) = self.plan[step_index];
        let model_output = f32_tensor(model_output)?;
        let sample = f32_tensor(sample)?;
        let a_t = self.alphas_cumprod[t as usize];
        let a_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let (mut pred_x0, pred_eps) = match self.prediction_type {
            PredictionType::Epsilon => {
                let x0 = div(&(&sample - mul(&model_output, b_t.sqrt())?)?, a_t.sqrt())?;
                (x0, model_output.clone())
            }
            PredictionType::VPrediction => {
                let x0 = (mul(&sample, a_t.sqrt())? - mul(&model_output, b_t.sqrt())?)?;
                let eps = (mul(&model_output, a_t.sqrt())? + mul(&sample, b_t.sqrt())?)?;
                (x0, eps)
            }
        };
        if let Some(r) = self.clip {
            pred_x0 = pred_x0.clamp(-r, r)?;
        }
        // (With eta = 0, std_dev_t = 0 * sqrt(variance): NaN only where diffusers' is NaN too.)
        let b_prev = 1.0 - a_prev;
        let variance = (b_prev / b_t) * (1.0 - a_t / a_prev);
        let std_dev_t = self.eta as f32 * variance.sqrt();
        let direction = mul(&pred_eps, (1.0 - a_prev - std_dev_t * std_dev_t).sqrt())?;
        let prev = (mul(&pred_x0, a_prev.sqrt())? + direction)?;
        if self.eta > 0.0 {
            let noise = rng.randn(model_output.dims(), model_output.device())?;
            return Ok((prev + mul(&noise, std_dev_t)?)?);
        }
        Ok(prev)
    }
}
