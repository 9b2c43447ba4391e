//! Network modules built from config files: CLIP text encoder, UNet, VAE, FLUX transformer.

pub mod activation;
pub mod adapter;
pub mod attention;
pub mod clip;
pub mod config;
pub mod conv;
pub mod conv_kernel;
pub mod cpu;
pub mod cpu_gemm;
pub mod flux;
pub mod group_norm;
pub mod resnet;
pub mod softmax;
pub mod t5;
pub mod unet;
pub mod vae;
pub(crate) mod winograd;

/// The f32 elements of a contiguous CPU tensor, as a custom op `op` receives them.
pub(crate) fn contiguous_f32<'a>(
    op: &str,
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        (candle_core::CpuStorage::F32(_), None) => {
            candle_core::bail!("{op}: the input must be contiguous")
        }
        _ => candle_core::bail!("{op}: f32 only"),
    }
}

/// max |a - b| over all elements, for the kernels' tests.
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("comparable tensors")
}

/// `t` rounded to bf16 (to nearest, ties to even) and back to f32: the operands the bf16
/// products see, for the kernels' tests.
#[cfg(test)]
pub(crate) fn bf16_rounded(t: &candle_core::Tensor) -> candle_core::Tensor {
    t.to_dtype(candle_core::DType::BF16)
        .and_then(|t| t.to_dtype(candle_core::DType::F32))
        .expect("a rounded tensor")
}
