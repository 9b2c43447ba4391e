//! Scaled dot-product attention, computed in slices when the score matrix is large.

use candle_core::{DType, Tensor};

/// Largest attention score matrix computed in one piece, in elements. Above it the scores
/// are computed per (batch, head) and per block of query rows: row-wise softmax makes this
/// exact, and it keeps the peak memory of a 64x64-latent self-attention at a few MB instead
/// of gigabytes (on the CPU, fresh gigabyte buffers also cost more to page in than the
/// matmul that fills them).
pub fn score_budget(device: &candle_core::Device) -> usize {
    if device.is_cpu() {
        1 << 22
    } else {
        1 << 28
    }
}

/// softmax(q k^T) v for q (bh, n, d), k and v (bh, m, d); q is already scaled. Score
/// matrices above `budget` elements are computed in slices.
pub fn sliced_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    upcast: bool,
    budget: usize,
) -> candle_core::Result<Tensor> {
    let (bh, n, _) = q.dims3()?;
    let m = k.dim(1)?;
    let in_dtype = q.dtype();
    let attend = |q: &Tensor, k: &Tensor, v: &Tensor| -> candle_core::Result<Tensor> {
        let (q, k) = if upcast && in_dtype != DType::F32 {
            (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
        } else {
            (q.clone(), k.clone())
        };
        let scores = q.matmul(&k.t()?)?;
        let probs = if scores.dtype() == DType::F32 && in_dtype == DType::F32 {
            super::softmax::softmax_last_dim(&scores)?
        } else {
            super::softmax::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(in_dtype)?
        };
        probs.matmul(v)
    };
    if bh * n * m <= budget {
        return attend(q, k, v);
    }
    let rows = (budget / m).clamp(1, n);
    let mut per_head = Vec::with_capacity(bh);
    for i in 0..bh {
        let (qi, ki, vi) = (q.narrow(0, i, 1)?, k.narrow(0, i, 1)?, v.narrow(0, i, 1)?);
        let mut chunks = Vec::with_capacity(n.div_ceil(rows));
        let mut start = 0;
        while start < n {
            let len = rows.min(n - start);
            chunks.push(attend(&qi.narrow(1, start, len)?, &ki, &vi)?);
            start += len;
        }
        per_head.push(Tensor::cat(&chunks, 1)?);
    }
    Tensor::cat(&per_head, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sliced_attention_equals_the_full_computation() {
        let dev = Device::Cpu;
        let mut rng = crate::samplers::TorchRng::new(7);
        let q = rng.randn(&[3, 50, 8], &dev).unwrap();
        let k = rng.randn(&[3, 37, 8], &dev).unwrap();
        let v = rng.randn(&[3, 37, 8], &dev).unwrap();
        let full = sliced_attention(&q, &k, &v, false, usize::MAX).unwrap();
        // 100 elements per slice: 2 query rows at a time, one head at a time.
        let sliced = sliced_attention(&q, &k, &v, false, 100).unwrap();
        assert_eq!(sliced.dims(), &[3, 50, 8]);
        let diff = crate::modules::max_abs_diff(&full, &sliced);
        // Only the summation order of the matmuls differs: a few ulp.
        assert!(diff < 1e-5, "sliced attention differs by {diff}");
    }
}
