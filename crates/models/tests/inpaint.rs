//! Inpainting parity with diffusers' `StableDiffusionInpaintPipeline` on the tiny models:
//! the 4-channel method (a regular UNet, latents blended after each step) on tiny-sd1 and
//! tiny-sd2, and the 9-channel method on tiny-sd1-inpaint.
//!
//! Expected numbers come from `scripts/make_inpaint_fixtures.py` (diffusers 0.42.1,
//! torch 2.15.0, Pillow 13.0.0, CPU, f32), per case in
//! `fixtures/reference/inpaint/<case>.safetensors`: the input image and mask (RGB, L, palette
//! and 1-bit masks, of other sizes than the output), the binarised mask, the masked image's
//! latents, the starting latents, the latents after step 1 and at the end, the final images.
//! Cases cover strength 1 (pure noise for the 9-channel UNet) and below, batch 2, guidance
//! off, non-square sizes and every sampler family.
//!
//! Tolerances: the binarised mask exactly; latents within 1e-4 relative to the tensor's
//! largest magnitude (final latents 1e-3); images within max 3 and mean 0.5 levels.

mod common;

use candle_core::{DType, Device};
use common::{assert_close, assert_images_close, bytes, fixtures};
use sd_models::loader::load_sd;
use sd_models::pipelines::{
    GenerateParams, ImageInput, InpaintMethod, MaskImage, RgbImage, SdPipeline,
};
use sd_models::samplers::{build_sampler, SamplerKind, TorchRng};
use serde_json::Value;

fn run(name: &str, case: &Value) {
    let model = case["model"].as_str().unwrap();
    let (pipe, _) = load_sd(
        &fixtures().join("models").join(model),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let r = candle_core::safetensors::load(
        fixtures()
            .join("reference/inpaint")
            .join(format!("{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let (h, w, _) = r["input"].dims3().unwrap();
    let image = RgbImage {
        width: w,
        height: h,
        pixels: bytes(&r["input"]),
    };
    let mdims = r["mask"].dims().to_vec();
    let mask = MaskImage {
        width: mdims[1],
        height: mdims[0],
        channels: if mdims.len() == 3 { mdims[2] } else { 1 },
        pixels: bytes(&r["mask"]),
        nearest: bytes(&r["mask_nearest"])[0] == 1,
    };
    let strength = case["strength"].as_f64().unwrap();
    let input = ImageInput {
        image,
        strength,
        mask: Some(mask),
    };
    let (dw, dh) = pipe.default_size();
    let width = case["width"].as_u64().map_or(dw, |v| v as usize);
    let height = case["height"].as_u64().map_or(dh, |v| v as usize);
    let (sampler, schedule) = common::sampler_of(case, &pipe);
    let p = GenerateParams {
        prompt: case["prompt"].as_str().unwrap().to_string(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_string),
        width,
        height,
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance: case["guidance"].as_f64().unwrap(),
        seed: case["seed"].as_u64().unwrap(),
        sampler,
        schedule,
        eta: 0.0,
        s_noise: 1.0,
        batch: case["batch"].as_u64().unwrap() as usize,
        prompt_syntax: Default::default(),
        micro: Default::default(),
    };
    let unet9 = pipe.inpaint_method() == InpaintMethod::Unet9;
    assert_eq!(unet9, model.ends_with("-inpaint"));

    // The binarised mask.
    let mask_bin = pipe
        .preprocess_mask(input.mask.as_ref().unwrap(), width, height)
        .unwrap();
    assert_close(name, "binarised mask", &mask_bin, &r["mask_bin"], 0.0);

    // The draws in diffusers' order: init sample (unless 9 channels at strength 1), noise,
    // masked-image sample.
    let f = pipe.latent_factor();
    let lat = [p.batch, 4, height / f, width / f];
    let mut rng = TorchRng::new(p.seed);
    let pre = pipe.preprocess(&input.image, width, height).unwrap();
    let init = if !unet9 || strength < 1.0 {
        Some(
            pipe.encode_sample(&pre, &mut rng)
                .unwrap()
                .repeat((p.batch, 1, 1, 1))
                .unwrap(),
        )
    } else {
        None
    };
    let noise = rng.randn(&lat, &Device::Cpu).unwrap();
    let sampler = build_sampler(
        p.sampler,
        p.schedule,
        &pipe.scheduler.for_pipeline(true),
        p.steps,
    )
    .unwrap();
    let start = SdPipeline::img2img_start(p.steps, strength).unwrap();
    let latents_start = match (&init, strength < 1.0) {
        (Some(init), true) => sampler.add_noise(init, &noise, start).unwrap(),
        _ => (&noise * sampler.init_noise_sigma()).unwrap(),
    };
    assert_close(
        name,
        "starting latents",
        &latents_start,
        &r["latents_start"],
        1e-4,
    );
    let keep = r["mask_bin"]
        .lt(0.5f32)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let masked = pre.broadcast_mul(&keep).unwrap();
    let mil = pipe.encode_sample(&masked, &mut rng).unwrap();
    assert_close(
        name,
        "masked image latents",
        &mil,
        &r["masked_image_latents"].narrow(0, 0, 1).unwrap(),
        1e-4,
    );

    let mut step1 = None;
    let mut last = None;
    let out = pipe
        .generate_from_image(&p, &input, &mut |pr| {
            if pr.step == 1 {
                step1 = Some(pr.latents.clone());
            }
            last = Some(pr.latents.clone());
            Ok(())
        })
        .unwrap();
    assert_close(
        name,
        "latents after step 1",
        &step1.unwrap(),
        &r["latents_step1"],
        1e-4,
    );
    assert_close(
        name,
        "final latents",
        &last.unwrap(),
        &r["latents_final"],
        1e-3,
    );
    let got: Vec<u8> = out
        .images
        .iter()
        .flat_map(|i| i.pixels.iter().copied())
        .collect();
    assert_eq!(out.images.len(), p.batch);
    assert_eq!((out.images[0].width, out.images[0].height), (width, height));
    assert_images_close(name, &got, &bytes(&r["images"]));
}

#[test]
fn inpainting_matches_diffusers() {
    let text = std::fs::read_to_string(fixtures().join("reference/inpaint/cases.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        run(case["name"].as_str().unwrap(), case);
    }
}

#[test]
fn an_inpainting_model_only_inpaints() {
    let (pipe, _) = load_sd(
        &fixtures().join("models/tiny-sd1-inpaint"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    assert!(pipe.is_inpainting_model());
    let p = GenerateParams {
        prompt: "a".into(),
        negative_prompt: None,
        width: 32,
        height: 32,
        steps: 2,
        guidance: 7.5,
        seed: 0,
        sampler: SamplerKind::Euler,
        schedule: Default::default(),
        eta: 0.0,
        s_noise: 1.0,
        batch: 1,
        prompt_syntax: Default::default(),
        micro: Default::default(),
    };
    let e = pipe.generate(&p, &mut |_| Ok(())).unwrap_err().to_string();
    assert!(e.contains("inpainting model"), "{e}");
}
