//! The queue table, with the semantics of Azure Storage Queues: a lease hides a message
//! until its visibility time, and only the newest pop receipt can change the message.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension};

use super::schema::{task_column_names, TASK_COLUMNS};
use super::{Shared, SqliteBackend};
use crate::backend::{instant_after, DeadLetter, Fenced, Lease, OutgoingMessage, TaskQueue};
use crate::record::{QueueMessage, Status};
use crate::validate::quote;
use crate::{Error, Result};

/// A fresh pop receipt for each row an UPDATE touches: 128 random bits in hex.
const NEW_RECEIPT: &str = "lower(hex(randomblob(16)))";

#[async_trait]
impl TaskQueue for SqliteBackend {
    async fn enqueue(&self, messages: &[OutgoingMessage]) -> Result<()> {
        let messages = messages.to_vec();
        self.write_then_wake(move |shared, connection| {
            for message in &messages {
                insert_message(connection, &shared.queue, &message.body, message.delay)?;
            }
            Ok(())
        })
        .await
    }

    async fn lease(&self, max: usize, visibility: Duration) -> Result<Vec<Lease>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        self.write(move |shared, connection| lease(connection, shared, max, visibility))
            .await
    }

    async fn extend(&self, lease: &Lease, visibility: Duration) -> Result<Option<Lease>> {
        let lease = lease.clone();
        let sql = format!(
            "UPDATE bgw_queue SET pop_receipt = {NEW_RECEIPT}, visible_at_ms = ?1
             WHERE id = ?2 AND pop_receipt = ?3 AND queue_name = ?4
             RETURNING pop_receipt, visible_at_ms"
        );
        let Some(id) = message_id(&lease) else {
            return Ok(None);
        };
        self.write(move |shared, connection| {
            let held_until = instant_after(visibility);
            let visible_at = now_ms().saturating_add(duration_ms(visibility));
            let renewed = connection
                .prepare_cached(&sql)?
                .query_row(
                    rusqlite::params![visible_at, id, lease.pop_receipt, shared.queue],
                    |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)),
                )
                .optional()?;
            Ok(renewed.map(|(pop_receipt, visible_at_ms)| Lease {
                pop_receipt,
                visible_at: time_from_ms(visible_at_ms),
                held_until,
                ..lease.clone()
            }))
        })
        .await
    }

    async fn release(&self, lease: &Lease, delay: Duration) -> Result<Fenced> {
        let lease = lease.clone();
        self.write_then_wake(move |shared, connection| {
            Ok(fenced(release_message(
                connection,
                &shared.queue,
                &lease,
                delay,
            )?))
        })
        .await
    }

    async fn delete(&self, leases: &[Lease]) -> Result<Vec<Fenced>> {
        let leases = leases.to_vec();
        self.write(move |shared, connection| {
            leases
                .iter()
                .map(|lease| Ok(fenced(delete_message(connection, &shared.queue, lease)?)))
                .collect()
        })
        .await
    }

    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<Fenced> {
        let lease = lease.clone();
        let reason = reason.to_owned();
        self.write(move |shared, connection| {
            dead_letter(connection, &shared.queue, &lease, &reason)
        })
        .await
    }

    async fn list_dead_letters(&self) -> Result<Vec<DeadLetter>> {
        self.run(move |shared| {
            shared.db.read(|connection| {
                let mut statement = connection.prepare_cached(
                    "SELECT id, body, reason, dequeue_count, dead_lettered_at_ms, row_key,
                            resource_id
                     FROM bgw_dead_letters WHERE queue_name = ?1 ORDER BY id DESC",
                )?;
                let letters = statement
                    .query_map([&shared.queue], |row| {
                        Ok(DeadLetter {
                            id: row.get::<_, i64>(0)?.to_string(),
                            body: row.get(1)?,
                            reason: row.get(2)?,
                            dequeue_count: row.get(3)?,
                            dead_lettered_at: time_from_ms(row.get(4)?),
                            row_key: row.get(5)?,
                            resource_id: row.get(6)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(letters)
            })
        })
        .await
    }

    async fn requeue_dead_letter(&self, id: &str) -> Result<bool> {
        let Some(id) = id.parse::<i64>().ok().filter(|id| *id > 0) else {
            return Err(Error::Invalid(format!(
                "invalid dead letter id {}: on SQLite it is a whole number from 1, as `bgw \
                 dead-letters` lists it",
                quote(id)
            )));
        };
        self.write_then_wake(move |shared, connection| requeue_dead_letter(connection, shared, id))
            .await
    }

    async fn queue_length(&self) -> Result<u64> {
        self.run(move |shared| {
            shared.db.read(|connection| {
                let count: i64 = connection
                    .prepare_cached("SELECT count(*) FROM bgw_queue WHERE queue_name = ?1")?
                    .query_row([&shared.queue], |row| row.get(0))?;
                Ok(count as u64)
            })
        })
        .await
    }

    fn serve_daemon(&self) {
        self.shared.db.listen_for_wakeups();
        self.shared.db.start_checkpointer();
    }

    async fn wait_for_change(&self, timeout: Duration) {
        let result = self
            .run(move |shared| {
                shared.db.wait_for_change(timeout);
                Ok(())
            })
            .await;
        if let Err(error) = result {
            tracing::warn!(%error, "waiting for a queue change failed");
        }
    }
}

/// Adds a message that becomes visible after `delay`.
pub(super) fn insert_message(
    connection: &Connection,
    queue: &str,
    body: &str,
    delay: Duration,
) -> Result<()> {
    let now = now_ms();
    connection
        .prepare_cached(
            "INSERT INTO bgw_queue (queue_name, body, visible_at_ms, dequeue_count, inserted_at_ms)
             VALUES (?1, ?2, ?3, 0, ?4)",
        )?
        .execute(rusqlite::params![
            queue,
            body,
            now.saturating_add(duration_ms(delay)),
            now
        ])?;
    Ok(())
}

/// Deletes a leased message if its lease still holds, returning whether it did.
/// Makes a leased message visible again after `delay`, returning whether the lease held.
pub(super) fn release_message(
    connection: &Connection,
    queue: &str,
    lease: &Lease,
    delay: Duration,
) -> Result<bool> {
    let Some(id) = message_id(lease) else {
        return Ok(false);
    };
    let visible_at = now_ms().saturating_add(duration_ms(delay));
    let changed = connection
        .prepare_cached(
            "UPDATE bgw_queue SET pop_receipt = NULL, visible_at_ms = ?1
             WHERE id = ?2 AND pop_receipt = ?3 AND queue_name = ?4",
        )?
        .execute(rusqlite::params![visible_at, id, lease.pop_receipt, queue])?;
    Ok(changed > 0)
}

pub(super) fn delete_message(connection: &Connection, queue: &str, lease: &Lease) -> Result<bool> {
    let Some(id) = message_id(lease) else {
        return Ok(false);
    };
    let deleted = connection
        .prepare_cached(
            "DELETE FROM bgw_queue WHERE id = ?1 AND pop_receipt = ?2 AND queue_name = ?3",
        )?
        .execute(rusqlite::params![id, lease.pop_receipt, queue])?;
    Ok(deleted > 0)
}

/// Returns whether the message of a lease still carries that lease's pop receipt.
pub(super) fn lease_holds(connection: &Connection, queue: &str, lease: &Lease) -> Result<bool> {
    let Some(id) = message_id(lease) else {
        return Ok(false);
    };
    let holds = connection
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM bgw_queue WHERE id = ?1 AND pop_receipt = ?2 AND queue_name = ?3)",
        )?
        .query_row(rusqlite::params![id, lease.pop_receipt, queue], |row| row.get(0))?;
    Ok(holds)
}

pub(super) fn fenced(written: bool) -> Fenced {
    match written {
        true => Fenced::Written,
        false => Fenced::LeaseLost,
    }
}

/// Leases the oldest visible messages in one statement, so that two connections can never
/// lease the same message: the write lock of `BEGIN IMMEDIATE` orders them.
pub(super) fn lease(
    connection: &Connection,
    shared: &Shared,
    max: usize,
    visibility: Duration,
) -> Result<Vec<Lease>> {
    let sql = lease_sql();
    let held_until = instant_after(visibility);
    let now = now_ms();
    let visible_at = now.saturating_add(duration_ms(visibility));
    let limit = i64::try_from(max).unwrap_or(i64::MAX);

    let mut statement = connection.prepare_cached(&sql)?;
    let mut leases = statement
        .query_map(
            rusqlite::params![visible_at, shared.queue, now, limit],
            |row| {
                Ok(Lease {
                    message_id: row.get::<_, i64>(0)?.to_string(),
                    pop_receipt: row.get(1)?,
                    dequeue_count: row.get(2)?,
                    body: row.get(3)?,
                    inserted_at: time_from_ms(row.get(4)?),
                    visible_at: time_from_ms(row.get(5)?),
                    held_until,
                })
            },
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    // RETURNING yields rows in no defined order, and ids grow with insertion.
    leases.sort_by_key(|lease| lease.message_id.parse::<i64>().unwrap_or(i64::MAX));
    Ok(leases)
}

/// The lease statement: `?1` the new visibility time, `?2` the queue, `?3` now, `?4` the
/// maximum number of messages.
///
/// The limit is read through a subquery. SQLite's planner reads a bare bound `LIMIT` value
/// when it prepares the statement, and then re-prepares the statement every time that
/// parameter is bound again, which cost about 5% of the daemon's time.
fn lease_sql() -> String {
    format!(
        "UPDATE bgw_queue
         SET pop_receipt = {NEW_RECEIPT}, visible_at_ms = ?1, dequeue_count = dequeue_count + 1
         WHERE id IN (
             SELECT id FROM bgw_queue
             WHERE queue_name = ?2 AND visible_at_ms <= ?3
             ORDER BY visible_at_ms, id
             LIMIT (SELECT ?4))
         RETURNING id, pop_receipt, dequeue_count, body, inserted_at_ms, visible_at_ms"
    )
}

/// Moves a leased message to the dead letters if its lease still holds.
pub(super) fn dead_letter(
    connection: &Connection,
    queue: &str,
    lease: &Lease,
    reason: &str,
) -> Result<Fenced> {
    let Some(id) = message_id(lease) else {
        return Ok(Fenced::LeaseLost);
    };
    let removed: Option<(String, u32)> = connection
        .prepare_cached(
            "DELETE FROM bgw_queue WHERE id = ?1 AND pop_receipt = ?2 AND queue_name = ?3
             RETURNING body, dequeue_count",
        )?
        .query_row(rusqlite::params![id, lease.pop_receipt, queue], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .optional()?;
    let Some((body, dequeue_count)) = removed else {
        return Ok(Fenced::LeaseLost);
    };

    let (row_key, resource_id) = QueueMessage::task_key_of(&body);
    connection
        .prepare_cached(
            "INSERT INTO bgw_dead_letters
                 (queue_name, body, reason, dequeue_count, dead_lettered_at_ms, row_key, resource_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(rusqlite::params![
            queue,
            body,
            reason,
            dequeue_count,
            now_ms(),
            row_key,
            resource_id
        ])?;
    Ok(Fenced::Written)
}

/// Puts a dead letter back on the queue with a dequeue count of 0. A task record in the
/// finished table with status ERROR goes back to the active table as CREATED, so that the
/// task runs again.
fn requeue_dead_letter(connection: &Connection, shared: &Shared, id: i64) -> Result<bool> {
    let removed: Option<(String, Option<String>, Option<String>)> = connection
        .prepare_cached(
            "DELETE FROM bgw_dead_letters WHERE id = ?1 AND queue_name = ?2
             RETURNING body, row_key, resource_id",
        )?
        .query_row(rusqlite::params![id, shared.queue], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    let Some((body, row_key, resource_id)) = removed else {
        return Ok(false);
    };
    insert_message(connection, &shared.queue, &body, Duration::ZERO)?;

    if let Some(row_key) = row_key {
        reopen_failed_task(connection, shared, resource_id.as_deref(), &row_key)?;
    }
    Ok(true)
}

fn reopen_failed_task(
    connection: &Connection,
    shared: &Shared,
    resource_id: Option<&str>,
    task_id: &str,
) -> Result<()> {
    let (active, finished) = (&shared.active, &shared.finished);
    let matches_task = "(?1 IS NULL OR resource_id = ?1) AND row_key = ?2 AND status = ?3";
    // Every column is copied except status, end_time and error_message, which start over.
    let copied: Vec<&str> = task_column_names()
        .map(|column| match column {
            "status" => "?4",
            "end_time" | "error_message" => "NULL",
            other => other,
        })
        .collect();
    let copied = copied.join(", ");
    let insert = format!(
        "INSERT OR REPLACE INTO {active} ({TASK_COLUMNS})
         SELECT {copied} FROM {finished} WHERE {matches_task}"
    );
    let delete = format!("DELETE FROM {finished} WHERE {matches_task}");

    let params = rusqlite::params![
        resource_id,
        task_id,
        Status::Error.as_str(),
        Status::Created.as_str()
    ];
    let moved = connection.prepare_cached(&insert)?.execute(params)?;
    if moved > 0 {
        connection
            .prepare_cached(&delete)?
            .execute(rusqlite::params![
                resource_id,
                task_id,
                Status::Error.as_str()
            ])?;
        tracing::info!(
            task_id,
            "moved failed task back to the active table for its requeued message"
        );
    }
    Ok(())
}

/// Parses a lease's message id. An id this backend never issued matches no row.
fn message_id(lease: &Lease) -> Option<i64> {
    lease.message_id.parse().ok()
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn duration_ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn time_from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use rusqlite::{Connection, StatementStatus};

    use super::super::{SqliteBackend, SqliteOptions};
    use super::*;

    #[test]
    fn lease_statement_is_prepared_once() {
        let dir = tempfile::tempdir().unwrap();
        drop(SqliteBackend::open(SqliteOptions::in_dir(dir.path())).unwrap());
        let connection = Connection::open(dir.path().join("bgw.db")).unwrap();
        for _ in 0..8 {
            insert_message(&connection, "q", "{}", Duration::ZERO).unwrap();
        }

        let mut statement = connection.prepare(&lease_sql()).unwrap();
        for max in 1..=3 {
            let now = now_ms() + max;
            let leased = statement
                .query_map(rusqlite::params![now + 30_000, "q", now, max], |_| Ok(()))
                .unwrap()
                .count();
            assert_eq!(leased, max as usize);
        }

        assert_eq!(statement.get_status(StatementStatus::RePrepare), 0);
    }
}
