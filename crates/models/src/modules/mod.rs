//! Network modules built from config files: CLIP text encoder, UNet, VAE.
