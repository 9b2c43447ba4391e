//! Matrix products with bf16 operands and f32 sums on the CPU: the arithmetic of `--dtype bf16`
//! there.
//!
//! Activations stay f32; the linear layers, both products of attention and the 1x1
//! convolutions round their operands to bf16 (to nearest, ties to even) and sum the products
//! in f32, into f32 outputs. A linear layer's weights are packed into bf16 pairs as the model
//! loads and its f32 tensor dropped ([`PackedLinear::at_load`]); other weights stay f32.
//! Norms, softmax, the residual stream and the 3x3 convolutions keep f32, so the error is that
//! of the rounded operands alone (measured in `BENCHMARKS.md` and the README). The 3x3
//! convolutions stay f32 Winograd: bf16 operands in its 36 products made the
//! SD 1.5 VAE decode 42 levels of 255 off (PSNR 36 dB; the transformed tiles span a wider range
//! than the image) and no faster, since a quarter of the multiplications in f32 already beats
//! twice the rate of direct products.
//!
//! Neither the `gemm` crate nor candle has a bf16 product on the CPU, so this module has its own:
//! AVX512-BF16's `vdpbf16ps` multiplies a pair of bf16 values per f32 lane and adds both
//! products to the lane, twice the multiplications of an f32 FMA per instruction (on the 2-core
//! Zen 5 of `BENCHMARKS.md`, 360 GFLOPS against the `gemm` crate's 210 in f32). The right
//! operand is packed into panels of [`NR`] columns holding the (even k, odd k) pairs of each
//! column side by side (a last panel of at most `NR / 2` columns half as wide): once for a
//! layer's weights, as it loads; per call for an activation. The left one is rounded per call,
//! [`MR`] rows at a time, with one conversion instruction per 32 values, or handed over packed
//! ([`PackedA`]: attention's softmax writes its probabilities so). CPUs without AVX512-BF16
//! compute the same rounded products with the `gemm` crate in f32: the numbers agree up to the
//! order of the f32 sums.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Columns of a packed panel: two 16-lane vectors.
pub(crate) const NR: usize = 32;
/// Rows of the kernel's block: 2 x 12 accumulators, 2 right-hand vectors and a broadcast fill
/// 27 of the 32 vector registers.
pub(crate) const MR: usize = 12;
/// k pairs per block: a panel's block is 256 x 32 x 4 bytes = 32 KB, within the L1 cache.
const KC: usize = 256;
/// Rows per task: the packed left block (96 x 256 pairs) stays in L2.
const MC: usize = 8 * MR;

static CPU_BF16: AtomicBool = AtomicBool::new(false);

/// Whether f32 matrix products on the CPU round their operands to bf16 (`--dtype bf16`).
pub fn set_cpu_bf16(on: bool) {
    CPU_BF16.store(on, Ordering::Relaxed);
}

/// Whether f32 matrix products on the CPU round their operands to bf16.
pub fn cpu_bf16() -> bool {
    CPU_BF16.load(Ordering::Relaxed)
}

/// Whether the products of `x` round to bf16: f32 on the CPU with [`set_cpu_bf16`] on.
pub(crate) fn takes_bf16(x: &Tensor) -> bool {
    cpu_bf16() && x.device().is_cpu() && x.dtype() == DType::F32
}

/// Whether `dtype` on `device` means f32 layers with bf16 products: bf16 on the CPU.
pub fn products_in_bf16(dtype: DType, device: &Device) -> bool {
    dtype == DType::BF16 && device.is_cpu()
}

/// The dtype a model's weights load in for `dtype` on `device`: on the CPU, bf16 means f32
/// weights and activations whose matrix products round to bf16 ([`set_cpu_bf16`]).
pub fn weights_dtype(dtype: DType, device: &Device) -> DType {
    if products_in_bf16(dtype, device) {
        DType::F32
    } else {
        dtype
    }
}

/// Whether this CPU has the f32 panel kernel (AVX-512F).
pub fn avx512_hardware() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether this CPU has the AVX512-BF16 kernel.
pub fn bf16_hardware() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `x` rounded to the nearest bf16 (ties to even), as its bits; NaN stays a (quiet) NaN.
#[inline]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else {
        (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// `x` rounded to bf16, as an f32.
#[inline]
pub(crate) fn round_bf16(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

/// Two values rounded to bf16 in one 32-bit lane: `lo` in the low half, as `vdpbf16ps` pairs
/// them.
#[inline]
fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
}

/// The right operand (k x n) of a product, rounded to bf16 and laid out for the kernel.
#[derive(Clone)]
pub(crate) struct PackedB {
    k: usize,
    n: usize,
    data: Packed,
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.data {
            Packed::Pairs(_) => "bf16 pairs",
            Packed::Rounded(_) => "rounded f32",
            Packed::Singles(_) => "f32 panels",
        };
        write!(f, "PackedB({} x {}, {kind})", self.k, self.n)
    }
}

#[derive(Clone)]
enum Packed {
    /// `[panel][k pair][NR]`: lane j of pair p holds column j's (2p, 2p + 1) values; the last
    /// panel and an odd k are padded with zeros.
    Pairs(Vec<u32>),
    /// The rounded values as f32, k x n row-major, for CPUs without AVX512-BF16.
    Rounded(Vec<f32>),
    /// Unrounded f32 (as bits), `[panel][k][NR]`, for the AVX-512F kernel.
    Singles(Vec<u32>),
}

/// Where panel `panel` of a product with `n` columns and `steps` k steps starts in the packed
/// data, and how many lanes it has: [`NR`], or half of it for a last panel of at most
/// `NR / 2` columns, which the narrow kernel computes in one vector instead of two (attention's
/// 40-wide heads of the SD 1.5 UNet take 48 lanes instead of 64). Every panel before the last
/// is full, so panel `p` starts at `p * steps * NR`.
fn panel_at(n: usize, steps: usize, panel: usize) -> (usize, usize) {
    let width = if n - panel * NR <= NR / 2 { NR / 2 } else { NR };
    (panel * steps * NR, width)
}

/// The packed length of `n` columns over `steps` k steps.
fn packed_len(n: usize, steps: usize) -> usize {
    let panels = n.div_ceil(NR);
    if panels == 0 {
        return 0;
    }
    let (start, width) = panel_at(n, steps, panels - 1);
    start + steps * width
}

/// `data` cut into its panels, each `steps * width` long.
fn panels_mut(data: &mut [u32], n: usize, steps: usize) -> Vec<(usize, &mut [u32])> {
    let mut out = Vec::with_capacity(n.div_ceil(NR));
    let mut rest = data;
    for panel in 0..n.div_ceil(NR) {
        let (_, width) = panel_at(n, steps, panel);
        let (this, tail) = rest.split_at_mut(steps * width);
        out.push((panel, this));
        rest = tail;
    }
    out
}

impl PackedB {
    /// Packs `b`, element (kk, j) at `b[kk * row_stride + j * col_stride]`, for the kernel this
    /// CPU runs.
    pub(crate) fn new(b: &[f32], k: usize, n: usize, row_stride: usize, col_stride: usize) -> Self {
        Self::for_kernel(b, k, n, (row_stride, col_stride), bf16_hardware())
    }

    /// A linear layer's (n x k) weight as the right operand of `x W^T`.
    pub(crate) fn from_weight(w: &[f32], n: usize, k: usize) -> Self {
        Self::new(w, k, n, 1, k)
    }

    /// A linear layer's (n x k) weight in f32 panels for the AVX-512F kernel, unrounded;
    /// `None` where the CPU has no AVX-512F.
    pub(crate) fn f32_weight(w: &[f32], n: usize, k: usize) -> Option<Self> {
        Self::f32_panels(w, k, n, (1, k))
    }

    /// `b` (k x n), element (kk, j) at `b[kk * rs + j * cs]`, in f32 panels for the AVX-512F
    /// kernel, unrounded; `None` where the CPU has no AVX-512F.
    pub(crate) fn f32_panels(
        b: &[f32],
        k: usize,
        n: usize,
        (rs, cs): (usize, usize),
    ) -> Option<Self> {
        if !avx512_hardware() {
            return None;
        }
        let mut out = vec![0u32; packed_len(n, k)];
        panels_mut(&mut out, n, k)
            .into_par_iter()
            .for_each(|(panel, dst)| {
                let (_, width) = panel_at(n, k, panel);
                let cols = NR.min(n - panel * NR);
                for (kk, dst) in dst.chunks_exact_mut(width).enumerate() {
                    for (j, d) in dst.iter_mut().enumerate().take(cols) {
                        *d = b[kk * rs + (panel * NR + j) * cs].to_bits();
                    }
                }
            });
        let data = Packed::Singles(out);
        Some(PackedB { k, n, data })
    }

    fn for_kernel(b: &[f32], k: usize, n: usize, (rs, cs): (usize, usize), pairs: bool) -> Self {
        let at = |kk: usize, j: usize| b[kk * rs + j * cs];
        let data = if pairs {
            let kp = k.div_ceil(2);
            let mut out = vec![0u32; packed_len(n, kp)];
            panels_mut(&mut out, n, kp)
                .into_par_iter()
                .for_each(|(panel, dst)| {
                    let (_, width) = panel_at(n, kp, panel);
                    let cols = NR.min(n - panel * NR);
                    for (p, dst) in dst.chunks_exact_mut(width).enumerate() {
                        if cs == 1 {
                            // Rows 2p and 2p + 1 of the panel, vectorised.
                            let row = |kk: usize| &b[kk * rs + panel * NR..][..cols];
                            let odd = (2 * p + 1 < k).then(|| row(2 * p + 1));
                            // SAFETY: `Pairs` is packed only where the CPU has AVX512-BF16.
                            unsafe { kernel::interleave(row(2 * p), odd, dst) };
                            continue;
                        }
                        for (j, d) in dst.iter_mut().enumerate().take(cols) {
                            let col = panel * NR + j;
                            let odd = if 2 * p + 1 < k {
                                at(2 * p + 1, col)
                            } else {
                                0.0
                            };
                            *d = pair(at(2 * p, col), odd);
                        }
                    }
                });
            Packed::Pairs(out)
        } else {
            let mut out = vec![0f32; k * n];
            for kk in 0..k {
                for j in 0..n {
                    out[kk * n + j] = round_bf16(at(kk, j));
                }
            }
            Packed::Rounded(out)
        };
        PackedB { k, n, data }
    }
}

/// What the sums of a product start from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start<'a> {
    Zero,
    /// A value per column (a linear layer's bias), the same in every row.
    Bias(&'a [f32]),
    /// What `c` holds: the product is added to it.
    Existing,
}

/// The left operand: m x k f32, row `i` from `data[i * ld]`, unit column stride.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lhs<'a> {
    pub data: &'a [f32],
    pub m: usize,
    pub ld: usize,
}

/// A left operand of bf16 pairs already in the kernel's layout, `[k block][row block][MR
/// rows][KC steps]`, filled a row at a time by its owner: attention's softmax writes its
/// probabilities here as it scales them, instead of writing f32 rows that the product then
/// reads again to round. Only where the CPU has AVX512-BF16 ([`bf16_hardware`]).
#[derive(Debug, Default)]
pub(crate) struct PackedA {
    m: usize,
    k: usize,
    data: Vec<u32>,
}

impl PackedA {
    /// Room for m x k, keeping the allocation (rows not yet set hold stale values).
    pub(crate) fn resize(&mut self, m: usize, k: usize) {
        let len = k.div_ceil(2).div_ceil(KC) * m.div_ceil(MR) * MR * KC;
        if self.data.len() < len {
            self.data.resize(len, 0);
        }
        (self.m, self.k) = (m, k);
    }

    /// Row `i` := `values * scale`, each product rounded to bf16.
    pub(crate) fn set_row(&mut self, i: usize, values: &[f32], scale: f32) {
        assert!(i < self.m && values.len() == self.k && bf16_hardware());
        let blocks = self.m.div_ceil(MR);
        for (kb, src) in values.chunks(2 * KC).enumerate() {
            let at = ((kb * blocks + i / MR) * MR + i % MR) * KC;
            let dst = &mut self.data[at..at + src.len().div_ceil(2)];
            // SAFETY: the CPU has AVX512-BF16, as asserted.
            unsafe { kernel::row_pairs(src, scale, dst) };
        }
    }

    /// Row block `blk`'s steps of k block `kb` (whose first step is `kb`, a multiple of KC).
    fn block(&self, kb: usize, blk: usize) -> &[u32] {
        let at = ((kb / KC) * self.m.div_ceil(MR) + blk) * MR * KC;
        &self.data[at..at + MR * KC]
    }
}

/// The left operand of [`panel_matmul`]: f32 rows it packs, or pairs packed already.
#[derive(Clone, Copy)]
enum Left<'a> {
    Rows(Lhs<'a>),
    Packed(&'a PackedA),
}

impl Left<'_> {
    fn m(&self) -> usize {
        match self {
            Left::Rows(a) => a.m,
            Left::Packed(a) => a.m,
        }
    }
}

/// `c = start + a b` with `a` and `b` rounded to bf16 and f32 sums; `c` is m x n row-major.
pub(crate) fn matmul(a: Lhs, b: &PackedB, start: Start, c: &mut [f32]) {
    assert!(c.len() >= a.m * b.n);
    // SAFETY: c holds m rows of n.
    unsafe { matmul_raw(a, b, start, c.as_mut_ptr(), b.n) }
}

/// [`matmul`] on the calling thread alone, for callers that are one of many parallel tasks
/// (attention's blocks of query rows): splitting again only adds packing and scheduling.
pub(crate) fn matmul_in_task(a: Lhs, b: &PackedB, start: Start, c: &mut [f32]) {
    assert!(c.len() >= a.m * b.n);
    if !matches!(b.data, Packed::Pairs(_) | Packed::Singles(_)) || a.m == 0 || b.k == 0 {
        return matmul(a, b, start, c);
    }
    assert!(a.data.len() >= (a.m - 1) * a.ld + b.k);
    let out = Out(c.as_mut_ptr());
    panel_matmul(Left::Rows(a), b, start, (out, b.n), false);
}

/// [`matmul_in_task`] with a left operand of packed pairs; `b` must be bf16 pairs.
pub(crate) fn matmul_packed(a: &PackedA, b: &PackedB, start: Start, c: &mut [f32]) {
    assert!(c.len() >= a.m * b.n && a.k == b.k && matches!(b.data, Packed::Pairs(_)));
    if a.m == 0 || b.n == 0 {
        return;
    }
    let out = Out(c.as_mut_ptr());
    panel_matmul(Left::Packed(a), b, start, (out, b.n), false);
}

/// [`matmul`] into m rows of n at `c`, `ldc` apart.
///
/// # Safety
/// `c` points to m rows of n writable (and, for `Start::Existing`, initialised) f32, `ldc`
/// apart (`ldc >= n`), that nothing else accesses during the call.
pub(crate) unsafe fn matmul_raw(a: Lhs, b: &PackedB, start: Start, c: *mut f32, ldc: usize) {
    let (m, k, n) = (a.m, b.k, b.n);
    assert!(ldc >= n && (m == 0 || a.data.len() >= (m - 1) * a.ld + k));
    if let Start::Bias(bias) = start {
        assert!(bias.len() >= n);
    }
    if m == 0 || n == 0 {
        return;
    }
    let out = Out(c);
    if k == 0 || matches!(b.data, Packed::Rounded(_)) {
        // The fallback (and k = 0): c takes its start, then the gemm crate adds the product.
        for i in 0..m {
            // SAFETY: row i of c, as the caller promises.
            let row = unsafe { std::slice::from_raw_parts_mut(out.at(i * ldc), n) };
            match start {
                Start::Zero => row.fill(0.0),
                Start::Bias(bias) => row.copy_from_slice(&bias[..n]),
                Start::Existing => {}
            }
        }
    }
    match &b.data {
        _ if k == 0 => {}
        Packed::Pairs(_) | Packed::Singles(_) => {
            panel_matmul(Left::Rows(a), b, start, (out, ldc), true)
        }
        // SAFETY: as the caller promises.
        Packed::Rounded(rounded) => unsafe { rounded_matmul(a, (k, n), rounded, c, ldc) },
    }
}

/// The fallback: the rounded operands multiplied by the `gemm` crate in f32 and added to `c`.
///
/// # Safety
/// As [`matmul_raw`], `c` initialised.
unsafe fn rounded_matmul(a: Lhs, (k, n): (usize, usize), b: &[f32], c: *mut f32, ldc: usize) {
    let m = a.m;
    let mut ar = vec![0f32; m * k];
    ar.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
        for (d, s) in row.iter_mut().zip(&a.data[i * a.ld..i * a.ld + k]) {
            *d = round_bf16(*s);
        }
    });
    // SAFETY: c is m x n (row stride ldc), ar m x k (k), b k x n (n), all in bounds.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            true,
            ar.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm_parallelism(),
        );
    }
}

/// The `gemm` crate's parallelism over rayon's threads.
pub(crate) fn gemm_parallelism() -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// A raw pointer to `c`, written by tasks whose (rows, columns) never overlap.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: each task writes only its own rectangle of `c`.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The element `offset` past the start (the closure captures `Out`, not its field).
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// One task: rows `r0..r1` of `c`, panels `p0..p1`.
struct Task {
    rows: (usize, usize),
    panels: (usize, usize),
}

/// Splits `m` rows and `panels` panels into tasks: row blocks of [`MC`] where there are enough
/// of them for every thread, otherwise also groups of panels.
fn tasks(m: usize, panels: usize) -> Vec<Task> {
    let threads = rayon::current_num_threads();
    let row_blocks = m.div_ceil(MC);
    let want = 4 * threads;
    let groups = if row_blocks >= want {
        1
    } else {
        panels.min(want.div_ceil(row_blocks))
    };
    let per = panels.div_ceil(groups);
    let mut out = Vec::new();
    for rb in 0..row_blocks {
        for p0 in (0..panels).step_by(per) {
            out.push(Task {
                rows: (rb * MC, ((rb + 1) * MC).min(m)),
                panels: (p0, (p0 + per).min(panels)),
            });
        }
    }
    out
}

/// The product on packed panels (bf16 pairs, or f32 values), over rayon's threads where
/// `parallel`.
fn panel_matmul(a: Left, b: &PackedB, start: Start, (out, ldc): (Out, usize), parallel: bool) {
    let (k, n) = (b.k, b.n);
    let (panels, singles) = match &b.data {
        Packed::Pairs(p) => (p, false),
        Packed::Singles(p) => (p, true),
        Packed::Rounded(_) => unreachable!("the rounded fallback has no panels"),
    };
    // The k steps of the kernel: pairs of k, or single k.
    let kp = if singles { k } else { k.div_ceil(2) };
    let run = |packed: &mut Vec<u32>, task: &Task| {
        let (r0, r1) = task.rows;
        let blocks = (r1 - r0).div_ceil(MR);
        if matches!(a, Left::Rows(_)) && packed.len() < blocks * MR * KC {
            packed.resize(blocks * MR * KC, 0);
        }
        for kb in (0..kp).step_by(KC) {
            let kc = KC.min(kp - kb);
            if let Left::Rows(a) = a {
                pack_a(
                    a,
                    (k, singles),
                    (r0, r1),
                    (kb, kc),
                    &mut packed[..blocks * MR * KC],
                );
            }
            for panel in task.panels.0..task.panels.1 {
                let cols = NR.min(n - panel * NR);
                let (at, width) = panel_at(n, kp, panel);
                let b = &panels[at + kb * width..at + (kb + kc) * width];
                let init = match start {
                    _ if kb > 0 => Init::Load,
                    Start::Zero => Init::Bias(None),
                    Start::Bias(bias) => Init::Bias(Some(&bias[panel * NR..panel * NR + cols])),
                    Start::Existing => Init::Load,
                };
                for blk in 0..blocks {
                    let row = r0 + blk * MR;
                    let tile = Tile {
                        c: out.at(row * ldc + panel * NR),
                        ldc,
                        rows: MR.min(r1 - row),
                        cols,
                    };
                    let ap = match a {
                        Left::Rows(_) => &packed[blk * MR * KC..(blk + 1) * MR * KC],
                        Left::Packed(a) => a.block(kb, r0 / MR + blk),
                    };
                    // SAFETY: `Pairs` exist only where the CPU has AVX512-BF16, `Singles` only
                    // where it has AVX-512F; the tile lies inside this task's rectangle of c.
                    unsafe {
                        match (singles, width == NR) {
                            (true, true) => kernel::block_f32::<2>(ap, b, kc, &tile, &init),
                            (true, false) => kernel::block_f32::<1>(ap, b, kc, &tile, &init),
                            (false, true) => kernel::block::<2>(ap, b, kc, &tile, &init),
                            (false, false) => kernel::block::<1>(ap, b, kc, &tile, &init),
                        }
                    };
                }
            }
        }
    };
    let panel_count = n.div_ceil(NR);
    if !parallel {
        let mut packed = Vec::new();
        for rb in (0..a.m()).step_by(MC) {
            let task = Task {
                rows: (rb, (rb + MC).min(a.m())),
                panels: (0, panel_count),
            };
            run(&mut packed, &task);
        }
        return;
    }
    // One buffer for the packed rows per thread, kept across its tasks: zeroing a fresh one
    // per task was 4% of a bf16 UNet step.
    tasks(a.m(), panel_count)
        .par_iter()
        .for_each_init(Vec::new, |packed, task| run(packed, task));
}

/// Rows `r0..r1`, k steps `kb..kb + kc` of `a` into `packed` as `[row block][MR rows][KC
/// steps]`: a step is a pair of k rounded to bf16, or with `singles` one f32 value; rows past
/// `r1` and steps past k are zero. A row's steps lie side by side, so that rounding is one
/// vector instruction per 32 values and the kernel finds row r's step p at the constant offset
/// `r * KC + p`.
fn pack_a(
    a: Lhs,
    (k, singles): (usize, bool),
    (r0, r1): (usize, usize),
    (kb, kc): (usize, usize),
    packed: &mut [u32],
) {
    for (blk, dst) in packed.chunks_mut(MR * KC).enumerate() {
        for (r, dst) in dst.chunks_mut(KC).enumerate() {
            let dst = &mut dst[..kc];
            let row = r0 + blk * MR + r;
            if row >= r1 {
                dst.fill(0);
                continue;
            }
            let start = row * a.ld;
            if singles {
                let src = &a.data[start + kb..start + (kb + kc).min(k)];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = s.to_bits();
                }
                dst[src.len()..].fill(0);
                continue;
            }
            let src = &a.data[start + 2 * kb..start + (2 * (kb + kc)).min(k)];
            // SAFETY: only the `Pairs` path, chosen where the CPU has AVX512-BF16, packs
            // pairs.
            unsafe { kernel::row_pairs(src, 1.0, dst) };
        }
    }
}

/// Where a kernel block writes: `rows` x `cols` of c from `c`, rows `ldc` apart.
struct Tile {
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
}

/// What a block's sums start from: the bias (or zero) on the first k block, c after it.
enum Init<'a> {
    Bias(Option<&'a [f32]>),
    Load,
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{Init, Tile, KC, MR, NR};
    use std::arch::x86_64::*;

    /// `dst[p]` = the pair (`src[2p] * scale`, `src[2p + 1] * scale`), each product in f32
    /// rounded to bf16, zero past `src`.
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn row_pairs(src: &[f32], scale: f32, dst: &mut [u32]) {
        debug_assert!(src.len() <= 2 * dst.len());
        let scale = _mm512_set1_ps(scale);
        for (p0, out) in (0..dst.len()).step_by(16).zip(dst.chunks_mut(16)) {
            let left = src.len().saturating_sub(2 * p0);
            let at = src.as_ptr().wrapping_add(2 * p0);
            let lo = _mm512_maskz_loadu_ps(lane_mask(left), at);
            let hi = _mm512_maskz_loadu_ps(lane_mask(left.saturating_sub(16)), at.wrapping_add(16));
            let (lo, hi) = (_mm512_mul_ps(lo, scale), _mm512_mul_ps(hi, scale));
            let pairs: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_mask_storeu_epi32(out.as_mut_ptr().cast(), lane_mask(out.len()), pairs);
        }
    }

    /// `dst[j]` = the pair (`even[j]`, `odd[j]`) rounded to bf16 (`odd` zero when absent),
    /// zero past `even`'s length (at most `dst`'s, [`NR`] or half of it).
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512-BF16; `odd` is as long as `even`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn interleave(even: &[f32], odd: Option<&[f32]>, dst: &mut [u32]) {
        debug_assert!(dst.len().is_multiple_of(16) && dst.len() <= NR);
        debug_assert!(even.len() <= dst.len() && odd.is_none_or(|o| o.len() == even.len()));
        for half in 0..dst.len() / 16 {
            let mask = lane_mask(even.len().saturating_sub(16 * half));
            let words = |row: &[f32]| {
                let x = _mm512_maskz_loadu_ps(mask, row.as_ptr().wrapping_add(16 * half));
                _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                    _mm512_cvtneps_pbh(x),
                ))
            };
            let mut pairs = words(even);
            if let Some(odd) = odd {
                pairs = _mm512_or_si512(pairs, _mm512_slli_epi32::<16>(words(odd)));
            }
            _mm512_storeu_si512(dst.as_mut_ptr().add(16 * half).cast(), pairs);
        }
    }

    /// A kernel block: `MR` x `16 V` sums over `kc` steps of `ap` (`[MR][KC]`) and `b`
    /// (`[step][16 V]`), one `$step(acc, a, b)` per step, lane and row. `V` is 2 for a full
    /// panel ([`NR`] lanes) and 1 for a narrow one.
    macro_rules! block {
        ($(#[$doc:meta])* $name:ident, $features:literal, $step:expr) => {
            $(#[$doc])*
            /// # Safety
            /// The CPU has the features named; `tile` lies in writable memory.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const V: usize>(
                ap: &[u32],
                b: &[u32],
                kc: usize,
                tile: &Tile,
                init: &Init,
            ) {
                debug_assert!(kc <= KC && ap.len() >= KC * MR && b.len() >= kc * 16 * V);
                debug_assert!(tile.cols <= 16 * V);
                let masks: [__mmask16; V] =
                    std::array::from_fn(|v| lane_mask(tile.cols.saturating_sub(16 * v)));
                let mut acc = [[_mm512_setzero_ps(); V]; MR];
                match init {
                    Init::Bias(Some(bias)) => {
                        let b: [__m512; V] = std::array::from_fn(|v| {
                            _mm512_maskz_loadu_ps(masks[v], bias.as_ptr().wrapping_add(16 * v))
                        });
                        for row in acc.iter_mut() {
                            *row = b;
                        }
                    }
                    Init::Bias(None) => {}
                    Init::Load => {
                        // Constant bounds and a test per row, here and below, so that the
                        // accumulators stay in registers: a loop to `tile.rows` put them in
                        // memory, zeroed by a call to memset (7% of the bf16 attention).
                        for r in 0..MR {
                            if r < tile.rows {
                                let p = tile.c.add(r * tile.ldc);
                                for v in 0..V {
                                    acc[r][v] =
                                        _mm512_maskz_loadu_ps(masks[v], p.wrapping_add(16 * v));
                                }
                            }
                        }
                    }
                }
                let (ap, bp) = (ap.as_ptr(), b.as_ptr());
                for p in 0..kc {
                    let b: [__m512i; V] =
                        std::array::from_fn(|v| _mm512_loadu_si512(bp.add((p * V + v) * 16).cast()));
                    for (r, row) in acc.iter_mut().enumerate() {
                        let a = _mm512_set1_epi32(*ap.add(r * KC + p) as i32);
                        for v in 0..V {
                            row[v] = $step(row[v], a, b[v]);
                        }
                    }
                }
                for r in 0..MR {
                    if r < tile.rows {
                        let p = tile.c.add(r * tile.ldc);
                        for v in 0..V {
                            _mm512_mask_storeu_ps(p.wrapping_add(16 * v), masks[v], acc[r][v]);
                        }
                    }
                }
            }
        };
    }

    block!(
        /// bf16 pairs: `vdpbf16ps`.
        block,
        "avx512f,avx512bf16",
        |acc, a: __m512i, b: __m512i| _mm512_dpbf16_ps(
            acc,
            std::mem::transmute::<__m512i, __m512bh>(a),
            std::mem::transmute::<__m512i, __m512bh>(b)
        )
    );

    block!(
        /// f32 values: FMA.
        block_f32,
        "avx512f",
        |acc, a: __m512i, b: __m512i| _mm512_fmadd_ps(
            _mm512_castsi512_ps(a),
            _mm512_castsi512_ps(b),
            acc
        )
    );

    /// The first `n` of 16 lanes.
    #[inline]
    fn lane_mask(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::{Init, Tile, NR};

    /// Never called: `Singles` are packed only where AVX-512F exists.
    pub(super) unsafe fn block_f32<const V: usize>(
        _: &[u32],
        _: &[u32],
        _: usize,
        _: &Tile,
        _: &Init,
    ) {
        unreachable!("the f32 panel kernel needs AVX-512F")
    }

    /// Never called: `Pairs` is packed only where AVX512-BF16 exists.
    pub(super) unsafe fn row_pairs(_: &[f32], _: f32, _: &mut [u32]) {
        unreachable!("the bf16 kernel needs AVX512-BF16")
    }

    /// Never called: `Pairs` is packed only where AVX512-BF16 exists.
    pub(super) unsafe fn interleave(_: &[f32], _: Option<&[f32]>, _: &mut [u32]) {
        unreachable!("the bf16 kernel needs AVX512-BF16")
    }

    /// Never called: `Pairs` is packed only where AVX512-BF16 exists.
    pub(super) unsafe fn block<const V: usize>(_: &[u32], _: &[u32], _: usize, _: &Tile, _: &Init) {
        unreachable!("the bf16 kernel needs AVX512-BF16")
    }
}

/// A linear layer's weights and bias packed for this module's kernels: bf16 pairs, or f32
/// panels.
#[derive(Debug)]
pub(crate) struct PackedLinear {
    weight: PackedB,
    bias: Option<Vec<f32>>,
}

/// A weight (n x k) and bias as f32 values.
fn linear_values(
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<(Vec<f32>, Option<Vec<f32>>)> {
    let values = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
    Ok((values(weight)?, bias.map(values).transpose()?))
}

impl PackedLinear {
    /// An (n x k) weight and its (n) bias for bf16 products.
    pub(crate) fn new(weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Self> {
        let (n, k) = weight.dims2()?;
        let (w, bias) = linear_values(weight, bias)?;
        Ok(PackedLinear {
            weight: PackedB::from_weight(&w, n, k),
            bias,
        })
    }

    /// An (n x k) weight and its bias in f32 panels; `None` where the CPU has no AVX-512F.
    pub(crate) fn f32(weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Option<Self>> {
        if !avx512_hardware() {
            return Ok(None);
        }
        let (n, k) = weight.dims2()?;
        let (w, bias) = linear_values(weight, bias)?;
        let packed = PackedB::f32_weight(&w, n, k);
        Ok(packed.map(|weight| PackedLinear { weight, bias }))
    }

    /// This f32-panel layer for bf16 products.
    pub(crate) fn to_bf16(&self) -> candle_core::Result<Self> {
        let Packed::Singles(panels) = &self.weight.data else {
            candle_core::bail!("sd-linear: only f32 panels convert to bf16");
        };
        let (k, n) = (self.weight.k, self.weight.n);
        // The panels hold (kk, j) at [start + kk * width + j % NR] of panel j / NR.
        let w: Vec<f32> = (0..n * k)
            .map(|i| {
                let (j, kk) = (i / k, i % k);
                let (start, width) = panel_at(n, k, j / NR);
                f32::from_bits(panels[start + kk * width + j % NR])
            })
            .collect();
        Ok(PackedLinear {
            weight: PackedB::from_weight(&w, n, k),
            bias: self.bias.clone(),
        })
    }

    /// The layer packed now where this process runs bf16 products ([`set_cpu_bf16`]) and
    /// `weight` is an f32 CPU tensor, else `None`. A layer so packed at load keeps only the
    /// pairs: its f32 weights are never used again, and keeping them made `--dtype bf16` take
    /// more memory than f32.
    pub(crate) fn at_load(
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Option<Arc<Self>>> {
        if !cpu_bf16() || !weight.device().is_cpu() || weight.dtype() != DType::F32 {
            return Ok(None);
        }
        Ok(Some(Arc::new(Self::new(weight, bias)?)))
    }

    /// The layer in `cell`, packed from `weight` and `bias` on the first call.
    pub(crate) fn cached(
        cell: &OnceLock<Arc<Self>>,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Arc<Self>> {
        if let Some(p) = cell.get() {
            return Ok(p.clone());
        }
        let p = Arc::new(Self::new(weight, bias)?);
        Ok(cell.get_or_init(|| p).clone())
    }

    /// `x W^T + b` over the last dimension of an f32 CPU tensor.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for PackedLinear {
    fn name(&self) -> &'static str {
        "sd-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::contiguous_f32(self.name(), storage, layout)?;
        let dims = layout.shape().dims();
        let (k, n) = (self.weight.k, self.weight.n);
        if dims.last() != Some(&k) {
            candle_core::bail!("{}: input {:?}, weight in {k}", self.name(), dims);
        }
        let m = dims[..dims.len() - 1].iter().product();
        let mut out = Vec::with_capacity(m * n);
        let start = self.bias.as_deref().map_or(Start::Zero, Start::Bias);
        // SAFETY: out has room for m rows of n; a start of zero or the bias writes every
        // element before any is read.
        unsafe {
            matmul_raw(
                Lhs { data: x, m, ld: k },
                &self.weight,
                start,
                out.as_mut_ptr(),
                n,
            );
            out.set_len(m * n);
        }
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// `start + a b` of the bf16-rounded operands in f64; `b(kk, j)` gives b.
    fn reference(
        a: Lhs,
        k: usize,
        n: usize,
        b: impl Fn(usize, usize) -> f32,
        start: &[f64],
    ) -> Vec<f64> {
        let mut out = start.to_vec();
        for i in 0..a.m {
            for j in 0..n {
                for kk in 0..k {
                    out[i * n + j] +=
                        round_bf16(a.data[i * a.ld + kk]) as f64 * round_bf16(b(kk, j)) as f64;
                }
            }
        }
        out
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even 1.
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to the even 1 + 2^-6.
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0 + 1.0 / 65536.0), 0x3f81);
        assert_eq!(bf16_bits(f32::MAX), 0x7f80, "overflow rounds to infinity");
        assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
        assert_eq!(bf16_bits(-0.0), 0x8000);
        assert!(round_bf16(f32::NAN).is_nan());
        assert!(
            round_bf16(f32::from_bits(0x7f80_0001)).is_nan(),
            "a NaN does not become inf"
        );
        for x in random(1000, 7) {
            let r = round_bf16(x * 100.0);
            assert!((r - x * 100.0).abs() <= (x * 100.0).abs() / 256.0);
        }
    }

    /// Both kernels against the rounded product in f64, on odd sizes: partial row blocks and
    /// panels, odd k, several k blocks, a left operand with a row stride past k; the right
    /// operand as a weight (n x k) and as an activation (k x n, rows apart by more than n);
    /// each start, into rows of c apart by more than n.
    #[test]
    fn matches_the_rounded_product() {
        let kernels: &[bool] = if bf16_hardware() {
            &[true, false]
        } else {
            &[false]
        };
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (13, 77, 33),
            (12, 64, 32),
            (25, 40, 16),
            (24, 9, 17),
            (36, 4096, 40),
            (37, 600, 65),
            (5, 80, 80),
            (200, 3, 100),
            (2, 768, 1280),
        ] {
            let a = random(m * (k + 3), (m * 31 + k) as u64);
            let a = Lhs {
                data: &a,
                m,
                ld: k + 3,
            };
            let w = random(n * k, (n * 17 + k) as u64);
            let act = random(k * (n + 2), (n * 5 + k) as u64);
            let bias = random(n, n as u64);
            let existing = random(m * n, 99);
            let ldc = n + 5;
            for weight_layout in [true, false] {
                let (src, strides) = if weight_layout {
                    (&w, (1, k))
                } else {
                    (&act, (n + 2, 1))
                };
                let b_at = |kk: usize, j: usize| src[kk * strides.0 + j * strides.1];
                for (s, start) in [Start::Zero, Start::Bias(&bias), Start::Existing]
                    .into_iter()
                    .enumerate()
                {
                    let init: Vec<f64> = (0..m * n)
                        .map(|i| match start {
                            Start::Zero => 0.0,
                            Start::Bias(b) => b[i % n] as f64,
                            Start::Existing => existing[i] as f64,
                        })
                        .collect();
                    let want = reference(a, k, n, b_at, &init);
                    for &pairs in kernels {
                        let b = PackedB::for_kernel(src, k, n, strides, pairs);
                        let mut c = vec![f32::NAN; m * ldc];
                        for i in 0..m {
                            c[i * ldc..i * ldc + n].copy_from_slice(&existing[i * n..(i + 1) * n]);
                        }
                        // SAFETY: c holds m rows of ldc >= n.
                        unsafe { matmul_raw(a, &b, start, c.as_mut_ptr(), ldc) };
                        for i in 0..m {
                            for j in 0..n {
                                let (got, want) = (c[i * ldc + j] as f64, want[i * n + j]);
                                // Sums of k products of magnitude <= 1 in f32.
                                let tol = 4e-6 * (k as f64).sqrt() + 1e-6;
                                assert!(
                                    (got - want).abs() <= tol,
                                    "{m}x{k}x{n} pairs {pairs} weight {weight_layout} start {s}: c[{i}, {j}] {got} vs {want}"
                                );
                            }
                            assert!(
                                c[i * ldc + n..(i + 1) * ldc].iter().all(|x| x.is_nan()),
                                "past n"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Rows packed by their owner ([`PackedA`]), scaled as they are set, and products on the
    /// calling thread give exactly the numbers of [`matmul`] on the scaled f32 rows: odd k,
    /// several k blocks, rows that do not fill the last row block, a narrow last panel.
    #[test]
    fn packed_rows_and_products_in_task_match_matmul() {
        for &(m, k, n) in &[(1, 1, 1), (13, 77, 40), (25, 601, 33), (30, 1200, 80)] {
            let a = random(m * k, (m + 3 * k) as u64);
            let w = random(n * k, (7 * n + k) as u64);
            let scale = 0.37f32;
            let scaled: Vec<f32> = a.iter().map(|x| x * scale).collect();
            let lhs = Lhs {
                data: &scaled,
                m,
                ld: k,
            };
            let kernels: &[bool] = if bf16_hardware() {
                &[true, false]
            } else {
                &[false]
            };
            for &pairs in kernels {
                let b = PackedB::for_kernel(&w, k, n, (1, k), pairs);
                let mut want = vec![0f32; m * n];
                matmul(lhs, &b, Start::Zero, &mut want);
                let mut got = vec![f32::NAN; m * n];
                matmul_in_task(lhs, &b, Start::Zero, &mut got);
                assert_eq!(got, want, "{m}x{k}x{n} pairs {pairs}: in task");
                if !pairs {
                    continue;
                }
                let mut packed = PackedA::default();
                // A larger use first: stale values must not leak into the smaller one.
                packed.resize(m + 20, k + 9);
                for i in 0..m + 20 {
                    packed.set_row(i, &random(k + 9, i as u64), 5.0);
                }
                packed.resize(m, k);
                for i in 0..m {
                    packed.set_row(i, &a[i * k..(i + 1) * k], scale);
                }
                let mut got = vec![f32::NAN; m * n];
                matmul_packed(&packed, &b, Start::Zero, &mut got);
                assert_eq!(got, want, "{m}x{k}x{n}: packed rows");
            }
        }
    }

    #[test]
    fn empty_operands() {
        let none = |m| Lhs {
            data: &[],
            m,
            ld: 0,
        };
        let b = PackedB::from_weight(&[], 0, 5);
        let mut c = vec![];
        matmul(
            Lhs {
                data: &[0.0; 10],
                m: 2,
                ld: 5,
            },
            &b,
            Start::Zero,
            &mut c,
        );
        let b = PackedB::from_weight(&[0.0; 4], 4, 1);
        matmul(none(0), &b, Start::Zero, &mut c);
        // k = 0: c is the start.
        let b = PackedB::from_weight(&[], 3, 0);
        let mut c = vec![f32::NAN; 6];
        matmul(none(2), &b, Start::Bias(&[1.0, 2.0, 3.0]), &mut c);
        assert_eq!(c, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        matmul(none(2), &b, Start::Existing, &mut c);
        assert_eq!(c, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        matmul(none(2), &b, Start::Zero, &mut c);
        assert_eq!(c, [0.0; 6]);
    }

    /// The layer against candle's linear layer on rounded inputs and weights (bias exact),
    /// over a 3-d input.
    #[test]
    fn linear_rounds_the_operands() {
        use crate::modules::bf16_rounded;
        use candle_core::Module;
        let dev = Device::Cpu;
        let mut rng = crate::samplers::TorchRng::new(17);
        for (rows, k, n, bias) in [(7, 77, 33, true), (1, 320, 1280, false), (96, 40, 3, true)] {
            let x = rng.randn(&[2, rows, k], &dev).unwrap();
            let w = rng.randn(&[n, k], &dev).unwrap();
            let b = bias.then(|| rng.randn(&[n], &dev).unwrap());
            let got = PackedLinear::new(&w, b.as_ref())
                .unwrap()
                .forward(&x)
                .unwrap();
            assert_eq!(got.dims(), &[2, rows, n]);
            let want = candle_nn::Linear::new(bf16_rounded(&w), b)
                .forward(&bf16_rounded(&x))
                .unwrap();
            let diff = crate::modules::max_abs_diff(&got, &want);
            assert!(
                diff < 1e-4 * (k as f32).sqrt(),
                "{rows}x{k}x{n}: differs by {diff}"
            );
        }
    }

    /// The f32 panels: the unrounded product (f64 reference), odd sizes, every start, a
    /// left operand with a row stride past k; and the layer against candle's, and converted to
    /// bf16 against the bf16 layer.
    #[test]
    fn f32_panels_match_the_product() {
        if !avx512_hardware() {
            return;
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (13, 77, 33),
            (7, 20, 48),
            (37, 600, 65),
            (200, 3, 100),
        ] {
            let a = random(m * (k + 3), (m + k) as u64);
            let a = Lhs {
                data: &a,
                m,
                ld: k + 3,
            };
            let w = random(n * k, (n * 3 + k) as u64);
            let bias = random(n, 5);
            let b = PackedB::f32_weight(&w, n, k).expect("AVX-512F");
            let mut c = vec![f32::NAN; m * n];
            matmul(a, &b, Start::Bias(&bias), &mut c);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = bias[j] as f64
                        + (0..k)
                            .map(|kk| a.data[i * a.ld + kk] as f64 * w[j * k + kk] as f64)
                            .sum::<f64>();
                    let got = c[i * n + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-5 * (k as f64).sqrt(),
                        "{m}x{k}x{n} [{i}, {j}]: {got} vs {want}"
                    );
                }
            }
        }
        use candle_core::Module;
        let dev = Device::Cpu;
        let mut rng = crate::samplers::TorchRng::new(19);
        let x = rng.randn(&[2, 9, 70], &dev).unwrap();
        let w = rng.randn(&[45, 70], &dev).unwrap();
        let b = rng.randn(&[45], &dev).unwrap();
        let panels = PackedLinear::f32(&w, Some(&b)).unwrap().expect("AVX-512F");
        let want = candle_nn::Linear::new(w.clone(), Some(b.clone()))
            .forward(&x)
            .unwrap();
        let diff = crate::modules::max_abs_diff(&panels.forward(&x).unwrap(), &want);
        assert!(diff < 1e-5, "f32 panels differ from candle by {diff}");
        let bf16 = PackedLinear::new(&w, Some(&b))
            .unwrap()
            .forward(&x)
            .unwrap();
        let converted = panels.to_bf16().unwrap().forward(&x).unwrap();
        assert_eq!(crate::modules::max_abs_diff(&bf16, &converted), 0.0);
    }

    /// Throughput of both kernels on a UNet-sized product (run with `--ignored --nocapture`).
    #[test]
    #[ignore]
    fn timing() {
        // A UNet projection, CLIP's MLP and attention projection (77 rows).
        for (m, k, n) in [
            (4608, 3072, 3072),
            (8192, 320, 1280),
            (77, 768, 3072),
            (77, 3072, 768),
            (77, 768, 768),
        ] {
            let a = random(m * k, 1);
            let w = random(n * k, 2);
            let mut c = vec![0f32; m * n];
            let mut packed = vec![("rounded f32", PackedB::for_kernel(&w, k, n, (1, k), false))];
            if bf16_hardware() {
                packed.push(("bf16 pairs", PackedB::for_kernel(&w, k, n, (1, k), true)));
            }
            if let Some(b) = PackedB::f32_weight(&w, n, k) {
                packed.push(("f32 panels", b));
            }
            let gflops = |f: &mut dyn FnMut()| {
                let mut best = f64::MAX;
                for _ in 0..20 {
                    let t = std::time::Instant::now();
                    f();
                    best = best.min(t.elapsed().as_secs_f64());
                }
                2.0 * (m * k * n) as f64 / best / 1e9
            };
            for (name, b) in &packed {
                let g = gflops(&mut || matmul(Lhs { data: &a, m, ld: k }, b, Start::Zero, &mut c));
                println!("{m}x{k}x{n} {name}: {g:.1} GFLOPS");
            }
            let (x, wt) = (
                Tensor::from_slice(&a, (m, k), &Device::Cpu).unwrap(),
                Tensor::from_slice(&w, (n, k), &Device::Cpu).unwrap(),
            );
            let g = gflops(&mut || {
                x.matmul(&wt.t().unwrap()).unwrap();
            });
            println!("{m}x{k}x{n} candle matmul: {g:.1} GFLOPS");
        }
    }
}
