//! The names of the samplers and schedules, and which combinations exist.
//!
//! A *sampler* is the update rule (one diffusers scheduler class); a *schedule* is the
//! sequence of sigmas / timesteps it walks. diffusers expresses a schedule as config
//! overrides on the class (`use_karras_sigmas=True`, `timestep_spacing="trailing"`, ...),
//! so a combination exists exactly when the class has that option; A1111 and ComfyUI
//! offer the same two choices under their own names, which we accept as aliases.

use crate::{Error, Result};

/// The samplers we implement (update rules).
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
    /// diffusers `HeunDiscreteScheduler`.
    Heun,
    /// diffusers `LMSDiscreteScheduler`.
    Lms,
    /// diffusers `KDPM2DiscreteScheduler`.
    Dpm2,
    /// diffusers `KDPM2AncestralDiscreteScheduler`.
    Dpm2Ancestral,
    /// diffusers `DPMSolverMultistepScheduler`, `algorithm_type="dpmsolver++"`,
    /// `solver_order=2`.
    DpmPp2m,
    /// The same with `algorithm_type="sde-dpmsolver++"`.
    DpmPp2mSde,
    /// `algorithm_type="sde-dpmsolver++"`, `solver_order=3`.
    DpmPp3mSde,
    /// diffusers `DPMSolverSDEScheduler` (k-diffusion's DPM++ SDE) with our Brownian tree.
    DpmPpSde,
    /// k-diffusion's `sample_dpmpp_2s_ancestral` (no diffusers class).
    DpmPp2sAncestral,
    /// diffusers `UniPCMultistepScheduler` (predictor-corrector; solver type and order from
    /// the config, default bh2 and 2).
    UniPc,
    /// diffusers `DEISMultistepScheduler` (order from the config, default 2).
    Deis,
    /// diffusers `DDPMScheduler` (ancestral sampling of the original DDPM).
    Ddpm,
    /// diffusers `LCMScheduler` (for latent-consistency models and LoRAs).
    Lcm,
    /// diffusers `TCDScheduler` with the pipelines' `eta` = 0 (for TCD models and LoRAs).
    Tcd,
}

/// What the tables below say about one sampler.
struct Entry {
    kind: SamplerKind,
    name: &'static str,
    a1111: &'static str,
    class: &'static str,
    /// Model evaluations per step (the last step of a second-order sampler takes one).
    evals: u8,
    /// Takes Karras / exponential / beta sigmas (the class has `use_*_sigmas`).
    sigma_schedules: bool,
    /// Honours `timestep_spacing` (so takes SGM Uniform).
    spacing: bool,
    /// More spellings accepted by [`SamplerKind::from_name`] (compared normalised: case,
    /// `++` / `pp`, spaces, dashes, underscores and dots do not matter).
    aliases: &'static [&'static str],
}

const TABLE: [Entry; 18] = [
    Entry {
        kind: SamplerKind::Ddim,
        name: "ddim",
        a1111: "DDIM",
        class: "DDIMScheduler",
        evals: 1,
        sigma_schedules: false,
        spacing: true,
        aliases: &["DDIMScheduler"],
    },
    Entry {
        kind: SamplerKind::Pndm,
        name: "pndm",
        a1111: "PLMS",
        class: "PNDMScheduler",
        evals: 1,
        sigma_schedules: false,
        spacing: true,
        aliases: &["plms"],
    },
    Entry {
        kind: SamplerKind::Euler,
        name: "euler",
        a1111: "Euler",
        class: "EulerDiscreteScheduler",
        evals: 1,
        sigma_schedules: true,
        spacing: true,
        aliases: &["k_euler", "euler_discrete", "EulerDiscreteScheduler"],
    },
    Entry {
        kind: SamplerKind::EulerAncestral,
        name: "euler-a",
        a1111: "Euler a",
        class: "EulerAncestralDiscreteScheduler",
        evals: 1,
        sigma_schedules: false,
        spacing: true,
        aliases: &[
            "k_euler_a",
            "k_euler_ancestral",
            "euler_ancestral",
            "euler_ancestral_discrete",
            "EulerAncestralDiscreteScheduler",
        ],
    },
    Entry {
        kind: SamplerKind::Heun,
        name: "heun",
        a1111: "Heun",
        class: "HeunDiscreteScheduler",
        evals: 2,
        sigma_schedules: true,
        spacing: true,
        aliases: &["k_heun", "heun_discrete", "HeunDiscreteScheduler"],
    },
    Entry {
        kind: SamplerKind::Lms,
        name: "lms",
        a1111: "LMS",
        class: "LMSDiscreteScheduler",
        evals: 1,
        sigma_schedules: true,
        spacing: true,
        aliases: &["k_lms", "lms_discrete", "LMSDiscreteScheduler"],
    },
    Entry {
        kind: SamplerKind::Dpm2,
        name: "dpm2",
        a1111: "DPM2",
        class: "KDPM2DiscreteScheduler",
        evals: 2,
        sigma_schedules: true,
        spacing: true,
        aliases: &["k_dpm_2", "kdpm2_discrete", "KDPM2DiscreteScheduler"],
    },
    Entry {
        kind: SamplerKind::Dpm2Ancestral,
        name: "dpm2-a",
        a1111: "DPM2 a",
        class: "KDPM2AncestralDiscreteScheduler",
        evals: 2,
        sigma_schedules: true,
        spacing: true,
        aliases: &[
            "k_dpm_2_a",
            "dpm2_ancestral",
            "kdpm2_ancestral_discrete",
            "KDPM2AncestralDiscreteScheduler",
        ],
    },
    Entry {
        kind: SamplerKind::DpmPp2m,
        name: "dpmpp-2m",
        a1111: "DPM++ 2M",
        class: "DPMSolverMultistepScheduler",
        evals: 1,
        sigma_schedules: true,
        spacing: true,
        aliases: &[
            "k_dpmpp_2m",
            "dpmsolver++_2m",
            "DPMSolverMultistepScheduler",
        ],
    },
    Entry {
        kind: SamplerKind::DpmPp2mSde,
        name: "dpmpp-2m-sde",
        a1111: "DPM++ 2M SDE",
        class: "DPMSolverMultistepScheduler",
        evals: 1,
        sigma_schedules: true,
        spacing: true,
        aliases: &["k_dpmpp_2m_sde", "k_dpmpp_2m_sde_ka", "dpmsolver++_2m_sde"],
    },
    Entry {
        kind: SamplerKind::DpmPp3mSde,
        name: "dpmpp-3m-sde",
        a1111: "DPM++ 3M SDE",
        class: "DPMSolverMultistepScheduler",
        evals: 1,
        sigma_schedules: true,
        spacing: true,
        aliases: &["k_dpmpp_3m_sde", "dpmsolver++_3m_sde"],
    },
    Entry {
        kind: SamplerKind::DpmPpSde,
        name: "dpmpp-sde",
        a1111: "DPM++ SDE",
        class: "DPMSolverSDEScheduler",
        evals: 2,
        sigma_schedules: true,
        spacing: true,
        aliases: &["k_dpmpp_sde", "DPMSolverSDEScheduler"],
    },
    Entry {
        kind: SamplerKind::DpmPp2sAncestral,
        name: "dpmpp-2s-a",
        a1111: "DPM++ 2S a",
        class: "k-diffusion sample_dpmpp_2s_ancestral",
        evals: 2,
        sigma_schedules: true,
        spacing: true,
        aliases: &["k_dpmpp_2s_a", "dpmpp_2s_ancestral"],
    },
    Entry {
        kind: SamplerKind::UniPc,
        name: "unipc",
        a1111: "UniPC",
        class: "UniPCMultistepScheduler",
        evals: 1,
        sigma_schedules: true,
        spacing: true,
        aliases: &["UniPCMultistepScheduler"],
    },
    Entry {
        kind: SamplerKind::Deis,
        name: "deis",
        a1111: "DEIS",
        class: "DEISMultistepScheduler",
        evals: 1,
        sigma_schedules: true,
        spacing: true,
        aliases: &["DEISMultistepScheduler"],
    },
    Entry {
        kind: SamplerKind::Ddpm,
        name: "ddpm",
        a1111: "DDPM",
        class: "DDPMScheduler",
        evals: 1,
        sigma_schedules: false,
        spacing: true,
        aliases: &["DDPMScheduler"],
    },
    Entry {
        kind: SamplerKind::Lcm,
        name: "lcm",
        a1111: "LCM",
        class: "LCMScheduler",
        evals: 1,
        sigma_schedules: false,
        spacing: false,
        aliases: &["LCMScheduler"],
    },
    Entry {
        kind: SamplerKind::Tcd,
        name: "tcd",
        a1111: "TCD",
        class: "TCDScheduler",
        evals: 1,
        sigma_schedules: false,
        spacing: false,
        aliases: &["TCDScheduler"],
    },
];

/// Lower case, `++` as `pp`, without spaces, dashes, underscores and dots.
fn normalise(name: &str) -> String {
    name.trim()
        .to_ascii_lowercase()
        .replace("++", "pp")
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '_' | '.'))
        .collect()
}

impl SamplerKind {
    /// Every sampler, in the order the lists show them.
    pub fn all() -> impl Iterator<Item = SamplerKind> {
        TABLE.iter().map(|e| e.kind)
    }

    fn entry(self) -> &'static Entry {
        // Every variant has exactly one row (a unit test checks it).
        TABLE.iter().find(|e| e.kind == self).unwrap_or(&TABLE[0])
    }

    /// Our name, as the CLI and the native API spell it.
    pub fn name(self) -> &'static str {
        self.entry().name
    }

    /// The AUTOMATIC1111 web UI's name.
    pub fn a1111_name(self) -> &'static str {
        self.entry().a1111
    }

    /// The diffusers scheduler class this sampler ports.
    pub fn diffusers_class(self) -> &'static str {
        self.entry().class
    }

    /// Model evaluations per step (2 for Heun, DPM2, DPM2 a, DPM++ SDE and DPM++ 2S a,
    /// whose last step takes one).
    pub fn evals_per_step(self) -> u8 {
        self.entry().evals
    }

    /// Other accepted spellings (besides the name, the A1111 name and case / punctuation
    /// variants of both).
    pub fn aliases(self) -> &'static [&'static str] {
        self.entry().aliases
    }

    /// The schedules this sampler accepts.
    pub fn schedules(self) -> Vec<Schedule> {
        Schedule::ALL
            .into_iter()
            .filter(|s| self.accepts(*s))
            .collect()
    }

    /// Whether the pipelines' `eta` reaches this sampler's step (DDIM and TCD).
    pub fn takes_eta(self) -> bool {
        matches!(self, SamplerKind::Ddim | SamplerKind::Tcd)
    }

    /// Whether its step takes `s_noise` (DPM++ SDE and DPM++ 2S a).
    pub fn takes_s_noise(self) -> bool {
        matches!(self, SamplerKind::DpmPpSde | SamplerKind::DpmPp2sAncestral)
    }

    /// Whether the reference defines this sampler on `schedule`.
    pub fn accepts(self, schedule: Schedule) -> bool {
        match schedule {
            Schedule::Model => true,
            Schedule::SgmUniform => self.entry().spacing,
            // Only EulerDiscreteScheduler takes custom sigmas.
            Schedule::Simple | Schedule::Normal => self == SamplerKind::Euler,
            Schedule::Karras | Schedule::Exponential | Schedule::Beta => {
                self.entry().sigma_schedules
            }
        }
    }

    /// Parses a sampler name: ours, A1111's, or a listed alias, case-insensitive; a name
    /// that ends in a schedule label ("DPM++ 2M Karras", `dpmpp-2m-karras`) also gives
    /// that schedule.
    pub fn parse(name: &str) -> Result<(SamplerKind, Option<Schedule>)> {
        let norm = normalise(name);
        if let Some(kind) = Self::lookup(&norm) {
            return Ok((kind, None));
        }
        for schedule in Schedule::ALL {
            for label in schedule.suffixes() {
                if let Some(kind) = norm.strip_suffix(label).and_then(Self::lookup) {
                    return Ok((kind, Some(schedule)));
                }
            }
        }
        Err(Error::invalid(
            "sampler",
            format!(
                "unknown sampler {name:?}; valid names: {}",
                Self::valid_names()
            ),
        ))
    }

    /// [`SamplerKind::parse`] for a name that must not carry a schedule.
    pub fn from_name(name: &str) -> Result<Self> {
        match Self::parse(name)? {
            (kind, None) => Ok(kind),
            (_, Some(schedule)) => Err(Error::invalid(
                "sampler",
                format!(
                    "{name:?} names a schedule ({}); give the sampler and the schedule separately",
                    schedule.name()
                ),
            )),
        }
    }

    fn lookup(norm: &str) -> Option<SamplerKind> {
        TABLE
            .iter()
            .find(|e| {
                normalise(e.name) == norm
                    || normalise(e.a1111) == norm
                    || e.aliases.iter().any(|a| normalise(a) == norm)
            })
            .map(|e| e.kind)
    }

    /// "ddim, pndm, ... (A1111 names DDIM, PLMS, ... are accepted too)".
    pub fn valid_names() -> String {
        let ours: Vec<&str> = TABLE.iter().map(|e| e.name).collect();
        let a1111: Vec<&str> = TABLE.iter().map(|e| e.a1111).collect();
        format!(
            "{} (A1111 names {} are accepted too)",
            ours.join(", "),
            a1111.join(", ")
        )
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

/// The sigma / timestep schedule a sampler walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Schedule {
    /// The model's own scheduler config, unchanged (A1111 "Automatic").
    #[default]
    Model,
    /// Karras et al. (rho = 7): `use_karras_sigmas=True`.
    Karras,
    /// Log-linear in sigma: `use_exponential_sigmas=True`.
    Exponential,
    /// Beta(0.6, 0.6) quantiles between the extreme sigmas: `use_beta_sigmas=True`.
    Beta,
    /// Evenly spaced timesteps ending at the last training step:
    /// `timestep_spacing="trailing"` (what A1111 and ComfyUI call SGM Uniform).
    SgmUniform,
    /// A1111's "Simple": every `1000 / n`-th training sigma from the top, given to the
    /// sampler as custom sigmas (`set_timesteps(sigmas=...)`, Euler only).
    Simple,
    /// A1111's "Normal": evenly spaced fractional timesteps mapped to sigmas log-linearly,
    /// as custom sigmas (Euler only).
    Normal,
}

impl Schedule {
    pub const ALL: [Schedule; 7] = [
        Schedule::Model,
        Schedule::Karras,
        Schedule::Exponential,
        Schedule::Beta,
        Schedule::SgmUniform,
        Schedule::Simple,
        Schedule::Normal,
    ];

    /// Our name.
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Model => "model",
            Schedule::Karras => "karras",
            Schedule::Exponential => "exponential",
            Schedule::Beta => "beta",
            Schedule::SgmUniform => "sgm-uniform",
            Schedule::Simple => "simple",
            Schedule::Normal => "normal",
        }
    }

    /// A1111's label (its `/sdapi/v1/schedulers` `label`).
    pub fn a1111_label(self) -> &'static str {
        match self {
            Schedule::Model => "Automatic",
            Schedule::Karras => "Karras",
            Schedule::Exponential => "Exponential",
            Schedule::Beta => "Beta",
            Schedule::SgmUniform => "SGM Uniform",
            Schedule::Simple => "Simple",
            Schedule::Normal => "Normal",
        }
    }

    /// A1111's name (its `/sdapi/v1/schedulers` `name`).
    pub fn a1111_name(self) -> &'static str {
        match self {
            Schedule::Model => "automatic",
            Schedule::Karras => "karras",
            Schedule::Exponential => "exponential",
            Schedule::Beta => "beta",
            Schedule::SgmUniform => "sgm_uniform",
            Schedule::Simple => "simple",
            Schedule::Normal => "normal",
        }
    }

    /// The diffusers config overrides that select it ("" for the model's own).
    pub fn diffusers_option(self) -> &'static str {
        match self {
            Schedule::Model => "",
            Schedule::Karras => "use_karras_sigmas=True",
            Schedule::Exponential => "use_exponential_sigmas=True",
            Schedule::Beta => "use_beta_sigmas=True",
            Schedule::SgmUniform => "timestep_spacing=\"trailing\"",
            Schedule::Simple | Schedule::Normal => "set_timesteps(sigmas=...)",
        }
    }

    /// Normalised spellings that may end a combined sampler name.
    fn suffixes(self) -> &'static [&'static str] {
        match self {
            Schedule::Model => &[],
            // ("dpmpp-2m-k": the short form of earlier versions.)
            Schedule::Karras => &["karras", "k"],
            Schedule::Exponential => &["exponential"],
            Schedule::Beta => &["beta"],
            Schedule::SgmUniform => &["sgmuniform"],
            Schedule::Simple => &["simple"],
            Schedule::Normal => &["normal"],
        }
    }

    /// Parses a schedule name: ours, A1111's name or label, case-insensitive; "automatic",
    /// "default" and "" are the model's own.
    pub fn from_name(name: &str) -> Result<Self> {
        let norm = normalise(name);
        let found = match norm.as_str() {
            "" | "model" | "automatic" | "default" | "auto" => Some(Schedule::Model),
            _ => Schedule::ALL
                .into_iter()
                .find(|s| normalise(s.name()) == norm || normalise(s.a1111_label()) == norm),
        };
        found.ok_or_else(|| {
            Error::invalid(
                "schedule",
                format!(
                    "unknown schedule {name:?}; valid names: {}",
                    Self::valid_names()
                ),
            )
        })
    }

    /// "model, karras, ...".
    pub fn valid_names() -> String {
        let names: Vec<&str> = Self::ALL.iter().map(|s| s.name()).collect();
        format!(
            "{} (A1111's automatic, sgm_uniform and labels are accepted too)",
            names.join(", ")
        )
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Checks that `sampler` is defined on `schedule`, with an error naming both.
pub fn check_combination(sampler: SamplerKind, schedule: Schedule) -> Result<()> {
    if sampler.accepts(schedule) {
        return Ok(());
    }
    let takes: Vec<&str> = sampler.schedules().iter().map(|s| s.name()).collect();
    Err(Error::invalid(
        "schedule",
        format!(
            "sampler {} does not take schedule {} (diffusers' {} has no {}); it takes: {}",
            sampler.name(),
            schedule.name(),
            sampler.diffusers_class(),
            schedule.diffusers_option(),
            takes.join(", ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_one_row() {
        for e in &TABLE {
            assert_eq!(TABLE.iter().filter(|o| o.kind == e.kind).count(), 1);
            assert_eq!(e.kind.entry().name, e.name);
        }
    }

    #[test]
    fn names_round_trip() {
        for k in SamplerKind::all() {
            assert_eq!(SamplerKind::parse(k.name()).ok(), Some((k, None)));
            assert_eq!(SamplerKind::parse(k.a1111_name()).ok(), Some((k, None)));
        }
        for s in Schedule::ALL {
            assert_eq!(Schedule::from_name(s.name()).ok(), Some(s));
            assert_eq!(Schedule::from_name(s.a1111_name()).ok(), Some(s));
            assert_eq!(Schedule::from_name(s.a1111_label()).ok(), Some(s));
        }
    }

    #[test]
    fn combined_names_split() {
        let parse = |n: &str| SamplerKind::parse(n).ok();
        assert_eq!(
            parse("DPM++ 2M Karras"),
            Some((SamplerKind::DpmPp2m, Some(Schedule::Karras)))
        );
        assert_eq!(
            parse("dpmpp-2m-karras"),
            Some((SamplerKind::DpmPp2m, Some(Schedule::Karras)))
        );
        assert_eq!(
            parse("DPM++ 2M SDE Exponential"),
            Some((SamplerKind::DpmPp2mSde, Some(Schedule::Exponential)))
        );
        assert_eq!(
            parse("DPM2 a Karras"),
            Some((SamplerKind::Dpm2Ancestral, Some(Schedule::Karras)))
        );
        assert_eq!(parse("euler_a"), Some((SamplerKind::EulerAncestral, None)));
        assert_eq!(parse("k_dpm_2_a"), Some((SamplerKind::Dpm2Ancestral, None)));
        assert_eq!(
            parse("lms karras"),
            Some((SamplerKind::Lms, Some(Schedule::Karras)))
        );
        assert_eq!(parse("dpm3"), None);
        assert!(SamplerKind::from_name("DPM++ 2M Karras").is_err());
    }

    #[test]
    fn combinations_follow_the_classes() {
        assert!(check_combination(SamplerKind::Euler, Schedule::Beta).is_ok());
        let e = check_combination(SamplerKind::EulerAncestral, Schedule::Karras)
            .expect_err("no karras on euler-a")
            .to_string();
        assert!(e.contains("euler-a") && e.contains("karras"), "{e}");
        assert!(check_combination(SamplerKind::Ddim, Schedule::SgmUniform).is_ok());
    }
}
