//! Lanczos resizing of 8-bit images with the arithmetic of Pillow's `Image.resize(...,
//! Image.LANCZOS)`, which diffusers' image processor uses: separable convolution with a
//! Lanczos-3 kernel widened by the downscale factor, weights normalised per output pixel and
//! rounded to 22-bit fixed point, a horizontal pass over the source rows that are needed,
//! rounded and clipped to 8 bits, then a vertical pass.

use std::f64::consts::PI;

const PRECISION_BITS: u32 = 32 - 8 - 2;
const SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * PI;
        x.sin() / x
    }
}

fn lanczos(x: f64) -> f64 {
    if (-SUPPORT..SUPPORT).contains(&x) {
        sinc(x) * sinc(x / SUPPORT)
    } else {
        0.0
    }
}

/// Per output position: the first input index, and fixed-point weights for the inputs from it.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    weights: Vec<Vec<i32>>,
}

fn coefficients(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = SUPPORT * filter_scale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let inv = 1.0 / filter_scale;
        // C casts: truncation toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut k: Vec<f64> = (0..n)
            .map(|x| lanczos((x as f64 + xmin as f64 - center + 0.5) * inv))
            .collect();
        let total: f64 = k.iter().sum();
        if total != 0.0 {
            for w in &mut k {
                *w /= total;
            }
        }
        let one = f64::from(1u32 << PRECISION_BITS);
        let fixed = k
            .iter()
            .map(|&w| {
                if w < 0.0 {
                    (-0.5 + w * one) as i32
                } else {
                    (0.5 + w * one) as i32
                }
            })
            .collect();
        bounds.push((xmin, n));
        weights.push(fixed);
    }
    Coeffs { bounds, weights }
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

fn horizontal(src: &[u8], w: usize, h: usize, ch: usize, k: &Coeffs, out_w: usize) -> Vec<u8> {
    let round = 1i64 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; h * out_w * ch];
    for y in 0..h {
        let row = &src[y * w * ch..(y + 1) * w * ch];
        for (xx, ((xmin, n), kk)) in k.bounds.iter().zip(&k.weights).enumerate() {
            for c in 0..ch {
                let mut ss = round;
                for (x, &wt) in kk.iter().enumerate().take(*n) {
                    ss += i64::from(row[(x + xmin) * ch + c]) * i64::from(wt);
                }
                out[(y * out_w + xx) * ch + c] = clip8(ss);
            }
        }
    }
    out
}

fn vertical(src: &[u8], w: usize, ch: usize, k: &Coeffs, out_h: usize) -> Vec<u8> {
    let round = 1i64 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; out_h * w * ch];
    for (yy, ((ymin, n), kk)) in k.bounds.iter().zip(&k.weights).enumerate() {
        for x in 0..w {
            for c in 0..ch {
                let mut ss = round;
                for (y, &wt) in kk.iter().enumerate().take(*n) {
                    ss += i64::from(src[((y + ymin) * w + x) * ch + c]) * i64::from(wt);
                }
                out[(yy * w + x) * ch + c] = clip8(ss);
            }
        }
    }
    out
}

/// Resizes an interleaved 8-bit image of `channels` channels from `w` x `h` to
/// `out_w` x `out_h`. The same size returns a copy, as Pillow does. When both axes change,
/// the horizontal pass runs first unless the height shrinks by more than twice the width's
/// shrink (`h - out_h > 2 (w - out_w)`), as in Pillow 13 (older Pillow always ran the
/// horizontal pass first); the intermediate image is rounded to 8 bits either way.
pub fn resize_lanczos(
    pixels: &[u8],
    w: usize,
    h: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    if (w, h) == (out_w, out_h) {
        return pixels.to_vec();
    }
    if w == 0 || h == 0 || out_w == 0 || out_h == 0 {
        return vec![0; out_w * out_h * channels];
    }
    let need_h = out_w != w;
    let need_v = out_h != h;
    let (dy, dx) = (h as i64 - out_h as i64, w as i64 - out_w as i64);
    let vertical_first = need_h && need_v && dy > 0 && dy > 2 * dx;
    let horiz = coefficients(w, out_w);
    let vert = coefficients(h, out_h);
    if vertical_first {
        let tmp = vertical(pixels, w, channels, &vert, out_h);
        return horizontal(&tmp, w, out_h, channels, &horiz, out_w);
    }
    let tmp = if need_h {
        horizontal(pixels, w, h, channels, &horiz, out_w)
    } else {
        pixels.to_vec()
    };
    if need_v {
        vertical(&tmp, out_w, channels, &vert, out_h)
    } else {
        tmp
    }
}

/// Nearest-neighbour resizing as Pillow does it for "1" and "P" images: per axis the source
/// position starts at `scale / 2` and advances by repeated addition of `scale`.
pub fn resize_nearest(
    pixels: &[u8],
    w: usize,
    h: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    if (w, h) == (out_w, out_h) {
        return pixels.to_vec();
    }
    let index = |n_in: usize, n_out: usize| -> Vec<usize> {
        let a = n_in as f64 / n_out as f64;
        let mut pos = a * 0.5;
        (0..n_out)
            .map(|_| {
                let i = (pos as usize).min(n_in.saturating_sub(1));
                pos += a;
                i
            })
            .collect()
    };
    let xs = index(w, out_w);
    let ys = index(h, out_h);
    let mut out = Vec::with_capacity(out_w * out_h * channels);
    for &y in &ys {
        for &x in &xs {
            let at = (y * w + x) * channels;
            out.extend_from_slice(&pixels[at..at + channels]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_a_copy_and_flat_images_stay_flat() {
        let px: Vec<u8> = (0..4 * 3 * 3).map(|i| i as u8).collect();
        assert_eq!(resize_lanczos(&px, 4, 3, 3, 4, 3), px);
        let flat = vec![77u8; 10 * 7];
        let out = resize_lanczos(&flat, 10, 7, 1, 6, 4);
        assert_eq!(out.len(), 24);
        assert!(out.iter().all(|&v| v == 77));
        let up = resize_lanczos(&flat, 10, 7, 1, 23, 9);
        assert!(up.iter().all(|&v| v == 77));
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(100, 37), (37, 100), (64, 64 - 8), (9, 4)] {
            let c = coefficients(i, o);
            for k in &c.weights {
                let s: i64 = k.iter().map(|&v| i64::from(v)).sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{i}->{o}: {s}"
                );
            }
        }
    }
}
