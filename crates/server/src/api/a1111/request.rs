//! Reading `POST /sdapi/v1/txt2img` and `/img2img` bodies (A1111 1.10's request models) into
//! the engine's [`RequestDraft`]. A1111 clients send most fields at their defaults every time,
//! so each field has a rule: used (mapped to the draft), taken at any value because A1111
//! itself does not use it in that case (e.g. `hr_*` without `enable_hr`, `s_tmin`, which acts
//! only with churn), or taken only at the value that asks for what this worker does; any
//! other value, and any field A1111 does not have, gets a 422 naming the field. The table is in
//! the README.

use serde_json::{Map, Value};

use sd_engine::request::{ImageBytes, LoraDraft, MaskRule, Operation, PromptSyntax, RequestDraft};
use sd_engine::validate::MAX_SIDE;
use sd_models::samplers::{SamplerKind, Schedule};

use super::error::A1111Error;

type Result<T> = std::result::Result<T, A1111Error>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Txt2Img,
    Img2Img,
}

/// The fields both endpoints take.
const COMMON: [&str; 42] = [
    "prompt",
    "negative_prompt",
    "styles",
    "seed",
    "subseed",
    "subseed_strength",
    "seed_resize_from_h",
    "seed_resize_from_w",
    "sampler_name",
    "scheduler",
    "batch_size",
    "n_iter",
    "steps",
    "cfg_scale",
    "width",
    "height",
    "restore_faces",
    "tiling",
    "do_not_save_samples",
    "do_not_save_grid",
    "eta",
    "s_min_uncond",
    "s_churn",
    "s_tmax",
    "s_tmin",
    "s_noise",
    "override_settings",
    "override_settings_restore_afterwards",
    "refiner_checkpoint",
    "refiner_switch_at",
    "disable_extra_networks",
    "firstpass_image",
    "comments",
    "force_task_id",
    "sampler_index",
    "script_name",
    "script_args",
    "send_images",
    "save_images",
    "alwayson_scripts",
    "infotext",
    "denoising_strength",
];
const TXT2IMG: [&str; 13] = [
    "enable_hr",
    "firstphase_width",
    "firstphase_height",
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_resize_x",
    "hr_resize_y",
    "hr_checkpoint_name",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
];
const IMG2IMG: [&str; 15] = [
    "init_images",
    "resize_mode",
    "image_cfg_scale",
    "mask",
    "mask_blur_x",
    "mask_blur_y",
    "mask_blur",
    "mask_round",
    "inpainting_fill",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "inpainting_mask_invert",
    "initial_noise_multiplier",
    "latent_mask",
    "include_init_images",
];
/// A1111's defaults for what the request leaves out.
pub const DEFAULT_STEPS: u64 = 50;
pub const DEFAULT_CFG: f64 = 7.0;
pub const DEFAULT_SIZE: u64 = 512;
pub const DEFAULT_SAMPLER: &str = "Euler";
pub const DEFAULT_IMG2IMG_STRENGTH: f64 = 0.75;
/// Steps between the live previews `/progress` shows.
pub const PREVIEW_EVERY: u64 = 10;

/// A request read: the draft of its first image (each image `i` runs with seed `seed + i`).
#[derive(Debug)]
pub struct Txt2Img {
    pub draft: RequestDraft,
    /// None: random.
    pub seed: Option<u64>,
    /// `batch_size` x `n_iter` images.
    pub images: usize,
    pub batch_size: usize,
    pub send_images: bool,
    /// A1111's name of the sampler and the schedule label.
    pub sampler_name: &'static str,
    pub schedule: &'static str,
    /// The `parameters` echo: the request as sent.
    pub echo: Map<String, Value>,
}

fn invalid(field: &str, message: impl std::fmt::Display) -> A1111Error {
    A1111Error::field(field, format!("invalid `{field}`: {message}"))
}

fn describe(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

struct Body<'a>(&'a Map<String, Value>);

impl Body<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn text(&self, name: &str) -> Result<Option<String>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(invalid(
                name,
                format!("must be a string, got {}", describe(v)),
            )),
        }
    }

    fn int(&self, name: &str) -> Result<Option<i64>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
                .map(Some)
                .ok_or_else(|| invalid(name, format!("must be an integer, got {}", describe(v)))),
        }
    }

    fn uint(&self, name: &str) -> Result<Option<u64>> {
        match self.int(name)? {
            None => Ok(None),
            Some(i) if i >= 0 => Ok(Some(i as u64)),
            Some(i) => Err(invalid(name, format!("must not be negative, got {i}"))),
        }
    }

    fn number(&self, name: &str) -> Result<Option<f64>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| invalid(name, format!("must be a number, got {}", describe(v)))),
        }
    }

    fn boolean(&self, name: &str) -> Result<Option<bool>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            // pydantic reads 0 / 1 as booleans; so do we.
            Some(v) if v.as_i64() == Some(0) => Ok(Some(false)),
            Some(v) if v.as_i64() == Some(1) => Ok(Some(true)),
            Some(v) => Err(invalid(
                name,
                format!("must be true or false, got {}", describe(v)),
            )),
        }
    }

    /// A field taken only when absent, null or `ok`; `why` says what other values would ask.
    fn only(&self, name: &str, ok: impl Fn(&Value) -> bool, why: &str) -> Result<()> {
        match self.get(name) {
            Some(v) if !ok(v) => Err(invalid(name, format!("{} {why}", describe(v)))),
            _ => Ok(()),
        }
    }
}

fn is_false(v: &Value) -> bool {
    v == &Value::Bool(false) || v.as_i64() == Some(0)
}

fn is_zero(v: &Value) -> bool {
    v.as_f64() == Some(0.0)
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// The sampler and the schedule, as A1111 resolves `sampler_name` (or the deprecated
/// `sampler_index`) and `scheduler`: a name may end in a schedule label ("DPM++ 2M Karras");
/// "Automatic" is the sampler's own schedule in A1111 1.10 ([`a1111_automatic`]).
fn sampler(body: &Body) -> Result<(SamplerKind, Schedule)> {
    let (field, name) = match body.text("sampler_name")?.filter(|s| !s.is_empty()) {
        Some(n) => ("sampler_name", n),
        None => match body.text("sampler_index")?.filter(|s| !s.is_empty()) {
            Some(n) => ("sampler_index", n),
            None => ("sampler_name", DEFAULT_SAMPLER.to_string()),
        },
    };
    let (kind, named) = SamplerKind::parse(&name).map_err(|_| {
        let names: Vec<&str> = SamplerKind::all().map(|s| s.a1111_name()).collect();
        invalid(
            field,
            format!(
                "{name:?} is not a sampler here; these are: {}",
                names.join(", ")
            ),
        )
    })?;
    let given = body.text("scheduler")?.unwrap_or_default();
    let schedule = Schedule::from_name(&given).map_err(|_| {
        let names: Vec<&str> = Schedule::ALL.iter().map(|s| s.a1111_name()).collect();
        invalid(
            "scheduler",
            format!(
                "{given:?} is not a schedule here; these are: {}",
                names.join(", ")
            ),
        )
    })?;
    // (Whether the sampler takes the schedule is the engine's check, as for every API.)
    let schedule = match (named, schedule) {
        (Some(n), Schedule::Model) => n,
        (None, Schedule::Model) => a1111_automatic(kind),
        (Some(n), s) if n != s => {
            return Err(invalid(
                "scheduler",
                format!(
                    "{given:?} contradicts the schedule in {field} {name:?}; give one of the two"
                ),
            ))
        }
        (_, s) => s,
    };
    Ok((kind, schedule))
}

/// A1111's `s_noise` and `s_churn` as the engine takes them: DPM++ SDE's and DPM++ 2S a's
/// `s_noise`; the other ancestral samplers, where A1111 would scale its noise, run with 1
/// and refuse another value; churn (A1111's Euler, Heun and DPM2 with `s_churn` > 0) is not
/// done here, and without it their `s_noise`, `s_tmin` and `s_tmax` change nothing.
fn a1111_s_noise(kind: SamplerKind, body: &Body) -> Result<Option<f64>> {
    if let Some(c) = body.number("s_churn")?.filter(|c| *c != 0.0) {
        return Err(invalid(
            "s_churn",
            format!("must be 0 here (no churn: the samplers follow diffusers' pipelines), got {c}"),
        ));
    }
    let s_noise = body.number("s_noise")?;
    match (kind, s_noise) {
        (_, None) => Ok(None),
        (SamplerKind::DpmPpSde | SamplerKind::DpmPp2sAncestral, Some(s)) => Ok(Some(s)),
        (
            SamplerKind::EulerAncestral
            | SamplerKind::Dpm2Ancestral
            | SamplerKind::DpmPp2mSde
            | SamplerKind::DpmPp3mSde,
            Some(s),
        ) if s != 1.0 => Err(invalid(
            "s_noise",
            format!("{} runs with s_noise 1 here, got {s}", kind.a1111_name()),
        )),
        _ => Ok(None),
    }
}

/// A1111's `eta` as the engine takes it: DDIM's and TCD's own; the ancestral and SDE
/// samplers run diffusers' full noise (A1111's eta 1) and refuse another value; the others
/// have no eta, and A1111 does not read it for them either.
fn a1111_eta(kind: SamplerKind, eta: Option<f64>) -> Result<Option<f64>> {
    match (kind, eta) {
        (_, None) => Ok(None),
        (SamplerKind::Ddim | SamplerKind::Tcd, Some(e)) => Ok(Some(e)),
        (
            SamplerKind::EulerAncestral
            | SamplerKind::Dpm2Ancestral
            | SamplerKind::DpmPp2mSde
            | SamplerKind::DpmPp3mSde
            | SamplerKind::DpmPpSde
            | SamplerKind::DpmPp2sAncestral,
            Some(e),
        ) if e != 1.0 => Err(invalid(
            "eta",
            format!("{} runs with eta 1 here, got {e}", kind.a1111_name()),
        )),
        _ => Ok(None),
    }
}

/// The schedule A1111 1.10 runs a sampler on under "Automatic" (its sampler table's
/// `scheduler` option): Karras for DPM++ 2M, DPM++ SDE, DPM++ 2S a, DPM2 and DPM2 a,
/// exponential for DPM++ 2M SDE and 3M SDE, the model's own otherwise.
pub fn a1111_automatic(kind: SamplerKind) -> Schedule {
    match kind {
        SamplerKind::DpmPp2m
        | SamplerKind::DpmPpSde
        | SamplerKind::DpmPp2sAncestral
        | SamplerKind::Dpm2
        | SamplerKind::Dpm2Ancestral => Schedule::Karras,
        SamplerKind::DpmPp2mSde | SamplerKind::DpmPp3mSde => Schedule::Exponential,
        _ => Schedule::Model,
    }
}

/// The base64 text of an image field, as bytes.
fn image_bytes(field: &str, v: &Value) -> Result<Vec<u8>> {
    match v {
        Value::String(s) => {
            sd_engine::images::input::decode_base64(s).map_err(|e| invalid(field, e))
        }
        other => Err(invalid(
            field,
            format!("must be a base64 image, got {}", describe(other)),
        )),
    }
}

/// Fields that ask for A1111 features this worker does not have.
fn refuse_features(body: &Body, mode: Mode) -> Result<()> {
    body.only(
        "restore_faces",
        is_false,
        "asks for face restoration, which this worker does not do",
    )?;
    body.only(
        "tiling",
        is_false,
        "asks for tileable output, which this worker does not make",
    )?;
    body.only(
        "subseed_strength",
        is_zero,
        "asks for variation seeds, which this worker does not mix",
    )?;
    body.only(
        "seed_resize_from_h",
        |v| v.as_f64().is_some_and(|f| f <= 0.0),
        "asks for seed resizing, which this worker does not do",
    )?;
    body.only(
        "seed_resize_from_w",
        |v| v.as_f64().is_some_and(|f| f <= 0.0),
        "asks for seed resizing, which this worker does not do",
    )?;
    body.only(
        "styles",
        is_empty,
        "names saved prompt styles; this worker has none",
    )?;
    body.only(
        "s_min_uncond",
        is_zero,
        "asks for skipping the negative prompt at low sigmas, which this worker does not do",
    )?;
    body.only(
        "refiner_checkpoint",
        |v| is_empty(v) || v.as_str() == Some("None"),
        "asks for a refiner model; this worker runs one model",
    )?;
    body.only(
        "firstpass_image",
        |_| false,
        "is not taken (A1111 does not decode it either)",
    )?;
    body.only(
        "script_name",
        |v| is_empty(v) || v.as_str() == Some("None"),
        "asks for a script; this worker runs none",
    )?;
    body.only(
        "alwayson_scripts",
        is_empty,
        "asks for extension scripts; this worker runs none",
    )?;
    body.only(
        "save_images",
        is_false,
        "asks to save files on the worker; it saves none (the images are in the answer)",
    )?;
    body.only(
        "infotext",
        is_empty,
        "asks to fill fields from an infotext, which this worker does not parse into requests",
    )?;
    if mode == Mode::Txt2Img {
        body.only(
            "enable_hr",
            is_false,
            "asks for hires fix (a second pass), which this worker does not run",
        )?;
        body.only(
            "firstphase_width",
            is_zero,
            "asks for hires fix, which this worker does not run",
        )?;
        body.only(
            "firstphase_height",
            is_zero,
            "asks for hires fix, which this worker does not run",
        )?;
    }
    Ok(())
}

/// `override_settings`: only the settings that already hold here.
fn override_settings(body: &Body, spec: &sd_engine::ModelSpec) -> Result<()> {
    let Some(v) = body.get("override_settings") else {
        return Ok(());
    };
    let Value::Object(settings) = v else {
        return Err(invalid(
            "override_settings",
            format!("must be an object, got {}", describe(v)),
        ));
    };
    for (key, value) in settings {
        let field = format!("override_settings.{key}");
        let ok = match key.as_str() {
            "sd_model_checkpoint" => value
                .as_str()
                .is_some_and(|m| sd_engine::validate::names_model(spec, m)),
            "CLIP_stop_at_last_layers" => value.as_i64() == Some(1),
            "sd_vae" => matches!(value.as_str(), Some("Automatic" | "None")),
            "samples_format" => value.as_str() == Some("png"),
            "eta_noise_seed_delta" => value.as_i64() == Some(0),
            _ => {
                return Err(invalid(
                    &field,
                    "is not a setting this worker has: sd_model_checkpoint (the loaded model), CLIP_stop_at_last_layers (1), sd_vae (Automatic), samples_format (png), eta_noise_seed_delta (0)",
                ))
            }
        };
        if !ok {
            return Err(invalid(
                &field,
                format!(
                    "{} is not what this worker runs (see GET /sdapi/v1/options)",
                    describe(value)
                ),
            ));
        }
    }
    Ok(())
}

/// What img2img adds: the init image, and for inpainting the mask with the A1111 settings
/// that give diffusers' inpainting (no blur, original content, whole picture).
fn img2img(body: &Body, draft: &mut RequestDraft) -> Result<()> {
    let images = match body.get("init_images") {
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(invalid(
                "init_images",
                format!("must be a list of base64 images, got {}", describe(v)),
            ))
        }
        None => {
            return Err(invalid(
                "init_images",
                "is required: a list with one base64 image",
            ))
        }
    };
    match images.len() {
        1 => {}
        0 => {
            return Err(invalid(
                "init_images",
                "is empty: one base64 image is required",
            ))
        }
        n => {
            return Err(invalid(
                "init_images",
                format!("takes one image here, got {n}"),
            ))
        }
    }
    draft.init_image = Some(ImageBytes {
        field: "init_images[0]".into(),
        bytes: image_bytes("init_images[0]", &images[0])?,
    });
    body.only(
        "resize_mode",
        is_zero,
        "asks for a resize other than \"Just resize\" (0), the one this worker does",
    )?;
    body.only(
        "initial_noise_multiplier",
        |v| v.as_f64() == Some(1.0),
        "asks to scale the initial noise; this worker uses 1",
    )?;
    body.only(
        "latent_mask",
        |_| false,
        "is not taken (A1111 does not decode it either)",
    )?;
    draft.strength = Some(
        body.number("denoising_strength")?
            .unwrap_or(DEFAULT_IMG2IMG_STRENGTH),
    );
    let Some(mask) = body.get("mask") else {
        return Ok(());
    };
    let bytes = image_bytes("mask", mask)?;
    let transparent =
        sd_engine::images::input::has_transparency(&bytes, MAX_SIDE * MAX_SIDE, MAX_SIDE)
            .map_err(|e| invalid("mask", e))?;
    if transparent {
        return Err(invalid(
            "mask",
            "has transparency; send an opaque mask (white = repaint)",
        ));
    }
    let blur_ok = match body.int("mask_blur")? {
        Some(b) => b == 0,
        // A1111 blurs by mask_blur_x / _y (default 4) when mask_blur is left out.
        None => body.int("mask_blur_x")? == Some(0) && body.int("mask_blur_y")? == Some(0),
    };
    if !blur_ok {
        return Err(invalid(
            "mask_blur",
            "must be 0: this worker inpaints as diffusers does, with the mask as given (A1111 blurs it by 4 px unless told otherwise)",
        ));
    }
    if body.int("inpainting_fill")? != Some(1) {
        return Err(invalid(
            "inpainting_fill",
            "must be 1 (\"original\"): this worker starts the masked area from the noised image, as diffusers does",
        ));
    }
    if body.boolean("inpaint_full_res")? != Some(false) {
        return Err(invalid(
            "inpaint_full_res",
            "must be false (\"Whole picture\"): this worker inpaints the whole image, not a crop around the mask",
        ));
    }
    body.only(
        "mask_round",
        |v| v == &Value::Bool(true),
        "asks for an unrounded latent mask; this worker binarises it",
    )?;
    draft.mask_rule = match body.int("inpainting_mask_invert")? {
        None | Some(0) => MaskRule::White,
        Some(1) => MaskRule::Black,
        Some(n) => {
            return Err(invalid(
                "inpainting_mask_invert",
                format!("must be 0 or 1, got {n}"),
            ))
        }
    };
    draft.operation = Operation::Inpaint;
    draft.mask_image = Some(ImageBytes {
        field: "mask".into(),
        bytes,
    });
    Ok(())
}

/// The extra-network tags of a prompt, as A1111 reads them (`<NAME:ARG:ARG...>`, removed from
/// the text): `<lora:FILE>` and `<lora:FILE:WEIGHT>` (also `lyco`) become LoRAs of the job,
/// resolved in `--lora-dir`; `<lora:FILE:TE:UNET>` with two different weights, and any other
/// network kind, are refused.
fn extra_networks(prompt: &str) -> Result<(String, Vec<LoraDraft>)> {
    let mut text = String::with_capacity(prompt.len());
    let mut loras = Vec::new();
    let mut rest = prompt;
    while let Some(open) = rest.find('<') {
        let after = &rest[open + 1..];
        let kind_len = after
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let tag = (kind_len > 0 && after[kind_len..].starts_with(':'))
            .then(|| after[kind_len + 1..].find('>').map(|end| (kind_len, end)))
            .flatten();
        let Some((kind_len, end)) =
            tag.filter(|(k, e)| *e > 0 && !after[k + 1..k + 1 + e].contains('<'))
        else {
            text.push_str(&rest[..open + 1]);
            rest = after;
            continue;
        };
        let kind = &after[..kind_len];
        let args: Vec<&str> = after[kind_len + 1..kind_len + 1 + end].split(':').collect();
        text.push_str(&rest[..open]);
        rest = &after[kind_len + 1 + end + 1..];
        if !matches!(kind, "lora" | "lyco") {
            return Err(invalid(
                "prompt",
                format!("<{kind}:...> is not an extra network this worker has (it applies <lora:FILE:WEIGHT>)"),
            ));
        }
        let weight = |i: usize| -> Result<Option<f64>> {
            match args.get(i).map(|a| a.trim()) {
                None | Some("") => Ok(None),
                Some(a) => a.parse().map(Some).map_err(|_| {
                    invalid(
                        "prompt",
                        format!("<{kind}:{}>: {a:?} is not a weight", args.join(":")),
                    )
                }),
            }
        };
        let te = weight(1)?;
        let unet = weight(2)?;
        if let (Some(t), Some(u)) = (te, unet) {
            if t != u {
                return Err(invalid(
                    "prompt",
                    format!("<{kind}:{}>: separate text-encoder and UNet weights ({t} and {u}) are not applied here; give one weight", args.join(":")),
                ));
            }
        }
        loras.push(LoraDraft {
            path: args[0].trim().to_string(),
            strength: Some(te.unwrap_or(1.0)),
            strict: Some(true),
        });
    }
    text.push_str(rest);
    Ok((text, loras))
}

/// Reads a txt2img or img2img body.
pub fn read(
    value: Value,
    mode: Mode,
    spec: &sd_engine::ModelSpec,
    max_images: usize,
) -> Result<Txt2Img> {
    let Value::Object(obj) = value else {
        return Err(A1111Error::new(
            super::error::Kind::Json,
            "the body must be a JSON object",
        ));
    };
    let body = Body(&obj);
    let extra: &[&str] = match mode {
        Mode::Txt2Img => &TXT2IMG,
        Mode::Img2Img => &IMG2IMG,
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !COMMON.contains(&k.as_str()) && !extra.contains(&k.as_str()))
    {
        return Err(invalid(k, "is not a field of this endpoint in A1111 1.10 (or one this worker takes); it would be ignored, so it is refused"));
    }
    refuse_features(&body, mode)?;
    override_settings(&body, spec)?;
    let (kind, schedule) = sampler(&body)?;
    let eta = a1111_eta(kind, body.number("eta")?)?;
    let s_noise = a1111_s_noise(kind, &body)?;
    let batch_size = body.uint("batch_size")?.unwrap_or(1);
    let n_iter = body.uint("n_iter")?.unwrap_or(1);
    if batch_size == 0 || n_iter == 0 {
        let f = if batch_size == 0 {
            "batch_size"
        } else {
            "n_iter"
        };
        return Err(invalid(f, "must be at least 1"));
    }
    let images = batch_size.saturating_mul(n_iter);
    if images > max_images as u64 {
        return Err(invalid(
            "batch_size",
            format!("batch_size x n_iter = {images} images is over this worker's {max_images} per request (--max-batch)"),
        ));
    }
    let seed = match body.int("seed")? {
        None | Some(-1) => None,
        Some(s) if s >= 0 => Some(s as u64),
        Some(s) => {
            return Err(invalid(
                "seed",
                format!("must be -1 (random) or a non-negative integer, got {s}"),
            ))
        }
    };
    let (prompt, loras) = extra_networks(&body.text("prompt")?.unwrap_or_default())?;
    let loras = if body.boolean("disable_extra_networks")? == Some(true) {
        Vec::new()
    } else {
        loras
    };
    let operation = match mode {
        Mode::Txt2Img => Operation::Generation,
        Mode::Img2Img => Operation::Transform,
    };
    let mut draft = RequestDraft::new(operation);
    draft.prompt = Some(prompt);
    draft.prompt_syntax = PromptSyntax::A1111;
    draft.loras = loras;
    draft.negative_prompt = body.text("negative_prompt")?.filter(|n| !n.is_empty());
    draft.width = Some(body.uint("width")?.unwrap_or(DEFAULT_SIZE));
    draft.height = Some(body.uint("height")?.unwrap_or(DEFAULT_SIZE));
    draft.steps = Some(body.uint("steps")?.unwrap_or(DEFAULT_STEPS));
    draft.guidance_scale = Some(body.number("cfg_scale")?.unwrap_or(DEFAULT_CFG));
    // FLUX runs its own flow-matching Euler, which A1111's "Euler" stands for; another
    // choice reaches the engine, which refuses it naming the field.
    if !(spec.flux && kind == SamplerKind::Euler && schedule == Schedule::Model) {
        draft.sampler = Some(kind.name().to_string());
        draft.schedule = Some(schedule.name().to_string());
    }
    draft.eta = eta;
    draft.s_noise = s_noise;
    draft.batch = Some(1);
    // Live previews for `/progress`, every 10 steps as A1111's default
    // `show_progress_every_n_steps` (the cheap latent-to-RGB map).
    draft.preview_every = Some(PREVIEW_EVERY);
    if mode == Mode::Img2Img {
        img2img(&body, &mut draft)?;
    }
    let send_images = body.boolean("send_images")?.unwrap_or(true);
    let mut echo = obj.clone();
    if mode == Mode::Img2Img && body.boolean("include_init_images")? != Some(true) {
        echo.insert("init_images".into(), Value::Null);
        echo.insert("mask".into(), Value::Null);
    }
    Ok(Txt2Img {
        draft,
        seed,
        images: images as usize,
        batch_size: batch_size as usize,
        send_images,
        sampler_name: kind.a1111_name(),
        schedule: schedule.a1111_label(),
        echo,
    })
}

/// The A1111 field an engine field came from.
pub fn field_of(engine_field: &str) -> &str {
    match engine_field {
        "guidance_scale" => "cfg_scale",
        "sampler" | "scheduler" => "sampler_name",
        "schedule" => "scheduler",
        "strength" => "denoising_strength",
        "batch" => "batch_size",
        "init_image" | "input_image" => "init_images",
        "mask_image" => "mask",
        "operation" => "mask",
        f if f.starts_with("loras") => "prompt",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzz harness (`sd-fuzz`): any body ends in a request or an error, never a panic.
    #[test]
    fn fuzz_a1111_request() {
        let api: &[&[u8]] = &[
            b"\"init_images\":",
            b"\"mask\":",
            b"\"sampler_name\":",
            b"\"scheduler\":",
            b"\"batch_size\":",
            b"\"n_iter\":",
            b"\"override_settings\":",
            b"<lora:",
            b":0.5>",
        ];
        let words = [api, sd_fuzz::JSON_WORDS].concat();
        let spec = sd_engine::ModelSpec::sd_example();
        let limits = crate::api::tests::served_limits();
        sd_fuzz::fuzz(
            "a1111-request",
            &sd_fuzz::seeds("a1111-request"),
            &words,
            |bytes| {
                let Ok(v) = crate::json::parse(bytes) else {
                    return;
                };
                for mode in [Mode::Txt2Img, Mode::Img2Img] {
                    if let Ok(req) = read(v.clone(), mode, &spec, 8) {
                        let _ = sd_engine::validate(req.draft, &spec, &limits, 1);
                    }
                }
            },
        );
    }

    #[test]
    fn extra_network_tags_become_loras() {
        let (text, loras) =
            extra_networks("a cat <lora:style:0.8>, <lyco:sub/other> night").unwrap();
        assert_eq!(
            text, "a cat ,  night",
            "only the tags leave, as A1111 removes them"
        );
        let got: Vec<(String, Option<f64>)> =
            loras.iter().map(|l| (l.path.clone(), l.strength)).collect();
        assert_eq!(
            got,
            vec![("style".into(), Some(0.8)), ("sub/other".into(), Some(1.0))]
        );
        let (text, loras) = extra_networks("a <b> and x<y").unwrap();
        assert_eq!((text.as_str(), loras.len()), ("a <b> and x<y", 0));
        let (_, loras) = extra_networks("<lora:a:0.5:0.5>").unwrap();
        assert_eq!(loras[0].strength, Some(0.5));
        for bad in ["<lora:a:0.5:1>", "<hypernet:h:1>", "<lora:a:heavy>"] {
            let e = extra_networks(bad).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("prompt"), "{bad}");
        }
    }
}
