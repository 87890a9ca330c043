//! `bgw-guest`: write a background-workflows activity as a WebAssembly component.
//!
//! An activity is a Rust function that takes a [`Context`] and a payload decoded from JSON,
//! and returns a result encoded as JSON or an [`Error`]. [`export_activity!`] turns it into
//! the `run` export of the WIT world `activity` (`wit/activity.wit`), so the crate builds
//! into a component the `bgw` host can run.
//!
//! - [`Context`] reaches the host: [`TaskInfo`], the [`InputBlob`] and [`OutputBlob`], the
//!   task log, progress and cancellation.
//! - [`Error`] carries one of the three WIT `task-error` kinds, which decide whether the
//!   host retries the task. A payload that does not decode into the function's payload type
//!   becomes [`ErrorKind::InvalidInput`] with the `serde_json` message.
//! - A panic is sent to the task log at error level and to stderr, then the component
//!   traps and the host records the task as failed.
//!
//! # Example
//!
//! An activity crate has `crate-type = ["cdylib"]` and builds with
//! `cargo build --release --target wasm32-wasip2`:
//!
//! ```no_run
//! use bgw_guest::{Context, Error, Result};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Payload {
//!     x: i64,
//!     #[serde(default = "two")]
//!     factor: i64,
//! }
//!
//! fn two() -> i64 {
//!     2
//! }
//!
//! #[derive(Serialize)]
//! struct Product {
//!     product: i64,
//! }
//!
//! fn multiply(ctx: &mut Context, p: Payload) -> Result<Product> {
//!     ctx.log_info("multiplying");
//!     let product = p.x.checked_mul(p.factor).ok_or_else(|| {
//!         Error::invalid_input(format!("{} * {} overflows i64", p.x, p.factor))
//!     })?;
//!     Ok(Product { product })
//! }
//!
//! bgw_guest::export_activity!(multiply);
//! ```
//!
//! Outside wasm32 the crate compiles, so activity code can be checked and unit-tested
//! natively, but every host call panics there.

#[doc(hidden)]
pub mod bindings;
mod blob;
mod context;
mod error;
mod export;

pub use blob::{InputBlob, OutputBlob, CHUNK_SIZE};
pub use context::{Context, LogLevel, TaskInfo};
pub use error::{Error, ErrorKind, Result};
#[doc(hidden)]
pub use export::__private;
