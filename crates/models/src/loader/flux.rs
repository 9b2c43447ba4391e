//! FLUX.1: a diffusers folder, a single-file transformer with the original names plus a
//! components folder, or a GGUF transformer, to a `FluxPipeline`; and what their headers say.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::modules::adapter;
use crate::modules::clip::{ClipTextConfig, ClipTextModel};
use crate::modules::config::JsonConfig;
use crate::modules::vae::{Vae, VaeConfig};
use crate::tokenizer::clip::ClipTokenizer;
use crate::{Error, Result};

use super::{component, find_weights, in_component, model_name, var_builder};

/// Whether a folder's model_index.json names a FLUX pipeline.
pub fn is_flux_folder(root: &Path) -> bool {
    JsonConfig::load(&root.join("model_index.json"))
        .ok()
        .and_then(|c| {
            c.str_or("_class_name", "")
                .ok()
                .map(|s| s.starts_with("Flux"))
        })
        .unwrap_or(false)
}

/// Loads a FLUX.1 diffusers folder (`transformer/`, `vae/`, `text_encoder/` CLIP,
/// `tokenizer/`, `text_encoder_2/` T5, `tokenizer_2/`, `scheduler/`) onto `device` in `dtype`.
pub fn load_flux(
    root: &Path,
    device: &Device,
    dtype: DType,
) -> Result<crate::pipelines::flux::FluxPipeline> {
    load_flux_with(root, None, device, None, dtype)
}

/// Loads a single-file FLUX transformer (safetensors with the original key names, as
/// published) with its config inferred from the shapes; `axes_dims_rope` from a config when
/// the head size is not FLUX.1's 128.
pub fn load_flux_transformer_file(
    file: &Path,
    axes_dims_rope: Option<Vec<usize>>,
    device: &Device,
    dtype: DType,
) -> Result<crate::modules::flux::FluxTransformer> {
    use crate::modules::flux::{infer_config, original_to_diffusers, FluxTransformer};
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "safetensors" => {}
        "gguf" => return load_flux_transformer_gguf(file, axes_dims_rope, device, dtype),
        "ckpt" | "pt" | "pth" | "bin" => {
            return Err(Error::config(
                file,
                "pickle checkpoints are refused (they can run code); use safetensors",
            ))
        }
        _ => {
            return Err(Error::config(
                file,
                "expected a .safetensors transformer file",
            ))
        }
    }
    let tensors = candle_core::safetensors::load(file, device)
        .map_err(|e| Error::config(file, format!("cannot read safetensors: {}", Error::from(e))))?;
    let renamed = original_to_diffusers(tensors).map_err(|e| match e {
        Error::Invalid { message, .. } => Error::config(file, message),
        other => other,
    })?;
    let cfg = infer_config(&renamed, axes_dims_rope).map_err(|e| match e {
        Error::Invalid { message, .. } => Error::config(file, message),
        other => other,
    })?;
    let converted = renamed
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(dtype)?)))
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    let vb = VarBuilder::from_tensors(converted, dtype, device);
    in_component("transformer", file, FluxTransformer::new(vb, &cfg))
}

/// Loads a FLUX pipeline from a diffusers folder, with the transformer from `transformer_file`
/// (original key names) instead of the folder's when given (the folder then provides the
/// text encoders, tokenizers, VAE and scheduler: `--components`).
pub fn load_flux_with(
    root: &Path,
    transformer_file: Option<&Path>,
    device: &Device,
    text_device: Option<&Device>,
    dtype: DType,
) -> Result<crate::pipelines::flux::FluxPipeline> {
    // The text encoders run in f32 on a CPU when the dtype is bf16 (candle has no CPU bf16
    // matmul), and in f32 for f16 (T5 overflows in f16; transformers keeps parts of it in f32).
    let text_device = text_device.unwrap_or(device).clone();
    let text_dtype = if dtype == DType::F16 || (text_device.is_cpu() && dtype == DType::BF16) {
        DType::F32
    } else {
        dtype
    };
    use crate::modules::flux::{FluxConfig, FluxTransformer};
    use crate::modules::t5::{T5Config, T5Encoder};
    use crate::pipelines::flux::{FluxCore, FluxPipeline};
    use crate::samplers::flow_match::FlowMatchConfig;
    use crate::tokenizer::t5::T5Tokenizer;

    let load_cfg = |name: &str, file: &str| -> Result<JsonConfig> {
        JsonConfig::load(&component(root, name)?.join(file))
    };
    let clip_tokenizer = ClipTokenizer::from_dir(&component(root, "tokenizer")?)?;
    let te_dir = component(root, "text_encoder")?;
    let te_cfg = ClipTextConfig::from_config(&load_cfg("text_encoder", "config.json")?)?;
    let vb = var_builder(&find_weights(&te_dir, "model")?, text_dtype, &text_device)?;
    let (clip, mut lora_layers) =
        adapter::registering("text_encoder", || ClipTextModel::new(vb, &te_cfg));
    let clip = in_component("text_encoder", &te_dir, clip)?;

    let t5_tokenizer = T5Tokenizer::from_dir(&component(root, "tokenizer_2")?)?;
    let t5_dir = component(root, "text_encoder_2")?;
    let t5_cfg = T5Config::from_config(&load_cfg("text_encoder_2", "config.json")?)?;
    let vb = var_builder(&find_weights(&t5_dir, "model")?, text_dtype, &text_device)?;
    let t5 = in_component("text_encoder_2", &t5_dir, T5Encoder::new(vb, &t5_cfg))?;

    let build_transformer = || -> Result<_> {
        Ok(match transformer_file {
            None => {
                let tr_dir = component(root, "transformer")?;
                let tr_cfg_file = load_cfg("transformer", "config.json")?;
                let tr_cfg = FluxConfig::from_config(&tr_cfg_file)?;
                let vb = var_builder(
                    &find_weights(&tr_dir, "diffusion_pytorch_model")?,
                    dtype,
                    device,
                )?;
                let t = in_component("transformer", &tr_dir, FluxTransformer::new(vb, &tr_cfg))?;
                (t, tr_cfg_file)
            }
            Some(file) => {
                // The components' transformer config, when there is one, gives the rotary axes.
                let cfg_path = root.join("transformer").join("config.json");
                let axes = if cfg_path.is_file() {
                    Some(FluxConfig::from_config(&JsonConfig::load(&cfg_path)?)?.axes_dims_rope)
                } else {
                    None
                };
                let t = load_flux_transformer_file(file, axes, device, dtype)?;
                let cfg_file = JsonConfig::from_value(file, serde_json::json!({}));
                (t, cfg_file)
            }
        })
    };
    let (built, tr_layers) = adapter::registering("transformer", build_transformer);
    let (transformer, tr_cfg_file) = built?;
    lora_layers.extend(tr_layers);
    let tr_cfg = transformer.config.clone();

    let vae_dir = component(root, "vae")?;
    let vae_cfg = VaeConfig::from_config(&load_cfg("vae", "config.json")?)?;
    let vb = var_builder(
        &find_weights(&vae_dir, "diffusion_pytorch_model")?,
        dtype,
        device,
    )?;
    let vae = in_component("vae", &vae_dir, Vae::new(vb, &vae_cfg))?;
    let scheduler = FlowMatchConfig::from_config(&load_cfg("scheduler", "scheduler_config.json")?)?;

    // Cross-checks: CLIP ids and positions, packed latent channels, text widths, T5 vocabulary.
    let clip_max_id = clip_tokenizer.vocab_size().saturating_sub(1);
    if clip_max_id >= te_cfg.vocab_size
        || clip_tokenizer.max_length() > te_cfg.max_position_embeddings
    {
        return Err(Error::config(
            &te_dir,
            format!(
                "the CLIP tokenizer ({} tokens, {} positions) does not fit the text encoder (vocab_size {}, max_position_embeddings {})",
                clip_tokenizer.vocab_size(),
                clip_tokenizer.max_length(),
                te_cfg.vocab_size,
                te_cfg.max_position_embeddings
            ),
        ));
    }
    if tr_cfg.in_channels != 4 * vae_cfg.latent_channels {
        return Err(tr_cfg_file.err(format!(
            "in_channels = {} but the VAE has {} latent channels (FLUX packs 2x2: expected {})",
            tr_cfg.in_channels,
            vae_cfg.latent_channels,
            4 * vae_cfg.latent_channels
        )));
    }
    if tr_cfg.pooled_projection_dim != te_cfg.hidden_size {
        return Err(tr_cfg_file.err(format!(
            "pooled_projection_dim = {} but the CLIP text encoder's hidden_size is {}",
            tr_cfg.pooled_projection_dim, te_cfg.hidden_size
        )));
    }
    if tr_cfg.joint_attention_dim != t5_cfg.d_model {
        return Err(tr_cfg_file.err(format!(
            "joint_attention_dim = {} but the T5 encoder's d_model is {}",
            tr_cfg.joint_attention_dim, t5_cfg.d_model
        )));
    }
    if t5_tokenizer.vocab_size() > t5_cfg.vocab_size {
        return Err(Error::config(
            component(root, "tokenizer_2")?,
            format!(
                "the tokenizer has {} tokens but the T5 encoder's vocab_size is {}",
                t5_tokenizer.vocab_size(),
                t5_cfg.vocab_size
            ),
        ));
    }
    Ok(FluxPipeline {
        text_device,
        clip_tokenizer,
        clip,
        t5_tokenizer,
        t5,
        core: FluxCore {
            transformer,
            vae,
            scheduler,
            device: device.clone(),
            dtype,
        },
        lora_layers,
    })
}

/// What `inspect` reports about a FLUX folder, read from its configs without loading weights.
#[derive(Debug, Clone)]
pub struct FluxInfo {
    pub name: String,
    /// `dev` (guidance embedding) or `schnell` (none).
    pub variant: &'static str,
    pub latent_factor: usize,
    /// Transformer parameters counted from the safetensors headers.
    pub transformer_parameters: u64,
    /// Storage dtypes of the transformer's tensors, with counts.
    pub transformer_dtypes: Vec<(String, usize)>,
    pub weights: Vec<(String, Vec<PathBuf>)>,
}

/// Reads a FLUX folder's description without loading any weights.
pub fn inspect_flux(root: &Path) -> Result<FluxInfo> {
    use crate::modules::flux::FluxConfig;
    let tr = FluxConfig::from_config(&JsonConfig::load(
        &component(root, "transformer")?.join("config.json"),
    )?)?;
    let vae = VaeConfig::from_config(&JsonConfig::load(
        &component(root, "vae")?.join("config.json"),
    )?)?;
    let mut weights = Vec::new();
    for (name, stem) in [
        ("text_encoder", "model"),
        ("text_encoder_2", "model"),
        ("transformer", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
    ] {
        weights.push((
            name.to_string(),
            find_weights(&component(root, name)?, stem)?,
        ));
    }
    let mut params = 0u64;
    let mut dtypes: std::collections::BTreeMap<String, usize> = Default::default();
    for f in &weights[2].1 {
        // SAFETY: read-only mapping of a model file, as when loading.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }.map_err(|e| {
            Error::config(f, format!("cannot read safetensors: {}", Error::from(e)))
        })?;
        for (_, view) in st.tensors() {
            params += view.shape().iter().product::<usize>() as u64;
            *dtypes.entry(format!("{:?}", view.dtype())).or_default() += 1;
        }
    }
    let name = model_name(root);
    Ok(FluxInfo {
        name,
        variant: if tr.guidance_embeds { "dev" } else { "schnell" },
        latent_factor: vae.scale_factor(),
        transformer_parameters: params,
        transformer_dtypes: dtypes.into_iter().collect(),
        weights,
    })
}

/// Loads a GGUF FLUX transformer (original key names, as published): quantized weights stay
/// quantized in memory and each layer dequantizes its weight when it runs; F32/F16/BF16
/// tensors are read as `dtype`.
pub fn load_flux_transformer_gguf(
    file: &Path,
    axes_dims_rope: Option<Vec<usize>>,
    device: &Device,
    dtype: DType,
) -> Result<crate::modules::flux::FluxTransformer> {
    use crate::modules::flux::{infer_config_from_shapes, FluxTransformer, GgufWeights};
    let (mut reader, content) = read_gguf(file)?;
    let mut tensors = std::collections::HashMap::new();
    for name in content.tensor_infos.keys() {
        let q = content
            .tensor(&mut reader, name, device)
            .map_err(|e| Error::config(file, format!("tensor {name}: {}", Error::from(e))))?;
        tensors.insert(name.clone(), q);
    }
    let to_config = |e: Error| match e {
        Error::Invalid { message, .. } => Error::config(file, message),
        other => other,
    };
    let weights = GgufWeights::new(tensors, dtype, device).map_err(to_config)?;
    let cfg = infer_config_from_shapes(&weights.shapes, axes_dims_rope).map_err(to_config)?;
    in_component(
        "transformer",
        file,
        FluxTransformer::from_gguf(std::sync::Arc::new(weights), &cfg),
    )
}

/// What `inspect` reports about a FLUX transformer file (single-file safetensors with the
/// original key names, or GGUF), read from its header.
#[derive(Debug, Clone)]
pub struct FluxFileInfo {
    /// `single-file safetensors (original key names)` or `GGUF`.
    pub layout: &'static str,
    /// `dev` (guidance embedding) or `schnell`.
    pub variant: &'static str,
    pub parameters: u64,
    /// Storage types and how many tensors use each, e.g. `Q8_0 x 304, F32 x 476`.
    pub dtypes: Vec<(String, usize)>,
    pub double_blocks: usize,
    pub single_blocks: usize,
    pub width: usize,
}

/// Opens a GGUF file and reads its header with candle, refusing what candle would trip over
/// later: a header that makes its reader panic (a `general.alignment` of 0 divides by zero), a
/// tensor whose size overflows or exceeds the file, and a tensor of no elements (candle would
/// build a slice of its block type on an unaligned empty buffer, which debug builds abort on).
pub fn read_gguf(
    file: &Path,
) -> Result<(std::fs::File, candle_core::quantized::gguf_file::Content)> {
    use candle_core::quantized::gguf_file::Content;
    let mut reader = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    let content = match crate::error::catch_panic(|| Content::read(&mut reader)) {
        Some(Ok(content)) => content,
        Some(Err(e)) => {
            return Err(Error::config(
                file,
                format!("cannot read GGUF: {}", Error::from(e)),
            ))
        }
        None => return Err(Error::config(file, "cannot read GGUF: malformed header")),
    };
    let file_len = reader.metadata().map_err(|e| Error::io(file, e))?.len();
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        let dtype = info.ggml_dtype;
        let bytes = dims
            .iter()
            .try_fold(1usize, |n, d| n.checked_mul(*d))
            .and_then(|n| (n / dtype.block_size()).checked_mul(dtype.type_size()));
        let why = match bytes {
            None => "overflows",
            Some(0) => "has no elements",
            Some(b) if b as u64 > file_len => "is larger than the file",
            Some(_) => continue,
        };
        return Err(Error::config(
            file,
            format!("GGUF tensor {name}: shape {dims:?} of {dtype:?} {why}"),
        ));
    }
    Ok((reader, content))
}

/// Reads a FLUX transformer file's header.
pub fn inspect_flux_file(file: &Path) -> Result<FluxFileInfo> {
    use crate::modules::flux::original_plan;
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut shapes: std::collections::HashMap<String, Vec<usize>> = Default::default();
    let mut dtypes: std::collections::BTreeMap<String, usize> = Default::default();
    let layout = match ext.as_str() {
        "gguf" => {
            let (_, content) = read_gguf(file)?;
            for (name, info) in &content.tensor_infos {
                shapes.insert(name.clone(), info.shape.dims().to_vec());
                *dtypes.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
            }
            "GGUF"
        }
        "safetensors" => {
            // SAFETY: read-only mapping of a model file, as when loading.
            let st =
                unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }.map_err(|e| {
                    Error::config(file, format!("cannot read safetensors: {}", Error::from(e)))
                })?;
            for (name, view) in st.tensors() {
                shapes.insert(name.clone(), view.shape().to_vec());
                *dtypes.entry(format!("{:?}", view.dtype())).or_default() += 1;
            }
            "single-file safetensors (original key names)"
        }
        _ => {
            return Err(Error::config(
                file,
                "expected a .safetensors or .gguf FLUX transformer",
            ))
        }
    };
    let plan = original_plan(&shapes).map_err(|e| match e {
        Error::Invalid { message, .. } => Error::config(
            file,
            format!("not a FLUX transformer with the original key names: {message}"),
        ),
        other => other,
    })?;
    let count = |prefix: &str| {
        plan.iter()
            .filter(|(n, _, _)| n.starts_with(prefix) && n.ends_with("norm_q.weight"))
            .count()
    };
    let width = plan
        .iter()
        .find(|(n, _, _)| n == "x_embedder.weight")
        .and_then(|(_, old, _)| shapes.get(old))
        .and_then(|s| s.first().copied())
        .unwrap_or(0);
    Ok(FluxFileInfo {
        layout,
        variant: if plan.iter().any(|(n, _, _)| n.contains("guidance_embedder")) {
            "dev"
        } else {
            "schnell"
        },
        parameters: shapes
            .values()
            .map(|s| s.iter().product::<usize>() as u64)
            .sum(),
        dtypes: dtypes.into_iter().collect(),
        double_blocks: count("transformer_blocks."),
        single_blocks: count("single_transformer_blocks."),
        width,
    })
}
