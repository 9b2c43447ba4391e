//! Tokenizers.

pub mod clip;
