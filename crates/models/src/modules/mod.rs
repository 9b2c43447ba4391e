//! Network modules built from config files: CLIP text encoder, UNet, VAE.

pub mod attention;
pub mod clip;
pub mod config;
pub mod conv;
pub mod resnet;
pub mod unet;
pub mod vae;
