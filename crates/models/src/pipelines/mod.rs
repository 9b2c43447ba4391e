//! Pipelines: the denoising loop from prompt to image.

pub mod sd;

pub use sd::{GenerateParams, Generated, Progress, RgbImage, SdPipeline};
