//! Every sampler and schedule through the whole Stable Diffusion pipeline, against
//! diffusers' images on the same tiny random models.
//!
//! Reference: `fixtures/reference/samplers/`, written by
//! `scripts/make_sampler_image_fixtures.py` (diffusers 0.42.1, torch 2.15 CPU, f32): per case
//! `StableDiffusionPipeline` (or `StableDiffusionImg2ImgPipeline`) on `fixtures/models/
//! tiny-sd1` (epsilon) or `tiny-sd2` (v-prediction) with
//! `pipe.scheduler = Class.from_config(pipe.scheduler.config, **sampler_and_schedule)`, a
//! non-square size, 4-8 steps, `eta` for DDIM and TCD, and the final uint8 images. Here the same request runs
//! through `SdPipeline` with our sampler and schedule; the images must agree within max 3
//! and mean 0.5 levels of 255 (the project's image tolerance), and the timesteps the
//! pipeline ran within 1e-3 (0.05 for DPM2 ancestral's ill-conditioned intermediate
//! timesteps, see `tests/samplers.rs`).

mod common;

use candle_core::{DType, Device};
use common::{fixtures, read_rgb_png};
use sd_models::loader::load_sd;
use sd_models::pipelines::{GenerateParams, ImageInput, RgbImage, SdPipeline};
use sd_models::samplers::{build_sampler, SamplerKind, Schedule};
use serde_json::Value;

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("reference/samplers/cases.json"))
        .expect("fixtures/reference/samplers/cases.json");
    let v: Value = serde_json::from_str(&text).expect("cases.json");
    v["cases"].as_array().expect("cases").clone()
}

fn pipeline(model: &str) -> SdPipeline {
    load_sd(
        &fixtures().join("models").join(model),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_or_else(|e| panic!("loading {model}: {e}"))
    .0
}

/// Runs one case and compares; returns the case's name and its (max, mean) difference.
fn run(case: &Value, pipe: &SdPipeline) -> (String, u8, f64) {
    let name = case["name"].as_str().expect("name").to_string();
    let sampler = SamplerKind::from_name(case["sampler"].as_str().expect("sampler"))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let schedule = Schedule::from_name(case["schedule"].as_str().expect("schedule"))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let p = GenerateParams {
        prompt: case["prompt"].as_str().expect("prompt").to_string(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_string),
        width: case["width"].as_u64().expect("width") as usize,
        height: case["height"].as_u64().expect("height") as usize,
        steps: case["steps"].as_u64().expect("steps") as usize,
        guidance: case["guidance"].as_f64().expect("guidance"),
        seed: case["seed"].as_u64().expect("seed"),
        sampler,
        schedule,
        eta: case["eta"].as_f64().unwrap_or(0.0),
        s_noise: 1.0,
        batch: case["batch"].as_u64().expect("batch") as usize,
        prompt_syntax: Default::default(),
        micro: Default::default(),
    };

    // The timesteps diffusers ran: the sampler's list from the image-to-image start on.
    let strength = case["strength"].as_f64();
    let built = build_sampler(
        sampler,
        schedule,
        &pipe.scheduler.for_pipeline(false),
        p.steps,
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    let start = match strength {
        Some(s) => SdPipeline::img2img_start(p.steps, s).expect("start") * built.order(),
        None => 0,
    };
    let want_ts: Vec<f64> = case["timesteps"]
        .as_array()
        .expect("timesteps")
        .iter()
        .map(|t| t.as_f64().expect("timestep"))
        .collect();
    let got_ts = &built.timesteps()[start..];
    let tol = if sampler == SamplerKind::Dpm2Ancestral {
        0.05
    } else {
        1e-3
    };
    assert!(
        got_ts.len() == want_ts.len()
            && got_ts
                .iter()
                .zip(&want_ts)
                .all(|(g, w)| (g - w).abs() <= tol),
        "{name}: timesteps {got_ts:?}, diffusers ran {want_ts:?}"
    );

    let out = match (case["pipeline"].as_str(), strength) {
        (Some("img2img"), Some(strength)) => {
            let path = fixtures().join(case["image"].as_str().expect("image"));
            let (width, height, pixels) = read_rgb_png(&path);
            let input = ImageInput {
                image: RgbImage {
                    width,
                    height,
                    pixels,
                },
                strength,
                mask: None,
            };
            pipe.generate_from_image(&p, &input, &mut |_| Ok(()))
        }
        (Some("txt2img"), None) => pipe.generate(&p, &mut |_| Ok(())),
        other => panic!("{name}: unexpected pipeline {other:?}"),
    }
    .unwrap_or_else(|e| panic!("{name}: {e}"));

    let reference = candle_core::safetensors::load(
        fixtures()
            .join("reference/samplers")
            .join(format!("{name}.safetensors")),
        &Device::Cpu,
    )
    .expect("reference images");
    let want = reference["images"]
        .flatten_all()
        .and_then(|t| t.to_vec1::<u8>())
        .expect("images");
    let got: Vec<u8> = out
        .images
        .iter()
        .flat_map(|i| i.pixels.iter().copied())
        .collect();
    assert_eq!(got.len(), want.len(), "{name}: image size");
    let max = got
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    let mean = got
        .iter()
        .zip(&want)
        .map(|(a, b)| f64::from(a.abs_diff(*b)))
        .sum::<f64>()
        / got.len() as f64;
    (name, max, mean)
}

#[test]
fn every_sampler_and_schedule_matches_diffusers_images() {
    let cases = cases();
    let (sd1, sd2) = (pipeline("tiny-sd1"), pipeline("tiny-sd2"));
    let mut seen = std::collections::HashSet::new();
    let mut ran = 0;
    let mut failures = Vec::new();
    for case in &cases {
        let pipe = match case["model"].as_str() {
            Some("tiny-sd1") => &sd1,
            Some("tiny-sd2") => &sd2,
            other => panic!("unknown model {other:?}"),
        };
        let (name, max, mean) = run(case, pipe);
        println!("{name}: max {max}, mean {mean:.3} levels");
        if max > 3 || mean > 0.5 {
            failures.push(format!("{name}: max {max}, mean {mean:.3} levels"));
        }
        seen.insert((
            case["sampler"].as_str().unwrap_or("").to_string(),
            case["model"].as_str().unwrap_or("").to_string(),
        ));
        ran += 1;
    }
    assert!(
        failures.is_empty(),
        "images differ from diffusers' by more than max 3 / mean 0.5 levels:\n{}",
        failures.join("\n")
    );
    // Every sampler on both prediction types.
    for kind in SamplerKind::all() {
        for model in ["tiny-sd1", "tiny-sd2"] {
            assert!(
                seen.contains(&(kind.name().to_string(), model.to_string())),
                "no image case for {kind} on {model}"
            );
        }
    }
    assert!(ran >= 45, "{ran} cases ran");
}
