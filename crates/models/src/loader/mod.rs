//! Detects what a model folder or file holds and builds its pipeline: [`sd`] for Stable
//! Diffusion 1.x/2.x (diffusers folders and single-file checkpoints), [`flux`] for FLUX.1
//! (folders, single-file transformers, GGUF). The helpers here find and read the weight files
//! both use.

mod flux;
mod sd;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::modules::config::JsonConfig;
use crate::{Error, Result};

pub use flux::*;
pub use sd::*;

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
