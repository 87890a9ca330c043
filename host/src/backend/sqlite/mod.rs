//! The embedded backend: task store, queue and component registry in one SQLite file,
//! blobs in a local folder.
//!
//! One file contains the active and finished task tables (in the schema of
//! `background-workflows`, which can share the file), the queue, the dead letters and the
//! component versions. Because they share a file, [`Backend::submit`] and
//! [`Backend::finish`] write the store and the queue in one transaction.
//!
//! Writes go through a single write connection per process, owned by a writer thread that
//! commits the requests queued up meanwhile in one `BEGIN IMMEDIATE` transaction (group
//! commit, `writer.rs`). Reads use a small pool of read connections. Busy and locked errors
//! are retried with backoff for up to [`SqliteOptions::busy_timeout`], so processes that
//! share the file wait for each other instead of failing.

mod connection;
mod lifecycle;
mod queue;
pub(super) mod registry;
mod schema;
mod store;
#[cfg(test)]
mod tests;
mod wake;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;
use serde::Deserialize;

use self::connection::Database;
use crate::blob::LocalBlobStore;
use crate::record::{DEFAULT_ACTIVE_TABLE, DEFAULT_FINISHED_TABLE};
use crate::{validate, Error, Result};

/// Default queue name.
pub const DEFAULT_QUEUE: &str = "bgw-tasks";

/// Default time a call keeps retrying while another connection holds the database lock.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// SQLite's `synchronous` setting for the database file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Syncs only at WAL checkpoints. Survives a crash of the process, but a power loss
    /// or OS crash can lose the last commits. The default: it is the usual choice for WAL
    /// mode, and unbatched commits are several times faster than with `Full`.
    #[default]
    Normal,
    /// Syncs the WAL at every commit, so a commit survives a power loss. SQLite's own
    /// default.
    Full,
}

impl Synchronous {
    fn pragma_value(self) -> &'static str {
        match self {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }
}

impl std::str::FromStr for Synchronous {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "normal" => Ok(Synchronous::Normal),
            "full" => Ok(Synchronous::Full),
            _ => Err(Error::Invalid(format!(
                "invalid SQLite synchronous mode {text:?}: expected \"normal\" or \"full\""
            ))),
        }
    }
}

/// Locations of the SQLite backend's files, and the names of its tables and queue.
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// The SQLite database file. Its folder is created if missing.
    pub db_path: PathBuf,
    /// Root folder of the blob containers.
    pub blob_dir: PathBuf,
    /// Folder of the registered `.wasm` files and their compiled artifacts.
    pub component_dir: PathBuf,
    /// Table of tasks that have not finished.
    pub active_table: String,
    /// Table of finished tasks.
    pub finished_table: String,
    /// Name of the queue inside the queue table, so several queues can share one file.
    pub queue_name: String,
    pub synchronous: Synchronous,
    /// Maximum time one call retries while the database is busy or locked before it
    /// reports the error.
    pub busy_timeout: Duration,
}

impl SqliteOptions {
    /// Options with the default table names, queue name, `synchronous` and busy timeout.
    pub fn new(
        db_path: impl Into<PathBuf>,
        blob_dir: impl Into<PathBuf>,
        component_dir: impl Into<PathBuf>,
    ) -> Self {
        SqliteOptions {
            db_path: db_path.into(),
            blob_dir: blob_dir.into(),
            component_dir: component_dir.into(),
            active_table: DEFAULT_ACTIVE_TABLE.to_owned(),
            finished_table: DEFAULT_FINISHED_TABLE.to_owned(),
            queue_name: DEFAULT_QUEUE.to_owned(),
            synchronous: Synchronous::default(),
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
        }
    }

    /// Default options with everything under one folder: `bgw.db`, `blobs/` and
    /// `components/`.
    pub fn in_dir(data_dir: &Path) -> Self {
        SqliteOptions::new(
            data_dir.join("bgw.db"),
            data_dir.join("blobs"),
            data_dir.join("components"),
        )
    }
}

/// Task store, queue and component registry in one SQLite file, with a local blob store.
///
/// Several instances, in one process or in several, may open the same file.
pub struct SqliteBackend {
    shared: Arc<Shared>,
    blobs: LocalBlobStore,
}

/// The state the blocking operations need, shared with the threads that run them.
struct Shared {
    db: Database,
    active: String,
    finished: String,
    queue: String,
    component_dir: PathBuf,
}

impl SqliteBackend {
    /// Opens or creates the database and creates missing tables, indexes and columns. Also
    /// deletes the blob files that ended writers left, as
    /// [`LocalBlobStore::remove_stale_temp_files`] describes.
    ///
    /// This blocks on file I/O and may wait for other processes' locks, so call it at
    /// startup or from a blocking thread.
    pub fn open(options: SqliteOptions) -> Result<Self> {
        validate::backend_names(
            &options.active_table,
            &options.finished_table,
            &options.queue_name,
        )?;

        let db = Database::open(&options.db_path, options.synchronous, options.busy_timeout)?;
        let (active, finished) = (options.active_table.clone(), options.finished_table.clone());
        db.write_blocking(move |connection| schema::create(connection, &active, &finished))?;
        let blobs = LocalBlobStore::new(options.blob_dir);
        remove_stale_temp_files(&blobs);
        Ok(SqliteBackend {
            shared: Arc::new(Shared {
                db,
                active: options.active_table,
                finished: options.finished_table,
                queue: options.queue_name,
                component_dir: options.component_dir,
            }),
            blobs,
        })
    }

    /// Returns the path of the database file.
    pub fn db_path(&self) -> &Path {
        self.shared.db.path()
    }

    /// Returns the local blob store as its concrete type.
    pub fn local_blobs(&self) -> &LocalBlobStore {
        &self.blobs
    }

    /// Runs `op` in a write transaction on the writer thread and waits for its commit
    /// without blocking the async worker. `op` may run more than once (see
    /// [`connection::Database::write`]).
    async fn write<T, F>(&self, mut op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&Shared, &Connection) -> Result<T> + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        self.shared
            .db
            .write(move |connection| op(&shared, connection))
            .await
    }

    /// Runs `op` like [`SqliteBackend::write`], then wakes the daemon listening for this
    /// file: for writes that can make a message visible.
    async fn write_then_wake<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&Shared, &Connection) -> Result<T> + Send + 'static,
    {
        let value = self.write(op).await?;
        self.shared.db.poke();
        Ok(value)
    }

    /// Runs blocking SQLite work on tokio's blocking thread pool.
    ///
    /// SQLite calls block on disk I/O and on other processes' locks (up to the busy
    /// timeout), and would stall every task sharing an async worker thread. A panic in
    /// `op` is resumed on the caller.
    async fn run<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T> + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        match tokio::task::spawn_blocking(move || op(&shared)).await {
            Ok(result) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => Err(Error::Other(anyhow::anyhow!(
                "SQLite operation was cancelled: {error}"
            ))),
        }
    }
}

/// Deletes the blob files that writers which ended left in the blob store's temporary
/// folder. A failure is logged and does not stop the backend from opening.
fn remove_stale_temp_files(blobs: &LocalBlobStore) {
    match blobs.remove_stale_temp_files() {
        Ok(removed) if removed.files > 0 => tracing::info!(
            files = removed.files,
            bytes = removed.bytes,
            root = %blobs.root().display(),
            "removed unfinished blob files that ended processes left"
        ),
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "failed to remove unfinished blob files"),
    }
}
