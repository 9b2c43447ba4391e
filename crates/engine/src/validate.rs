//! Validation: the one place where a [`RequestDraft`] meets the loaded model and the worker's
//! limits (named in [`crate::limits`], re-exported here). Every error names the field, the
//! limit and the value it got, whichever interface the request came through.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sd_models::lora::LoraSpec;
use sd_models::pipelines::{
    GenerateParams, ImageInput, MaskImage, MicroConditioning, RgbImage, SdPipeline,
};
use sd_models::samplers::{SamplerKind, Schedule};

use crate::images::input::{decode_alpha_mask, decode_mask, decode_rgb};
use crate::request::{
    GenerationRequest, ImageBytes, LoraDraft, MaskRule, MicroDraft, Operation, PreviewKind,
    PromptSyntax, RequestDraft,
};
use crate::spec::ModelSpec;

pub use crate::limits::*;

/// A request the worker refuses: the field (as the request named it) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidField {
    pub field: String,
    pub reason: String,
}

impl InvalidField {
    pub fn new(field: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        InvalidField {
            field: field.into(),
            reason: reason.to_string(),
        }
    }

    /// "invalid `field`: reason".
    pub fn message(&self) -> String {
        format!("invalid `{}`: {}", self.field, self.reason)
    }
}

impl std::fmt::Display for InvalidField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for InvalidField {}

type Result<T> = std::result::Result<T, InvalidField>;

fn invalid(field: &str, reason: impl std::fmt::Display) -> InvalidField {
    InvalidField::new(field, reason)
}

/// The hub repo id of a folder inside a Hugging Face cache
/// (`.../models--org--name/snapshots/REV`), if it is one.
pub fn hub_repo_id(path: &Path) -> Option<String> {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    path.ancestors().find_map(|dir| {
        let name = dir.file_name()?.to_str()?;
        let rest = name.strip_prefix("models--")?;
        let parts: Vec<&str> = rest.split("--").collect();
        (!parts.iter().any(|p| p.is_empty())).then(|| parts.join("/"))
    })
}

/// Whether `given` names the loaded model: its hub repo id, its folder name, the path it was
/// loaded from, or that path made canonical.
pub fn names_model(spec: &ModelSpec, given: &str) -> bool {
    if given == spec.name || Path::new(given) == spec.path || spec.repo_id.as_deref() == Some(given)
    {
        return true;
    }
    match (
        std::fs::canonicalize(given),
        std::fs::canonicalize(&spec.path),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Validates a draft against the loaded model and the worker's limits, filling in defaults.
/// `random_seed` is used when the request has no seed.
pub fn validate(
    draft: RequestDraft,
    spec: &ModelSpec,
    limits: &Limits,
    random_seed: u64,
) -> Result<GenerationRequest> {
    let op = draft.operation;
    check_operation(spec, op)?;
    let (input, mask) = input_images(&draft, limits)?;
    check_model(spec, draft.model.as_deref())?;
    let prompt = prompt(draft.prompt.clone(), limits.empty_prompt)?;
    let negative_prompt = draft
        .negative_prompt
        .clone()
        .map(|n| text("negative_prompt", n, MAX_TEXT_CHARS))
        .transpose()?;
    if spec.flux && negative_prompt.is_some() {
        return Err(invalid(
            "negative_prompt",
            "FLUX models here run without a negative prompt (no true classifier-free guidance); omit it",
        ));
    }
    if spec.flux && draft.prompt_syntax == PromptSyntax::A1111 {
        return Err(invalid(
            "prompt_syntax",
            "\"a1111\" applies to Stable Diffusion models (their CLIP text encoder); FLUX reads prompts as they are",
        ));
    }
    let max_sequence_length = max_sequence_length(spec, draft.max_sequence_length)?;
    let (width, height) = size(spec, limits, &draft, input.as_ref(), mask.is_some())?;
    let mut steps = steps(spec, limits, draft.steps)?;
    let guidance = guidance(spec, draft.guidance_scale)?;
    let seed = draft.seed.unwrap_or(random_seed);
    let (sampler, schedule) = sampler(spec, &draft)?;
    let eta = eta(spec, sampler, draft.eta)?;
    let s_noise = s_noise(spec, sampler, draft.s_noise)?;
    let batch = draft.batch.unwrap_or(1);
    if batch == 0 || batch > limits.max_batch as u64 {
        let source = if limits.from_flags {
            "this worker's --max-batch"
        } else {
            "the largest batch"
        };
        return Err(invalid(
            "batch",
            format!(
                "must be between 1 and {}, got {batch}; the limit is {source}",
                limits.max_batch
            ),
        ));
    }
    check_sampler_steps(spec, sampler, schedule, steps)?;
    let input = match input {
        None => None,
        Some(image) => {
            let strength = draft.strength.unwrap_or_else(|| default_strength(spec, op));
            if draft.steps.is_none() {
                steps = steps_for_strength(steps, strength, spec, limits);
                check_sampler_steps(spec, sampler, schedule, steps)?;
            }
            check_strength(spec, steps, strength)?;
            Some(Arc::new(ImageInput {
                image,
                strength,
                mask,
            }))
        }
    };
    let preview_every = draft.preview_every.unwrap_or(DEFAULT_PREVIEW_EVERY as u64);
    let hive_id = draft
        .hive_id
        .map(|s| text("hive_id", s, MAX_ID_CHARS))
        .transpose()?;
    let worker_id = draft
        .worker_id
        .map(|s| text("worker_id", s, MAX_ID_CHARS))
        .transpose()?;
    let loras = loras(draft.loras, limits)?;
    let micro = micro(spec, &draft.micro)?;
    Ok(GenerationRequest {
        operation: op,
        max_sequence_length,
        flux: spec.flux.then_some(spec.guidance_embedded),
        input,
        params: GenerateParams {
            prompt,
            negative_prompt,
            width,
            height,
            steps,
            guidance,
            seed,
            sampler,
            schedule,
            eta,
            s_noise,
            batch: batch as usize,
            prompt_syntax: draft.prompt_syntax,
            micro,
        },
        preview_every: usize::try_from(preview_every).unwrap_or(usize::MAX),
        preview: draft.preview.unwrap_or(PreviewKind::Approx),
        hive_id,
        worker_id,
        loras,
    })
}

/// SDXL's size and crop ids: SDXL models only, each value in range; the aesthetic scores of
/// refiner-style models are refused (no such model loads here).
fn micro(spec: &ModelSpec, d: &MicroDraft) -> Result<MicroConditioning> {
    for (field, given) in [
        ("aesthetic_score", d.aesthetic_score),
        ("negative_aesthetic_score", d.negative_aesthetic_score),
    ] {
        if given.is_some() {
            return Err(invalid(
                field,
                format!(
                    "applies to SDXL refiner-style models (requires_aesthetics_score); the model ({}) is {}",
                    spec.name,
                    if spec.family == "sdxl" { "an SDXL base model, which takes target_size instead" } else { spec.family.as_str() }
                ),
            ));
        }
    }
    let pairs = [
        ("original_size", d.original_size, 1),
        ("crops_coords_top_left", d.crops_coords_top_left, 0),
        ("target_size", d.target_size, 1),
        ("negative_original_size", d.negative_original_size, 1),
        (
            "negative_crops_coords_top_left",
            d.negative_crops_coords_top_left,
            0,
        ),
        ("negative_target_size", d.negative_target_size, 1),
    ];
    let mut out = [None; 6];
    for (slot, (field, given, min)) in out.iter_mut().zip(pairs) {
        let Some([a, b]) = given else { continue };
        if spec.family != "sdxl" {
            return Err(invalid(
                field,
                format!(
                    "applies to SDXL models only; the model ({}) is {}",
                    spec.name, spec.family
                ),
            ));
        }
        if [a, b].iter().any(|&v| v < min || v > MAX_MICRO_PIXELS) {
            return Err(invalid(
                field,
                format!("each value must be between {min} and {MAX_MICRO_PIXELS} pixels, got [{a}, {b}]"),
            ));
        }
        *slot = Some((a as u32, b as u32));
    }
    Ok(MicroConditioning {
        original_size: out[0],
        crops_coords_top_left: out[1],
        target_size: out[2],
        negative_original_size: out[3],
        negative_crops_coords_top_left: out[4],
        negative_target_size: out[5],
    })
}

fn check_operation(spec: &ModelSpec, op: Operation) -> Result<()> {
    let operation = op.name();
    if spec.flux && op == Operation::Inpaint {
        return Err(invalid(
            "operation",
            format!(
                "the model ({}) is FLUX: it runs \"image_generation\" and \"image_transform\" (FLUX inpainting is not supported yet), got \"{operation}\"",
                spec.name
            ),
        ));
    }
    if spec.inpainting_model && op != Operation::Inpaint {
        return Err(invalid(
            "operation",
            format!(
                "the model ({}) is an inpainting model: it runs \"image_inpaint\" only, got \"{operation}\"",
                spec.name
            ),
        ));
    }
    Ok(())
}

/// The field name the operation's init image goes by on the native API.
fn init_image_field(op: Operation) -> &'static str {
    match op {
        Operation::Inpaint => "init_image",
        _ => "input_image",
    }
}

/// Decodes the init image and mask that the operation needs (and refuses those it does not
/// take).
fn input_images(
    draft: &RequestDraft,
    limits: &Limits,
) -> Result<(Option<RgbImage>, Option<MaskImage>)> {
    let op = draft.operation;
    let image = |b: &ImageBytes| {
        decode_rgb(&b.bytes, limits.max_input_pixels, MAX_SIDE).map_err(|e| invalid(&b.field, e))
    };
    let required = |b: &Option<ImageBytes>, field: &str, what: &str| match b {
        Some(b) => Ok(b.clone()),
        None => Err(invalid(field, format!("is required ({what})"))),
    };
    match op {
        Operation::Generation => {
            for (given, field) in [
                (draft.init_image.as_ref(), "init_image"),
                (draft.mask_image.as_ref(), "mask_image"),
            ] {
                if let Some(b) = given {
                    let field = if b.field.is_empty() { field } else { &b.field };
                    return Err(invalid(
                        field,
                        "applies to image_transform and image_inpaint, not image_generation",
                    ));
                }
            }
            if draft.strength.is_some() {
                return Err(invalid(
                    "strength",
                    "applies to image_transform and image_inpaint, not image_generation",
                ));
            }
            Ok((None, None))
        }
        Operation::Transform => {
            if let Some(m) = &draft.mask_image {
                return Err(invalid(&m.field, "applies to image_inpaint only"));
            }
            let b = required(
                &draft.init_image,
                init_image_field(op),
                "a base64 PNG, JPEG or WebP, or a data: URL",
            )?;
            Ok((Some(image(&b)?), None))
        }
        Operation::Inpaint => {
            let b = required(
                &draft.init_image,
                init_image_field(op),
                "a base64 PNG, JPEG or WebP, or a data: URL",
            )?;
            let rgb = image(&b)?;
            let m = required(
                &draft.mask_image,
                "mask_image",
                "a base64 PNG, JPEG or WebP, or a data: URL; white = repaint",
            )?;
            let mask = match draft.mask_rule {
                MaskRule::White => decode_mask(&m.bytes, limits.max_input_pixels, MAX_SIDE)
                    .map_err(|e| invalid(&m.field, e))?,
                MaskRule::Black => {
                    let mut mask = decode_mask(&m.bytes, limits.max_input_pixels, MAX_SIDE)
                        .map_err(|e| invalid(&m.field, e))?;
                    // Resizing is linear, so inverting before it equals inverting after.
                    mask.pixels.iter_mut().for_each(|p| *p = 255 - *p);
                    mask
                }
                MaskRule::Transparent => {
                    let mask = decode_alpha_mask(&m.bytes, limits.max_input_pixels, MAX_SIDE)
                        .map_err(|e| invalid(&m.field, e))?
                        .ok_or_else(|| {
                            invalid(
                        &m.field,
                        "has no transparency: its fully transparent pixels mark the area to edit",
                    )
                        })?;
                    // OpenAI's rule: the mask has the image's dimensions.
                    if (mask.width, mask.height) != (rgb.width, rgb.height) {
                        return Err(invalid(
                            &m.field,
                            format!(
                                "must have the image's size {}x{}, got {}x{}",
                                rgb.width, rgb.height, mask.width, mask.height
                            ),
                        ));
                    }
                    mask
                }
            };
            Ok((Some(rgb), Some(mask)))
        }
    }
}

fn check_model(spec: &ModelSpec, model: Option<&str>) -> Result<()> {
    let Some(model) = model else {
        return Ok(());
    };
    let model = text("model", model.to_string(), MAX_MODEL_CHARS)?;
    if names_model(spec, &model) {
        return Ok(());
    }
    Err(invalid(
        "model",
        format!(
            "this worker serves {:?}{}, got {model:?}",
            spec.name,
            spec.repo_id
                .as_ref()
                .map(|r| format!(" = {r}"))
                .unwrap_or_default(),
        ),
    ))
}

fn text(field: &str, s: String, max: usize) -> Result<String> {
    let n = s.chars().count();
    if n > max {
        return Err(invalid(
            field,
            format!("must be at most {max} characters, got {n}"),
        ));
    }
    Ok(s)
}

fn prompt(prompt: Option<String>, empty_allowed: bool) -> Result<String> {
    let Some(prompt) = prompt else {
        return Err(invalid("prompt", "is required"));
    };
    if prompt.trim().is_empty() && !empty_allowed {
        return Err(invalid("prompt", "must not be empty"));
    }
    text("prompt", prompt, MAX_TEXT_CHARS)
}

fn max_sequence_length(spec: &ModelSpec, given: Option<u64>) -> Result<Option<usize>> {
    match (given, spec.flux) {
        (None, _) => Ok(None),
        (Some(n), true) => {
            if !(MIN_SEQUENCE_LENGTH as u64..=MAX_SEQUENCE_LENGTH as u64).contains(&n) {
                return Err(invalid(
                    "max_sequence_length",
                    format!(
                        "must be between {MIN_SEQUENCE_LENGTH} and {MAX_SEQUENCE_LENGTH} (T5 tokens), got {n}"
                    ),
                ));
            }
            Ok(Some(n as usize))
        }
        (Some(n), false) => Err(invalid(
            "max_sequence_length",
            format!(
                "applies to FLUX models only (the model is {}), got {n}",
                spec.family
            ),
        )),
    }
}

/// Width and height: given, or the default of the model (or of the init image, rounded down
/// to the latent factor, for Stable Diffusion image-to-image).
fn size(
    spec: &ModelSpec,
    limits: &Limits,
    draft: &RequestDraft,
    input: Option<&RgbImage>,
    inpaint: bool,
) -> Result<(usize, usize)> {
    let f = spec.latent_factor;
    let side = |name: &str, given: Option<u64>, default: usize| -> Result<usize> {
        let v = given.unwrap_or(default as u64);
        if v == 0 || !v.is_multiple_of(f as u64) {
            return Err(invalid(
                name,
                format!("must be a positive multiple of {f} (this model's latent factor), got {v}"),
            ));
        }
        if v > MAX_SIDE as u64 {
            return Err(invalid(
                name,
                format!("must be at most {MAX_SIDE} pixels, got {v}"),
            ));
        }
        Ok(v as usize)
    };
    let (default_width, default_height) = match input {
        // Inpainting (and FLUX image-to-image) default to the model's size, as diffusers'
        // pipelines do.
        Some(_) if inpaint || spec.flux => (spec.default_width, spec.default_height),
        Some(image) => {
            let (w, h) = ImageInput {
                image: image.clone(),
                strength: 1.0,
                mask: None,
            }
            .default_size(f);
            if w == 0 || h == 0 {
                let field = draft
                    .init_image
                    .as_ref()
                    .map_or("input_image", |b| b.field.as_str());
                return Err(invalid(
                    field,
                    format!(
                        "is {}x{}, smaller than this model's latent factor {f} on a side",
                        image.width, image.height
                    ),
                ));
            }
            (w, h)
        }
        None => (spec.default_width, spec.default_height),
    };
    let width = side("width", draft.width, default_width)?;
    let height = side("height", draft.height, default_height)?;
    if width * height > limits.max_pixels {
        return Err(invalid(
            if draft.width.is_some() {
                "width"
            } else {
                "height"
            },
            format!(
                "{width}x{height} = {} pixels is over this worker's budget of {} pixels per image (--max-pixels)",
                width * height,
                limits.max_pixels
            ),
        ));
    }
    Ok((width, height))
}

fn steps(spec: &ModelSpec, limits: &Limits, given: Option<u64>) -> Result<usize> {
    let (max_steps, source) = if limits.max_steps <= spec.num_train_timesteps {
        (limits.max_steps, "this worker's --max-steps")
    } else {
        (
            spec.num_train_timesteps,
            "the scheduler's num_train_timesteps",
        )
    };
    let steps = given.unwrap_or(default_steps(spec, limits) as u64);
    if steps == 0 || steps > max_steps as u64 {
        return Err(invalid(
            "steps",
            format!("must be between 1 and {max_steps}, got {steps}; the limit is {source}"),
        ));
    }
    Ok(steps as usize)
}

fn guidance(spec: &ModelSpec, given: Option<f64>) -> Result<f64> {
    if spec.flux && !spec.guidance_embedded && given.is_some() {
        return Err(invalid(
            "guidance_scale",
            format!(
                "{} has no guidance embedding (FLUX schnell-like): omit it",
                spec.name
            ),
        ));
    }
    let guidance = given.unwrap_or(spec.default_guidance);
    if !(0.0..=MAX_GUIDANCE).contains(&guidance) {
        return Err(invalid(
            "guidance_scale",
            format!("must be between 0 and {MAX_GUIDANCE}, got {guidance}"),
        ));
    }
    Ok(guidance)
}

/// The sampler and schedule of a request: `sampler` (or the earlier `scheduler`, one of
/// the two) and `schedule`; a combined name ("DPM++ 2M Karras") sets both, and then an
/// explicit `schedule` must agree with it. Omitted: the model's own.
fn sampler(spec: &ModelSpec, draft: &RequestDraft) -> Result<(SamplerKind, Schedule)> {
    let (field, name) = match (&draft.sampler, &draft.scheduler) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "scheduler",
                "give either `sampler` or the older `scheduler`, not both",
            ))
        }
        (Some(s), None) => ("sampler", Some(s.as_str())),
        (None, Some(s)) => ("scheduler", Some(s.as_str())),
        (None, None) => ("sampler", None),
    };
    if spec.flux {
        let given = [
            (field, name.is_some()),
            ("schedule", draft.schedule.is_some()),
        ];
        if let Some((f, _)) = given.iter().find(|(_, g)| *g) {
            return Err(invalid(
                f,
                format!("FLUX runs its flow-matching Euler schedule: omit `{f}`"),
            ));
        }
        // The value only fills the job record.
        return Ok((SamplerKind::Euler, Schedule::Model));
    }
    let (kind, named_schedule) = match name {
        None => {
            let kind = spec.default_sampler.clone().map_err(|e| {
                invalid(
                    field,
                    format!("is required: the model's own scheduler cannot be used ({e})"),
                )
            })?;
            (kind, None)
        }
        Some(s) => SamplerKind::parse(s).map_err(|e| invalid(field, model_message(e)))?,
    };
    let schedule = match (&draft.schedule, named_schedule) {
        (None, named) => named.unwrap_or_default(),
        (Some(s), named) => {
            let given =
                Schedule::from_name(s).map_err(|e| invalid("schedule", model_message(e)))?;
            // `model` / `default` with a combined name leaves the name's schedule.
            if let (Schedule::Model, Some(n)) = (given, named) {
                return finish_sampler(kind, n);
            }
            if named.is_some_and(|n| n != given) {
                return Err(invalid(
                    "schedule",
                    format!(
                        "{s:?} contradicts the schedule in {field} {:?}",
                        name.unwrap_or_default()
                    ),
                ));
            }
            given
        }
    };
    finish_sampler(kind, schedule)
}

/// The pair, if the reference defines it.
fn finish_sampler(kind: SamplerKind, schedule: Schedule) -> Result<(SamplerKind, Schedule)> {
    sd_models::samplers::check_combination(kind, schedule)
        .map_err(|e| invalid("schedule", model_message(e)))?;
    Ok((kind, schedule))
}

/// `eta`: for the samplers whose step takes it (DDIM, TCD), in the models crate's range;
/// refused for the others, whose diffusers classes have none. Default 0, as the pipelines.
fn eta(spec: &ModelSpec, sampler: SamplerKind, given: Option<f64>) -> Result<f64> {
    let Some(eta) = given else {
        return Ok(0.0);
    };
    step_option(
        spec,
        ("eta", eta),
        sampler.takes_eta(),
        sampler,
        "ddim and tcd",
    )?;
    sd_models::samplers::check_eta(eta).map_err(|e| invalid("eta", model_message(e)))?;
    Ok(eta)
}

/// `s_noise`: for the samplers whose step takes it (DPM++ SDE, DPM++ 2S a), in the models
/// crate's range. Default 1.
fn s_noise(spec: &ModelSpec, sampler: SamplerKind, given: Option<f64>) -> Result<f64> {
    let Some(s) = given else {
        return Ok(1.0);
    };
    let takes = sampler.takes_s_noise();
    step_option(
        spec,
        ("s_noise", s),
        takes,
        sampler,
        "dpmpp-sde and dpmpp-2s-a",
    )?;
    sd_models::samplers::check_s_noise(s).map_err(|e| invalid("s_noise", model_message(e)))
}

/// Refuses a sampler option (`eta`, `s_noise`) given to a model or sampler without it.
fn step_option(
    spec: &ModelSpec,
    (field, value): (&str, f64),
    takes: bool,
    sampler: SamplerKind,
    which: &str,
) -> Result<()> {
    if spec.flux {
        return Err(invalid(
            field,
            format!(
                "FLUX runs its flow-matching Euler schedule, which has no {field}: omit it \
                 (got {value})"
            ),
        ));
    }
    if !takes {
        return Err(invalid(
            field,
            format!(
                "sampler {} takes no {field} (only {which} do), got {value}",
                sampler.name()
            ),
        ));
    }
    Ok(())
}

/// The message of a models-crate error, without its field prefix.
fn model_message(e: sd_models::Error) -> String {
    match e {
        sd_models::Error::Invalid { message, .. } => message,
        other => other.to_string(),
    }
}

/// What the sampler itself refuses (e.g. PNDM with PRK warm-up needs 4 steps) is refused
/// here, not after queueing.
fn check_sampler_steps(
    spec: &ModelSpec,
    sampler: SamplerKind,
    schedule: Schedule,
    steps: usize,
) -> Result<()> {
    if spec.flux {
        // FLUX sizes were checked against twice the VAE factor (its latent_factor here).
        return Ok(());
    }
    let cfg = spec.scheduler.for_pipeline(false);
    match sd_models::samplers::build_sampler(sampler, schedule, &cfg, steps) {
        Ok(_) => Ok(()),
        Err(sd_models::Error::Invalid { field, message }) => Err(invalid(
            if field == "steps" { "steps" } else { "sampler" },
            format!(
                "{message} (sampler {}, schedule {schedule})",
                sampler.name()
            ),
        )),
        Err(other) => Err(invalid(
            "sampler",
            format!(
                "{} on schedule {schedule} cannot run with this model's scheduler config: {other}",
                sampler.name()
            ),
        )),
    }
}

/// Default steps raised, when they are too few to run one step at `strength` (turbo models
/// default to 1 step), to the fewest that run one: int(steps x strength) >= 1.
fn steps_for_strength(steps: usize, strength: f64, spec: &ModelSpec, limits: &Limits) -> usize {
    if spec.flux || !(strength > 0.0 && strength <= 1.0) {
        return steps;
    }
    let cap = limits.max_steps.min(spec.num_train_timesteps);
    let mut n = steps;
    while n < cap && ((n as f64) * strength) < 1.0 {
        n += 1;
    }
    n
}

fn check_strength(spec: &ModelSpec, steps: usize, strength: f64) -> Result<()> {
    let start = if spec.flux {
        sd_models::pipelines::flux::FluxCore::img2img_start(steps, strength)
    } else {
        SdPipeline::img2img_start(steps, strength)
    };
    start
        .map(drop)
        .map_err(|e| invalid("strength", model_message(e)))
}

/// The job's LoRAs, resolved (and required to exist, and to be safetensors by their header)
/// inside the worker's LoRA folder; the files are read when the job runs.
fn loras(list: Vec<LoraDraft>, limits: &Limits) -> Result<Vec<LoraSpec>> {
    if list.is_empty() {
        return Ok(Vec::new());
    }
    if limits.loras == LoraFiles::Refused {
        return Err(invalid(
            "loras",
            "this worker takes no LoRAs (start it with --lora-dir DIR)",
        ));
    }
    if list.len() > MAX_LORAS {
        return Err(invalid(
            "loras",
            format!("at most {MAX_LORAS} LoRAs per job, got {}", list.len()),
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, entry) in list.into_iter().enumerate() {
        let field = |f: &str| format!("loras[{i}].{f}");
        let n = entry.path.chars().count();
        if n > MAX_LORA_PATH_CHARS {
            return Err(invalid(
                &field("path"),
                format!("must be at most {MAX_LORA_PATH_CHARS} characters, got {n}"),
            ));
        }
        let max = sd_models::lora::MAX_STRENGTH;
        let strength = entry.strength.unwrap_or(1.0);
        if !strength.is_finite() || strength.abs() > max {
            return Err(invalid(
                &field("strength"),
                format!("must be a number between -{max} and {max}, got {strength}"),
            ));
        }
        let (name, path) = match &limits.loras {
            LoraFiles::InFolder(dir) => {
                let resolved = sd_models::lora::resolve(dir, &entry.path)
                    .map_err(|e| invalid(&field("path"), model_message(e)))?;
                (entry.path, resolved)
            }
            _ => {
                let path = PathBuf::from(&entry.path);
                if !path.is_file() {
                    return Err(invalid(
                        &field("path"),
                        format!("{} is not a file", entry.path),
                    ));
                }
                let file = path
                    .file_name()
                    .map_or_else(|| entry.path.clone(), |n| n.to_string_lossy().into_owned());
                (file, path)
            }
        };
        sd_models::lora::check_file(&format!("{name:?}"), &path)
            .map_err(|e| invalid(&field("path"), model_message(e)))?;
        out.push(LoraSpec {
            name,
            path,
            strength,
            strict: entry.strict.unwrap_or(true),
        });
    }
    Ok(out)
}
