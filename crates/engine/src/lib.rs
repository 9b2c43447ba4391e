//! The generation engine of sd-worker, between the model crate and the interfaces.
//!
//! Every interface (the CLI, the native job API, the compatibility APIs) reads its own wire
//! format into one [`request::RequestDraft`], which [`validate::validate`] checks against the
//! loaded model ([`spec::ModelSpec`]) and the worker's [`validate::Limits`] into a
//! [`request::GenerationRequest`]. [`jobs::Engine`] queues those requests and runs them on one
//! thread that owns the model ([`backend::Model`], loaded by [`load`] from a model source
//! resolved by [`source`] and [`hub`]), and reports typed [`events`]. Images come in and go out
//! through [`images`].
//!
//! No HTTP, no command-line parsing and no async runtime here: the engine's handle is a plain
//! `Send + Sync` value whose event channels an async caller may await.

pub mod backend;
pub mod events;
pub mod hub;
pub mod images;
pub mod jobs;
pub mod limits;
pub mod load;
pub mod metrics;
pub mod request;
pub mod source;
pub mod spec;
pub mod validate;

pub use jobs::Engine;
pub use request::{GenerationRequest, Operation, PreviewKind, RequestDraft};
pub use spec::ModelSpec;
pub use validate::{validate, InvalidField, Limits};
