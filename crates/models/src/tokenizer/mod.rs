//! Tokenizers.

pub mod clip;
pub mod t5;
