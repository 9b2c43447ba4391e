//! `sd-worker generate`: one prompt to PNG files, as a client of the engine. The flags become
//! a [`RequestDraft`], validated by the engine as an HTTP job is, and the job runs on an engine
//! thread like the server's; so the CLI and the server share defaults, limits, messages and
//! PNG text. What the flags alone decide (file names, flag combinations, the scheduler's
//! name, the input files) is checked before the model loads, so that it fails at once.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sd_engine::events::JobEvent;
use sd_engine::images::input::{decode_mask, decode_rgb};
use sd_engine::jobs::{EngineConfig, Loader};
use sd_engine::load::LoadRequest;
use sd_engine::request::{
    ImageBytes, LoraDraft, MicroDraft, Operation, PromptSyntax, RequestDraft,
};
use sd_engine::validate::MAX_SIDE;
use sd_engine::{Engine, InvalidField, Limits, ModelSpec};
use sd_models::samplers::{SamplerKind, Schedule};

/// `--sampler`'s help: kept equal to the models crate's list by a test.
pub const SAMPLER_HELP: &str = "Sampler (update rule): ddim, pndm, euler, euler-a, heun, lms, \
dpm2, dpm2-a, dpmpp-2m, dpmpp-2m-sde, dpmpp-3m-sde, dpmpp-sde, dpmpp-2s-a, unipc, deis, ddpm, lcm, tcd; A1111 names (\"DPM++ 2M\", \"Euler a\") \
and combined names (\"DPM++ 2M Karras\") are accepted. Default: the model's own scheduler \
(scheduler/scheduler_config.json). GET /v1/samplers of `sd-worker serve` lists their aliases";

/// `--schedule`'s help: kept equal to the models crate's list by a test.
pub const SCHEDULE_HELP: &str = "Sigma / timestep schedule: model (default: the model's own), \
karras, exponential, beta, sgm-uniform, simple, normal (A1111's names are accepted). Karras, exponential and \
beta go with euler, heun, lms, dpm2, dpm2-a, unipc, deis and the dpmpp samplers; sgm-uniform with all but \
lcm and tcd; simple and normal (A1111's) with euler";

use crate::model_args::{ConsoleProgress, ModelFlags};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A Stable Diffusion 1.x/2.x or FLUX.1 diffusers folder (with model_index.json), a
    /// single-file SD checkpoint, a FLUX transformer file (with --components), or a Hugging
    /// Face repo id org/repo[@revision] (fetched into the HF cache).
    #[arg(long, env = "SD_MODEL")]
    pub model: PathBuf,
    /// The text prompt.
    #[arg(long, env = "SD_PROMPT")]
    pub prompt: String,
    /// What to guide away from (used when --guidance > 1). Default: the empty prompt.
    #[arg(long, env = "SD_NEGATIVE_PROMPT")]
    pub negative_prompt: Option<String>,
    /// How prompts are read: plain (as diffusers: the text as it is, truncated to 77 tokens) or
    /// a1111 (AUTOMATIC1111's (word:1.2) weights, BREAK and 75-token chunks; Stable Diffusion
    /// models only).
    #[arg(long, env = "SD_PROMPT_SYNTAX", default_value = "plain", value_parser = ["plain", "a1111"])]
    pub prompt_syntax: String,
    /// Image width in pixels, a multiple of the model's latent factor (FLUX: of twice it).
    /// Default: the UNet's sample_size times the latent factor (FLUX: 128 times it).
    #[arg(long, env = "SD_WIDTH", allow_negative_numbers = true)]
    pub width: Option<usize>,
    /// Image height in pixels, a multiple of the model's latent factor (FLUX: of twice it).
    /// Default: the UNet's sample_size times the latent factor (FLUX: 128 times it).
    #[arg(long, env = "SD_HEIGHT", allow_negative_numbers = true)]
    pub height: Option<usize>,
    /// Number of denoising steps (1 to the scheduler's num_train_timesteps).
    /// Default: 50 for Stable Diffusion; 28 for FLUX dev, 4 for FLUX schnell.
    #[arg(long, env = "SD_STEPS", allow_negative_numbers = true)]
    pub steps: Option<usize>,
    /// Guidance scale. Stable Diffusion: classifier-free guidance, applied above 1 (default
    /// 7.5). FLUX dev: the embedded guidance (default 3.5); FLUX schnell takes none.
    #[arg(long, env = "SD_GUIDANCE", allow_negative_numbers = true)]
    pub guidance: Option<f64>,
    /// With a single-file model: FLUX: --model is the transformer (.safetensors with the
    /// original key names, or .gguf) and this diffusers FLUX folder gives the text encoders,
    /// tokenizers, VAE and scheduler. Stable Diffusion checkpoint: a diffusers SD folder whose
    /// configs, tokenizer and scheduler are used (its weights are not read); without it they
    /// are inferred and the tokenizer is taken from the Hugging Face cache.
    #[arg(long, env = "SD_COMPONENTS")]
    pub components: Option<PathBuf>,
    /// FLUX: where the text encoders (CLIP, T5) live, e.g. `cpu` to keep them off the GPU
    /// during denoising. Default: --device.
    #[arg(long, env = "SD_TEXT_ENCODER_DEVICE")]
    pub text_encoder_device: Option<String>,
    /// FLUX: T5 prompt length in tokens (default 512 for dev, 256 for schnell).
    #[arg(long, env = "SD_MAX_SEQUENCE_LENGTH")]
    pub max_sequence_length: Option<usize>,
    /// Seed of the torch-compatible CPU generator (same noise as
    /// torch.Generator("cpu").manual_seed(SEED)). Default: a random seed, reported.
    #[arg(long, env = "SD_SEED", allow_negative_numbers = true)]
    pub seed: Option<u64>,
    #[arg(long, env = "SD_SAMPLER", help = SAMPLER_HELP, conflicts_with = "scheduler")]
    pub sampler: Option<String>,
    #[arg(long, env = "SD_SCHEDULE", help = SCHEDULE_HELP)]
    pub schedule: Option<String>,
    /// The flag of earlier versions, the same as --sampler (combined names such as
    /// "dpmpp-2m-karras" or "DPM++ 2M Karras" included).
    #[arg(long, env = "SD_SCHEDULER")]
    pub scheduler: Option<String>,
    /// ddim and tcd only: fresh noise per step, 0 to 1 (diffusers' pipeline `eta`; default 0).
    #[arg(long, env = "SD_ETA")]
    pub eta: Option<f64>,
    /// dpmpp-sde and dpmpp-2s-a only: scale of their fresh noise, 0 to 2 (default 1).
    #[arg(long, env = "SD_S_NOISE")]
    pub s_noise: Option<f64>,
    /// Image-to-image: the init image (PNG, JPEG or WebP; grayscale is expanded, alpha
    /// dropped). Stable Diffusion: --width / --height then default to its size rounded down to
    /// the latent factor; FLUX keeps the model's default size.
    #[arg(long, env = "SD_INIT_IMAGE")]
    pub init_image: Option<PathBuf>,
    /// Strength in (0, 1]: the share of the steps that run, from the noisiest. Default 0.8
    /// for image-to-image (FLUX: 0.6), 1.0 for inpainting; needs --init-image.
    #[arg(long, env = "SD_STRENGTH", allow_negative_numbers = true)]
    pub strength: Option<f64>,
    /// Inpainting: the mask (PNG, JPEG or WebP; white = repaint, binarised at 50% luma after
    /// resizing to the output size). Needs --init-image. --width / --height then default to
    /// the model's size, as in diffusers.
    #[arg(long, env = "SD_MASK")]
    pub mask: Option<PathBuf>,
    /// Number of images generated from the prompt in one batch.
    #[arg(
        long,
        env = "SD_BATCH",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    pub batch: usize,
    /// SDXL: the original_size id, HEIGHT,WIDTH in pixels (default: the image size).
    #[arg(long, value_name = "H,W", value_parser = parse_pair)]
    pub original_size: Option<[u64; 2]>,
    /// SDXL: the crop id, TOP,LEFT in pixels (default 0,0).
    #[arg(long, value_name = "TOP,LEFT", value_parser = parse_pair)]
    pub crops_coords_top_left: Option<[u64; 2]>,
    /// SDXL: the target_size id, HEIGHT,WIDTH (default: the image size).
    #[arg(long, value_name = "H,W", value_parser = parse_pair)]
    pub target_size: Option<[u64; 2]>,
    /// SDXL: the ids of the unconditional half (default: the positive ones; see the README).
    #[arg(long, value_name = "H,W", value_parser = parse_pair)]
    pub negative_original_size: Option<[u64; 2]>,
    #[arg(long, value_name = "TOP,LEFT", value_parser = parse_pair)]
    pub negative_crops_coords_top_left: Option<[u64; 2]>,
    #[arg(long, value_name = "H,W", value_parser = parse_pair)]
    pub negative_target_size: Option<[u64; 2]>,
    /// Device: cpu, cuda[:N] or metal[:N] (CUDA and Metal need the `cuda` / `metal` build features).
    #[arg(long, env = "SD_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Precision: f32, f16 or bf16. On the CPU, bf16 keeps f32 weights and activations and
    /// rounds the operands of linear layers, attention and 1x1 convolutions to bf16 (README,
    /// "bf16 on the CPU").
    #[arg(long, env = "SD_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Output PNG file. A batch writes FILE-0.png, FILE-1.png, ...
    #[arg(long, short, env = "SD_OUTPUT")]
    pub output: PathBuf,
    #[command(flatten)]
    pub source: crate::model_args::SourceArgs,
    /// A LoRA to apply: FILE[:STRENGTH] (.safetensors; strength default 1, between -10 and
    /// 10). Repeat for several (the env var takes a comma-separated list). Kohya,
    /// diffusers/PEFT and LoCon layouts; FLUX also kohya and original-name layouts.
    #[arg(long = "lora", env = "SD_LORA", value_delimiter = ',')]
    pub loras: Vec<String>,
    /// LoRA keys that match no layer of the model are printed as warnings instead of
    /// failing the run.
    #[arg(long, env = "SD_LORA_ALLOW_UNMATCHED")]
    pub lora_allow_unmatched: bool,
}

/// `A,B`: two non-negative integers (SDXL's size and crop ids).
fn parse_pair(s: &str) -> std::result::Result<[u64; 2], String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    match parts.as_slice() {
        [a, b] => match (a.parse(), b.parse()) {
            (Ok(a), Ok(b)) => Ok([a, b]),
            _ => Err(format!("expected two non-negative integers A,B, got {s:?}")),
        },
        _ => Err(format!(
            "expected two integers separated by a comma, got {s:?}"
        )),
    }
}

/// The `--lora` values: `FILE[:STRENGTH]`, the file checked to exist.
fn lora_drafts(args: &GenerateArgs) -> Result<Vec<LoraDraft>> {
    args.loras
        .iter()
        .map(|arg| {
            // The strength follows the last colon when it parses as a number (a path may
            // hold colons).
            let (file, strength) = match arg
                .rsplit_once(':')
                .and_then(|(f, s)| Some((f, s.trim().parse::<f64>().ok()?)))
            {
                Some((f, s)) if !f.is_empty() => (f, s),
                _ => (arg.as_str(), 1.0),
            };
            let max = sd_models::lora::MAX_STRENGTH;
            if !strength.is_finite() || strength.abs() > max {
                bail!("invalid --lora {arg}: the strength must be between -{max} and {max}, got {strength}");
            }
            if !Path::new(file).is_file() {
                bail!("invalid --lora {arg}: {file} is not a file");
            }
            Ok(LoraDraft {
                path: file.to_string(),
                strength: Some(strength),
                strict: Some(!args.lora_allow_unmatched),
            })
        })
        .collect()
}

/// Prints the warnings of a run (LoRA keys not applied).
fn print_warnings(warnings: &[String]) {
    for w in warnings {
        eprintln!("warning: LoRA {w}");
    }
}

/// A step progress bar with steps/s on a terminal; hidden when `quiet`.
fn progress_bar(quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {per_sec}  eta {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// The files a batch writes: `out.png` for one image, `out-0.png`, `out-1.png`... for more.
fn output_paths(output: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![output.to_path_buf()];
    }
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let ext = output
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    (0..n)
        .map(|i| output.with_file_name(format!("{stem}-{i}.{ext}")))
        .collect()
}

fn check_output(output: &Path) -> Result<()> {
    match output.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("png") => {}
        _ => bail!(
            "invalid --output {}: the file name must end in .png",
            output.display()
        ),
    }
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!(
                "invalid --output {}: folder {} does not exist",
                output.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// The flag that sets a request field, for error messages.
fn flag(field: &str) -> &str {
    match field {
        "prompt" => "--prompt",
        "negative_prompt" => "--negative-prompt",
        "prompt_syntax" => "--prompt-syntax",
        "width" => "--width",
        "height" => "--height",
        "steps" => "--steps",
        "guidance_scale" => "--guidance",
        "seed" => "--seed",
        "sampler" => "--sampler",
        "schedule" => "--schedule",
        "scheduler" => "--scheduler",
        "eta" => "--eta",
        "s_noise" => "--s-noise",
        "batch" => "--batch",
        "max_sequence_length" => "--max-sequence-length",
        "init_image" | "input_image" => "--init-image",
        "mask_image" => "--mask",
        "strength" => "--strength",
        "original_size" => "--original-size",
        "crops_coords_top_left" => "--crops-coords-top-left",
        "target_size" => "--target-size",
        "negative_original_size" => "--negative-original-size",
        "negative_crops_coords_top_left" => "--negative-crops-coords-top-left",
        "negative_target_size" => "--negative-target-size",
        "operation" => "--init-image / --mask",
        f if f.starts_with("loras") => "--lora",
        other => other,
    }
}

/// An engine error in the CLI's words: `invalid --flag: reason`.
fn cli_error(e: InvalidField) -> anyhow::Error {
    anyhow::anyhow!("invalid {}: {}", flag(&e.field), e.reason)
}

/// Reads an input file and checks that it decodes, before the model loads.
fn read_input(flag: &str, path: &Path, mask: bool) -> Result<ImageBytes> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))?;
    let checked = if mask {
        decode_mask(&bytes, MAX_SIDE * MAX_SIDE, MAX_SIDE).map(|_| ())
    } else {
        decode_rgb(&bytes, MAX_SIDE * MAX_SIDE, MAX_SIDE).map(|_| ())
    };
    checked.map_err(|e| anyhow::anyhow!("invalid {flag} {}: the file {e}", path.display()))?;
    let field = if mask { "mask_image" } else { "init_image" };
    Ok(ImageBytes {
        field: field.into(),
        bytes,
    })
}

/// The request the flags make, with its input files read.
fn draft(args: &GenerateArgs) -> Result<RequestDraft> {
    let mask = match (&args.mask, &args.init_image) {
        (Some(path), Some(_)) => Some(read_input("--mask", path, true)?),
        (Some(_), None) => bail!("--mask needs --init-image (the image to inpaint)"),
        (None, _) => None,
    };
    let init = match &args.init_image {
        Some(path) => Some(read_input("--init-image", path, false)?),
        None => {
            if let Some(s) = args.strength {
                bail!("--strength {s} needs --init-image (strength applies to image-to-image and inpainting)");
            }
            None
        }
    };
    let operation = match (&init, &mask) {
        (None, _) => Operation::Generation,
        (Some(_), None) => Operation::Transform,
        (Some(_), Some(_)) => Operation::Inpaint,
    };
    let mut d = RequestDraft::new(operation);
    d.prompt = Some(args.prompt.clone());
    d.negative_prompt = args.negative_prompt.clone();
    d.prompt_syntax = if args.prompt_syntax == "a1111" {
        PromptSyntax::A1111
    } else {
        PromptSyntax::Plain
    };
    d.width = args.width.map(|v| v as u64);
    d.height = args.height.map(|v| v as u64);
    d.steps = args.steps.map(|v| v as u64);
    d.guidance_scale = args.guidance;
    d.seed = args.seed;
    d.sampler = args.sampler.clone();
    d.schedule = args.schedule.clone();
    d.scheduler = args.scheduler.clone();
    d.eta = args.eta;
    d.s_noise = args.s_noise;
    d.batch = Some(args.batch as u64);
    d.max_sequence_length = args.max_sequence_length.map(|v| v as u64);
    d.init_image = init;
    d.mask_image = mask;
    d.strength = args.strength;
    d.preview_every = Some(0);
    d.loras = lora_drafts(args)?;
    d.micro = MicroDraft {
        original_size: args.original_size,
        crops_coords_top_left: args.crops_coords_top_left,
        target_size: args.target_size,
        negative_original_size: args.negative_original_size,
        negative_crops_coords_top_left: args.negative_crops_coords_top_left,
        negative_target_size: args.negative_target_size,
        aesthetic_score: None,
        negative_aesthetic_score: None,
    };
    Ok(d)
}

/// Loads the model on the engine thread.
fn loader(load: LoadRequest) -> Loader<sd_engine::backend::Model> {
    Box::new(move || sd_engine::load::load(&load, &mut ConsoleProgress::new()))
}

/// The images of a finished job, in order, and its `complete` event; the progress bar follows
/// the job's steps.
fn follow(engine: &Engine, id: &str, bar: &ProgressBar) -> Result<(Vec<Arc<Vec<u8>>>, JobEvent)> {
    let (first, live) = engine
        .subscribe(id)
        .context("the job disappeared from the engine")?;
    let mut pending: std::collections::VecDeque<_> = first.into();
    let mut live = live;
    let last = loop {
        let ev = match pending.pop_front() {
            Some(ev) => ev,
            None => {
                let rx = live
                    .as_mut()
                    .context("the job's events ended before its final event")?;
                match rx.blocking_recv() {
                    Ok(ev) => ev,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        bail!("the job's events ended before its final event")
                    }
                }
            }
        };
        match &ev.event {
            JobEvent::Progress { step, total, .. } => {
                bar.set_length(*total as u64);
                bar.set_position(*step as u64);
            }
            JobEvent::Failed { message, .. } => bail!("{message}"),
            JobEvent::Cancelled { reason } => bail!("the job was cancelled ({reason})"),
            JobEvent::Completed(_) => break ev.event.clone(),
            _ => {}
        }
    };
    let count = engine.status(id).map_or(0, |v| v.image_count);
    let images = (0..count)
        .map(|n| match engine.image(id, n) {
            Some(Ok(png)) => Ok(png),
            _ => bail!("image {n} of the job is missing"),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((images, last))
}

fn print_loaded(spec: &ModelSpec, request: &sd_engine::GenerationRequest, seconds: f64) {
    let p = &request.params;
    let sampler = if spec.flux {
        "flow-match-euler"
    } else {
        p.sampler.name()
    };
    let variant = if spec.flux {
        format!("flux {}", spec.prediction_type)
    } else {
        spec.family.clone()
    };
    eprintln!(
        "loaded {} ({variant}, {}, {}) in {seconds:.1}s; seed {}, sampler {sampler}",
        spec.name, spec.device, spec.dtype, p.seed
    );
}

/// Warnings about the request that do not stop it.
fn print_request_warnings(spec: &ModelSpec, request: &sd_engine::GenerationRequest) {
    let p = &request.params;
    if !spec.flux && p.negative_prompt.is_some() && p.guidance <= 1.0 {
        eprintln!(
            "warning: --negative-prompt has no effect when --guidance ({}) is not above 1",
            p.guidance
        );
    }
}

fn print_truncation(spec: &ModelSpec, request: &sd_engine::GenerationRequest, dropped: [usize; 2]) {
    let [first, second] = dropped;
    if spec.flux {
        if first > 0 {
            eprintln!("warning: the prompt was truncated for CLIP; {first} tokens were dropped");
        }
        if second > 0 {
            let n = request
                .max_sequence_length
                .or(spec.default_max_sequence_length)
                .unwrap_or(0);
            eprintln!(
                "warning: the prompt was truncated for T5 (--max-sequence-length {n}); {second} tokens were dropped"
            );
        }
        return;
    }
    if first > 0 {
        eprintln!("warning: the prompt was truncated; {first} tokens beyond the text encoder's limit were dropped");
    }
    if second > 0 {
        eprintln!("warning: the negative prompt was truncated; {second} tokens were dropped");
    }
}

/// A models-crate error about a flag's value, naming the flag.
fn flag_error(flag: &str, e: sd_models::Error) -> anyhow::Error {
    match e {
        sd_models::Error::Invalid { message, .. } => anyhow::anyhow!("{flag}: {message}"),
        other => anyhow::anyhow!("{flag}: {other}"),
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    check_output(&args.output)?;
    let sampler_flag = if args.sampler.is_some() {
        "--sampler"
    } else {
        "--scheduler"
    };
    if let Some(name) = args.sampler.as_ref().or(args.scheduler.as_ref()) {
        SamplerKind::parse(name).map_err(|e| flag_error(sampler_flag, e))?;
    }
    if let Some(name) = &args.schedule {
        Schedule::from_name(name).map_err(|e| flag_error("--schedule", e))?;
    }
    let load = ModelFlags {
        model: &args.model,
        components: args.components.as_deref(),
        source: &args.source,
        device: &args.device,
        dtype: &args.dtype,
        text_encoder_device: args.text_encoder_device.as_deref(),
    }
    .load_request()?;
    let quiet = !std::io::stderr().is_terminal();
    let draft = draft(&args)?;

    let started = Instant::now();
    let (engine, loaded) = Engine::start(EngineConfig::single_job(), loader(load));
    match loaded.recv() {
        Ok(Ok(())) => {}
        Ok(Err(message)) => bail!("{message}"),
        Err(_) => bail!("the engine stopped while loading the model"),
    }
    let spec = engine.spec().context("the engine has no model")?;
    let seed = rand::random::<u32>() as u64;
    let request =
        sd_engine::validate(draft, &spec, &Limits::pipeline(), seed).map_err(cli_error)?;
    if !quiet {
        print_loaded(&spec, &request, started.elapsed().as_secs_f64());
    }
    print_request_warnings(&spec, &request);
    let seed = request.params.seed;
    let request_copy = request.clone();

    let bar = progress_bar(quiet);
    let run_started = Instant::now();
    let id = engine
        .submit(request)
        .map_err(|e| anyhow::anyhow!("the engine refused the job: {e:?}"))?;
    let (pngs, last) = follow(&engine, &id, &bar)?;
    bar.finish_and_clear();
    if let JobEvent::Completed(c) = &last {
        print_warnings(&c.warnings);
        print_truncation(&spec, &request_copy, c.truncated_tokens);
    }

    let paths = output_paths(&args.output, pngs.len());
    for (png, path) in pngs.iter().zip(&paths) {
        std::fs::write(path, png.as_slice())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    eprintln!(
        "wrote {} (seed {seed}, {:.1}s)",
        names.join(", "),
        run_started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod help_tests {
    use super::*;

    /// `--help` lists every sampler and schedule the models crate has.
    #[test]
    fn help_lists_every_sampler_and_schedule() {
        let words = |s: &str| -> Vec<String> {
            s.split(|c: char| c == ',' || c == ';' || c == ':' || c.is_whitespace())
                .map(str::to_string)
                .collect()
        };
        let samplers = words(SAMPLER_HELP);
        for kind in SamplerKind::all() {
            assert!(samplers.contains(&kind.name().to_string()), "{kind}");
        }
        let schedules = words(SCHEDULE_HELP);
        for s in Schedule::ALL {
            assert!(schedules.contains(&s.name().to_string()), "{s}");
        }
    }
}
