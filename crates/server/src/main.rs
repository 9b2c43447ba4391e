//! `sd-worker`: a Stable Diffusion image-generation worker.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc for ordinary blocks, and mapped regions kept for reuse
/// for large ones ([`allocator`] says why). glibc hands every block over 32 MB straight back
/// to the kernel on free, so each large activation of the next layer page-faults and is zeroed
/// again: on the SD 1.5 VAE decode at 512x512 (2-core EPYC, f32) 36.9 s with glibc against
/// 17.6 s with mimalloc never purging (BENCHMARKS.md).
#[cfg(not(test))]
#[global_allocator]
static GLOBAL: allocator::WorkerAlloc = allocator::WorkerAlloc::new();

/// The unit tests' allocator: the fuzz harnesses' bound on a single allocation.
#[cfg(test)]
#[global_allocator]
static TEST_ALLOC: sd_fuzz::BoundedAlloc = sd_fuzz::BoundedAlloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`, the same in mimalloc 2
/// and 3; the Rust bindings do not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory stays with the process for the next layer and the next job instead of being
/// returned to the kernel after 10 ms (mimalloc's default), as a GPU caching allocator does
/// (purging after 10 ms makes an SD 1.5 UNet step 16.1 s instead of 11.2 s); large blocks are
/// kept by [`allocator`] within its bound. With `MIMALLOC_PURGE_DELAY` set (milliseconds),
/// mimalloc purges after that delay and freed large blocks go back at once.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets an option value; mimalloc reads options atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    } else {
        #[cfg(not(test))]
        GLOBAL.return_freed();
    }
}

mod allocator;
mod api;
mod bench;
mod device;
mod generate;
mod inspect;
mod json;
mod listen;
mod model_args;
mod native;
mod parity;
mod prometheus;
mod register;
mod serve;

/// Stable Diffusion image-generation worker on candle.
#[derive(Parser, Debug)]
#[command(name = "sd-worker", version, about, long_about = None)]
struct Cli {
    /// How 3x3 convolutions run on the CPU in f32: winograd (F(4x4, 3x3) on images at least
    /// 16 a side, a quarter of the multiplications; an SD 1.5 UNet step's output differs from
    /// the direct products' by at most 4e-5 of its RMS, a VAE decode by at most 1 level of 255,
    /// see the README) or direct (the same products as PyTorch).
    #[arg(long, global = true, env = "SD_CONV", value_enum, default_value_t = Conv::Winograd)]
    conv: Conv,
    #[command(subcommand)]
    command: Command,
}

/// The `--conv` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Conv {
    Winograd,
    Direct,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate images from a prompt and write them as PNG files.
    Generate(Box<generate::GenerateArgs>),
    /// Serve the model over HTTP: a job queue with progress and previews over SSE.
    Serve(Box<serve::ServeArgs>),
    /// Print what was detected in a model folder or file, without loading the weights.
    Inspect(inspect::InspectArgs),
    /// Time CLIP encode, one UNet step and VAE decode on the full-size SD 1.5
    /// architecture with random weights (and the SDXL UNet and VAE, the FLUX transformer).
    Bench(bench::BenchArgs),
    /// Run the diffusers parity fixtures (tiny random models in the repository's `fixtures`
    /// folder and the images diffusers made from them) on a device and dtype, and report each
    /// case's error.
    Parity(parity::ParityArgs),
}

fn main() -> ExitCode {
    keep_freed_memory();
    // A bug must still end in one line on stderr, not a multi-line panic report.
    std::panic::set_hook(Box::new(|info| {
        // A dependency's panic that the caller turns into an error is not a bug to report.
        if sd_models::error::panic_is_caught() {
            return;
        }
        let message: Vec<String> = info
            .to_string()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        eprintln!(
            "error: internal error (please report): {}",
            message.join(" ")
        );
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                // --help / --version: print as clap does, on stdout, and succeed.
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                return ExitCode::FAILURE;
            }
            // One line: clap's message up to its usage section, which starts "error: ".
            let rendered = e.render().to_string();
            let message: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .flat_map(str::split_whitespace)
                .collect();
            eprintln!("{} (see --help)", message.join(" "));
            return ExitCode::FAILURE;
        }
    };
    use sd_models::modules::conv_kernel::{set_conv_algorithm, ConvAlgorithm};
    set_conv_algorithm(match cli.conv {
        Conv::Winograd => ConvAlgorithm::Winograd,
        Conv::Direct => ConvAlgorithm::Direct,
    });
    let result = match cli.command {
        Command::Generate(args) => generate::run(*args),
        Command::Serve(args) => serve::run(*args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Parity(args) => parity::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the source error looks like.
            let message = format!("{e:#}");
            let message: Vec<&str> = message.split_whitespace().collect();
            eprintln!("error: {}", message.join(" "));
            ExitCode::FAILURE
        }
    }
}
