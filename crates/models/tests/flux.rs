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

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use sd_models::modules::config::JsonConfig;
use sd_models::modules::flux::{FluxConfig, FluxTransformer};
use sd_models::pipelines::flux::FluxParams;
use sd_models::samplers::flow_match::{FlowMatchConfig, FlowMatchEuler};
use serde_json::Value;

fn fixtures() -> PathBuf {
    common::fixtures().join("flux")
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

#[test]
fn flux_transformer_matches_diffusers() {
    for name in ["dev", "schnell"] {
        let (model, cfg) = common::flux_transformer(name);
        assert_eq!(cfg.guidance_embeds, name == "dev");
        let r = candle_core::safetensors::load(
            fixtures().join(format!("reference/transformer-{name}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let out = common::flux_forward(&model, &r);
        common::assert_close(name, "transformer output", &out, &r["sample"], 1e-4);
    }
}

fn load_core(model: &str) -> sd_models::pipelines::flux::FluxCore {
    use sd_models::modules::vae::{Vae, VaeConfig};
    let (transformer, _) = common::flux_transformer(model);
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

/// The generation parameters of a reference case; a case without a size takes `default_side`.
fn case_params(case: &Value, default_side: Option<usize>) -> FluxParams {
    let side = |key: &str| {
        case[key]
            .as_u64()
            .map(|v| v as usize)
            .or(default_side)
            .unwrap_or_else(|| panic!("case without {key}"))
    };
    FluxParams {
        width: side("width"),
        height: side("height"),
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance: case["guidance"].as_f64().unwrap(),
        seed: case["seed"].as_u64().unwrap(),
        batch: case["batch"].as_u64().unwrap() as usize,
    }
}

/// diffusers' FluxPipeline from the same prompt embeddings (`scripts/make_flux_pipeline_fixtures.py`):
/// seeded packed latents exactly (1e-6), latents after step 1 and at the end within 1e-4
/// relative, images within max 3 / mean 0.5 levels.
#[test]
fn flux_pipeline_matches_diffusers_from_embeddings() {
    use sd_models::pipelines::flux::pack;
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
        let p = case_params(case, None);
        let init = &r["latents_init"];
        let (b, seq, c4) = init.dims3().unwrap();
        let f = core.latent_factor();
        let (lh, lw) = (2 * (p.height / (2 * f)), 2 * (p.width / (2 * f)));
        assert_eq!((b, seq, c4), (p.batch, (lh / 2) * (lw / 2), 16));
        let noise = TorchRng::new(p.seed)
            .randn(&[p.batch, c4 / 4, lh, lw], &Device::Cpu)
            .unwrap();
        let (diff, _) = common::max_rel_diff(&pack(&noise).unwrap(), init);
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
            common::assert_close(name, &format!("{what} latents"), &got, &r[key], 1e-4);
        }
        let got: Vec<u8> = images
            .iter()
            .flat_map(|i| i.pixels.iter().copied())
            .collect();
        common::assert_images_close(name, &got, &common::bytes(&r["images"]));
    }
}

/// diffusers' FluxPipeline end to end from prompts on the tiny dev and schnell folders
/// (`scripts/make_flux_models.py`): prompt embeddings (CLIP pooled, T5) within 1e-4
/// relative, images within max 3 / mean 0.5 levels.
#[test]
fn flux_pipeline_from_prompts_matches_diffusers() {
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
            common::assert_close(name, what, got, &r[key], 1e-4);
        }
        let p = case_params(case, None);
        let (images, _) = pipe.generate(prompt, max_seq, &p, &mut |_| Ok(())).unwrap();
        let got: Vec<u8> = images
            .iter()
            .flat_map(|i| i.pixels.iter().copied())
            .collect();
        common::assert_images_close(name, &got, &common::bytes(&r["images"]));
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
        let out = common::flux_forward(&model, &r);
        common::assert_close(
            name,
            "single-file transformer output",
            &out,
            &r["sample"],
            1e-4,
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
        &fixtures().join("x.ckpt"),
        None,
        &Device::Cpu,
        DType::F32,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("pickle"), "{e}");
}

/// diffusers' FluxImg2ImgPipeline on the tiny folders (`scripts/make_flux_models.py`): strengths
/// 0.6 / 0.75 / 1, batch 2, an input resized to a non-square size, the default size for an
/// input of another size; images within max 3 / mean 0.5 levels.
#[test]
fn flux_img2img_matches_diffusers() {
    use sd_models::pipelines::flux::FluxCore;
    use sd_models::pipelines::RgbImage;
    let text = std::fs::read_to_string(fixtures().join("reference/flux-i2i-cases.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let model = fixtures().join(format!("tiny-flux-{}", case["model"].as_str().unwrap()));
        let pipe = sd_models::loader::load_flux(&model, &Device::Cpu, DType::F32).unwrap();
        let (width, height, pixels) = common::read_rgb_png(
            &common::fixtures()
                .join("inputs")
                .join(case["image"].as_str().unwrap()),
        );
        let side = 128 * pipe.core.latent_factor();
        let p = case_params(case, Some(side));
        let strength = case["strength"].as_f64().unwrap();
        let image = RgbImage {
            width,
            height,
            pixels,
        };
        let (images, _) = pipe
            .generate_from_image(
                case["prompt"].as_str().unwrap(),
                case["max_sequence_length"].as_u64().unwrap() as usize,
                &image,
                strength,
                &p,
                &mut |_| Ok(()),
            )
            .unwrap();
        let r = candle_core::safetensors::load(
            fixtures().join(format!("reference/flux-{name}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let got: Vec<u8> = images
            .iter()
            .flat_map(|i| i.pixels.iter().copied())
            .collect();
        common::assert_images_close(name, &got, &common::bytes(&r["images"]));
    }
    // diffusers' float rule: 10 steps x 0.75 -> start int(2.5) = 2; any strength above 0
    // runs at least one step (10 x 0.05 -> start int(9.5) = 9).
    assert_eq!(FluxCore::img2img_start(10, 0.75).unwrap(), 2);
    assert_eq!(FluxCore::img2img_start(4, 1.0).unwrap(), 0);
    assert_eq!(FluxCore::img2img_start(10, 0.05).unwrap(), 9);
    assert!(FluxCore::img2img_start(10, 0.0).is_err());
}

/// GGUF transformers (`scripts/make_flux_gguf.py`: Q8_0, Q5_0, Q5_1, Q4_0 and Q4_1 with the
/// original key names, small tensors in F32): equal to diffusers on gguf's dequantised weights
/// (dequantize-then-run, 1e-4 relative), within a looser tolerance of the f32 model (Q8_0 2e-2,
/// Q5 8e-2, Q4 0.15 relative to the largest magnitude; measured 4.3e-3, 3.7e-2 / 2.8e-2,
/// 7.8e-2 / 7.0e-2), and bit for bit equal to our own network run on the weights dequantised
/// at load.
#[test]
fn gguf_transformers_dequantize_per_layer() {
    let cfg = FluxConfig::from_config(
        &JsonConfig::load(&fixtures().join("transformer-q/config.json")).unwrap(),
    )
    .unwrap();
    let r = candle_core::safetensors::load(
        fixtures().join("reference/transformer-q.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let run = |m: &FluxTransformer| common::flux_forward(m, &r);
    for (label, loose) in [
        ("Q8_0", 2e-2),
        ("Q5_0", 8e-2),
        ("Q5_1", 8e-2),
        ("Q4_0", 0.15),
        ("Q4_1", 0.15),
    ] {
        let file = fixtures().join(format!("transformer-q-{label}.gguf"));
        let model = sd_models::loader::load_flux_transformer_file(
            &file,
            Some(cfg.axes_dims_rope.clone()),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        assert_eq!(model.config, cfg, "{label}: inferred config");
        let out = run(&model);
        common::assert_close(
            label,
            "vs dequantize-then-run",
            &out,
            &r[&format!("sample_{label}")],
            1e-4,
        );
        common::assert_close(label, "vs f32", &out, &r["sample_f32"], loose);

        // Dequantize everything at load and run the dense network: the same bits.
        let dense_out = run(&common::dequantized_flux(&file, &cfg));
        let (diff, _) = common::max_rel_diff(&out, &dense_out);
        assert_eq!(
            diff, 0.0,
            "{label}: per-layer dequantization differs from dequantize-at-load"
        );
    }
}

/// Malformed transformer files are errors, never panics.
#[test]
fn malformed_transformer_shapes_are_errors() {
    use sd_models::modules::flux::{infer_config_from_shapes, original_plan};
    let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
    shapes.insert("x_embedder.weight".into(), vec![16]);
    assert!(infer_config_from_shapes(&shapes, None).is_err());
    shapes.insert("x_embedder.weight".into(), vec![16, 4]);
    shapes.insert("transformer_blocks.0.attn.norm_q.weight".into(), vec![]);
    assert!(infer_config_from_shapes(&shapes, None).is_err());
    // Original names with an absurd block index or a missing fused tensor.
    let mut orig: HashMap<String, Vec<usize>> = HashMap::new();
    orig.insert(
        "double_blocks.18446744073709551615.img_mod.lin.weight".into(),
        vec![4, 4],
    );
    assert!(original_plan(&orig).is_err());
}
