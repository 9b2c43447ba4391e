//! Validation of drafts as any interface builds them (the native API's JSON reader has its own
//! tests in the server crate): defaults, the limits of `sd-worker generate` against those of
//! `serve`, and fields that an operation does not take.

use sd_engine::request::{ImageBytes, LoraDraft, Operation, RequestDraft};
use sd_engine::validate::{validate, LoraFiles, MAX_SIDE};
use sd_engine::{Limits, ModelSpec};
use sd_models::samplers::SamplerKind;

fn spec() -> ModelSpec {
    ModelSpec::sd_example()
}

fn served() -> Limits {
    Limits {
        max_pixels: 1024 * 1024,
        max_input_pixels: 4096 * 4096,
        max_steps: 150,
        max_batch: 8,
        loras: LoraFiles::Refused,
        from_flags: true,
        empty_prompt: false,
    }
}

fn draft(prompt: &str) -> RequestDraft {
    let mut d = RequestDraft::new(Operation::Generation);
    d.prompt = Some(prompt.into());
    d
}

fn error(d: RequestDraft, limits: &Limits) -> (String, String) {
    let e = validate(d, &spec(), limits, 1).unwrap_err();
    (e.field, e.reason)
}

#[test]
fn omitted_fields_take_the_model_defaults() {
    let r = validate(draft("a cat"), &spec(), &served(), 42).unwrap();
    let p = &r.params;
    assert_eq!(
        (p.width, p.height, p.steps, p.batch, p.seed),
        (512, 512, 50, 1, 42)
    );
    assert_eq!((p.guidance, p.sampler), (7.5, SamplerKind::Pndm));
    assert!(r.input.is_none() && r.loras.is_empty());
}

#[test]
fn the_cli_takes_the_pipeline_limits_and_an_empty_prompt() {
    let cli = Limits::pipeline();
    assert!(validate(draft(""), &spec(), &cli, 1).is_ok());
    assert_eq!(error(draft(""), &served()).0, "prompt");

    let mut d = draft("a");
    d.steps = Some(1000);
    d.scheduler = Some("euler".into());
    d.width = Some(MAX_SIDE as u64);
    d.height = Some(MAX_SIDE as u64);
    let r = validate(d, &spec(), &cli, 1);
    assert!(
        r.is_ok(),
        "no pixel budget, steps up to the scheduler's: {:?}",
        r.err()
    );
    let mut d = draft("a");
    d.steps = Some(0);
    let (field, reason) = error(d, &cli);
    assert_eq!(field, "steps");
    assert!(
        reason.contains("must be between 1 and 1000, got 0")
            && reason.contains("num_train_timesteps"),
        "{reason}"
    );
    let mut d = draft("a");
    d.batch = Some(9);
    let (_, reason) = error(d, &served());
    assert!(
        reason.contains("between 1 and 8, got 9") && reason.contains("--max-batch"),
        "{reason}"
    );
    let mut d = draft("a");
    d.batch = Some(65);
    let (_, reason) = error(d, &cli);
    assert!(
        reason.contains("between 1 and 64, got 65") && !reason.contains("--"),
        "{reason}"
    );
}

#[test]
fn fields_an_operation_does_not_take_are_refused() {
    let mut d = draft("a");
    d.init_image = Some(ImageBytes {
        field: "init_images[0]".into(),
        bytes: vec![1, 2, 3],
    });
    assert_eq!(error(d, &served()).0, "init_images[0]");
    let mut d = draft("a");
    d.strength = Some(0.5);
    assert_eq!(error(d, &served()).0, "strength");
    let mut d = RequestDraft::new(Operation::Transform);
    d.prompt = Some("a".into());
    let (field, reason) = error(d, &served());
    assert_eq!(
        (field.as_str(), reason.contains("required")),
        ("input_image", true)
    );
}

#[test]
fn lora_files_follow_the_interface_policy() {
    let with = |path: &str| {
        let mut d = draft("a");
        d.loras = vec![LoraDraft {
            path: path.into(),
            strength: Some(0.5),
            strict: None,
        }];
        d
    };
    assert_eq!(error(with("x"), &served()).0, "loras");
    let (field, reason) = error(with("/no/such.safetensors"), &Limits::pipeline());
    assert_eq!(field, "loras[0].path");
    assert!(reason.contains("not a file"), "{reason}");
    let file =
        std::env::temp_dir().join(format!("sd-engine-lora-{}.safetensors", std::process::id()));
    std::fs::write(&file, b"x").unwrap();
    let r = validate(
        with(file.to_str().unwrap()),
        &spec(),
        &Limits::pipeline(),
        1,
    )
    .unwrap();
    assert_eq!(r.loras.len(), 1);
    assert_eq!((r.loras[0].strength, r.loras[0].strict), (0.5, true));
    assert_eq!(r.loras[0].path, file);
    let _ = std::fs::remove_file(&file);
}

#[test]
fn a1111_prompt_syntax_is_for_stable_diffusion_models() {
    use sd_engine::request::PromptSyntax;
    let mut d = draft("a (cat:1.2)");
    d.prompt_syntax = PromptSyntax::A1111;
    let r = validate(d.clone(), &spec(), &served(), 1).unwrap();
    assert_eq!(r.params.prompt_syntax, PromptSyntax::A1111);
    let flux = ModelSpec {
        flux: true,
        latent_factor: 16,
        default_sampler: Err("flow matching".into()),
        ..spec()
    };
    let (field, reason) = {
        let e = validate(d, &flux, &served(), 1).unwrap_err();
        (e.field, e.reason)
    };
    assert_eq!(field, "prompt_syntax");
    assert!(reason.contains("Stable Diffusion"), "{reason}");
}
