//! Which CPU kernels this build runs on this machine, chosen at run time from the CPU's
//! features: reported by `/v1/info` and `sd-worker bench`, so that a timing can be read
//! against the code that made it.

use serde::Serialize;

use super::conv_kernel::{conv_algorithm, ConvAlgorithm};
use super::cpu_gemm::{avx512_hardware, bf16_hardware, cpu_bf16};
use super::softmax::{simd_level, Simd};

/// The kernels f32 work on the CPU goes through.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CpuKernels {
    /// The x86 features the kernels look for that this CPU has (`avx2`, `fma`, `avx512f`,
    /// `avx512bf16`).
    pub features: Vec<&'static str>,
    /// The instruction set of the project's own kernels (softmax, SiLU, GELU): `avx512f`,
    /// `avx2+fma`, or `scalar` (candle's implementations).
    pub elementwise: &'static str,
    /// 3x3 convolutions: `winograd` (F(4x4, 3x3), f32 images at least 16 a side, unless
    /// `--conv direct`), `taps` (k x k accumulating GEMMs over the padded input, images at
    /// least 96 wide) and `im2col` (banded, narrower images).
    pub convolution: &'static str,
    /// The f32 GEMM under matmul and convolution: the `gemm` crate's AVX-512F, AVX2+FMA or
    /// portable kernels, chosen by the crate at run time as here.
    pub gemm: &'static str,
    /// The products of linear layers, attention and 1x1 convolutions: `f32` (the `gemm`
    /// crate; the text encoders' linear layers on the project's AVX-512F panels where the CPU
    /// has AVX-512F), or
    /// with `--dtype bf16` `bf16 avx512bf16` (the project's `vdpbf16ps` kernel) or
    /// `bf16 rounded, f32 gemm` (CPUs without AVX512-BF16: the same rounded operands,
    /// multiplied in f32).
    pub products: &'static str,
    /// Threads of the rayon pool the kernels share.
    pub threads: usize,
}

/// The CPU kernels of this machine.
pub fn cpu_kernels() -> CpuKernels {
    let mut features = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            features.push("avx2");
        }
        if std::arch::is_x86_feature_detected!("fma") {
            features.push("fma");
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            features.push("avx512f");
        }
        if std::arch::is_x86_feature_detected!("avx512bf16") {
            features.push("avx512bf16");
        }
    }
    let avx2 = features.contains(&"avx2") && features.contains(&"fma");
    let gemm = if features.contains(&"avx512f") {
        "gemm crate, avx512f"
    } else if avx2 {
        "gemm crate, avx2+fma"
    } else {
        "gemm crate, portable"
    };
    CpuKernels {
        features,
        elementwise: match simd_level() {
            Simd::Avx512 => "avx512f",
            Simd::Avx2 => "avx2+fma",
            Simd::None => "scalar",
        },
        convolution: match conv_algorithm() {
            ConvAlgorithm::Winograd => {
                "winograd F(4x4,3x3) (f32, sides >= 16) / taps (f32, width >= 96) / banded im2col"
            }
            ConvAlgorithm::Direct => "taps (f32, width >= 96) / banded im2col",
        },
        gemm,
        products: match (cpu_bf16(), bf16_hardware()) {
            (false, _) if avx512_hardware() => "f32, text encoders on avx512f panels",
            (false, _) => "f32",
            (true, true) => "bf16 avx512bf16",
            (true, false) => "bf16 rounded, f32 gemm",
        },
        threads: rayon::current_num_threads(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The level the kernels run at is one the listed features allow.
    #[test]
    fn the_kernels_need_the_features_listed() {
        let k = cpu_kernels();
        assert!(k.threads >= 1);
        let gemm = k.gemm.strip_prefix("gemm crate, ").unwrap_or(k.gemm);
        for level in [k.elementwise, gemm] {
            let needs: &[&str] = match level {
                "avx512f" => &["avx512f"],
                "avx2+fma" => &["avx2", "fma"],
                _ => &[],
            };
            for f in needs {
                assert!(k.features.contains(f), "{k:?}");
            }
        }
    }
}
