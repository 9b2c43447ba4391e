//! PNDM / PLMS: port of diffusers `PNDMScheduler`.
//!
//! With `skip_prk_steps = false` (the scheduler's default) the run starts with Runge-Kutta
//! (PRK) warm-up steps: the last four timesteps of the schedule, each visited at t and at
//! t + ratio/2 twice, 12 model calls in all, before the linear multistep (PLMS) steps; the
//! loop then makes `n + 9` model calls; fewer than 4 steps are refused (diffusers fails on
//! them too). With `skip_prk_steps = true` (Stable Diffusion's configs) the second timestep
//! is repeated once and the loop makes `n + 1` model calls.

use candle_core::Tensor;

use super::config::BetaDefaults;
use super::schedule::{self, div, f32_tensor, mul};
use super::{
    bad_step_index, check_index, PredictionType, Sampler, SchedulerConfig, TimestepSpacing,
    TorchRng,
};
use crate::{Error, Result};

/// PNDM. `scale_model_input` is the identity; `init_noise_sigma` is 1.
#[derive(Debug)]
pub struct Pndm {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction_type: PredictionType,
    skip_prk_steps: bool,
    num_prk: usize,
    /// `num_train_timesteps // num_inference_steps`.
    ratio: i64,
    /// Timesteps as integers and as the f64 values we hand out.
    ts: Vec<i64>,
    timesteps: Vec<f64>,
    prk_timesteps: Vec<i64>,
    // Per-run state, as in diffusers.
    counter: usize,
    /// Loop index of the first step run.
    start: Option<usize>,
    ets: Vec<Tensor>,
    cur_model_output: Option<Tensor>,
    cur_sample: Option<Tensor>,
}

impl Pndm {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        if !cfg.skip_prk_steps && n < 4 {
            // diffusers' set_timesteps fails here too (a numpy broadcast error).
            return Err(Error::invalid(
                "steps",
                format!(
                    "PNDM with PRK warm-up steps (skip_prk_steps = false in the scheduler \
                     config) needs at least 4 steps, got {n}"
                ),
            ));
        }
        // PNDMScheduler has no rescale_betas_zero_snr option: from_config ignores the key.
        let ac = schedule::alphas_cumprod(cfg, BetaDefaults::DDPM, false, false)?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            ac[0]
        };
        let num_train = cfg.num_train_timesteps;
        let spacing = cfg.spacing_or(TimestepSpacing::Leading);
        // diffusers' `_timesteps`, ascending.
        let mut asc = schedule::int_timesteps(spacing, num_train, n, cfg.steps_offset);
        asc.reverse();
        let ratio = (num_train / n) as i64;

        let (prk, plms): (Vec<i64>, Vec<i64>) = if cfg.skip_prk_steps {
            // concat([_t[:-1], _t[-2:-1], _t[-1:]])[::-1]
            let len = asc.len();
            let mut v: Vec<i64> = asc[..len.saturating_sub(1)].to_vec();
            if len >= 2 {
                v.push(asc[len - 2]);
            }
            if len >= 1 {
                v.push(asc[len - 1]);
            }
            v.reverse();
            (Vec::new(), v)
        } else {
            // prk = repeat(_t[-4:], 2) + tile([0, ratio // 2], 4); then
            // (prk[:-1].repeat(2)[1:-1])[::-1]
            let order = 4;
            let tail = &asc[asc.len().saturating_sub(order)..];
            let half = ratio / 2;
            let rep: Vec<i64> = tail.iter().flat_map(|&t| [t, t + half]).collect();
            let rep = &rep[..rep.len().saturating_sub(1)];
            let doubled: Vec<i64> = rep.iter().flat_map(|&t| [t, t]).collect();
            let mut prk: Vec<i64> = if doubled.len() >= 2 {
                doubled[1..doubled.len() - 1].to_vec()
            } else {
                Vec::new()
            };
            prk.reverse();
            let mut plms: Vec<i64> = asc[..asc.len().saturating_sub(3)].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let num_prk = prk.len();
        let ts: Vec<i64> = prk.iter().chain(plms.iter()).copied().collect();

        let sampler = Pndm {
            alphas_cumprod: ac,
            final_alpha_cumprod,
            prediction_type: cfg.prediction_type,
            skip_prk_steps: cfg.skip_prk_steps,
            num_prk,
            ratio,
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            ts,
            prk_timesteps: prk,
            counter: 0,
            start: None,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
        };
        // Every alphas_cumprod index the run will use must exist.
        let used = (0..sampler.ts.len()).flat_map(|i| {
            let (t, prev) = sampler.plan(i, i);
            [t, prev.max(0)]
        });
        schedule::check_timesteps_in_range(cfg, "PNDM", used)?;
        Ok(sampler)
    }

    /// diffusers decides PRK vs PLMS by its call counter, not by the timestep.
    fn in_prk(&self, counter: usize) -> bool {
        counter < self.num_prk && !self.skip_prk_steps
    }

    /// The (timestep, previous timestep) that `_get_prev_sample` uses on call number `c`
    /// (counted from 0 at the first step run) with the timestep at loop index `i`. Text-to-
    /// image runs `c == i`; image-to-image starts the loop at a later index with `c == 0`,
    /// and diffusers keys the PRK timestep and the special second PLMS step on the counter.
    fn plan(&self, c: usize, i: usize) -> (i64, i64) {
        let t = self.ts[i];
        if self.in_prk(c) {
            let diff = if c % 2 == 1 { 0 } else { self.ratio / 2 };
            (self.prk_timesteps[c / 4 * 4], t - diff)
        } else if c == 1 {
            (t + self.ratio, t)
        } else {
            (t, t - self.ratio)
        }
    }

    fn alpha(&self, t: i64) -> Result<f32> {
        usize::try_from(t)
            .ok()
            .and_then(|t| self.alphas_cumprod.get(t).copied())
            .ok_or_else(|| {
                Error::invalid(
                    "steps",
                    format!("PNDM reached timestep {t}, outside the trained range"),
                )
            })
    }

    fn prev_sample(&self, sample: &Tensor, t: i64, prev_t: i64, mo: &Tensor) -> Result<Tensor> {
        let a_t = self.alpha(t)?;
        let a_prev = if prev_t >= 0 {
            self.alpha(prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let mo = match self.prediction_type {
            PredictionType::Epsilon => mo.clone(),
            PredictionType::VPrediction => (mul(mo, a_t.sqrt())? + mul(sample, b_t.sqrt())?)?,
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let rhs = div(&mul(&mo, a_prev - a_t)?, denom)?;
        Ok((mul(sample, sample_coeff)? - rhs)?)
    }

    fn step_prk(&mut self, mo: Tensor, sample: Tensor, index: usize) -> Result<Tensor> {
        let i = self.counter;
        let (t, prev_t) = self.plan(i, index);
        let mo = match i % 4 {
            0 => {
                self.add_cur(&mul(&mo, (1.0f64 / 6.0) as f32)?)?;
                self.ets.push(mo.clone());
                self.cur_sample = Some(sample.clone());
                mo
            }
            1 | 2 => {
                self.add_cur(&mul(&mo, (1.0f64 / 3.0) as f32)?)?;
                mo
            }
            _ => {
                let part = mul(&mo, (1.0f64 / 6.0) as f32)?;
                match self.cur_model_output.take() {
                    Some(cur) => (cur + part)?,
                    None => part,
                }
            }
        };
        let cur_sample = self.cur_sample.clone().unwrap_or(sample);
        let prev = self.prev_sample(&cur_sample, t, prev_t, &mo)?;
        self.counter += 1;
        Ok(prev)
    }

    fn add_cur(&mut self, x: &Tensor) -> Result<()> {
        self.cur_model_output = Some(match self.cur_model_output.take() {
            Some(cur) => (cur + x)?,
            None => x.clone(),
        });
        Ok(())
    }

    fn step_plms(&mut self, mo: Tensor, mut sample: Tensor, index: usize) -> Result<Tensor> {
        let i = self.counter;
        if !self.skip_prk_steps && self.ets.len() < 3 {
            return Err(Error::invalid(
                "step_index",
                "PNDM can only run PLMS steps after 12 PRK warm-up steps".to_string(),
            ));
        }
        let (t, prev_t) = self.plan(i, index);
        if i != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(mo.clone());
        }
        let e = &self.ets;
        let n = e.len();
        let mo = if n == 1 && i == 0 {
            self.cur_sample = Some(sample.clone());
            mo
        } else if n == 1 && i == 1 {
            if let Some(cur) = self.cur_sample.take() {
                sample = cur;
            }
            // (model_output + ets[-1]) / 2
            div(&(mo + &e[0])?, 2.0)?
        } else if n == 2 {
            div(&(mul(&e[1], 3.0)? - &e[0])?, 2.0)?
        } else if n == 3 {
            let s = ((mul(&e[2], 23.0)? - mul(&e[1], 16.0)?)? + mul(&e[0], 5.0)?)?;
            div(&s, 12.0)?
        } else if n >= 4 {
            let s = (((mul(&e[n - 1], 55.0)? - mul(&e[n - 2], 59.0)?)? + mul(&e[n - 3], 37.0)?)?
                - mul(&e[n - 4], 9.0)?)?;
            mul(&s, (1.0f64 / 24.0) as f32)?
        } else {
            return Err(bad_step_index(i, "PNDM steps in order"));
        };
        let prev = self.prev_sample(&sample, t, prev_t, &mo)?;
        self.counter += 1;
        Ok(prev)
    }
}

impl Sampler for Pndm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let t = self.timesteps[step_index] as usize;
        schedule::add_noise_alpha(&self.alphas_cumprod, t, original, noise)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _rng: &mut TorchRng,
    ) -> Result<Tensor> {
        check_index(step_index, self.ts.len())?;
        // The first step may be at any index (image-to-image starts late); then in order.
        let start = *self.start.get_or_insert(step_index);
        if step_index != start + self.counter {
            return Err(bad_step_index(
                step_index,
                &format!("step {} (PNDM steps run in order)", start + self.counter),
            ));
        }
        let mo = f32_tensor(model_output)?;
        let sample = f32_tensor(sample)?;
        if self.in_prk(self.counter) {
            self.step_prk(mo, sample, step_index)
        } else {
            self.step_plms(mo, sample, step_index)
        }
    }
}
