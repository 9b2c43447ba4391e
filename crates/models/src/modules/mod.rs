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

/// max |a - b| over all elements, for the kernels' tests.
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("comparable tensors")
}
