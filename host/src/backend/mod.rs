//! Backend seams: the task store, the queue, the blob store and the component registry.
//!
//! The controller and the client reach storage only through these traits, so a second
//! backend (Azure Storage) plugs in without touching them. Operations take and return
//! batches where a backend can group them: leasing many messages and finishing many tasks
//! fit one SQLite transaction.

pub mod azure;
pub mod sqlite;

use std::any::Any;
use std::io::{Read, Write};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::record::{QueueMessage, Status, TaskRecord};
use crate::{Error, Result};

/// A message leased from the queue: invisible to other consumers until its lease expires.
#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    /// Queue-assigned message id.
    pub message_id: String,
    /// Receipt of this lease. Every extension returns a new one, and only the newest
    /// receipt can delete, extend or release the message.
    pub pop_receipt: String,
    /// Number of times the message has been leased, this lease included.
    pub dequeue_count: u32,
    /// Raw message text.
    pub body: String,
    /// When the message was first enqueued.
    pub inserted_at: DateTime<Utc>,
    /// When this lease expires unless it is extended, by the queue's clock.
    pub visible_at: DateTime<Utc>,
    /// When this lease expires by this host's monotonic clock: the visibility timeout counted
    /// from just before the request that took or last extended it, so no later than
    /// `visible_at`. Unlike `visible_at`, it can be compared with this host's time even when
    /// this host's wall clock differs from the queue's.
    pub held_until: Instant,
}

/// Time after which [`instant_after`] places an instant that `Instant` cannot hold.
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// Returns the instant `duration` from now on the monotonic clock, or one 30 years from
/// now when the sum overflows, so that no duration a caller passes can panic.
pub(crate) fn instant_after(duration: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(duration)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// A message to enqueue.
#[derive(Clone, Debug)]
pub struct OutgoingMessage {
    pub body: String,
    /// Delay before the message first becomes visible.
    pub delay: Duration,
}

impl OutgoingMessage {
    /// Creates a message from a queue message body, visible at once.
    pub fn new(message: &QueueMessage) -> Self {
        OutgoingMessage {
            body: message.to_python_json(),
            delay: Duration::ZERO,
        }
    }
}

/// A message moved aside because it could not be processed.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct DeadLetter {
    /// Id of the dead letter.
    pub id: String,
    pub body: String,
    pub reason: String,
    pub dequeue_count: u32,
    #[serde(with = "crate::record::required_time")]
    pub dead_lettered_at: DateTime<Utc>,
    /// Task id the message names, when it could be read.
    pub row_key: Option<String>,
    pub resource_id: Option<String>,
}

/// Filter for listing tasks.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub status: Option<Status>,
    pub task_type: Option<String>,
    pub resource_id: Option<String>,
    /// Maximum number of records; `None` means all.
    pub limit: Option<usize>,
}

/// The start of an attempt, written when a worker begins to run a leased task.
#[derive(Clone, Debug)]
pub struct AttemptStart {
    pub resource_id: String,
    pub task_id: String,
    pub attempt: u32,
    pub component_digest: String,
    pub component_version: u32,
    pub host_id: String,
    pub start_time: DateTime<Utc>,
}

/// Decides whether the attempt of a freshly leased task begins at once. Returns the attempt
/// start and the caller's own data for it (the daemon passes the component version it
/// chose), or `None` to leave every check to the caller.
pub type BeginDecision = dyn Fn(&Lease, &QueueMessage, &TaskRecord) -> Option<(AttemptStart, Box<dyn Any + Send>)>
    + Send
    + Sync;

/// A message leased by [`Backend::lease_and_begin`].
pub struct LeasedTask {
    pub lease: Lease,
    /// The attempt begun under the lease, or `None` when none was.
    pub begun: Option<BegunAttempt>,
}

/// An attempt that [`Backend::lease_and_begin`] began: the record is RUNNING under the lease.
pub struct BegunAttempt {
    /// The record as read before the attempt began.
    pub record: TaskRecord,
    pub start: AttemptStart,
    /// The data that the decision returned with `start`, handed back untouched.
    pub token: Box<dyn Any + Send>,
}

/// Progress of a running task, written periodically while it runs.
#[derive(Clone, Debug)]
pub struct ProgressUpdate {
    pub resource_id: String,
    pub task_id: String,
    pub percent: u8,
    pub message: String,
}

/// A terminal outcome to record, together with the lease it was computed under.
#[derive(Clone, Debug)]
pub struct Finish {
    pub lease: Lease,
    /// The full record with its terminal status.
    pub record: TaskRecord,
    /// Reason to move the message to the dead letters with, in place of deleting it.
    pub dead_letter: Option<String>,
}

/// Result of a write that is fenced by a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fenced {
    /// The write was stored.
    Written,
    /// The lease expired and another consumer took the message over, so nothing was written.
    LeaseLost,
}

/// Task records, in an active and a finished table.
#[async_trait]
pub trait TaskStore: Send + Sync {
    /// Inserts a new record into the active table. Fails when the task id already exists.
    async fn insert_task(&self, record: &TaskRecord) -> Result<()>;

    /// Deletes a record from the active table, undoing `insert_task` when a later step
    /// of a submit fails.
    async fn delete_task(&self, resource_id: &str, task_id: &str) -> Result<()>;

    /// Reads a record from the active table, then from the finished one. Without a
    /// resource id the lookup is by task id alone.
    async fn get_task(
        &self,
        resource_id: Option<&str>,
        task_id: &str,
    ) -> Result<Option<TaskRecord>>;

    /// Reads many records, each as `get_task` with its resource id would. A backend that
    /// can read them in one call overrides the default, which reads them one by one.
    async fn get_tasks(&self, keys: &[(String, String)]) -> Result<Vec<Option<TaskRecord>>> {
        let mut records = Vec::with_capacity(keys.len());
        for (resource_id, task_id) in keys {
            records.push(self.get_task(Some(resource_id), task_id).await?);
        }
        Ok(records)
    }

    /// Lists records of both tables, newest first.
    async fn list_tasks(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>>;

    /// Writes the latest progress of running tasks.
    async fn update_progress(&self, updates: &[ProgressUpdate]) -> Result<()>;

    /// Cancels a task: a queued one becomes CANCELLED at once, a running one is marked
    /// so that its daemon stops it.
    async fn request_cancel(
        &self,
        resource_id: Option<&str>,
        task_id: &str,
    ) -> Result<CancelOutcome>;

    /// Returns true when a cancellation was requested for a running task.
    async fn cancel_requested(&self, resource_id: &str, task_id: &str) -> Result<bool>;

    /// Deletes up to `limit` finished records whose end time is before `before`, oldest
    /// first, and returns them so that the caller can delete their blobs.
    async fn prune_finished(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<TaskRecord>> {
        let _ = (before, limit);
        Err(Error::Invalid(
            "this backend cannot prune finished tasks".to_owned(),
        ))
    }
}

/// Outcome of `request_cancel`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The task had not started; it is now CANCELLED and will never start.
    Cancelled,
    /// The task is running; its daemon sets the cancellation flag and stops it.
    Requested,
    /// The task had already finished with this status.
    AlreadyFinished(Status),
    /// No task has this id.
    NotFound,
}

/// Outcome of `submit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Submitted {
    /// The task was created.
    Created,
    /// A task with the same idempotency key exists; nothing was written.
    Existing {
        task_id: String,
        resource_id: String,
    },
}

/// Outcome of [`Backend::submit_many`].
#[derive(Debug)]
pub struct SubmittedBatch {
    /// The outcome of each stored item, in request order. The stored items are always the
    /// first ones of the request.
    pub submitted: Vec<Submitted>,
    /// The error that stopped the call, so that the items from index `submitted.len()` on
    /// were not stored. `None` when every item was stored.
    pub error: Option<Error>,
}

/// A queue with the semantics of Azure Storage Queues.
#[async_trait]
pub trait TaskQueue: Send + Sync {
    /// Enqueues messages.
    async fn enqueue(&self, messages: &[OutgoingMessage]) -> Result<()>;

    /// Leases up to `max` visible messages, oldest first, hiding each for `visibility`.
    async fn lease(&self, max: usize, visibility: Duration) -> Result<Vec<Lease>>;

    /// Extends a lease by `visibility` from now, returning the lease with its new receipt.
    /// Returns `None` when the lease was lost.
    async fn extend(&self, lease: &Lease, visibility: Duration) -> Result<Option<Lease>>;

    /// Makes a leased message visible again after `delay`, keeping its dequeue count.
    async fn release(&self, lease: &Lease, delay: Duration) -> Result<Fenced>;

    /// Deletes leased messages. Each entry reports whether that lease was still held.
    async fn delete(&self, leases: &[Lease]) -> Result<Vec<Fenced>>;

    /// Moves a leased message to the dead-letter table with a reason.
    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<Fenced>;

    /// Lists dead letters, newest first.
    async fn list_dead_letters(&self) -> Result<Vec<DeadLetter>>;

    /// Sends a dead letter back to the queue. Returns false when no dead letter has that id.
    /// Fails with [`Error::Invalid`] when `id` does not have the form of this backend's ids.
    async fn requeue_dead_letter(&self, id: &str) -> Result<bool>;

    /// Number of messages in the queue, visible or not.
    async fn queue_length(&self) -> Result<u64>;

    /// Waits until the queue may have changed or `timeout` passes. A backend without a
    /// cheap change signal just sleeps.
    async fn wait_for_change(&self, timeout: Duration);

    /// Prepares the backend for a long-running daemon in this process, which a daemon calls
    /// once before it leases. On SQLite the daemon then listens for other processes'
    /// wake-ups, so that `wait_for_change` ends as soon as a message is enqueued, and
    /// checkpoints the WAL on a background thread, so that submitters rarely do. Clients do
    /// not call it: they must not take wake-ups meant for a daemon. The default does nothing.
    fn serve_daemon(&self) {}
}

/// Operations that span the store and the queue.
///
/// A backend whose store and queue share a database does each in one transaction. The
/// `saga` module gives the compensating versions for backends that cannot.
#[async_trait]
pub trait Backend: TaskStore + TaskQueue {
    /// Name of this backend as in `STORE_MODE`: `sqlite` or `azure`.
    fn store_mode(&self) -> &str;

    /// Names of the active and finished tables.
    fn table_names(&self) -> (&str, &str);

    /// Stores the record and enqueues its message, both or neither. When the record has an
    /// idempotency key that an existing task has, nothing is written, and the call returns
    /// that task, or fails with [`Error::IdempotencyConflict`] when the task's activity
    /// type, resource id or payload differs from the record's.
    async fn submit(&self, record: &TaskRecord, message: &OutgoingMessage) -> Result<Submitted>;

    /// Returns the ages of a message, counted from when it was enqueued, at which a record
    /// that the message names and that is missing may still be stored by the submit that
    /// enqueued it. Within the range the daemon looks for the record again later; outside
    /// it a message without a record is dead-lettered. The default, `None`, is for a
    /// backend whose submit stores the record and the message together, so that a message
    /// without a record never gets one.
    fn pending_record_window(&self) -> Option<Range<Duration>> {
        None
    }

    /// Stores many records and enqueues their messages, each item as [`Backend::submit`]
    /// would, in order. An idempotency key that an earlier item of the same call used
    /// returns that item's task. Stops at the first failure, so the stored items are the
    /// first ones of `items`.
    ///
    /// A backend that can write many items in one transaction overrides the default, which
    /// calls `submit` for each item.
    async fn submit_many(&self, items: Vec<(TaskRecord, OutgoingMessage)>) -> SubmittedBatch {
        let mut submitted = Vec::with_capacity(items.len());
        for (record, message) in &items {
            match self.submit(record, message).await {
                Ok(outcome) => submitted.push(outcome),
                Err(error) => {
                    return SubmittedBatch {
                        submitted,
                        error: Some(error),
                    }
                }
            }
        }
        SubmittedBatch {
            submitted,
            error: None,
        }
    }

    /// Marks a leased task RUNNING for a new attempt, unless the lease was lost.
    async fn begin_attempt(&self, lease: &Lease, start: &AttemptStart) -> Result<Fenced>;

    /// Marks many leased tasks RUNNING. One entry per item: a missing record is that
    /// entry's error; an error of the whole call means nothing was written. A backend that
    /// can do this in one transaction overrides the default, which calls `begin_attempt`
    /// for each item.
    async fn begin_attempts(&self, items: &[(Lease, AttemptStart)]) -> Result<Vec<Result<Fenced>>> {
        let mut results = Vec::with_capacity(items.len());
        for (lease, start) in items {
            results.push(match self.begin_attempt(lease, start).await {
                Err(Error::NotFound(message)) => Err(Error::NotFound(message)),
                other => Ok(other?),
            });
        }
        Ok(results)
    }

    /// Leases up to `max` messages like [`TaskQueue::lease`] and begins, for each whose active
    /// record `decide` accepts, the attempt it returns, as `begin_attempt` would. A backend
    /// that can do all of it in one transaction overrides the default, which only leases
    /// and leaves every attempt to the caller.
    async fn lease_and_begin(
        &self,
        max: usize,
        visibility: Duration,
        decide: Arc<BeginDecision>,
    ) -> Result<Vec<LeasedTask>> {
        let _ = decide;
        let leases = self.lease(max, visibility).await?;
        Ok(leases
            .into_iter()
            .map(|lease| LeasedTask { lease, begun: None })
            .collect())
    }

    /// Stores each terminal record in the finished table, removes it from the active one and
    /// deletes its message, or moves the message to the dead letters when the entry gives a
    /// reason. Each entry is written only if its lease is still held.
    async fn finish(&self, finishes: &[Finish]) -> Result<Vec<Fenced>>;

    /// Stores the record of a failed attempt that will be retried (status CREATED) and makes
    /// its message visible again after `delay`, only if the lease is still held.
    async fn retry(&self, lease: &Lease, record: &TaskRecord, delay: Duration) -> Result<Fenced>;

    /// Stores a terminal record for a task whose message is already gone or was never
    /// leased, without a lease and without checking the task's state, so the caller must
    /// know that no attempt of the task runs. The daemon uses [`Backend::end_unstarted`]
    /// instead.
    async fn finish_without_lease(&self, record: &TaskRecord) -> Result<()>;

    /// Ends a task that has not started, without a lease: when its active record is
    /// CREATED, sets `status`, `error_message` and the end time, stores the record in the
    /// finished table and removes it from the active one. Returns false, and writes
    /// nothing, when the active table has no record of the task or its record is not
    /// CREATED, for example because an attempt runs, whose worker stores the outcome.
    async fn end_unstarted(
        &self,
        resource_id: &str,
        task_id: &str,
        status: Status,
        error_message: &str,
    ) -> Result<bool>;

    /// Returns the blob store of this backend.
    fn blobs(&self) -> &dyn BlobStore;

    /// Returns the component registry of this backend.
    fn registry(&self) -> &dyn ComponentRegistry;
}

/// Where a blob lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobRef {
    pub container: String,
    pub name: String,
}

/// A blob being written. Nothing is visible under the blob's name until `commit`.
pub trait BlobWriter: Write + Send {
    /// Makes the written bytes visible under the blob's name.
    fn commit(self: Box<Self>) -> Result<()>;
}

/// Blobs in containers. Names are validated so that no name escapes its container.
pub trait BlobStore: Send + Sync {
    /// Stores a whole blob, replacing one of the same name.
    fn put(&self, blob: &BlobRef, data: &mut dyn Read) -> Result<u64>;

    /// Opens a blob for reading, with its size.
    fn open(&self, blob: &BlobRef) -> Result<(Box<dyn ReadAt>, u64)>;

    /// Starts writing a blob.
    fn create(&self, blob: &BlobRef) -> Result<Box<dyn BlobWriter>>;

    /// Deletes a blob; deleting a missing blob is not an error.
    fn delete(&self, blob: &BlobRef) -> Result<()>;

    /// Local path of a blob, when the store keeps blobs on this machine.
    fn local_path(&self, blob: &BlobRef) -> Option<PathBuf>;
}

/// Random-access reading, so that a guest can read its input blob from any offset.
pub trait ReadAt: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns 0 at the end.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize>;
}

/// Per-activity-type limits stored with each registered component version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Limits {
    /// Fuel budget of one attempt (roughly one unit per wasm instruction).
    pub fuel: u64,
    /// Maximum linear memory of one instance, in MiB.
    pub memory_mib: u64,
    /// Wall-clock deadline of one attempt, in seconds.
    pub timeout_secs: u64,
    /// Maximum size of the output blob, in bytes.
    pub max_output_bytes: u64,
    /// When failed attempts are tried again.
    pub retry: RetryPolicy,
}

/// Retries of failed attempts: exponential backoff with jitter, up to a cap.
///
/// Retried: guest errors marked retryable, traps, limits hit and deadlines. Not retried:
/// invalid input and errors the guest marks as failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 means no retry.
    pub max_attempts: u32,
    /// Delay before the first retry, in milliseconds; it doubles for each later one.
    pub backoff_ms: u64,
    /// Maximum delay between attempts, in milliseconds.
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            backoff_ms: 1_000,
            max_backoff_ms: 60_000,
        }
    }
}

impl RetryPolicy {
    /// Returns the delay before attempt `next_attempt` (2 for the first retry): the backoff
    /// doubled per earlier retry, capped, then scaled by a random factor in [0.5, 1.0] so
    /// that tasks failing together do not retry together.
    pub fn delay_before(&self, next_attempt: u32) -> Duration {
        let doublings = next_attempt.saturating_sub(2).min(32);
        let base = self
            .backoff_ms
            .saturating_mul(1u64 << doublings)
            .min(self.max_backoff_ms);
        let jitter = 0.5 + rand::random::<f64>() * 0.5;
        Duration::from_millis((base as f64 * jitter) as u64)
    }
}

/// One registered version of a component for an activity type.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ComponentVersion {
    pub activity_type: String,
    /// Version number, counting from 1 per activity type.
    pub version: u32,
    /// SHA-256 of the `.wasm` file, in lower-case hex.
    pub digest: String,
    pub limits: Limits,
    #[serde(with = "crate::record::required_time")]
    pub registered_at: DateTime<Utc>,
    /// True for the version new tasks run on.
    pub current: bool,
}

/// Component versions per activity type, with their `.wasm` files and compiled artifacts.
#[async_trait]
pub trait ComponentRegistry: Send + Sync {
    /// Adds a new version and makes it current. The wasm bytes are stored by digest, and
    /// `artifact` is the compiled form for the engine with hash `engine_hash`.
    async fn register(
        &self,
        activity_type: &str,
        digest: &str,
        wasm: &[u8],
        engine_hash: &str,
        artifact: &[u8],
        limits: Limits,
    ) -> Result<ComponentVersion>;

    /// The current version of an activity type.
    async fn current(&self, activity_type: &str) -> Result<Option<ComponentVersion>>;

    /// Returns all versions of all types (or of one type), oldest first.
    async fn versions(&self, activity_type: Option<&str>) -> Result<Vec<ComponentVersion>>;

    /// Makes the version before the current one current again. After [`unregister`], makes
    /// the version current that was current when the type was unregistered. Returns the new
    /// current version.
    ///
    /// [`unregister`]: ComponentRegistry::unregister
    async fn rollback(&self, activity_type: &str) -> Result<ComponentVersion>;

    /// Takes an activity type out of service: no version of it stays current, so daemons
    /// treat its tasks as those of a type never registered. Every version and its files
    /// are kept. `rollback` makes the version that was current until now current again,
    /// and `register` adds a new current one. Returns the version that was current, with
    /// `current` false. Fails when the type has no version, or none is current.
    async fn unregister(&self, activity_type: &str) -> Result<ComponentVersion>;

    /// Returns a counter that changes whenever any registration, rollback or
    /// unregistration happens.
    async fn generation(&self) -> Result<u64>;

    /// Reads the `.wasm` bytes of a digest.
    async fn load_wasm(&self, digest: &str) -> Result<Vec<u8>>;

    /// Path of the compiled artifact for a digest and engine hash, if one is stored locally.
    async fn artifact_path(&self, digest: &str, engine_hash: &str) -> Result<Option<PathBuf>>;

    /// Stores a compiled artifact (for example one compiled by a host whose engine differs).
    async fn store_artifact(
        &self,
        digest: &str,
        engine_hash: &str,
        artifact: &[u8],
    ) -> Result<PathBuf>;
}
