//! Samplers (diffusers schedulers) and the torch-compatible random number generator.
//!
//! Each sampler is a port of one Hugging Face diffusers scheduler (0.42) and is meant to give
//! the same numbers: `build_sampler(kind, &config, n)` equals
//! `XScheduler.from_config(config)` followed by `set_timesteps(n)`, and the loop
//!
//! ```text
//! for (i, t) in sampler.timesteps().iter().enumerate() {
//!     let x_in = sampler.scale_model_input(&latents, i)?;
//!     let model_output = unet(x_in, t);   // after classifier-free guidance
//!     latents = sampler.step(&model_output, i, &latents, &mut rng)?;
//! }
//! ```
//!
//! equals the diffusers pipeline loop. The reference numbers the tests compare against are
//! produced by `scripts/make_sampler_fixtures.py`.
//!
//! Files: `kind` (the names of samplers and schedules and which pairs exist), [`ddim`],
//! [`pndm`] (PLMS), [`euler`] (Euler and Euler ancestral), [`k_diffusion`] (Heun, LMS, DPM2,
//! DPM2 ancestral), [`dpm_solver`] (DPM++ 2M, 2M SDE, 3M SDE), [`dpm_sde`] (DPM++ SDE,
//! DPM++ 2S ancestral) with `brownian` (its noise), [`unipc`], [`deis`], [`ddpm`], [`lcm`],
//! [`tcd`], [`flow_match`] (FLUX), `schedule` (betas, spacings, sigma schedules), `config`
//! (the scheduler config as diffusers reads it) and [`rng`].

mod brownian;
mod config;
pub mod ddim;
pub mod ddpm;
pub mod deis;
pub mod dpm_sde;
pub mod dpm_solver;
pub mod euler;
pub mod flow_match;
pub mod k_diffusion;
mod kind;
pub mod lcm;
pub mod pndm;
pub mod rng;
pub(crate) mod schedule;
pub mod tcd;
pub mod unipc;

use candle_core::Tensor;

pub use config::{PredictionType, SchedulerConfig, TimestepSpacing};
pub use ddim::check_eta;
pub use dpm_sde::check_s_noise;
pub use kind::{check_combination, SamplerKind, Schedule};
pub use rng::TorchRng;

use crate::{Error, Result};
/// One sampler run: the timestep schedule plus the per-run state (multistep history).
/// Values are per request; `step` must be called for `step_index` 0, 1, 2, ... in order.
pub trait Sampler: Send {
    /// The timesteps to feed the UNet, in loop order (len = number of model calls). Exactly
    /// the values diffusers passes: integers for DDIM / PNDM / DPM-Solver, float32 values
    /// such as 999.0 or 946.4245 for the Euler samplers.
    fn timesteps(&self) -> &[f64];
    /// diffusers' `scheduler.order`: 2 for the samplers whose steps take two model
    /// evaluations, whose timestep list is then about twice as long. Image-to-image skips
    /// `order * t_start` entries of it.
    fn order(&self) -> usize {
        1
    }
    /// The factor for the initial noise (`latents = randn * init_noise_sigma`); a float32
    /// value widened to f64. 1 unless the sampler works in sigma space.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// diffusers' `scale_model_input` for loop index `step_index`; the identity unless the
    /// sampler works in sigma space.
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps().len())?;
        Ok(sample.clone())
    }
    /// diffusers' `add_noise(original, noise, timesteps[step_index])` as the image-to-image
    /// and inpainting pipelines call it: DDPM-style `sqrt(a) x + sqrt(1 - a) n` at that
    /// timestep for DDIM / PNDM, `x + sigma n` for the Euler samplers and
    /// `alpha_t x + sigma_t n` for DPM-Solver, at the sigma of loop index `step_index`.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;
    /// Sets the `eta` that the pipelines pass to `step` (DDIM and TCD; 0 to 1); the other
    /// samplers have none and refuse it.
    fn set_eta(&mut self, eta: f64) -> Result<()> {
        Err(Error::invalid(
            "eta",
            format!("{eta} given, but this sampler takes no eta"),
        ))
    }
    /// Sets the scale of the fresh noise (`s_noise`, the step argument of DPM++ SDE and
    /// DPM++ 2S a; 1 by default); the other samplers have none and refuse it.
    fn set_s_noise(&mut self, s_noise: f64) -> Result<()> {
        Err(Error::invalid(
            "s_noise",
            format!("{s_noise} given, but this sampler takes no s_noise"),
        ))
    }
    /// diffusers' `step(...).prev_sample` for loop index `step_index`. Ancestral samplers
    /// draw their noise from `rng` exactly as diffusers draws it from the pipeline's
    /// generator (`randn_tensor(model_output.shape, generator=generator)`).
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut TorchRng,
    ) -> Result<Tensor>;
}

/// The config a sampler is built from: the model's, with the schedule's overrides.
fn with_schedule(config: &SchedulerConfig, schedule: Schedule) -> SchedulerConfig {
    let mut c = config.clone();
    let sigmas = |c: &mut SchedulerConfig, karras, exponential, beta| {
        c.use_karras_sigmas = karras;
        c.use_exponential_sigmas = exponential;
        c.use_beta_sigmas = beta;
    };
    match schedule {
        Schedule::Model => {}
        Schedule::Karras => sigmas(&mut c, true, false, false),
        Schedule::Exponential => sigmas(&mut c, false, true, false),
        Schedule::Beta => sigmas(&mut c, false, false, true),
        Schedule::SgmUniform => {
            sigmas(&mut c, false, false, false);
            c.timestep_spacing = Some(TimestepSpacing::Trailing);
        }
        // Custom sigmas replace the whole schedule (see build_sampler).
        Schedule::Simple | Schedule::Normal => {}
    }
    c
}

/// `XScheduler.from_config(config, **schedule_overrides)` +
/// `set_timesteps(num_inference_steps)`.
pub fn build_sampler(
    kind: SamplerKind,
    schedule: Schedule,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Sampler>> {
    let max = config.num_train_timesteps;
    if num_inference_steps == 0 || num_inference_steps > max {
        return Err(Error::invalid(
            "steps",
            format!(
                "must be between 1 and {max} (the scheduler's num_train_timesteps), \
                 got {num_inference_steps}"
            ),
        ));
    }
    check_combination(kind, schedule)?;
    let cfg = &with_schedule(config, schedule);
    let n = num_inference_steps;
    if let Some(sigmas) = a1111_sigmas(cfg, schedule, n)? {
        // (check_combination allows these for Euler only.)
        return Ok(Box::new(euler::Euler::with_sigmas(cfg, sigmas)?));
    }
    Ok(match kind {
        SamplerKind::Ddim => Box::new(ddim::Ddim::new(cfg, n)?),
        SamplerKind::Pndm => Box::new(pndm::Pndm::new(cfg, n)?),
        SamplerKind::Euler => Box::new(euler::Euler::new(cfg, n)?),
        SamplerKind::EulerAncestral => Box::new(euler::EulerAncestral::new(cfg, n)?),
        SamplerKind::Heun => Box::new(k_diffusion::Heun::new(cfg, n)?),
        SamplerKind::Lms => Box::new(k_diffusion::Lms::new(cfg, n)?),
        SamplerKind::Dpm2 => Box::new(k_diffusion::Dpm2::new(cfg, n)?),
        SamplerKind::Dpm2Ancestral => Box::new(k_diffusion::Dpm2Ancestral::new(cfg, n)?),
        SamplerKind::DpmPp2m => Box::new(dpm_solver::DpmSolverPp::new(cfg, n, 2, false)?),
        SamplerKind::DpmPp2mSde => Box::new(dpm_solver::DpmSolverPp::new(cfg, n, 2, true)?),
        SamplerKind::DpmPp3mSde => Box::new(dpm_solver::DpmSolverPp::new(cfg, n, 3, true)?),
        SamplerKind::DpmPpSde => Box::new(dpm_sde::DpmPpSde::new(cfg, n)?),
        SamplerKind::DpmPp2sAncestral => Box::new(dpm_sde::DpmPp2sAncestral::new(cfg, n)?),
        SamplerKind::UniPc => Box::new(unipc::UniPc::new(cfg, n)?),
        SamplerKind::Deis => Box::new(deis::Deis::new(cfg, n)?),
        SamplerKind::Ddpm => Box::new(ddpm::Ddpm::new(cfg, n)?),
        SamplerKind::Lcm => Box::new(lcm::Lcm::new(cfg, n)?),
        // The pipelines pass their `eta` (default 0; another one through `set_eta`) to
        // TCD's step, whose own default is 0.3.
        SamplerKind::Tcd => Box::new(tcd::Tcd::new(cfg, n)?.with_eta(0.0)),
    })
}

/// A1111's `simple` / `normal` sigmas over the config's training table (diffusers'
/// float32 `alphas_cumprod`, as EulerDiscreteScheduler builds it), or `None` for the other
/// schedules.
fn a1111_sigmas(cfg: &SchedulerConfig, schedule: Schedule, n: usize) -> Result<Option<Vec<f32>>> {
    if !matches!(schedule, Schedule::Simple | Schedule::Normal) {
        return Ok(None);
    }
    let ac = schedule::alphas_cumprod(
        cfg,
        config::BetaDefaults::DDPM,
        cfg.rescale_betas_zero_snr,
        true,
    )?;
    let table = schedule::sigmas_from_alphas_cumprod(&ac);
    Ok(Some(match schedule {
        Schedule::Simple => schedule::simple_sigmas(&table, n),
        _ => schedule::normal_sigmas(&table, n),
    }))
}

impl SamplerKind {
    /// The sampler that the model's own scheduler config names (`_class_name`, and for
    /// DPM-Solver its `algorithm_type` and `solver_order`); with [`Schedule::Model`] the run is
    /// what diffusers' `from_pretrained` gives.
    pub fn from_config(cfg: &SchedulerConfig) -> Result<SamplerKind> {
        let hint = format!(
            "choose a sampler explicitly (--sampler): {}",
            SamplerKind::valid_names()
        );
        let Some(class) = cfg.class_name.as_deref() else {
            return Err(Error::config(
                &cfg.path,
                format!("the scheduler config has no _class_name; {hint}"),
            ));
        };
        if class == "DPMSolverMultistepScheduler" {
            return match (cfg.algorithm_type.as_str(), cfg.solver_order) {
                ("dpmsolver++" | "deis", 2) => Ok(SamplerKind::DpmPp2m),
                ("sde-dpmsolver++", 2) => Ok(SamplerKind::DpmPp2mSde),
                ("sde-dpmsolver++", 3) => Ok(SamplerKind::DpmPp3mSde),
                (algorithm, order) => Err(Error::config(
                    &cfg.path,
                    format!(
                        "the model's scheduler is DPMSolverMultistepScheduler with \
                     algorithm_type {algorithm:?} and solver_order {order}, which is not \
                     implemented (dpmsolver++ order 2, sde-dpmsolver++ order 2 or 3); {hint}"
                    ),
                )),
            };
        }
        SamplerKind::all()
            .find(|k| k.diffusers_class() == class)
            .ok_or_else(|| {
                Error::config(
                    &cfg.path,
                    format!("the model's scheduler {class} is not implemented; {hint}"),
                )
            })
    }
}

/// The error for a `step_index` that is out of range or out of order.
pub(crate) fn bad_step_index(step_index: usize, expected: &str) -> Error {
    Error::invalid(
        "step_index",
        format!("{step_index} is not valid here: expected {expected}"),
    )
}

/// Looks up `step_index` in `timesteps`, or the error for an index past the end.
pub(crate) fn check_index(step_index: usize, len: usize) -> Result<()> {
    if step_index >= len {
        return Err(bad_step_index(
            step_index,
            &format!("an index below the number of timesteps ({len})"),
        ));
    }
    Ok(())
}
