//! Cheap previews: latents to RGB without the VAE.
//!
//! For the 4-channel Stable Diffusion latent space a fixed linear map from the four latent
//! channels to RGB gives a recognisable, blurry picture at latent resolution (one pixel per
//! latent). Other channel counts fall back to a grey image of the channel mean.

use candle_core::{DType, Tensor};

use super::sd::{to_rgb8, RgbImage};
use crate::Result;

/// Least-squares fit of the SD 1.x / 2.x VAE's decoded RGB (in [-1, 1]) from the four
/// latent channels, one row per latent channel; widely used for live previews.
const SD_LATENT_RGB: [[f32; 3]; 4] = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
];

/// Approximate RGB images of `latents` (batch, channels, h, w) at latent resolution.
pub fn latent_preview(latents: &Tensor) -> Result<Vec<RgbImage>> {
    let latents = latents.to_dtype(DType::F32)?;
    let (b, c, h, w) = latents.dims4()?;
    let rgb = if c == 4 {
        let coeffs: Vec<f32> = SD_LATENT_RGB
            .iter()
            .flat_map(|row| row.iter().copied())
            .collect();
        // (3, 4) x (b, 4, h*w) -> (b, 3, h*w)
        let m = Tensor::from_vec(coeffs, (4, 3), latents.device())?
            .t()?
            .contiguous()?
            .unsqueeze(0)?
            .broadcast_as((b, 3, 4))?
            .contiguous()?;
        m.matmul(&latents.reshape((b, 4, h * w))?)?
            .reshape((b, 3, h, w))?
    } else {
        let grey = latents.mean_keepdim(1)?;
        grey.broadcast_as((b, 3, h, w))?.contiguous()?
    };
    to_rgb8(&rgb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn four_channels_use_the_linear_map() {
        // One pixel with latent (1, 0, 0, 0) maps to the first row of the matrix.
        let mut data = vec![0f32; 4 * 2];
        data[0] = 1.0; // channel 0, pixel 0
        data[2 * 3 + 1] = 1.0; // channel 3, pixel 1
        let t = Tensor::from_vec(data, (1, 4, 1, 2), &Device::Cpu).unwrap();
        let img = &latent_preview(&t).unwrap()[0];
        assert_eq!((img.width, img.height), (2, 1));
        let level = |v: f32| ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8;
        let expected: Vec<u8> = SD_LATENT_RGB[0]
            .iter()
            .chain(SD_LATENT_RGB[3].iter())
            .map(|&v| level(v))
            .collect();
        assert_eq!(img.pixels, expected);
    }

    #[test]
    fn other_channel_counts_are_grey() {
        let t = Tensor::from_vec(vec![1f32, -1.0, 0.5, 0.5], (2, 2, 1, 1), &Device::Cpu).unwrap();
        let imgs = latent_preview(&t).unwrap();
        assert_eq!(imgs.len(), 2);
        assert_eq!(imgs[0].pixels, vec![128, 128, 128]);
        assert_eq!(imgs[1].pixels, vec![191, 191, 191]);
    }
}
