//! 3x3 stride-1 f32 convolutions by Winograd's minimal filtering algorithm F(4x4, 3x3).
//!
//! A direct (im2col or tap) convolution spends 9 multiplications per output pixel, input
//! channel and output channel; F(4x4, 3x3) computes a 4x4 output tile from a 6x6 input tile
//! with 36, a quarter as many: `Y = A^T [(G g G^T) ⊙ (B^T d B)] A`, summed over input channels.
//! The sum over input channels of the element-wise products is, for each of the 36 positions of
//! the transformed tile, a matrix product `U (c_out x c_in) x V (c_in x tiles)`, so the
//! convolution becomes 36 GEMMs of the `gemm` crate plus three cheap transforms:
//! - weights `U = G g G^T`, transformed on every call for a chunk of output channels at a time
//!   (keeping them would quadruple the memory of the convolution weights);
//! - inputs `V = B^T d B` for a band of tile rows at a time (the transformed band is 2.25x the
//!   band's input, so bands bound the scratch memory);
//! - outputs `Y = A^T M A` plus the bias, written straight into the output tensor.
//!
//! The transforms use the interpolation points 0, ±1, ±2 and ∞ (Lavin & Gray, "Fast Algorithms
//! for Convolutional Neural Networks", 2015). Their constants (up to 8 in `A`, 1/24 in `G`) make
//! the result differ from the direct convolution by more than reordering a sum does; the error
//! is measured in this module's tests and stated in `BENCHMARKS.md`, and `--conv direct` turns
//! this path off (see [`super::conv_kernel::set_conv_algorithm`]).

use rayon::prelude::*;

use super::softmax::{simd_level, Simd};

/// Output tile side.
const M: usize = 4;
/// Input tile side, `M + 2`.
const T: usize = 6;
/// Positions of a transformed tile.
const XI: usize = T * T;

/// Largest transformed band (inputs and outputs together), in elements (64 MB in f32).
const BAND_ELEMENTS: usize = 1 << 24;
/// Largest chunk of transformed weights, in elements (16 MB in f32).
const WEIGHT_ELEMENTS: usize = 1 << 22;

/// Shape of a convolution: its NCHW input and its output channels.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
}

/// A raw pointer that rayon tasks share to write disjoint elements.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: every use writes or reads elements that no other task touches at the same time.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer (a method, so that closures capture the whole `Shared`).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// The convolution of `src` (`dims`, contiguous NCHW) with `weight` (c_out, c_in, 3, 3) and
/// `padding` zeros on every side: the output, contiguous (b, c_out, oh, ow), and its height
/// and width.
pub(crate) fn conv3x3(
    src: &[f32],
    dims: Dims,
    weight: &[f32],
    bias: Option<&[f32]>,
    padding: usize,
) -> (Vec<f32>, usize, usize) {
    let limits = (BAND_ELEMENTS, WEIGHT_ELEMENTS);
    conv3x3_within(src, dims, weight, bias, padding, limits)
}

/// [`conv3x3`] with transformed bands and weight chunks of at most `limits` elements (where a
/// tile row and 16 output channels fit).
fn conv3x3_within(
    src: &[f32],
    dims: Dims,
    weight: &[f32],
    bias: Option<&[f32]>,
    padding: usize,
    (band_elements, weight_elements): (usize, usize),
) -> (Vec<f32>, usize, usize) {
    let Dims {
        b,
        c_in,
        h,
        w,
        c_out,
    } = dims;
    let (oh, ow) = (h + 2 * padding - 2, w + 2 * padding - 2);
    let (tiles_h, tiles_w) = (oh.div_ceil(M), ow.div_ceil(M));
    if b * c_in * c_out == 0 {
        // No products: the bias alone (or nothing).
        let plane = oh * ow;
        let out = (0..b * c_out * plane)
            .map(|i| bias.map_or(0.0, |bias| bias[i / plane % c_out]))
            .collect();
        return (out, oh, ow);
    }
    let chunk = (weight_elements / (XI * c_in))
        .clamp(16, c_out.max(16))
        .min(c_out);
    let rows = (band_elements / (XI * (c_in + chunk) * tiles_w)).clamp(1, b * tiles_h);
    let plan = Plan {
        dims,
        padding,
        oh,
        ow,
        tiles_h,
        tiles_w,
    };
    let len = b * c_out * oh * ow;
    let mut out = Vec::<f32>::with_capacity(len);
    let dst = Shared(out.as_mut_ptr());
    let band_tiles = rows * tiles_w;
    let mut v = Vec::<f32>::with_capacity(c_in * XI * band_tiles);
    let mut u = Vec::<f32>::with_capacity(chunk * XI * c_in);
    let mut m = Vec::<f32>::with_capacity(chunk * XI * band_tiles);
    let mut r0 = 0;
    while r0 < b * tiles_h {
        let n_rows = rows.min(b * tiles_h - r0);
        let tiles = n_rows * tiles_w;
        plan.transform_input(src, r0, n_rows, &mut v);
        let mut c0 = 0;
        while c0 < c_out {
            let cc = chunk.min(c_out - c0);
            transform_weights(&weight[c0 * c_in * 9..(c0 + cc) * c_in * 9], c_in, &mut u);
            multiply(&u, &v, cc, c_in, tiles, &mut m);
            plan.transform_output(&m, bias, c0, cc, r0, n_rows, dst);
            c0 += cc;
        }
        r0 += n_rows;
    }
    // SAFETY: every output element (img, co, y, x) lies in tile (y / 4, x / 4) of tile row
    // img * tiles_h + y / 4, which one band covered, and output channel co, which one chunk
    // covered; `transform_output` wrote it there.
    unsafe { out.set_len(len) };
    (out, oh, ow)
}

/// The shapes of one convolution.
struct Plan {
    dims: Dims,
    padding: usize,
    oh: usize,
    ow: usize,
    tiles_h: usize,
    tiles_w: usize,
}

impl Plan {
    /// `V` of tile rows `r0..r0 + n_rows` (tile row r is row r % tiles_h of image
    /// r / tiles_h), laid out (c_in, 36, tiles), into `v`.
    fn transform_input(&self, src: &[f32], r0: usize, n_rows: usize, v: &mut Vec<f32>) {
        let Dims { c_in, h, w, .. } = self.dims;
        let tw = self.tiles_w;
        let tiles = n_rows * tw;
        let width = tw * M + 2;
        let p = self.padding;
        let simd = simd_level() != Simd::None;
        v.clear();
        v.reserve(c_in * XI * tiles);
        v.spare_capacity_mut()[..c_in * XI * tiles]
            .par_chunks_mut(XI * tiles)
            .enumerate()
            .for_each_init(
                || {
                    (
                        vec![0f32; width],
                        vec![0f32; XI * tiles],
                        vec![0f32; XI * tiles],
                    )
                },
                |(row, d, tmp), (ci, out)| {
                    // SAFETY: f32 has no invalid bit patterns; `out` is written in full below
                    // before `set_len`, and nothing reads it before.
                    let out = unsafe { &mut *(out as *mut [_] as *mut [f32]) };
                    // d is (6, 6, tiles): element (i, j) of every tile's 6x6 input patch.
                    for r in 0..n_rows {
                        let (img, ty) = ((r0 + r) / self.tiles_h, (r0 + r) % self.tiles_h);
                        let plane = &src[(img * c_in + ci) * h * w..][..h * w];
                        for i in 0..T {
                            row.fill(0.0);
                            let y = (ty * M + i) as isize - p as isize;
                            if (0..h as isize).contains(&y) {
                                let y = y as usize;
                                row[p..p + w].copy_from_slice(&plane[y * w..(y + 1) * w]);
                            }
                            for j in 0..T {
                                let dst = &mut d[(i * T + j) * tiles + r * tw..][..tw];
                                for (tx, x) in dst.iter_mut().enumerate() {
                                    *x = row[tx * M + j];
                                }
                            }
                        }
                    }
                    // B^T d, every tile at once: tmp is (6, 6, tiles) ...
                    for j in 0..T {
                        let o = rows6_mut(tmp, T * tiles, j * tiles, tiles);
                        bt6(simd, rows6(d, T * tiles, j * tiles, tiles), o);
                    }
                    // ... then (B^T d) B, into V.
                    for a in 0..T {
                        let o = rows6_mut(&mut out[a * T * tiles..], tiles, 0, tiles);
                        bt6(simd, rows6(tmp, tiles, a * T * tiles, tiles), o);
                    }
                },
            );
        // SAFETY: the loop above wrote every (ci, xi, tile) element.
        unsafe { v.set_len(c_in * XI * tiles) };
    }

    /// `Y = A^T M A` plus the bias for output channels `c0..c0 + cc` of tile rows
    /// `r0..r0 + n_rows`, written into the (b, c_out, oh, ow) output at `dst`.
    #[allow(clippy::too_many_arguments)]
    fn transform_output(
        &self,
        m: &[f32],
        bias: Option<&[f32]>,
        c0: usize,
        cc: usize,
        r0: usize,
        n_rows: usize,
        dst: Shared,
    ) {
        let tw = self.tiles_w;
        let tiles = n_rows * tw;
        let (oh, ow) = (self.oh, self.ow);
        let simd = simd_level() != Simd::None;
        m[..cc * XI * tiles]
            .par_chunks(XI * tiles)
            .enumerate()
            .for_each_init(
                || (vec![0f32; M * T * tiles], vec![0f32; M * M * tiles]),
                |(tmp, y), (i, mc)| {
                    let co = c0 + i;
                    let bias = bias.map_or(0.0, |b| b[co]);
                    // A^T M, every tile at once: tmp is (4, 6, tiles) ...
                    for bb in 0..T {
                        let o = rows4_mut(&mut tmp[bb * tiles..], T * tiles, tiles);
                        at4(simd, rows6(mc, T * tiles, bb * tiles, tiles), o, 0.0);
                    }
                    // ... then (A^T M) A plus the bias: y is (4, 4, tiles).
                    for rr in 0..M {
                        let o = rows4_mut(&mut y[rr * M * tiles..], tiles, tiles);
                        at4(simd, rows6(tmp, tiles, rr * T * tiles, tiles), o, bias);
                    }
                    for r in 0..n_rows {
                        let (img, ty) = ((r0 + r) / self.tiles_h, (r0 + r) % self.tiles_h);
                        let base = (img * self.dims.c_out + co) * oh * ow;
                        for rr in 0..M.min(oh - ty * M) {
                            let row = base + (ty * M + rr) * ow;
                            for s in 0..M {
                                let ys = &y[(rr * M + s) * tiles + r * tw..][..tw];
                                for (tx, v) in ys.iter().enumerate() {
                                    let x = tx * M + s;
                                    if x < ow {
                                        // SAFETY: (img, co, y, x) is inside the output, and
                                        // only this task writes output channel co of this
                                        // band.
                                        unsafe { dst.get().add(row + x).write(*v) };
                                    }
                                }
                            }
                        }
                    }
                },
            );
    }
}

/// Six rows of `n` elements, `stride` apart from `offset`.
fn rows6(s: &[f32], stride: usize, offset: usize, n: usize) -> [&[f32]; 6] {
    [0, 1, 2, 3, 4, 5].map(|i| &s[offset + i * stride..][..n])
}

/// Six disjoint rows of `n` elements, `stride` (at least `n`) apart from `offset`.
fn rows6_mut(s: &mut [f32], stride: usize, offset: usize, n: usize) -> [&mut [f32]; 6] {
    let (r0, s) = s[offset..].split_at_mut(stride);
    let (r1, s) = s.split_at_mut(stride);
    let (r2, s) = s.split_at_mut(stride);
    let (r3, s) = s.split_at_mut(stride);
    let (r4, r5) = s.split_at_mut(stride);
    [r0, r1, r2, r3, r4, r5].map(|r| &mut r[..n])
}

/// Four disjoint rows of `n` elements, `stride` (at least `n`) apart.
fn rows4_mut(s: &mut [f32], stride: usize, n: usize) -> [&mut [f32]; 4] {
    let (r0, s) = s.split_at_mut(stride);
    let (r1, s) = s.split_at_mut(stride);
    let (r2, r3) = s.split_at_mut(stride);
    [r0, r1, r2, r3].map(|r| &mut r[..n])
}

/// `o = B^T d` for six rows at once: each row is a vector of independent values.
fn bt6(simd: bool, d: [&[f32]; 6], o: [&mut [f32]; 6]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only where the CPU has AVX2 and FMA.
        return unsafe { x86::bt6(d, o) };
    }
    let _ = simd;
    bt6_rows(d, o)
}

/// `o = A^T d + bias` for six rows in, four out.
fn at4(simd: bool, d: [&[f32]; 6], o: [&mut [f32]; 4], bias: f32) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as in `bt6`.
        return unsafe { x86::at4(d, o, bias) };
    }
    let _ = simd;
    at4_rows(d, o, bias)
}

/// `o = G g` for three rows in, six out.
fn g6(simd: bool, g: [&[f32]; 3], o: [&mut [f32]; 6]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as in `bt6`.
        return unsafe { x86::g6(g, o) };
    }
    let _ = simd;
    g6_rows(g, o)
}

// The row kernels: the transform matrices written out, so that every row is one pass the
// compiler vectorises (at the width of the target features of the function they are inlined
// into).

#[inline(always)]
fn bt6_rows(d: [&[f32]; 6], o: [&mut [f32]; 6]) {
    let n = o[0].len();
    let [d0, d1, d2, d3, d4, d5] = d.map(|d| &d[..n]);
    let [o0, o1, o2, o3, o4, o5] = o.map(|o| &mut o[..n]);
    for i in 0..n {
        let (x0, x1, x2, x3, x4, x5) = (d0[i], d1[i], d2[i], d3[i], d4[i], d5[i]);
        o0[i] = 4.0 * x0 - 5.0 * x2 + x4;
        o1[i] = -4.0 * (x1 + x2) + x3 + x4;
        o2[i] = 4.0 * (x1 - x2) - x3 + x4;
        o3[i] = 2.0 * (x3 - x1) - x2 + x4;
        o4[i] = 2.0 * (x1 - x3) - x2 + x4;
        o5[i] = 4.0 * x1 - 5.0 * x3 + x5;
    }
}

#[inline(always)]
fn at4_rows(d: [&[f32]; 6], o: [&mut [f32]; 4], bias: f32) {
    let n = o[0].len();
    let [d0, d1, d2, d3, d4, d5] = d.map(|d| &d[..n]);
    let [o0, o1, o2, o3] = o.map(|o| &mut o[..n]);
    for i in 0..n {
        let (x0, x5) = (d0[i], d5[i]);
        let (sum12, dif12) = (d1[i] + d2[i], d1[i] - d2[i]);
        let (sum34, dif34) = (d3[i] + d4[i], d3[i] - d4[i]);
        o0[i] = x0 + sum12 + sum34 + bias;
        o1[i] = dif12 + 2.0 * dif34 + bias;
        o2[i] = sum12 + 4.0 * sum34 + bias;
        o3[i] = dif12 + 8.0 * dif34 + x5 + bias;
    }
}

#[inline(always)]
fn g6_rows(g: [&[f32]; 3], o: [&mut [f32]; 6]) {
    let n = o[0].len();
    let [g0, g1, g2] = g.map(|g| &g[..n]);
    let [o0, o1, o2, o3, o4, o5] = o.map(|o| &mut o[..n]);
    for i in 0..n {
        let (x0, x1, x2) = (g0[i], g1[i], g2[i]);
        o0[i] = x0 * 0.25;
        o1[i] = (x0 + x1 + x2) * (-1.0 / 6.0);
        o2[i] = (x0 - x1 + x2) * (-1.0 / 6.0);
        o3[i] = x0 * (1.0 / 24.0) + x1 * (1.0 / 12.0) + x2 * (1.0 / 6.0);
        o4[i] = x0 * (1.0 / 24.0) - x1 * (1.0 / 12.0) + x2 * (1.0 / 6.0);
        o5[i] = x2;
    }
}

/// The row kernels compiled for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn bt6(d: [&[f32]; 6], o: [&mut [f32]; 6]) {
        super::bt6_rows(d, o)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn at4(d: [&[f32]; 6], o: [&mut [f32]; 4], bias: f32) {
        super::at4_rows(d, o, bias)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn g6(g: [&[f32]; 3], o: [&mut [f32]; 6]) {
        super::g6_rows(g, o)
    }
}

/// `U = G g G^T` of weights (cc, c_in, 3, 3), laid out (cc, 36, c_in), into `u`: every input
/// channel of an output channel at once.
fn transform_weights(weight: &[f32], c_in: usize, u: &mut Vec<f32>) {
    let cc = weight.len() / (c_in * 9);
    let simd = simd_level() != Simd::None;
    u.clear();
    u.reserve(cc * XI * c_in);
    u.spare_capacity_mut()[..cc * XI * c_in]
        .par_chunks_mut(XI * c_in)
        .zip(weight.par_chunks(c_in * 9))
        .for_each_init(
            || (vec![0f32; 9 * c_in], vec![0f32; T * 3 * c_in]),
            |(taps, gg), (out, g)| {
                // SAFETY: as in `transform_input`: written in full before `set_len`.
                let out = unsafe { &mut *(out as *mut [_] as *mut [f32]) };
                // The kernel's nine taps, each a row over the input channels.
                for (ci, g) in g.chunks(9).enumerate() {
                    for (k, x) in g.iter().enumerate() {
                        taps[k * c_in + ci] = *x;
                    }
                }
                // G g: gg is (6, 3, c_in), from the kernel's rows for each column j.
                for j in 0..3 {
                    let g = [0, 1, 2].map(|k| &taps[(k * 3 + j) * c_in..][..c_in]);
                    let o = rows6_mut(gg, 3 * c_in, j * c_in, c_in);
                    g6(simd, g, o);
                }
                // (G g) G^T: row a of G g against G.
                for a in 0..T {
                    let g = [0, 1, 2].map(|j| &gg[(a * 3 + j) * c_in..][..c_in]);
                    g6(simd, g, rows6_mut(&mut out[a * T * c_in..], c_in, 0, c_in));
                }
            },
        );
    // SAFETY: the loop above wrote every (co, xi, ci) element.
    unsafe { u.set_len(cc * XI * c_in) };
}

/// `M[xi] = U[xi] (cc x c_in) x V[xi] (c_in x tiles)` for the 36 positions, laid out
/// (cc, 36, tiles), into `m`; one single-threaded GEMM per position, the positions in parallel.
fn multiply(u: &[f32], v: &[f32], cc: usize, c_in: usize, tiles: usize, m: &mut Vec<f32>) {
    m.clear();
    m.reserve(cc * XI * tiles);
    let dst = Shared(m.as_mut_ptr());
    (0..XI).into_par_iter().for_each(|xi| {
        // SAFETY: dst element (co, t) of position xi is m[co * 36 * tiles + xi * tiles + t],
        // inside the reserved capacity and written by this position's GEMM only; lhs element
        // (co, ci) is u[co * 36 * c_in + xi * c_in + ci] and rhs element (ci, t) is
        // v[ci * 36 * tiles + xi * tiles + t], both inside their slices.
        unsafe {
            gemm::gemm(
                cc,
                tiles,
                c_in,
                dst.get().add(xi * tiles),
                1,
                (XI * tiles) as isize,
                false,
                u.as_ptr().add(xi * c_in),
                1,
                (XI * c_in) as isize,
                v.as_ptr().add(xi * tiles),
                1,
                (XI * tiles) as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
    });
    // SAFETY: the 36 GEMMs (read_dst false) wrote every (co, xi, tile) element.
    unsafe { m.set_len(cc * XI * tiles) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Input transform `B^T`, 6x6.
    const BT: [[f32; 6]; 6] = [
        [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
        [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
        [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
        [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
        [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
        [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
    ];

    /// Kernel transform `G`, 6x3 .
    const G: [[f64; 3]; 6] = [
        [1.0 / 4.0, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];

    /// Output transform `A^T`, 4x6.
    const AT: [[f32; 6]; 4] = [
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
        [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
        [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
    ];

    /// The row kernels are the transform matrices.
    #[test]
    fn row_kernels_are_the_matrices() {
        let x: Vec<Vec<f32>> = (0..6)
            .map(|i| vec![(i * i) as f32 - 2.5, i as f32 + 0.5])
            .collect();
        let d = [0, 1, 2, 3, 4, 5].map(|i| x[i].as_slice());
        for simd in [false, true] {
            let simd = simd && simd_level() != Simd::None;
            let mut o = vec![vec![0f32; 2]; 6];
            let [o0, o1, o2, o3, o4, o5] = &mut o[..] else {
                unreachable!()
            };
            bt6(simd, d, [o0, o1, o2, o3, o4, o5].map(|o| o.as_mut_slice()));
            for (row, got) in BT.iter().zip(&o) {
                for (k, g) in got.iter().enumerate() {
                    let want: f32 = row.iter().zip(&x).map(|(c, x)| c * x[k]).sum();
                    assert_eq!(*g, want);
                }
            }
            let mut o = vec![vec![0f32; 2]; 4];
            let [o0, o1, o2, o3] = &mut o[..] else {
                unreachable!()
            };
            at4(simd, d, [o0, o1, o2, o3].map(|o| o.as_mut_slice()), 0.5);
            for (row, got) in AT.iter().zip(&o) {
                for (k, g) in got.iter().enumerate() {
                    let want: f32 = row.iter().zip(&x).map(|(c, x)| c * x[k]).sum::<f32>() + 0.5;
                    assert_eq!(*g, want);
                }
            }
            let mut o = vec![vec![0f32; 2]; 6];
            let [o0, o1, o2, o3, o4, o5] = &mut o[..] else {
                unreachable!()
            };
            g6(
                simd,
                [0, 1, 2].map(|i| x[i].as_slice()),
                [o0, o1, o2, o3, o4, o5].map(|o| o.as_mut_slice()),
            );
            for (row, got) in G.iter().zip(&o) {
                for (k, g) in got.iter().enumerate() {
                    let want: f64 = row.iter().zip(&x).map(|(c, x)| c * f64::from(x[k])).sum();
                    assert!(
                        (f64::from(*g) - want).abs() < 1e-6 * (1.0 + want.abs()),
                        "{g} vs {want}"
                    );
                }
            }
        }
    }

    /// The convolution in f64, the exact sum the others are measured against.
    fn reference(src: &[f32], d: Dims, weight: &[f32], bias: &[f32], p: usize) -> Vec<f64> {
        let c_out = d.c_out;
        let (oh, ow) = (d.h + 2 * p - 2, d.w + 2 * p - 2);
        let mut out = vec![0f64; d.b * c_out * oh * ow];
        for img in 0..d.b {
            for co in 0..c_out {
                for y in 0..oh {
                    for x in 0..ow {
                        let mut acc = f64::from(bias[co]);
                        for ci in 0..d.c_in {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (
                                        (y + ky) as isize - p as isize,
                                        (x + kx) as isize - p as isize,
                                    );
                                    if iy < 0 || ix < 0 || iy >= d.h as isize || ix >= d.w as isize
                                    {
                                        continue;
                                    }
                                    let s = src[((img * d.c_in + ci) * d.h + iy as usize) * d.w
                                        + ix as usize];
                                    let k = weight[((co * d.c_in + ci) * 3 + ky) * 3 + kx];
                                    acc += f64::from(s) * f64::from(k);
                                }
                            }
                        }
                        out[((img * c_out + co) * oh + y) * ow + x] = acc;
                    }
                }
            }
        }
        out
    }

    fn random(n: usize, scale: f32, seed: u64) -> Vec<f32> {
        let mut rng = crate::samplers::TorchRng::new(seed);
        let t = rng.randn(&[n], &candle_core::Device::Cpu).expect("randn");
        t.to_vec1::<f32>()
            .expect("f32")
            .iter()
            .map(|x| x * scale)
            .collect()
    }

    /// Odd sizes, partial edge tiles, several bands and weight chunks, paddings 0-2.
    #[test]
    fn matches_the_exact_convolution() {
        for (b, c_in, c_out, h, w, p) in [
            (1, 1, 1, 4, 4, 1),
            (2, 3, 5, 7, 9, 1),
            (1, 4, 6, 6, 5, 0),
            (2, 2, 3, 6, 6, 2),
            (1, 17, 19, 13, 11, 1),
            (2, 5, 40, 9, 10, 1),
            (0, 3, 4, 5, 5, 1),
            (2, 0, 3, 5, 6, 1),
            (3, 8, 4, 1, 1, 1),
        ] {
            let d = Dims {
                b,
                c_in,
                h,
                w,
                c_out,
            };
            let scale = 1.0 / (9.0 * c_in as f32).sqrt();
            let src = random(b * c_in * h * w, 1.0, 1);
            let weight = random(c_out * c_in * 9, scale, 2);
            let bias = random(c_out, 0.1, 3);
            let want = reference(&src, d, &weight, &bias, p);
            // Whole, and one tile row per band with 16 output channels per weight chunk.
            for limits in [(BAND_ELEMENTS, WEIGHT_ELEMENTS), (1, 1)] {
                let (got, oh, ow) = conv3x3_within(&src, d, &weight, Some(&bias), p, limits);
                assert_eq!((oh, ow), (h + 2 * p - 2, w + 2 * p - 2));
                assert_eq!(got.len(), want.len());
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let e = (f64::from(*g) - w).abs();
                    assert!(
                        e < 1e-5 * (1.0 + w.abs()),
                        "{d:?} p{p}: element {i} {g} vs {w}"
                    );
                }
            }
        }
    }
}

/// Times the stages on the SD 1.5 UNet's shapes: `cargo test --release -p sd-models --lib
/// winograd::timing -- --ignored --nocapture`.
#[cfg(test)]
mod timing {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore]
    fn stages() {
        for (b, c_in, c_out, s) in [
            (2, 320, 320, 64),
            (2, 640, 640, 32),
            (2, 2560, 1280, 16),
            (1, 128, 128, 512),
        ] {
            let d = Dims {
                b,
                c_in,
                h: s,
                w: s,
                c_out,
            };
            let src = vec![0.5f32; b * c_in * s * s];
            let weight = vec![0.01f32; c_out * c_in * 9];
            let (tiles_h, tiles_w) = (s.div_ceil(M), s.div_ceil(M));
            let plan = Plan {
                dims: d,
                padding: 1,
                oh: s,
                ow: s,
                tiles_h,
                tiles_w,
            };
            let rows =
                (BAND_ELEMENTS / (XI * (c_in + c_out.min(128)) * tiles_w)).clamp(1, b * tiles_h);
            let tiles = rows * tiles_w;
            let (mut v, mut u, mut m) = (Vec::new(), Vec::new(), Vec::new());
            let mut out = vec![0f32; b * c_out * s * s];
            let dst = Shared(out.as_mut_ptr());
            let cc = c_out.min((WEIGHT_ELEMENTS / (XI * c_in)).max(16));
            for _ in 0..2 {
                let t0 = Instant::now();
                plan.transform_input(&src, 0, rows, &mut v);
                let t1 = Instant::now();
                transform_weights(&weight[..cc * c_in * 9], c_in, &mut u);
                let t2 = Instant::now();
                multiply(&u, &v, cc, c_in, tiles, &mut m);
                let t3 = Instant::now();
                plan.transform_output(&m, None, 0, cc, 0, rows, dst);
                let t4 = Instant::now();
                let whole = Instant::now();
                let _ = conv3x3(&src, d, &weight, None, 1);
                let whole = whole.elapsed();
                println!(
                    "{b}x{c_in}->{c_out} {s}x{s}: band {rows} rows, chunk {cc}: input {:?} weights {:?} gemm {:?} output {:?}; whole {whole:?}",
                    t1 - t0, t2 - t1, t3 - t2, t4 - t3
                );
            }
        }
    }
}
