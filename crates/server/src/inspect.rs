//! `sd-worker inspect`: what a model folder holds.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A Stable Diffusion or FLUX.1 diffusers folder (with model_index.json), or a FLUX
    /// transformer file (.safetensors with the original key names, or .gguf).
    #[arg(env = "SD_MODEL")]
    pub model: PathBuf,
    /// With a transformer file: the diffusers FLUX folder that would provide the rest
    /// (checked to be one).
    #[arg(long, env = "SD_COMPONENTS")]
    pub components: Option<PathBuf>,
}

pub fn run(args: InspectArgs) -> Result<()> {
    if args.components.is_some() && !args.model.is_file() {
        anyhow::bail!(
            "--components goes with a transformer file; {} is a folder",
            args.model.display()
        );
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
            crate::generate_flux::DEFAULT_SAMPLE_SIZE * info.latent_factor
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
