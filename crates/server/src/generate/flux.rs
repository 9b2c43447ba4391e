//! `sd-worker generate` for FLUX.1 folders: text-to-image.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use sd_engine::images::png::{encode_job_results, ResultInfo};
use sd_engine::load::{load_flux, FLUX_DEFAULT_SAMPLE_SIZE, FLUX_DEV_DEFAULTS, FLUX_SCHNELL_STEPS};
use sd_engine::validate::{DEFAULT_FLUX_STRENGTH, MAX_SEQUENCE_LENGTH};
use sd_models::lora::LoraSpec;
use sd_models::pipelines::GenerateParams;

use super::progress_bar;
use super::{output_paths, GenerateArgs};
use crate::device::dtype_name;

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
            let image = sd_engine::images::input::decode_rgb(&bytes, max_side * max_side, max_side)
                .map_err(|e| {
                    anyhow::anyhow!("invalid --init-image {}: the file {e}", path.display())
                })?;
            Some((image, args.strength.unwrap_or(DEFAULT_FLUX_STRENGTH)))
        }
        None => None,
    };
    let started = Instant::now();
    let text_device = args
        .text_encoder_device
        .as_deref()
        .map(crate::device::parse_device)
        .transpose()?;
    let (pipe, name) = load_flux(
        &args.model,
        args.components.as_deref(),
        device,
        text_device.as_ref(),
        dtype,
    )?;
    let dev = pipe.is_guidance_distilled();
    let guidance = match (dev, args.guidance) {
        (true, g) => g.unwrap_or(FLUX_DEV_DEFAULTS.1),
        (false, Some(g)) => bail!(
            "--guidance {g} cannot be used with {name}: it has no guidance embedding (schnell-like); omit it"
        ),
        (false, None) => 0.0,
    };
    if !guidance.is_finite() || !(0.0..=100.0).contains(&guidance) {
        bail!("invalid --guidance: must be between 0 and 100, got {guidance}");
    }
    let steps = args.steps.unwrap_or(if dev {
        FLUX_DEV_DEFAULTS.0
    } else {
        FLUX_SCHNELL_STEPS
    });
    if steps == 0 || steps > 1000 {
        bail!("invalid --steps: must be between 1 and 1000, got {steps}");
    }
    let max_seq = args
        .max_sequence_length
        .unwrap_or(pipe.default_max_sequence_length());
    if !(2..=MAX_SEQUENCE_LENGTH).contains(&max_seq) {
        bail!("invalid --max-sequence-length: must be between 2 and {MAX_SEQUENCE_LENGTH}, got {max_seq}");
    }
    let side = FLUX_DEFAULT_SAMPLE_SIZE * pipe.core.latent_factor();
    let params = GenerateParams {
        prompt: args.prompt.clone(),
        negative_prompt: None,
        width: args.width.unwrap_or(side),
        height: args.height.unwrap_or(side),
        steps,
        guidance,
        seed: args.seed.unwrap_or_else(|| rand::random::<u32>() as u64),
        sampler: sd_models::samplers::SamplerKind::Euler,
        batch: args.batch,
    };
    let p = sd_engine::backend::flux_params(&params);
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
    super::print_warnings(&warnings);
    if clip_dropped > 0 {
        eprintln!("warning: the prompt was truncated for CLIP; {clip_dropped} tokens were dropped");
    }
    if t5_dropped > 0 {
        eprintln!(
            "warning: the prompt was truncated for T5 (--max-sequence-length {max_seq}); {t5_dropped} tokens were dropped"
        );
    }
    let paths = output_paths(&args.output, images.len());
    let result = ResultInfo {
        strength: init.as_ref().map(|(_, s)| *s),
        flux: Some(dev),
        model: &name,
        loras,
    };
    for (png, path) in encode_job_results(&params, &result, &images)?
        .iter()
        .zip(&paths)
    {
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
