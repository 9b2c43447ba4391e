//! The AUTOMATIC1111 API end to end, with the requests the `webuiapi` package (0.9.17) sends:
//! recorded by `scripts/clients/record_webuiapi.py` into `fixtures/a1111/` and replayed here
//! byte for byte. Each image is compared with the same job through the native API (whose
//! pixels the parity tests tie to diffusers); refused fields must come back as FastAPI's 422
//! naming them, and the worker must go on.

mod common;

use std::time::{Duration, Instant};

use common::{b64decode, http, root, Response, Server};
use serde_json::{json, Value};

/// `user:secret-token`, as webuiapi's `set_auth("user", "secret-token")` sends it.
const BASIC: &str = "Basic dXNlcjpzZWNyZXQtdG9rZW4=";

struct Recorded {
    method: String,
    path: String,
    body: Vec<u8>,
}

fn recorded(name: &str) -> Recorded {
    let path = root().join(format!("crates/server/tests/fixtures/a1111/{name}.json"));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    Recorded {
        method: v["method"].as_str().unwrap().into(),
        path: v["path"].as_str().unwrap().into(),
        body: b64decode(v["body_b64"].as_str().unwrap()),
    }
}

fn replay(server: &Server, name: &str) -> Response {
    let r = recorded(name);
    let body = (r.method == "POST").then_some(r.body.as_slice());
    http(
        &server.addr,
        &r.method,
        &r.path,
        &[("Authorization", BASIC)],
        body,
    )
}

fn recorded_json(name: &str) -> Value {
    serde_json::from_slice(&recorded(name).body).unwrap()
}

fn post(server: &Server, path: &str, body: &Value) -> Response {
    http(
        &server.addr,
        "POST",
        path,
        &[("Authorization", BASIC)],
        Some(body.to_string().as_bytes()),
    )
}

fn server() -> Server {
    Server::start(&["--api-key", "secret-token"])
}

/// The images of an A1111 answer, and its parsed `info`.
fn answer(r: &Response) -> (Vec<Vec<u8>>, Value) {
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let images = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| b64decode(i.as_str().unwrap()))
        .collect();
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    (images, info)
}

/// The PNG of a native job.
fn native(server: &Server, body: Value) -> Vec<u8> {
    let id = server.submit(&body);
    let done = server.wait_final(&id);
    assert_eq!(done["state"], "completed", "{done}");
    server.get(&format!("/v1/jobs/{id}/images/0")).body
}

fn strip_data_url(s: &str) -> &str {
    s.split_once(',').map_or(s, |(_, d)| d)
}

#[test]
fn txt2img_images_are_the_native_jobs_of_seed_plus_i() {
    let server = server();
    let (images, info) = answer(&replay(&server, "txt2img"));
    assert_eq!(images.len(), 2);
    assert_eq!(info["all_seeds"], json!([42, 43]));
    assert_eq!(info["sampler_name"], "Euler");
    assert_eq!(
        (info["width"].as_u64(), info["steps"].as_u64()),
        (Some(32), Some(4))
    );
    assert!(
        info["infotexts"][1].as_str().unwrap().contains("Seed: 43"),
        "{info}"
    );
    for (i, got) in images.iter().enumerate() {
        let want = native(
            &server,
            json!({"operation": "image_generation", "prompt": "a photo of a cat",
                   "negative_prompt": "blurry", "width": 32, "height": 32, "steps": 4,
                   "seed": 42 + i, "guidance_scale": 6.0, "scheduler": "euler", "preview_every": 0}),
        );
        assert_eq!(got, &want, "image {i}");
    }
    // webuiapi's defaults: Euler a, CFG 7.
    let (images, info) = answer(&replay(&server, "txt2img_defaults"));
    assert_eq!(info["sampler_name"], "Euler a");
    let want = native(
        &server,
        json!({"operation": "image_generation", "prompt": "a photo of a cat", "width": 32,
               "height": 32, "steps": 4, "seed": 5, "guidance_scale": 7.0, "scheduler": "euler-a",
               "preview_every": 0}),
    );
    assert_eq!(images, vec![want]);
    // A combined name, and "Automatic" standing for the sampler's own A1111 schedule.
    for (sampler, scheduler, native_sampler, native_schedule, label) in [
        (
            "DPM++ 2M SDE Karras",
            None,
            "dpmpp-2m-sde",
            "karras",
            "Karras",
        ),
        (
            "DPM++ 2M SDE",
            Some("Automatic"),
            "dpmpp-2m-sde",
            "exponential",
            "Exponential",
        ),
        (
            "Heun",
            Some("sgm_uniform"),
            "heun",
            "sgm-uniform",
            "SGM Uniform",
        ),
        ("DPM2 a", None, "dpm2-a", "karras", "Karras"),
    ] {
        let mut body = json!({"prompt": "a cat", "width": 32, "height": 32, "steps": 3,
                              "seed": 11, "sampler_name": sampler});
        if let Some(s) = scheduler {
            body["scheduler"] = json!(s);
        }
        let r = post(&server, "/sdapi/v1/txt2img", &body);
        assert_eq!(r.status, 200, "{sampler}: {}", r.text());
        let (images, info) = answer(&r);
        let text = info["infotexts"][0]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            text.contains(&format!("Schedule type: {label}")),
            "{sampler}: {text}"
        );
        let want = native(
            &server,
            json!({"operation": "image_generation", "prompt": "a cat", "width": 32,
                   "height": 32, "steps": 3, "seed": 11, "guidance_scale": 7.0,
                   "sampler": native_sampler, "schedule": native_schedule,
                   "preview_every": 0}),
        );
        assert_eq!(images, vec![want], "{sampler}");
    }
    let echo = replay(&server, "txt2img").json()["parameters"].clone();
    assert_eq!(echo["denoising_strength"], 0.7, "the request as sent");
}

#[test]
fn img2img_and_inpainting_are_the_native_jobs() {
    let server = server();
    let body = recorded_json("img2img");
    let init = strip_data_url(body["init_images"][0].as_str().unwrap()).to_string();
    let (images, info) = answer(&replay(&server, "img2img"));
    assert_eq!(info["denoising_strength"], 0.5);
    let want = native(
        &server,
        json!({"operation": "image_transform", "prompt": "a photo of a cat", "input_image": init,
               "strength": 0.5, "width": 32, "height": 32, "steps": 4, "seed": 3,
               "guidance_scale": 7.5, "scheduler": "euler", "preview_every": 0}),
    );
    assert_eq!(images, vec![want]);

    let body = recorded_json("img2img_mask");
    let init = strip_data_url(body["init_images"][0].as_str().unwrap()).to_string();
    let mask = strip_data_url(body["mask"].as_str().unwrap()).to_string();
    let (images, _) = answer(&replay(&server, "img2img_mask"));
    let want = native(
        &server,
        json!({"operation": "image_inpaint", "prompt": "a red hat", "init_image": init,
               "mask_image": mask, "strength": 1.0, "width": 32, "height": 32, "steps": 4,
               "seed": 7, "guidance_scale": 7.0, "scheduler": "euler", "preview_every": 0}),
    );
    assert_eq!(images, vec![want]);
    let parameters = replay(&server, "img2img").json()["parameters"].clone();
    assert_eq!(
        parameters["init_images"],
        Value::Null,
        "include_init_images is false"
    );
}

#[test]
fn the_describing_routes_answer_as_a1111() {
    let server = server();
    let json_of = |name: &str| {
        let r = replay(&server, name);
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        r.json()
    };
    let names: Vec<String> = json_of("samplers")
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"Euler a".to_string()) && names.contains(&"DPM++ 2M".to_string()));
    assert_eq!(names.len(), 18, "{names:?}");
    let sde = json_of("samplers")
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "DPM++ 2M SDE")
        .cloned()
        .unwrap();
    assert_eq!(sde["options"]["scheduler"], "exponential");
    assert_eq!(json_of("schedulers")[1]["name"], "karras");
    assert_eq!(json_of("schedulers")[4]["name"], "sgm_uniform");
    assert_eq!(json_of("sd_models")[0]["title"], "tiny-sd1");
    let options = json_of("options");
    assert_eq!(options["sd_model_checkpoint"], "tiny-sd1");
    assert_eq!(json_of("set_options"), Value::Null);
    // Open WebUI posts back everything it read.
    assert_eq!(post(&server, "/sdapi/v1/options", &options).status, 200);
    let progress = json_of("progress");
    assert_eq!(
        (
            progress["progress"].as_f64(),
            progress["state"]["job_count"].as_u64()
        ),
        (Some(0.0), Some(0))
    );
    assert_eq!(json_of("interrupt"), json!({}));
    assert_eq!(json_of("skip"), Value::Null);
    assert_eq!(json_of("png_info")["info"], "");
    assert_eq!(json_of("loras"), json!([]));
    assert_eq!(json_of("upscalers"), json!([]));
    assert_eq!(json_of("sd_vae"), json!([]));
    assert_eq!(json_of("embeddings"), json!({"loaded": {}, "skipped": {}}));
    assert_eq!(json_of("cmd_flags")["api"], true);
    assert!(json_of("memory")["ram"].is_object());
    assert_eq!(json_of("refresh_checkpoints"), Value::Null);
    // Without credentials (webuiapi's first call): A1111's 401.
    let scripts = recorded("scripts");
    let r = http(&server.addr, &scripts.method, &scripts.path, &[], None);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["detail"], "Not authenticated");
    let r = http(
        &server.addr,
        "GET",
        "/sdapi/v1/options",
        &[("Authorization", "Basic dXNlcjp3cm9uZw==")],
        None,
    );
    assert_eq!(
        (r.status, r.json()["detail"].as_str()),
        (401, Some("Incorrect username or password"))
    );
    let r = http(
        &server.addr,
        "GET",
        "/sdapi/v1/options",
        &[("Authorization", "Bearer secret-token")],
        None,
    );
    assert_eq!(r.status, 200);
    let r = http(
        &server.addr,
        "GET",
        "/sdapi/v1/nothing",
        &[("Authorization", BASIC)],
        None,
    );
    assert_eq!(
        (r.status, r.json()["detail"].as_str()),
        (404, Some("Not Found"))
    );

    // png-info reads the worker's own text back.
    let r = post(
        &server,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a cat", "negative_prompt": "dark", "steps": 2, "width": 32, "height": 32, "seed": 9}),
    );
    let image = r.json()["images"][0].as_str().unwrap().to_string();
    let info = post(&server, "/sdapi/v1/png-info", &json!({"image": image})).json();
    assert_eq!(info["parameters"]["Prompt"], "a cat");
    assert_eq!(info["parameters"]["Negative prompt"], "dark");
    assert_eq!(info["parameters"]["Seed"], "9");
    assert_eq!(info["parameters"]["Size-1"], "32");
}

#[test]
fn refused_fields_are_fastapi_422s_naming_them_and_the_worker_goes_on() {
    let server = server();
    let base = json!({"prompt": "a", "steps": 1, "width": 32, "height": 32});
    let with = |extra: Value| {
        let mut b = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let cases = [
        (json!({"enable_hr": true}), "enable_hr"),
        (json!({"restore_faces": true}), "restore_faces"),
        (json!({"tiling": true}), "tiling"),
        (json!({"subseed_strength": 0.5}), "subseed_strength"),
        (
            json!({"alwayson_scripts": {"ADetailer": {"args": [true]}}}),
            "alwayson_scripts",
        ),
        (json!({"script_name": "x/y/z plot"}), "script_name"),
        (json!({"save_images": true}), "save_images"),
        (json!({"styles": ["cinematic"]}), "styles"),
        (json!({"sampler_name": "DPM fast"}), "sampler_name"),
        (
            json!({"sampler_name": "Euler a", "scheduler": "karras"}),
            "scheduler",
        ),
        (
            json!({"sampler_name": "Euler", "scheduler": "align_your_steps"}),
            "scheduler",
        ),
        (json!({"scheduler": "kl_optimal"}), "scheduler"),
        (
            json!({"sampler_name": "DPM++ 2M Karras", "scheduler": "exponential"}),
            "scheduler",
        ),
        (json!({"sampler_name": "Euler", "s_churn": 0.5}), "s_churn"),
        (
            json!({"sampler_name": "Euler a", "s_noise": 0.9}),
            "s_noise",
        ),
        (json!({"sampler_name": "DDIM", "eta": 1.5}), "eta"),
        (
            json!({"override_settings": {"sd_model_checkpoint": "other"}}),
            "override_settings.sd_model_checkpoint",
        ),
        (
            json!({"override_settings": {"CLIP_stop_at_last_layers": 2}}),
            "override_settings.CLIP_stop_at_last_layers",
        ),
        (json!({"not_a_field": 1}), "not_a_field"),
        (json!({"width": 33}), "width"),
        (json!({"steps": 0}), "steps"),
        (json!({"cfg_scale": 1000}), "cfg_scale"),
        (json!({"batch_size": 5, "n_iter": 5}), "batch_size"),
        (json!({"prompt": "a <lora:style:0.8>"}), "prompt"),
        (json!({"seed": "x"}), "seed"),
    ];
    for (extra, field) in cases {
        let r = post(&server, "/sdapi/v1/txt2img", &with(extra.clone()));
        assert_eq!(r.status, 422, "{extra}: {}", r.text());
        let detail = &r.json()["detail"][0];
        assert_eq!(
            detail["loc"],
            json!(["body", field]),
            "{extra}: {}",
            r.text()
        );
        assert!(
            detail["msg"]
                .as_str()
                .unwrap()
                .contains(field.split('.').next_back().unwrap()),
            "{detail}"
        );
    }
    let img = |extra: Value| {
        let body = recorded_json("img2img_mask");
        let mut b = body.clone();
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        post(&server, "/sdapi/v1/img2img", &b)
    };
    for (extra, field) in [
        (json!({"mask_blur": 4}), "mask_blur"),
        (json!({"inpainting_fill": 0}), "inpainting_fill"),
        (json!({"inpaint_full_res": true}), "inpaint_full_res"),
        (json!({"resize_mode": 1}), "resize_mode"),
        (json!({"init_images": []}), "init_images"),
        (json!({"init_images": ["not base64!"]}), "init_images[0]"),
        (json!({"mask": "bm90IGFuIGltYWdl"}), "mask"),
    ] {
        let r = img(extra.clone());
        assert_eq!(r.status, 422, "{extra}: {}", r.text());
        assert_eq!(
            r.json()["detail"][0]["loc"],
            json!(["body", field]),
            "{extra}: {}",
            r.text()
        );
    }
    let r = http(
        &server.addr,
        "POST",
        "/sdapi/v1/txt2img",
        &[("Authorization", BASIC)],
        Some(b"{"),
    );
    assert_eq!(
        (r.status, r.json()["detail"][0]["type"].as_str()),
        (422, Some("value_error.jsondecode"))
    );
    let r = post(
        &server,
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "sdxl.safetensors"}),
    );
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json()["detail"][0]["loc"],
        json!(["body", "sd_model_checkpoint"])
    );
    let (images, _) = answer(&post(&server, "/sdapi/v1/txt2img", &base));
    assert_eq!(images.len(), 1);
}

#[test]
fn interrupt_ends_the_request_with_what_was_made() {
    let server = server();
    let addr = server.addr.clone();
    let long = json!({"prompt": "long", "steps": 150, "width": 64, "height": 64, "n_iter": 3, "sampler_name": "Euler"});
    let request = std::thread::spawn(move || {
        http(
            &addr,
            "POST",
            "/sdapi/v1/txt2img",
            &[("Authorization", BASIC)],
            Some(long.to_string().as_bytes()),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = http(
            &server.addr,
            "GET",
            "/sdapi/v1/progress",
            &[("Authorization", BASIC)],
            None,
        )
        .json();
        // Past the first live preview (every 10 steps).
        if p["state"]["sampling_step"].as_u64().unwrap_or(0) > 11 {
            assert_eq!(p["state"]["job"], "scripts_txt2img");
            assert_eq!(p["state"]["job_count"], 3);
            assert!(p["progress"].as_f64().unwrap() > 0.0);
            let preview = b64decode(p["current_image"].as_str().expect("a live preview"));
            assert_eq!(&preview[1..4], b"PNG");
            let q = "/sdapi/v1/progress?skip_current_image=true";
            let skipped = http(&server.addr, "GET", q, &[("Authorization", BASIC)], None).json();
            assert_eq!(skipped["current_image"], Value::Null);
            break;
        }
        assert!(Instant::now() < deadline, "never started: {p}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    assert_eq!(post(&server, "/sdapi/v1/interrupt", &json!({})).status, 200);
    let r = request.join().unwrap();
    assert!(t.elapsed() < Duration::from_secs(10));
    let (images, _) = answer(&r);
    assert!(images.is_empty(), "the first image was interrupted");
    let p = http(
        &server.addr,
        "GET",
        "/sdapi/v1/progress",
        &[("Authorization", BASIC)],
        None,
    )
    .json();
    assert_eq!(p["state"]["job_count"], 0);
}

/// `<lora:NAME:WEIGHT>` in the prompt applies that LoRA of `--lora-dir`, as the same job with
/// `loras` through the native API (the tag itself leaves the prompt).
#[test]
fn lora_tags_apply_loras_of_the_lora_dir() {
    let dir = common::tmp("a1111-loras");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        root().join("fixtures/lora/sd1-kohya.safetensors"),
        dir.join("sd1-kohya.safetensors"),
    )
    .unwrap();
    let server = Server::start(&[
        "--api-key",
        "secret-token",
        "--lora-dir",
        dir.to_str().unwrap(),
    ]);
    let body = json!({"prompt": "a photo of a cat <lora:sd1-kohya:0.8>", "steps": 3, "width": 32,
                      "height": 32, "seed": 4, "sampler_name": "Euler"});
    let (images, info) = answer(&post(&server, "/sdapi/v1/txt2img", &body));
    assert!(
        info["infotexts"][0]
            .as_str()
            .unwrap()
            .contains("Lora: \"sd1-kohya:0.8\""),
        "{info}"
    );
    let want = native(
        &server,
        json!({"operation": "image_generation", "prompt": "a photo of a cat ",
               "prompt_syntax": "a1111", "width": 32, "height": 32, "steps": 3, "seed": 4,
               "guidance_scale": 7.0, "scheduler": "euler", "preview_every": 0,
               "loras": [{"path": "sd1-kohya", "strength": 0.8}]}),
    );
    assert_eq!(images, vec![want]);
    let without = answer(&post(&server, "/sdapi/v1/txt2img", &json!({"prompt": "a photo of a cat ", "steps": 3, "width": 32, "height": 32, "seed": 4, "sampler_name": "Euler"}))).0;
    assert_ne!(images, without, "the LoRA changed the image");
    let r = post(
        &server,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a <lora:missing:1>", "steps": 1, "width": 32, "height": 32}),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["detail"][0]["loc"], json!(["body", "prompt"]));
}

/// The requests Open WebUI's AUTOMATIC1111 engine sends (`backend/open_webui/routers/images.py`,
/// commit 02530d50): `GET options` for the model, the options posted back with the model set,
/// `GET sd-models`, and txt2img as `{prompt, batch_size, width, height, steps,
/// negative_prompt}`, with an empty `authorization` header when no credentials are set.
#[test]
fn open_webui_requests_work() {
    let server = Server::start(&[]);
    let empty = [("authorization", "")];
    let options = http(&server.addr, "GET", "/sdapi/v1/options", &empty, None).json();
    let mut back = options.clone();
    back["sd_model_checkpoint"] = json!("tiny-sd1");
    let r = http(
        &server.addr,
        "POST",
        "/sdapi/v1/options",
        &empty,
        Some(back.to_string().as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let models = http(&server.addr, "GET", "/sdapi/v1/sd-models", &empty, None).json();
    assert_eq!(models[0]["model_name"], "tiny-sd1");
    let body = json!({"prompt": "a photo of a cat", "batch_size": 2, "width": 32, "height": 32,
                      "steps": 2, "negative_prompt": "blurry"});
    let r = http(
        &server.addr,
        "POST",
        "/sdapi/v1/txt2img",
        &empty,
        Some(body.to_string().as_bytes()),
    );
    let (images, info) = answer(&r);
    assert_eq!(images.len(), 2);
    assert_eq!(info["negative_prompt"], "blurry");
}
