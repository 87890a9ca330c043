//! `bgw`: background tasks as WebAssembly components, each run in its own sandbox.
//!
//! A [`client::WorkflowClient`] starts tasks: it stores the input blob, writes a
//! [`record::TaskRecord`] and enqueues a [`record::QueueMessage`]. The [`daemon`] leases
//! messages, runs the activity's component from the [`registry`] in a fresh [`sandbox`]
//! and records the outcome. All state lives behind the traits in [`backend`]; the embedded
//! default is [`backend::sqlite`] with a local [`blob`] folder; [`backend::azure`] keeps
//! everything in an Azure Storage account.

pub mod backend;
pub mod batch;
pub mod blob;
pub mod client;
pub mod config;
pub mod daemon;
pub mod error;
pub mod record;
pub mod registry;
pub mod sandbox;
pub mod validate;

pub use error::{Error, Result};

use std::sync::Arc;

/// Opens the backend the settings select: the embedded SQLite one, or Azure Storage.
pub fn open_backend(settings: &config::Settings) -> Result<Arc<dyn backend::Backend>> {
    open_backend_with(settings, true)
}

/// Opens the backend the settings select, failing instead of creating a new SQLite file
/// when none exists, so that a mistyped data directory is not read as an empty store.
pub fn open_existing_backend(settings: &config::Settings) -> Result<Arc<dyn backend::Backend>> {
    open_backend_with(settings, false)
}

fn open_backend_with(
    settings: &config::Settings,
    create: bool,
) -> Result<Arc<dyn backend::Backend>> {
    settings.check_supported()?;
    if let Some(options) = settings
        .azure_options()
        .filter(|_| settings.store_mode == config::StoreMode::Azure)
    {
        return Ok(Arc::new(backend::azure::AzureBackend::open(options)?));
    }
    let path = settings.db_path();
    if !create && !path.exists() {
        return Err(Error::NotFound(format!(
            "no bgw database at {}: check --data-dir, BGW_DATA_DIR and SQLITE_DB_PATH, or create one with `bgw register` or `bgw submit`",
            path.display()
        )));
    }
    let sqlite = backend::sqlite::SqliteBackend::open(settings.sqlite_options())?;
    Ok(Arc::new(sqlite))
}
