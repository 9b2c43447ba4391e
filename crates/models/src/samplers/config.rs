//! The scheduler config (`scheduler/scheduler_config.json`) as diffusers reads it: the keys
//! every sampler shares, which of them a sampler honours, and how the pipelines patch it.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::{Error, Result};

/// What the denoising model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PredictionType {
    /// The noise (`"epsilon"`, SD 1.x, SD 2.x base 512).
    Epsilon,
    /// The velocity (`"v_prediction"`, SD 2.x 768).
    VPrediction,
}

impl PredictionType {
    /// The diffusers spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
        }
    }
}

/// How `set_timesteps` spaces the inference timesteps over the training range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl TimestepSpacing {
    pub fn as_str(self) -> &'static str {
        match self {
            TimestepSpacing::Leading => "leading",
            TimestepSpacing::Trailing => "trailing",
            TimestepSpacing::Linspace => "linspace",
        }
    }
}

/// A model's `scheduler/scheduler_config.json`, with every key that one of our five
/// schedulers reads.
///
/// A key that is absent takes diffusers' default. Where the five schedulers' defaults differ
/// the field is an `Option` and each sampler applies its own default (`timestep_spacing`:
/// DDIM and PNDM `leading`, Euler and DPM-Solver `linspace`; `set_alpha_to_one`: DDIM
/// `true`, PNDM `false`). Keys listed in `_use_default_values` count as absent, as in
/// diffusers. Keys we do not know are ignored, as `from_config` ignores them. Keys that
/// matter only to one scheduler are validated when that scheduler is built.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// The file the config came from (for error messages).
    pub path: PathBuf,
    /// `_class_name`, e.g. `"PNDMScheduler"`.
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    /// `None` takes the sampler's default (see [`BetaDefaults`]).
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: i64,
    pub rescale_betas_zero_snr: bool,
    /// DDIM and DDPM (default `true`), Heun, LCM and TCD (default `false`).
    pub clip_sample: Option<bool>,
    /// DDIM (default 1.0).
    pub clip_sample_range: f64,
    /// DDIM (default `true`) and PNDM (default `false`).
    pub set_alpha_to_one: Option<bool>,
    /// PNDM (default `false`: the PRK warm-up steps run).
    pub skip_prk_steps: bool,
    /// DDIM, DPM-Solver; `true` is not supported.
    pub thresholding: bool,
    /// Euler: `"linear"` (default) or `"log_linear"`.
    pub interpolation_type: String,
    /// Euler, DPM-Solver (for DPM-Solver the sampler kind decides instead).
    pub use_karras_sigmas: bool,
    /// Euler, DPM-Solver; `true` is not supported.
    pub use_exponential_sigmas: bool,
    /// Euler, DPM-Solver; `true` is not supported.
    pub use_beta_sigmas: bool,
    /// DPM-Solver; `true` is not supported.
    pub use_lu_lambdas: bool,
    /// DPM-Solver; `true` is not supported.
    pub use_flow_sigmas: bool,
    /// Karras schedule bounds (Euler; DPM-Solver also reads them through diffusers' hidden
    /// config entries when the config carries them).
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// Euler: `"discrete"` (default) or `"continuous"` (not supported with v-prediction).
    pub timestep_type: String,
    /// Euler, DPM-Solver: `"zero"` (default) or `"sigma_min"`.
    pub final_sigmas_type: String,
    /// DPM-Solver (overridden to `"dpmsolver++"` by our DPM++ 2M samplers).
    pub algorithm_type: String,
    /// DPM-Solver (overridden to 2 by our DPM++ 2M samplers).
    pub solver_order: usize,
    /// DPM-Solver (default `"midpoint"`, or `"heun"`), UniPC (default `"bh2"`), DEIS.
    pub solver_type: Option<String>,
    /// DPM-Solver (default `true`).
    pub lower_order_final: bool,
    /// DPM-Solver (default `false`).
    pub euler_at_final: bool,
    /// DPM-Solver (default -inf).
    pub lambda_min_clipped: f64,
    /// DPM-Solver, DDPM; `learned` / `learned_range` are not supported.
    pub variance_type: Option<String>,
    /// UniPC (default `true`).
    pub predict_x0: bool,
    /// UniPC: the steps whose corrector is skipped.
    pub disable_corrector: Vec<usize>,
    /// LCM and TCD (default 50).
    pub original_inference_steps: usize,
    /// LCM and TCD (default 10.0).
    pub timestep_scaling: f64,
}

/// The beta keys' defaults, which differ between diffusers' scheduler classes (DDPM-family
/// classes default to linear 0.0001..0.02, the k-diffusion ports to 0.00085..0.012, LCM and
/// TCD to scaled_linear).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BetaDefaults {
    pub start: f64,
    pub end: f64,
    pub schedule: &'static str,
}

impl BetaDefaults {
    /// DDPM, DDIM, PNDM, Euler, DPM-Solver, UniPC, DEIS, LMS.
    pub const DDPM: BetaDefaults = BetaDefaults {
        start: 0.0001,
        end: 0.02,
        schedule: "linear",
    };
    /// Heun, KDPM2, KDPM2 ancestral, DPM-Solver SDE.
    pub const K_DIFFUSION: BetaDefaults = BetaDefaults {
        start: 0.00085,
        end: 0.012,
        schedule: "linear",
    };
    /// LCM, TCD.
    pub const LCM: BetaDefaults = BetaDefaults {
        start: 0.00085,
        end: 0.012,
        schedule: "scaled_linear",
    };
}

impl Default for SchedulerConfig {
    /// The defaults of every key (an empty `scheduler_config.json`).
    fn default() -> Self {
        SchedulerConfig {
            path: PathBuf::new(),
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: None,
            beta_end: None,
            beta_schedule: None,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            clip_sample: None,
            clip_sample_range: 1.0,
            set_alpha_to_one: None,
            skip_prk_steps: false,
            thresholding: false,
            interpolation_type: "linear".into(),
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            timestep_type: "discrete".into(),
            final_sigmas_type: "zero".into(),
            algorithm_type: "dpmsolver++".into(),
            solver_order: 2,
            solver_type: None,
            lower_order_final: true,
            euler_at_final: false,
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            predict_x0: true,
            disable_corrector: Vec::new(),
            original_inference_steps: 50,
            timestep_scaling: 10.0,
        }
    }
}

/// Typed access to the keys of a JSON object, with errors that name the file and the key.
struct Keys<'a> {
    map: &'a Map<String, Value>,
    defaulted: Vec<&'a str>,
    path: &'a Path,
}

impl<'a> Keys<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        if self.defaulted.contains(&key) {
            return None;
        }
        self.map.get(key)
    }

    fn err(&self, key: &str, want: &str, v: &Value) -> Error {
        Error::config(self.path, format!("{key} must be {want}, got {v}"))
    }

    /// A boolean; JSON `null` reads as `false` (diffusers passes `None`, which is falsy).
    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(key, "true or false", v)),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.bool(key, false).map(Some),
        }
    }

    fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(key, "a number", v)),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, "a number or null", v)),
        }
    }

    fn int(&self, key: &str, default: i64) -> Result<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                if let Some(i) = v.as_i64() {
                    return Ok(i);
                }
                match v.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9e15 => Ok(f as i64),
                    _ => Err(self.err(key, "an integer", v)),
                }
            }
        }
    }

    fn string(&self, key: &str, default: &str) -> Result<String> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.err(key, "a string", v)),
        }
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(key, "a string or null", v)),
        }
    }
}

impl SchedulerConfig {
    /// Parses a `scheduler_config.json` value. `path` is used in error messages only.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let map = value.as_object().ok_or_else(|| {
            Error::config(
                path,
                format!("scheduler config must be a JSON object, got {value}"),
            )
        })?;
        let defaulted = match map.get("_use_default_values") {
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
            _ => Vec::new(),
        };
        let k = Keys {
            map,
            defaulted,
            path,
        };
        let d = SchedulerConfig::default();

        let class_name = match map.get("_class_name") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => return Err(k.err("_class_name", "a string", v)),
        };
        let num_train_timesteps = k.int("num_train_timesteps", 1000)?;
        if num_train_timesteps < 1 {
            return Err(Error::config(
                path,
                format!("num_train_timesteps must be at least 1, got {num_train_timesteps}"),
            ));
        }
        let trained_betas = match k.get("trained_betas") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| {
                        v.as_f64()
                            .ok_or_else(|| k.err("trained_betas", "a list of numbers", v))
                    })
                    .collect::<Result<Vec<f64>>>()?,
            ),
            Some(v) => return Err(k.err("trained_betas", "a list of numbers or null", v)),
        };
        let prediction_type = match k.string("prediction_type", "epsilon")?.as_str() {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            other => {
                return Err(Error::config(
                    path,
                    format!(
                        "prediction_type {other:?} is not supported \
                         (supported: \"epsilon\", \"v_prediction\")"
                    ),
                ))
            }
        };
        let timestep_spacing = match k.get("timestep_spacing") {
            None => None,
            Some(Value::String(s)) => Some(match s.as_str() {
                "leading" => TimestepSpacing::Leading,
                "trailing" => TimestepSpacing::Trailing,
                "linspace" => TimestepSpacing::Linspace,
                other => {
                    return Err(Error::config(
                        path,
                        format!(
                            "timestep_spacing {other:?} is not supported \
                             (supported: leading, trailing, linspace)"
                        ),
                    ))
                }
            }),
            Some(v) => {
                return Err(k.err(
                    "timestep_spacing",
                    "\"leading\", \"trailing\" or \"linspace\"",
                    v,
                ))
            }
        };
        let solver_order = k.int("solver_order", 2)?;
        let disable_corrector = match k.get("disable_corrector") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|i| i as usize)
                        .ok_or_else(|| k.err("disable_corrector", "a list of step indices", v))
                })
                .collect::<Result<Vec<usize>>>()?,
            Some(v) => return Err(k.err("disable_corrector", "a list of step indices", v)),
        };
        let original_inference_steps = k.int("original_inference_steps", 50)?;
        Ok(SchedulerConfig {
            path: path.to_path_buf(),
            class_name,
            num_train_timesteps: num_train_timesteps as usize,
            beta_start: k.opt_f64("beta_start")?,
            beta_end: k.opt_f64("beta_end")?,
            beta_schedule: k.opt_string("beta_schedule")?,
            trained_betas,
            prediction_type,
            timestep_spacing,
            steps_offset: k.int("steps_offset", 0)?,
            rescale_betas_zero_snr: k.bool("rescale_betas_zero_snr", false)?,
            clip_sample: k.opt_bool("clip_sample")?,
            clip_sample_range: k.f64("clip_sample_range", 1.0)?,
            set_alpha_to_one: k.opt_bool("set_alpha_to_one")?,
            skip_prk_steps: k.bool("skip_prk_steps", false)?,
            thresholding: k.bool("thresholding", false)?,
            interpolation_type: k.string("interpolation_type", &d.interpolation_type)?,
            use_karras_sigmas: k.bool("use_karras_sigmas", false)?,
            use_exponential_sigmas: k.bool("use_exponential_sigmas", false)?,
            use_beta_sigmas: k.bool("use_beta_sigmas", false)?,
            use_lu_lambdas: k.bool("use_lu_lambdas", false)?,
            use_flow_sigmas: k.bool("use_flow_sigmas", false)?,
            sigma_min: k.opt_f64("sigma_min")?,
            sigma_max: k.opt_f64("sigma_max")?,
            timestep_type: k.string("timestep_type", &d.timestep_type)?,
            final_sigmas_type: k.string("final_sigmas_type", &d.final_sigmas_type)?,
            algorithm_type: k.string("algorithm_type", &d.algorithm_type)?,
            solver_order: solver_order.max(0) as usize,
            solver_type: k.opt_string("solver_type")?,
            lower_order_final: k.bool("lower_order_final", true)?,
            euler_at_final: k.bool("euler_at_final", false)?,
            lambda_min_clipped: k.f64("lambda_min_clipped", f64::NEG_INFINITY)?,
            variance_type: k.opt_string("variance_type")?,
            predict_x0: k.bool("predict_x0", true)?,
            disable_corrector,
            original_inference_steps: original_inference_steps.max(1) as usize,
            timestep_scaling: k.f64("timestep_scaling", 10.0)?,
        })
    }

    /// Reads and parses a `scheduler_config.json` file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(path, format!("invalid JSON: {e}")))?;
        Self::from_json(&value, path)
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    /// The config's `timestep_spacing`, or the given scheduler's default.
    pub(crate) fn spacing_or(&self, default: TimestepSpacing) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(default)
    }

    pub(crate) fn unsupported(&self, key: &str, value: impl std::fmt::Display, who: &str) -> Error {
        Error::config(
            &self.path,
            format!("{key} = {value} is not supported by the {who} sampler"),
        )
    }
}

/// The scheduler classes with a `clip_sample` option.
const CLASSES_WITH_CLIP_SAMPLE: [&str; 5] = [
    "DDIMScheduler",
    "DDPMScheduler",
    "HeunDiscreteScheduler",
    "LCMScheduler",
    "TCDScheduler",
];

impl SchedulerConfig {
    /// The config as diffusers' Stable Diffusion pipelines patch it at construction, before
    /// any `from_config` swap: `steps_offset` becomes 1; text-to-image and image-to-image
    /// turn `clip_sample` off when the loaded class has that option (DDIM, DDPM), while
    /// inpainting leaves it and instead turns `skip_prk_steps` on for a loaded PNDM.
    pub fn for_pipeline(&self, inpaint: bool) -> SchedulerConfig {
        let mut c = self.clone();
        c.steps_offset = 1;
        let class = c.class_name.as_deref().unwrap_or("");
        if inpaint {
            if class == "PNDMScheduler" {
                c.skip_prk_steps = true;
            }
        } else if CLASSES_WITH_CLIP_SAMPLE.contains(&class) {
            c.clip_sample = Some(false);
        }
        c
    }
}
