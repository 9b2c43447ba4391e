//! Fuzz harnesses of the engine's input decoders (see the `sd-fuzz` crate for the mutations and
//! the budget; `scripts/fuzz.sh` runs them long). Every input must end in a value or an error:
//! no panic, no allocation over the harness's limit, and decoded sizes within the limits given.

use sd_engine::images::{input, jpeg};
use sd_fuzz::{fuzz, seeds, BoundedAlloc};

#[global_allocator]
static ALLOC: BoundedAlloc = BoundedAlloc;

const MAX_PIXELS: usize = 1 << 16;
const MAX_SIDE: usize = 1024;

#[test]
fn fuzz_jpeg_decoder() {
    let markers: &[&[u8]] = &[
        b"\xff\xd8",
        b"\xff\xc0",
        b"\xff\xc2",
        b"\xff\xc4",
        b"\xff\xda",
        b"\xff\xdb",
        b"\xff\xdd\x00\x04\x00\x01",
        b"\xff\xd0",
        b"\xff\xd9",
        b"\xff\x00",
        b"\xff\xff",
    ];
    fuzz("jpeg", &seeds("jpeg"), markers, |data| {
        if let Ok(img) = jpeg::decode(data, MAX_PIXELS) {
            assert!(img.width * img.height <= MAX_PIXELS);
            assert_eq!(img.pixels.len(), img.width * img.height * img.channels);
        }
    });
}

#[test]
fn fuzz_input_images() {
    let words: &[&[u8]] = &[
        b"IHDR",
        b"IDAT",
        b"IEND",
        b"PLTE",
        b"tRNS",
        b"acTL",
        b"RIFF",
        b"WEBP",
        b"VP8L",
        b"VP8 ",
        b"VP8X",
        b"ALPH",
        b"\xff\xd8\xff",
        b"\x89PNG\r\n\x1a\n",
    ];
    fuzz("input-image", &seeds("input-image"), words, |bytes| {
        if let Ok(img) = input::decode_rgb(bytes, MAX_PIXELS, MAX_SIDE) {
            assert!(img.width * img.height <= MAX_PIXELS);
            assert!(img.width <= MAX_SIDE && img.height <= MAX_SIDE);
            assert_eq!(img.pixels.len(), img.width * img.height * 3);
        }
        if let Ok(m) = input::decode_mask(bytes, MAX_PIXELS, MAX_SIDE) {
            assert_eq!(m.pixels.len(), m.width * m.height * m.channels);
        }
        if let Ok(Some(m)) = input::decode_alpha_mask(bytes, MAX_PIXELS, MAX_SIDE) {
            assert_eq!(m.pixels.len(), m.width * m.height * m.channels);
        }
        let _ = input::has_transparency(bytes, MAX_PIXELS, MAX_SIDE);
    });
}

#[test]
fn fuzz_base64_images() {
    let words: &[&[u8]] = &[
        b"data:",
        b";base64,",
        b"image/png",
        b"=",
        b"==",
        b"\n",
        b" ",
        b"%",
    ];
    fuzz("base64", &seeds("base64"), words, |bytes| {
        let text = String::from_utf8_lossy(bytes);
        if let Ok(raw) = input::decode_base64(&text) {
            let _ = input::decode_rgb(&raw, MAX_PIXELS, MAX_SIDE);
        }
    });
}
