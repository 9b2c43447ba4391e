//! Lanczos resizing equals Pillow's `Image.resize(size, Image.LANCZOS)` byte for byte.
//!
//! Expected bytes come from `scripts/make_resize_fixtures.py` (Pillow 13.0.0) on small random
//! RGB and grayscale images, down- and upscaled, square and not, with both pass orders of
//! Pillow 13; palette images take Pillow's nearest-neighbour path.

use std::path::Path;

use candle_core::Device;
use sd_models::pipelines::resize::{resize_lanczos, resize_nearest};

#[test]
fn resize_equals_pillow_lanczos() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resize/resize.safetensors");
    let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let bytes = |name: &str| -> (Vec<usize>, Vec<u8>) {
        let x = &t[name];
        (
            x.dims().to_vec(),
            x.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
        )
    };
    let mut checked = 0;
    for (src, channels) in [("src_rgb", 3), ("src_l", 1)] {
        let (dims, px) = bytes(src);
        let (h, w) = (dims[0], dims[1]);
        let prefix = if channels == 3 { "rgb_" } else { "l_" };
        for name in t.keys().filter(|k| k.starts_with(prefix)) {
            let (out_dims, want) = bytes(name);
            let (oh, ow) = (out_dims[0], out_dims[1]);
            let got = resize_lanczos(&px, w, h, channels, ow, oh);
            let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(diff, 0, "{name}: {diff} of {} bytes differ", want.len());
            checked += 1;
        }
    }
    assert_eq!(checked, 24);
}

#[test]
fn palette_images_resize_with_pillow_nearest() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resize/resize.safetensors");
    let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let src = &t["src_p"];
    let (h, w) = src.dims2().unwrap();
    let px = src.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let mut checked = 0;
    for name in t.keys().filter(|k| k.starts_with("nearest_")) {
        let (oh, ow) = t[name].dims2().unwrap();
        let want = t[name].flatten_all().unwrap().to_vec1::<u8>().unwrap();
        assert_eq!(resize_nearest(&px, w, h, 1, ow, oh), want, "{name}");
        checked += 1;
    }
    assert_eq!(checked, 4);
}
