//! Device and dtype selection from the command line.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

/// Parses `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let (kind, index) = match spec.split_once(':') {
        Some((k, i)) => {
            let i: usize = i.parse().with_context(|| {
                format!("invalid --device {spec:?}: the index must be a number")
            })?;
            (k.to_string(), i)
        }
        None => (spec.clone(), 0),
    };
    match kind.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if !cfg!(feature = "cuda") {
                bail!("--device {spec}: this build has no CUDA support (rebuild with `--features cuda`)");
            }
            Device::new_cuda(index).with_context(|| format!("cannot open CUDA device {index}"))
        }
        "metal" => {
            if !cfg!(feature = "metal") {
                bail!("--device {spec}: this build has no Metal support (rebuild with `--features metal`)");
            }
            Device::new_metal(index).with_context(|| format!("cannot open Metal device {index}"))
        }
        _ => bail!("invalid --device {spec:?}: expected cpu, cuda[:N] or metal[:N]"),
    }
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => bail!("invalid --dtype {other:?}: expected f32, f16 or bf16"),
    }
}

pub use sd_engine::load::dtype_name;
