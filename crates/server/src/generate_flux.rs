//! `sd-worker generate` for FLUX.1 folders: text-to-image.

use sd_models::lora::LoraSpec;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use sd_models::pipelines::flux::FluxParams;

use crate::device::dtype_name;
use crate::generate::progress_bar;
use crate::generate::{output_paths, GenerateArgs};
use crate::png_out::{encode_png, py_float};

/// Default image-to-image strength of FLUX (diffusers' `FluxImg2ImgPipeline`: 0.6).
pub const DEFAULT_STRENGTH: f64 = 0.6;

/// Defaults of FLUX jobs: (steps, guidance) for dev-like and schnell-like models.
pub const DEV_DEFAULTS: (usize, f64) = (28, 3.5);
pub const SCHNELL_STEPS: usize = 4;
/// diffusers' `default_sample_size`: the default image side is this times the VAE factor.
pub const DEFAULT_SAMPLE_SIZE: usize = 128;
/// T5's position limit in diffusers' FluxPipeline.
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// The PNG `parameters` text of a FLUX image.
pub fn parameters_text(
    prompt: &str,
    p: &FluxParams,
    guidance_embedded: bool,
    model: &str,
    strength: Option<f64>,
    batch: Option<(usize, usize)>,
) -> String {
    let mut s = format!("{prompt}\nSteps: {}, Sampler: Euler", p.steps);
    if guidance_embedded {
        let g = p.guidance;
        let g = if g.fract() == 0.0 {
            format!("{g:.1}")
        } else {
            format!("{g}")
        };
        s.push_str(&format!(", Distilled CFG Scale: {g}"));
    }
    s.push_str(&format!(
        ", Seed: {}, Size: {}x{}, Model: {model}",
        p.seed, p.width, p.height
    ));
    if let Some(strength) = strength {
        s.push_str(&format!(", Denoising strength: {}", py_float(strength)));
    }
    if let Some((n, i)) = batch {
        s.push_str(&format!(", Batch size: {n}, Batch pos: {i}"));
    }
    s
}

/// Loads a FLUX folder, or a single-file transformer with `--components`; and the model's
/// short name (folder name, or file stem).
pub fn load(
    model: &std::path::Path,
    components: Option<&std::path::Path>,
    device: &Device,
    text_device: Option<&Device>,
    dtype: DType,
) -> Result<(sd_models::pipelines::flux::FluxPipeline, String)> {
    match components {
        None => {
            let pipe = sd_models::loader::load_flux_with(model, None, device, text_device, dtype)?;
            let name = sd_models::loader::model_name(model);
            Ok((pipe, name))
        }
        Some(dir) => {
            if !model.is_file() {
                bail!(
                    "invalid --model {}: with --components it must be a transformer file",
                    model.display()
                );
            }
            if !sd_models::loader::is_flux_folder(dir) {
                bail!(
                    "invalid --components {}: not a diffusers FLUX folder (model_index.json with a Flux pipeline class)",
                    dir.display()
                );
            }
            let pipe =
                sd_models::loader::load_flux_with(dir, Some(model), device, text_device, dtype)?;
            let name = model
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| model.display().to_string());
            Ok((pipe, name))
        }
    }
}

pub fn run(
    args: &GenerateArgs,
    loras: &[LoraSpec],
    device: &Device,
    dtype: DType,
    quiet: bool,
) -> Result<()> {
    // What FLUX does not do (yet) is refused, never ignored.
    for (given, flag, why) in [
        (
            args.mask.is_some(),
            "--mask",
            "FLUX inpainting is not supported yet",
        ),
        (
            args.strength.is_some() && args.init_image.is_none(),
            "--strength",
            "it needs --init-image",
        ),
        (
            args.negative_prompt.is_some(),
            "--negative-prompt",
            "FLUX models here run without a negative prompt (no true classifier-free guidance)",
        ),
        (
            args.scheduler.is_some(),
            "--scheduler",
            "FLUX runs its flow-matching Euler schedule",
        ),
    ] {
        if given {
            bail!("{flag} cannot be used with a FLUX model: {why}");
        }
    }
    // The init image is read before the model loads, so that a bad file fails at once.
    let init = match &args.init_image {
        Some(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read --init-image {}", path.display()))?;
            let max_side = sd_models::pipelines::sd::MAX_SIDE;
            let image = crate::input_image::decode_rgb(&bytes, max_side * max_side, max_side)
                .map_err(|e| {
                    anyhow::anyhow!("invalid --init-image {}: the file {e}", path.display())
                })?;
            Some((image, args.strength.unwrap_or(DEFAULT_STRENGTH)))
        }
        None => None,
    };
    let started = Instant::now();
    let text_device = args
        .text_encoder_device
        .as_deref()
        .map(crate::device::parse_device)
        .transpose()?;
    let (pipe, name) = load(
        &args.model,
        args.components.as_deref(),
        device,
        text_device.as_ref(),
        dtype,
    )?;
    let dev = pipe.is_guidance_distilled();
    let guidance = match (dev, args.guidance) {
        (true, g) => g.unwrap_or(DEV_DEFAULTS.1),
        (false, Some(g)) => bail!(
            "--guidance {g} cannot be used with {name}: it has no guidance embedding (schnell-like); omit it"
        ),
        (false, None) => 0.0,
    };
    if !guidance.is_finite() || !(0.0..=100.0).contains(&guidance) {
        bail!("invalid --guidance: must be between 0 and 100, got {guidance}");
    }
    let steps = args
        .steps
        .unwrap_or(if dev { DEV_DEFAULTS.0 } else { SCHNELL_STEPS });
    if steps == 0 || steps > 1000 {
        bail!("invalid --steps: must be between 1 and 1000, got {steps}");
    }
    let max_seq = args
        .max_sequence_length
        .unwrap_or(pipe.default_max_sequence_length());
    if !(2..=MAX_SEQUENCE_LENGTH).contains(&max_seq) {
        bail!("invalid --max-sequence-length: must be between 2 and {MAX_SEQUENCE_LENGTH}, got {max_seq}");
    }
    let side = DEFAULT_SAMPLE_SIZE * pipe.core.latent_factor();
    let p = FluxParams {
        width: args.width.unwrap_or(side),
        height: args.height.unwrap_or(side),
        steps,
        guidance,
        seed: args.seed.unwrap_or_else(|| rand::random::<u32>() as u64),
        batch: args.batch,
    };
    pipe.core.validate(&p)?;
    if let Some((_, strength)) = &init {
        sd_models::pipelines::flux::FluxCore::img2img_start(p.steps, *strength).map_err(
            |e| match e {
                sd_models::Error::Invalid { message, .. } => {
                    anyhow::anyhow!("invalid --strength: {message}")
                }
                other => other.into(),
            },
        )?;
    }
    let max_side = sd_models::pipelines::sd::MAX_SIDE;
    if p.width > max_side || p.height > max_side || p.batch > sd_models::pipelines::sd::MAX_BATCH {
        bail!(
            "invalid size or batch: sides at most {max_side}, batch at most {}",
            sd_models::pipelines::sd::MAX_BATCH
        );
    }
    if !quiet {
        eprintln!(
            "loaded {name} (flux {}, {}, {}) in {:.1}s; seed {}",
            if dev { "dev" } else { "schnell" },
            args.device,
            dtype_name(dtype),
            started.elapsed().as_secs_f64(),
            p.seed
        );
    }
    let bar = progress_bar(quiet);
    let run_started = Instant::now();
    let mut on_step = |pr: sd_models::pipelines::Progress<'_>| {
        bar.set_length(pr.total as u64);
        bar.set_position(pr.step as u64);
        Ok(())
    };
    let ((images, (clip_dropped, t5_dropped)), warnings) = sd_models::lora::run_with(
        loras,
        &pipe.lora_layers,
        &pipe.core.device,
        pipe.core.dtype,
        || match &init {
            Some((image, strength)) => {
                pipe.generate_from_image(&args.prompt, max_seq, image, *strength, &p, &mut on_step)
            }
            None => pipe.generate(&args.prompt, max_seq, &p, &mut on_step),
        },
    )?;
    bar.finish_and_clear();
    crate::generate::print_warnings(&warnings);
    if clip_dropped > 0 {
        eprintln!("warning: the prompt was truncated for CLIP; {clip_dropped} tokens were dropped");
    }
    if t5_dropped > 0 {
        eprintln!(
            "warning: the prompt was truncated for T5 (--max-sequence-length {max_seq}); {t5_dropped} tokens were dropped"
        );
    }
    let paths = output_paths(&args.output, images.len());
    let n = images.len();
    for (i, (image, path)) in images.iter().zip(&paths).enumerate() {
        let strength = init.as_ref().map(|(_, s)| *s);
        let text = parameters_text(
            &args.prompt,
            &p,
            dev,
            &name,
            strength,
            (n > 1).then_some((n, i)),
        );
        let png = encode_png(image, &crate::png_out::with_loras(text, loras))?;
        std::fs::write(path, png).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    eprintln!(
        "wrote {} (seed {}, {:.1}s)",
        names.join(", "),
        p.seed,
        run_started.elapsed().as_secs_f64()
    );
    Ok(())
}
