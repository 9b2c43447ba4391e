//! DEIS: port of diffusers `DEISMultistepScheduler` (`algorithm_type="deis"`, the log-rho
//! multistep solver of orders 1 to 3, with the Karras / exponential / beta sigma schedules).
//!
//! `scale_model_input` is the identity and `init_noise_sigma` is 1 (the solver works on
//! `x_t = alpha_t x0 + sigma_t eps`). The UNet timesteps are integers; with a converted sigma
//! schedule they are the training timesteps of those sigmas (rounded for Karras, truncated for
//! exponential and beta, as diffusers casts them). The last step does not reach sigma 0: it
//! ends on the training table's smallest sigma, or with a converted schedule on that
//! schedule's last sigma again (the final step then leaves the sample as it is).
//!
//! The solver keeps the noise predictions of the previous steps, so one `Deis` value serves one
//! run.

use std::collections::VecDeque;

use candle_core::Tensor;

use super::config::BetaDefaults;
use super::schedule::{self, div, f32_tensor, mul};
use super::unipc::{alpha_sigma, lambda, multistep_schedule};
use super::{bad_step_index, check_index, PredictionType, Sampler, SchedulerConfig, TorchRng};
use crate::Result;

const WHO: &str = "DEIS";

/// DEIS multistep (log-rho), deterministic.
#[derive(Debug)]
pub struct Deis {
    /// One more than the timesteps: the last is the sigma after the final step.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    prediction_type: PredictionType,
    solver_order: usize,
    lower_order_final: bool,
    // Per-run state.
    /// The noise predictions of the last `solver_order` steps, oldest first.
    model_outputs: VecDeque<Tensor>,
    lower_order_nums: usize,
    next_step: Option<usize>,
}

/// The second-order `ind_fn(t, b, c)`: the integral of the Lagrange basis polynomial in
/// log(rho), in float32 (diffusers applies numpy's float32 `log` to float32 tensors).
fn ind_fn2(t: f32, b: f32, c: f32) -> f32 {
    t * (-c.ln() + t.ln() - 1.0) / (b.ln() - c.ln())
}

/// The third-order `ind_fn(t, b, c, d)`, with diffusers' order of operations.
fn ind_fn3(t: f32, b: f32, c: f32, d: f32) -> f32 {
    let (lt, lb, lc, ld) = (t.ln(), b.ln(), c.ln(), d.ln());
    let numerator = t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0);
    let denominator = (lb - lc) * (lb - ld);
    numerator / denominator
}

/// `rho = sigma_t / alpha_t` and `alpha_t` of a sigma.
fn rho_alpha(sigma: f32) -> (f32, f32) {
    let (alpha, sigma_t) = alpha_sigma(sigma);
    (sigma_t / alpha, alpha)
}

impl Deis {
    /// `DEISMultistepScheduler.from_config(cfg)` + `set_timesteps(n)`.
    ///
    /// The class has no `rescale_betas_zero_snr` nor `final_sigmas_type`; diffusers ignores
    /// those keys for it, and so do we.
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        for (key, on) in [
            ("thresholding", cfg.thresholding),
            ("use_flow_sigmas", cfg.use_flow_sigmas),
        ] {
            if on {
                return Err(cfg.unsupported(key, true, WHO));
            }
        }
        // diffusers registers "deis" for the DPM-Solver algorithms and "logrho" for the other
        // multistep solvers' types.
        match cfg.algorithm_type.as_str() {
            "deis" | "dpmsolver" | "dpmsolver++" => {}
            other => return Err(cfg.unsupported("algorithm_type", format!("{other:?}"), WHO)),
        }
        match cfg.solver_type.as_deref().unwrap_or("logrho") {
            "logrho" | "midpoint" | "heun" | "bh1" | "bh2" => {}
            other => return Err(cfg.unsupported("solver_type", format!("{other:?}"), WHO)),
        }
        if cfg.solver_order == 0 {
            return Err(cfg.unsupported("solver_order", 0, WHO));
        }
        let ac = schedule::alphas_cumprod(cfg, BetaDefaults::DDPM, false, false)?;
        let sched = multistep_schedule(cfg, &ac, n, WHO)?;
        let sigma_last = if sched.converted {
            sched.sigmas.last().copied().unwrap_or(0.0) as f32
        } else {
            ((1.0 - ac[0]) / ac[0]).sqrt()
        };
        let sigmas: Vec<f32> = sched
            .sigmas
            .iter()
            .map(|&s| s as f32)
            .chain(std::iter::once(sigma_last))
            .collect();
        Ok(Deis {
            sigmas,
            timesteps: sched.timesteps.iter().map(|&t| t as f64).collect(),
            prediction_type: cfg.prediction_type,
            solver_order: cfg.solver_order,
            lower_order_final: cfg.lower_order_final,
            model_outputs: VecDeque::with_capacity(cfg.solver_order),
            lower_order_nums: 0,
            next_step: None,
        })
    }

    /// `convert_model_output`: the noise prediction recomputed from the data prediction x0.
    fn convert_model_output(&self, mo: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => div(&(sample - mul(mo, sigma_t)?)?, alpha_t)?,
            PredictionType::VPrediction => (mul(sample, alpha_t)? - mul(mo, sigma_t)?)?,
        };
        div(&(sample - mul(&x0, alpha_t)?)?, sigma_t)
    }

    /// The newest `k`-th model output (0 = this step's).
    fn m(&self, k: usize) -> &Tensor {
        &self.model_outputs[self.model_outputs.len() - 1 - k]
    }

    fn first_order(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        let a = mul(sample, alpha_t / alpha_s)?;
        let b = mul(self.m(0), sigma_t * (h.exp() - 1.0))?;
        Ok((a - b)?)
    }

    fn second_order(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let (rho_t, alpha_t) = rho_alpha(self.sigmas[i + 1]);
        let (rho_s0, alpha_s0) = rho_alpha(self.sigmas[i]);
        let (rho_s1, _) = rho_alpha(self.sigmas[i - 1]);
        let coef1 = ind_fn2(rho_t, rho_s0, rho_s1) - ind_fn2(rho_s0, rho_s0, rho_s1);
        let coef2 = ind_fn2(rho_t, rho_s1, rho_s0) - ind_fn2(rho_s0, rho_s1, rho_s0);
        let x = (div(sample, alpha_s0)? + mul(self.m(0), coef1)?)?;
        let x = (x + mul(self.m(1), coef2)?)?;
        mul(&x, alpha_t)
    }

    fn third_order(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let (rho_t, alpha_t) = rho_alpha(self.sigmas[i + 1]);
        let (rho_s0, alpha_s0) = rho_alpha(self.sigmas[i]);
        let (rho_s1, _) = rho_alpha(self.sigmas[i - 1]);
        let (rho_s2, _) = rho_alpha(self.sigmas[i - 2]);
        let coef1 =
            ind_fn3(rho_t, rho_s0, rho_s1, rho_s2) - ind_fn3(rho_s0, rho_s0, rho_s1, rho_s2);
        let coef2 =
            ind_fn3(rho_t, rho_s1, rho_s2, rho_s0) - ind_fn3(rho_s0, rho_s1, rho_s2, rho_s0);
        let coef3 =
            ind_fn3(rho_t, rho_s2, rho_s0, rho_s1) - ind_fn3(rho_s0, rho_s2, rho_s0, rho_s1);
        let x = (div(sample, alpha_s0)? + mul(self.m(0), coef1)?)?;
        let x = (x + mul(self.m(1), coef2)?)?;
        let x = (x + mul(self.m(2), coef3)?)?;
        mul(&x, alpha_t)
    }
}

impl Sampler for Deis {
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
        _rng: &mut TorchRng,
    ) -> Result<Tensor> {
        let len = self.timesteps.len();
        check_index(step_index, len)?;
        // The first step may be at any index (image-to-image starts late); then in order.
        if let Some(next) = self.next_step {
            if step_index != next {
                return Err(bad_step_index(
                    step_index,
                    &format!("step {next} (DEIS steps run in order)"),
                ));
            }
        }
        let i = step_index;
        let lower = self.lower_order_final && len < 15;
        let lower_order_final = lower && i == len - 1;
        let lower_order_second = lower && i + 2 == len;
        let model_output = f32_tensor(model_output)?;
        let sample = f32_tensor(sample)?;
        let eps = self.convert_model_output(&model_output, &sample, i)?;
        self.model_outputs.push_back(eps);
        if self.model_outputs.len() > self.solver_order {
            self.model_outputs.pop_front();
        }
        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(&sample, i)?
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(&sample, i)?
        } else {
            // diffusers runs the third-order update for every solver_order above 2.
            self.third_order(&sample, i)?
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.solver_order);
        self.next_step = Some(i + 1);
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samplers::TimestepSpacing;

    fn sd_config() -> SchedulerConfig {
        SchedulerConfig {
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: Some("scaled_linear".into()),
            ..SchedulerConfig::default()
        }
    }

    // Reference values from diffusers 0.42.1:
    //   s = DEISMultistepScheduler(beta_start=0.00085, beta_end=0.012,
    //       beta_schedule="scaled_linear", **extra); s.set_timesteps(7)
    //   s.timesteps.tolist(), s.sigmas[-2:].tolist()
    #[test]
    fn timesteps_match_diffusers() {
        let s = Deis::new(&sd_config(), 7).unwrap();
        assert_eq!(
            s.timesteps(),
            &[999., 856., 714., 571., 428., 285., 143.][..]
        );
        // The final sigma is the training table's first, 0.02916753478348255 (to an ulp:
        // torch's float32 sqrt is not correctly rounded).
        assert!((s.sigmas[7] - 0.029_167_535).abs() < 4e-9);

        let mut cfg = sd_config();
        cfg.use_beta_sigmas = true;
        let s = Deis::new(&cfg, 7).unwrap();
        assert_eq!(s.timesteps(), &[998., 983., 943., 874., 746., 448., 0.][..]);
        // A converted schedule repeats its last sigma.
        assert_eq!(s.sigmas[7], s.sigmas[6]);

        let mut cfg = sd_config();
        cfg.timestep_spacing = Some(TimestepSpacing::Trailing);
        let s = Deis::new(&cfg, 7).unwrap();
        assert_eq!(
            s.timesteps(),
            &[999., 856., 713., 570., 428., 285., 142.][..]
        );
    }

    #[test]
    fn algorithm_and_solver_types_map_like_diffusers() {
        let mut cfg = sd_config();
        for alg in ["deis", "dpmsolver", "dpmsolver++"] {
            cfg.algorithm_type = alg.into();
            assert!(Deis::new(&cfg, 5).is_ok());
        }
        cfg.algorithm_type = "sde-dpmsolver++".into();
        assert!(Deis::new(&cfg, 5).is_err());
        cfg.algorithm_type = "deis".into();
        cfg.solver_type = Some("bh2".into());
        assert!(Deis::new(&cfg, 5).is_ok());
        cfg.solver_type = Some("euler".into());
        assert!(Deis::new(&cfg, 5).is_err());
    }

    // The Lagrange basis of log(rho) sums to 1, so the second-order coefficients sum to the
    // integral of 1 over [rho_s0, rho_t].
    #[test]
    fn second_order_coefficients_integrate_one() {
        let (t, s0, s1) = (0.5f32, 0.8f32, 1.3f32);
        let c1 = ind_fn2(t, s0, s1) - ind_fn2(s0, s0, s1);
        let c2 = ind_fn2(t, s1, s0) - ind_fn2(s0, s1, s0);
        assert!((c1 + c2 - (t - s0)).abs() < 1e-6);
        let c = |b, c, d| ind_fn3(t, b, c, d) - ind_fn3(s0, b, c, d);
        let s2 = 2.1f32;
        assert!((c(s0, s1, s2) + c(s1, s2, s0) + c(s2, s0, s1) - (t - s0)).abs() < 1e-5);
    }
}
