//! Fuzz harnesses of what reads model files (see the `sd-fuzz` crate for the mutations and the
//! budget; `scripts/fuzz.sh` runs them long). A crafted file, a header claiming a 2^40-element
//! tensor or an offset past the end included, must give an error: no panic, no allocation over
//! the harness's limit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use sd_fuzz::{fuzz, seeds, BoundedAlloc};
use sd_models::lora::{self, LoraSpec};
use sd_models::modules::adapter::LayerInfo;

#[global_allocator]
static ALLOC: BoundedAlloc = BoundedAlloc;

/// As the binary's own hook: panics that the loaders catch and turn into errors print nothing.
fn quiet_caught_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !sd_models::error::panic_is_caught() {
                default(info);
            }
        }));
    });
}

/// A file of this process for harness `name`, rewritten with each input.
fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("sd-fuzz-{name}-{}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn fuzz_safetensors_header() {
    let words: &[&[u8]] = &[
        b"\"dtype\":",
        b"\"F32\"",
        b"\"BF16\"",
        b"\"F8_E4M3\"",
        b"\"shape\":",
        b"[1099511627776]",
        b"\"data_offsets\":",
        b"[0,18446744073709551615]",
        b"\"__metadata__\":",
        b"model.diffusion_model.",
        b"first_stage_model.",
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
    ];
    fuzz("safetensors", &seeds("safetensors"), words, |bytes| {
        let path = scratch("safetensors", bytes);
        let _ = sd_models::single_file::read_shapes(&path);
        let _ = sd_models::single_file::Checkpoint::open(&path);
        let _ = lora::check_file("fuzz", &path);
        let _ = candle_core::safetensors::load_buffer(bytes, &Device::Cpu);
    });
}

#[test]
fn fuzz_gguf_header() {
    let words: &[&[u8]] = &[
        b"GGUF",
        b"general.alignment",
        b"\x00\x00\x00\x00",
        b"\xff\xff\xff\xff\xff\xff\xff\x7f",
        b"img_in.weight",
        b"double_blocks.0.",
        b"single_blocks.0.",
    ];
    quiet_caught_panics();
    fuzz("gguf", &seeds("gguf"), words, |bytes| {
        let path = scratch("gguf", bytes);
        let _ =
            sd_models::loader::load_flux_transformer_gguf(&path, None, &Device::Cpu, DType::F32);
    });
}

/// The adaptable layers of the tiny SD 1.x model, loaded once.
fn sd1_layers() -> &'static [LayerInfo] {
    static LAYERS: OnceLock<Vec<LayerInfo>> = OnceLock::new();
    LAYERS.get_or_init(|| {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/tiny-sd1");
        sd_models::loader::load_sd(&dir, &Device::Cpu, DType::F32)
            .unwrap()
            .0
            .lora_layers
    })
}

/// A LoRA file from a text listing: `KEY DIM...` per line (every tensor filled with 0.01),
/// `@KEY=VALUE` for metadata. Tensors over 4096 elements are left out, so that every input
/// makes a small file and the harness spends its time in the key mapping.
fn lora_file(text: &str) -> Vec<u8> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut metadata = HashMap::new();
    for line in text.lines().take(512) {
        if let Some((k, v)) = line.strip_prefix('@').and_then(|m| m.split_once('=')) {
            metadata.insert(k.to_string(), v.to_string());
            continue;
        }
        let mut parts = line.split_whitespace();
        let Some(key) = parts.next() else { continue };
        let dims: Option<Vec<usize>> = parts.take(5).map(|d| d.parse().ok()).collect();
        let Some(dims) = dims else { continue };
        if dims
            .iter()
            .try_fold(1usize, |n, d| n.checked_mul(*d))
            .is_none_or(|n| n > 4096)
        {
            continue;
        }
        let t = Tensor::full(0.01f32, dims, &Device::Cpu).unwrap();
        tensors.push((key.to_string(), t));
    }
    let mut seen = std::collections::HashSet::new();
    tensors.retain(|(k, _)| seen.insert(k.clone()));
    let metadata = (!metadata.is_empty()).then_some(metadata);
    safetensors::tensor::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), metadata).unwrap()
}

#[test]
fn fuzz_lora_key_mapping() {
    let words: &[&[u8]] = &[
        b"lora_unet_",
        b"lora_te_",
        b"lora_te1_",
        b"lora_te2_",
        b"unet.",
        b"text_encoder.",
        b"transformer.",
        b".lora_down.weight",
        b".lora_up.weight",
        b".lora_A.weight",
        b".lora_B.weight",
        b".alpha",
        b".dora_scale",
        b"_down_blocks_0_",
        b"down_blocks.0.",
        b"mid_block.",
        b"attentions.0.",
        b"transformer_blocks.0.",
        b"attn1.to_q",
        b"proj_in",
        b"conv1",
        b"time_emb_proj",
        b"text_model_encoder_layers_0_",
        b" 0",
        b" 1",
        b" 4096",
        b"\n",
        b"@format=pt",
        b"@lora_adapter_metadata={\"unet.r\": 0}",
    ];
    let layers = sd1_layers();
    fuzz("lora-keys", &seeds("lora-keys"), words, |bytes| {
        let file = lora_file(&String::from_utf8_lossy(bytes));
        let path = scratch("lora-keys", &file);
        for strict in [true, false] {
            let spec = LoraSpec {
                name: "fuzz".into(),
                path: path.clone(),
                strength: 0.7,
                strict,
            };
            let _ = lora::attach(&[spec], layers, &Device::Cpu, DType::F32);
        }
    });
}

/// The GGUF headers the fuzzer found candle tripping over (kept as seeds) are errors naming
/// what is wrong.
#[test]
fn crafted_gguf_headers_are_errors() {
    for (file, why) in [
        ("regression-alignment-zero.gguf", "malformed header"),
        ("regression-no-elements.gguf", "has no elements"),
        ("regression-huge-shape.gguf", "overflows"),
    ] {
        let path = seeds("gguf").join(file);
        let e =
            sd_models::loader::load_flux_transformer_gguf(&path, None, &Device::Cpu, DType::F32)
                .err()
                .unwrap_or_else(|| panic!("{file} loaded"));
        assert!(e.to_string().contains(why), "{file}: {e}");
    }
}

/// Safetensors headers that claim a 2^40-element tensor, an offset past the end, or a 2^40-byte
/// header are errors for every reader, before any allocation of the claimed size.
#[test]
fn crafted_safetensors_headers_are_errors() {
    for file in [
        "regression-huge-tensor.safetensors",
        "regression-offset-past-end.safetensors",
        "regression-header-length.safetensors",
    ] {
        let path = seeds("safetensors").join(file);
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            sd_models::single_file::read_shapes(&path).is_err(),
            "{file}"
        );
        let e = lora::check_file("crafted", &path).unwrap_err();
        assert!(
            e.to_string().contains("not a safetensors file"),
            "{file}: {e}"
        );
        assert!(candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).is_err());
        let spec = LoraSpec {
            name: "crafted".into(),
            path,
            strength: 1.0,
            strict: true,
        };
        assert!(lora::attach(&[spec], sd1_layers(), &Device::Cpu, DType::F32).is_err());
    }
}
