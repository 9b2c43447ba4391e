//! Pipelines: the denoising loop from prompt to image.

pub mod flux;
pub mod preview;
pub mod resize;
pub mod sd;
pub mod sdxl;

pub use preview::latent_preview;
pub use sd::{
    GenerateParams, Generated, ImageInput, InpaintMethod, MaskImage, Progress, PromptSyntax,
    RgbImage, SdPipeline,
};
pub use sdxl::{Conditioning, MicroConditioning, XlText};
