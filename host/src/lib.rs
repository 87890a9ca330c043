//! `bgw`: background tasks as WebAssembly components, each run in its own sandbox.
//!
//! A [`client::WorkflowClient`] starts tasks: it stores the input blob, writes a
//! [`record::TaskRecord`] and enqueues a [`record::QueueMessage`]. The [`daemon`] leases
//! messages, runs the activity's component from the [`registry`] in a fresh [`sandbox`]
//! and records the outcome. All state lives behind the traits in [`backend`]; the embedded
//! default is [`backend::sqlite`] with a local [`blob`] folder.

pub mod backend;
pub mod blob;
pub mod config;
pub mod error;
pub mod record;
pub mod validate;

pub use error::{Error, Result};
