//! Single-file SD checkpoints (original LDM names) against diffusers' `from_single_file`.
//!
//! The checkpoints and expected images come from `scripts/make_single_file_fixtures.py`
//! (diffusers 0.42.1, torch 2.15 CPU f32; the checkpoints hold f16 values, read as f32 on both
//! sides): tiny SD 1.x (CLIP), SD 2.x (OpenCLIP with a fused in_proj and an unused last layer,
//! v-prediction, linear projections), the 9-channel inpainting model, and a separate VAE file
//! with LDM names. The script checks that diffusers' conversion of each file gives exactly the
//! weights it was written from. Images within max 3 / mean 0.5 levels.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::{assert_images_close, bytes, fixtures, read_rgb_png};
use sd_models::loader::{load_sd_with, SdLoadOptions};
use sd_models::pipelines::{GenerateParams, ImageInput, MaskImage, RgbImage};
use sd_models::samplers::PredictionType;
use sd_models::single_file::Checkpoint;
use serde_json::Value;

fn dir() -> PathBuf {
    fixtures().join("single_file")
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(dir().join("cases.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["cases"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn checkpoints_match_diffusers_from_single_file() {
    let cases = cases();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let opts = SdLoadOptions {
            components: Some(fixtures().join(case["components"].as_str().unwrap())),
            vae: case["vae"].as_str().map(|v| dir().join(v)),
            prediction_type: None,
        };
        let file = dir().join(case["file"].as_str().unwrap());
        let (pipe, info) = load_sd_with(&file, &opts, &Device::Cpu, DType::F32)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(info.pipeline_class, "single-file checkpoint");
        let side = case["size"].as_u64().unwrap() as usize;
        let p = GenerateParams {
            prompt: case["prompt"].as_str().unwrap().into(),
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
        };
        let out = match case["mask"].as_str() {
            Some(mask) => {
                let rgb = |f: &str| {
                    let (width, height, pixels) = read_rgb_png(&fixtures().join("inputs").join(f));
                    RgbImage {
                        width,
                        height,
                        pixels,
                    }
                };
                let m = rgb(mask);
                let input = ImageInput {
                    image: rgb(case["image"].as_str().unwrap()),
                    strength: 1.0,
                    mask: Some(MaskImage {
                        width: m.width,
                        height: m.height,
                        channels: 3,
                        pixels: m.pixels,
                        nearest: false,
                    }),
                };
                pipe.generate_from_image(&p, &input, &mut |_| Ok(()))
            }
            None => pipe.generate(&p, &mut |_| Ok(())),
        }
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let r = candle_core::safetensors::load(
            dir().join(format!("reference/{name}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let px: Vec<u8> = out.images.iter().flat_map(|i| i.pixels.clone()).collect();
        assert_images_close(name, &px, &bytes(&r["images"]));
    }
}

fn config(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// What the shapes tell equals the diffusers configs the checkpoints were written from.
#[test]
fn configs_inferred_from_the_shapes() {
    for (file, folder) in [
        ("tiny-sd1.safetensors", fixtures().join("models/tiny-sd1")),
        (
            "tiny-sd1-inpaint.safetensors",
            fixtures().join("models/tiny-sd1-inpaint"),
        ),
        ("tiny-sd2.safetensors", dir().join("tiny-sd2-components")),
    ] {
        let ckpt = Checkpoint::open(&dir().join(file)).unwrap();
        let unet = ckpt.infer_unet_config(PredictionType::Epsilon).unwrap();
        let want = config(&folder.join("unet/config.json"));
        for key in [
            "in_channels",
            "out_channels",
            "block_out_channels",
            "down_block_types",
            "up_block_types",
            "cross_attention_dim",
            "use_linear_projection",
        ] {
            assert_eq!(unet[key], want[key], "{file}: unet {key}");
        }
        let l = want["layers_per_block"].clone();
        let l = l.as_array().map(|a| a[0].clone()).unwrap_or(l);
        assert_eq!(unet["layers_per_block"], l, "{file}: layers_per_block");
        let vae = ckpt.infer_vae_config().unwrap();
        let want = config(&folder.join("vae/config.json"));
        for key in [
            "block_out_channels",
            "layers_per_block",
            "latent_channels",
            "in_channels",
            "out_channels",
        ] {
            assert_eq!(vae[key], want[key], "{file}: vae {key}");
        }
        let te = ckpt.infer_text_encoder_config().unwrap();
        let want = config(&folder.join("text_encoder/config.json"));
        for key in [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "max_position_embeddings",
            "hidden_act",
        ] {
            assert_eq!(te[key], want[key], "{file}: text encoder {key}");
        }
    }
    let sd2 = Checkpoint::open(&dir().join("tiny-sd2.safetensors")).unwrap();
    assert_eq!(sd2.family(), "sd2");
    let v = sd2.infer_unet_config(PredictionType::VPrediction).unwrap();
    assert_eq!(v["upcast_attention"], true);
    // 64-wide heads, at least one head for blocks narrower than that (the tiny model).
    assert_eq!(v["attention_head_dim"], serde_json::json!([1, 1, 1]));
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sd-single-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Without a components folder the configs are inferred and the tokenizer comes from the
/// Hugging Face cache, else from the built-in vocabulary.
#[test]
fn without_components_the_tokenizer_comes_from_the_hub_cache() {
    let file = dir().join("tiny-sd1.safetensors");
    let home = tmpdir("hf");
    // SAFETY: no other test of this binary reads these variables.
    unsafe {
        std::env::set_var("HF_HOME", &home);
        std::env::remove_var("HF_HUB_CACHE");
    }
    // No tokenizer in the cache: the built-in vocabulary is used, and loading goes on to the
    // configs inferred for the releases (32 norm groups), which do not fit the tiny models.
    assert!(sd_models::loader::cached_tokenizer("sd1").is_none());
    for file in ["tiny-sd1.safetensors", "tiny-sdxl.safetensors"] {
        let e = match load_sd_with(
            &dir().join(file),
            &SdLoadOptions::default(),
            &Device::Cpu,
            DType::F32,
        ) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{file}: built with the releases' norm groups"),
        };
        assert!(e.contains(file) && e.contains("norm_num_groups 32"), "{e}");
    }

    let snap = home.join("hub/models--openai--clip-vit-large-patch14/snapshots/abc");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(home.join("hub/models--openai--clip-vit-large-patch14/refs")).unwrap();
    std::fs::write(
        home.join("hub/models--openai--clip-vit-large-patch14/refs/main"),
        "abc",
    )
    .unwrap();
    for f in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let src = fixtures().join("models/tiny-sd1/tokenizer").join(f);
        if src.is_file() {
            std::fs::copy(src, snap.join(f)).unwrap();
        }
    }
    // The tokenizer is found; the configs inferred for SD 1.x (32 norm groups, 8 heads) do
    // not fit this tiny model's 16-channel blocks, which the error says.
    let e = match load_sd_with(&file, &SdLoadOptions::default(), &Device::Cpu, DType::F32) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("the tiny model built with SD 1.x's norm groups"),
    };
    assert!(
        e.contains("tiny-sd1.safetensors") && e.contains("norm_num_groups 32"),
        "{e}"
    );

    // The prediction type comes from the caller, over the components' scheduler.
    let opts = SdLoadOptions {
        components: Some(fixtures().join("models/tiny-sd1")),
        prediction_type: Some(PredictionType::VPrediction),
        ..Default::default()
    };
    let (_, info) = load_sd_with(&file, &opts, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(info.prediction_type, PredictionType::VPrediction);
}

#[test]
fn unsupported_files_are_named_errors() {
    let d = tmpdir("bad");
    let err = |p: &Path| match load_sd_with(p, &SdLoadOptions::default(), &Device::Cpu, DType::F32)
    {
        Err(e) => e.to_string(),
        Ok(_) => panic!("{} loaded", p.display()),
    };
    let ckpt = d.join("model.ckpt");
    std::fs::write(&ckpt, b"pickle").unwrap();
    assert!(err(&ckpt).contains("pickle checkpoints are not loaded"));
    let t = candle_core::Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    let xl = d.join("xl.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([
            (
                "model.diffusion_model.input_blocks.0.0.weight".to_string(),
                t.clone(),
            ),
            (
                "conditioner.embedders.0.transformer.x".to_string(),
                t.clone(),
            ),
        ]),
        &xl,
    )
    .unwrap();
    assert!(err(&xl).contains("SDXL"));
    let other = d.join("other.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("weight".to_string(), t)]),
        &other,
    )
    .unwrap();
    assert!(err(&other).contains("not a Stable Diffusion checkpoint"));
    // A folder does not take checkpoint options.
    let opts = SdLoadOptions {
        prediction_type: Some(PredictionType::VPrediction),
        ..Default::default()
    };
    let e = match load_sd_with(
        &fixtures().join("models/tiny-sd1"),
        &opts,
        &Device::Cpu,
        DType::F32,
    ) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted"),
    };
    assert!(e.contains("apply to single-file checkpoints"), "{e}");
}

/// SDXL checkpoints in the SGM layout (`scripts/make_sdxl_single_file.py`, checked there to
/// load through diffusers' own conversion to exactly the folder weights rounded through f16)
/// against `StableDiffusionXL{,Inpaint}Pipeline.from_single_file` with the folder as `config=`.
#[test]
fn sdxl_checkpoints_match_diffusers_from_single_file() {
    let text = std::fs::read_to_string(dir().join("sdxl_cases.json")).unwrap();
    let cases = serde_json::from_str::<Value>(&text).unwrap()["cases"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let opts = SdLoadOptions {
            components: Some(fixtures().join(case["components"].as_str().unwrap())),
            vae: None,
            prediction_type: None,
        };
        let file = dir().join(case["file"].as_str().unwrap());
        let (pipe, info) = load_sd_with(&file, &opts, &Device::Cpu, DType::F32)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(info.family, "sdxl");
        assert!(pipe.xl.is_some());
        let r = candle_core::safetensors::load(
            dir().join(format!("reference/{name}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let p = GenerateParams {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative_prompt: None,
            width: case["width"].as_u64().unwrap() as usize,
            height: case["height"].as_u64().unwrap() as usize,
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
        };
        let out = match r.get("mask") {
            Some(m) => {
                assert_eq!(info.variant, "inpaint");
                let (h, w, _) = r["input"].dims3().unwrap();
                let d = m.dims().to_vec();
                let input = ImageInput {
                    image: RgbImage {
                        width: w,
                        height: h,
                        pixels: bytes(&r["input"]),
                    },
                    strength: case["strength"].as_f64().unwrap(),
                    mask: Some(MaskImage {
                        width: d[1],
                        height: d[0],
                        channels: if d.len() == 3 { d[2] } else { 1 },
                        pixels: bytes(m),
                        nearest: bytes(&r["mask_nearest"])[0] == 1,
                    }),
                };
                pipe.generate_from_image(&p, &input, &mut |_| Ok(()))
            }
            None => pipe.generate(&p, &mut |_| Ok(())),
        }
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let px: Vec<u8> = out.images.iter().flat_map(|i| i.pixels.clone()).collect();
        assert_images_close(name, &px, &bytes(&r["images"]));
    }
}

/// What an SGM checkpoint's shapes tell equals the SDXL folder configs it was written from.
#[test]
fn sdxl_configs_inferred_from_the_shapes() {
    for (file, folder) in [
        ("tiny-sdxl.safetensors", "models/tiny-sdxl"),
        ("tiny-sdxl-inpaint.safetensors", "models/tiny-sdxl-inpaint"),
    ] {
        let folder = fixtures().join(folder);
        let ckpt = Checkpoint::open(&dir().join(file)).unwrap();
        assert_eq!(ckpt.family(), "sdxl");
        let unet = ckpt.infer_unet_config(PredictionType::Epsilon).unwrap();
        let want = config(&folder.join("unet/config.json"));
        for key in [
            "in_channels",
            "out_channels",
            "block_out_channels",
            "layers_per_block",
            "down_block_types",
            "up_block_types",
            "transformer_layers_per_block",
            "cross_attention_dim",
            "use_linear_projection",
            "addition_embed_type",
            "addition_time_embed_dim",
            "projection_class_embeddings_input_dim",
        ] {
            assert_eq!(unet[key], want[key], "{file}: unet {key}");
        }
        let te = ckpt.infer_text_encoder_config().unwrap();
        let te2 = ckpt.infer_text_encoder_2_config().unwrap();
        for (got, sub) in [(te, "text_encoder"), (te2, "text_encoder_2")] {
            let want = config(&folder.join(sub).join("config.json"));
            for key in [
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "vocab_size",
            ] {
                assert_eq!(got[key], want[key], "{file}: {sub} {key}");
            }
            if sub == "text_encoder_2" {
                assert_eq!(got["projection_dim"], want["projection_dim"], "{file}");
            }
        }
        let vae = ckpt.infer_vae_config().unwrap();
        assert_eq!(vae["scaling_factor"], serde_json::json!(0.13025));
    }
}

/// Mixed-family and refiner-style files are refused with the reason.
#[test]
fn mixed_sdxl_files_are_refused() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mixed-sdxl");
    std::fs::create_dir_all(&tmp).unwrap();
    let all =
        candle_core::safetensors::load(dir().join("tiny-sdxl.safetensors"), &Device::Cpu).unwrap();
    let write = |name: &str, keep: &dyn Fn(&str) -> bool| {
        let subset: std::collections::HashMap<String, candle_core::Tensor> = all
            .iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let path = tmp.join(name);
        candle_core::safetensors::save(&subset, &path).unwrap();
        path
    };
    let refiner = write("refiner.safetensors", &|k| {
        !k.starts_with("conditioner.embedders.0.")
    });
    let e = Checkpoint::open(&refiner).unwrap_err().to_string();
    assert!(e.contains("refiner"), "{e}");
    let no_label = write("no-label.safetensors", &|k| !k.contains("label_emb."));
    let e = Checkpoint::open(&no_label).unwrap_err().to_string();
    assert!(e.contains("mixed layouts"), "{e}");
}
