//! Tables of the SQLite backend and their creation.
//!
//! The task tables keep the twelve columns of `background-workflows` 0.3.0 first and in
//! its order, because that library reads rows by position (`SELECT *`, columns 0 to 11).
//! `bgw`'s own columns follow them. A task table the Python library created is upgraded
//! in place by adding the missing columns.

use rusqlite::Connection;

use crate::{Error, Result};

/// Columns of a task table as `background-workflows` creates it, all of type TEXT.
pub(super) const PYTHON_COLUMNS: [&str; 12] = [
    "resource_id",
    "row_key",
    "task_type",
    "status",
    "input_payload",
    "output_payload",
    "start_time",
    "end_time",
    "batch_id",
    "error_message",
    "container_name",
    "blob_name",
];

/// Columns `bgw` adds after the Python ones, with their types, in this order.
pub(super) const EXTRA_COLUMNS: [(&str, &str); 16] = [
    ("attempt", "INTEGER"),
    ("component_digest", "TEXT"),
    ("component_version", "INTEGER"),
    ("fuel_used", "INTEGER"),
    ("progress", "INTEGER"),
    ("progress_message", "TEXT"),
    ("output_container_name", "TEXT"),
    ("output_blob_name", "TEXT"),
    ("task_log", "TEXT"),
    ("host_id", "TEXT"),
    ("created_time", "TEXT"),
    ("attempt_history", "TEXT"),
    ("deadline_time", "TEXT"),
    ("idempotency_key", "TEXT"),
    ("cancel_requested", "INTEGER"),
    ("component_wait_start", "TEXT"),
];

/// All 28 task columns in table order, which is also the field order of `TaskRecord`.
pub(super) const TASK_COLUMNS: &str = "resource_id, row_key, task_type, status, \
    input_payload, output_payload, start_time, end_time, batch_id, error_message, \
    container_name, blob_name, attempt, component_digest, component_version, fuel_used, \
    progress, progress_message, output_container_name, output_blob_name, task_log, host_id, \
    created_time, attempt_history, deadline_time, idempotency_key, cancel_requested, \
    component_wait_start";

/// Number of task columns.
pub(super) const TASK_COLUMN_COUNT: usize = 28;

/// Names of the 28 task columns in table order.
pub(super) fn task_column_names() -> impl Iterator<Item = &'static str> {
    PYTHON_COLUMNS
        .into_iter()
        .chain(EXTRA_COLUMNS.into_iter().map(|(name, _)| name))
}

/// Queue messages of every queue name, leased by moving `visible_at_ms` into the future.
const QUEUE_TABLE: &str = "
    CREATE TABLE IF NOT EXISTS bgw_queue (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        queue_name TEXT NOT NULL,
        body TEXT NOT NULL,
        visible_at_ms INTEGER NOT NULL,
        dequeue_count INTEGER NOT NULL DEFAULT 0,
        pop_receipt TEXT,
        inserted_at_ms INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS bgw_queue_visible
        ON bgw_queue (queue_name, visible_at_ms, id);
    CREATE TABLE IF NOT EXISTS bgw_dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        queue_name TEXT NOT NULL,
        body TEXT NOT NULL,
        reason TEXT NOT NULL,
        dequeue_count INTEGER NOT NULL,
        dead_lettered_at_ms INTEGER NOT NULL,
        row_key TEXT,
        resource_id TEXT
    );
    CREATE INDEX IF NOT EXISTS bgw_dead_letters_queue ON bgw_dead_letters (queue_name, id);
";

/// Registered component versions, and `bgw_meta` for the registry generation counter and
/// the last current version of each unregistered activity type.
const REGISTRY_TABLES: &str = "
    CREATE TABLE IF NOT EXISTS bgw_components (
        activity_type TEXT NOT NULL,
        version INTEGER NOT NULL,
        digest TEXT NOT NULL,
        fuel INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        timeout_secs INTEGER NOT NULL,
        max_output_bytes INTEGER NOT NULL,
        registered_at TEXT NOT NULL,
        current INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL DEFAULT 3,
        backoff_ms INTEGER NOT NULL DEFAULT 1000,
        max_backoff_ms INTEGER NOT NULL DEFAULT 60000,
        PRIMARY KEY (activity_type, version)
    );
    CREATE TABLE IF NOT EXISTS bgw_meta (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
";

/// Creates every table and index that is missing and adds missing `bgw` columns to task
/// tables that already exist. Runs inside the caller's write transaction.
pub(super) fn create(connection: &Connection, active: &str, finished: &str) -> Result<()> {
    for table in [active, finished] {
        create_task_table(connection, table)?;
    }
    // Only pruning reads by end time, and it reads the finished table. On the active table
    // the end-time, created-time and status indexes served only `bgw list`, yet every
    // submit, attempt start and finish updated them: without them the writer thread spent
    // about 10% fewer instructions per task, and listing active tasks scans that table.
    connection.execute_batch(&format!(
        "CREATE INDEX IF NOT EXISTS {finished}_end_time ON {finished} (end_time);
         CREATE INDEX IF NOT EXISTS {finished}_created_time ON {finished} (created_time);
         CREATE INDEX IF NOT EXISTS {finished}_status_created_time
             ON {finished} (status, created_time);
         DROP INDEX IF EXISTS {active}_end_time;
         DROP INDEX IF EXISTS {active}_created_time;
         DROP INDEX IF EXISTS {active}_status_created_time;"
    ))?;
    connection.execute_batch(QUEUE_TABLE)?;
    connection.execute_batch(REGISTRY_TABLES)?;
    Ok(())
}

fn create_task_table(connection: &Connection, table: &str) -> Result<()> {
    let python: Vec<String> = PYTHON_COLUMNS
        .iter()
        .map(|name| format!("{name} TEXT"))
        .collect();
    let extra: Vec<String> = EXTRA_COLUMNS
        .iter()
        .map(|(name, kind)| format!("{name} {kind}"))
        .collect();
    connection.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {table} ({}, {}, PRIMARY KEY(resource_id, row_key))",
        python.join(", "),
        extra.join(", ")
    ))?;

    let existing = column_names(connection, table)?;
    if let Some(missing) = PYTHON_COLUMNS
        .iter()
        .find(|name| !existing.contains(&name.to_string()))
    {
        return Err(Error::Invalid(format!(
            "table {table} exists but has no column {missing}, so it was not created by \
             background-workflows or bgw; configure another table name"
        )));
    }
    for (name, kind) in EXTRA_COLUMNS {
        if !existing.iter().any(|column| column == name) {
            connection.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {name} {kind}"))?;
            tracing::info!(table, column = name, "added column to existing task table");
        }
    }

    connection.execute_batch(&format!(
        "CREATE INDEX IF NOT EXISTS {table}_row_key ON {table} (row_key);
         CREATE INDEX IF NOT EXISTS {table}_idempotency_key ON {table} (idempotency_key)
             WHERE idempotency_key IS NOT NULL;"
    ))?;
    Ok(())
}

fn column_names(connection: &Connection, table: &str) -> Result<Vec<String>> {
    let mut statement = connection.prepare(&format!("PRAGMA table_info({table})"))?;
    let names = statement
        .query_map([], |row| row.get::<_, String>(1))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(names
        .into_iter()
        .map(|name| name.to_ascii_lowercase())
        .collect())
}
