//! Network modules built from config files: CLIP text encoder, UNet, VAE.

pub mod clip;
pub mod config;
pub mod conv;
pub mod unet;
pub mod vae;
