//! Routes about the worker itself: liveness, readiness, what it serves and its limits, and the
//! Prometheus metrics.

use sd_models::samplers::{SamplerKind, Schedule};
use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use sd_engine::jobs::Phase;
use sd_engine::validate::{
    self, default_strength, LoraFiles, MAX_GUIDANCE, MAX_LORAS, MAX_SIDE, MAX_TEXT_CHARS,
};
use sd_engine::{ModelSpec, Operation, PreviewKind};
use serde::Serialize;
use utoipa::ToSchema;

use super::{unavailable, ApiError, AppState, ErrorBody, Shared};

#[derive(Serialize, ToSchema)]
pub(super) struct Health {
    /// Always `ok`.
    status: &'static str,
}

/// 200 while the process lives (no auth).
#[utoipa::path(get, path = "/health", tag = "worker", security(()),
    responses((status = 200, description = "Alive.", body = Health)))]
pub(super) async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[derive(Serialize, ToSchema)]
pub(super) struct Readiness {
    ready: bool,
    /// When not ready: `loading`, `draining` or `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    /// When the model failed to load: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

/// 200 once the model is loaded; 503 with the reason otherwise (no auth).
#[utoipa::path(get, path = "/ready", tag = "worker", security(()),
    responses(
        (status = 200, description = "Ready.", body = Readiness),
        (status = 503, description = "Not ready: loading, draining or failed.", body = Readiness),
    ))]
pub(super) async fn ready(State(st): State<Shared>) -> Response {
    let (reason, message) = match st.engine.phase() {
        Phase::Ready => {
            let ready = Readiness {
                ready: true,
                reason: None,
                message: None,
            };
            return Json(ready).into_response();
        }
        Phase::Loading => ("loading", None),
        Phase::Draining => ("draining", None),
        Phase::Failed(m) => ("failed", Some(m)),
    };
    let body = Readiness {
        ready: false,
        reason: Some(reason),
        message,
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

/// What `GET /v1/info` says about the worker.
#[derive(Serialize, ToSchema)]
pub(super) struct Info {
    version: &'static str,
    model: ModelInfo,
    device: String,
    dtype: String,
    /// The CPU kernels this machine runs (used when `device` is `cpu`).
    cpu_kernels: CpuKernelsInfo,
    defaults: Defaults,
    limits: LimitsInfo,
    /// The `sampler` values jobs may name (GET /v1/samplers has their aliases).
    schedulers: Vec<&'static str>,
    /// The `schedule` values jobs may name (GET /v1/schedules).
    schedules: Vec<&'static str>,
    capabilities: Capabilities,
}

#[derive(Serialize, ToSchema)]
pub(super) struct ModelInfo {
    name: String,
    path: String,
    /// `org/name` when the model is a snapshot in a Hugging Face cache.
    repo_id: Option<String>,
    /// `sd1`, `sd2`, `sdxl` or `flux`.
    family: String,
    /// `base`, `inpaint` (an inpainting UNet) or `turbo` for Stable Diffusion and SDXL; `dev`
    /// or `schnell` for FLUX.
    variant: String,
    /// `epsilon` or `v_prediction`; `dev` / `schnell` for FLUX.
    prediction_type: String,
    pipeline_class: String,
    /// Image sides are multiples of this.
    latent_factor: usize,
}

/// The values omitted fields take.
#[derive(Serialize, ToSchema)]
pub(super) struct Defaults {
    width: usize,
    height: usize,
    steps: usize,
    guidance_scale: f64,
    max_sequence_length: Option<usize>,
    scheduler: Option<&'static str>,
    batch: usize,
    preview_every: usize,
    preview: PreviewKind,
    /// Default strength of each image-to-image operation the model runs.
    strength: BTreeMap<&'static str, f64>,
}

/// `sd_models::modules::cpu::CpuKernels` in the OpenAPI document.
#[derive(Serialize, ToSchema)]
pub(super) struct CpuKernelsInfo {
    /// The x86 features the kernels look for that this CPU has.
    features: Vec<&'static str>,
    /// `avx512f`, `avx2+fma` or `scalar`: softmax, SiLU and GELU.
    elementwise: &'static str,
    /// How 3x3 convolutions run.
    convolution: &'static str,
    /// The f32 GEMM under matmul and convolution.
    gemm: &'static str,
    /// The products of linear layers, attention and 1x1 convolutions: `f32` (`f32, text
    /// encoders on avx512f panels` where the CPU has AVX-512F), or with `--dtype bf16`
    /// `bf16 avx512bf16` or `bf16 rounded, f32 gemm` (no AVX512-BF16).
    products: &'static str,
    /// Threads the kernels share.
    threads: usize,
}

impl From<sd_models::modules::cpu::CpuKernels> for CpuKernelsInfo {
    fn from(k: sd_models::modules::cpu::CpuKernels) -> Self {
        CpuKernelsInfo {
            features: k.features,
            elementwise: k.elementwise,
            convolution: k.convolution,
            gemm: k.gemm,
            products: k.products,
            threads: k.threads,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub(super) struct LimitsInfo {
    max_pixels: usize,
    max_input_pixels: usize,
    max_side: usize,
    max_steps: usize,
    max_batch: usize,
    max_guidance_scale: f64,
    max_queue: usize,
    max_body_bytes: usize,
    /// Characters of a prompt or negative prompt at most.
    max_prompt_chars: usize,
    /// LoRAs one job may apply at most (0 without `--lora-dir`).
    max_loras: usize,
    /// Seconds a client has to send a request's head, and again its body.
    read_timeout_s: f64,
    job_timeout_s: f64,
    result_ttl_s: f64,
    max_results: usize,
}

#[derive(Serialize, ToSchema)]
pub(super) struct Capabilities {
    operations: Vec<Operation>,
    /// `inpaint-unet`, `latent-blend`, or `none` (FLUX).
    inpaint_method: &'static str,
    negative_prompt: bool,
    max_prompt_tokens: usize,
    /// `classifier-free`, `embedded` (FLUX dev) or `none` (FLUX schnell).
    guidance: &'static str,
    input_formats: Vec<&'static str>,
    previews: Vec<PreviewKind>,
    image_formats: Vec<&'static str>,
    /// Whether a bearer token is required.
    auth: bool,
    loras: LoraCapabilities,
}

#[derive(Serialize, ToSchema)]
pub(super) struct LoraCapabilities {
    /// Whether jobs may name LoRAs (the worker has a --lora-dir).
    enabled: bool,
    max_per_job: usize,
    max_strength: f64,
    formats: Vec<&'static str>,
}

/// Model family and variant, device, dtype, defaults, limits, schedulers, capabilities, version.
#[utoipa::path(get, path = "/v1/info", tag = "worker",
    responses(
        (status = 200, description = "Worker information.", body = Info),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 503, description = "The model is loading.", body = ErrorBody),
    ))]
pub(super) async fn info(State(st): State<Shared>) -> Result<Json<Info>, ApiError> {
    // Described while draining too: only a worker without a model has nothing to say.
    let spec = match st.engine.spec() {
        Some(spec) => spec,
        None => st.engine.ready_spec().map_err(unavailable)?,
    };
    Ok(Json(describe(&st, &spec)))
}

fn describe(st: &AppState, spec: &ModelSpec) -> Info {
    let config = st.engine.config();
    let operations = validate::operations(spec);
    Info {
        version: env!("CARGO_PKG_VERSION"),
        model: ModelInfo {
            name: spec.name.clone(),
            path: spec.path.display().to_string(),
            repo_id: spec.repo_id.clone(),
            family: spec.family.clone(),
            variant: spec.variant.clone(),
            prediction_type: spec.prediction_type.clone(),
            pipeline_class: spec.pipeline_class.clone(),
            latent_factor: spec.latent_factor,
        },
        device: spec.device.clone(),
        dtype: spec.dtype.clone(),
        cpu_kernels: sd_models::modules::cpu::cpu_kernels().into(),
        defaults: Defaults {
            width: spec.default_width,
            height: spec.default_height,
            steps: validate::default_steps(spec, &st.limits),
            guidance_scale: spec.default_guidance,
            max_sequence_length: spec.default_max_sequence_length,
            scheduler: spec.default_sampler.as_ref().ok().map(|s| s.name()),
            batch: 1,
            preview_every: validate::DEFAULT_PREVIEW_EVERY,
            preview: PreviewKind::Approx,
            strength: operations
                .iter()
                .filter(|o| **o != Operation::Generation)
                .map(|o| (o.name(), default_strength(spec, *o)))
                .collect(),
        },
        limits: LimitsInfo {
            max_pixels: st.limits.max_pixels,
            max_input_pixels: st.limits.max_input_pixels,
            max_side: MAX_SIDE,
            max_steps: st.limits.max_steps.min(spec.num_train_timesteps),
            max_batch: st.limits.max_batch,
            max_guidance_scale: MAX_GUIDANCE,
            max_queue: config.max_queue,
            max_body_bytes: st.max_body_bytes,
            max_prompt_chars: MAX_TEXT_CHARS,
            max_loras: match st.limits.loras {
                LoraFiles::Refused => 0,
                _ => MAX_LORAS,
            },
            read_timeout_s: st.read_timeout.as_secs_f64(),
            job_timeout_s: config.job_timeout.as_secs_f64(),
            result_ttl_s: config.result_ttl.as_secs_f64(),
            max_results: config.max_results,
        },
        schedulers: if spec.flux {
            vec!["flow-match-euler"]
        } else {
            SamplerKind::all().map(|s| s.name()).collect()
        },
        schedules: if spec.flux {
            Vec::new()
        } else {
            Schedule::ALL.iter().map(|s| s.name()).collect()
        },
        capabilities: Capabilities {
            operations,
            inpaint_method: spec.inpaint_method,
            negative_prompt: !spec.flux,
            max_prompt_tokens: spec.max_prompt_tokens,
            guidance: match (spec.flux, spec.guidance_embedded) {
                (false, _) => "classifier-free",
                (true, true) => "embedded",
                (true, false) => "none",
            },
            input_formats: vec!["png", "jpeg", "webp"],
            previews: vec![PreviewKind::Approx, PreviewKind::Full],
            image_formats: vec!["png"],
            auth: st.api_key.is_some(),
            loras: LoraCapabilities {
                enabled: st.limits.loras != LoraFiles::Refused,
                max_per_job: MAX_LORAS,
                max_strength: sd_models::lora::MAX_STRENGTH,
                formats: vec!["kohya", "diffusers-peft", "locon", "flux-original"],
            },
        },
    }
}

/// Prometheus metrics: queue depth, jobs by outcome, step, queue-wait and job seconds.
#[utoipa::path(get, path = "/metrics", tag = "worker",
    responses(
        (status = 200, description = "Text exposition format 0.0.4.", content_type = "text/plain", body = String),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
    ))]
pub(super) async fn metrics(State(st): State<Shared>) -> Response {
    st.engine.update_gauges();
    st.metrics.run_upkeep();
    let text = st.metrics.render();
    let content_type = HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}

/// One sampler of `GET /v1/samplers`.
#[derive(Serialize, ToSchema)]
pub(super) struct SamplerInfo {
    /// Our name (the `sampler` field's value).
    name: &'static str,
    /// AUTOMATIC1111's name (accepted too).
    a1111_name: &'static str,
    /// Other accepted spellings (case, spaces, dashes and underscores do not matter).
    aliases: &'static [&'static str],
    /// The diffusers scheduler class it reproduces.
    diffusers_class: &'static str,
    /// The schedules it takes.
    schedules: Vec<&'static str>,
    /// Model evaluations per step (2: Heun, DPM2, DPM2 a, DPM++ SDE and DPM++ 2S a, whose
    /// last step takes one).
    evals_per_step: u8,
}

/// The samplers jobs may name, with their aliases and the schedules each takes (the same
/// for every Stable Diffusion model; FLUX takes none).
#[utoipa::path(get, path = "/v1/samplers", tag = "worker",
    responses(
        (status = 200, description = "The samplers.", body = Vec<SamplerInfo>),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
    ))]
pub(super) async fn samplers() -> Json<Vec<SamplerInfo>> {
    Json(
        SamplerKind::all()
            .map(|k| SamplerInfo {
                name: k.name(),
                a1111_name: k.a1111_name(),
                aliases: k.aliases(),
                diffusers_class: k.diffusers_class(),
                schedules: k.schedules().iter().map(|s| s.name()).collect(),
                evals_per_step: k.evals_per_step(),
            })
            .collect(),
    )
}

/// One schedule of `GET /v1/schedules`.
#[derive(Serialize, ToSchema)]
pub(super) struct ScheduleInfo {
    /// Our name (the `schedule` field's value).
    name: &'static str,
    /// AUTOMATIC1111's name and label (both accepted).
    a1111_name: &'static str,
    a1111_label: &'static str,
    /// The diffusers config override that selects it ("" for the model's own).
    diffusers_option: &'static str,
}

/// The schedules jobs may name.
#[utoipa::path(get, path = "/v1/schedules", tag = "worker",
    responses(
        (status = 200, description = "The schedules.", body = Vec<ScheduleInfo>),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
    ))]
pub(super) async fn schedules() -> Json<Vec<ScheduleInfo>> {
    Json(
        Schedule::ALL
            .iter()
            .map(|s| ScheduleInfo {
                name: s.name(),
                a1111_name: s.a1111_name(),
                a1111_label: s.a1111_label(),
                diffusers_option: s.diffusers_option(),
            })
            .collect(),
    )
}
