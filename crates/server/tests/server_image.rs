//! `image_transform` and `image_inpaint` over HTTP with the tiny models: results equal to
//! `sd-worker generate --init-image [--mask]` byte for byte, and every bad image input gets
//! a 4xx naming its field while the worker carries on.

mod common;

use std::path::PathBuf;
use std::process::Command;

use base64::Engine as _;
use common::{b64decode, model, root, Server};
use serde_json::{json, Value};

fn input(name: &str) -> PathBuf {
    root().join("fixtures/inputs").join(name)
}

fn b64_file(name: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(input(name)).unwrap())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

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

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-worker-serve-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Runs a job to its end over SSE and returns the `complete` event.
fn complete(server: &Server, body: &Value) -> Value {
    let id = server.submit(body);
    let events = server.events(&id);
    let (name, data) = events.last().unwrap().clone();
    assert_eq!(name, "complete", "{events:?}");
    data
}

fn cli(args: &[&str], out: &PathBuf) -> Vec<u8> {
    let o = Command::new(env!("CARGO_BIN_EXE_sd-worker"))
        .args(args)
        .arg("--output")
        .arg(out)
        .env_clear()
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A batch writes NAME-i.png instead.
    std::fs::read(out).unwrap_or_default()
}

#[test]
fn image_transform_and_inpaint_equal_the_cli() {
    let server = Server::start(&[]);
    // Image-to-image of an input whose size is not a multiple of the latent factor.
    let data = complete(
        &server,
        &json!({"operation": "image_transform", "prompt": "green trees", "steps": 8,
                "strength": 0.6, "seed": 3, "scheduler": "ddim",
                "input_image": b64_file("odd37x29.png")}),
    );
    assert_eq!(data["operation"], "image_transform");
    assert_eq!(data["inpaint_method"], Value::Null);
    let image = b64decode(data["image"].as_str().unwrap());
    let tiny = model("tiny-sd1");
    let odd = input("odd37x29.png").display().to_string();
    let want = cli(
        &[
            "generate",
            "--model",
            &tiny,
            "--prompt",
            "green trees",
            "--steps",
            "8",
            "--strength",
            "0.6",
            "--seed",
            "3",
            "--scheduler",
            "ddim",
            "--init-image",
            &odd,
        ],
        &tmp("i2i.png"),
    );
    assert_eq!(image, want, "image_transform differs from the CLI");

    // Inpainting with a data: URL image and a mask of another size.
    let data = complete(
        &server,
        &json!({"operation": "image_inpaint", "prompt": "a blue sky", "steps": 10,
                "strength": 0.7, "seed": 4, "scheduler": "euler-a", "batch": 2,
                "negative_prompt": "dark",
                "init_image": format!("data:image/png;base64,{}", b64_file("square32.png")),
                "mask_image": b64_file("mask-l20x28.png")}),
    );
    assert_eq!(data["operation"], "image_inpaint");
    assert_eq!(data["inpaint_method"], "latent-blend");
    let square = input("square32.png").display().to_string();
    let mask = input("mask-l20x28.png").display().to_string();
    let out = tmp("inp.png");
    cli(
        &[
            "generate",
            "--model",
            &tiny,
            "--prompt",
            "a blue sky",
            "--steps",
            "10",
            "--strength",
            "0.7",
            "--seed",
            "4",
            "--scheduler",
            "euler-a",
            "--batch",
            "2",
            "--negative-prompt",
            "dark",
            "--init-image",
            &square,
            "--mask",
            &mask,
        ],
        &out,
    );
    for i in 0..2 {
        let want = std::fs::read(out.with_file_name(format!("inp-{i}.png"))).unwrap();
        assert_eq!(
            b64decode(data["images"][i].as_str().unwrap()),
            want,
            "image {i}"
        );
    }
}

#[test]
fn bad_image_inputs_get_4xx_naming_the_field() {
    let server = Server::start(&["--max-input-pixels", "10000"]);
    let square = b64_file("square32.png");
    let mask = b64_file("mask-rgb32.png");
    let transform = |extra: Value| {
        let mut v = json!({"operation": "image_transform", "prompt": "a", "steps": 4,
                           "input_image": square});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let inpaint = |extra: Value| {
        let mut v = json!({"operation": "image_inpaint", "prompt": "a", "steps": 4,
                           "init_image": square, "mask_image": mask});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    // A PNG whose header claims 100000 x 100000 pixels.
    let mut bomb = png(1, 1, png::ColorType::Rgb, &[0, 0, 0]);
    bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = {
        let mut c = 0xFFFF_FFFFu32;
        for &b in &bomb[12..29] {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
            }
        }
        !c
    };
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    let big = png(120, 100, png::ColorType::Rgb, &vec![7; 120 * 100 * 3]);
    let truncated = std::fs::read(input("square32.png")).unwrap()[..60].to_vec();
    let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();
    let cases: Vec<(Value, &str, Vec<&str>)> = vec![
        (
            json!({"operation": "image_transform", "prompt": "a"}),
            "input_image",
            vec!["required"],
        ),
        (
            transform(json!({"input_image": 5})),
            "input_image",
            vec!["base64 string", "5"],
        ),
        (
            transform(json!({"input_image": "%%%"})),
            "input_image",
            vec!["not valid base64"],
        ),
        (
            transform(json!({"input_image": b64(&gif)})),
            "input_image",
            vec!["PNG, JPEG or WebP"],
        ),
        (
            transform(json!({"input_image": b64(&truncated)})),
            "input_image",
            vec!["not a readable PNG"],
        ),
        (
            transform(json!({"input_image": b64(&bomb)})),
            "input_image",
            vec!["100000x100000", "10000"],
        ),
        (
            transform(json!({"input_image": b64(&big)})),
            "input_image",
            vec!["120x100", "12000", "10000"],
        ),
        (
            transform(json!({"strength": 0})),
            "strength",
            vec!["(0, 1]", "0"],
        ),
        (
            transform(json!({"strength": 1.5})),
            "strength",
            vec!["(0, 1]", "1.5"],
        ),
        (
            transform(json!({"strength": 0.1})),
            "strength",
            vec!["no step", "0.1"],
        ),
        (
            transform(json!({"strength": "high"})),
            "strength",
            vec!["number", "high"],
        ),
        (
            transform(json!({"mask_image": mask})),
            "mask_image",
            vec!["unknown field"],
        ),
        (
            json!({"operation": "image_inpaint", "prompt": "a", "init_image": square}),
            "mask_image",
            vec!["required"],
        ),
        (
            inpaint(json!({"mask_image": b64(&gif)})),
            "mask_image",
            vec!["PNG, JPEG or WebP"],
        ),
        (
            inpaint(json!({"init_image": b64(&bomb)})),
            "init_image",
            vec!["100000x100000"],
        ),
        (
            inpaint(json!({"input_image": square})),
            "input_image",
            vec!["unknown field"],
        ),
    ];
    for (body, field, needles) in cases {
        let r = server.post_json("/v1/jobs", &body);
        assert_eq!(r.status, 422, "{field}: {}", r.text());
        let (kind, message) = r.error();
        assert_eq!(kind, "invalid_request");
        assert!(message.contains(&format!("`{field}`")), "{message}");
        for n in needles {
            assert!(message.contains(n), "{field}: {message:?} lacks {n:?}");
        }
    }
    // Converted, not refused: grayscale and RGBA inputs, a mask of another size.
    let gray = png(32, 32, png::ColorType::Grayscale, &[90; 32 * 32]);
    let rgba = png(32, 32, png::ColorType::Rgba, &[200; 32 * 32 * 4]);
    let small_mask = png(8, 8, png::ColorType::Grayscale, &[255; 64]);
    // JPEG and WebP inputs.
    let rgb: Vec<u8> = (0..32 * 32 * 3).map(|i| (i * 5 % 256) as u8).collect();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode(&rgb, 32, 32, image::ExtendedColorType::Rgb8)
        .unwrap();
    let mut webp = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
        .encode(&rgb, 32, 32, image::ExtendedColorType::Rgb8)
        .unwrap();
    for body in [
        transform(json!({"input_image": b64(&gray)})),
        transform(json!({"input_image": b64(&rgba)})),
        inpaint(json!({"mask_image": b64(&small_mask)})),
        transform(json!({"input_image": format!("data:image/jpeg;base64,{}", b64(&jpeg))})),
        inpaint(json!({"init_image": b64(&webp), "mask_image": b64(&jpeg)})),
    ] {
        let data = complete(&server, &body);
        assert_eq!(data["format"], "png");
    }
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn an_inpainting_model_serves_image_inpaint_only() {
    let tiny = model("tiny-sd1-inpaint");
    let server = Server::spawn(&tiny, &[]);
    server.wait_ready();
    let info = server.get("/v1/info").json();
    assert_eq!(info["capabilities"]["operations"], json!(["image_inpaint"]));
    assert_eq!(info["capabilities"]["inpaint_method"], "inpaint-unet");
    let r = server.post_json(
        "/v1/jobs",
        &json!({"operation": "image_generation", "prompt": "a"}),
    );
    assert_eq!(r.status, 422);
    assert!(r.error().1.contains("`operation`") && r.error().1.contains("inpainting model"));
    let data = complete(
        &server,
        &json!({"operation": "image_inpaint", "prompt": "a photo of a cat", "steps": 9,
                "seed": 1, "init_image": b64_file("odd37x29.png"),
                "mask_image": b64_file("mask-rgb37x29.png")}),
    );
    assert_eq!(data["inpaint_method"], "inpaint-unet");
    let odd = input("odd37x29.png").display().to_string();
    let mask = input("mask-rgb37x29.png").display().to_string();
    let want = cli(
        &[
            "generate",
            "--model",
            &tiny,
            "--prompt",
            "a photo of a cat",
            "--steps",
            "9",
            "--seed",
            "1",
            "--init-image",
            &odd,
            "--mask",
            &mask,
        ],
        &tmp("inp9.png"),
    );
    assert_eq!(b64decode(data["image"].as_str().unwrap()), want);
}
