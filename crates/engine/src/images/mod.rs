//! Images in and out of the engine: init images and masks decoded from the bytes a request
//! carries (size-checked from the header before any pixel is decoded), and result PNGs with
//! the AUTOMATIC1111-style `parameters` text.

pub mod input;
pub mod jpeg;
pub mod png;
