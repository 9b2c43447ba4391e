//! Scaled dot-product attention, computed in slices when the score matrix is large.
//!
//! On the CPU in f32 the slices are fused: one task per (batch-head, block of query rows)
//! computes its scores, their softmax and their product with `v` in buffers of its own that
//! stay in cache ([`CpuAttention`]), instead of candle ops on 16 MB score slices that go
//! through memory three times. The softmax is the same as the candle op's. Where the CPU has
//! AVX-512F (and always with bf16 products), `k` and `v` are packed once per head into the
//! panels of [`super::cpu_gemm`], each block is a whole number of its 12-row blocks and both
//! products run on the task's thread; in f32 that is 8-9% faster than the `gemm` crate on the
//! UNets' heads, with the f32 sums in another order than candle's. With bf16 products the
//! softmax scales each row straight into the packed bf16 pairs of the second product: on the
//! SD 1.5 UNet's 64x64 self-attention (16 x 4096 x 40, 2-core EPYC) 0.26 s became 0.17 s, the
//! same numbers.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

use super::cpu_gemm::{
    avx512_hardware, bf16_hardware, cpu_bf16, matmul_in_task, matmul_packed, Lhs, PackedA, PackedB,
    Start, MR,
};
use super::softmax::{exp_in_place, simd_level, Simd};

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
    let in_dtype = q.dtype();
    // Zero keys (a softmax over nothing) stay with the candle ops.
    let fused = cpu_bf16() || q.dim(2)? < F32_FUSED_MAX_HEAD_DIM;
    if q.device().is_cpu() && in_dtype == DType::F32 && k.dim(1)? > 0 && fused {
        return q.contiguous()?.apply_op3_no_bwd(
            &k.contiguous()?,
            &v.contiguous()?,
            &CpuAttention { bf16: cpu_bf16() },
        );
    }
    sliced_ops(q, k, v, upcast, budget)
}

/// Head sizes from which f32 attention is faster as candle ops (whose GEMMs run on all
/// threads) than fused per block of query rows, where every block packs all of `v`: the VAE's
/// one 512-wide head at 64x64 latents takes 0.31 s fused against 0.23 s, at 128x128 5.1 s
/// against 3.5 s (2-core EPYC). The UNet's and FLUX's heads are 40-160 wide. The bf16
/// products stay fused (0.10 s and 1.8 s): they pack `v` once per head. (These f32 figures
/// predate the f32 panels, which also pack `v` once per head; not measured again.)
const F32_FUSED_MAX_HEAD_DIM: usize = 256;

/// Whether f32 attention runs its products on the f32 panels of [`super::cpu_gemm`] (where the
/// CPU has AVX-512F) rather than the `gemm` crate. A switch for the timing test.
static F32_PANELS: AtomicBool = AtomicBool::new(true);

/// [`sliced_attention`] as candle ops, for every device and dtype.
fn sliced_ops(
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

/// Bytes of scores a task of [`CpuAttention`] keeps (twice: the scores and their softmax).
/// Each task packs all of `k` for its GEMM, so blocks must not be too small: on the SD 1.5
/// UNet's 64x64 self-attention (16 x 4096 x 40, 2-core EPYC) 128 KB blocks take 0.55 s, 512 KB
/// 0.36 s, 1 MB 0.32 s, 2 MB 0.31 s, 8 MB 0.36 s; candle ops on 16 MB slices 0.50 s.
const TASK_SCORE_BYTES: usize = 1 << 20;

/// Fewest query rows per task, whatever the keys: each task packs all of `k` (m x d) for its
/// GEMM, so fewer rows make that packing cost more than the products (the SDXL VAE's 128x128
/// attention, m = 16384 and d = 512, would get 16-row tasks that each pack 32 MB).
const MIN_TASK_ROWS: usize = 64;

/// softmax(q k^T) v on the CPU in f32, fused per block of query rows (see the module doc).
struct CpuAttention {
    /// Both products with bf16 operands ([`super::cpu_gemm`]); the softmax stays f32.
    bf16: bool,
}

impl CustomOp3 for CpuAttention {
    fn name(&self) -> &'static str {
        "sd-cpu-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (bh, n, d) = q_layout.shape().dims3()?;
        let (kb, m, kd) = k_layout.shape().dims3()?;
        let (vb, vm, dv) = v_layout.shape().dims3()?;
        if (kb, kd, vb, vm) != (bh, d, bh, m) {
            candle_core::bail!(
                "sd-cpu-attention: q {:?}, k {:?}, v {:?}",
                q_layout.dims(),
                k_layout.dims(),
                v_layout.dims()
            );
        }
        let q = super::contiguous_f32(self.name(), q, q_layout)?;
        let k = super::contiguous_f32(self.name(), k, k_layout)?;
        let v = super::contiguous_f32(self.name(), v, v_layout)?;
        let f32_panels = !self.bf16 && avx512_hardware() && F32_PANELS.load(Ordering::Relaxed);
        let mut rows = (TASK_SCORE_BYTES / (4 * m.max(1))).clamp(MIN_TASK_ROWS, 256);
        if self.bf16 || f32_panels {
            // Whole row blocks of the panel kernels: 64 rows would compute 72.
            rows = rows.next_multiple_of(MR);
        }
        let rows = rows.min(n.max(1));
        let level = simd_level();
        let mut out = vec![0f32; bh * n * dv];
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), Shape::from((bh, n, dv))));
        }
        let pairs = self.bf16 && bf16_hardware();
        out.par_chunks_mut(n * dv).enumerate().for_each(|(h, out)| {
            let (q, k, v) = (&q[h * n * d..], &k[h * m * d..], &v[h * m * dv..]);
            // With `--dtype bf16`: k as the right operand of q k^T, v of p v, packed once per head.
            // In f32 where the CPU has AVX-512F, the same operands in f32 panels.
            let packed = if self.bf16 {
                Some((PackedB::new(k, d, m, 1, d), PackedB::new(v, m, dv, dv, 1)))
            } else if f32_panels {
                PackedB::f32_panels(k, d, m, (1, d)).zip(PackedB::f32_panels(v, m, dv, (dv, 1)))
            } else {
                None
            };
            out.par_chunks_mut(rows * dv)
                .enumerate()
                .for_each(|(blk, out)| {
                    let r = out.len() / dv.max(1);
                    let q = &q[blk * rows * d..];
                    let mut scratch = SCRATCH.take();
                    scratch.scores.resize(rows * m, 0.0);
                    let scores = &mut scratch.scores[..r * m];
                    match &packed {
                        Some((k, v)) if pairs => {
                            let q = Lhs {
                                data: q,
                                m: r,
                                ld: d,
                            };
                            matmul_in_task(q, k, Start::Zero, scores);
                            let probs = &mut scratch.pairs;
                            probs.resize(r, m);
                            for (i, s) in scores.chunks_mut(m).enumerate() {
                                let scale = exp_in_place(s, level);
                                probs.set_row(i, s, scale);
                            }
                            matmul_packed(probs, v, Start::Zero, out);
                        }
                        Some((k, v)) => {
                            let q = Lhs {
                                data: q,
                                m: r,
                                ld: d,
                            };
                            matmul_in_task(q, k, Start::Zero, scores);
                            softmax_rows(scores, m, level);
                            let p = Lhs {
                                data: scores,
                                m: r,
                                ld: m,
                            };
                            matmul_in_task(p, v, Start::Zero, out);
                        }
                        None => {
                            f32_scores(q, k, (r, m, d), scores);
                            softmax_rows(scores, m, level);
                            f32_values(scores, v, (r, m, dv), out);
                        }
                    }
                    SCRATCH.set(scratch);
                });
        });
        Ok((CpuStorage::F32(out), Shape::from((bh, n, dv))))
    }
}

/// A task's buffers, kept by its thread across tasks and calls, so that a task does not
/// allocate and zero a megabyte of scores. A task takes them and puts them back, so one that
/// runs inside another (rayon work stealing) just starts empty ones.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    pairs: PackedA,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

/// Each row of `scores` (rows of `m`) replaced by its softmax.
fn softmax_rows(scores: &mut [f32], m: usize, level: Simd) {
    for s in scores.chunks_mut(m) {
        let scale = exp_in_place(s, level);
        s.iter_mut().for_each(|x| *x *= scale);
    }
}

/// `scores` (r x m) := q k^T in f32 for r rows of `q` (rows of d) and this head's `k` (m x d).
fn f32_scores(q: &[f32], k: &[f32], (r, m, d): (usize, usize, usize), scores: &mut [f32]) {
    f32_product(scores, (r, m, d), (q, d, 1), (k, 1, d));
}

/// `out` (r x dv) := probs v in f32, `probs` r x m and this head's `v` m x dv.
fn f32_values(probs: &[f32], v: &[f32], (r, m, dv): (usize, usize, usize), out: &mut [f32]) {
    f32_product(out, (r, dv, m), (probs, m, 1), (v, dv, 1));
}

/// `c` (rows x cols, row-major) := a b over `depth`, each operand given with its (row, column)
/// strides, by the `gemm` crate on this thread.
fn f32_product(
    c: &mut [f32],
    (rows, cols, depth): (usize, usize, usize),
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
) {
    let last = |rs: usize, cs: usize, r: usize, k: usize| (r - 1) * rs + (k - 1) * cs;
    if rows == 0 || cols == 0 || depth == 0 {
        c[..rows * cols].fill(0.0);
        return;
    }
    assert!(c.len() >= rows * cols);
    assert!(a.len() > last(a_rs, a_cs, rows, depth) && b.len() > last(b_rs, b_cs, depth, cols));
    // SAFETY: every element read or written lies inside its slice, as asserted.
    unsafe {
        gemm::gemm(
            rows,
            cols,
            depth,
            c.as_mut_ptr(),
            1,
            cols as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    };
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
        let full = sliced_ops(&q, &k, &v, false, usize::MAX).unwrap();
        // 100 elements per slice: 2 query rows at a time, one head at a time.
        let sliced = sliced_ops(&q, &k, &v, false, 100).unwrap();
        assert_eq!(sliced.dims(), &[3, 50, 8]);
        let diff = crate::modules::max_abs_diff(&full, &sliced);
        // Only the summation order of the matmuls differs: a few ulp.
        assert!(diff < 1e-5, "sliced attention differs by {diff}");
    }

    /// The fused CPU kernel against the candle ops, on blocks of query rows that do not
    /// divide the rows (m = 37: 256-row blocks of 600; m = 5000: 64-row blocks of 150), odd
    /// head sizes and a v wider than q.
    #[test]
    fn fused_cpu_attention_equals_the_candle_ops() {
        let dev = Device::Cpu;
        let mut rng = crate::samplers::TorchRng::new(8);
        for (bh, n, m, d, dv) in [(3, 600, 37, 8, 8), (2, 150, 5000, 5, 7), (1, 1, 1, 3, 3)] {
            let q = (rng.randn(&[bh, n, d], &dev).unwrap() * 0.5).unwrap();
            let k = rng.randn(&[bh, m, d], &dev).unwrap();
            let v = rng.randn(&[bh, m, dv], &dev).unwrap();
            let want = sliced_ops(&q, &k, &v, false, usize::MAX).unwrap();
            let got = sliced_attention(&q, &k, &v, false, 1 << 22).unwrap();
            assert_eq!(got.dims(), &[bh, n, dv]);
            let diff = crate::modules::max_abs_diff(&got, &want);
            assert!(
                diff < 1e-5,
                "({bh}, {n}, {m}, {d}, {dv}): differs by {diff}"
            );
        }
        // No queries: an empty output.
        let q = Tensor::zeros((2, 0, 4), DType::F32, &dev).unwrap();
        let kv = rng.randn(&[2, 3, 4], &dev).unwrap();
        let out = sliced_attention(&q, &kv, &kv, false, 1 << 22).unwrap();
        assert_eq!(out.dims(), &[2, 0, 4]);
    }

    /// `cargo test --release -p sd-models --lib attention::tests::timing -- --ignored
    /// --nocapture`: fused and as candle ops.
    /// With bf16 products: the candle ops on rounded q, k, v and a rounded softmax, the
    /// softmax in f32; blocks that do not divide the rows, odd sizes, v wider than q.
    #[test]
    fn fused_bf16_attention_rounds_the_operands() {
        use crate::modules::bf16_rounded;
        let dev = Device::Cpu;
        let mut rng = crate::samplers::TorchRng::new(18);
        for (bh, n, m, d, dv) in [
            (3, 600, 37, 8, 8),
            (2, 150, 5000, 5, 7),
            (1, 1, 1, 3, 3),
            (2, 70, 90, 40, 40),
        ] {
            let q = (rng.randn(&[bh, n, d], &dev).unwrap() * 0.5).unwrap();
            let k = rng.randn(&[bh, m, d], &dev).unwrap();
            let v = rng.randn(&[bh, m, dv], &dev).unwrap();
            let got = q
                .apply_op3_no_bwd(&k, &v, &CpuAttention { bf16: true })
                .unwrap();
            let scores = bf16_rounded(&q)
                .matmul(&bf16_rounded(&k).t().unwrap())
                .unwrap();
            let probs = crate::modules::softmax::softmax_last_dim(&scores).unwrap();
            let want = bf16_rounded(&probs).matmul(&bf16_rounded(&v)).unwrap();
            let diff = crate::modules::max_abs_diff(&got, &want);
            assert!(
                diff < 1e-4,
                "{bh}x{n}x{m}x{d}x{dv}: bf16 attention differs by {diff}"
            );
            let f32_diff = crate::modules::max_abs_diff(
                &got,
                &sliced_ops(&q, &k, &v, false, usize::MAX).unwrap(),
            );
            assert!(
                f32_diff < 5e-2,
                "{bh}x{n}x{m}x{d}x{dv}: {f32_diff} from f32"
            );
        }
    }

    #[test]
    #[ignore]
    fn timing() {
        let dev = Device::Cpu;
        let mut rng = crate::samplers::TorchRng::new(9);
        // The SD 1.5 UNet's 64x64 self-attention, the SDXL UNet's, the VAE's at 64x64 latents
        // and the SDXL VAE's at 128x128.
        for shape in [
            [16, 4096, 40],
            [20, 4096, 64],
            [1, 4096, 512],
            [1, 16384, 512],
        ] {
            let q = (rng.randn(&shape, &dev).unwrap() * 0.05).unwrap();
            let k = rng.randn(&shape, &dev).unwrap();
            let v = rng.randn(&shape, &dev).unwrap();
            for _ in 0..2 {
                F32_PANELS.store(false, Ordering::Relaxed);
                let t = std::time::Instant::now();
                sliced_attention(&q, &k, &v, false, 1 << 22).unwrap();
                let gemm_crate = t.elapsed();
                F32_PANELS.store(true, Ordering::Relaxed);
                let t = std::time::Instant::now();
                sliced_attention(&q, &k, &v, false, 1 << 22).unwrap();
                let fused = t.elapsed();
                let t = std::time::Instant::now();
                q.apply_op3_no_bwd(&k, &v, &CpuAttention { bf16: true })
                    .unwrap();
                let bf16 = t.elapsed();
                let t = std::time::Instant::now();
                sliced_ops(&q, &k, &v, false, 1 << 22).unwrap();
                let ops = t.elapsed();
                println!(
                    "{shape:?}: fused {fused:?} (gemm crate {gemm_crate:?}), bf16 {bf16:?}, candle ops {ops:?}"
                );
            }
        }
    }
}
