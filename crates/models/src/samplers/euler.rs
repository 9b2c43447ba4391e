//! Euler and Euler ancestral: ports of diffusers `EulerDiscreteScheduler` and
//! `EulerAncestralDiscreteScheduler` (k-diffusion style samplers on sigmas).
//!
//! Both scale the UNet input by `1 / sqrt(sigma^2 + 1)` and start from
//! `init_noise_sigma = max(sigmas)` (linspace / trailing spacing) or
//! `sqrt(max(sigmas)^2 + 1)` (leading spacing). The UNet timesteps are float32 values
//! (fractional with linspace spacing or Karras sigmas).

use candle_core::Tensor;

use super::config::BetaDefaults;
use super::schedule::{self, div, f32_tensor, mul, SigmaConversion};
use super::{check_index, PredictionType, Sampler, SchedulerConfig, TimestepSpacing, TorchRng};
use crate::Result;

/// `init_noise_sigma` of the Euler schedulers (float32 arithmetic, like the torch scalar).
pub(crate) fn init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f32 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
    }
}

/// `sample / sqrt(sigma^2 + 1)`.
pub(crate) fn scale_input(sample: &Tensor, sigma: f32) -> Result<Tensor> {
    div(sample, (sigma * sigma + 1.0).sqrt())
}

/// The denoised estimate `pred_original_sample` of the Euler schedulers.
pub(crate) fn pred_original(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match prediction_type {
        PredictionType::Epsilon => (sample - mul(model_output, sigma)?)?,
        PredictionType::VPrediction => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            (mul(model_output, c_out)? + div(sample, sigma * sigma + 1.0)?)?
        }
    })
}

/// `original + sigma * noise` in float32: `add_noise` of the samplers on sigma-scaled
/// latents.
pub(crate) fn add_noise_sigma(original: &Tensor, noise: &Tensor, sigma: f32) -> Result<Tensor> {
    let (x, n) = (f32_tensor(original)?, f32_tensor(noise)?);
    Ok((x + mul(&n, sigma)?)?)
}

/// diffusers `EulerDiscreteScheduler` (no churn: `s_churn = 0`, the pipelines' default).
#[derive(Debug)]
pub struct Euler {
    /// float32 sigmas, one more than the timesteps (the last is 0 or sigma_min).
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
}

impl Euler {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        const WHO: &str = "Euler";
        match cfg.timestep_type.as_str() {
            "discrete" => {}
            // Without v-prediction diffusers never looks at a continuous timestep_type.
            "continuous" if cfg.prediction_type != PredictionType::VPrediction => {}
            other => {
                return Err(cfg.unsupported(
                    "timestep_type",
                    format!(
                        "{other:?} (with prediction_type {:?})",
                        cfg.prediction_type.as_str()
                    ),
                    WHO,
                ))
            }
        }
        let ac =
            schedule::alphas_cumprod(cfg, BetaDefaults::DDPM, cfg.rescale_betas_zero_snr, true)?;
        let full = schedule::sigmas_from_alphas_cumprod(&ac);
        let spacing = cfg.spacing_or(TimestepSpacing::Linspace);
        let mut timesteps =
            schedule::float_timesteps(spacing, cfg.num_train_timesteps, n, cfg.steps_offset);

        let mut sigmas: Vec<f64> = match cfg.interpolation_type.as_str() {
            "linear" => timesteps
                .iter()
                .map(|&t| schedule::np_interp(f64::from(t), &full))
                .collect(),
            "log_linear" => {
                // torch.linspace(log(sigmas[-1]), log(sigmas[0]), n + 1).exp(); note that
                // diffusers then appends the final sigma after these n + 1 values, so the
                // last step ends at the smallest training sigma, not at 0.
                let ln = |s: f32| f64::from(s).ln() as f32;
                let (first, last) = (full[0], full[full.len() - 1]);
                schedule::torch_linspace_f32(ln(last), ln(first), n + 1)
                    .into_iter()
                    .map(|v| f64::from(v.exp()))
                    .collect()
            }
            other => return Err(cfg.unsupported("interpolation_type", format!("{other:?}"), WHO)),
        };
        if let Some(conversion) = SigmaConversion::from_config(cfg) {
            sigmas = conversion.convert(cfg, &sigmas, n);
            let log_sigmas = schedule::log_sigmas(&full);
            timesteps = sigmas
                .iter()
                .map(|&s| schedule::sigma_to_t(s, &log_sigmas) as f32)
                .collect();
        }
        let sigma_last = final_sigma(cfg, &ac, WHO)?;
        let sigmas: Vec<f32> = sigmas
            .iter()
            .map(|&s| s as f32)
            .chain(std::iter::once(sigma_last))
            .collect();
        Ok(Euler {
            init_noise_sigma: init_noise_sigma(&sigmas, spacing),
            sigmas,
            timesteps: timesteps.iter().map(|&t| f64::from(t)).collect(),
            prediction_type: cfg.prediction_type,
        })
    }

    /// `set_timesteps(sigmas=sigmas)`: a given schedule (with its final sigma), the
    /// timesteps from `_sigma_to_t` of each but the last.
    pub fn with_sigmas(cfg: &SchedulerConfig, sigmas: Vec<f32>) -> Result<Self> {
        let ac =
            schedule::alphas_cumprod(cfg, BetaDefaults::DDPM, cfg.rescale_betas_zero_snr, true)?;
        let log_sigmas = schedule::log_sigmas(&schedule::sigmas_from_alphas_cumprod(&ac));
        let timesteps: Vec<f64> = sigmas[..sigmas.len().saturating_sub(1)]
            .iter()
            .map(|&s| f64::from(schedule::sigma_to_t(f64::from(s), &log_sigmas) as f32))
            .collect();
        let spacing = cfg.spacing_or(TimestepSpacing::Linspace);
        Ok(Euler {
            init_noise_sigma: init_noise_sigma(&sigmas, spacing),
            sigmas,
            timesteps,
            prediction_type: cfg.prediction_type,
        })
    }
}

/// The sigma appended after the schedule (`final_sigmas_type`).
pub(crate) fn final_sigma(cfg: &SchedulerConfig, ac: &[f32], who: &str) -> Result<f32> {
    match cfg.final_sigmas_type.as_str() {
        "zero" => Ok(0.0),
        "sigma_min" => Ok(((1.0 - ac[0]) / ac[0]).sqrt()),
        other => Err(cfg.unsupported("final_sigmas_type", format!("{other:?}"), who)),
    }
}

impl Sampler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        add_noise_sigma(original, noise, self.sigmas[step_index])
    }

    fn init_noise_sigma(&self) -> f64 {
        f64::from(self.init_noise_sigma)
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        scale_input(sample, self.sigmas[step_index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _rng: &mut TorchRng,
    ) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let model_output = f32_tensor(model_output)?;
        let sample = f32_tensor(sample)?;
        // s_churn = 0, so gamma = 0 and sigma_hat = sigma.
        let sigma = self.sigmas[step_index];
        let pred_x0 = pred_original(self.prediction_type, &model_output, &sample, sigma)?;
        let derivative = div(&(&sample - pred_x0)?, sigma)?;
        let dt = self.sigmas[step_index + 1] - sigma;
        Ok((&sample + mul(&derivative, dt)?)?)
    }
}

/// diffusers `EulerAncestralDiscreteScheduler`: an Euler step to `sigma_down` plus fresh
/// noise of size `sigma_up`, drawn from the generator once per step.
#[derive(Debug)]
pub struct EulerAncestral {
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
}

impl EulerAncestral {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        // EulerAncestralDiscreteScheduler knows no Karras / interpolation / final-sigma
        // options; from_config ignores those keys.
        let ac =
            schedule::alphas_cumprod(cfg, BetaDefaults::DDPM, cfg.rescale_betas_zero_snr, true)?;
        let full = schedule::sigmas_from_alphas_cumprod(&ac);
        let spacing = cfg.spacing_or(TimestepSpacing::Linspace);
        let timesteps =
            schedule::float_timesteps(spacing, cfg.num_train_timesteps, n, cfg.steps_offset);
        let sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| schedule::np_interp(f64::from(t), &full) as f32)
            .chain(std::iter::once(0.0))
            .collect();
        Ok(EulerAncestral {
            init_noise_sigma: init_noise_sigma(&sigmas, spacing),
            sigmas,
            timesteps: timesteps.iter().map(|&t| f64::from(t)).collect(),
            prediction_type: cfg.prediction_type,
        })
    }
}

impl Sampler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        add_noise_sigma(original, noise, self.sigmas[step_index])
    }

    fn init_noise_sigma(&self) -> f64 {
        f64::from(self.init_noise_sigma)
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        scale_input(sample, self.sigmas[step_index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut TorchRng,
    ) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let model_output = f32_tensor(model_output)?;
        let sample = f32_tensor(sample)?;
        let sigma = self.sigmas[step_index];
        let pred_x0 = pred_original(self.prediction_type, &model_output, &sample, sigma)?;
        let sigma_from = sigma;
        let sigma_to = self.sigmas[step_index + 1];
        let sigma_up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
            / (sigma_from * sigma_from))
            .sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        let derivative = div(&(&sample - pred_x0)?, sigma)?;
        let dt = sigma_down - sigma;
        let prev = (&sample + mul(&derivative, dt)?)?;
        let noise = rng.randn(model_output.dims(), model_output.device())?;
        Ok((prev + mul(&noise, sigma_up)?)?)
    }
}
