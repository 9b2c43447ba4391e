//! Network modules built from config files: CLIP text encoder, UNet, VAE, FLUX transformer.

pub mod activation;
pub mod adapter;
pub mod attention;
pub mod clip;
pub mod config;
pub mod conv;
pub mod conv_kernel;
pub mod flux;
pub mod resnet;
pub mod softmax;
pub mod t5;
pub mod unet;
pub mod vae;
