//! SDXL parity with diffusers on the tiny random models `fixtures/models/tiny-sdxl` and
//! `tiny-sdxl-inpaint`, and of turbo models (those folders and `tiny-sd2` with the scheduler
//! SD-Turbo and SDXL-Turbo ship: Euler ancestral, trailing; 1-4 steps, guidance 0).
//!
//! The expected numbers come from `scripts/make_sdxl_fixtures.py`, which runs diffusers'
//! `StableDiffusionXLPipeline`, `StableDiffusionXLImg2ImgPipeline` and
//! `StableDiffusionXLInpaintPipeline` (diffusers 0.42.1, transformers 5.25.0, torch 2.15.0,
//! CPU, f32) on the same weights and stores, per case in `fixtures/reference/sdxl/`: the final
//! uint8 images, what the first UNet call received (concatenated prompt embeddings, pooled
//! `text_embeds`, `time_ids`, the latent input) and returned, and the latents after step 1.
//!
//! Tolerances: images within max 3 and mean 0.5 levels of 255; size ids exact; embeddings, the
//! first UNet output and the step-1 latents within 1e-4 relative to the tensor's largest
//! magnitude.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, bytes, fixtures};
use sd_models::loader::load_sd;
use sd_models::modules::unet::AddedCond;
use sd_models::pipelines::{
    GenerateParams, ImageInput, MaskImage, MicroConditioning, RgbImage, SdPipeline,
};
use serde_json::Value;

fn cases() -> &'static HashMap<String, Value> {
    static CASES: OnceLock<HashMap<String, Value>> = OnceLock::new();
    CASES.get_or_init(|| {
        let text = std::fs::read_to_string(fixtures().join("reference/sdxl/cases.json"))
            .expect("fixtures/reference/sdxl/cases.json");
        let v: Value = serde_json::from_str(&text).expect("cases.json");
        v["cases"]
            .as_array()
            .expect("cases array")
            .iter()
            .map(|c| (c["name"].as_str().expect("name").to_string(), c.clone()))
            .collect()
    })
}

/// A fixture model; `<base>-turbo` is the base folder with the scheduler SD-Turbo and
/// SDXL-Turbo ship (Euler ancestral, trailing spacing), copied under the test scratch space.
fn model_dir(model: &str) -> std::path::PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let Some(base) = model.strip_suffix("-turbo") else {
        return fixtures().join("models").join(model);
    };
    let _guard = LOCK.lock().unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{model}-{}", std::process::id()));
    if dir.exists() {
        return dir;
    }
    let src = fixtures().join("models").join(base);
    let staging = dir.with_extension("tmp");
    copy_dir(&src, &staging);
    let sched = staging.join("scheduler/scheduler_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&sched).unwrap()).unwrap();
    cfg["_class_name"] = "EulerAncestralDiscreteScheduler".into();
    cfg["timestep_spacing"] = "trailing".into();
    std::fs::write(&sched, cfg.to_string()).unwrap();
    std::fs::rename(&staging, &dir).unwrap();
    dir
}

fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
}

fn pipeline(model: &str) -> SdPipeline {
    let (p, info) = load_sd(&model_dir(model), &Device::Cpu, DType::F32)
        .unwrap_or_else(|e| panic!("loading {model}: {e}"));
    let family = if model.starts_with("tiny-sdxl") {
        "sdxl"
    } else {
        "sd2"
    };
    assert_eq!(info.family, family, "{model}");
    let variant = if model.ends_with("-turbo") {
        "turbo"
    } else if model.ends_with("-inpaint") {
        "inpaint"
    } else {
        "base"
    };
    assert_eq!(info.variant, variant, "{model}");
    p
}

fn pair(case: &Value, key: &str) -> Option<(u32, u32)> {
    case[key]
        .as_array()
        .map(|a| (a[0].as_u64().unwrap() as u32, a[1].as_u64().unwrap() as u32))
}

fn params(case: &Value, pipe: &SdPipeline) -> GenerateParams {
    let (sampler, schedule) = common::sampler_of(case, pipe);
    GenerateParams {
        prompt: case["prompt"].as_str().unwrap().to_string(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_string),
        width: case["width"].as_u64().unwrap() as usize,
        height: case["height"].as_u64().unwrap() as usize,
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance: case["guidance"].as_f64().unwrap(),
        seed: case["seed"].as_u64().unwrap(),
        sampler,
        schedule,
        eta: 0.0,
        s_noise: 1.0,
        batch: case["batch"].as_u64().unwrap() as usize,
        prompt_syntax: Default::default(),
        micro: MicroConditioning {
            original_size: pair(case, "original_size"),
            crops_coords_top_left: pair(case, "crops_coords_top_left"),
            target_size: pair(case, "target_size"),
            negative_original_size: pair(case, "negative_original_size"),
            negative_crops_coords_top_left: pair(case, "negative_crops_coords_top_left"),
            negative_target_size: pair(case, "negative_target_size"),
        },
    }
}

fn image_input(case: &Value, r: &HashMap<String, Tensor>) -> Option<ImageInput> {
    let input = r.get("input")?;
    let (h, w, _) = input.dims3().unwrap();
    let mask = r.get("mask").map(|m| {
        let d = m.dims().to_vec();
        MaskImage {
            width: d[1],
            height: d[0],
            channels: if d.len() == 3 { d[2] } else { 1 },
            pixels: bytes(m),
            nearest: bytes(&r["mask_nearest"])[0] == 1,
        }
    });
    Some(ImageInput {
        image: RgbImage {
            width: w,
            height: h,
            pixels: bytes(input),
        },
        strength: case["strength"].as_f64().unwrap(),
        mask,
    })
}

fn check_case(name: &str) {
    let case = &cases()[name];
    let pipe = pipeline(case["model"].as_str().unwrap());
    let r = candle_core::safetensors::load(
        fixtures()
            .join("reference/sdxl")
            .join(format!("{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let p = params(case, &pipe);
    let input = image_input(case, &r);
    let cfg = p.guidance > 1.0;

    // Everything the UNet is conditioned on.
    let (cond, _) = pipe.condition(&p, cfg, input.is_some()).unwrap();
    assert_close(
        name,
        "prompt embeddings",
        &cond.context,
        &r["prompt_embeds"],
        1e-4,
    );
    let reference_added = match (&cond.added, r.get("text_embeds")) {
        (Some(added), Some(text_embeds)) => {
            assert_close(
                name,
                "pooled text_embeds",
                &added.text_embeds,
                text_embeds,
                1e-4,
            );
            assert_close(name, "time_ids", &added.time_ids, &r["time_ids"], 0.0);
            Some(AddedCond {
                text_embeds: text_embeds.clone(),
                time_ids: r["time_ids"].clone(),
            })
        }
        (None, None) => None,
        _ => panic!("{name}: added conditioning present on one side only"),
    };

    // The first UNet call on exactly diffusers' inputs.
    let t: Vec<f32> = r["timestep"].to_vec1().unwrap();
    let out = pipe
        .unet
        .forward_with(
            &r["unet_in"],
            t[0] as f64,
            &r["prompt_embeds"],
            reference_added.as_ref(),
        )
        .unwrap();
    assert_close(name, "first UNet output", &out, &r["unet_out"], 1e-4);

    // The full run.
    let mut step1 = None;
    let mut on_step = |progress: sd_models::pipelines::Progress<'_>| {
        if progress.step == 1 {
            step1 = Some(progress.latents.clone());
        }
        Ok(())
    };
    let generated = match &input {
        None => pipe.generate(&p, &mut on_step),
        Some(input) => pipe.generate_from_image(&p, input, &mut on_step),
    }
    .unwrap();
    assert_close(
        name,
        "latents after step 1",
        step1.as_ref().unwrap(),
        &r["latents_step1"],
        1e-4,
    );
    let (b, h, w, _) = r["images"].dims4().unwrap();
    assert_eq!(generated.images.len(), b, "{name}: image count");
    let mut got = Vec::new();
    for img in &generated.images {
        assert_eq!((img.width, img.height), (w, h), "{name}: image size");
        got.extend_from_slice(&img.pixels);
    }
    common::assert_images_close(name, &got, &bytes(&r["images"]));
}

macro_rules! parity_tests {
    ($($fn_name:ident => $case:literal),* $(,)?) => {
        $(#[test] fn $fn_name() { check_case($case); })*

        #[test]
        fn every_reference_case_has_a_test() {
            let mut tested = vec![$($case),*];
            tested.sort();
            let mut all: Vec<&str> = cases().keys().map(String::as_str).collect();
            all.sort();
            assert_eq!(tested, all);
        }
    };
}

parity_tests! {
    xl_euler_cfg_zero_negative => "xl-euler-cfg",
    xl_euler_a_negative_wide_batch => "xl-euler-a-neg-wide-batch",
    xl_dpmpp_2m_long_prompt_empty_negative => "xl-dpmpp-2m-long-empty-neg",
    xl_ddim_no_cfg_micro_conditioning => "xl-ddim-nocfg-micro",
    xl_euler_negative_micro_conditioning => "xl-euler-negative-micro",
    xl_img2img_euler => "xl-i2i-euler-s06",
    xl_img2img_dpmpp_2m_wide_micro => "xl-i2i-dpmpp-2m-s08-wide-micro",
    xl_inpaint_blend_euler_a => "xl-inp-blend-euler-a",
    xl_inpaint_unet_euler_full_strength_wide => "xl-inp-unet-euler-s1-wide",
    sdxl_turbo_one_step => "xl-turbo-1step",
    sdxl_turbo_four_steps_wide => "xl-turbo-4step-wide",
    sd_turbo_one_step => "sd2-turbo-1step",
}

#[test]
fn micro_conditioning_is_refused_for_sd_models() {
    let (pipe, _) = load_sd(
        &fixtures().join("models/tiny-sd1"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let mut p = params(&cases()["xl-euler-cfg"], &pipe);
    p.micro.original_size = Some((64, 64));
    let err = pipe.generate(&p, &mut |_| Ok(())).unwrap_err().to_string();
    assert!(err.contains("original_size"), "{err}");
}

/// Tokenizer folders holding only `tokenizer.json` and `tokenizer_config.json` (no vocab.json /
/// merges.txt) give transformers' ids, pad tokens included.
#[test]
fn tokenizer_json_only_folders_match_transformers() {
    use sd_models::tokenizer::clip::ClipTokenizer;
    let text = std::fs::read_to_string(fixtures().join("reference/sdxl/tokens.json")).unwrap();
    let expected: Value = serde_json::from_str(&text).unwrap();
    for sub in ["tokenizer", "tokenizer_2"] {
        let dir = fixtures().join("models/tiny-sdxl-inpaint").join(sub);
        assert!(!dir.join("vocab.json").exists() && dir.join("tokenizer.json").is_file());
        let tok = ClipTokenizer::from_dir(&dir).unwrap();
        let cases = expected[sub].as_array().unwrap();
        assert!(cases.len() > 10);
        for case in cases {
            let prompt = case["prompt"].as_str().unwrap();
            let want: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let (got, _) = tok.encode_padded(prompt);
            assert_eq!(got, want, "{sub}: {prompt:?}");
        }
    }
}

/// A1111's prompt syntax on SDXL: a prompt without weights reads as diffusers reads it; a
/// long one keeps every 75-token chunk; an empty negative prompt gives zeros (as A1111
/// conditions SDXL).
#[test]
fn a1111_syntax_on_sdxl() {
    use sd_models::pipelines::PromptSyntax;
    let pipe = pipeline("tiny-sdxl");
    let mut p = params(&cases()["xl-euler-a-neg-wide-batch"], &pipe);
    let (plain, _) = pipe.condition(&p, true, false).unwrap();
    p.prompt_syntax = PromptSyntax::A1111;
    let (a1111, _) = pipe.condition(&p, true, false).unwrap();
    assert_close("a1111", "context", &a1111.context, &plain.context, 1e-6);
    let (pa, pp) = (a1111.added.unwrap(), plain.added.unwrap());
    assert_close("a1111", "pooled", &pa.text_embeds, &pp.text_embeds, 1e-6);

    p.prompt = format!(
        "{}, (a red chair:1.4)",
        cases()["xl-dpmpp-2m-long-empty-neg"]["prompt"]
            .as_str()
            .unwrap()
    );
    p.negative_prompt = Some(String::new());
    p.batch = 1;
    let (long, _) = pipe.condition(&p, true, false).unwrap();
    let (b, n, w) = long.context.dims3().unwrap();
    assert_eq!((b, w), (2, 80));
    assert!(n >= 3 * 77 && n % 77 == 0, "{n} tokens");
    // The zeros of the empty negative prompt fill its one chunk; the chunks it lacks are the
    // empty prompt's encoding, as A1111 pads the shorter side.
    let uncond = long.context.get(0).unwrap();
    let sum = |t: Tensor| -> f32 { t.abs().unwrap().sum_all().unwrap().to_scalar().unwrap() };
    assert_eq!(
        sum(uncond.narrow(0, 0, 77).unwrap()),
        0.0,
        "empty negative prompt: zeros"
    );
    assert!(sum(uncond.narrow(0, 77, 77).unwrap()) > 0.0);
    let cond: f32 = long
        .context
        .get(1)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(cond > 0.0);
}

/// As diffusers' SDXL pipelines, a VAE with `force_upcast` runs in f32 when the model is
/// loaded in half precision; the rest keeps the requested dtype.
#[test]
fn sdxl_vae_is_upcast_in_half_precision() {
    let (pipe, _) = load_sd(&model_dir("tiny-sdxl"), &Device::Cpu, DType::F16).unwrap();
    assert!(pipe.vae.config.force_upcast);
    assert_eq!(pipe.vae.dtype(), DType::F32);
    assert_eq!(pipe.unet.dtype(), DType::F16);
    let (sd, _) = load_sd(&model_dir("tiny-sd1"), &Device::Cpu, DType::F16).unwrap();
    assert_eq!(sd.vae.dtype(), DType::F16);
}

/// Tiled VAE decoding equals diffusers' `enable_tiling` decode (16-pixel tiles on the tiny
/// SDXL VAE, so that the image has 3 x 4 tiles) within 1e-4, and the whole decode is
/// unchanged without tiling.
#[test]
fn tiled_vae_decode_matches_diffusers() {
    let (mut pipe, _) = load_sd(&model_dir("tiny-sdxl"), &Device::Cpu, DType::F32).unwrap();
    let r = candle_core::safetensors::load(
        fixtures().join("reference/sdxl/vae-tiled.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let full = pipe.vae.decode_unscaled(&r["z"]).unwrap();
    assert_close("vae", "whole decode", &full, &r["full"], 1e-4);
    pipe.vae.tile_size = Some(16);
    let tiled = pipe.vae.decode_unscaled(&r["z"]).unwrap();
    assert_close("vae", "tiled decode", &tiled, &r["tiled"], 1e-4);
    // Tiles at least the image's size decode it whole.
    pipe.vae.tile_size = Some(64);
    let whole = pipe.vae.decode_unscaled(&r["z"]).unwrap();
    assert_close("vae", "one tile", &whole, &r["full"], 1e-4);
}
