//! Input images for image-to-image and inpainting: base64 or `data:` URLs, PNG, JPEG or WebP,
//! size-checked from the header before any pixel is decoded.

use std::io::Cursor;

use base64::Engine as _;
use image::{ImageFormat, ImageReader};
use sd_models::pipelines::{MaskImage, RgbImage};

/// Why an input image was refused; the message names no field (the caller adds it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageError(pub String);

impl std::fmt::Display for ImageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(message: impl Into<String>) -> ImageError {
    ImageError(message.into())
}

/// The bytes of a base64 string or a `data:<mime>;base64,<data>` URL.
pub fn decode_base64(text: &str) -> Result<Vec<u8>, ImageError> {
    let text = text.trim();
    let payload = if let Some(rest) = text.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| err("is a data: URL without a comma before its data"))?;
        if !meta.ends_with(";base64") {
            return Err(err(format!(
                "is a data: URL that is not base64 (\"data:{meta},...\")"
            )));
        }
        data
    } else {
        text
    };
    let cleaned: String = payload.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(cleaned.as_bytes()))
        .map_err(|e| err(format!("is not valid base64: {e}")))
}

fn sniff(bytes: &[u8]) -> Result<ImageFormat, ImageError> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Ok(ImageFormat::Png)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Ok(ImageFormat::Jpeg)
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Ok(ImageFormat::WebP)
    } else if bytes.is_empty() {
        Err(err("is empty"))
    } else {
        Err(err(
            "is not a PNG, JPEG or WebP image (unrecognised header)",
        ))
    }
}

/// Decodes an image, refusing it from its header alone when it has more than `max_pixels`
/// pixels or a side over `max_side` (decompression bombs never reach the decoder).
fn decode(
    bytes: &[u8],
    max_pixels: usize,
    max_side: usize,
) -> Result<image::DynamicImage, ImageError> {
    let format = sniff(bytes)?;
    let name = format!("{format:?}").to_uppercase();
    let reader = ImageReader::with_format(Cursor::new(bytes), format);
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| err(format!("is not a readable {name} image: {e}")))?;
    let (w, h) = (w as usize, h as usize);
    if w == 0 || h == 0 {
        return Err(err(format!("has no pixels ({w}x{h})")));
    }
    if w > max_side || h > max_side || w.saturating_mul(h) > max_pixels {
        return Err(err(format!(
            "is {w}x{h} = {} pixels, over this worker's limit of {max_pixels} pixels (and {max_side} per side) for input images",
            w.saturating_mul(h)
        )));
    }
    if format == ImageFormat::Jpeg {
        // Our decoder, equal to Pillow's libjpeg-turbo pixels.
        let d = super::jpeg::decode(bytes, max_pixels)
            .map_err(|e| err(format!("is not a readable JPEG image: {e}")))?;
        let (w, h) = (d.width as u32, d.height as u32);
        let image = if d.channels == 1 {
            image::GrayImage::from_raw(w, h, d.pixels).map(image::DynamicImage::ImageLuma8)
        } else {
            image::RgbImage::from_raw(w, h, d.pixels).map(image::DynamicImage::ImageRgb8)
        };
        return image.ok_or_else(|| err("is not a readable JPEG image"));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w as u32);
    limits.max_image_height = Some(h as u32);
    // RGBA at 16 bits per channel, with room for the decoder's own buffers.
    limits.max_alloc = Some((w * h * 8 * 2 + (1 << 20)) as u64);
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| err(format!("is not a readable {name} image: {e}")))
}

/// An RGB image: grayscale is expanded, alpha is dropped (not composited), 16-bit channels
/// are reduced to 8 bits.
pub fn decode_rgb(
    bytes: &[u8],
    max_pixels: usize,
    max_side: usize,
) -> Result<RgbImage, ImageError> {
    let img = decode(bytes, max_pixels, max_side)?.into_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    Ok(RgbImage {
        width: w,
        height: h,
        pixels: img.into_raw(),
    })
}

/// Whether the image has an alpha channel with any pixel not fully opaque (checked from the
/// header for its size first, as every decode here).
pub fn has_transparency(
    bytes: &[u8],
    max_pixels: usize,
    max_side: usize,
) -> Result<bool, ImageError> {
    let img = decode(bytes, max_pixels, max_side)?;
    if !img.color().has_alpha() {
        return Ok(false);
    }
    Ok(img.into_rgba8().pixels().any(|p| p.0[3] != 255))
}

/// The mask of an image's transparency (OpenAI's convention): its fully transparent pixels
/// (alpha 0) are the area to repaint (255), every other pixel is kept (0). `None` when the
/// image has no alpha channel.
pub fn decode_alpha_mask(
    bytes: &[u8],
    max_pixels: usize,
    max_side: usize,
) -> Result<Option<MaskImage>, ImageError> {
    let img = decode(bytes, max_pixels, max_side)?;
    if !img.color().has_alpha() {
        return Ok(None);
    }
    let rgba = img.into_rgba8();
    let (w, h) = (rgba.width() as usize, rgba.height() as usize);
    let pixels = rgba
        .pixels()
        .map(|p| if p.0[3] == 0 { 255 } else { 0 })
        .collect();
    Ok(Some(MaskImage {
        width: w,
        height: h,
        channels: 1,
        pixels,
        nearest: false,
    }))
}

/// A mask as diffusers' mask processor reads it with Pillow: grayscale stays one channel,
/// colour stays RGB (converted to luma after resizing), alpha is dropped, 16-bit channels are
/// reduced to 8 bits. PNG palette and 1-bit images are marked for nearest-neighbour resizing,
/// as Pillow resizes "P" and "1" images.
pub fn decode_mask(
    bytes: &[u8],
    max_pixels: usize,
    max_side: usize,
) -> Result<MaskImage, ImageError> {
    let nearest = sniff(bytes)? == ImageFormat::Png && {
        let decoder = png::Decoder::new(Cursor::new(bytes));
        match decoder.read_info() {
            Ok(reader) => {
                let info = reader.info();
                info.color_type == png::ColorType::Indexed
                    || (info.color_type == png::ColorType::Grayscale
                        && info.bit_depth == png::BitDepth::One)
            }
            Err(_) => false,
        }
    };
    let img = decode(bytes, max_pixels, max_side)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (channels, pixels) = match img {
        image::DynamicImage::ImageLuma8(g) => (1, g.into_raw()),
        image::DynamicImage::ImageLumaA8(_)
        | image::DynamicImage::ImageLuma16(_)
        | image::DynamicImage::ImageLumaA16(_) => (1, img.into_luma8().into_raw()),
        other => (3, other.into_rgb8().into_raw()),
    };
    Ok(MaskImage {
        width: w,
        height: h,
        channels,
        pixels,
        nearest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32, color: png::ColorType, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(color);
            enc.set_depth(png::BitDepth::Eight);
            let mut wr = enc.write_header().unwrap();
            wr.write_image_data(data).unwrap();
        }
        out
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn base64_and_data_urls() {
        assert_eq!(decode_base64("aGk=").unwrap(), b"hi");
        assert_eq!(decode_base64("data:image/png;base64,aGk=").unwrap(), b"hi");
        assert_eq!(decode_base64("aGk").unwrap(), b"hi");
        assert!(decode_base64("data:image/png,hi").is_err());
        assert!(decode_base64("***").is_err());
    }

    #[test]
    fn gray_and_rgba_inputs_become_rgb() {
        let g = png(2, 1, png::ColorType::Grayscale, &[10, 200]);
        let img = decode_rgb(&g, 100, 100).unwrap();
        assert_eq!(img.pixels, vec![10, 10, 10, 200, 200, 200]);
        let rgba = png(1, 1, png::ColorType::Rgba, &[1, 2, 3, 0]);
        assert_eq!(decode_rgb(&rgba, 100, 100).unwrap().pixels, vec![1, 2, 3]);
        let rgb = png(1, 1, png::ColorType::Rgb, &[255, 0, 0]);
        let m = decode_mask(&rgb, 100, 100).unwrap();
        assert_eq!(
            (m.channels, m.pixels, m.nearest),
            (3, vec![255, 0, 0], false)
        );
        let m = decode_mask(&g, 100, 100).unwrap();
        assert_eq!((m.channels, m.pixels, m.nearest), (1, vec![10, 200], false));
        let la = png(1, 1, png::ColorType::GrayscaleAlpha, &[9, 0]);
        assert_eq!(decode_mask(&la, 100, 100).unwrap().pixels, vec![9]);
    }

    #[test]
    fn palette_and_one_bit_masks_resize_nearest() {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, 2, 1);
            enc.set_color(png::ColorType::Indexed);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_palette(vec![0, 0, 0, 255, 255, 255]);
            let mut wr = enc.write_header().unwrap();
            wr.write_image_data(&[1, 0]).unwrap();
        }
        let m = decode_mask(&out, 100, 100).unwrap();
        assert!(m.nearest);
        assert_eq!((m.channels, m.pixels), (3, vec![255, 255, 255, 0, 0, 0]));
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, 8, 1);
            enc.set_color(png::ColorType::Grayscale);
            enc.set_depth(png::BitDepth::One);
            let mut wr = enc.write_header().unwrap();
            wr.write_image_data(&[0b1010_0000]).unwrap();
        }
        let m = decode_mask(&out, 100, 100).unwrap();
        assert!(m.nearest);
        assert_eq!(m.pixels, vec![255, 0, 255, 0, 0, 0, 0, 0]);
    }

    /// Lossy and lossless WebP files decode to Pillow's (libwebp 1.6.0) pixels; from
    /// `scripts/make_jpeg_fixtures.py`.
    #[test]
    fn webp_pixels_equal_pillow() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/webp.safetensors");
        let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
        let mut n = 0;
        for name in t.keys().filter(|k| k.ends_with(".webp")) {
            let data = t[name].to_vec1::<u8>().unwrap();
            let want = t[&name.replace(".webp", ".rgb")]
                .flatten_all()
                .unwrap()
                .to_vec1::<u8>()
                .unwrap();
            let got = decode_rgb(&data, 1 << 20, 4096).unwrap();
            assert_eq!(got.pixels, want, "{name}");
            n += 1;
        }
        assert_eq!(n, 3);
    }

    #[test]
    fn jpeg_and_webp_decode() {
        let rgb: Vec<u8> = (0..16 * 8 * 3).map(|i| (i * 7 % 256) as u8).collect();
        let img = image::RgbImage::from_raw(16, 8, rgb.clone()).unwrap();
        let mut webp = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
            .encode(&rgb, 16, 8, image::ExtendedColorType::Rgb8)
            .unwrap();
        let got = decode_rgb(&webp, 1000, 100).unwrap();
        assert_eq!((got.width, got.height), (16, 8));
        assert_eq!(got.pixels, rgb, "lossless WebP round trip");
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .encode_image(&img)
            .unwrap();
        let got = decode_rgb(&jpeg, 1000, 100).unwrap();
        assert_eq!(
            (got.width, got.height, got.pixels.len()),
            (16, 8, rgb.len())
        );
        let m = decode_mask(&jpeg, 1000, 100).unwrap();
        assert_eq!((m.channels, m.nearest), (3, false));
        assert!(decode_rgb(&jpeg, 100, 100)
            .unwrap_err()
            .0
            .contains("16x8 = 128 pixels"));
    }

    #[test]
    fn bombs_and_garbage_are_refused_before_decoding() {
        // A PNG header claiming 100000 x 100000 pixels with no data.
        let mut bomb = png(1, 1, png::ColorType::Rgb, &[0, 0, 0]);
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        // The IHDR chunk's CRC covers its type and data (bytes 12..29).
        let crc = crc32(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = decode_rgb(&bomb, 1 << 20, 8192).unwrap_err();
        assert!(e.0.contains("100000x100000"), "{e}");
        assert!(decode_rgb(b"GIF89a....", 100, 100)
            .unwrap_err()
            .0
            .contains("PNG, JPEG or WebP"));
        assert!(decode_rgb(b"\x89PNG\r\n\x1a\nbroken", 100, 100).is_err());
    }
}
