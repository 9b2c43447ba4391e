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

/// Resizes an interleaved 8-bit image of `channels` channels from `w` x `h` to
/// `out_w` x `out_h`. The same size returns a copy, as Pillow does.
pub fn resize_lanczos(
    pixels: &[u8],
    w: usize,
    h: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    if (w, h) == (out_w, out_h) || w == 0 || h == 0 || out_w == 0 || out_h == 0 {
        return if (w, h) == (out_w, out_h) {
            pixels.to_vec()
        } else {
            vec![0; out_w * out_h * channels]
        };
    }
    let horiz = coefficients(w, out_w);
    let vert = coefficients(h, out_h);
    // Only the source rows some output row reads are resized horizontally.
    let first_row = vert.bounds[0].0;
    let last_row = vert.bounds[out_h - 1].0 + vert.bounds[out_h - 1].1;
    let round = 1i64 << (PRECISION_BITS - 1);

    let (mid, mid_w, row0) = if out_w != w {
        let rows = last_row - first_row;
        let mut mid = vec![0u8; rows * out_w * channels];
        for y in 0..rows {
            let src = &pixels[(y + first_row) * w * channels..(y + first_row + 1) * w * channels];
            for (xx, ((xmin, n), k)) in horiz.bounds.iter().zip(&horiz.weights).enumerate() {
                for c in 0..channels {
                    let mut ss = round;
                    for x in 0..*n {
                        ss += i64::from(src[(x + xmin) * channels + c]) * i64::from(k[x]);
                    }
                    mid[(y * out_w + xx) * channels + c] = clip8(ss);
                }
            }
        }
        (mid, out_w, first_row)
    } else {
        (pixels.to_vec(), w, 0)
    };
    if out_h == h {
        return mid;
    }
    let mut out = vec![0u8; out_h * mid_w * channels];
    for (yy, ((ymin, n), k)) in vert.bounds.iter().zip(&vert.weights).enumerate() {
        let ymin = ymin - row0;
        for x in 0..mid_w {
            for c in 0..channels {
                let mut ss = round;
                for y in 0..*n {
                    ss += i64::from(mid[((y + ymin) * mid_w + x) * channels + c]) * i64::from(k[y]);
                }
                out[(yy * mid_w + x) * channels + c] = clip8(ss);
            }
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
