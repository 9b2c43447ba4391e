//! What `--model` names: a Stable Diffusion diffusers folder, a single-file SD checkpoint, or
//! FLUX (a folder, or a transformer file with `--components`); and the SD loading options.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use sd_models::loader::SdLoadOptions;
use sd_models::samplers::PredictionType;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    SdFolder,
    SdCheckpoint,
    Flux,
}

/// Decides from the folder's `model_index.json` or the file's tensor names.
pub fn model_kind(model: &Path) -> Result<ModelKind> {
    if model.is_dir() {
        return Ok(if sd_models::loader::is_flux_folder(model) {
            ModelKind::Flux
        } else {
            ModelKind::SdFolder
        });
    }
    if !model.is_file() {
        bail!(
            "invalid --model {}: no such file or folder",
            model.display()
        );
    }
    let ext = model
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "gguf" => Ok(ModelKind::Flux),
        "ckpt" | "pt" | "pth" | "bin" => bail!(
            "invalid --model {}: pickle checkpoints are not loaded (they can run code); convert it to .safetensors",
            model.display()
        ),
        _ => {
            let shapes = sd_models::single_file::read_shapes(model)?;
            Ok(if sd_models::single_file::is_sd_checkpoint(&shapes) {
                ModelKind::SdCheckpoint
            } else {
                ModelKind::Flux
            })
        }
    }
}

/// `--prediction-type`: `epsilon` or `v_prediction`.
pub fn parse_prediction(s: &str) -> Result<PredictionType> {
    match s.trim().to_ascii_lowercase().as_str() {
        "epsilon" | "eps" => Ok(PredictionType::Epsilon),
        "v_prediction" | "v-prediction" | "v" => Ok(PredictionType::VPrediction),
        other => bail!("invalid --prediction-type {other}: expected epsilon or v_prediction"),
    }
}

/// How to read a model source beyond its path: the flags `generate` and `serve` share.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// With a Hugging Face repo id: the precision variant of the weights to fetch.
    pub variant: Option<String>,
    /// Stable Diffusion: a VAE file that replaces the model's.
    pub vae: Option<PathBuf>,
    /// Single-file SD checkpoints: `epsilon` or `v_prediction`.
    pub prediction_type: Option<String>,
    /// Stable Diffusion / SDXL: tiled VAE decoding with tiles of this many pixels a side.
    pub vae_tile_size: Option<usize>,
}

impl SourceOptions {
    /// The SD loading options of the flags, checked against the model kind.
    pub fn sd_options(&self, kind: ModelKind, components: Option<&Path>) -> Result<SdLoadOptions> {
        let (vae, prediction) = (self.vae.as_ref(), self.prediction_type.as_deref());
        if kind == ModelKind::Flux {
            if let Some(v) = vae {
                bail!(
                    "--vae {} applies to Stable Diffusion models only",
                    v.display()
                );
            }
            if let Some(p) = prediction {
                bail!("--prediction-type {p} applies to Stable Diffusion checkpoints only");
            }
            if let Some(t) = self.vae_tile_size {
                bail!("--vae-tile-size {t} applies to Stable Diffusion and SDXL models only");
            }
        }
        if kind == ModelKind::SdFolder {
            if let Some(c) = components {
                bail!(
                    "--components {} goes with a single-file checkpoint or a FLUX transformer file, not a model folder",
                    c.display()
                );
            }
            if let Some(p) = prediction {
                bail!("--prediction-type {p} applies to single-file checkpoints (a folder's scheduler config sets it)");
            }
        }
        if let Some(v) = vae {
            if !v.is_file() {
                bail!("invalid --vae {}: not a file", v.display());
            }
        }
        Ok(SdLoadOptions {
            vae: vae.cloned(),
            components: components.map(Path::to_path_buf),
            prediction_type: prediction.map(parse_prediction).transpose()?,
        })
    }
}
