//! LCM: port of diffusers `LCMScheduler` (latent consistency models, multistep sampling).
//!
//! `scale_model_input` is the identity and `init_noise_sigma` is 1. The timesteps ignore
//! `timestep_spacing` and `steps_offset`: they are `n` entries, evenly spaced by index, of the
//! distillation schedule `k - 1, 2k - 1, ..., original_inference_steps * k - 1` (with
//! `k = num_train_timesteps // original_inference_steps`), from the top. Each step computes
//! the consistency-model output `denoised = c_out * x0 + c_skip * x_t` (boundary scalings
//! from `timestep_scaling`) and, on every step but the last, re-noises it to the next
//! timestep with one `randn(model_output.shape)` drawn from the generator; the last step
//! returns `denoised` itself. `set_alpha_to_one` has no effect: the next timestep is never
//! negative.

use candle_core::Tensor;

use super::config::BetaDefaults;
use super::schedule::{self, div, f32_tensor, mul};
use super::{bad_step_index, check_index, PredictionType, Sampler, SchedulerConfig, TorchRng};
use crate::{Error, Result};

const WHO: &str = "LCM";

/// The non-custom branch of `LCMScheduler.set_timesteps` / `TCDScheduler.set_timesteps`
/// (with `original_inference_steps` from the config): the timesteps, descending.
pub(crate) fn consistency_timesteps(
    cfg: &SchedulerConfig,
    n: usize,
    strength: f64,
) -> Result<Vec<i64>> {
    let num_train = cfg.num_train_timesteps;
    let original_steps = cfg.original_inference_steps;
    if original_steps > num_train {
        return Err(Error::config(
            &cfg.path,
            format!(
                "original_inference_steps ({original_steps}) cannot be larger than \
                 num_train_timesteps ({num_train})"
            ),
        ));
    }
    let k = (num_train / original_steps) as i64;
    // Python's int(original_steps * strength): float64 product, truncated toward zero.
    let scaled = original_steps as f64 * strength;
    if !scaled.is_finite() {
        return Err(Error::invalid(
            "strength",
            format!("must be a finite number, got {strength}"),
        ));
    }
    let len = scaled.trunc().max(0.0) as usize;
    if n > num_train {
        return Err(Error::invalid(
            "steps",
            format!(
                "cannot be larger than {num_train} (the scheduler's num_train_timesteps: the \
                 model was trained on that many timesteps), got {n}"
            ),
        ));
    }
    if n == 0 || len / n < 1 {
        return Err(Error::invalid(
            "steps",
            format!(
                "must be between 1 and {len} (original_inference_steps {original_steps} x \
                 strength {strength}: the schedule is a subset of the distillation \
                 schedule), got {n}"
            ),
        ));
    }
    if n > original_steps {
        return Err(Error::invalid(
            "steps",
            format!(
                "cannot be larger than original_inference_steps ({original_steps}): the \
                 schedule is a subset of the distillation schedule, got {n}"
            ),
        ));
    }
    // Descending distillation schedule, indexed by floor(np.linspace(0, len, n,
    // endpoint=False)) = floor(i * (len / n)).
    let origin: Vec<i64> = (1..=len as i64).rev().map(|i| i * k - 1).collect();
    let step = len as f64 / n as f64;
    let ts: Vec<i64> = (0..n)
        .map(|i| origin[(i as f64 * step).floor() as usize])
        .collect();
    if let Some(&t) = ts.iter().find(|&&t| t < 0 || t >= num_train as i64) {
        return Err(Error::invalid(
            "strength",
            format!("{strength} puts timestep {t} outside the training range 0..{num_train}"),
        ));
    }
    Ok(ts)
}

/// `(c_skip, c_out)` of diffusers' `get_scalings_for_boundary_condition_discrete`, in float32
/// as torch evaluates it on an int64 timestep tensor (sigma_data = 0.5).
pub(crate) fn boundary_scalings(t: i64, timestep_scaling: f64) -> (f32, f32) {
    let scaled = t as f32 * timestep_scaling as f32;
    let d = scaled * scaled + 0.25;
    // `0.25 / tensor` is `tensor.reciprocal() * 0.25` in torch.
    ((1.0 / d) * 0.25, scaled / d.sqrt())
}

/// The data prediction x0 of an epsilon or v model, float32 as diffusers computes it.
pub(crate) fn predict_x0(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    a_t: f32,
) -> Result<Tensor> {
    let b_t = 1.0 - a_t;
    Ok(match prediction_type {
        PredictionType::Epsilon => div(&(sample - mul(model_output, b_t.sqrt())?)?, a_t.sqrt())?,
        PredictionType::VPrediction => (mul(sample, a_t.sqrt())? - mul(model_output, b_t.sqrt())?)?,
    })
}

/// Multistep latent consistency sampling.
#[derive(Debug)]
pub struct Lcm {
    alphas_cumprod: Vec<f32>,
    steps: Vec<i64>,
    timesteps: Vec<f64>,
    prediction_type: PredictionType,
    timestep_scaling: f64,
    /// `Some(range)` when `clip_sample` is on.
    clip: Option<f32>,
    /// The loop index the next step must have, once the first step ran.
    next_step: Option<usize>,
}

impl Lcm {
    /// `LCMScheduler.from_config(cfg)` + `set_timesteps(n)`.
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        Self::with_strength(cfg, n, 1.0)
    }

    /// `LCMScheduler.from_config(cfg)` + `set_timesteps(n, strength=strength)` (the LCM
    /// image-to-image pipeline's call: the schedule is taken from the lower `strength` part
    /// of the distillation schedule).
    pub fn with_strength(cfg: &SchedulerConfig, n: usize, strength: f64) -> Result<Self> {
        if cfg.thresholding {
            return Err(cfg.unsupported("thresholding", true, WHO));
        }
        let ac =
            schedule::alphas_cumprod(cfg, BetaDefaults::LCM, cfg.rescale_betas_zero_snr, false)?;
        let steps = consistency_timesteps(cfg, n, strength)?;
        Ok(Lcm {
            alphas_cumprod: ac,
            timesteps: steps.iter().map(|&t| t as f64).collect(),
            steps,
            prediction_type: cfg.prediction_type,
            timestep_scaling: cfg.timestep_scaling,
            clip: cfg
                .clip_sample
                .unwrap_or(false)
                .then_some(cfg.clip_sample_range as f32),
            next_step: None,
        })
    }
}

impl Sampler for Lcm {
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
                    &format!("step {next} (LCM steps run in order)"),
                ));
            }
        }
        let model_output = f32_tensor(model_output)?;
        let sample = f32_tensor(sample)?;

        let t = self.steps[step_index];
        let prev_t = self.steps.get(step_index + 1).copied().unwrap_or(t);
        let a_t = self.alphas_cumprod[t as usize];
        let a_prev = self.alphas_cumprod[prev_t as usize];
        let b_prev = 1.0 - a_prev;
        let (c_skip, c_out) = boundary_scalings(t, self.timestep_scaling);

        let mut pred_x0 = predict_x0(self.prediction_type, &model_output, &sample, a_t)?;
        if let Some(r) = self.clip {
            pred_x0 = pred_x0.clamp(-r, r)?;
        }
        let denoised = (mul(&pred_x0, c_out)? + mul(&sample, c_skip)?)?;
        let prev = if step_index != len - 1 {
            let noise = rng.randn(model_output.dims(), model_output.device())?;
            (mul(&denoised, a_prev.sqrt())? + mul(&noise, b_prev.sqrt())?)?
        } else {
            denoised
        };
        self.next_step = Some(step_index + 1);
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values from diffusers 0.42.1:
    // l = LCMScheduler(original_inference_steps=o); l.set_timesteps(n, strength=s)
    // print(l.timesteps.tolist())
    #[test]
    fn timesteps_match_diffusers() {
        let c = SchedulerConfig::default();
        assert_eq!(Lcm::new(&c, 4).unwrap().steps, vec![999, 759, 499, 259]);
        assert_eq!(
            Lcm::new(&c, 6).unwrap().steps,
            vec![999, 839, 679, 499, 339, 179]
        );
        assert_eq!(
            Lcm::with_strength(&c, 4, 0.6).unwrap().steps,
            vec![599, 459, 299, 159]
        );
        let c100 = SchedulerConfig {
            original_inference_steps: 100,
            ..SchedulerConfig::default()
        };
        assert_eq!(
            Lcm::new(&c100, 7).unwrap().steps,
            vec![999, 859, 719, 579, 429, 289, 149]
        );
    }

    #[test]
    fn refuses_more_steps_than_the_distillation_schedule() {
        let c = SchedulerConfig::default();
        assert!(Lcm::new(&c, 50).is_ok());
        assert!(Lcm::new(&c, 51).is_err());
        assert!(Lcm::new(&c, 0).is_err());
        assert!(Lcm::with_strength(&c, 30, 0.5).is_err());
    }

    #[test]
    fn boundary_scalings_at_the_ends() {
        // c_skip = 0.25 / (100 t^2 + 0.25), c_out = 10 t / sqrt(100 t^2 + 0.25).
        assert_eq!(boundary_scalings(0, 10.0), (1.0, 0.0));
        let (c_skip, c_out) = boundary_scalings(999, 10.0);
        assert!((c_skip - 2.505e-9).abs() < 1e-11);
        assert!((c_out - 1.0).abs() < 1e-6);
    }
}
