//! TCD: port of diffusers `TCDScheduler` (trajectory consistency distillation).
//!
//! `scale_model_input` is the identity and `init_noise_sigma` is 1. The timesteps are the
//! LCM ones (see [`super::lcm`]). Each step predicts x0 and the noise, moves them to the
//! intermediate timestep `s = floor((1 - eta) * t_next)` (`t_next` = 0 after the last
//! step), and, when `eta > 0` and the step is not the last, re-noises from `s` to the next
//! timestep with one `randn(model_output.shape)` drawn from the generator. With `eta = 0`
//! it is deterministic.
//!
//! `eta` is the `step` argument (diffusers' default 0.3). The Stable Diffusion pipelines pass
//! their own `eta` argument (default 0.0) to every scheduler whose `step` accepts one, so a
//! pipeline run with its default settings corresponds to `with_eta(0.0)`.
//! `clip_sample` and `thresholding` are ignored, as diffusers' `step` ignores them.

use candle_core::Tensor;

use super::config::BetaDefaults;
use super::lcm::{consistency_timesteps, predict_x0};
use super::schedule::{self, f32_tensor, mul};
use super::{bad_step_index, check_index, PredictionType, Sampler, SchedulerConfig, TorchRng};
use crate::{Error, Result};

/// Trajectory consistency sampling with stochasticity `eta` (gamma in the paper).
#[derive(Debug)]
pub struct Tcd {
    alphas_cumprod: Vec<f32>,
    steps: Vec<i64>,
    timesteps: Vec<f64>,
    prediction_type: PredictionType,
    /// A Python float in diffusers, hence float64.
    eta: f64,
    /// The loop index the next step must have, once the first step ran.
    next_step: Option<usize>,
}

/// `torch.floor((1 - eta) * prev_timestep).long()`: the int64 tensor times a Python float is
/// a float32 product.
fn intermediate_timestep(eta: f64, prev_t: i64) -> i64 {
    ((1.0 - eta) as f32 * prev_t as f32).floor() as i64
}

impl Tcd {
    /// `TCDScheduler.from_config(cfg)` + `set_timesteps(n)`, stepping with eta = 0.3.
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        Self::with_strength(cfg, n, 1.0)
    }

    /// `TCDScheduler.from_config(cfg)` + `set_timesteps(n, strength=strength)`, stepping
    /// with eta = 0.3.
    pub fn with_strength(cfg: &SchedulerConfig, n: usize, strength: f64) -> Result<Self> {
        let ac =
            schedule::alphas_cumprod(cfg, BetaDefaults::LCM, cfg.rescale_betas_zero_snr, false)?;
        let steps = consistency_timesteps(cfg, n, strength)?;
        Ok(Tcd {
            alphas_cumprod: ac,
            timesteps: steps.iter().map(|&t| t as f64).collect(),
            steps,
            prediction_type: cfg.prediction_type,
            eta: 0.3,
            next_step: None,
        })
    }

    /// The `eta` passed to every `step` (0 to 1; checked when stepping, as diffusers does).
    /// An `f64` keeps a Python float's value exactly; an `f32` is widened.
    pub fn with_eta(mut self, eta: impl Into<f64>) -> Self {
        self.eta = eta.into();
        self
    }
}

impl Sampler for Tcd {
    fn set_eta(&mut self, eta: f64) -> Result<()> {
        super::ddim::check_eta(eta)?;
        self.eta = eta;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.steps.len())?;
        let t = self.steps[step_index] as usize;
        schedule::add_noise_alpha(&self.alphas_cumprod, t, original, noise)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut TorchRng,
    ) -> Result<Tensor> {
        let len = self.steps.len();
        check_index(step_index, len)?;
        // diffusers counts steps itself after the first one (which may start late).
        if let Some(next) = self.next_step {
            if step_index != next {
                return Err(bad_step_index(
                    step_index,
                    &format!("step {next} (TCD steps run in order)"),
                ));
            }
        }
        let eta = self.eta;
        if !(0.0..=1.0).contains(&eta) {
            return Err(Error::invalid(
                "eta",
                format!("must be between 0 and 1 for TCD, got {eta}"),
            ));
        }
        let model_output = f32_tensor(model_output)?;
        let sample = f32_tensor(sample)?;

        let t = self.steps[step_index];
        let prev_t = self.steps.get(step_index + 1).copied().unwrap_or(0);
        let s = intermediate_timestep(eta, prev_t);
        let a_t = self.alphas_cumprod[t as usize];
        let a_prev = self.alphas_cumprod[prev_t as usize];
        let a_s = self.alphas_cumprod[s as usize];
        let b_t = 1.0 - a_t;
        let b_s = 1.0 - a_s;

        let pred_x0 = predict_x0(self.prediction_type, &model_output, &sample, a_t)?;
        let pred_eps = match self.prediction_type {
            PredictionType::Epsilon => model_output.clone(),
            PredictionType::VPrediction => {
                (mul(&model_output, a_t.sqrt())? + mul(&sample, b_t.sqrt())?)?
            }
        };
        let pred_noised = (mul(&pred_x0, a_s.sqrt())? + mul(&pred_eps, b_s.sqrt())?)?;
        let prev = if eta > 0.0 && step_index != len - 1 {
            let noise = rng.randn(model_output.dims(), model_output.device())?;
            let ratio = a_prev / a_s;
            (mul(&pred_noised, ratio.sqrt())? + mul(&noise, (1.0 - ratio).sqrt())?)?
        } else {
            pred_noised
        };
        self.next_step = Some(step_index + 1);
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values from diffusers 0.42.1:
    // t = TCDScheduler(); t.set_timesteps(n, strength=s); print(t.timesteps.tolist())
    #[test]
    fn timesteps_match_diffusers() {
        let c = SchedulerConfig::default();
        assert_eq!(Tcd::new(&c, 4).unwrap().steps, vec![999, 759, 499, 259]);
        assert_eq!(
            Tcd::with_strength(&c, 8, 0.5).unwrap().steps,
            vec![499, 439, 379, 319, 259, 199, 139, 79]
        );
        assert!(Tcd::new(&c, 51).is_err());
    }

    // [int(torch.floor((1 - eta) * torch.tensor(p)).long()) for p in ps]
    #[test]
    fn intermediate_timestep_is_a_float32_product() {
        let got: Vec<i64> = [759, 499, 259, 0, 90, 350]
            .iter()
            .map(|&p| intermediate_timestep(0.3, p))
            .collect();
        assert_eq!(got, vec![531, 349, 181, 0, 63, 245]);
        // float64 arithmetic would give 0, 1, 2 here.
        let got: Vec<i64> = [10, 20, 30]
            .iter()
            .map(|&p| intermediate_timestep(0.9, p))
            .collect();
        assert_eq!(got, vec![1, 2, 3]);
    }

    #[test]
    fn eta_is_a_constructor_field() {
        let c = SchedulerConfig::default();
        assert_eq!(Tcd::new(&c, 4).unwrap().eta, 0.3);
        assert_eq!(Tcd::new(&c, 4).unwrap().with_eta(0.5f32).eta, 0.5);
    }
}
