//! The library's error type.

/// Errors of the `bgw` library. Messages start lower-case, quote the offending value and
/// name the limit they break.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input that breaks a documented rule: a key, a payload, a size or a name.
    #[error("{0}")]
    Invalid(String),
    /// Something looked up by key does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A wait for a task that ended before the task finished.
    #[error("{0}")]
    TimedOut(String),
    /// A component that is not valid for the activity world.
    #[error("{0}")]
    Component(String),
    /// The database failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A bulk submit that stored only its first tasks, because a later write failed. The
    /// input blobs of the tasks that were not stored have been deleted.
    #[error("stored the first {} of {total} tasks, then failed: {source}", task_ids.len())]
    PartlySubmitted {
        /// Ids of the stored tasks, in request order.
        task_ids: Vec<String>,
        /// Number of tasks in the request.
        total: usize,
        #[source]
        source: Box<Error>,
    },
    /// A submit that reused the idempotency key of an existing task with a different
    /// request. Nothing was written.
    #[error(
        "idempotency key {key:?} was already used by task {task_id} with a different {difference}: \
         the key returns that task only for the same activity type, resource id and payload, \
         so use a new key for a new task"
    )]
    IdempotencyConflict {
        key: String,
        /// The task that has the key.
        task_id: String,
        resource_id: String,
        /// The field that differs, such as `payload` or `activity type ("a", not "b")`.
        difference: String,
    },
    /// Any other failure, with its context.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
