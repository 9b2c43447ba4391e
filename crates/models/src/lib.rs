//! Model modules, tokenizers, samplers and pipelines for sd-worker.
//!
//! This crate knows nothing about HTTP or async runtimes: it loads weights with candle,
//! builds networks from the model's own config files and runs the denoising loop.

pub mod error;
pub mod loader;
pub mod lora;
pub mod modules;
pub mod pipelines;
pub mod samplers;
pub mod single_file;
pub mod tokenizer;

pub use error::{Error, Result};
