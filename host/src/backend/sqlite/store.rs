//! The task tables: reading and writing [`TaskRecord`]s.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use rusqlite::{Connection, Row, ToSql};

use super::schema::{TASK_COLUMNS, TASK_COLUMN_COUNT};
use super::{Shared, SqliteBackend};
use crate::backend::{CancelOutcome, ListFilter, ProgressUpdate, TaskStore};
use crate::record::{format_time, parse_time, AttemptSummary, Status, TaskRecord};
use crate::{Error, Result};

#[async_trait]
impl TaskStore for SqliteBackend {
    async fn insert_task(&self, record: &TaskRecord) -> Result<()> {
        let record = record.clone();
        self.write(move |shared, connection| insert_new_task(connection, shared, &record))
            .await
    }

    async fn delete_task(&self, resource_id: &str, task_id: &str) -> Result<()> {
        let (resource_id, task_id) = (resource_id.to_owned(), task_id.to_owned());
        self.write(move |shared, connection| {
            delete_from(connection, &shared.active, &resource_id, &task_id)?;
            Ok(())
        })
        .await
    }

    async fn get_task(
        &self,
        resource_id: Option<&str>,
        task_id: &str,
    ) -> Result<Option<TaskRecord>> {
        let resource_id = resource_id.map(str::to_owned);
        let task_id = task_id.to_owned();
        self.run(move |shared| {
            shared.db.read(|connection| {
                for table in [&shared.active, &shared.finished] {
                    let found = find_task(connection, table, resource_id.as_deref(), &task_id)?;
                    if found.is_some() {
                        return Ok(found);
                    }
                }
                Ok(None)
            })
        })
        .await
    }

    async fn get_tasks(&self, keys: &[(String, String)]) -> Result<Vec<Option<TaskRecord>>> {
        let keys = keys.to_vec();
        self.run(move |shared| {
            shared.db.read(|connection| {
                let mut records = Vec::with_capacity(keys.len());
                for (resource_id, task_id) in &keys {
                    let mut found = None;
                    for table in [&shared.active, &shared.finished] {
                        found = find_task(connection, table, Some(resource_id), task_id)?;
                        if found.is_some() {
                            break;
                        }
                    }
                    records.push(found);
                }
                Ok(records)
            })
        })
        .await
    }

    async fn list_tasks(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>> {
        let filter = filter.clone();
        self.run(move |shared| {
            shared
                .db
                .read(|connection| list_tasks(connection, shared, &filter))
        })
        .await
    }

    async fn request_cancel(
        &self,
        resource_id: Option<&str>,
        task_id: &str,
    ) -> Result<CancelOutcome> {
        let resource_id = resource_id.map(str::to_owned);
        let task_id = task_id.to_owned();
        self.write(move |shared, connection| {
            if let Some(mut record) =
                find_task(connection, &shared.active, resource_id.as_deref(), &task_id)?
            {
                if record.status == Status::Running {
                    let sql = format!(
                        "UPDATE {} SET cancel_requested = 1 WHERE resource_id = ?1 AND row_key = ?2",
                        shared.active
                    );
                    connection
                        .prepare_cached(&sql)?
                        .execute([&record.partition_key, &record.row_key])?;
                    return Ok(CancelOutcome::Requested);
                }
                // Queued or waiting for a retry: it never starts again. Its message is
                // acknowledged as a duplicate delivery when it is next leased.
                record.cancel_unstarted();
                move_to_finished(connection, shared, &record)?;
                return Ok(CancelOutcome::Cancelled);
            }
            match find_task(connection, &shared.finished, resource_id.as_deref(), &task_id)? {
                Some(record) => Ok(CancelOutcome::AlreadyFinished(record.status)),
                None => Ok(CancelOutcome::NotFound),
            }
        })
        .await
    }

    async fn cancel_requested(&self, resource_id: &str, task_id: &str) -> Result<bool> {
        let (resource_id, task_id) = (resource_id.to_owned(), task_id.to_owned());
        self.run(move |shared| {
            let sql = format!(
                "SELECT cancel_requested FROM {} WHERE resource_id = ?1 AND row_key = ?2",
                shared.active
            );
            shared.db.read(|connection| {
                let mut statement = connection.prepare_cached(&sql)?;
                let mut rows = statement.query([&resource_id, &task_id])?;
                Ok(match rows.next()? {
                    Some(row) => row.get::<_, Option<i64>>(0)?.unwrap_or(0) != 0,
                    None => false,
                })
            })
        })
        .await
    }

    async fn prune_finished(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<TaskRecord>> {
        let cutoff = format_time(&before);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.write(move |shared, connection| {
            // Times `bgw` writes are RFC 3339 UTC text of one width, so text order is time
            // order. NOTE: a time with a seventh fractional digit, which only other writers
            // store, sorts before the six-digit times of its own microsecond.
            let sql = format!(
                "SELECT {TASK_COLUMNS} FROM {} WHERE end_time < ?1 ORDER BY end_time LIMIT ?2",
                shared.finished
            );
            let mut statement = connection.prepare_cached(&sql)?;
            let mut rows = statement.query(rusqlite::params![cutoff, limit])?;
            let mut pruned = Vec::new();
            while let Some(row) = rows.next()? {
                pruned.push(task_from_row(row, &shared.finished)?);
            }
            for record in &pruned {
                delete_from(
                    connection,
                    &shared.finished,
                    &record.partition_key,
                    &record.row_key,
                )?;
            }
            Ok(pruned)
        })
        .await
    }

    async fn update_progress(&self, updates: &[ProgressUpdate]) -> Result<()> {
        let updates = updates.to_vec();
        let sql = format!(
            "UPDATE {} SET progress = ?1, progress_message = ?2
             WHERE resource_id = ?3 AND row_key = ?4",
            self.shared.active
        );
        self.write(move |_, connection| {
            let mut statement = connection.prepare_cached(&sql)?;
            for update in &updates {
                statement.execute(rusqlite::params![
                    update.percent.min(100),
                    update.message,
                    update.resource_id,
                    update.task_id,
                ])?;
            }
            Ok(())
        })
        .await
    }
}

/// Inserts a record into the active table unless its task id exists in either table.
pub(super) fn insert_new_task(
    connection: &Connection,
    shared: &Shared,
    record: &TaskRecord,
) -> Result<()> {
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE row_key = ?1)
             OR EXISTS (SELECT 1 FROM {} WHERE row_key = ?1)",
        shared.active, shared.finished
    );
    let exists: bool = connection
        .prepare_cached(&sql)?
        .query_row([&record.row_key], |row| row.get(0))?;
    if exists {
        return Err(Error::Invalid(format!(
            "task id {:?} already exists; every task needs a new id",
            record.row_key
        )));
    }
    write_task(connection, &shared.active, record, false)
}

/// Writes all columns of a record. With `replace`, a record with the same key is
/// overwritten; without it, such a record is an error.
pub(super) fn write_task(
    connection: &Connection,
    table: &str,
    record: &TaskRecord,
    replace: bool,
) -> Result<()> {
    let verb = if replace {
        "INSERT OR REPLACE"
    } else {
        "INSERT"
    };
    let sql = format!(
        "{verb} INTO {table} ({TASK_COLUMNS}) VALUES ({})",
        *TASK_PLACEHOLDERS
    );
    let owned = OwnedColumns::of(record);
    connection
        .prepare_cached(&sql)?
        .execute(rusqlite::params_from_iter(task_values(record, &owned)))?;
    Ok(())
}

/// `?1, ?2, ..., ?28`: the placeholders of every task column, built once.
static TASK_PLACEHOLDERS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    (1..=TASK_COLUMN_COUNT)
        .map(|index| format!("?{index}"))
        .collect::<Vec<_>>()
        .join(", ")
});

/// Writes a terminal record to the finished table and deletes it from the active one.
pub(super) fn move_to_finished(
    connection: &Connection,
    shared: &Shared,
    record: &TaskRecord,
) -> Result<()> {
    write_task(connection, &shared.finished, record, true)?;
    delete_from(
        connection,
        &shared.active,
        &record.partition_key,
        &record.row_key,
    )?;
    Ok(())
}

/// Deletes a record from a table, returning whether it was there.
pub(super) fn delete_from(
    connection: &Connection,
    table: &str,
    resource_id: &str,
    task_id: &str,
) -> Result<bool> {
    let sql = format!("DELETE FROM {table} WHERE resource_id = ?1 AND row_key = ?2");
    let deleted = connection
        .prepare_cached(&sql)?
        .execute([resource_id, task_id])?;
    Ok(deleted > 0)
}

pub(super) fn find_task(
    connection: &Connection,
    table: &str,
    resource_id: Option<&str>,
    task_id: &str,
) -> Result<Option<TaskRecord>> {
    let sql = format!(
        "SELECT {TASK_COLUMNS} FROM {table}
         WHERE (?1 IS NULL OR resource_id = ?1) AND row_key = ?2 LIMIT 1"
    );
    let mut statement = connection.prepare_cached(&sql)?;
    let mut rows = statement.query(rusqlite::params![resource_id, task_id])?;
    match rows.next()? {
        Some(row) => Ok(Some(task_from_row(row, table)?)),
        None => Ok(None),
    }
}

fn list_tasks(
    connection: &Connection,
    shared: &Shared,
    filter: &ListFilter,
) -> Result<Vec<TaskRecord>> {
    let mut conditions = Vec::new();
    let mut params: Vec<(&str, Value)> = Vec::new();
    if let Some(status) = filter.status {
        conditions.push("status = :status");
        params.push((":status", Value::Text(status.as_str().to_owned())));
    }
    if let Some(task_type) = &filter.task_type {
        conditions.push("task_type = :task_type");
        params.push((":task_type", Value::Text(task_type.clone())));
    }
    if let Some(resource_id) = &filter.resource_id {
        conditions.push("resource_id = :resource_id");
        params.push((":resource_id", Value::Text(resource_id.clone())));
    }
    let limit = filter
        .limit
        .map_or(-1, |limit| i64::try_from(limit).unwrap_or(i64::MAX));
    params.push((":limit", Value::Integer(limit)));

    let where_clause = match conditions.is_empty() {
        true => String::new(),
        false => format!("WHERE {}", conditions.join(" AND ")),
    };
    let (active, finished) = (&shared.active, &shared.finished);
    // NULL created times (records the Python library wrote) sort last in descending order.
    let sql = format!(
        "SELECT {TASK_COLUMNS}, '{active}' FROM {active} {where_clause}
         UNION ALL
         SELECT {TASK_COLUMNS}, '{finished}' FROM {finished} {where_clause}
         ORDER BY created_time DESC, row_key DESC
         LIMIT :limit"
    );

    let named: Vec<(&str, &dyn ToSql)> = params
        .iter()
        .map(|(name, value)| (*name, value as &dyn ToSql))
        .collect();
    let mut statement = connection.prepare_cached(&sql)?;
    let mut rows = statement.query(named.as_slice())?;
    let mut records = Vec::new();
    while let Some(row) = rows.next()? {
        let table: String = row.get(TASK_COLUMN_COUNT)?;
        records.push(task_from_row(row, &table)?);
    }
    Ok(records)
}

/// Reads a record from a row of the task columns.
///
/// Values of an unexpected SQLite type are converted where possible, and a time
/// that does not parse is read as missing, so that one bad value written by another
/// program cannot make the task unreadable. An unknown status is an error.
pub(super) fn task_from_row(row: &Row<'_>, table: &str) -> Result<TaskRecord> {
    let row_key = text(row, 1)?.unwrap_or_default();
    let status_text = text(row, 3)?.unwrap_or_default();
    let status: Status = status_text
        .parse()
        .map_err(|error| Error::Invalid(format!("task {row_key:?} in table {table}: {error}")))?;
    let time = |index: usize, column: &str| stored_time(row, index, &row_key, column);

    Ok(TaskRecord {
        partition_key: text(row, 0)?.unwrap_or_default(),
        task_type: text(row, 2)?.unwrap_or_default(),
        status,
        input_payload: text(row, 4)?.unwrap_or_default(),
        output_payload: text(row, 5)?.unwrap_or_default(),
        start_time: time(6, "start_time")?,
        end_time: time(7, "end_time")?,
        batch_id: text(row, 8)?.unwrap_or_default(),
        error_message: text(row, 9)?,
        container_name: text(row, 10)?,
        blob_name: text(row, 11)?,
        attempt: integer(row, 12)?.map_or(0, |value| value.clamp(0, u32::MAX.into()) as u32),
        component_digest: text(row, 13)?,
        component_version: integer(row, 14)?.and_then(|value| u32::try_from(value).ok()),
        fuel_used: integer(row, 15)?.and_then(|value| u64::try_from(value).ok()),
        progress: integer(row, 16)?.map(|value| value.clamp(0, 100) as u8),
        progress_message: text(row, 17)?,
        output_container_name: text(row, 18)?,
        output_blob_name: text(row, 19)?,
        task_log: text(row, 20)?,
        host_id: text(row, 21)?,
        created_time: time(22, "created_time")?,
        attempt_history: attempt_history(row, 23, &row_key)?,
        deadline_time: time(24, "deadline_time")?,
        idempotency_key: text(row, 25)?,
        cancel_requested: integer(row, 26)?.unwrap_or(0) != 0,
        component_wait_start: time(27, "component_wait_start")?,
        row_key,
    })
}

/// The column values of a record that are not stored as they are in [`TaskRecord`]: times
/// as text and the attempt history as JSON.
struct OwnedColumns {
    start_time: Option<String>,
    end_time: Option<String>,
    created_time: Option<String>,
    deadline_time: Option<String>,
    component_wait_start: Option<String>,
    attempt_history: Option<String>,
}

impl OwnedColumns {
    fn of(record: &TaskRecord) -> Self {
        let time = |time: &Option<DateTime<Utc>>| time.as_ref().map(format_time);
        OwnedColumns {
            start_time: time(&record.start_time),
            end_time: time(&record.end_time),
            created_time: time(&record.created_time),
            deadline_time: time(&record.deadline_time),
            component_wait_start: time(&record.component_wait_start),
            attempt_history: (!record.attempt_history.is_empty()).then(|| {
                serde_json::to_string(&record.attempt_history).expect("attempt summaries serialize")
            }),
        }
    }
}

/// Returns the column values of a record, in table order, borrowed from the record and from
/// `owned`, so that writing a record copies none of its text.
fn task_values<'a>(
    record: &'a TaskRecord,
    owned: &'a OwnedColumns,
) -> [ToSqlOutput<'a>; TASK_COLUMN_COUNT] {
    let text = |text: &'a str| ToSqlOutput::Borrowed(ValueRef::Text(text.as_bytes()));
    let null = || ToSqlOutput::Borrowed(ValueRef::Null);
    let optional = |value: &'a Option<String>| value.as_deref().map_or_else(null, text);
    let integer = |value: Option<i64>| value.map_or_else(null, ToSqlOutput::from);
    [
        text(&record.partition_key),
        text(&record.row_key),
        text(&record.task_type),
        text(record.status.as_str()),
        text(&record.input_payload),
        text(&record.output_payload),
        optional(&owned.start_time),
        optional(&owned.end_time),
        text(&record.batch_id),
        optional(&record.error_message),
        optional(&record.container_name),
        optional(&record.blob_name),
        ToSqlOutput::from(i64::from(record.attempt)),
        optional(&record.component_digest),
        integer(record.component_version.map(i64::from)),
        integer(
            record
                .fuel_used
                .map(|fuel| i64::try_from(fuel).unwrap_or(i64::MAX)),
        ),
        integer(record.progress.map(i64::from)),
        optional(&record.progress_message),
        optional(&record.output_container_name),
        optional(&record.output_blob_name),
        optional(&record.task_log),
        optional(&record.host_id),
        optional(&owned.created_time),
        optional(&owned.attempt_history),
        optional(&owned.deadline_time),
        optional(&record.idempotency_key),
        ToSqlOutput::from(i64::from(record.cancel_requested)),
        optional(&owned.component_wait_start),
    ]
}

/// Reads the attempt history column; a value that does not parse is logged and skipped.
fn attempt_history(row: &Row<'_>, index: usize, task_id: &str) -> Result<Vec<AttemptSummary>> {
    let Some(value) = text(row, index)?.filter(|value| !value.trim().is_empty()) else {
        return Ok(Vec::new());
    };
    match serde_json::from_str(&value) {
        Ok(history) => Ok(history),
        Err(error) => {
            tracing::warn!(task_id, %error, "ignoring unreadable attempt history");
            Ok(Vec::new())
        }
    }
}

fn text(row: &Row<'_>, index: usize) -> Result<Option<String>> {
    Ok(match row.get_ref(index)? {
        ValueRef::Null => None,
        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => {
            Some(String::from_utf8_lossy(bytes).into_owned())
        }
        ValueRef::Integer(value) => Some(value.to_string()),
        ValueRef::Real(value) => Some(value.to_string()),
    })
}

fn integer(row: &Row<'_>, index: usize) -> Result<Option<i64>> {
    Ok(match row.get_ref(index)? {
        ValueRef::Integer(value) => Some(value),
        ValueRef::Text(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|text| text.trim().parse().ok()),
        ValueRef::Real(value) if value.fract() == 0.0 => Some(value as i64),
        _ => None,
    })
}

fn stored_time(
    row: &Row<'_>,
    index: usize,
    task_id: &str,
    column: &str,
) -> Result<Option<DateTime<Utc>>> {
    let Some(value) = text(row, index)?.filter(|value| !value.trim().is_empty()) else {
        return Ok(None);
    };
    match parse_time(&value) {
        Ok(time) => Ok(Some(time)),
        Err(error) => {
            tracing::warn!(task_id, column, %value, %error, "ignoring unreadable stored time");
            Ok(None)
        }
    }
}
