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
    // Named as a file, but not safetensors: refused from its header.
    let (field, reason) = error(with(file.to_str().unwrap()), &Limits::pipeline());
    assert_eq!(field, "loras[0].path");
    assert!(reason.contains("not a safetensors file"), "{reason}");
    let lora = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/lora/sd1-peft.safetensors");
    std::fs::copy(lora, &file).unwrap();
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

fn sdxl_spec(variant: &str) -> ModelSpec {
    let (steps, guidance) = sd_engine::load::sd_defaults("sdxl", variant);
    ModelSpec {
        family: "sdxl".into(),
        variant: variant.into(),
        default_steps: steps,
        default_guidance: guidance,
        default_sampler: Ok(SamplerKind::EulerAncestral),
        ..ModelSpec::sd_example()
    }
}

#[test]
fn sdxl_and_turbo_defaults() {
    let r = validate(draft("a cat"), &sdxl_spec("base"), &served(), 1).unwrap();
    assert_eq!((r.params.steps, r.params.guidance), (50, 5.0));
    let r = validate(draft("a cat"), &sdxl_spec("turbo"), &served(), 1).unwrap();
    assert_eq!((r.params.steps, r.params.guidance), (1, 0.0));
    assert_eq!(sd_engine::load::sd_defaults("sd2", "turbo"), (1, 0.0));
    assert_eq!(sd_engine::load::sd_defaults("sd1", "base"), (50, 7.5));
}

#[test]
fn micro_conditioning_is_sdxl_only_and_bounded() {
    let mut d = draft("a cat");
    d.micro.original_size = Some([1024, 768]);
    d.micro.negative_crops_coords_top_left = Some([0, 16]);
    let r = validate(d.clone(), &sdxl_spec("base"), &served(), 1).unwrap();
    assert_eq!(r.params.micro.original_size, Some((1024, 768)));
    assert_eq!(r.params.micro.negative_crops_coords_top_left, Some((0, 16)));

    let (field, reason) = error(d, &served());
    assert_eq!(field, "original_size");
    assert!(reason.contains("SDXL models only"), "{reason}");

    for (pair, field) in [([0, 64], "target_size"), ([64, 16385], "original_size")] {
        let mut d = draft("a cat");
        match field {
            "target_size" => d.micro.target_size = Some(pair),
            _ => d.micro.original_size = Some(pair),
        }
        let e = validate(d, &sdxl_spec("base"), &served(), 1).unwrap_err();
        assert_eq!(e.field, field);
        assert!(e.reason.contains("16384"), "{}", e.reason);
    }
    let mut d = draft("a cat");
    d.micro.aesthetic_score = Some(6.0);
    let e = validate(d, &sdxl_spec("base"), &served(), 1).unwrap_err();
    assert_eq!(e.field, "aesthetic_score");
    assert!(e.reason.contains("refiner"), "{}", e.reason);
}

/// Turbo models default to one step; an image job that leaves `steps` out gets the fewest
/// steps that run one at its strength, and an explicit count is kept (and refused when it runs
/// none).
#[test]
fn omitted_steps_are_raised_to_run_one_at_the_strength() {
    let png = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/inputs/square32.png"),
    )
    .unwrap();
    let transform = |strength: f64, steps: Option<u64>| {
        let mut d = RequestDraft::new(Operation::Transform);
        d.prompt = Some("a cat".into());
        d.init_image = Some(ImageBytes {
            field: "input_image".into(),
            bytes: png.clone(),
        });
        d.strength = Some(strength);
        d.steps = steps;
        validate(d, &sdxl_spec("turbo"), &served(), 1)
    };
    assert_eq!(transform(0.8, None).unwrap().params.steps, 2);
    assert_eq!(transform(0.5, None).unwrap().params.steps, 2);
    assert_eq!(transform(0.3, None).unwrap().params.steps, 4);
    assert_eq!(transform(1.0, None).unwrap().params.steps, 1);
    assert_eq!(transform(0.5, Some(1)).unwrap_err().field, "strength");
}
