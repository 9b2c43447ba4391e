//! LoRA per job over HTTP and from the CLI: results equal to diffusers' (references from
//! `scripts/make_lora_fixtures.py`, max 3 / mean 0.5 levels), the base model unchanged
//! between LoRA jobs, names confined to --lora-dir, bad files and unmatched keys reported.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use common::{b64decode, check_written_images, model, root, sd_worker, tmp, Server};
use serde_json::{json, Value};

fn lora_fixture(name: &str) -> PathBuf {
    root().join("fixtures/lora").join(name)
}

fn reference(name: &str) -> candle_core::Tensor {
    let mut r = candle_core::safetensors::load(
        lora_fixture(&format!("reference/{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    r.remove("images").unwrap()
}

/// A LoRA folder with two fixture LoRAs, a corrupt file, a subfolder and a link that leads
/// out of it; and a file beside it that must stay unreachable.
fn lora_dir() -> PathBuf {
    let base = tmp("lora-root");
    let dir = base.join("loras");
    std::fs::create_dir_all(dir.join("styles")).unwrap();
    for f in ["sd1-peft.safetensors", "sd1-kohya.safetensors"] {
        std::fs::copy(lora_fixture(f), dir.join(f)).unwrap();
    }
    std::fs::copy(
        lora_fixture("flux-kohya.safetensors"),
        dir.join("styles/flux-kohya.safetensors"),
    )
    .unwrap();
    std::fs::write(dir.join("junk.safetensors"), b"\x08\0\0\0\0\0\0\0not json").unwrap();
    std::fs::copy(
        lora_fixture("sd1-peft.safetensors"),
        base.join("outside.safetensors"),
    )
    .unwrap();
    #[cfg(unix)]
    {
        let link = dir.join("link.safetensors");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(base.join("outside.safetensors"), link).unwrap();
    }
    dir
}

fn job(loras: Value) -> Value {
    // The parameters of the `sd1-two` reference case.
    json!({"operation": "image_generation", "prompt": "a photo of a cat", "width": 32,
           "height": 32, "steps": 3, "guidance_scale": 7.5, "seed": 7, "loras": loras})
}

/// Runs a job to its end; returns its last event.
fn run(server: &Server, body: &Value) -> (String, Value) {
    let id = server.submit(body);
    server.events(&id).last().unwrap().clone()
}

fn pixels(png_b64: &str) -> Vec<u8> {
    let path = tmp(&format!("lora-{}.png", rand_tag()));
    std::fs::write(&path, b64decode(png_b64)).unwrap();
    common::read_png(&path).2
}

fn rand_tag() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// `generate` at 32x32 with "STEPS GUIDANCE SEED", `extra` flags, to `out`.
fn generate_32(
    model: &str,
    prompt: &str,
    steps_guidance_seed: &str,
    extra: &[String],
    out: &Path,
) -> std::process::Output {
    let mut it = steps_guidance_seed.split(' ');
    let (steps, guidance, seed) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    let mut args: Vec<String> = [
        "generate",
        "--model",
        model,
        "--prompt",
        prompt,
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        steps,
        "--guidance",
        guidance,
        "--seed",
        seed,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().cloned());
    args.extend(["--output".into(), out.display().to_string()]);
    sd_worker(&args)
}

fn refused(server: &Server, loras: Value) -> String {
    let r = server.post_json("/v1/jobs", &job(loras));
    assert_eq!(r.status, 422, "{}", r.text());
    r.error().1
}

#[test]
fn loras_per_job_match_diffusers_and_leave_the_base_model() {
    let dir = lora_dir();
    let server = Server::start(&["--lora-dir", dir.to_str().unwrap()]);
    let info = server.get("/v1/info").json();
    assert_eq!(info["capabilities"]["loras"]["enabled"], true);

    let (name, base) = run(&server, &job(json!([])));
    assert_eq!(name, "complete");
    let base_png = base["image"].as_str().unwrap().to_string();

    // Two LoRAs, one named without its extension, one with a negative strength.
    let (name, data) = run(
        &server,
        &job(json!([{"path": "sd1-peft.safetensors", "strength": 0.6},
                    {"path": "sd1-kohya", "strength": -0.5}])),
    );
    assert_eq!(name, "complete", "{data}");
    assert_eq!(data["warnings"], json!([]));
    let want: Vec<u8> = reference("sd1-two")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    common::assert_images_close(
        "sd1-two over HTTP",
        &pixels(data["image"].as_str().unwrap()),
        &want,
    );
    let lora_png = b64decode(data["image"].as_str().unwrap());

    // The status echoes the LoRAs.
    let list = server.get("/v1/jobs").json();
    assert!(list.to_string().contains("sd1-kohya"), "{list}");

    // The CLI gives the same bytes.
    let out = tmp("lora-cli.png");
    let o = generate_32(
        &model("tiny-sd1"),
        "a photo of a cat",
        "3 7.5 7",
        &[
            "--lora".into(),
            format!("{}:0.6", lora_fixture("sd1-peft.safetensors").display()),
            "--lora".into(),
            format!("{}:-0.5", lora_fixture("sd1-kohya.safetensors").display()),
        ],
        &out,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), lora_png);
    let text = common::read_png(&out).3;
    assert!(
        text.ends_with(", Lora: \"sd1-peft:0.6, sd1-kohya:-0.5\""),
        "{text}"
    );

    // Not strict: a FLUX LoRA on this SD model applies nothing and says so, key by key.
    let (name, data) = run(
        &server,
        &job(json!([{"path": "styles/flux-kohya.safetensors", "strict": false}])),
    );
    assert_eq!(name, "complete", "{data}");
    let warnings = data["warnings"].as_array().unwrap();
    assert!(warnings[0]
        .as_str()
        .unwrap()
        .contains("no key matches this model"));
    assert!(
        warnings.iter().any(|w| w
            .as_str()
            .unwrap()
            .contains("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight")),
        "{warnings:?}"
    );
    // Same pixels as the base model; the PNG text still names the LoRA that was asked for.
    assert!(pixels(data["image"].as_str().unwrap()) == pixels(&base_png));

    // Strict (the default): the job fails, naming the keys.
    let (name, data) = run(
        &server,
        &job(json!([{"path": "styles/flux-kohya.safetensors"}])),
    );
    assert_eq!(name, "error", "{data}");
    let message = data["error"]["message"].as_str().unwrap();
    assert_eq!(data["error"]["type"], "invalid_request");
    assert!(message.contains("no key matches this model"), "{message}");
    assert!(
        message.contains("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"),
        "{message}"
    );

    // Names that leave the folder, name nothing, or a file that is not safetensors are refused
    // before queueing.
    for (path, why) in [
        (
            "junk.safetensors",
            "\"junk.safetensors\": not a safetensors file",
        ),
        ("../outside.safetensors", "without `..`"),
        ("/etc/passwd", "without `..`"),
        ("styles/../../outside", "without `..`"),
        ("missing.safetensors", "no such file in the LoRA folder"),
        ("styles", "no such file in the LoRA folder"),
        #[cfg(unix)]
        ("link.safetensors", "resolves outside the LoRA folder"),
    ] {
        let m = refused(&server, json!([{"path": path}]));
        assert!(
            m.contains("invalid `loras[0].path`") && m.contains(why),
            "{path}: {m}"
        );
    }
    for (loras, want) in [
        (json!("sd1-peft"), "invalid `loras`: must be a list"),
        (
            json!([{"path": "sd1-peft", "strength": 11}]),
            "invalid `loras[0].strength`: must be a number between -10 and 10, got 11",
        ),
        (
            json!([{"path": "sd1-peft", "strength": "x"}]),
            "invalid `loras[0].strength`",
        ),
        (
            json!([{"path": "sd1-peft", "strict": "no"}]),
            "invalid `loras[0].strict`: must be true or false",
        ),
        (
            json!([{"path": "sd1-peft", "scale": 1}]),
            "invalid `loras[0].scale`: unknown field",
        ),
        (
            json!([{"strength": 1}]),
            "invalid `loras[0].path`: is required",
        ),
        (json!(["sd1-peft"]), "invalid `loras[0]`: must be an object"),
        (
            json!(vec![json!({"path": "sd1-peft"}); 9]),
            "invalid `loras`: at most 8 LoRAs per job, got 9",
        ),
    ] {
        let m = refused(&server, loras.clone());
        assert!(m.contains(want), "{loras}: {m}");
    }

    // After all of that the base model is exactly what it was.
    let (_, again) = run(&server, &job(json!([])));
    assert_eq!(again["image"].as_str().unwrap(), base_png);
}

#[test]
fn without_a_lora_dir_jobs_take_no_loras() {
    let server = Server::start(&[]);
    assert_eq!(
        server.get("/v1/info").json()["capabilities"]["loras"]["enabled"],
        false
    );
    let m = refused(&server, json!([{"path": "sd1-peft"}]));
    assert!(
        m.contains("this worker takes no LoRAs (start it with --lora-dir DIR)"),
        "{m}"
    );
    // An empty list is no LoRA at all.
    let (name, _) = run(&server, &job(json!([])));
    assert_eq!(name, "complete");
}

/// FLUX through the CLI, kohya and original-name layouts (one reference: the same adapters).
#[test]
fn flux_loras_from_the_cli_match_diffusers() {
    let flux = root().join("fixtures/flux/tiny-flux-dev");
    for (case, file) in [
        ("flux-kohya", "flux-kohya.safetensors"),
        ("flux-original", "flux-original.safetensors"),
        ("flux-peft", "flux-peft.safetensors"),
    ] {
        let (strength, prompt, seed) = match case {
            "flux-peft" => ("0.9", "a photo of a cat", "4"),
            _ => ("0.7", "a red chair", "6"),
        };
        let out = tmp(&format!("{case}.png"));
        let o = generate_32(
            &flux.display().to_string(),
            prompt,
            &format!("3 3.5 {seed}"),
            &[
                "--max-sequence-length".into(),
                "16".into(),
                "--lora".into(),
                format!("{}:{strength}", lora_fixture(file).display()),
            ],
            &out,
        );
        assert!(
            o.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        check_written_images(case, &out, &reference(case), |_| {});
    }
}

#[test]
fn cli_lora_errors_are_one_line() {
    let run = |lora: &str, extra: &[&str]| -> String {
        let mut args: Vec<String> = [
            "generate",
            "--model",
            &model("tiny-sd1"),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--width",
            "32",
            "--height",
            "32",
            "--lora",
            lora,
            "--output",
            tmp("cli-lora-err.png").to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let o = sd_worker(&args);
        String::from_utf8_lossy(&o.stderr).to_string()
            + if o.status.success() {
                "<ok>"
            } else {
                "<failed>"
            }
    };
    let missing = run("/no/such.safetensors", &[]);
    assert!(
        missing.contains("invalid --lora /no/such.safetensors: /no/such.safetensors is not a file"),
        "{missing}"
    );
    let flux = lora_fixture("flux-kohya.safetensors").display().to_string();
    let e = run(&format!("{flux}:20"), &[]);
    assert!(
        e.contains("the strength must be between -10 and 10, got 20"),
        "{e}"
    );
    let e = run(&flux, &[]);
    assert!(
        e.contains("no key matches this model") && e.ends_with("<failed>"),
        "{e}"
    );
    let e = run(&flux, &["--lora-allow-unmatched"]);
    assert!(
        e.contains("warning: LoRA flux-kohya.safetensors: no key matches this model")
            && e.ends_with("<ok>"),
        "{e}"
    );
    assert!(Path::new(&tmp("cli-lora-err.png")).is_file());
}
