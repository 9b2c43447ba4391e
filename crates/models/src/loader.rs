//! Detects a Stable Diffusion diffusers folder and builds its pipeline.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::modules::adapter;
use crate::modules::clip::{ClipTextConfig, ClipTextModel};
use crate::modules::config::JsonConfig;
use crate::modules::unet::{UNet, UNetConfig};
use crate::modules::vae::{Vae, VaeConfig};
use crate::pipelines::SdPipeline;
use crate::samplers::{PredictionType, SchedulerConfig};
use crate::tokenizer::clip::ClipTokenizer;
use crate::{Error, Result};

/// Pipeline classes of model_index.json that load as SD 1.x/2.x (an inpainting UNet is
/// recognised by its input channels, whatever the class).
const SD_CLASSES: &[&str] = &[
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "OnnxStableDiffusionPipeline",
];

/// What was found in a model folder.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// A short name for the model (its folder name).
    pub name: String,
    pub path: PathBuf,
    /// `sd1` or `sd2`, judged from the text encoder (CLIP ViT-L vs OpenCLIP).
    pub family: &'static str,
    pub pipeline_class: String,
    pub prediction_type: PredictionType,
    /// The weight file of each component.
    pub weights: Vec<(String, Vec<PathBuf>)>,
}

/// A short name for a model folder (written into PNG `parameters`): its Hugging Face repo id
/// when it is a snapshot in a hub cache (`models--org--name/snapshots/REV`), else its folder
/// name.
pub fn model_name(path: &Path) -> String {
    let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let repo = canon
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == "snapshots"))
        .and_then(Path::parent)
        .and_then(|p| {
            p.file_name()?
                .to_str()?
                .strip_prefix("models--")
                .map(str::to_string)
        })
        .filter(|r| r.split("--").all(|part| !part.is_empty()))
        .map(|r| r.replace("--", "/"));
    repo.or_else(|| canon.file_name().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| path.display().to_string())
}

/// Finds the safetensors weights of a component: the plain file or its sharded index, else
/// the `fp16`, else the `bf16` variant.
pub fn find_weights(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    for variant in ["", ".fp16", ".bf16"] {
        let single = dir.join(format!("{stem}{variant}.safetensors"));
        if single.is_file() {
            return Ok(vec![single]);
        }
        // Sharded variants are indexed as `x.safetensors.index.fp16.json` on the Hub.
        for index in [
            format!("{stem}{variant}.safetensors.index.json"),
            format!("{stem}.safetensors.index{variant}.json"),
        ] {
            let index = dir.join(index);
            if index.is_file() {
                return shards_from_index(&index);
            }
        }
    }
    let pickle = ["bin", "ckpt", "pt", "pth"]
        .iter()
        .map(|ext| dir.join(format!("{stem}.{ext}")))
        .find(|p| p.is_file());
    match pickle {
        Some(p) => Err(Error::config(
            &p,
            "pickle weights are not loaded (they can run code); convert them to .safetensors",
        )),
        None => Err(Error::config(
            dir,
            format!("no {stem}.safetensors (or .fp16.safetensors, or a sharded index) found"),
        )),
    }
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let cfg = JsonConfig::load(index)?;
    let map = cfg
        .value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| cfg.err("missing `weight_map` object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for v in map.values() {
        let name = v
            .as_str()
            .ok_or_else(|| cfg.err("`weight_map` values must be file names"))?;
        if name.contains('/') || name.contains('\\') || name.contains("..") {
            return Err(cfg.err(format!("shard name {name:?} must be a plain file name")));
        }
        let p = dir.join(name);
        if !files.contains(&p) {
            if !p.is_file() {
                return Err(cfg.err(format!("shard {name} is missing")));
            }
            files.push(p);
        }
    }
    Ok(files)
}

fn var_builder(files: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    // Open each file on its own first so that a corrupt one is named in the error.
    for f in files {
        // SAFETY: the files are memory-mapped read-only; they must not be modified while
        // loaded, which is the contract of a model folder.
        unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }.map_err(|e| {
            Error::config(
                f,
                format!("cannot read safetensors weights: {}", Error::from(e)),
            )
        })?;
    }
    // SAFETY: as above.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) };
    vb.map_err(|e| {
        Error::config(
            files.first().cloned().unwrap_or_default(),
            format!("cannot read safetensors weights: {}", Error::from(e)),
        )
    })
}

fn component(root: &Path, name: &str) -> Result<PathBuf> {
    let dir = root.join(name);
    if !dir.is_dir() {
        return Err(Error::config(
            root,
            format!("missing the `{name}/` component folder"),
        ));
    }
    Ok(dir)
}

/// Wraps an error from building a module so that it names the component.
fn in_component<T>(name: &str, dir: &Path, r: Result<T>) -> Result<T> {
    r.map_err(|e| match e {
        Error::Candle(c) => {
            Error::config(dir, format!("{name} weights do not match its config: {c}"))
        }
        other => other,
    })
}

/// Reads a model folder's description without loading any weights.
pub fn inspect(root: &Path) -> Result<ModelInfo> {
    if !root.exists() {
        return Err(Error::config(root, "no such file or directory"));
    }
    if !root.is_dir() {
        return Err(Error::config(
            root,
            "expected a diffusers model folder (with model_index.json)",
        ));
    }
    if !root.join("model_index.json").is_file() {
        return Err(Error::config(
            root,
            "not a diffusers model folder: it has no model_index.json",
        ));
    }
    let index = JsonConfig::load(&root.join("model_index.json"))?;
    let class = index.str_or("_class_name", "")?.to_string();
    if !SD_CLASSES.contains(&class.as_str()) {
        return Err(index.err(format!(
            "pipeline class {class:?} is not supported; this worker runs Stable Diffusion 1.x/2.x ({})",
            SD_CLASSES.join(", ")
        )));
    }
    let te = JsonConfig::load(&component(root, "text_encoder")?.join("config.json"))?;
    let te_cfg = ClipTextConfig::from_config(&te)?;
    let family = if te_cfg.hidden_act == crate::modules::clip::ClipActivation::QuickGelu {
        "sd1"
    } else {
        "sd2"
    };
    let sched =
        SchedulerConfig::load(&component(root, "scheduler")?.join("scheduler_config.json"))?;
    let mut weights = Vec::new();
    for (name, stem) in [
        ("text_encoder", "model"),
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
    ] {
        weights.push((
            name.to_string(),
            find_weights(&component(root, name)?, stem)?,
        ));
    }
    let name = model_name(root);
    Ok(ModelInfo {
        name,
        path: root.to_path_buf(),
        family,
        pipeline_class: class,
        prediction_type: sched.prediction_type(),
        weights,
    })
}

/// Where each part of a Stable Diffusion pipeline comes from: config files (or configs built
/// from a checkpoint's shapes), weights, tokenizer and scheduler.
struct SdParts {
    tokenizer: ClipTokenizer,
    /// Where the tokenizer was read (for error messages).
    tokenizer_dir: PathBuf,
    te_cfg: JsonConfig,
    te_vb: VarBuilder<'static>,
    unet_cfg: JsonConfig,
    unet_vb: VarBuilder<'static>,
    vae_cfg: JsonConfig,
    vae_vb: VarBuilder<'static>,
    scheduler: SchedulerConfig,
}

/// Options of `load_sd_with`.
#[derive(Debug, Clone, Default)]
pub struct SdLoadOptions {
    /// A VAE file that replaces the model's VAE (diffusers names, or LDM names with or without
    /// `first_stage_model.`).
    pub vae: Option<PathBuf>,
    /// Single-file checkpoints: a diffusers folder whose configs, tokenizer and scheduler are
    /// used (its weights are not read).
    pub components: Option<PathBuf>,
    /// Single-file checkpoints: the prediction type (the tensors do not tell).
    pub prediction_type: Option<PredictionType>,
}

/// Loads a Stable Diffusion 1.x/2.x diffusers folder onto `device` with weights in `dtype`.
/// As diffusers' SD 1.x/2.x pipelines, the VAE runs in the pipeline's dtype.
pub fn load_sd(root: &Path, device: &Device, dtype: DType) -> Result<(SdPipeline, ModelInfo)> {
    load_sd_with(root, &SdLoadOptions::default(), device, dtype)
}

/// Loads a diffusers folder or a single-file checkpoint (see [`crate::single_file`]).
pub fn load_sd_with(
    model: &Path,
    opts: &SdLoadOptions,
    device: &Device,
    dtype: DType,
) -> Result<(SdPipeline, ModelInfo)> {
    let (mut parts, info) = if model.is_file() {
        checkpoint_parts(model, opts, device, dtype)?
    } else {
        if opts.components.is_some() || opts.prediction_type.is_some() {
            return Err(Error::config(
                model,
                "components and a prediction type apply to single-file checkpoints (a folder has its own configs)",
            ));
        }
        folder_parts(model, device, dtype)?
    };
    if let Some(vae) = &opts.vae {
        parts.vae_vb = vae_file_builder(vae, device, dtype)?;
    }
    Ok((build_sd(parts, device, dtype)?, info))
}

fn folder_parts(root: &Path, device: &Device, dtype: DType) -> Result<(SdParts, ModelInfo)> {
    let info = inspect(root)?;
    let weights = |name: &str| -> Vec<PathBuf> {
        info.weights
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, w)| w.clone())
            .unwrap_or_default()
    };
    let tokenizer_dir = component(root, "tokenizer")?;
    let tokenizer = ClipTokenizer::from_dir(&tokenizer_dir)?;
    let te_cfg = JsonConfig::load(&component(root, "text_encoder")?.join("config.json"))?;
    let unet_dir = component(root, "unet")?;
    let unet_cfg = JsonConfig::load(&unet_dir.join("config.json"))?;
    let unet_vb = var_builder(
        &find_weights(&unet_dir, "diffusion_pytorch_model")?,
        dtype,
        device,
    )?;
    let vae_cfg = JsonConfig::load(&component(root, "vae")?.join("config.json"))?;
    let parts = SdParts {
        tokenizer,
        tokenizer_dir,
        te_vb: var_builder(&weights("text_encoder"), dtype, device)?,
        te_cfg,
        unet_cfg,
        unet_vb,
        vae_vb: var_builder(&weights("vae"), dtype, device)?,
        vae_cfg,
        scheduler: SchedulerConfig::load(
            &component(root, "scheduler")?.join("scheduler_config.json"),
        )?,
    };
    Ok((parts, info))
}

/// A folder in the Hugging Face cache holding a CLIP tokenizer for `family`, if any.
pub fn cached_tokenizer(family: &str) -> Option<PathBuf> {
    let candidates: &[(&str, &str)] = match family {
        "sd1" => &[
            ("openai/clip-vit-large-patch14", ""),
            ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
            ("runwayml/stable-diffusion-v1-5", "tokenizer"),
            ("CompVis/stable-diffusion-v1-4", "tokenizer"),
        ],
        _ => &[
            ("stabilityai/stable-diffusion-2-1", "tokenizer"),
            ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
            ("stabilityai/stable-diffusion-2", "tokenizer"),
            ("stabilityai/stable-diffusion-2-base", "tokenizer"),
        ],
    };
    let cache = hf_cache_dir()?;
    for (repo, sub) in candidates {
        let base = cache.join(format!("models--{}", repo.replace('/', "--")));
        let snapshots = base.join("snapshots");
        let mut dirs: Vec<PathBuf> = Vec::new();
        if let Ok(commit) = std::fs::read_to_string(base.join("refs").join("main")) {
            dirs.push(snapshots.join(commit.trim()));
        }
        if let Ok(rd) = std::fs::read_dir(&snapshots) {
            dirs.extend(rd.flatten().map(|e| e.path()));
        }
        for d in dirs {
            let dir = if sub.is_empty() { d } else { d.join(sub) };
            if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
                return Some(dir);
            }
        }
    }
    None
}

/// The Hugging Face hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hf_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

fn checkpoint_parts(
    file: &Path,
    opts: &SdLoadOptions,
    device: &Device,
    dtype: DType,
) -> Result<(SdParts, ModelInfo)> {
    use crate::single_file as sf;
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin") {
        return Err(Error::config(
            file,
            "pickle checkpoints are not loaded (they can run code); convert it to .safetensors",
        ));
    }
    let ckpt = sf::Checkpoint::open(file)?;
    let comp = opts.components.as_deref();
    let family = ckpt.family();
    // The prediction type: the flag, else the components' scheduler, else epsilon.
    let mut sched_value = match comp {
        Some(dir) => {
            let p = dir.join("scheduler").join("scheduler_config.json");
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| Error::config(&p, format!("invalid JSON: {e}")))?
        }
        None => ckpt.default_scheduler(opts.prediction_type.unwrap_or(PredictionType::Epsilon)),
    };
    if let Some(p) = opts.prediction_type {
        sched_value["prediction_type"] = serde_json::json!(p.as_str());
    }
    let scheduler = SchedulerConfig::from_json(&sched_value, file)?;
    let prediction = scheduler.prediction_type();

    let tokenizer_dir = match comp {
        Some(dir) => component(dir, "tokenizer")?,
        None => cached_tokenizer(family).ok_or_else(|| {
                Error::config(
                    file,
                    format!(
                        "a single-file checkpoint carries no tokenizer: pass a components folder (--components DIR: a diffusers {family} folder; its configs, tokenizer and scheduler are used, not its weights) or put {} in the Hugging Face cache",
                        if family == "sd1" { "openai/clip-vit-large-patch14" } else { "stabilityai/stable-diffusion-2-1" }
                    ),
                )
            })?,
    };
    let tokenizer = ClipTokenizer::from_dir(&tokenizer_dir)?;
    let unet_cfg = sf::config_or(comp, "unet", file, || ckpt.infer_unet_config(prediction))?;
    let te_cfg = sf::config_or(comp, "text_encoder", file, || {
        ckpt.infer_text_encoder_config()
    })?;
    let vae_cfg = match (comp, ckpt.has_vae) {
        (Some(_), _) => sf::config_or(comp, "vae", file, || ckpt.infer_vae_config())?,
        (None, true) => JsonConfig::from_value(file, ckpt.infer_vae_config()?),
        (None, false) => match &opts.vae {
            Some(v) => JsonConfig::from_value(v, sf::Checkpoint::open_vae(v)?.infer_vae_config()?),
            None => return Err(Error::config(
                file,
                "the checkpoint holds no VAE (`first_stage_model.`): pass a VAE file (--vae FILE)",
            )),
        },
    };

    let tensors = sf::load_tensors(file, device)?;
    let layers = UNetConfig::from_config(&unet_cfg)?
        .layers_per_block_uniform()
        .ok_or_else(|| {
            unet_cfg.err("a single-file checkpoint's UNet has one layer count for every block")
        })?;
    let unet_map = sf::apply(&sf::unet_plan(&ckpt, layers)?, &tensors, file)?;
    let te_layers = ClipTextConfig::from_config(&te_cfg)?.num_hidden_layers;
    let te_map = sf::apply(&sf::text_encoder_plan(&ckpt, te_layers)?, &tensors, file)?;
    let vae_map = if ckpt.has_vae {
        sf::apply(&sf::vae_plan(&ckpt, sf::VAE_PREFIX)?, &tensors, file)?
    } else {
        std::collections::HashMap::new()
    };
    drop(tensors);
    let name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.display().to_string());
    let info = ModelInfo {
        name,
        path: file.to_path_buf(),
        family,
        pipeline_class: "single-file checkpoint".into(),
        prediction_type: prediction,
        weights: vec![("checkpoint".into(), vec![file.to_path_buf()])],
    };
    let parts = SdParts {
        tokenizer,
        tokenizer_dir,
        te_cfg,
        te_vb: VarBuilder::from_tensors(te_map, dtype, device),
        unet_cfg,
        unet_vb: VarBuilder::from_tensors(unet_map, dtype, device),
        vae_cfg,
        vae_vb: VarBuilder::from_tensors(vae_map, dtype, device),
        scheduler,
    };
    Ok((parts, info))
}

/// A var builder over a separate VAE file: diffusers names, or LDM names with or without
/// `first_stage_model.`.
fn vae_file_builder(file: &Path, device: &Device, dtype: DType) -> Result<VarBuilder<'static>> {
    use crate::single_file as sf;
    let shapes = sf::read_shapes(file)?;
    let ldm_prefix = if shapes.keys().any(|k| k.starts_with(sf::VAE_PREFIX)) {
        Some(sf::VAE_PREFIX)
    } else if shapes.keys().any(|k| k.starts_with("decoder.up.")) {
        Some("")
    } else {
        None
    };
    match ldm_prefix {
        None => var_builder(&[file.to_path_buf()], dtype, device),
        Some(prefix) => {
            let ckpt = sf::Checkpoint::open_vae(file)?;
            let tensors = sf::load_tensors(file, device)?;
            let map = sf::apply(&sf::vae_plan(&ckpt, prefix)?, &tensors, file)?;
            // Only the VAE's tensors: a full checkpoint passed as --vae keeps just those.
            Ok(VarBuilder::from_tensors(map, dtype, device))
        }
    }
}

/// Builds the pipeline from its parts, checking that they fit together.
fn build_sd(parts: SdParts, device: &Device, dtype: DType) -> Result<SdPipeline> {
    let SdParts {
        tokenizer,
        tokenizer_dir,
        te_cfg: te_cfg_file,
        te_vb,
        unet_cfg: unet_cfg_file,
        unet_vb,
        vae_cfg: vae_cfg_file,
        vae_vb,
        scheduler,
    } = parts;
    let te_cfg = ClipTextConfig::from_config(&te_cfg_file)?;
    let (text_encoder, mut lora_layers) =
        adapter::registering("text_encoder", || ClipTextModel::new(te_vb, &te_cfg));
    let text_encoder = in_component("text_encoder", &te_cfg_file.path, text_encoder)?;

    let unet_cfg = UNetConfig::from_config(&unet_cfg_file)?;
    let (unet, unet_layers) = adapter::registering("unet", || UNet::new(unet_vb, &unet_cfg));
    let unet = in_component("unet", &unet_cfg_file.path, unet)?;
    lora_layers.extend(unet_layers);

    let vae_cfg = VaeConfig::from_config(&vae_cfg_file)?;
    let vae = in_component("vae", &vae_cfg_file.path, Vae::new(vae_vb, &vae_cfg))?;

    // Regular UNets take the latents; inpainting UNets also the mask and the masked image's
    // latents (2 x latent channels + 1).
    let lc = vae_cfg.latent_channels;
    if unet_cfg.in_channels != lc && unet_cfg.in_channels != 2 * lc + 1 {
        return Err(unet_cfg_file.err(format!(
            "in_channels = {} but the VAE has {lc} latent channels: expected {lc}, or {} for an inpainting UNet",
            unet_cfg.in_channels,
            2 * lc + 1
        )));
    }
    if unet_cfg.out_channels != vae_cfg.latent_channels {
        return Err(unet_cfg_file.err(format!(
            "out_channels = {} but the VAE has {} latent channels",
            unet_cfg.out_channels, vae_cfg.latent_channels
        )));
    }
    if let Some((i, d)) = unet_cfg
        .cross_attention_dim
        .iter()
        .enumerate()
        .find(|(_, &d)| d != te_cfg.hidden_size)
    {
        return Err(unet_cfg_file.err(format!(
            "cross_attention_dim[{i}] = {d} but the text encoder's hidden_size is {}",
            te_cfg.hidden_size
        )));
    }
    let max_id = [
        tokenizer.pad_id(),
        tokenizer.bos_id(),
        tokenizer.eos_id(),
        tokenizer.vocab_size().saturating_sub(1) as u32,
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    if max_id as usize >= te_cfg.vocab_size {
        return Err(Error::config(
            &tokenizer_dir,
            format!(
                "token id {max_id} is outside the text encoder's vocab_size {}",
                te_cfg.vocab_size
            ),
        ));
    }
    if tokenizer.max_length() > te_cfg.max_position_embeddings {
        return Err(Error::config(
            &tokenizer_dir,
            format!(
                "model_max_length {} exceeds the text encoder's {} positions",
                tokenizer.max_length(),
                te_cfg.max_position_embeddings
            ),
        ));
    }
    Ok(SdPipeline {
        tokenizer,
        text_encoder,
        unet,
        vae,
        scheduler,
        device: device.clone(),
        dtype,
        lora_layers,
    })
}

/// The UNet config of a model folder.
pub fn read_unet_config(root: &Path) -> Result<UNetConfig> {
    UNetConfig::from_config(&JsonConfig::load(
        &component(root, "unet")?.join("config.json"),
    )?)
}

/// The VAE config of a model folder.
pub fn read_vae_config(root: &Path) -> Result<VaeConfig> {
    VaeConfig::from_config(&JsonConfig::load(
        &component(root, "vae")?.join("config.json"),
    )?)
}

/// Loads a UNet from a diffusers `unet/` folder (its `config.json` and weights).
pub fn load_unet(dir: &Path, device: &Device, dtype: DType) -> Result<UNet> {
    let cfg = UNetConfig::from_config(&JsonConfig::load(&dir.join("config.json"))?)?;
    let vb = var_builder(
        &find_weights(dir, "diffusion_pytorch_model")?,
        dtype,
        device,
    )?;
    in_component("unet", dir, UNet::new(vb, &cfg))
}

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
    use candle_core::quantized::gguf_file;
    let mut reader = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    let content = gguf_file::Content::read(&mut reader)
        .map_err(|e| Error::config(file, format!("cannot read GGUF: {}", Error::from(e))))?;
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
            let mut reader = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
            let content =
                candle_core::quantized::gguf_file::Content::read(&mut reader).map_err(|e| {
                    Error::config(file, format!("cannot read GGUF: {}", Error::from(e)))
                })?;
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
