//! `sd-worker inspect`: what a model folder holds.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A Stable Diffusion or FLUX.1 diffusers folder (with model_index.json), a single-file
    /// SD 1.x/2.x checkpoint, a FLUX transformer file (.safetensors with the original key
    /// names, or .gguf), or a Hugging Face repo id (fetched first).
    #[arg(env = "SD_MODEL")]
    pub model: PathBuf,
    /// With a FLUX transformer file: the diffusers FLUX folder that would provide the rest
    /// (checked to be one); with an SD checkpoint: the SD folder whose configs would be used.
    #[arg(long, env = "SD_COMPONENTS")]
    pub components: Option<PathBuf>,
}

pub fn run(mut args: InspectArgs) -> Result<()> {
    args.model = sd_engine::hub::resolve_model(
        &args.model,
        None,
        &mut crate::model_args::ConsoleProgress::new(),
    )?;
    if args.components.is_some() && !args.model.is_file() {
        anyhow::bail!(
            "--components goes with a single-file model; {} is a folder",
            args.model.display()
        );
    }
    if args.model.is_file()
        && sd_engine::source::model_kind(&args.model)? == sd_engine::source::ModelKind::SdCheckpoint
    {
        return inspect_checkpoint(&args);
    }
    if args.model.is_file() {
        let info = sd_models::loader::inspect_flux_file(&args.model)?;
        println!("model:        {}", args.model.display());
        println!("family:       flux");
        println!("variant:      {}", info.variant);
        println!("layout:       {}", info.layout);
        let types: Vec<String> = info
            .dtypes
            .iter()
            .map(|(t, n)| format!("{t} x {n}"))
            .collect();
        println!("dtypes:       {}", types.join(", "));
        println!("parameters:   {}", info.parameters);
        println!(
            "blocks:       {} double, {} single, width {}",
            info.double_blocks, info.single_blocks, info.width
        );
        match &args.components {
            Some(dir) if sd_models::loader::is_flux_folder(dir) => {
                println!(
                    "components:   {} (text encoders, tokenizers, VAE, scheduler)",
                    dir.display()
                )
            }
            Some(dir) => anyhow::bail!(
                "invalid --components {}: not a diffusers FLUX folder",
                dir.display()
            ),
            None => println!("components:   none given (generate and serve need --components DIR)"),
        }
        return Ok(());
    }
    if sd_models::loader::is_flux_folder(&args.model) {
        let info = sd_models::loader::inspect_flux(&args.model)?;
        println!("model:        {}", info.name);
        println!("path:         {}", args.model.display());
        println!("family:       flux");
        println!("variant:      {}", info.variant);
        println!("layout:       diffusers folder (FluxPipeline)");
        println!("latent factor: {} (packed 2x2)", info.latent_factor);
        println!(
            "default size: {0}x{0} (width x height)",
            sd_engine::load::FLUX_DEFAULT_SAMPLE_SIZE * info.latent_factor
        );
        println!("transformer parameters: {}", info.transformer_parameters);
        let types: Vec<String> = info
            .transformer_dtypes
            .iter()
            .map(|(t, n)| format!("{t} x {n}"))
            .collect();
        println!("transformer dtypes: {}", types.join(", "));
        for (name, files) in &info.weights {
            let list: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            println!("{name:<15} {}", list.join(", "));
        }
        return Ok(());
    }
    let info = sd_models::loader::inspect(&args.model)?;
    let unet = sd_models::loader::read_unet_config(&args.model)?;
    let vae = sd_models::loader::read_vae_config(&args.model)?;
    println!("model:        {}", info.name);
    println!("path:         {}", info.path.display());
    println!("family:       {}", info.family);
    println!("variant:      {}", info.variant);
    println!("layout:       diffusers folder ({})", info.pipeline_class);
    println!("prediction:   {}", info.prediction_type.as_str());
    println!("latent factor: {}", vae.scale_factor());
    let (h, w) = unet.sample_size;
    println!(
        "default size: {}x{} (width x height)",
        w * vae.scale_factor(),
        h * vae.scale_factor()
    );
    for (name, files) in &info.weights {
        let list: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        println!("{name:<13} {}", list.join(", "));
    }
    Ok(())
}

/// What a single-file SD checkpoint holds, from its header.
fn inspect_checkpoint(args: &InspectArgs) -> Result<()> {
    use sd_models::single_file::{Checkpoint, TextEncoderKind};
    let ckpt = Checkpoint::open(&args.model)?;
    println!("model:        {}", args.model.display());
    println!("family:       {}", ckpt.family());
    println!(
        "layout:       single-file checkpoint (original {} names)",
        if ckpt.family() == "sdxl" {
            "SGM"
        } else {
            "LDM"
        }
    );
    println!(
        "text encoder: {}",
        match ckpt.text_encoder {
            TextEncoderKind::Clip => "CLIP (cond_stage_model.transformer.)",
            TextEncoderKind::OpenClip =>
                "OpenCLIP (cond_stage_model.model.; its last layer unused)",
            TextEncoderKind::XlDual =>
                "SDXL: CLIP (conditioner.embedders.0.transformer.) and OpenCLIP with projection (conditioner.embedders.1.model.)",
        }
    );
    println!(
        "vae:          {}",
        if ckpt.has_vae {
            "included (first_stage_model.)"
        } else {
            "none (generate and serve need --vae FILE)"
        }
    );
    let unet = ckpt.infer_unet_config(ckpt.default_prediction())?;
    let inpainting = unet["in_channels"] == serde_json::json!(9);
    println!(
        "variant:      {}",
        if inpainting {
            "inpaint"
        } else {
            "base (turbo models are told by their scheduler, not the tensors)"
        }
    );
    println!(
        "unet:         blocks {}, {} layers per block, cross-attention width {}, {} projections{}",
        unet["block_out_channels"],
        unet["layers_per_block"],
        unet["cross_attention_dim"],
        if unet["use_linear_projection"] == serde_json::json!(true) {
            "linear"
        } else {
            "convolutional"
        },
        if inpainting {
            ", inpainting (9 input channels)"
        } else {
            ""
        }
    );
    let mut dtypes: std::collections::BTreeMap<String, usize> = Default::default();
    let mut params = 0usize;
    // SAFETY: read-only map of a file that must not change while it is read.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&args.model) }?;
    for (_, view) in st.tensors() {
        *dtypes
            .entry(format!("{:?}", view.dtype()).to_lowercase())
            .or_default() += 1;
        params += view.shape().iter().product::<usize>();
    }
    let types: Vec<String> = dtypes.iter().map(|(t, n)| format!("{t} x {n}")).collect();
    println!("dtypes:       {}", types.join(", "));
    println!("parameters:   {params}");
    println!(
        "prediction:   {} unless --prediction-type says otherwise (not in the tensors; as diffusers' from_single_file assumes)",
        ckpt.default_prediction().as_str()
    );
    match &args.components {
        Some(dir) => println!(
            "components:   {} (configs, tokenizer, scheduler)",
            dir.display()
        ),
        None => match sd_models::loader::cached_tokenizer(ckpt.family()) {
            Some(t) => println!(
                "components:   none given: configs inferred, tokenizer from {}",
                t.display()
            ),
            None => println!(
                "components:   none given: configs inferred, tokenizer from the built-in CLIP vocabulary (none in the Hugging Face cache)"
            ),
        },
    }
    Ok(())
}
