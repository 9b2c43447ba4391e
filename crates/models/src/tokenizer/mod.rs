//! Tokenizers.

pub mod a1111;
pub mod clip;
pub mod t5;
