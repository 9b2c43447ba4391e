//! Torch-compatible CPU random number generator (mt19937 + torch randn).
