//! Stable Diffusion 1.x/2.x and SDXL: a diffusers folder (`model_index.json` and its components) or a
//! single-file checkpoint with its components folder or inferred configs, to an `SdPipeline`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::modules::adapter;
use crate::modules::clip::{ClipTextConfig, ClipTextModel};
use crate::modules::config::JsonConfig;
use crate::modules::unet::{UNet, UNetConfig};
use crate::modules::vae::{Vae, VaeConfig};
use crate::pipelines::{SdPipeline, XlText};
use crate::samplers::{PredictionType, SchedulerConfig};
use crate::tokenizer::clip::{BuiltinPad, ClipTokenizer, BUILTIN_LABEL};
use crate::{Error, Result};

use super::{component, find_weights, in_component, model_name, var_builder};

/// Pipeline classes of model_index.json that load as SD 1.x/2.x (an inpainting UNet is
/// recognised by its input channels, whatever the class).
const SD_CLASSES: &[&str] = &[
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "OnnxStableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
];

/// What was found in a model folder.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// A short name for the model (its folder name).
    pub name: String,
    pub path: PathBuf,
    /// `sd1` or `sd2`, judged from the text encoder (CLIP ViT-L vs OpenCLIP), or `sdxl`
    /// (two text encoders).
    pub family: &'static str,
    /// `base`, `inpaint` (a 9-channel inpainting UNet) or `turbo` (Euler ancestral with
    /// trailing spacing, as SD-Turbo and SDXL-Turbo ship: run at 1-4 steps without guidance).
    pub variant: &'static str,
    pub pipeline_class: String,
    pub prediction_type: PredictionType,
    /// The weight file of each component.
    pub weights: Vec<(String, Vec<PathBuf>)>,
    /// A single file with no tokenizer at hand: the built-in CLIP vocabulary is used.
    pub builtin_tokenizer: bool,
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
            "pipeline class {class:?} is not supported; this worker runs Stable Diffusion 1.x/2.x and SDXL ({})",
            SD_CLASSES.join(", ")
        )));
    }
    let xl = class.starts_with("StableDiffusionXL");
    if xl && !index_names(&index, "text_encoder") {
        return Err(
            index.err("SDXL models without the first text encoder (the refiner) are not supported")
        );
    }
    let te = JsonConfig::load(&component(root, "text_encoder")?.join("config.json"))?;
    let te_cfg = ClipTextConfig::from_config(&te)?;
    let family = if xl {
        "sdxl"
    } else if te_cfg.hidden_act == crate::modules::clip::ClipActivation::QuickGelu {
        "sd1"
    } else {
        "sd2"
    };
    let sched =
        SchedulerConfig::load(&component(root, "scheduler")?.join("scheduler_config.json"))?;
    let mut weights = Vec::new();
    let mut parts = vec![
        ("text_encoder", "model"),
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
    ];
    if xl {
        parts.insert(1, ("text_encoder_2", "model"));
    }
    for (name, stem) in parts {
        weights.push((
            name.to_string(),
            find_weights(&component(root, name)?, stem)?,
        ));
    }
    let name = model_name(root);
    let unet = JsonConfig::load(&component(root, "unet")?.join("config.json"))?;
    let variant = variant(unet.usize_or("in_channels", 4)?, &sched);
    Ok(ModelInfo {
        name,
        path: root.to_path_buf(),
        family,
        variant,
        pipeline_class: class,
        prediction_type: sched.prediction_type(),
        weights,
        builtin_tokenizer: false,
    })
}

/// The variant of a model from its UNet's input channels and its scheduler.
fn variant(unet_in_channels: usize, scheduler: &SchedulerConfig) -> &'static str {
    use crate::samplers::TimestepSpacing;
    if unet_in_channels == 9 {
        "inpaint"
    } else if scheduler.class_name.as_deref() == Some("EulerAncestralDiscreteScheduler")
        && scheduler.timestep_spacing == Some(TimestepSpacing::Trailing)
    {
        "turbo"
    } else {
        "base"
    }
}

/// Whether `model_index.json` names a component (SDXL refiners list `[null, null]` for the
/// first text encoder).
fn index_names(index: &JsonConfig, name: &str) -> bool {
    index
        .value
        .get(name)
        .and_then(|v| v.as_array())
        .is_some_and(|a| a.iter().any(|x| !x.is_null()))
}

/// SDXL's second text encoder, as found in a folder.
struct XlParts {
    tokenizer: ClipTokenizer,
    tokenizer_dir: PathBuf,
    te_cfg: JsonConfig,
    te_vb: VarBuilder<'static>,
    force_zeros_for_empty_prompt: bool,
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
    xl: Option<XlParts>,
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
    let xl = if info.family == "sdxl" {
        let index = JsonConfig::load(&root.join("model_index.json"))?;
        let tokenizer_dir = component(root, "tokenizer_2")?;
        Some(XlParts {
            tokenizer: ClipTokenizer::from_dir(&tokenizer_dir)?,
            tokenizer_dir,
            te_cfg: JsonConfig::load(&component(root, "text_encoder_2")?.join("config.json"))?,
            te_vb: var_builder(&weights("text_encoder_2"), dtype, device)?,
            force_zeros_for_empty_prompt: index.bool_or("force_zeros_for_empty_prompt", true)?,
        })
    } else {
        None
    };
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
        xl,
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
        "sdxl" => &[
            ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
            ("stabilityai/sdxl-turbo", "tokenizer"),
            (
                "stabilityai/stable-diffusion-xl-1.0-inpainting-0.1",
                "tokenizer",
            ),
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
            let files = (dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file())
                || dir.join("tokenizer.json").is_file();
            if files {
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
    // The prediction type: the flag, else the components' scheduler, else what diffusers'
    // `from_single_file` infers for the family.
    let mut sched_value = match comp {
        Some(dir) => {
            let p = dir.join("scheduler").join("scheduler_config.json");
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| Error::config(&p, format!("invalid JSON: {e}")))?
        }
        None => ckpt.default_scheduler(
            opts.prediction_type
                .unwrap_or_else(|| ckpt.default_prediction()),
        ),
    };
    if let Some(p) = opts.prediction_type {
        sched_value["prediction_type"] = serde_json::json!(p.as_str());
    }
    let scheduler = SchedulerConfig::from_json(&sched_value, file)?;
    let prediction = scheduler.prediction_type();

    // The tokenizers: the components', else a cached snapshot's, else the built-in vocabulary.
    let cached = match comp {
        Some(dir) => Some(component(dir, "tokenizer")?),
        None => cached_tokenizer(family),
    };
    let builtin = cached.is_none();
    let (tokenizer, tokenizer_dir) = match cached {
        Some(dir) => (ClipTokenizer::from_dir(&dir)?, dir),
        None => {
            let pad = if family == "sd2" {
                BuiltinPad::Exclamation
            } else {
                BuiltinPad::EndOfText
            };
            (ClipTokenizer::builtin(pad)?, PathBuf::from(BUILTIN_LABEL))
        }
    };
    // SDXL: the second tokenizer, from the components, beside the cached first one, or built in.
    let tokenizer_2 = match (family, comp) {
        ("sdxl", Some(dir)) => {
            let dir = component(dir, "tokenizer_2")?;
            Some((ClipTokenizer::from_dir(&dir)?, dir))
        }
        ("sdxl", None) if !builtin => {
            let dir = tokenizer_dir.with_file_name("tokenizer_2");
            Some((ClipTokenizer::from_dir(&dir)?, dir))
        }
        ("sdxl", None) => Some((
            ClipTokenizer::builtin(BuiltinPad::Exclamation)?,
            PathBuf::from(BUILTIN_LABEL),
        )),
        _ => None,
    };
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
    let xl = match tokenizer_2 {
        Some((tokenizer_2, tokenizer_dir)) => {
            let te_cfg = sf::config_or(comp, "text_encoder_2", file, || {
                ckpt.infer_text_encoder_2_config()
            })?;
            let layers = ClipTextConfig::from_config(&te_cfg)?.num_hidden_layers;
            let map = sf::apply(&sf::text_encoder_2_plan(&ckpt, layers)?, &tensors, file)?;
            let force_zeros = match comp.map(|d| d.join("model_index.json")) {
                Some(p) if p.is_file() => {
                    JsonConfig::load(&p)?.bool_or("force_zeros_for_empty_prompt", true)?
                }
                _ => true,
            };
            Some(XlParts {
                tokenizer: tokenizer_2,
                tokenizer_dir,
                te_cfg,
                te_vb: VarBuilder::from_tensors(map, dtype, device),
                force_zeros_for_empty_prompt: force_zeros,
            })
        }
        None => None,
    };
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
    let in_channels = UNetConfig::from_config(&unet_cfg)?.in_channels;
    let info = ModelInfo {
        name,
        path: file.to_path_buf(),
        family,
        variant: variant(in_channels, &scheduler),
        pipeline_class: "single-file checkpoint".into(),
        prediction_type: prediction,
        weights: vec![("checkpoint".into(), vec![file.to_path_buf()])],
        builtin_tokenizer: builtin,
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
        xl,
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
        xl,
    } = parts;
    let te_cfg = ClipTextConfig::from_config(&te_cfg_file)?;
    let (text_encoder, mut lora_layers) =
        adapter::registering("text_encoder", || ClipTextModel::new(te_vb, &te_cfg));
    let text_encoder = in_component("text_encoder", &te_cfg_file.path, text_encoder)?;

    let xl = match xl {
        Some(parts) => {
            let cfg = ClipTextConfig::from_config(&parts.te_cfg)?;
            let (te, layers) =
                adapter::registering("text_encoder_2", || ClipTextModel::new(parts.te_vb, &cfg));
            lora_layers.extend(layers);
            let text_encoder = in_component("text_encoder_2", &parts.te_cfg.path, te)?;
            check_tokenizer(&parts.tokenizer, &parts.tokenizer_dir, &cfg)?;
            Some(XlText {
                tokenizer: parts.tokenizer,
                text_encoder,
                force_zeros_for_empty_prompt: parts.force_zeros_for_empty_prompt,
            })
        }
        None => None,
    };

    let unet_cfg = UNetConfig::from_config(&unet_cfg_file)?;
    let (unet, unet_layers) = adapter::registering("unet", || UNet::new(unet_vb, &unet_cfg));
    let unet = in_component("unet", &unet_cfg_file.path, unet)?;
    lora_layers.extend(unet_layers);

    let vae_cfg = VaeConfig::from_config(&vae_cfg_file)?;
    // As diffusers' SDXL pipelines: a half-precision VAE with `force_upcast` (SDXL's overflows
    // in f16) runs in f32; SD 1.x/2.x pipelines keep the pipeline's dtype.
    let vae_vb = if xl.is_some() && vae_cfg.force_upcast && dtype != DType::F32 {
        vae_vb.set_dtype(DType::F32)
    } else {
        vae_vb
    };
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
    match &xl {
        Some(xl) => crate::pipelines::sdxl::check_fit(te_cfg.hidden_size, xl, &unet_cfg)
            .map_err(|m| unet_cfg_file.err(m))?,
        None => {
            if unet_cfg.text_time.is_some() {
                return Err(unet_cfg_file.err(
                    "this UNet takes SDXL's text_time conditioning but the model has one text encoder",
                ));
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
        }
    }
    check_tokenizer(&tokenizer, &tokenizer_dir, &te_cfg)?;
    Ok(SdPipeline {
        tokenizer,
        text_encoder,
        unet,
        vae,
        scheduler,
        device: device.clone(),
        dtype,
        lora_layers,
        xl,
    })
}

/// Checks that a tokenizer's ids and length fit its text encoder.
fn check_tokenizer(tokenizer: &ClipTokenizer, dir: &Path, te_cfg: &ClipTextConfig) -> Result<()> {
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
            dir,
            format!(
                "token id {max_id} is outside the text encoder's vocab_size {}",
                te_cfg.vocab_size
            ),
        ));
    }
    if tokenizer.max_length() > te_cfg.max_position_embeddings {
        return Err(Error::config(
            dir,
            format!(
                "model_max_length {} exceeds the text encoder's {} positions",
                tokenizer.max_length(),
                te_cfg.max_position_embeddings
            ),
        ));
    }
    Ok(())
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
