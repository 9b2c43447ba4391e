//! LoRA parity with diffusers, base weights restored exactly, unmatched keys reported.
//!
//! The LoRA files and expected outputs come from `scripts/make_lora_fixtures.py` (diffusers
//! 0.42.1, peft 0.21.2, torch 2.15 CPU f32): diffusers/PEFT, kohya (with LoCon convolutions)
//! and, for FLUX, kohya and original-name layouts, on the tiny SD 1.x, SD 2.x and FLUX dev
//! models. Denoiser adapters are loaded by diffusers' `load_lora_weights`; text-encoder
//! adapters and the FLUX original-name adapters are merged into the weights there (see the
//! script). Tolerances as the other parity tests: final latents within 1e-4 relative, images
//! within max 3 / mean 0.5 levels.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, assert_images_close, bytes, fixtures};
use sd_models::lora::{self, LoraSpec};
use sd_models::modules::adapter::{with_adapters, AdapterSet};
use sd_models::pipelines::flux::FluxParams;
use sd_models::pipelines::GenerateParams;
use serde_json::Value;

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("lora/cases.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn lora_path(file: &str) -> PathBuf {
    fixtures().join("lora").join(file)
}

fn specs(case: &Value) -> Vec<LoraSpec> {
    case["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| LoraSpec {
            name: l[0].as_str().unwrap().to_string(),
            path: lora_path(l[0].as_str().unwrap()),
            strength: l[1].as_f64().unwrap(),
            strict: true,
        })
        .collect()
}

fn reference(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(format!("lora/reference/{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

fn sd_params(case: &Value, pipe: &sd_models::pipelines::SdPipeline) -> GenerateParams {
    let side = case["size"].as_u64().unwrap() as usize;
    GenerateParams {
        prompt: case["prompt"].as_str().unwrap().to_string(),
        negative_prompt: None,
        width: side,
        height: side,
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance: case["guidance"].as_f64().unwrap(),
        seed: case["seed"].as_u64().unwrap(),
        sampler: pipe.default_sampler().unwrap(),
        schedule: Default::default(),
        eta: 0.0,
        s_noise: 1.0,
        batch: 1,
        prompt_syntax: Default::default(),
        micro: Default::default(),
    }
}

fn load_sd(model: &str) -> sd_models::pipelines::SdPipeline {
    sd_models::loader::load_sd(
        &fixtures().join("models").join(model),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
    .0
}

/// Runs an SD case with `set` active: (image bytes, final latents).
fn run_sd(
    pipe: &sd_models::pipelines::SdPipeline,
    p: &GenerateParams,
    set: Option<Arc<AdapterSet>>,
) -> (Vec<u8>, Tensor) {
    let mut last = None;
    let out = with_adapters(set, || {
        pipe.generate(p, &mut |s| {
            last = Some(s.latents.clone());
            Ok(())
        })
    })
    .unwrap();
    let px = out.images.iter().flat_map(|i| i.pixels.clone()).collect();
    (px, last.unwrap())
}

#[test]
fn sd_loras_match_diffusers() {
    let mut checked = 0;
    for case in cases() {
        let model = case["model"].as_str().unwrap();
        if !model.starts_with("tiny-sd") {
            continue;
        }
        let name = case["name"].as_str().unwrap();
        let pipe = load_sd(model);
        let attached = lora::attach(&specs(&case), &pipe.lora_layers, &Device::Cpu, DType::F32)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(attached.warnings.is_empty());
        let r = reference(name);
        let (px, latents) = run_sd(
            &pipe,
            &sd_params(&case, &pipe),
            Some(Arc::new(attached.set)),
        );
        assert_close(name, "final latents", &latents, &r["latents_final"], 1e-4);
        assert_images_close(name, &px, &bytes(&r["images"]));
        checked += 1;
    }
    assert_eq!(checked, 4);
}

#[test]
fn flux_loras_match_diffusers() {
    let pipe = sd_models::loader::load_flux(
        &fixtures().join("flux/tiny-flux-dev"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let mut checked = 0;
    for case in cases() {
        if case["model"].as_str() != Some("tiny-flux-dev") {
            continue;
        }
        let name = case["name"].as_str().unwrap();
        let attached = lora::attach(&specs(&case), &pipe.lora_layers, &Device::Cpu, DType::F32)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let side = case["size"].as_u64().unwrap() as usize;
        let p = FluxParams {
            width: side,
            height: side,
            steps: case["steps"].as_u64().unwrap() as usize,
            guidance: case["guidance"].as_f64().unwrap(),
            seed: case["seed"].as_u64().unwrap(),
            batch: 1,
        };
        let mut last = None;
        let (images, _) = with_adapters(Some(Arc::new(attached.set)), || {
            pipe.generate(case["prompt"].as_str().unwrap(), 16, &p, &mut |s| {
                last = Some(s.latents.clone());
                Ok(())
            })
        })
        .unwrap();
        let r = reference(name);
        assert_close(
            name,
            "final latents",
            &last.unwrap(),
            &r["latents_final"],
            1e-4,
        );
        let px: Vec<u8> = images.iter().flat_map(|i| i.pixels.clone()).collect();
        assert_images_close(name, &px, &bytes(&r["images"]));
        checked += 1;
    }
    assert_eq!(checked, 3);
}

/// Adapters never touch the base weights: the base model's output after a hundred runs with
/// LoRAs (different files and strengths) is bit-identical to its output before them.
#[test]
fn base_weights_come_back_exactly() {
    let pipe = load_sd("tiny-sd1");
    let mut p = sd_params(&cases()[0], &pipe);
    p.steps = 1;
    let (before_px, before) = run_sd(&pipe, &p, None);
    let files = ["sd1-peft.safetensors", "sd1-kohya.safetensors"];
    for i in 0..100 {
        let spec = LoraSpec {
            name: files[i % 2].into(),
            path: lora_path(files[i % 2]),
            strength: 0.25 + (i % 7) as f64 * 0.25,
            strict: true,
        };
        let set = lora::attach(&[spec], &pipe.lora_layers, &Device::Cpu, DType::F32)
            .unwrap()
            .set;
        let (px, _) = run_sd(&pipe, &p, Some(Arc::new(set)));
        assert_ne!(px, before_px, "run {i}: the LoRA changed nothing");
    }
    let (after_px, after) = run_sd(&pipe, &p, None);
    assert_eq!(after_px, before_px);
    let diff: f32 = (&after - &before)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0, "latents after the LoRA runs differ by {diff}");
}

fn attach_err(file: &Path, layers: &[sd_models::modules::adapter::LayerInfo]) -> String {
    let spec = LoraSpec {
        name: "test.safetensors".into(),
        path: file.to_path_buf(),
        strength: 1.0,
        strict: true,
    };
    match lora::attach(&[spec], layers, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("{} attached", file.display()),
        Err(e) => e.to_string(),
    }
}

fn write_safetensors(path: &Path, tensors: &[(&str, Tensor)], metadata: Option<(&str, &str)>) {
    let meta =
        metadata.map(|(k, v)| std::collections::HashMap::from([(k.to_string(), v.to_string())]));
    safetensors::serialize_to_file(tensors.iter().map(|(k, t)| (*k, t)), meta, path).unwrap();
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn unmatched_keys_are_errors_that_list_them() {
    let sd1 = load_sd("tiny-sd1");
    // A FLUX LoRA on an SD model: nothing matches.
    let e = attach_err(&lora_path("flux-kohya.safetensors"), &sd1.lora_layers);
    assert!(e.contains("no key matches this model"), "{e}");
    assert!(e.contains("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight, lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight, lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha (shapes [2, 24] / [40, 2] do not fit layer encoder.layers.0.mlp.fc1 of text_encoder: [r, 32] / [48, r])"), "{e}");
    assert!(e.contains("and ") && e.contains(" more"), "{e}");
    // An SD2 LoRA on SD1 (another layout and widths).
    let e = attach_err(&lora_path("sd2-peft.safetensors"), &sd1.lora_layers);
    assert!(e.contains("keys match no layer of this model"), "{e}");

    let dir = tempdir("unmatched");
    // One good adapter, one key naming no layer, one unsupported tensor, one half adapter.
    let good = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let file = dir.join("partial.safetensors");
    write_safetensors(
        &file,
        &[
            (&format!("{good}.lora_A.weight"), zeros(&[2, 16])),
            (&format!("{good}.lora_B.weight"), zeros(&[16, 2])),
            ("unet.no_such_block.to_q.lora_A.weight", zeros(&[2, 16])),
            ("unet.no_such_block.to_q.lora_B.weight", zeros(&[16, 2])),
            (
                "unet.down_blocks.0.resnets.0.conv1.dora_scale",
                zeros(&[16]),
            ),
            (
                "unet.mid_block.attentions.0.proj_in.lora_A.weight",
                zeros(&[2, 32]),
            ),
            ("lora_unet_conv_in.lora_down.weight", zeros(&[2, 5, 3, 3])),
            ("lora_unet_conv_in.lora_up.weight", zeros(&[16, 2, 1, 1])),
        ],
        None,
    );
    let e = attach_err(&file, &sd1.lora_layers);
    assert!(
        e.contains("6 keys match no layer of this model (1 layers matched)"),
        "{e}"
    );
    assert!(
        e.contains("lora_unet_conv_in.lora_down.weight, lora_unet_conv_in.lora_up.weight (shapes [2, 5, 3, 3] / [16, 2, 1, 1] do not fit layer conv_in of unet: [r, 4, 3, 3] / [16, r, 1, 1])"),
        "{e}"
    );
    assert!(
        e.contains("unet.no_such_block.to_q.lora_A.weight, unet.no_such_block.to_q.lora_B.weight (no such layer)"),
        "{e}"
    );
    assert!(
        e.contains("dora_scale (not a LoRA down, up or alpha weight)"),
        "{e}"
    );
    assert!(
        e.contains("proj_in.lora_A.weight (its down or up weight is missing)"),
        "{e}"
    );
    assert!(!e.contains(good), "{e}");

    // Not strict: the matching adapter applies, the rest are warnings listing every key.
    let spec = LoraSpec {
        name: "partial.safetensors".into(),
        path: file.clone(),
        strength: 1.0,
        strict: false,
    };
    let a = lora::attach(&[spec], &sd1.lora_layers, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(a.set.layer_count(), 1);
    assert_eq!(a.warnings.len(), 5, "{:?}", a.warnings);
    assert!(a.warnings[0].contains("not applied"), "{:?}", a.warnings);

    // DoRA metadata, pickles, garbage, a missing file, a bad strength: named errors.
    let dora = dir.join("dora.safetensors");
    write_safetensors(
        &dora,
        &[(&format!("{good}.lora_A.weight"), zeros(&[2, 16]))],
        Some(("lora_adapter_metadata", r#"{"unet.use_dora": true}"#)),
    );
    assert!(attach_err(&dora, &sd1.lora_layers).contains("DoRA"));
    let pickle = dir.join("x.ckpt");
    std::fs::write(&pickle, b"x").unwrap();
    assert!(attach_err(&pickle, &sd1.lora_layers).contains("pickle"));
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ").unwrap();
    assert!(attach_err(&junk, &sd1.lora_layers).contains("not a safetensors file"));
    assert!(
        attach_err(&dir.join("missing.safetensors"), &sd1.lora_layers).contains("no such file")
    );
    let spec = LoraSpec {
        name: "s".into(),
        path: lora_path("sd1-peft.safetensors"),
        strength: 11.0,
        strict: true,
    };
    let e = lora::attach(&[spec], &sd1.lora_layers, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("strength must be between -10 and 10, got 11"),
        "{e}"
    );
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sd-lora-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn names_resolve_inside_the_lora_folder_only() {
    let dir = tempdir("resolve");
    let loras = dir.join("loras");
    std::fs::create_dir_all(loras.join("styles")).unwrap();
    std::fs::write(loras.join("a.safetensors"), b"x").unwrap();
    std::fs::write(loras.join("styles/b.safetensors"), b"x").unwrap();
    std::fs::write(dir.join("secret.safetensors"), b"x").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(
        dir.join("secret.safetensors"),
        loras.join("link.safetensors"),
    )
    .unwrap();
    let real = loras.canonicalize().unwrap();
    assert_eq!(
        lora::resolve(&loras, "a").unwrap(),
        real.join("a.safetensors")
    );
    assert_eq!(
        lora::resolve(&loras, "styles/b.safetensors").unwrap(),
        real.join("styles/b.safetensors")
    );
    for bad in [
        "../secret.safetensors",
        "styles/../../secret",
        "/etc/passwd",
        "",
        "styles\\..\\..\\secret",
        "nope",
        "styles",
    ] {
        let e = lora::resolve(&loras, bad).unwrap_err().to_string();
        assert!(e.contains("invalid loras"), "{bad}: {e}");
    }
    #[cfg(unix)]
    {
        let e = lora::resolve(&loras, "link.safetensors")
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside the LoRA folder"), "{e}");
    }
}

/// Adapters on GGUF-quantized FLUX layers (fused qkv and linear1 dequantized per step) give
/// exactly what they give on the same weights dequantized at load, and change the output.
#[test]
fn loras_apply_to_quantized_flux_layers() {
    use sd_models::modules::adapter::registering;
    use sd_models::modules::config::JsonConfig;
    use sd_models::modules::flux::{FluxConfig, FluxTransformer};
    let flux = fixtures().join("flux");
    let cfg = FluxConfig::from_config(
        &JsonConfig::load(&flux.join("transformer-q/config.json")).unwrap(),
    )
    .unwrap();
    let file = flux.join("transformer-q-Q8_0.gguf");
    let (quant, q_layers) = registering("transformer", || {
        sd_models::loader::load_flux_transformer_file(
            &file,
            Some(cfg.axes_dims_rope.clone()),
            &Device::Cpu,
            DType::F32,
        )
    });
    let quant = quant.unwrap();
    let (dense, d_layers) = registering("transformer", || common::dequantized_flux(&file, &cfg));
    assert_eq!(q_layers, d_layers);

    // A kohya LoRA on the fused original layers.
    let dim = q_layers
        .iter()
        .find(|l| l.path == "x_embedder")
        .unwrap()
        .shape
        .dims()
        .1;
    let mut rng = sd_models::samplers::TorchRng::new(11);
    let mut randn = |shape: &[usize]| (rng.randn(shape, &Device::Cpu).unwrap() * 0.2).unwrap();
    let mut tensors = Vec::new();
    for (module, rows) in [
        ("lora_unet_double_blocks_0_img_attn_qkv", 3 * dim),
        ("lora_unet_single_blocks_0_linear1", 7 * dim),
        ("lora_unet_final_layer_adaLN_modulation_1", 2 * dim),
    ] {
        tensors.push((format!("{module}.lora_down.weight"), randn(&[4, dim])));
        tensors.push((format!("{module}.lora_up.weight"), randn(&[rows, 4])));
        tensors.push((
            format!("{module}.alpha"),
            Tensor::new(2f32, &Device::Cpu).unwrap(),
        ));
    }
    let dir = tempdir("gguf");
    let path = dir.join("q.safetensors");
    let named: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(k, t)| (k.as_str(), t.clone()))
        .collect();
    write_safetensors(&path, &named, None);
    let spec = LoraSpec {
        name: "q".into(),
        path,
        strength: 1.0,
        strict: true,
    };
    let set = Arc::new(
        lora::attach(&[spec], &q_layers, &Device::Cpu, DType::F32)
            .unwrap()
            .set,
    );
    assert_eq!(
        set.layer_count(),
        8,
        "qkv -> 3, linear1 -> 4, final modulation -> 1"
    );
    let r = candle_core::safetensors::load(
        flux.join("reference/transformer-q.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let run = |m: &FluxTransformer| common::flux_forward(m, &r);
    let base = run(&quant);
    let q_out = with_adapters(Some(set.clone()), || run(&quant));
    let d_out = with_adapters(Some(set), || run(&dense));
    let (same, _) = common::max_rel_diff(&q_out, &d_out);
    assert_eq!(
        same, 0.0,
        "quantized and dense layers take the adapters differently"
    );
    let (changed, scale) = common::max_rel_diff(&q_out, &base);
    assert!(
        changed > 1e-3 * scale,
        "the LoRA changed the output by {changed} only"
    );
}

/// SDXL LoRAs (`scripts/make_sdxl_lora_fixtures.py`): kohya with the original SGM UNet names,
/// LoCon convolutions, `lora_te1_` / `lora_te2_` and per-module alphas; diffusers/PEFT with
/// `unet.`, `text_encoder.` and `text_encoder_2.` and per-component `lora_adapter_metadata`.
/// References from diffusers' SDXL pipeline (the script says which parts were merged by hand).
#[test]
fn sdxl_loras_match_diffusers() {
    let text = std::fs::read_to_string(fixtures().join("lora/sdxl_cases.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    let pipe = load_sd("tiny-sdxl");
    let mut checked = 0;
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let attached = lora::attach(&specs(case), &pipe.lora_layers, &Device::Cpu, DType::F32)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(attached.warnings.is_empty());
        let r = reference(name);
        let (px, latents) = run_sd(&pipe, &sd_params(case, &pipe), Some(Arc::new(attached.set)));
        assert_close(name, "final latents", &latents, &r["latents_final"], 1e-4);
        assert_images_close(name, &px, &bytes(&r["images"]));
        checked += 1;
    }
    assert_eq!(checked, 2);
}

/// An SD 1.x LoRA on an SDXL model: its UNet keys name blocks the SDXL UNet does not have,
/// which a strict job refuses, listing them.
#[test]
fn an_sd_lora_on_sdxl_is_refused() {
    let pipe = load_sd("tiny-sdxl");
    let spec = LoraSpec {
        name: "sd1-kohya".into(),
        path: lora_path("sd1-kohya.safetensors"),
        strength: 1.0,
        strict: true,
    };
    let e = lora::attach(&[spec], &pipe.lora_layers, &Device::Cpu, DType::F32)
        .expect_err("an SD 1.x LoRA applied to SDXL")
        .to_string();
    assert!(e.contains("sd1-kohya") && e.contains("lora_unet_"), "{e}");
}
