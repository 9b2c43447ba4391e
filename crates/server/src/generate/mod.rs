//! `sd-worker generate`: one prompt to PNG files.

mod flux;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sd_models::lora::LoraSpec;
use sd_models::pipelines::{GenerateParams, ImageInput, SdPipeline};
use sd_models::samplers::SamplerKind;

use crate::device::{check_dtype_on_device, dtype_name, parse_device, parse_dtype};
use crate::model_args::ConsoleProgress;
use sd_engine::images::input::{decode_mask, decode_rgb};
use sd_engine::images::png::{encode_job_results, ResultInfo};
use sd_engine::validate::{DEFAULT_INPAINT_STRENGTH, DEFAULT_TRANSFORM_STRENGTH};

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
    /// Image width in pixels, a multiple of the model's latent factor (FLUX: of twice it).
    /// Default: the UNet's sample_size times the latent factor (FLUX: 128 times it).
    #[arg(long, env = "SD_WIDTH")]
    pub width: Option<usize>,
    /// Image height in pixels, a multiple of the model's latent factor (FLUX: of twice it).
    /// Default: the UNet's sample_size times the latent factor (FLUX: 128 times it).
    #[arg(long, env = "SD_HEIGHT")]
    pub height: Option<usize>,
    /// Number of denoising steps (1 to the scheduler's num_train_timesteps).
    /// Default: 50 for Stable Diffusion; 28 for FLUX dev, 4 for FLUX schnell.
    #[arg(long, env = "SD_STEPS")]
    pub steps: Option<usize>,
    /// Guidance scale. Stable Diffusion: classifier-free guidance, applied above 1 (default
    /// 7.5). FLUX dev: the embedded guidance (default 3.5); FLUX schnell takes none.
    #[arg(long, env = "SD_GUIDANCE")]
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
    #[arg(long, env = "SD_SEED")]
    pub seed: Option<u64>,
    /// Sampler: ddim, pndm, euler, euler-a, dpmpp-2m, dpmpp-2m-karras.
    /// Default: the model's own scheduler (scheduler/scheduler_config.json).
    #[arg(long, env = "SD_SCHEDULER")]
    pub scheduler: Option<String>,
    /// Image-to-image: the init image (PNG, JPEG or WebP; grayscale is expanded, alpha
    /// dropped). Stable Diffusion: --width / --height then default to its size rounded down to
    /// the latent factor; FLUX keeps the model's default size.
    #[arg(long, env = "SD_INIT_IMAGE")]
    pub init_image: Option<PathBuf>,
    /// Strength in (0, 1]: the share of the steps that run, from the noisiest. Default 0.8
    /// for image-to-image (FLUX: 0.6), 1.0 for inpainting; needs --init-image.
    #[arg(long, env = "SD_STRENGTH")]
    pub strength: Option<f64>,
    /// Inpainting: the mask (PNG, JPEG or WebP; white = repaint, binarised at 50% luma after
    /// resizing to the output size). Needs --init-image. --width / --height then default to
    /// the model's size, as in diffusers.
    #[arg(long, env = "SD_MASK")]
    pub mask: Option<PathBuf>,
    /// Number of images generated from the prompt in one batch.
    #[arg(long, env = "SD_BATCH", default_value_t = 1)]
    pub batch: usize,
    /// Device: cpu, cuda[:N] or metal[:N] (CUDA and Metal need the `cuda` / `metal` build features).
    #[arg(long, env = "SD_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Weight precision: f32, f16 or bf16.
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

/// The `--lora` values as LoRA specs: `FILE[:STRENGTH]`, the file checked to exist.
pub fn lora_specs(args: &GenerateArgs) -> Result<Vec<LoraSpec>> {
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
            let path = PathBuf::from(file);
            if !path.is_file() {
                bail!("invalid --lora {arg}: {file} is not a file");
            }
            Ok(LoraSpec {
                name: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| file.to_string()),
                path,
                strength,
                strict: !args.lora_allow_unmatched,
            })
        })
        .collect()
}

/// Prints the warnings of a run (LoRA keys not applied).
pub fn print_warnings(warnings: &[String]) {
    for w in warnings {
        eprintln!("warning: LoRA {w}");
    }
}

/// A step progress bar with steps/s on a terminal; hidden when `quiet`.
pub fn progress_bar(quiet: bool) -> ProgressBar {
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
pub fn output_paths(output: &Path, n: usize) -> Vec<PathBuf> {
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

pub fn run(mut args: GenerateArgs) -> Result<()> {
    match args.output.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("png") => {}
        _ => bail!(
            "invalid --output {}: the file name must end in .png",
            args.output.display()
        ),
    }
    if let Some(dir) = args.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!(
                "invalid --output {}: folder {} does not exist",
                args.output.display(),
                dir.display()
            );
        }
    }
    let sampler_override = args
        .scheduler
        .as_deref()
        .map(SamplerKind::from_name)
        .transpose()?;
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    check_dtype_on_device(dtype, &device)?;
    let quiet = !std::io::stderr().is_terminal();
    let loras = lora_specs(&args)?;
    args.model = sd_engine::hub::resolve_model(
        &args.model,
        args.source.variant.as_deref(),
        &mut ConsoleProgress::new(),
    )?;
    let kind = sd_engine::source::model_kind(&args.model)?;
    let sd_opts = args
        .source
        .options()
        .sd_options(kind, args.components.as_deref())?;
    if kind == sd_engine::source::ModelKind::Flux {
        return flux::run(&args, &loras, &device, dtype, quiet);
    }
    if let Some(n) = args.max_sequence_length {
        bail!("--max-sequence-length {n} applies to FLUX models only");
    }
    if let Some(d) = &args.text_encoder_device {
        bail!("--text-encoder-device {d} applies to FLUX models only");
    }

    // Inputs are read before the model loads, so that a bad file fails at once.
    let max_side = sd_models::pipelines::sd::MAX_SIDE;
    let read = |flag: &str, path: &Path| -> Result<Vec<u8>> {
        std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))
    };
    let mask = match (&args.mask, &args.init_image) {
        (Some(path), Some(_)) => Some(
            decode_mask(&read("--mask", path)?, max_side * max_side, max_side)
                .map_err(|e| anyhow::anyhow!("invalid --mask {}: the file {e}", path.display()))?,
        ),
        (Some(_), None) => bail!("--mask needs --init-image (the image to inpaint)"),
        (None, _) => None,
    };
    let input = match &args.init_image {
        Some(path) => {
            let image = decode_rgb(&read("--init-image", path)?, max_side * max_side, max_side)
                .map_err(|e| {
                    anyhow::anyhow!("invalid --init-image {}: the file {e}", path.display())
                })?;
            let default_strength = if mask.is_some() {
                DEFAULT_INPAINT_STRENGTH
            } else {
                DEFAULT_TRANSFORM_STRENGTH
            };
            Some(ImageInput {
                image,
                strength: args.strength.unwrap_or(default_strength),
                mask,
            })
        }
        None => {
            if let Some(s) = args.strength {
                bail!("--strength {s} needs --init-image (strength applies to image-to-image and inpainting)");
            }
            None
        }
    };
    let started = Instant::now();
    let (pipeline, info) = sd_models::loader::load_sd_with(&args.model, &sd_opts, &device, dtype)?;
    let sampler = match sampler_override {
        Some(s) => s,
        None => pipeline.default_sampler()?,
    };
    if pipeline.is_inpainting_model() && input.as_ref().is_none_or(|i| i.mask.is_none()) {
        bail!(
            "{} is an inpainting model: it needs --init-image and --mask",
            info.name
        );
    }
    let (default_width, default_height) = match &input {
        // Inpainting defaults to the model's size, as diffusers' inpainting pipeline does.
        Some(i) if i.mask.is_some() => pipeline.default_size(),
        Some(i) => {
            let (w, h) = i.default_size(pipeline.latent_factor());
            if w == 0 || h == 0 {
                bail!(
                    "invalid --init-image: {}x{} is smaller than the latent factor {}",
                    i.image.width,
                    i.image.height,
                    pipeline.latent_factor()
                );
            }
            (w, h)
        }
        None => pipeline.default_size(),
    };
    let seed = args.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    let params = GenerateParams {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width: args.width.unwrap_or(default_width),
        height: args.height.unwrap_or(default_height),
        steps: args.steps.unwrap_or(50),
        guidance: args.guidance.unwrap_or(7.5),
        seed,
        sampler,
        batch: args.batch,
    };
    pipeline.validate(&params)?;
    if let Some(i) = &input {
        SdPipeline::img2img_start(params.steps, i.strength).map_err(|e| match e {
            sd_models::Error::Invalid { message, .. } => {
                anyhow::anyhow!("invalid --strength: {message}")
            }
            other => other.into(),
        })?;
    }
    if !quiet {
        eprintln!(
            "loaded {} ({}, {}, {}) in {:.1}s; seed {seed}, sampler {}",
            info.name,
            info.family,
            args.device,
            dtype_name(dtype),
            started.elapsed().as_secs_f64(),
            sampler.name()
        );
    }

    let bar = progress_bar(quiet);
    if params.negative_prompt.is_some() && params.guidance <= 1.0 {
        eprintln!(
            "warning: --negative-prompt has no effect when --guidance ({}) is not above 1",
            params.guidance
        );
    }
    let run_started = Instant::now();
    let mut on_step = |p: sd_models::pipelines::Progress<'_>| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        Ok(())
    };
    let (generated, warnings) = sd_models::lora::run_with(
        &loras,
        &pipeline.lora_layers,
        &pipeline.device,
        pipeline.dtype,
        || match &input {
            Some(i) => pipeline.generate_from_image(&params, i, &mut on_step),
            None => pipeline.generate(&params, &mut on_step),
        },
    )?;
    bar.finish_and_clear();
    print_warnings(&warnings);
    let (dropped, neg_dropped) = generated.truncated_tokens;
    if dropped > 0 {
        eprintln!("warning: the prompt was truncated; {dropped} tokens beyond the text encoder's limit were dropped");
    }
    if neg_dropped > 0 {
        eprintln!("warning: the negative prompt was truncated; {neg_dropped} tokens were dropped");
    }

    let paths = output_paths(&args.output, generated.images.len());
    let strength = input.as_ref().map(|i| i.strength);
    let result = ResultInfo {
        strength,
        flux: None,
        model: &info.name,
        loras: &loras,
    };
    let pngs = encode_job_results(&params, &result, &generated.images)?;
    for (png, path) in pngs.iter().zip(&paths) {
        std::fs::write(path, png).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    eprintln!(
        "wrote {} (seed {seed}, {:.1}s)",
        names.join(", "),
        run_started.elapsed().as_secs_f64()
    );
    Ok(())
}
