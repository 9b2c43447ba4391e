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
//! Files: [`ddim`], [`pndm`] (PLMS), [`euler`] (Euler and Euler ancestral), [`dpm_solver`]
//! (DPM++ 2M, with or without Karras sigmas), `schedule` (betas, spacings, sigma
//! schedules), `config` (the scheduler config as diffusers reads it) and [`rng`].

mod config;
pub mod ddim;
pub mod ddpm;
pub mod deis;
pub mod dpm_solver;
pub mod euler;
pub mod flow_match;
pub mod k_diffusion;
pub mod lcm;
pub mod pndm;
pub mod rng;
pub(crate) mod schedule;
pub mod tcd;
pub mod unipc;

use candle_core::Tensor;

pub use config::{PredictionType, SchedulerConfig, TimestepSpacing};
pub use rng::TorchRng;

use crate::{Error, Result};
/// The samplers we implement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    /// diffusers `DDIMScheduler` (eta = 0).
    Ddim,
    /// diffusers `PNDMScheduler` (PLMS, with PRK warm-up steps unless `skip_prk_steps`).
    Pndm,
    /// diffusers `EulerDiscreteScheduler`.
    Euler,
    /// diffusers `EulerAncestralDiscreteScheduler`.
    EulerAncestral,
    /// diffusers `DPMSolverMultistepScheduler`, `algorithm_type="dpmsolver++"`,
    /// `solver_order=2`, `use_karras_sigmas=False`.
    DpmPp2m,
    /// The same with `use_karras_sigmas=True`.
    DpmPp2mKarras,
}

const VALID_NAMES: &str = "ddim, pndm, euler, euler-a, dpmpp-2m, dpmpp-2m-karras \
     (A1111 names DDIM, PLMS, Euler, Euler a, DPM++ 2M, DPM++ 2M Karras are accepted too)";

impl SamplerKind {
    pub const ALL: [SamplerKind; 6] = [
        SamplerKind::Ddim,
        SamplerKind::Pndm,
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::DpmPp2m,
        SamplerKind::DpmPp2mKarras,
    ];

    /// Our name, as the CLI and the native API spell it.
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Pndm => "pndm",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler-a",
            SamplerKind::DpmPp2m => "dpmpp-2m",
            SamplerKind::DpmPp2mKarras => "dpmpp-2m-karras",
        }
    }

    /// The AUTOMATIC1111 web UI's name.
    pub fn a1111_name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "DDIM",
            SamplerKind::Pndm => "PLMS",
            SamplerKind::Euler => "Euler",
            SamplerKind::EulerAncestral => "Euler a",
            SamplerKind::DpmPp2m => "DPM++ 2M",
            SamplerKind::DpmPp2mKarras => "DPM++ 2M Karras",
        }
    }

    /// The diffusers scheduler class this sampler ports.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "DDIMScheduler",
            SamplerKind::Pndm => "PNDMScheduler",
            SamplerKind::Euler => "EulerDiscreteScheduler",
            SamplerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SamplerKind::DpmPp2m | SamplerKind::DpmPp2mKarras => "DPMSolverMultistepScheduler",
        }
    }

    /// Parses a sampler name: ours, A1111's, or a common alias (`plms`, `euler_a`,
    /// `euler_ancestral`, `dpm++2m`, `dpmpp_2m_karras`, ...), case-insensitive.
    pub fn from_name(name: &str) -> Result<Self> {
        let norm: String = name
            .trim()
            .to_ascii_lowercase()
            .replace("++", "pp")
            .chars()
            .filter(|c| !matches!(c, ' ' | '-' | '_' | '.'))
            .collect();
        let kind = match norm.as_str() {
            "ddim" => SamplerKind::Ddim,
            "pndm" | "plms" => SamplerKind::Pndm,
            "euler" => SamplerKind::Euler,
            "eulera" | "eulerancestral" | "eulerancestraldiscrete" => SamplerKind::EulerAncestral,
            "dpmpp2m" | "dpmsolverpp2m" => SamplerKind::DpmPp2m,
            "dpmpp2mkarras" | "dpmpp2mk" | "dpmsolverpp2mkarras" => SamplerKind::DpmPp2mKarras,
            _ => {
                return Err(Error::invalid(
                    "scheduler",
                    format!("unknown sampler {name:?}; valid names: {VALID_NAMES}"),
                ))
            }
        };
        Ok(kind)
    }

    /// The sampler that the model's own scheduler config names (`_class_name`).
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        let hint = format!("choose a sampler explicitly (--scheduler): {VALID_NAMES}");
        let Some(class) = cfg.class_name.as_deref() else {
            return Err(Error::config(
                &cfg.path,
                format!("the scheduler config has no _class_name; {hint}"),
            ));
        };
        match class {
            "DDIMScheduler" => Ok(SamplerKind::Ddim),
            "PNDMScheduler" => Ok(SamplerKind::Pndm),
            "EulerDiscreteScheduler" => Ok(SamplerKind::Euler),
            "EulerAncestralDiscreteScheduler" => Ok(SamplerKind::EulerAncestral),
            "DPMSolverMultistepScheduler" => {
                if cfg.algorithm_type != "dpmsolver++" && cfg.algorithm_type != "deis" {
                    return Err(Error::config(
                        &cfg.path,
                        format!(
                            "the model's scheduler is DPMSolverMultistepScheduler with \
                             algorithm_type {:?}, which is not implemented (only \
                             \"dpmsolver++\"); {hint}",
                            cfg.algorithm_type
                        ),
                    ));
                }
                if cfg.solver_order != 2 {
                    return Err(Error::config(
                        &cfg.path,
                        format!(
                            "the model's scheduler is DPMSolverMultistepScheduler with \
                             solver_order {}, which is not implemented (only 2); {hint}",
                            cfg.solver_order
                        ),
                    ));
                }
                Ok(if cfg.use_karras_sigmas {
                    SamplerKind::DpmPp2mKarras
                } else {
                    SamplerKind::DpmPp2m
                })
            }
            other => Err(Error::config(
                &cfg.path,
                format!("the model's scheduler {other} is not implemented; {hint}"),
            )),
        }
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SamplerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        SamplerKind::from_name(s)
    }
}

/// One sampler run: the timestep schedule plus the per-run state (multistep history).
/// Values are per request; `step` must be called for `step_index` 0, 1, 2, ... in order.
pub trait Sampler: Send {
    /// The timesteps to feed the UNet, in loop order (len = number of model calls). Exactly
    /// the values diffusers passes: integers for DDIM / PNDM / DPM-Solver, float32 values
    /// such as 999.0 or 946.4245 for the Euler samplers.
    fn timesteps(&self) -> &[f64];
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

/// `XScheduler.from_config(config)` + `set_timesteps(num_inference_steps)`.
pub fn build_sampler(
    kind: SamplerKind,
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
    Ok(match kind {
        SamplerKind::Ddim => Box::new(ddim::Ddim::new(config, num_inference_steps)?),
        SamplerKind::Pndm => Box::new(pndm::Pndm::new(config, num_inference_steps)?),
        SamplerKind::Euler => Box::new(euler::Euler::new(config, num_inference_steps)?),
        SamplerKind::EulerAncestral => {
            Box::new(euler::EulerAncestral::new(config, num_inference_steps)?)
        }
        SamplerKind::DpmPp2m => Box::new(dpm_solver::DpmSolverPp2m::new(
            config,
            num_inference_steps,
            false,
        )?),
        SamplerKind::DpmPp2mKarras => Box::new(dpm_solver::DpmSolverPp2m::new(
            config,
            num_inference_steps,
            true,
        )?),
    })
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
