//! The model-source flags `generate` and `serve` share, and the download progress they show.

use std::path::{Path, PathBuf};

use anyhow::Result;
use sd_engine::hub::Progress;
use sd_engine::load::LoadRequest;
use sd_engine::source::SourceOptions;

use crate::device::{parse_device, parse_dtype};

/// The model-source flags `generate` and `serve` share.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SourceArgs {
    /// With a Hugging Face repo id as --model: the precision variant of the weights to fetch
    /// (e.g. fp16); default the plain files, else fp16.
    #[arg(long, env = "SD_VARIANT")]
    pub variant: Option<String>,
    /// Stable Diffusion: a VAE file that replaces the model's (diffusers names, or the
    /// original names as in A1111 `.vae.safetensors` files).
    #[arg(long, env = "SD_VAE")]
    pub vae: Option<PathBuf>,
    /// Single-file SD checkpoints: epsilon or v_prediction; the tensors do not tell. Default:
    /// the components' scheduler, else v_prediction for SD 2.x (as diffusers' from_single_file;
    /// base models need epsilon) and epsilon for the others.
    #[arg(long, env = "SD_PREDICTION_TYPE")]
    pub prediction_type: Option<String>,
    /// Stable Diffusion / SDXL: decode in tiles of this many pixels a side (a multiple of 8,
    /// 64 to 4096), 25% overlap blended as diffusers' enable_tiling; bounds the VAE's memory
    /// at large sizes, changes the pixels slightly (see the README). Default: whole images.
    #[arg(long, env = "SD_VAE_TILE_SIZE")]
    pub vae_tile_size: Option<usize>,
}

impl SourceArgs {
    pub fn options(&self) -> SourceOptions {
        SourceOptions {
            variant: self.variant.clone(),
            vae: self.vae.clone(),
            prediction_type: self.prediction_type.clone(),
            vae_tile_size: self.vae_tile_size,
        }
    }
}

/// The flags that say what to load and where, as `generate` and `serve` take them.
pub struct ModelFlags<'a> {
    pub model: &'a Path,
    pub components: Option<&'a Path>,
    pub source: &'a SourceArgs,
    pub device: &'a str,
    pub dtype: &'a str,
    pub text_encoder_device: Option<&'a str>,
}

impl ModelFlags<'_> {
    /// What to load; the devices and the dtype are parsed and checked here, before anything
    /// loads.
    pub fn load_request(&self) -> Result<LoadRequest> {
        let device = parse_device(self.device)?;
        let dtype = parse_dtype(self.dtype)?;
        let text_device = self.text_encoder_device.map(parse_device).transpose()?;
        Ok(LoadRequest {
            model: self.model.to_path_buf(),
            components: self.components.map(Path::to_path_buf),
            source: self.source.options(),
            device,
            device_name: self.device.trim().to_ascii_lowercase(),
            text_device,
            dtype,
        })
    }
}

/// A progress bar per file on a terminal, one line per file otherwise.
pub struct ConsoleProgress {
    bar: Option<indicatif::ProgressBar>,
    terminal: bool,
}

impl ConsoleProgress {
    pub fn new() -> Self {
        use std::io::IsTerminal;
        Self {
            bar: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }
}

impl Progress for ConsoleProgress {
    fn start(&mut self, file: &str, size: Option<u64>, resumed_from: u64) {
        let resumed = if resumed_from > 0 {
            format!(", resuming at {resumed_from} bytes")
        } else {
            String::new()
        };
        if !self.terminal {
            match size {
                Some(s) => eprintln!("downloading {file} ({s} bytes{resumed})"),
                None => eprintln!("downloading {file}{resumed}"),
            }
            return;
        }
        let bar = indicatif::ProgressBar::new(size.unwrap_or(0));
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(file.to_string());
        bar.set_position(resumed_from);
        self.bar = Some(bar);
    }

    fn advance(&mut self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
