//! Flow matching Euler: diffusers' `FlowMatchEulerDiscreteScheduler` as `FluxPipeline` drives
//! it (sigmas `linspace(1, 1/n, n)`, shifted statically or by `mu` from the image sequence
//! length, then a final 0), in float32 as diffusers computes it.

use candle_core::{DType, Tensor};
use serde_json::json;

use crate::modules::config::JsonConfig;
use crate::{Error, Result};

/// The fields of a `FlowMatchEulerDiscreteScheduler` config that we use.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowMatchConfig {
    pub num_train_timesteps: usize,
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub base_shift: f64,
    pub max_shift: f64,
    pub base_image_seq_len: usize,
    pub max_image_seq_len: usize,
    /// `"exponential"` (default) or `"linear"`.
    pub time_shift_type: String,
}

impl FlowMatchConfig {
    pub fn from_config(cfg: &JsonConfig) -> Result<Self> {
        for key in [
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "invert_sigmas",
            "stochastic_sampling",
        ] {
            cfg.expect_default(key, &[json!(false), json!(null)])?;
        }
        cfg.expect_default("shift_terminal", &[json!(null)])?;
        let base = cfg.usize_or("base_image_seq_len", 256)?;
        let max = cfg.usize_or("max_image_seq_len", 4096)?;
        if cfg.bool_or("use_dynamic_shifting", false)? && base == max {
            return Err(cfg.err(format!(
                "base_image_seq_len and max_image_seq_len are both {base}: the shift cannot be interpolated"
            )));
        }
        let time_shift_type = cfg.str_or("time_shift_type", "exponential")?.to_string();
        if time_shift_type != "exponential" && time_shift_type != "linear" {
            return Err(cfg.err(format!(
                "field `time_shift_type` must be \"exponential\" or \"linear\", got {time_shift_type:?}"
            )));
        }
        Ok(Self {
            num_train_timesteps: cfg.usize_or("num_train_timesteps", 1000)?,
            shift: cfg.f64_or("shift", 1.0)?,
            use_dynamic_shifting: cfg.bool_or("use_dynamic_shifting", false)?,
            base_shift: cfg.f64_or("base_shift", 0.5)?,
            max_shift: cfg.f64_or("max_shift", 1.15)?,
            base_image_seq_len: cfg.usize_or("base_image_seq_len", 256)?,
            max_image_seq_len: cfg.usize_or("max_image_seq_len", 4096)?,
            time_shift_type,
        })
    }

    /// `FluxPipeline`'s `calculate_shift`: `mu` linear in the image sequence length.
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        image_seq_len as f64 * m + b
    }
}

/// numpy's `linspace(start, stop, n)` in f64: `i * step + start`, the last value exactly
/// `stop`.
fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    if let Some(last) = v.last_mut() {
        *last = stop;
    }
    v
}

/// The schedule of one run.
#[derive(Debug, Clone)]
pub struct FlowMatchEuler {
    /// float32 sigmas, one more than the steps (the last is 0).
    pub sigmas: Vec<f32>,
    /// `sigma * num_train_timesteps` (float32), one per step.
    pub timesteps: Vec<f32>,
}

impl FlowMatchEuler {
    /// `set_timesteps(sigmas=linspace(1, 1/n, n), mu=mu)`; `mu` is used with dynamic
    /// shifting only (required then).
    pub fn new(cfg: &FlowMatchConfig, n: usize, mu: Option<f64>) -> Result<Self> {
        if n == 0 {
            return Err(Error::invalid("steps", "must be at least 1, got 0"));
        }
        let base: Vec<f32> = linspace(1.0, 1.0 / n as f64, n)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let sigmas: Vec<f32> = if cfg.use_dynamic_shifting {
            let mu = mu.ok_or_else(|| {
                Error::invalid("mu", "dynamic shifting needs the image sequence length")
            })?;
            let e = if cfg.time_shift_type == "linear" {
                mu as f32
            } else {
                mu.exp() as f32
            };
            base.iter().map(|&t| e / (e + (1.0f32 / t - 1.0))).collect()
        } else {
            let s = cfg.shift as f32;
            let s1 = (cfg.shift - 1.0) as f32;
            base.iter().map(|&t| s * t / (1.0 + s1 * t)).collect()
        };
        let scale = cfg.num_train_timesteps as f32;
        let timesteps = sigmas.iter().map(|&s| s * scale).collect();
        let mut sigmas = sigmas;
        sigmas.push(0.0);
        Ok(Self { sigmas, timesteps })
    }

    /// `sample + (sigma_next - sigma) * model_output`, in f32.
    pub fn step(&self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        if i + 1 >= self.sigmas.len() {
            return Err(Error::invalid(
                "step_index",
                format!("{i} is past the last step ({})", self.sigmas.len() - 1),
            ));
        }
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        let out = model_output.to_dtype(DType::F32)?;
        let sample = sample.to_dtype(DType::F32)?;
        Ok((sample + out.affine(f64::from(dt), 0.0)?)?)
    }

    /// `scale_noise`: `sigma * noise + (1 - sigma) * sample` at step `i` (image-to-image).
    pub fn scale_noise(&self, sample: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let sigma = *self
            .sigmas
            .get(i)
            .ok_or_else(|| Error::invalid("step_index", format!("{i} is out of range")))?;
        let a = noise.to_dtype(DType::F32)?.affine(f64::from(sigma), 0.0)?;
        let b = sample
            .to_dtype(DType::F32)?
            .affine(f64::from(1.0f32 - sigma), 0.0)?;
        Ok((a + b)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_is_numpy() {
        assert_eq!(linspace(1.0, 0.25, 4), vec![1.0, 0.75, 0.5, 0.25]);
        assert_eq!(linspace(1.0, 1.0, 1), vec![1.0]);
    }

    #[test]
    fn unshifted_schedule_is_linear_and_ends_at_zero() {
        let cfg = FlowMatchConfig {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            time_shift_type: "exponential".into(),
        };
        let s = FlowMatchEuler::new(&cfg, 4, None).unwrap();
        assert_eq!(s.sigmas, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
        assert_eq!(s.timesteps, vec![1000.0, 750.0, 500.0, 250.0]);
        assert!((cfg.mu(256) - 0.5).abs() < 1e-12 && (cfg.mu(4096) - 1.15).abs() < 1e-12);
    }
}
