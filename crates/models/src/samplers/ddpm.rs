//! DDPM: port of diffusers `DDPMScheduler` (ancestral sampling, Ho et al. 2020).
//!
//! `scale_model_input` is the identity and `init_noise_sigma` is 1. The UNet timesteps are
//! integers spaced by `timestep_spacing` (default `leading`). Each step moves to the next
//! timestep of the loop (the "previous" timestep is the next loop entry, -1 after the last,
//! whatever the spacing) and, when its own timestep is above 0, adds fresh noise drawn from
//! the generator as `randn(model_output.shape)`: one draw per such step, none at timestep 0
//! (leading spacing with `steps_offset` 0 ends on timestep 0).

use candle_core::Tensor;

use super::config::BetaDefaults;
use super::schedule::{self, div, f32_tensor, mul};
use super::{check_index, PredictionType, Sampler, SchedulerConfig, TimestepSpacing, TorchRng};
use crate::{Error, Result};

const WHO: &str = "DDPM";

/// The `variance_type`s whose variance does not come from the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VarianceType {
    Small,
    SmallLog,
    Large,
    LargeLog,
}

/// DDPM ancestral sampling with a fixed (not learned) variance.
#[derive(Debug)]
pub struct Ddpm {
    alphas_cumprod: Vec<f32>,
    /// (t, prev_t) per loop index.
    plan: Vec<(i64, i64)>,
    timesteps: Vec<f64>,
    prediction_type: PredictionType,
    variance_type: VarianceType,
    /// `Some(range)` when `clip_sample` is on.
    clip: Option<f32>,
}

/// diffusers' `previous_timestep` once `set_timesteps` ran: the entry after the first
/// occurrence of `t` in the schedule, or -1 after the last.
fn previous_timesteps(ts: &[i64]) -> Vec<(i64, i64)> {
    ts.iter()
        .map(|&t| {
            let index = ts.iter().position(|&x| x == t).unwrap_or(0);
            (t, ts.get(index + 1).copied().unwrap_or(-1))
        })
        .collect()
}

impl Ddpm {
    /// `DDPMScheduler.from_config(cfg)` + `set_timesteps(n)`.
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        if cfg.thresholding {
            return Err(cfg.unsupported("thresholding", true, WHO));
        }
        let variance_type = match cfg.variance_type.as_deref().unwrap_or("fixed_small") {
            "fixed_small" => VarianceType::Small,
            "fixed_small_log" => VarianceType::SmallLog,
            "fixed_large" => VarianceType::Large,
            "fixed_large_log" => VarianceType::LargeLog,
            other => return Err(cfg.unsupported("variance_type", format!("{other:?}"), WHO)),
        };
        let num_train = cfg.num_train_timesteps;
        if n == 0 || n > num_train {
            return Err(Error::invalid(
                "steps",
                format!(
                    "must be between 1 and {num_train} (the scheduler's num_train_timesteps: \
                     the model was trained on that many timesteps), got {n}"
                ),
            ));
        }
        let ac =
            schedule::alphas_cumprod(cfg, BetaDefaults::DDPM, cfg.rescale_betas_zero_snr, false)?;
        let spacing = cfg.spacing_or(TimestepSpacing::Leading);
        let ts = schedule::int_timesteps(spacing, num_train, n, cfg.steps_offset);
        schedule::check_timesteps_in_range(cfg, WHO, ts.iter().copied())?;
        Ok(Ddpm {
            alphas_cumprod: ac,
            plan: previous_timesteps(&ts),
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            prediction_type: cfg.prediction_type,
            variance_type,
            clip: cfg
                .clip_sample
                .unwrap_or(true)
                .then_some(cfg.clip_sample_range as f32),
        })
    }

    /// The factor of the step's noise: `_get_variance(t) ** 0.5`, or the variance itself for
    /// `fixed_small_log` (whose "variance" is already a standard deviation), in float32.
    fn noise_scale(&self, a_t: f32, a_prev: f32) -> f32 {
        let current_beta_t = 1.0 - a_t / a_prev;
        let variance = (1.0 - a_prev) / (1.0 - a_t) * current_beta_t;
        // torch.clamp(min=1e-20), which keeps NaN.
        let variance = if variance < 1e-20 { 1e-20 } else { variance };
        match self.variance_type {
            VarianceType::Small => variance.sqrt(),
            VarianceType::SmallLog => (0.5 * variance.ln()).exp(),
            VarianceType::Large => current_beta_t.sqrt(),
            // The square root of a logarithm (NaN for betas below 1), as diffusers computes it.
            VarianceType::LargeLog => current_beta_t.ln().sqrt(),
        }
    }
}

impl Sampler for Ddpm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let t = self.plan[step_index].0 as usize;
        schedule::add_noise_alpha(&self.alphas_cumprod, t, original, noise)
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
            1.0
        };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let current_alpha_t = a_t / a_prev;
        let current_beta_t = 1.0 - current_alpha_t;

        let mut pred_x0 = match self.prediction_type {
            PredictionType::Epsilon => {
                div(&(&sample - mul(&model_output, b_t.sqrt())?)?, a_t.sqrt())?
            }
            PredictionType::VPrediction => {
                (mul(&sample, a_t.sqrt())? - mul(&model_output, b_t.sqrt())?)?
            }
        };
        if let Some(r) = self.clip {
            pred_x0 = pred_x0.clamp(-r, r)?;
        }

        let x0_coeff = (a_prev.sqrt() * current_beta_t) / b_t;
        let sample_coeff = current_alpha_t.sqrt() * b_prev / b_t;
        let prev = (mul(&pred_x0, x0_coeff)? + mul(&sample, sample_coeff)?)?;
        if t > 0 {
            let noise = rng.randn(model_output.dims(), model_output.device())?;
            let scale = self.noise_scale(a_t, a_prev);
            return Ok((prev + mul(&noise, scale)?)?);
        }
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(spacing: TimestepSpacing, steps_offset: i64) -> SchedulerConfig {
        SchedulerConfig {
            timestep_spacing: Some(spacing),
            steps_offset,
            ..SchedulerConfig::default()
        }
    }

    // Values from diffusers 0.42.1:
    // s = DDPMScheduler(timestep_spacing=sp, steps_offset=o); s.set_timesteps(7)
    // print(s.timesteps.tolist(), [int(s.previous_timestep(t)) for t in s.timesteps])
    #[test]
    fn timesteps_and_previous_timesteps() {
        let d = Ddpm::new(&cfg(TimestepSpacing::Leading, 1), 7).unwrap();
        assert_eq!(
            d.timesteps,
            vec![853.0, 711.0, 569.0, 427.0, 285.0, 143.0, 1.0]
        );
        let prev: Vec<i64> = d.plan.iter().map(|p| p.1).collect();
        assert_eq!(prev, vec![711, 569, 427, 285, 143, 1, -1]);

        let d = Ddpm::new(&cfg(TimestepSpacing::Trailing, 0), 7).unwrap();
        assert_eq!(
            d.timesteps,
            vec![999.0, 856.0, 713.0, 570.0, 428.0, 285.0, 142.0]
        );
        assert_eq!(d.plan[0], (999, 856));
        assert_eq!(d.plan[6], (142, -1));

        let d = Ddpm::new(&cfg(TimestepSpacing::Linspace, 0), 7).unwrap();
        assert_eq!(
            d.timesteps,
            vec![999.0, 832.0, 666.0, 500.0, 333.0, 166.0, 0.0]
        );
        assert_eq!(d.plan[5], (166, 0));
    }

    #[test]
    fn refuses_more_steps_than_training_timesteps() {
        assert!(Ddpm::new(&SchedulerConfig::default(), 1001).is_err());
        assert!(Ddpm::new(&SchedulerConfig::default(), 0).is_err());
        assert!(Ddpm::new(&SchedulerConfig::default(), 1000).is_ok());
    }

    #[test]
    fn refuses_learned_variance() {
        let c = SchedulerConfig {
            variance_type: Some("learned_range".into()),
            ..SchedulerConfig::default()
        };
        assert!(Ddpm::new(&c, 10).is_err());
    }
}
