//! Operations that span the task tables and the queue, each in one transaction.

use async_trait::async_trait;
use rusqlite::Connection;

use std::sync::Arc;
use std::time::Duration;

use super::connection::is_busy;
use super::queue::{
    dead_letter, delete_message, fenced, insert_message, lease, lease_holds, release_message,
};
use super::schema::TASK_COLUMNS;
use super::store::{
    delete_from, find_task, insert_new_task, move_to_finished, task_from_row, write_task,
};
use super::{Shared, SqliteBackend};
use crate::backend::{
    AttemptStart, Backend, BeginDecision, BegunAttempt, BlobStore, ComponentRegistry, Fenced,
    Finish, Lease, LeasedTask, OutgoingMessage, Submitted, SubmittedBatch,
};
use crate::record::{format_time, QueueMessage, Status, TaskRecord};
use crate::{Error, Result};

/// Maximum number of items that [`Backend::submit_many`] writes in one transaction, which
/// bounds how long the daemon's leases and finishes wait for the write lock. `bgw-bench
/// submit` stored 80,000 to 90,000 tasks/s in bulk on a 2-core virtual machine, about
/// 12 µs per task, so a full transaction keeps the lock for about 12 ms.
const MAX_SUBMIT_TRANSACTION: usize = 1_000;

#[async_trait]
impl Backend for SqliteBackend {
    fn store_mode(&self) -> &str {
        "sqlite"
    }

    fn table_names(&self) -> (&str, &str) {
        (&self.shared.active, &self.shared.finished)
    }

    async fn submit(&self, record: &TaskRecord, message: &OutgoingMessage) -> Result<Submitted> {
        let record = record.clone();
        let message = message.clone();
        self.write_then_wake(move |shared, connection| {
            submit_one(connection, shared, &record, &message)
        })
        .await
    }

    /// Writes the items in transactions of up to [`MAX_SUBMIT_TRANSACTION`] items, one after
    /// the other, and wakes the daemon after each commit. A transaction that fails stores
    /// none of its items and ends the call.
    async fn submit_many(&self, items: Vec<(TaskRecord, OutgoingMessage)>) -> SubmittedBatch {
        let mut submitted = Vec::with_capacity(items.len());
        let mut items = items.into_iter();
        loop {
            let chunk: Vec<_> = items.by_ref().take(MAX_SUBMIT_TRANSACTION).collect();
            if chunk.is_empty() {
                break;
            }
            let written = self
                .write_then_wake(move |shared, connection| {
                    chunk
                        .iter()
                        .map(|(record, message)| submit_one(connection, shared, record, message))
                        .collect::<Result<Vec<_>>>()
                })
                .await;
            match written {
                Ok(outcomes) => submitted.extend(outcomes),
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

    async fn retry(&self, lease: &Lease, record: &TaskRecord, delay: Duration) -> Result<Fenced> {
        let lease = lease.clone();
        let record = record.clone();
        self.write_then_wake(move |shared, connection| {
            if cancel_was_requested(connection, shared, &record)? {
                // A cancellation arrived while the failed attempt ran: it wins over the
                // retry, so the task ends CANCELLED instead of running again.
                if !delete_message(connection, &shared.queue, &lease)? {
                    return Ok(Fenced::LeaseLost);
                }
                let mut cancelled = record.clone();
                cancelled.status = Status::Cancelled;
                cancelled.cancel_requested = true;
                cancelled.error_message = Some(format!(
                    "cancelled while running; the attempt ended with: {}",
                    record.error_message.as_deref().unwrap_or_default()
                ));
                move_to_finished(connection, shared, &cancelled)?;
                return Ok(Fenced::Written);
            }
            if !in_table(connection, &shared.active, &record)? {
                // `bgw cancel` ended the CREATED task, for example one waiting for a
                // component, while this lease held its message. Writing the record back
                // would put the task in both tables, so the message is acknowledged.
                return Ok(fenced(delete_message(connection, &shared.queue, &lease)?));
            }
            if !release_message(connection, &shared.queue, &lease, delay)? {
                return Ok(Fenced::LeaseLost);
            }
            write_task(connection, &shared.active, &record, true)?;
            Ok(Fenced::Written)
        })
        .await
    }

    async fn begin_attempt(&self, lease: &Lease, start: &AttemptStart) -> Result<Fenced> {
        let lease = lease.clone();
        let start = start.clone();
        self.write(move |shared, connection| begin_attempt(connection, shared, &lease, &start))
            .await
    }

    async fn begin_attempts(&self, items: &[(Lease, AttemptStart)]) -> Result<Vec<Result<Fenced>>> {
        let items = items.to_vec();
        self.write(move |shared, connection| {
            let mut results = Vec::with_capacity(items.len());
            for (lease, start) in &items {
                results.push(match begin_attempt(connection, shared, lease, start) {
                    Err(Error::NotFound(message)) => Err(Error::NotFound(message)),
                    other => Ok(other?),
                });
            }
            Ok(results)
        })
        .await
    }

    async fn lease_and_begin(
        &self,
        max: usize,
        visibility: Duration,
        decide: Arc<BeginDecision>,
    ) -> Result<Vec<LeasedTask>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        self.write(move |shared, connection| {
            let leases = lease(connection, shared, max, visibility)?;
            let mut tasks = Vec::with_capacity(leases.len());
            for lease in leases {
                let begun = begin_leased(connection, shared, &lease, &*decide)?;
                tasks.push(LeasedTask { lease, begun });
            }
            Ok(tasks)
        })
        .await
    }

    async fn finish(&self, finishes: &[Finish]) -> Result<Vec<Fenced>> {
        let finishes = finishes.to_vec();
        self.write(move |shared, connection| {
            finishes
                .iter()
                .map(|finish| finish_one(connection, shared, finish))
                .collect()
        })
        .await
    }

    async fn finish_without_lease(&self, record: &TaskRecord) -> Result<()> {
        let record = record.clone();
        self.write(move |shared, connection| move_to_finished(connection, shared, &record))
            .await
    }

    async fn end_unstarted(
        &self,
        resource_id: &str,
        task_id: &str,
        status: Status,
        error_message: &str,
    ) -> Result<bool> {
        let (resource_id, task_id) = (resource_id.to_owned(), task_id.to_owned());
        let error_message = error_message.to_owned();
        self.write(move |shared, connection| {
            let found = find_task(connection, &shared.active, Some(&resource_id), &task_id)?;
            let Some(mut record) = found.filter(|record| record.status == Status::Created) else {
                return Ok(false);
            };
            record.status = status;
            record.error_message = Some(error_message.clone());
            record.set_end_time_now();
            move_to_finished(connection, shared, &record)?;
            Ok(true)
        })
        .await
    }

    fn blobs(&self) -> &dyn BlobStore {
        &self.blobs
    }

    fn registry(&self) -> &dyn ComponentRegistry {
        self
    }
}

/// Stores a new record and its message, or returns the task that already has the
/// record's idempotency key. Fails with [`Error::IdempotencyConflict`] when that task was
/// submitted with a different request.
fn submit_one(
    connection: &Connection,
    shared: &Shared,
    record: &TaskRecord,
    message: &OutgoingMessage,
) -> Result<Submitted> {
    if let Some(key) = &record.idempotency_key {
        if let Some(existing) = find_by_idempotency_key(connection, shared, key)? {
            existing.check_same_request(record)?;
            return Ok(Submitted::Existing {
                task_id: existing.row_key,
                resource_id: existing.partition_key,
            });
        }
    }
    insert_new_task(connection, shared, record).map_err(|error| {
        name_failed_step(
            error,
            format!(
                "failed to store the record of task {} in table {}",
                record.row_key, shared.active
            ),
        )
    })?;
    insert_message(connection, &shared.queue, &message.body, message.delay).map_err(|error| {
        name_failed_step(
            error,
            format!(
                "failed to enqueue the message of task {} on queue {}",
                record.row_key, shared.queue
            ),
        )
    })?;
    Ok(Submitted::Created)
}

/// Puts the failed step of a submit before a database error, in one message that a
/// caller's `to_string` shows whole. A busy or locked database stays [`Error::Sqlite`],
/// because the writer retries the transaction on that error alone.
fn name_failed_step(error: Error, step: String) -> Error {
    match error {
        Error::Sqlite(source) if !is_busy(&source) => {
            Error::Other(anyhow::anyhow!("{step}: {source}"))
        }
        other => other,
    }
}

/// Marks the task RUNNING for a new attempt if the lease still holds.
///
/// Fails with [`Error::NotFound`] when the active table has no record for the task, for
/// example when the record already moved to the finished table.
fn begin_attempt(
    connection: &Connection,
    shared: &Shared,
    lease: &Lease,
    start: &AttemptStart,
) -> Result<Fenced> {
    if !lease_holds(connection, &shared.queue, lease)? {
        return Ok(Fenced::LeaseLost);
    }
    mark_running(connection, shared, start)?;
    Ok(Fenced::Written)
}

/// Marks the task RUNNING for a new attempt, without checking a lease.
fn mark_running(connection: &Connection, shared: &Shared, start: &AttemptStart) -> Result<()> {
    let sql = format!(
        "UPDATE {} SET status = ?1, start_time = ?2, attempt = ?3, component_digest = ?4,
             component_version = ?5, host_id = ?6, end_time = NULL, error_message = NULL,
             component_wait_start = NULL
         WHERE resource_id = ?7 AND row_key = ?8",
        shared.active
    );
    let updated = connection.prepare_cached(&sql)?.execute(rusqlite::params![
        Status::Running.as_str(),
        format_time(&start.start_time),
        start.attempt,
        start.component_digest,
        start.component_version,
        start.host_id,
        start.resource_id,
        start.task_id,
    ])?;
    if updated == 0 {
        return Err(Error::NotFound(format!(
            "task {:?} of resource {:?} is not in table {}",
            start.task_id, start.resource_id, shared.active
        )));
    }
    Ok(())
}

/// Begins the attempt of a message leased in this transaction when its record is in the
/// active table and `decide` accepts it. Leaves a message that does not parse, or names
/// no active record, to the caller, which dead-letters it or acknowledges a duplicate.
fn begin_leased(
    connection: &Connection,
    shared: &Shared,
    lease: &Lease,
    decide: &BeginDecision,
) -> Result<Option<BegunAttempt>> {
    let Ok(message) = QueueMessage::parse(&lease.body) else {
        return Ok(None);
    };
    let found = find_task(
        connection,
        &shared.active,
        Some(&message.resource_id),
        &message.row_key,
    )?;
    let Some(record) = found else {
        return Ok(None);
    };
    let Some((start, token)) = decide(lease, &message, &record) else {
        return Ok(None);
    };
    // The lease was taken in this transaction, so it holds.
    mark_running(connection, shared, &start)?;
    Ok(Some(BegunAttempt {
        record,
        start,
        token,
    }))
}

/// Deletes the message, or moves it to the dead letters when the finish gives a reason.
/// Only if that lease still held, stores the record in the finished table and removes it
/// from the active one.
fn finish_one(connection: &Connection, shared: &Shared, finish: &Finish) -> Result<Fenced> {
    let removed = match &finish.dead_letter {
        Some(reason) => dead_letter(connection, &shared.queue, &finish.lease, reason)?,
        None => fenced(delete_message(connection, &shared.queue, &finish.lease)?),
    };
    if removed == Fenced::LeaseLost {
        return Ok(Fenced::LeaseLost);
    }
    let record = &finish.record;
    // Deleting the active record first returns, at no extra cost, whether it was still
    // there. A task whose record left the active table while this lease held its message,
    // because `bgw cancel` ended it CREATED, keeps the outcome stored first.
    let was_active = delete_from(
        connection,
        &shared.active,
        &record.partition_key,
        &record.row_key,
    )?;
    if !was_active && in_table(connection, &shared.finished, record)? {
        tracing::info!(
            task_id = %record.row_key,
            "task already ended while its message was leased: keeping its stored outcome"
        );
        return Ok(Fenced::Written);
    }
    write_task(connection, &shared.finished, record, true)?;
    Ok(Fenced::Written)
}

/// Returns the task that already has this idempotency key, in either table.
fn find_by_idempotency_key(
    connection: &Connection,
    shared: &Shared,
    key: &str,
) -> Result<Option<TaskRecord>> {
    for table in [&shared.active, &shared.finished] {
        let sql = format!("SELECT {TASK_COLUMNS} FROM {table} WHERE idempotency_key = ?1 LIMIT 1");
        let mut statement = connection.prepare_cached(&sql)?;
        let mut rows = statement.query([key])?;
        if let Some(row) = rows.next()? {
            return Ok(Some(task_from_row(row, table)?));
        }
    }
    Ok(None)
}

/// Returns true when `table` has a record with the key of `record`.
fn in_table(connection: &Connection, table: &str, record: &TaskRecord) -> Result<bool> {
    let sql =
        format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE resource_id = ?1 AND row_key = ?2)");
    let exists = connection
        .prepare_cached(&sql)?
        .query_row([&record.partition_key, &record.row_key], |row| row.get(0))?;
    Ok(exists)
}

/// Returns true when the active record of the task has a cancellation request.
fn cancel_was_requested(
    connection: &Connection,
    shared: &Shared,
    record: &TaskRecord,
) -> Result<bool> {
    let sql = format!(
        "SELECT coalesce(cancel_requested, 0) FROM {} WHERE resource_id = ?1 AND row_key = ?2",
        shared.active
    );
    let mut statement = connection.prepare_cached(&sql)?;
    let mut rows = statement.query([&record.partition_key, &record.row_key])?;
    Ok(match rows.next()? {
        Some(row) => row.get::<_, i64>(0)? != 0,
        None => false,
    })
}
