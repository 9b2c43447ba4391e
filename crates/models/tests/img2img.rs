//! Image-to-image parity with diffusers' `StableDiffusionImg2ImgPipeline` on the tiny models.
//!
//! Expected numbers come from `scripts/make_img2img_fixtures.py` (diffusers 0.42.1,
//! torch 2.15.0, Pillow 13.0.0, CPU, f32), per case in
//! `fixtures/reference/img2img/<case>.safetensors`: the input image, its preprocessed tensor,
//! the scaled latent sample, the latents after `add_noise`, after the first step and at the
//! end, and the final images. Cases cover every sampler, both prediction types, strengths
//! 0.3 to 1, batch 2, a non-square input, an input whose size is not a multiple of the latent
//! factor (default size rounded down), and a resize to a requested size.
//!
//! Tolerances: the preprocessed image within 1e-6; latents within 1e-4 relative to the
//! tensor's largest magnitude (final latents 1e-3); images within max 3 and mean 0.5 levels.

mod common;

use candle_core::{DType, Device};
use common::{assert_close, assert_images_close, fixtures};
use sd_models::loader::load_sd;
use sd_models::pipelines::{GenerateParams, ImageInput, RgbImage, SdPipeline};
use sd_models::samplers::{build_sampler, TorchRng};
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
            .join("reference/img2img")
            .join(format!("{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let input = &r["input"];
    let (h, w, _) = input.dims3().unwrap();
    let image = RgbImage {
        width: w,
        height: h,
        pixels: input.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
    };
    let strength = case["strength"].as_f64().unwrap();
    let input = ImageInput {
        image,
        strength,
        mask: None,
    };
    let (dw, dh) = input.default_size(pipe.latent_factor());
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

    let pre = pipe.preprocess(&input.image, width, height).unwrap();
    assert_close(name, "preprocessed image", &pre, &r["preprocessed"], 1e-6);
    let mut rng = TorchRng::new(p.seed);
    let latents = pipe.encode_sample(&r["preprocessed"], &mut rng).unwrap();
    assert_close(name, "image latents", &latents, &r["image_latents"], 1e-4);
    let start = SdPipeline::img2img_start(p.steps, strength).unwrap();
    let sampler = build_sampler(p.sampler, p.schedule, &pipe.scheduler, p.steps).unwrap();
    let init = r["image_latents"].repeat((p.batch, 1, 1, 1)).unwrap();
    let noise = rng.randn(init.dims(), &Device::Cpu).unwrap();
    let noised = sampler.add_noise(&init, &noise, start).unwrap();
    assert_close(
        name,
        "latents after add_noise",
        &noised,
        &r["latents_start"],
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
    let want = r["images"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let got: Vec<u8> = out
        .images
        .iter()
        .flat_map(|i| i.pixels.iter().copied())
        .collect();
    assert_eq!(out.images.len(), p.batch);
    assert_eq!((out.images[0].width, out.images[0].height), (width, height));
    assert_images_close(name, &got, &want);
}

#[test]
fn img2img_matches_diffusers() {
    let text = std::fs::read_to_string(fixtures().join("reference/img2img/cases.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for case in cases {
        run(case["name"].as_str().unwrap(), case);
    }
}

#[test]
fn strength_that_runs_no_step_is_refused() {
    assert!(SdPipeline::img2img_start(10, 0.8).is_ok());
    assert_eq!(SdPipeline::img2img_start(10, 0.8).unwrap(), 2);
    assert_eq!(SdPipeline::img2img_start(10, 1.0).unwrap(), 0);
    for bad in [0.0, -0.1, 1.01, f64::NAN, 0.05] {
        let e = SdPipeline::img2img_start(10, bad).unwrap_err().to_string();
        assert!(e.contains("strength"), "{bad}: {e}");
    }
}
