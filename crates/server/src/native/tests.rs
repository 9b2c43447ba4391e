//! The native body reader with validation: defaults, every field read, errors that name the
//! field, the limit and the value.

use super::*;
use sd_engine::validate::{hub_repo_id, names_model};
use sd_models::samplers::SamplerKind;
use serde_json::json;
use std::path::Path;

fn spec() -> ModelSpec {
    ModelSpec {
        repo_id: Some("org/tiny".into()),
        ..ModelSpec::sd_example()
    }
}

fn limits() -> Limits {
    Limits {
        max_pixels: 1024 * 1024,
        max_input_pixels: 4096 * 4096,
        max_steps: 150,
        max_batch: 8,
        loras: sd_engine::validate::LoraFiles::Refused,
        from_flags: true,
        empty_prompt: false,
    }
}

fn parse(v: Value) -> Result<GenerationRequest> {
    parse_job(&v, &spec(), &limits(), 7)
}

fn err(v: Value) -> String {
    let e = parse(v).unwrap_err();
    assert!(!e.malformed);
    e.message
}

#[test]
fn defaults_come_from_the_model() {
    let r = parse(json!({"operation": "image_generation", "prompt": "a cat"})).unwrap();
    let p = &r.params;
    assert_eq!((p.width, p.height, p.steps, p.batch), (512, 512, 50, 1));
    assert_eq!(p.guidance, 7.5);
    assert_eq!(p.seed, 7);
    assert_eq!(p.sampler, SamplerKind::Pndm);
    assert_eq!(r.preview_every, 5);
    assert_eq!(r.preview, PreviewKind::Approx);
    let r =
        parse(json!({"operation": "image_generation", "prompt": "a", "seed": -1, "width": null}))
            .unwrap();
    assert_eq!((r.params.seed, r.params.width), (7, 512));
}

#[test]
fn every_field_is_read() {
    let r = parse(json!({
        "operation": "image_generation", "prompt": "a", "negative_prompt": "b",
        "width": 256, "height": 128, "steps": 20, "guidance_scale": 3, "seed": 42,
        "scheduler": "euler-a", "batch": 2, "preview_every": 0, "preview": "full",
        "hive_id": "h", "worker_id": "w", "model": "tiny"
    }))
    .unwrap();
    let p = &r.params;
    assert_eq!(p.negative_prompt.as_deref(), Some("b"));
    assert_eq!(
        (p.width, p.height, p.steps, p.batch, p.seed),
        (256, 128, 20, 2, 42)
    );
    assert_eq!(p.guidance, 3.0);
    assert_eq!(p.sampler, SamplerKind::EulerAncestral);
    assert_eq!((r.preview_every, r.preview), (0, PreviewKind::Full));
    assert_eq!(
        (r.hive_id.as_deref(), r.worker_id.as_deref()),
        (Some("h"), Some("w"))
    );
}

#[test]
fn errors_name_the_field_the_limit_and_the_value() {
    let base = |extra: Value| {
        let mut v = json!({"operation": "image_generation", "prompt": "a"});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let cases = [
        (json!({"width": 100}), ["`width`", "multiple of 8", "100"]),
        (
            json!({"width": 2048, "height": 2048}),
            ["`width`", "1048576", "4194304"],
        ),
        (json!({"steps": 0}), ["`steps`", "150", "0"]),
        (json!({"steps": 151}), ["`steps`", "150", "151"]),
        (
            json!({"guidance_scale": 101}),
            ["`guidance_scale`", "100", "101"],
        ),
        (json!({"batch": 9}), ["`batch`", "8", "9"]),
        (
            json!({"scheduler": "dpm-fast"}),
            ["`scheduler`", "euler", "dpm-fast"],
        ),
        (
            json!({"sampler": "euler", "schedule": "cosine"}),
            ["`schedule`", "karras", "cosine"],
        ),
        (
            json!({"sampler": "euler-a", "schedule": "karras"}),
            ["`schedule`", "euler-a", "karras"],
        ),
        (
            json!({"sampler": "euler", "scheduler": "euler"}),
            ["`scheduler`", "either", "`sampler`"],
        ),
        (
            json!({"sampler": "DPM++ 2M Karras", "schedule": "beta"}),
            ["`schedule`", "contradicts", "beta"],
        ),
        (
            json!({"sampler": "euler", "eta": 0.5}),
            ["`eta`", "euler", "ddim"],
        ),
        (
            json!({"sampler": "ddim", "eta": 2}),
            ["`eta`", "between 0 and 1", "2"],
        ),
        (
            json!({"sampler": "euler", "s_noise": 0.5}),
            ["`s_noise`", "euler", "dpmpp-sde"],
        ),
        (
            json!({"sampler": "dpmpp-sde", "s_noise": -1}),
            ["`s_noise`", "between 0 and 2", "-1"],
        ),
        (json!({"prompt": "  "}), ["`prompt`", "empty", ""]),
        (json!({"foo": 1}), ["`foo`", "unknown field", "prompt"]),
        (json!({"width": "512"}), ["`width`", "integer", "\"512\""]),
        (json!({"seed": 1.5}), ["`seed`", "integer", "1.5"]),
        (json!({"model": "other"}), ["`model`", "tiny", "other"]),
        (json!({"preview": "vae"}), ["`preview`", "full", "vae"]),
        (
            json!({"operation": "image_inpaint"}),
            ["`init_image`", "required", "base64"],
        ),
        (
            json!({"operation": "paint"}),
            ["`operation`", "image_generation", "paint"],
        ),
    ];
    for (extra, needles) in cases {
        let message = err(base(extra.clone()));
        for n in needles {
            assert!(message.contains(n), "{extra}: {message:?} lacks {n:?}");
        }
    }
    assert!(err(json!({"prompt": "a"})).contains("`operation`"));
    assert!(err(json!({"operation": "image_generation"})).contains("`prompt`"));
    assert!(err(json!([1])).contains("JSON object"));
    assert!(parse_json(b"{").unwrap_err().malformed);
}

#[test]
fn hub_cache_folders_have_a_repo_id() {
    let p = Path::new("/c/hub/models--runwayml--stable-diffusion-v1-5/snapshots/abc");
    assert_eq!(
        hub_repo_id(p).as_deref(),
        Some("runwayml/stable-diffusion-v1-5")
    );
    assert_eq!(hub_repo_id(Path::new("/models/tiny")), None);
}

#[test]
fn what_the_sampler_refuses_is_refused_before_queueing() {
    let mut spec = spec();
    spec.scheduler.skip_prk_steps = false;
    let body =
        json!({"operation": "image_generation", "prompt": "a", "scheduler": "pndm", "steps": 3});
    let e = parse_job(&body, &spec, &limits(), 1).unwrap_err();
    assert!(
        e.message.contains("`steps`") && e.message.contains("at least 4"),
        "{}",
        e.message
    );
    let body =
        json!({"operation": "image_generation", "prompt": "a", "scheduler": "pndm", "steps": 4});
    assert!(parse_job(&body, &spec, &limits(), 1).is_ok());
}

#[test]
fn the_model_is_named_by_folder_or_path() {
    assert!(names_model(&spec(), "tiny"));
    assert!(names_model(&spec(), "org/tiny"));
    assert!(names_model(&spec(), "/models/tiny"));
    assert!(!names_model(&spec(), "tiny2"));
}

#[test]
fn prompt_syntax_is_read() {
    use sd_engine::request::PromptSyntax;
    let r = parse(
        json!({"operation": "image_generation", "prompt": "a (cat)", "prompt_syntax": "a1111"}),
    )
    .unwrap();
    assert_eq!(r.params.prompt_syntax, PromptSyntax::A1111);
    let r = parse(json!({"operation": "image_generation", "prompt": "a"})).unwrap();
    assert_eq!(r.params.prompt_syntax, PromptSyntax::Plain);
    let e = err(json!({"operation": "image_generation", "prompt": "a", "prompt_syntax": "comfy"}));
    assert!(
        e.contains("`prompt_syntax`") && e.contains("a1111") && e.contains("comfy"),
        "{e}"
    );
}

#[test]
fn sdxl_size_and_crop_ids_are_read_as_pairs() {
    let sdxl = ModelSpec {
        family: "sdxl".into(),
        ..spec()
    };
    let body = json!({"operation": "image_generation", "prompt": "a",
        "original_size": [1024, 768], "crops_coords_top_left": [0, 8], "target_size": [512, 512],
        "negative_original_size": [256, 256], "negative_crops_coords_top_left": [1, 2],
        "negative_target_size": [128, 64]});
    let r = parse_job(&body, &sdxl, &limits(), 1).unwrap();
    let m = r.params.micro;
    assert_eq!(
        (m.original_size, m.crops_coords_top_left, m.target_size),
        (Some((1024, 768)), Some((0, 8)), Some((512, 512)))
    );
    assert_eq!(
        (
            m.negative_original_size,
            m.negative_crops_coords_top_left,
            m.negative_target_size
        ),
        (Some((256, 256)), Some((1, 2)), Some((128, 64)))
    );
    for bad in [
        json!([1024]),
        json!([-1, 5]),
        json!("1024x1024"),
        json!([1.5, 2]),
    ] {
        let body = json!({"operation": "image_generation", "prompt": "a", "original_size": bad});
        let e = parse_job(&body, &sdxl, &limits(), 1).unwrap_err().message;
        assert!(e.starts_with("invalid `original_size`"), "{e}");
    }
    let e = err(json!({"operation": "image_generation", "prompt": "a", "target_size": [64, 64]}));
    assert!(
        e.contains("`target_size`") && e.contains("SDXL models only"),
        "{e}"
    );
}

/// Fuzz harness (`sd-fuzz`): any body ends in a request or an error, never a panic.
#[test]
fn fuzz_native_request() {
    let api: &[&[u8]] = &[
        b"\"operation\":",
        b"\"image_inpaint\"",
        b"\"width\":",
        b"\"steps\":",
        b"\"seed\":",
        b"\"loras\":",
        b"\"original_size\":",
        b"\"data:image/png;base64,",
    ];
    let words = [api, sd_fuzz::JSON_WORDS].concat();
    sd_fuzz::fuzz(
        "native-request",
        &sd_fuzz::seeds("native-request"),
        &words,
        |bytes| {
            if let Ok(v) = crate::json::parse(bytes) {
                let _ = parse_job(&v, &spec(), &limits(), 7);
            }
        },
    );
}
