//! The client: starts activities and reads their records back.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Backend, BlobRef, CancelOutcome, ListFilter, OutgoingMessage, Submitted};
use crate::record::{QueueMessage, Status, TaskRecord};
use crate::{validate, Error, Result};

pub use crate::validate::MAX_IDEMPOTENCY_KEY_BYTES;

/// Container that `start_activity` stores input blobs in when the caller names none.
pub const INPUT_CONTAINER: &str = "bgw-input";

/// An input blob to store with a new task.
pub struct InputBlob<'a> {
    /// Container to store it in; [`INPUT_CONTAINER`] when `None`.
    pub container: Option<String>,
    /// Blob name; `<task id>/input` when `None`.
    pub name: Option<String>,
    pub data: &'a mut dyn Read,
}

/// Checks that a task's deadline comes after the end of its delay, counted from `now`,
/// because a task that may not start before its deadline could never run. A deadline
/// that has already passed is accepted without a delay: the task then ends ERROR when a
/// daemon leases it, as a task whose deadline passed in the queue does.
fn check_deadline(options: &StartOptions, now: chrono::DateTime<chrono::Utc>) -> Result<()> {
    let Some(deadline) = options.deadline.filter(|_| !options.delay.is_zero()) else {
        return Ok(());
    };
    let delay = chrono::TimeDelta::from_std(options.delay).unwrap_or(chrono::TimeDelta::MAX);
    let earliest = now.checked_add_signed(delay);
    if earliest.is_none_or(|earliest| deadline <= earliest) {
        return Err(Error::Invalid(format!(
            "invalid deadline {}: the task may not start until {:.3} s from now, so a \
             deadline before then would end it without a run",
            crate::record::format_time(&deadline),
            options.delay.as_secs_f64()
        )));
    }
    Ok(())
}

/// Formats a duration in seconds with at most three decimals and no trailing zeros, as
/// `0.3` or `2.5`.
fn seconds_text(duration: Duration) -> String {
    let text = format!("{:.3}", duration.as_secs_f64());
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// Options of `start_activity` beyond the payload.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// Delay before the task may start.
    pub delay: Duration,
    /// Key that makes a retried submit return the task the first one created. A submit
    /// that reuses the key with another activity type, resource id or payload fails with
    /// [`Error::IdempotencyConflict`]. The input blob is not compared.
    pub idempotency_key: Option<String>,
    /// Time after which the task must not start or go on running.
    pub deadline: Option<chrono::DateTime<chrono::Utc>>,
}

/// One task to start with [`WorkflowClient::start_activities`]: the arguments of
/// [`WorkflowClient::start_activity_with`].
pub struct StartRequest<'a> {
    pub activity_type: &'a str,
    pub resource_id: &'a str,
    /// The payload, a JSON object.
    pub payload_json: &'a [u8],
    pub blob: Option<InputBlob<'a>>,
    pub options: StartOptions,
}

impl<'a> StartRequest<'a> {
    /// Creates a request without an input blob, with the default options.
    pub fn new(activity_type: &'a str, resource_id: &'a str, payload_json: &'a [u8]) -> Self {
        StartRequest {
            activity_type,
            resource_id,
            payload_json,
            blob: None,
            options: StartOptions::default(),
        }
    }
}

/// Maximum pause of `wait` between two reads of a task whose store shows no change.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// Default maximum size of an input blob: 256 MiB, as the default output blob limit. The
/// limit keeps a runaway source such as `/dev/zero` from filling the blob store. The Azure
/// backend also keeps a whole blob in memory when it uploads it and when a task opens it.
pub const DEFAULT_MAX_INPUT_BLOB_BYTES: u64 = 256 * 1024 * 1024;

/// Largest input blob limit in bytes, the largest integer that a TOML file can contain.
pub const MAX_INPUT_BLOB_BYTES: u64 = i64::MAX as u64;

/// Starts activities and reads their records, on any [`Backend`].
#[derive(Clone)]
pub struct WorkflowClient {
    backend: Arc<dyn Backend>,
    database_name: String,
    max_input_blob_bytes: u64,
}

impl WorkflowClient {
    /// Creates a client. `database_name` is sent in every queue message, as the Python
    /// library does; on SQLite it is the database path.
    pub fn new(backend: Arc<dyn Backend>, database_name: impl Into<String>) -> Self {
        WorkflowClient {
            backend,
            database_name: database_name.into(),
            max_input_blob_bytes: DEFAULT_MAX_INPUT_BLOB_BYTES,
        }
    }

    /// Sets the maximum size of an input blob, [`DEFAULT_MAX_INPUT_BLOB_BYTES`] by default.
    /// A submit whose blob is larger fails with [`Error::Invalid`] and stores nothing.
    pub fn with_max_input_blob_bytes(mut self, bytes: u64) -> Self {
        self.max_input_blob_bytes = bytes;
        self
    }

    /// Returns the backend this client writes to.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Starts a task and returns its id.
    ///
    /// Stores the blob, writes the CREATED record and enqueues the message as one saga: when
    /// a later step fails, the earlier ones are undone and the error is returned.
    pub async fn start_activity(
        &self,
        activity_type: &str,
        resource_id: &str,
        payload_json: &[u8],
        blob: Option<InputBlob<'_>>,
    ) -> Result<String> {
        self.start_activity_with(
            activity_type,
            resource_id,
            payload_json,
            blob,
            &StartOptions::default(),
        )
        .await
    }

    /// Starts a task with options; see [`WorkflowClient::start_activity`].
    pub async fn start_activity_with(
        &self,
        activity_type: &str,
        resource_id: &str,
        payload_json: &[u8],
        blob: Option<InputBlob<'_>>,
        options: &StartOptions,
    ) -> Result<String> {
        let (mut record, outgoing) =
            self.new_task(activity_type, resource_id, payload_json, options)?;
        let task_id = record.row_key.clone();
        let stored_blob = match blob {
            Some(blob) => Some(self.store_input_blob(&mut record, blob)?),
            None => None,
        };

        let submitted = self.backend.submit(&record, &outgoing).await;
        match submitted {
            Err(error) => {
                if let Some(blob_ref) = &stored_blob {
                    self.delete_unused_blob(&task_id, blob_ref);
                }
                Err(error)
            }
            Ok(Submitted::Existing {
                task_id: existing,
                resource_id,
            }) => {
                self.discard_duplicate_blob(&task_id, &stored_blob, &existing, &resource_id)
                    .await;
                tracing::debug!(task_id = %existing, activity_type, "idempotency key matched an existing task");
                Ok(existing)
            }
            Ok(Submitted::Created) => {
                tracing::debug!(task_id = %task_id, activity_type, resource_id, "started activity");
                Ok(task_id)
            }
        }
    }

    /// Starts many tasks and returns their ids, in the order of `requests`.
    ///
    /// Every request is checked as [`WorkflowClient::start_activity_with`] checks it before
    /// anything is stored, and one invalid request rejects the whole call with an
    /// [`Error::Invalid`] that names its index. Then the input blobs are stored, and the
    /// records and messages are written in as few transactions as the backend allows: on
    /// SQLite up to 1,000 tasks per transaction, on other backends one by one. A request
    /// with the idempotency key of an existing task, or of an earlier request in the call,
    /// returns that task's id instead of starting a task, and stops the call with
    /// [`Error::IdempotencyConflict`] as a failed write when the requests differ.
    ///
    /// When a write fails, the input blobs of the tasks that were not stored are deleted.
    /// If no task was stored, the call returns the write's error. Otherwise it returns
    /// [`Error::PartlySubmitted`] with the ids of the stored tasks, which are the first ones
    /// of `requests`.
    ///
    /// ```no_run
    /// # async fn example(client: &bgw::client::WorkflowClient) -> bgw::Result<()> {
    /// use bgw::client::StartRequest;
    ///
    /// let payloads: Vec<String> = (0..100).map(|x| format!(r#"{{"x":{x}}}"#)).collect();
    /// let requests = payloads
    ///     .iter()
    ///     .map(|payload| StartRequest::new("multiply", "orders", payload.as_bytes()))
    ///     .collect();
    /// let task_ids = client.start_activities(requests).await?;
    /// assert_eq!(task_ids.len(), 100);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start_activities(&self, requests: Vec<StartRequest<'_>>) -> Result<Vec<String>> {
        let total = requests.len();
        let mut tasks = Vec::with_capacity(total);
        let mut blobs = Vec::with_capacity(total);
        for (index, request) in requests.into_iter().enumerate() {
            let task = self
                .new_task(
                    request.activity_type,
                    request.resource_id,
                    request.payload_json,
                    &request.options,
                )
                .map_err(|error| invalid_request(index, total, error))?;
            tasks.push(task);
            blobs.push(request.blob);
        }

        let stored_blobs = self.store_input_blobs(&mut tasks, blobs)?;
        let task_ids: Vec<String> = tasks
            .iter()
            .map(|(record, _)| record.row_key.clone())
            .collect();
        let batch = self.backend.submit_many(tasks).await;

        // Blobs of duplicates and of tasks that were not stored belong to no task.
        let mut started = Vec::with_capacity(batch.submitted.len());
        for (index, submitted) in batch.submitted.into_iter().enumerate() {
            match submitted {
                Submitted::Created => started.push(task_ids[index].clone()),
                Submitted::Existing {
                    task_id,
                    resource_id,
                } => {
                    self.discard_duplicate_blob(
                        &task_ids[index],
                        &stored_blobs[index],
                        &task_id,
                        &resource_id,
                    )
                    .await;
                    started.push(task_id);
                }
            }
        }
        let Some(error) = batch.error else {
            tracing::debug!(tasks = total, "started activities");
            return Ok(started);
        };
        for index in started.len()..total {
            self.delete_unused_blob_of(&task_ids[index], &stored_blobs[index]);
        }
        if started.is_empty() {
            return Err(error);
        }
        Err(Error::PartlySubmitted {
            task_ids: started,
            total,
            source: Box::new(error),
        })
    }

    /// Checks a request and builds its CREATED record and queue message, with a new task id.
    fn new_task(
        &self,
        activity_type: &str,
        resource_id: &str,
        payload_json: &[u8],
        options: &StartOptions,
    ) -> Result<(TaskRecord, OutgoingMessage)> {
        validate::activity_type(activity_type)?;
        validate::resource_id(resource_id)?;
        let payload = validate::payload(payload_json)?;
        // The guest receives the payload byte for byte as submitted; it was checked above.
        let payload_text = String::from_utf8(payload_json.to_vec())
            .map_err(|error| Error::Invalid(format!("payload is not valid UTF-8: {error}")))?;
        if let Some(key) = &options.idempotency_key {
            validate::idempotency_key(key)?;
        }

        check_deadline(options, chrono::Utc::now())?;

        let task_id = uuid::Uuid::now_v7().to_string();
        let mut record = TaskRecord::new(&task_id, resource_id, activity_type, &payload_text);
        record.idempotency_key = options.idempotency_key.clone();
        record.deadline_time = options.deadline;

        let (active_table, finished_table) = self.backend.table_names();
        let message = QueueMessage {
            resource_id: resource_id.to_owned(),
            row_key: task_id,
            task_type: activity_type.to_owned(),
            payload,
            store_mode: self.backend.store_mode().to_owned(),
            active_table_name: active_table.to_owned(),
            finished_table_name: finished_table.to_owned(),
            database_name: self.database_name.clone(),
        };
        let mut outgoing = OutgoingMessage::new(&message);
        outgoing.delay = options.delay;
        Ok((record, outgoing))
    }

    /// Stores a task's input blob and names it in the record.
    ///
    /// The size is checked while the data is copied, because a pipe or a device has no size
    /// to check first. A blob over the limit fails with [`Error::Invalid`].
    fn store_input_blob(&self, record: &mut TaskRecord, blob: InputBlob<'_>) -> Result<BlobRef> {
        let own_name = blob.name.is_none();
        let blob_ref = BlobRef {
            container: blob.container.unwrap_or_else(|| INPUT_CONTAINER.to_owned()),
            name: blob
                .name
                .unwrap_or_else(|| format!("{}/input", record.row_key)),
        };
        let mut data = LimitedReader {
            inner: blob.data,
            limit: self.max_input_blob_bytes,
            read: 0,
        };
        if let Err(error) = self.backend.blobs().put(&blob_ref, &mut data) {
            // A failed upload may still have been stored, for example when the service
            // stored it and its response was lost. A blob named after the task belongs to
            // no other task, so it is deleted. A name the caller chose may be another
            // task's input, so it is left alone.
            if own_name {
                self.delete_unused_blob(&record.row_key, &blob_ref);
            }
            if data.read > data.limit {
                return Err(Error::Invalid(format!(
                    "input blob exceeds the limit of {} bytes: the copy stopped after {} \
                     bytes and nothing was stored (submit.max_input_blob_bytes in the \
                     configuration file sets the limit)",
                    data.limit, data.read
                )));
            }
            return Err(error);
        }
        record.container_name = Some(blob_ref.container.clone());
        record.blob_name = Some(blob_ref.name.clone());
        Ok(blob_ref)
    }

    /// Stores the input blob of each task that has one. When one fails, deletes the blobs
    /// stored before it and returns the error with the task's index.
    fn store_input_blobs(
        &self,
        tasks: &mut [(TaskRecord, OutgoingMessage)],
        blobs: Vec<Option<InputBlob<'_>>>,
    ) -> Result<Vec<Option<BlobRef>>> {
        let total = tasks.len();
        let mut stored = Vec::with_capacity(total);
        for (index, ((record, _), blob)) in tasks.iter_mut().zip(blobs).enumerate() {
            let Some(blob) = blob else {
                stored.push(None);
                continue;
            };
            match self.store_input_blob(record, blob) {
                Ok(blob_ref) => stored.push(Some(blob_ref)),
                Err(error) => {
                    for (earlier, blob_ref) in stored.iter().enumerate() {
                        self.delete_unused_blob_of(&tasks[earlier].0.row_key, blob_ref);
                    }
                    return Err(with_context(
                        error,
                        format!(
                            "failed to store the input blob of the task at index {index} of \
                             {total}, so no task was started"
                        ),
                    ));
                }
            }
        }
        Ok(stored)
    }

    /// Deletes the blob stored for a submit that matched an existing task by idempotency
    /// key, unless the existing task uses that same blob. A retried submit that names its
    /// blob explicitly has just written the existing task's input again, so it must stay.
    async fn discard_duplicate_blob(
        &self,
        new_task_id: &str,
        blob_ref: &Option<BlobRef>,
        existing_task_id: &str,
        existing_resource_id: &str,
    ) {
        let Some(blob_ref) = blob_ref else { return };
        let existing = self
            .backend
            .get_task(Some(existing_resource_id), existing_task_id)
            .await;
        let shared = match &existing {
            Ok(Some(record)) => {
                record.container_name.as_deref() == Some(blob_ref.container.as_str())
                    && record.blob_name.as_deref() == Some(blob_ref.name.as_str())
            }
            // Keep the blob when the existing task cannot be read: a leaked blob is better
            // than a task that lost its input.
            Ok(None) | Err(_) => true,
        };
        if !shared {
            self.delete_unused_blob(new_task_id, blob_ref);
        }
    }

    fn delete_unused_blob_of(&self, task_id: &str, blob_ref: &Option<BlobRef>) {
        if let Some(blob_ref) = blob_ref {
            self.delete_unused_blob(task_id, blob_ref);
        }
    }

    fn delete_unused_blob(&self, task_id: &str, blob_ref: &BlobRef) {
        if let Err(error) = self.backend.blobs().delete(blob_ref) {
            tracing::warn!(
                task_id = %task_id,
                container = %blob_ref.container,
                blob = %blob_ref.name,
                %error,
                "failed to delete the input blob of a task that was not created"
            );
        }
    }

    /// Cancels a task; see [`crate::backend::TaskStore::request_cancel`].
    pub async fn cancel(&self, task_id: &str, resource_id: Option<&str>) -> Result<CancelOutcome> {
        validate::task_id(task_id)?;
        self.backend.request_cancel(resource_id, task_id).await
    }

    /// Reads a task's record. Without a resource id the lookup is by task id alone.
    pub async fn get_task(
        &self,
        task_id: &str,
        resource_id: Option<&str>,
    ) -> Result<Option<TaskRecord>> {
        self.backend.get_task(resource_id, task_id).await
    }

    /// Returns a task's status, or `None` when no task has this id.
    pub async fn get_status(
        &self,
        task_id: &str,
        resource_id: Option<&str>,
    ) -> Result<Option<Status>> {
        Ok(self
            .get_task(task_id, resource_id)
            .await?
            .map(|record| record.status))
    }

    /// Returns a completed task's result, or `None` while it has none, as the Python
    /// library's `get_result` does.
    pub async fn get_result(
        &self,
        task_id: &str,
        resource_id: Option<&str>,
    ) -> Result<Option<serde_json::Value>> {
        let Some(record) = self.get_task(task_id, resource_id).await? else {
            return Ok(None);
        };
        if record.status != Status::Completed || record.output_payload.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&record.output_payload)
            .map(Some)
            .map_err(|error| {
                Error::Invalid(format!(
                    "task {task_id} has an OutputPayload that is not valid JSON: {error}"
                ))
            })
    }

    /// Waits until a task reaches a terminal status and returns its record.
    /// `timeout` of `None` waits without end.
    pub async fn wait(
        &self,
        task_id: &str,
        resource_id: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<TaskRecord> {
        let started = Instant::now();
        loop {
            let status = match self.get_task(task_id, resource_id).await? {
                Some(record) if record.status.is_terminal() => return Ok(record),
                Some(record) => record.status,
                None => return Err(Error::NotFound(task_not_found(task_id, resource_id))),
            };
            let mut pause = WAIT_POLL;
            if let Some(limit) = timeout {
                let elapsed = started.elapsed();
                if elapsed >= limit {
                    return Err(Error::TimedOut(format!(
                        "timed out after {} s waiting for task {task_id}, which is still {status}",
                        seconds_text(limit)
                    )));
                }
                pause = pause.min(limit - elapsed);
            }
            // Returns as soon as the store changes, so a finished task is seen at once.
            self.backend.wait_for_change(pause).await;
        }
    }

    /// Lists task records of both tables, newest first.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>> {
        self.backend.list_tasks(filter).await
    }
}

/// Returns the message for a task that a lookup did not find, naming the resource id the
/// lookup was limited to.
pub fn task_not_found(task_id: &str, resource_id: Option<&str>) -> String {
    match resource_id {
        Some(resource_id) => format!("task {task_id} not found under resource {resource_id:?}"),
        None => format!("task {task_id} not found"),
    }
}

/// A reader that fails once more than `limit` bytes were read. It reads at most one byte
/// past the limit, so that a store that buffers the data buffers no more than that.
struct LimitedReader<'a> {
    inner: &'a mut dyn Read,
    limit: u64,
    /// Bytes read so far.
    read: u64,
}

impl Read for LimitedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let allowed = (self.limit - self.read.min(self.limit)).saturating_add(1);
        let length = buf
            .len()
            .min(usize::try_from(allowed).unwrap_or(usize::MAX));
        let count = self.inner.read(&mut buf[..length])?;
        self.read += count as u64;
        if self.read > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("input blob exceeds the limit of {} bytes", self.limit),
            ));
        }
        Ok(count)
    }
}

/// Rejects a bulk submit because of the request at `index`.
fn invalid_request(index: usize, total: usize, error: Error) -> Error {
    with_context(
        error,
        format!("the task at index {index} of {total} is invalid, so no task was started"),
    )
}

/// Puts `context` before the message of `error`, keeping the kind of error.
fn with_context(error: Error, context: String) -> Error {
    match error {
        Error::Invalid(message) => Error::Invalid(format!("{context}: {message}")),
        Error::NotFound(message) => Error::NotFound(format!("{context}: {message}")),
        other => Error::Other(anyhow::Error::from(other).context(context)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_limited(data: &[u8], limit: u64) -> (io::Result<Vec<u8>>, u64) {
        let mut source = data;
        let mut reader = LimitedReader {
            inner: &mut source,
            limit,
            read: 0,
        };
        let mut copy = Vec::new();
        let result = reader.read_to_end(&mut copy).map(|_| copy);
        (result, reader.read)
    }

    #[test]
    fn deadline_must_follow_delay() {
        let now = chrono::Utc::now();
        let options = |delay_secs: u64, deadline_secs: i64| StartOptions {
            delay: Duration::from_secs(delay_secs),
            deadline: Some(now + chrono::TimeDelta::seconds(deadline_secs)),
            ..StartOptions::default()
        };

        let error = check_deadline(&options(5, 2), now).unwrap_err().to_string();
        assert!(
            error.contains("the task may not start until 5.000 s from now"),
            "{error}"
        );
        assert!(
            check_deadline(&options(5, 5), now).is_err(),
            "a deadline at the start"
        );
        assert!(check_deadline(&options(2, 5), now).is_ok());
        assert!(
            check_deadline(&options(0, -1), now).is_ok(),
            "a passed deadline without a delay"
        );
        assert!(check_deadline(&StartOptions::default(), now).is_ok());
    }

    #[test]
    fn limited_reader_passes_data_up_to_limit() {
        for (size, limit) in [(0, 0), (10, 10), (10, 11), (100_000, 100_000)] {
            let data = vec![7u8; size];
            let (result, read) = read_limited(&data, limit);
            assert_eq!(result.unwrap(), data, "{size} bytes, limit {limit}");
            assert_eq!(read, size as u64);
        }
    }

    #[test]
    fn limited_reader_stops_one_byte_past_limit() {
        for (size, limit) in [(1, 0), (11, 10), (100_000, 1_000)] {
            let (result, read) = read_limited(&vec![7u8; size], limit);
            let error = result.unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::FileTooLarge);
            assert!(error
                .to_string()
                .contains(&format!("limit of {limit} bytes")));
            assert_eq!(read, limit + 1, "{size} bytes, limit {limit}");
        }
    }
}
