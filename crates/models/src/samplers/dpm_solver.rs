//! DPM++ 2M, DPM++ 2M SDE and DPM++ 3M SDE: port of diffusers
//! `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"` (order 2) or
//! `"sde-dpmsolver++"` (order 2 or 3), on its own sigmas or Karras / exponential / beta ones.
//!
//! The SDE variants add `sigma_t sqrt(1 - e^{-2h}) z` on every step, `z` drawn from the
//! request's generator once per step before the update (diffusers' `randn_tensor` of the
//! model output's shape, float32).
//!
//! `scale_model_input` is the identity and `init_noise_sigma` is 1 (the solver works on
//! `x_t = alpha_t x0 + sigma_t eps`, not on sigma-scaled latents). The UNet timesteps are
//! integers; with Karras sigmas they are the rounded fractional timesteps of those sigmas,
//! while the solver itself uses the exact Karras sigmas.

use candle_core::Tensor;

use super::config::BetaDefaults;
use super::euler::final_sigma;
use super::schedule::{self, div, f32_tensor, mul, SigmaConversion};
use super::{
    bad_step_index, check_index, PredictionType, Sampler, SchedulerConfig, TimestepSpacing,
    TorchRng,
};
use crate::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

/// DPM-Solver++ multistep (data prediction), deterministic or SDE.
#[derive(Debug)]
pub struct DpmSolverPp {
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    prediction_type: PredictionType,
    solver_type: SolverType,
    /// 1, 2 or 3.
    order: usize,
    /// `sde-dpmsolver++`.
    sde: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    // Per-run state: the last `order` data predictions, newest last.
    model_outputs: Vec<Tensor>,
    lower_order_nums: usize,
    next_step: usize,
}

/// `(alpha_t, sigma_t)` of a sigma, float32 as diffusers' `_sigma_to_alpha_sigma_t`.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmSolverPp {
    /// `DPMSolverMultistepScheduler.from_config(cfg, algorithm_type=("sde-dpmsolver++" if
    /// sde else "dpmsolver++"), solver_order=order)` + `set_timesteps(n)`.
    pub fn new(cfg: &SchedulerConfig, n: usize, order: usize, sde: bool) -> Result<Self> {
        const WHO: &str = "DPM-Solver++";
        if !(1..=3).contains(&order) {
            return Err(cfg.unsupported("solver_order", order, WHO));
        }
        for (key, on) in [
            ("thresholding", cfg.thresholding),
            ("use_lu_lambdas", cfg.use_lu_lambdas),
            ("use_flow_sigmas", cfg.use_flow_sigmas),
        ] {
            if on {
                return Err(cfg.unsupported(key, true, WHO));
            }
        }
        if let Some(v) = cfg.variance_type.as_deref() {
            if v == "learned" || v == "learned_range" {
                return Err(cfg.unsupported("variance_type", format!("{v:?}"), WHO));
            }
        }
        let solver_type = match cfg.solver_type.as_deref().unwrap_or("midpoint") {
            // diffusers maps the DEIS / UniPC solver types to midpoint.
            "midpoint" | "logrho" | "bh1" | "bh2" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => return Err(cfg.unsupported("solver_type", format!("{other:?}"), WHO)),
        };
        let num_train = cfg.num_train_timesteps;
        let ac =
            schedule::alphas_cumprod(cfg, BetaDefaults::DDPM, cfg.rescale_betas_zero_snr, true)?;

        // Timesteps below lambda_min_clipped are cut off the end of the range.
        let clipped_idx = if cfg.lambda_min_clipped == f64::NEG_INFINITY {
            0
        } else {
            let v = cfg.lambda_min_clipped as f32;
            // searchsorted(flip(lambda_t), v): the first index whose value is >= v.
            ac.iter()
                .rev()
                .map(|&a| lambda(a.sqrt(), (1.0 - a).sqrt()))
                .position(|l| l >= v)
                .unwrap_or(num_train)
        };
        let last_timestep = num_train - clipped_idx;

        let spacing = cfg.spacing_or(TimestepSpacing::Linspace);
        let mut timesteps: Vec<i64> = match spacing {
            TimestepSpacing::Linspace => {
                let mut v: Vec<i64> = schedule::np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                    .into_iter()
                    .rev()
                    .map(|t| t.round_ties_even() as i64)
                    .collect();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = (last_timestep / (n + 1)) as i64;
                (1..=n as i64)
                    .rev()
                    .map(|i| i * ratio + cfg.steps_offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = num_train as f64 / n as f64;
                schedule::np_arange_f64(last_timestep as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| t.round_ties_even() as i64 - 1)
                    .collect()
            }
        };

        let full = schedule::sigmas_from_alphas_cumprod(&ac);
        let sigmas: Vec<f64> = match SigmaConversion::from_config(cfg) {
            Some(conversion) => {
                let flipped: Vec<f64> = full.iter().rev().map(|&s| f64::from(s)).collect();
                let sigmas = conversion.convert(cfg, &flipped, n);
                let log_sigmas = schedule::log_sigmas(&full);
                // Karras timesteps are rounded (numpy, half to even) except on the cosine
                // schedule; all are then truncated by torch's float -> int64 cast.
                let round = conversion == SigmaConversion::Karras
                    && cfg.beta_schedule.as_deref() != Some("squaredcos_cap_v2");
                timesteps = sigmas
                    .iter()
                    .map(|&s| {
                        let t = schedule::sigma_to_t(s, &log_sigmas);
                        (if round { t.round_ties_even() } else { t }) as i64
                    })
                    .collect();
                sigmas
            }
            None => timesteps
                .iter()
                .map(|&t| schedule::np_interp(t as f64, &full))
                .collect(),
        };
        let sigma_last = final_sigma(cfg, &ac, WHO)?;
        let sigmas: Vec<f32> = sigmas
            .iter()
            .map(|&s| s as f32)
            .chain(std::iter::once(sigma_last))
            .collect();
        Ok(DpmSolverPp {
            sigmas,
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            prediction_type: cfg.prediction_type,
            solver_type,
            order,
            sde,
            lower_order_final: cfg.lower_order_final,
            euler_at_final: cfg.euler_at_final,
            final_sigma_zero: cfg.final_sigmas_type == "zero",
            model_outputs: Vec::new(),
            lower_order_nums: 0,
            next_step: 0,
        })
    }

    /// `convert_model_output`: the data prediction x0 (dpmsolver++).
    fn convert_model_output(&self, mo: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        Ok(match self.prediction_type {
            PredictionType::Epsilon => div(&(sample - mul(mo, sigma_t)?)?, alpha_t)?,
            PredictionType::VPrediction => (mul(sample, alpha_t)? - mul(mo, sigma_t)?)?,
        })
    }

    /// The SDE noise term `sigma_t sqrt(1 - e^{-2h}) z`.
    fn noise_term(noise: Option<&Tensor>, sigma_t: f32, h: f32) -> Result<Option<Tensor>> {
        noise
            .map(|z| mul(z, sigma_t * (1.0 - (-2.0 * h).exp()).sqrt()))
            .transpose()
    }

    fn first_order(
        &self,
        x0: &Tensor,
        sample: &Tensor,
        i: usize,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        match Self::noise_term(noise, sigma_t, h)? {
            None => {
                let a = mul(sample, sigma_t / sigma_s)?;
                let b = mul(x0, alpha_t * ((-h).exp() - 1.0))?;
                Ok((a - b)?)
            }
            Some(z) => {
                let a = mul(sample, sigma_t / sigma_s * (-h).exp())?;
                let b = mul(x0, alpha_t * (1.0 - (-2.0 * h).exp()))?;
                Ok(((a + b)? + z)?)
            }
        }
    }

    fn second_order(&self, sample: &Tensor, i: usize, noise: Option<&Tensor>) -> Result<Tensor> {
        let [.., m1, m0] = self.model_outputs.as_slice() else {
            return Err(bad_step_index(i, "a step after the first"));
        };
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let r0 = h_0 / h;
        let d1 = mul(&(m0 - m1)?, 1.0 / r0)?;
        if let Some(z) = Self::noise_term(noise, sigma_t, h)? {
            let c = alpha_t * (1.0 - (-2.0 * h).exp());
            let x = (mul(sample, sigma_t / sigma_s0 * (-h).exp())? + mul(m0, c)?)?;
            let x = match self.solver_type {
                SolverType::Midpoint => (x + mul(&d1, 0.5 * c)?)?,
                SolverType::Heun => {
                    let k = alpha_t * ((1.0 - (-2.0 * h).exp()) / (-2.0 * h) + 1.0);
                    (x + mul(&d1, k)?)?
                }
            };
            return Ok((x + z)?);
        }
        let c = alpha_t * ((-h).exp() - 1.0);
        let x = (mul(sample, sigma_t / sigma_s0)? - mul(m0, c)?)?;
        Ok(match self.solver_type {
            SolverType::Midpoint => (x - mul(&d1, 0.5 * c)?)?,
            SolverType::Heun => (x + mul(&d1, alpha_t * (((-h).exp() - 1.0) / h + 1.0))?)?,
        })
    }

    fn third_order(&self, sample: &Tensor, i: usize, noise: Option<&Tensor>) -> Result<Tensor> {
        let [.., m2, m1, m0] = self.model_outputs.as_slice() else {
            return Err(bad_step_index(i, "a step after the second"));
        };
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (alpha_s2, sigma_s2) = alpha_sigma(self.sigmas[i - 2]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let lambda_s2 = lambda(alpha_s2, sigma_s2);
        let (h, h_0, h_1) = (
            lambda_t - lambda_s0,
            lambda_s0 - lambda_s1,
            lambda_s1 - lambda_s2,
        );
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d1_0 = mul(&(m0 - m1)?, 1.0 / r0)?;
        let d1_1 = mul(&(m1 - m2)?, 1.0 / r1)?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + mul(&diff, r0 / (r0 + r1))?)?;
        let d2 = mul(&diff, 1.0 / (r0 + r1))?;
        if let Some(z) = Self::noise_term(noise, sigma_t, h)? {
            let e = (-2.0 * h).exp();
            let x =
                (mul(sample, sigma_t / sigma_s0 * (-h).exp())? + mul(m0, alpha_t * (1.0 - e))?)?;
            let x = (x + mul(&d1, alpha_t * ((1.0 - e) / (-2.0 * h) + 1.0))?)?;
            let k2 = alpha_t * ((1.0 - e - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5);
            let x = (x + mul(&d2, k2)?)?;
            return Ok((x + z)?);
        }
        let e = (-h).exp();
        let x = (mul(sample, sigma_t / sigma_s0)? - mul(m0, alpha_t * (e - 1.0))?)?;
        let x = (x + mul(&d1, alpha_t * ((e - 1.0) / h + 1.0))?)?;
        Ok((x - mul(&d2, alpha_t * ((e - 1.0 + h) / (h * h) - 0.5))?)?)
    }
}

impl Sampler for DpmSolverPp {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index]);
        let (x, n) = (f32_tensor(original)?, f32_tensor(noise)?);
        Ok((mul(&x, alpha_t)? + mul(&n, sigma_t)?)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut TorchRng,
    ) -> Result<Tensor> {
        let len = self.timesteps.len();
        check_index(step_index, len)?;
        // The first step may be at any index (image-to-image starts late); then in order.
        if !self.model_outputs.is_empty() && step_index != self.next_step {
            return Err(bad_step_index(
                step_index,
                &format!("step {} (DPM-Solver steps run in order)", self.next_step),
            ));
        }
        let i = step_index;
        let lower_order_final = i == len - 1
            && (self.euler_at_final
                || (self.lower_order_final && len < 15)
                || self.final_sigma_zero);
        let lower_order_second = i + 2 == len && self.lower_order_final && len < 15;
        let model_output = f32_tensor(model_output)?;
        let sample = f32_tensor(sample)?;
        let x0 = self.convert_model_output(&model_output, &sample, i)?;
        if self.model_outputs.len() == self.order {
            self.model_outputs.remove(0);
        }
        self.model_outputs.push(x0);
        let noise = if self.sde {
            Some(rng.randn(model_output.dims(), model_output.device())?)
        } else {
            None
        };
        let prev = if self.order == 1 || self.lower_order_nums < 1 || lower_order_final {
            let x0 = &self.model_outputs[self.model_outputs.len() - 1];
            self.first_order(x0, &sample, i, noise.as_ref())?
        } else if self.order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(&sample, i, noise.as_ref())?
        } else {
            self.third_order(&sample, i, noise.as_ref())?
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.order);
        self.next_step = step_index + 1;
        Ok(prev)
    }
}
