//! `sd-worker serve` with the tiny SDXL folder: `/v1/info` describes it, a job gives diffusers'
//! image (`fixtures/reference/sdxl/`, from `scripts/make_sdxl_fixtures.py`; max 3 / mean 0.5
//! levels), the size and crop ids are job fields, and the A1111 API runs it.

mod common;

use common::{assert_images_close, b64decode, model, read_png, root, tmp, Server};
use serde_json::json;

fn reference_pixels(case: &str) -> Vec<u8> {
    let t = candle_core::safetensors::load(
        root().join(format!("fixtures/reference/sdxl/{case}.safetensors")),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    t["images"].flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn sdxl_jobs_match_diffusers_and_take_size_ids() {
    let server = Server::spawn(&model("tiny-sdxl"), &[]);
    server.wait_ready();
    let info = server.get("/v1/info").json();
    assert_eq!(info["model"]["family"], "sdxl");
    assert_eq!(info["model"]["variant"], "base");
    assert_eq!(info["defaults"]["guidance_scale"], 5.0);

    // xl-euler-cfg: no negative prompt (zeros, force_zeros_for_empty_prompt), Euler.
    let id = server.submit(&json!({
        "operation": "image_generation", "prompt": "a photo of a cat", "steps": 6,
        "seed": 0, "width": 32, "height": 32
    }));
    let status = server.wait_final(&id);
    assert_eq!(status["state"], "completed", "{status}");
    let events = server.events(&id);
    let (_, done) = events.iter().find(|(n, _)| n == "complete").unwrap();
    let file = tmp("sdxl-job.png");
    std::fs::write(&file, b64decode(done["image"].as_str().unwrap())).unwrap();
    let (w, h, pixels, _) = read_png(&file);
    assert_eq!((w, h), (32, 32));
    assert_images_close("xl-euler-cfg", &pixels, &reference_pixels("xl-euler-cfg"));

    // xl-euler-negative-micro: negative prompt and size ids.
    let id = server.submit(&json!({
        "operation": "image_generation", "prompt": "a blue sky", "negative_prompt": "a cat",
        "steps": 5, "guidance_scale": 6, "seed": 11, "width": 32, "height": 32,
        "original_size": [128, 128], "negative_original_size": [16, 24],
        "negative_crops_coords_top_left": [2, 3], "negative_target_size": [32, 32]
    }));
    assert_eq!(server.wait_final(&id)["state"], "completed");
    let events = server.events(&id);
    let (_, done) = events.iter().find(|(n, _)| n == "complete").unwrap();
    std::fs::write(&file, b64decode(done["image"].as_str().unwrap())).unwrap();
    let (_, _, pixels, _) = read_png(&file);
    assert_images_close(
        "xl-euler-negative-micro",
        &pixels,
        &reference_pixels("xl-euler-negative-micro"),
    );

    for (body, field) in [
        (json!({"original_size": [1024]}), "original_size"),
        (
            json!({"crops_coords_top_left": [-1, 0]}),
            "crops_coords_top_left",
        ),
        (json!({"target_size": [0, 64]}), "target_size"),
        (json!({"aesthetic_score": 6.0}), "aesthetic_score"),
    ] {
        let mut job = json!({"operation": "image_generation", "prompt": "a"});
        for (k, v) in body.as_object().unwrap() {
            job[k] = v.clone();
        }
        let r = server.post_json("/v1/jobs", &job);
        assert_eq!(r.status, 422, "{}", r.text());
        let (_, message) = r.error();
        assert!(message.contains(&format!("`{field}`")), "{message}");
    }

    // The A1111 API (its prompt syntax on SDXL; an empty negative prompt gives zeros).
    let r = server.post_json(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a (red:1.2) chair", "steps": 2, "width": 32, "height": 32, "seed": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let image = b64decode(r.json()["images"][0].as_str().unwrap());
    std::fs::write(&file, image).unwrap();
    assert_eq!(read_png(&file).0, 32);
}

/// `generate` takes the size ids as flags and gives the same image as diffusers; a malformed
/// pair is a one-line error naming the flag.
#[test]
fn generate_takes_size_ids_as_flags() {
    let out = tmp("sdxl-cli.png");
    let args: Vec<String> = [
        "generate",
        "--model",
        &model("tiny-sdxl"),
        "--prompt",
        "a blue sky",
        "--negative-prompt",
        "a cat",
        "--steps",
        "5",
        "--guidance",
        "6",
        "--seed",
        "11",
        "--width",
        "32",
        "--height",
        "32",
        "--original-size",
        "128,128",
        "--negative-original-size",
        "16,24",
        "--negative-crops-coords-top-left",
        "2,3",
        "--negative-target-size",
        "32,32",
        "--output",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = common::sd_worker(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, _, pixels, _) = read_png(&out);
    assert_images_close(
        "xl-euler-negative-micro",
        &pixels,
        &reference_pixels("xl-euler-negative-micro"),
    );

    // Tiles as large as the image: the same image.
    let mut tiled = args.clone();
    tiled.extend(["--vae-tile-size".to_string(), "64".to_string()]);
    let o = common::sd_worker(&tiled);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_png(&out).2, pixels);
    let mut bad_tile = args.clone();
    bad_tile.extend(["--vae-tile-size".to_string(), "60".to_string()]);
    let o = common::sd_worker(&bad_tile);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--vae-tile-size 60"), "{err}");

    let mut bad = args.clone();
    let i = bad.iter().position(|a| a == "128,128").unwrap();
    bad[i] = "128".into();
    let o = common::sd_worker(&bad);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--original-size"), "{err}");
}
