//! FLUX building blocks against diffusers on tiny random weights.
//!
//! Expected numbers come from `scripts/make_flux_fixtures.py` (diffusers 0.42.1, torch
//! 2.15.0, CPU, f32): one `FluxTransformer2DModel` forward pass of a dev-like model (guidance
//! embedding, 2 double + 2 single blocks) and a schnell-like one (no guidance), batch 2 with
//! different timesteps, a 6x4 latent grid and 7 text tokens; and the sigma / timestep
//! schedules `FluxPipeline` gives `FlowMatchEulerDiscreteScheduler` for the dev and schnell
//! scheduler configs at 11 (steps, image sequence length) pairs each.
//!
//! Tolerances: schedules bit for bit (float32); `mu` within 1e-12; the transformer output
//! within 1e-4 relative to its largest magnitude (torch's float32 exp/sin/tanh and reduction
//! orders differ from ours by an ulp here and there).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sd_models::modules::config::JsonConfig;
use sd_models::modules::flux::{FluxConfig, FluxTransformer};
use sd_models::samplers::flow_match::{FlowMatchConfig, FlowMatchEuler};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux")
}

#[test]
fn flux_schedules_equal_diffusers() {
    let text = std::fs::read_to_string(fixtures().join("reference/scheduler.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 22);
    for case in cases {
        let name = case["config"].as_str().unwrap();
        let cfg = FlowMatchConfig::from_config(&JsonConfig::from_value(
            "scheduler_config.json",
            v["configs"][name].clone(),
        ))
        .unwrap();
        let n = case["num_inference_steps"].as_u64().unwrap() as usize;
        let seq = case["image_seq_len"].as_u64().unwrap() as usize;
        let mu = cfg.mu(seq);
        let want_mu = case["mu"].as_f64().unwrap();
        assert!(
            (mu - want_mu).abs() <= 1e-12,
            "{name} n={n} seq={seq}: mu {mu} vs {want_mu}"
        );
        let s = FlowMatchEuler::new(&cfg, n, Some(mu)).unwrap();
        let f32s = |key: &str| -> Vec<f32> {
            case[key]["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        };
        assert_eq!(s.sigmas, f32s("sigmas"), "{name} n={n} seq={seq}: sigmas");
        assert_eq!(
            s.timesteps,
            f32s("timesteps"),
            "{name} n={n} seq={seq}: timesteps"
        );
        let model_t: Vec<f32> = s.timesteps.iter().map(|t| t / 1000.0).collect();
        assert_eq!(
            model_t,
            f32s("model_timestep"),
            "{name} n={n} seq={seq}: t / 1000"
        );
    }
}

fn max_rel_diff(got: &Tensor, want: &Tensor) -> (f32, f32) {
    let diff: f32 = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    let scale: f32 = want
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    (diff, scale)
}

#[test]
fn flux_transformer_matches_diffusers() {
    for name in ["dev", "schnell"] {
        let dir = fixtures().join(format!("transformer-{name}"));
        let cfg =
            FluxConfig::from_config(&JsonConfig::load(&dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg.guidance_embeds, name == "dev");
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[dir.join("diffusion_pytorch_model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )
            .unwrap()
        };
        let model = FluxTransformer::new(vb, &cfg).unwrap();
        let r = candle_core::safetensors::load(
            fixtures().join(format!("reference/transformer-{name}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let out = model
            .forward(
                &r["hidden_states"],
                &r["encoder_hidden_states"],
                &r["pooled_projections"],
                &r["timestep"],
                r.get("guidance"),
                &r["img_ids"],
                &r["txt_ids"],
            )
            .unwrap();
        let want = &r["sample"];
        assert_eq!(out.dims(), want.dims());
        let (diff, scale) = max_rel_diff(&out, want);
        assert!(
            (diff as f64) <= 1e-4 * (scale as f64).max(1.0),
            "{name}: transformer output differs from diffusers by {diff:e} (scale {scale})"
        );
    }
}

fn load_core(model: &str) -> sd_models::pipelines::flux::FluxCore {
    use sd_models::modules::vae::{Vae, VaeConfig};
    let dir = fixtures().join(format!("transformer-{model}"));
    let cfg =
        FluxConfig::from_config(&JsonConfig::load(&dir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("diffusion_pytorch_model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let transformer = FluxTransformer::new(vb, &cfg).unwrap();
    let vdir = fixtures().join("vae");
    let vcfg =
        VaeConfig::from_config(&JsonConfig::load(&vdir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[vdir.join("diffusion_pytorch_model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let vae = Vae::new(vb, &vcfg).unwrap();
    let scheduler = FlowMatchConfig::from_config(
        &JsonConfig::load(&fixtures().join(format!("scheduler-{model}/scheduler_config.json")))
            .unwrap(),
    )
    .unwrap();
    sd_models::pipelines::flux::FluxCore {
        transformer,
        vae,
        scheduler,
        device: Device::Cpu,
        dtype: DType::F32,
    }
}

/// diffusers' FluxPipeline from the same prompt embeddings (`scripts/make_flux_pipeline_fixtures.py`):
/// seeded packed latents exactly (1e-6), latents after step 1 and at the end within 1e-4
/// relative, images within max 3 / mean 0.5 levels.
#[test]
fn flux_pipeline_matches_diffusers_from_embeddings() {
    use sd_models::pipelines::flux::{pack, FluxParams};
    use sd_models::samplers::TorchRng;
    let text = std::fs::read_to_string(fixtures().join("reference/pipeline-cases.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let core = load_core(case["model"].as_str().unwrap());
        let r = candle_core::safetensors::load(
            fixtures().join(format!("reference/pipeline-{name}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let p = FluxParams {
            width: case["width"].as_u64().unwrap() as usize,
            height: case["height"].as_u64().unwrap() as usize,
            steps: case["steps"].as_u64().unwrap() as usize,
            guidance: case["guidance"].as_f64().unwrap(),
            seed: case["seed"].as_u64().unwrap(),
            batch: case["batch"].as_u64().unwrap() as usize,
        };
        let init = &r["latents_init"];
        let (b, seq, c4) = init.dims3().unwrap();
        let f = core.latent_factor();
        let (lh, lw) = (2 * (p.height / (2 * f)), 2 * (p.width / (2 * f)));
        assert_eq!((b, seq, c4), (p.batch, (lh / 2) * (lw / 2), 16));
        let noise = TorchRng::new(p.seed)
            .randn(&[p.batch, c4 / 4, lh, lw], &Device::Cpu)
            .unwrap();
        let (diff, _) = max_rel_diff(&pack(&noise).unwrap(), init);
        assert!(diff <= 1e-6, "{name}: initial latents differ by {diff:e}");

        let mut step1 = None;
        let mut last = None;
        let images = core
            .generate_from_embeddings(
                &r["prompt_embeds"],
                &r["pooled_prompt_embeds"],
                &p,
                &mut |pr| {
                    if pr.step == 1 {
                        step1 = Some(pr.latents.clone());
                    }
                    last = Some(pr.latents.clone());
                    Ok(())
                },
            )
            .unwrap();
        for (what, got, key) in [
            ("step 1", step1.unwrap(), "latents_step1"),
            ("final", last.unwrap(), "latents_final"),
        ] {
            let (diff, scale) = max_rel_diff(&got, &r[key]);
            assert!(
                (diff as f64) <= 1e-4 * (scale as f64).max(1.0),
                "{name}: {what} latents differ by {diff:e} (scale {scale})"
            );
        }
        let want: Vec<u8> = r["images"].flatten_all().unwrap().to_vec1().unwrap();
        let got: Vec<u8> = images
            .iter()
            .flat_map(|i| i.pixels.iter().copied())
            .collect();
        assert_eq!(got.len(), want.len(), "{name}: pixel count");
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        let mean = got
            .iter()
            .zip(&want)
            .map(|(a, b)| f64::from(a.abs_diff(*b)))
            .sum::<f64>()
            / got.len() as f64;
        assert!(
            max <= 3 && mean <= 0.5,
            "{name}: images differ by max {max}, mean {mean:.3}"
        );
    }
}

/// diffusers' FluxPipeline end to end from prompts on the tiny dev and schnell folders
/// (`scripts/make_flux_models.py`): prompt embeddings (CLIP pooled, T5) within 1e-4
/// relative, images within max 3 / mean 0.5 levels.
#[test]
fn flux_pipeline_from_prompts_matches_diffusers() {
    use sd_models::pipelines::flux::FluxParams;
    let text = std::fs::read_to_string(fixtures().join("reference/flux-cases.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let model = fixtures().join(format!("tiny-flux-{}", case["model"].as_str().unwrap()));
        assert!(sd_models::loader::is_flux_folder(&model));
        let pipe = sd_models::loader::load_flux(&model, &Device::Cpu, DType::F32).unwrap();
        let r = candle_core::safetensors::load(
            fixtures().join(format!("reference/flux-{name}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let prompt = case["prompt"].as_str().unwrap();
        let max_seq = case["max_sequence_length"].as_u64().unwrap() as usize;
        let enc = pipe.encode_prompt(prompt, max_seq).unwrap();
        for (what, got, key) in [
            ("T5 embeddings", &enc.embeds, "prompt_embeds"),
            ("CLIP pooled", &enc.pooled, "pooled_prompt_embeds"),
        ] {
            let (diff, scale) = max_rel_diff(got, &r[key]);
            assert!(
                (diff as f64) <= 1e-4 * (scale as f64).max(1.0),
                "{name}: {what} differ by {diff:e} (scale {scale})"
            );
        }
        let p = FluxParams {
            width: case["width"].as_u64().unwrap() as usize,
            height: case["height"].as_u64().unwrap() as usize,
            steps: case["steps"].as_u64().unwrap() as usize,
            guidance: case["guidance"].as_f64().unwrap(),
            seed: case["seed"].as_u64().unwrap(),
            batch: case["batch"].as_u64().unwrap() as usize,
        };
        let (images, _) = pipe.generate(prompt, max_seq, &p, &mut |_| Ok(())).unwrap();
        let want: Vec<u8> = r["images"].flatten_all().unwrap().to_vec1().unwrap();
        let got: Vec<u8> = images
            .iter()
            .flat_map(|i| i.pixels.iter().copied())
            .collect();
        assert_eq!(got.len(), want.len(), "{name}: pixel count");
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        let mean = got
            .iter()
            .zip(&want)
            .map(|(a, b)| f64::from(a.abs_diff(*b)))
            .sum::<f64>()
            / got.len() as f64;
        assert!(
            max <= 3 && mean <= 0.5,
            "{name}: images differ by max {max}, mean {mean:.3}"
        );
    }
}

/// The same transformers written as single files with the original key names
/// (`scripts/make_flux_single_file.py`, checked there against diffusers' own converter; the dev
/// file has the `model.diffusion_model.` prefix) load to the same network: same output as
/// the diffusers layout, config inferred from the shapes (rotary axes given).
#[test]
fn single_file_transformers_with_original_names_load() {
    for name in ["dev", "schnell"] {
        let dir = fixtures().join(format!("transformer-{name}"));
        let cfg =
            FluxConfig::from_config(&JsonConfig::load(&dir.join("config.json")).unwrap()).unwrap();
        let file = fixtures().join(format!("transformer-{name}-original.safetensors"));
        let model = sd_models::loader::load_flux_transformer_file(
            &file,
            Some(cfg.axes_dims_rope.clone()),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        assert_eq!(model.config, cfg, "{name}: inferred config");
        let r = candle_core::safetensors::load(
            fixtures().join(format!("reference/transformer-{name}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let out = model
            .forward(
                &r["hidden_states"],
                &r["encoder_hidden_states"],
                &r["pooled_projections"],
                &r["timestep"],
                r.get("guidance"),
                &r["img_ids"],
                &r["txt_ids"],
            )
            .unwrap();
        let (diff, scale) = max_rel_diff(&out, &r["sample"]);
        assert!(
            (diff as f64) <= 1e-4 * (scale as f64).max(1.0),
            "{name}: {diff:e}"
        );
        // Without the axes the tiny head size (8) cannot be resolved: a clear error.
        let e =
            sd_models::loader::load_flux_transformer_file(&file, None, &Device::Cpu, DType::F32)
                .err()
                .unwrap()
                .to_string();
        assert!(e.contains("rotary axes"), "{e}");
    }
    let e = sd_models::loader::load_flux_transformer_file(
        &fixtures().join("x.gguf"),
        None,
        &Device::Cpu,
        DType::F32,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("GGUF"), "{e}");
}
