//! Parity with diffusers on the tiny random models in `fixtures/models`.
//!
//! The expected numbers come from `scripts/make_fixtures.py`, which runs diffusers'
//! `StableDiffusionPipeline` (diffusers 0.42.1, transformers 5.24.0, torch 2.15.0, CPU, f32)
//! on the same weights and stores, per case in `fixtures/reference/<case>.safetensors`:
//! the final uint8 images, the seeded initial noise, the first UNet call's inputs and output,
//! the latents after the first sampler step, and the VAE's float decode of the final latents.
//!
//! Tolerances: images within max 3 and mean 0.5 levels of 255; initial noise within 1e-6;
//! text embeddings, the first UNet input and output, the step-1 latents and the VAE decode
//! within 1e-4 relative to the tensor's largest magnitude.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures};
use sd_models::loader::load_sd;
use sd_models::pipelines::{GenerateParams, SdPipeline};
use sd_models::samplers::{build_sampler, TorchRng};
use serde_json::Value;

fn cases() -> &'static HashMap<String, Value> {
    static CASES: OnceLock<HashMap<String, Value>> = OnceLock::new();
    CASES.get_or_init(|| {
        let text = std::fs::read_to_string(fixtures().join("reference/cases.json"))
            .expect("fixtures/reference/cases.json");
        let v: Value = serde_json::from_str(&text).expect("cases.json");
        v["cases"]
            .as_array()
            .expect("cases array")
            .iter()
            .map(|c| (c["name"].as_str().expect("name").to_string(), c.clone()))
            .collect()
    })
}

fn pipeline(model: &str) -> SdPipeline {
    let (p, _) = load_sd(
        &fixtures().join("models").join(model),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_or_else(|e| panic!("loading {model}: {e}"));
    p
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
        micro: Default::default(),
    }
}

fn check_case(name: &str) {
    let case = &cases()[name];
    let pipe = pipeline(case["model"].as_str().unwrap());
    let reference = candle_core::safetensors::load(
        fixtures()
            .join("reference")
            .join(format!("{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let p = params(case, &pipe);
    let cfg = p.guidance > 1.0;

    // Text embeddings as the UNet receives them.
    let (emb, _) = pipe
        .encode_prompt(&p.prompt, p.negative_prompt.as_deref(), p.batch, cfg)
        .unwrap();
    assert_close(
        name,
        "prompt embeddings",
        &emb,
        &reference["prompt_embeds"],
        1e-4,
    );

    // Seeded initial noise.
    let noise_ref = &reference["noise"];
    let mut rng = TorchRng::new(p.seed);
    let noise = rng.randn(noise_ref.dims(), &Device::Cpu).unwrap();
    assert_close(name, "initial noise", &noise, noise_ref, 1e-6);

    // First UNet input (noise * init sigma, doubled for guidance, scaled by the sampler).
    let sampler = build_sampler(p.sampler, p.schedule, &pipe.scheduler, p.steps).unwrap();
    let latents = (noise * sampler.init_noise_sigma()).unwrap();
    let input = if cfg {
        Tensor::cat(&[&latents, &latents], 0).unwrap()
    } else {
        latents
    };
    let input = sampler.scale_model_input(&input, 0).unwrap();
    assert_close(
        name,
        "first UNet input",
        &input,
        &reference["unet_in"],
        1e-5,
    );
    let t_ref: Vec<f32> = reference["timestep"].to_vec1().unwrap();
    assert!(
        (sampler.timesteps()[0] - t_ref[0] as f64).abs() < 1e-3,
        "{name}: first timestep {} vs diffusers {}",
        sampler.timesteps()[0],
        t_ref[0]
    );

    // First UNet output on exactly diffusers' inputs.
    let out = pipe
        .unet
        .forward(
            &reference["unet_in"],
            t_ref[0] as f64,
            &reference["prompt_embeds"],
        )
        .unwrap();
    assert_close(
        name,
        "first UNet output",
        &out,
        &reference["unet_out"],
        1e-4,
    );

    // The VAE alone, on diffusers' final latents.
    let decoded = pipe.vae.decode(&reference["latents_final"]).unwrap();
    assert_close(name, "VAE decode", &decoded, &reference["decoded"], 1e-4);

    // The full run: step-1 latents and the final images.
    let mut step1 = None;
    let generated = pipe
        .generate(&p, &mut |progress| {
            if progress.step == 1 {
                step1 = Some(progress.latents.clone());
            }
            Ok(())
        })
        .unwrap();
    assert_close(
        name,
        "latents after step 1",
        step1.as_ref().unwrap(),
        &reference["latents_step1"],
        1e-4,
    );
    let want = &reference["images"];
    let (b, h, w, c) = want.dims4().unwrap();
    assert_eq!((generated.images.len(), c), (b, 3), "{name}: image count");
    let mut got = Vec::with_capacity(b * h * w * 3);
    for img in &generated.images {
        assert_eq!((img.width, img.height), (w, h), "{name}: image size");
        got.extend_from_slice(&img.pixels);
    }
    common::assert_images_close(name, &got, &common::bytes(&reference["images"]));
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
    sd1_pndm_cfg => "sd1-pndm-cfg",
    sd1_ddim_negative => "sd1-ddim-neg",
    sd1_euler_no_cfg_wide => "sd1-euler-nocfg-wide",
    sd1_euler_a_batch => "sd1-euler-a-batch",
    sd1_dpmpp_2m_long_prompt => "sd1-dpmpp-2m-long",
    sd1_dpmpp_2m_karras_tall => "sd1-dpmpp-2m-karras-tall",
    sd1_euler_large_winograd => "sd1-euler-large",
    sd2_ddim_cfg => "sd2-ddim-cfg",
    sd2_euler_odd_latents => "sd2-euler-odd",
    sd2_euler_a_batch_negative => "sd2-euler-a-batch-neg",
    sd2_dpmpp_2m_no_cfg => "sd2-dpmpp-2m-nocfg",
    sd2_dpmpp_2m_karras_long => "sd2-dpmpp-2m-karras",
    sd2_pndm_prk_wide => "sd2-pndm-wide",
}
