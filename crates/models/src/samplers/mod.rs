//! Samplers (diffusers schedulers) and the torch-compatible random number generator.

pub mod rng;
